//! Fused flash-style attention. (Issue 6: in progress.)
