//! Codebook argmin: nearest codebook entry (L2 or cosine) per vector, and code lookup. (Issue 4: in progress.)
