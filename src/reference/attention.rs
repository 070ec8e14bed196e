//! Reference attention (the oracle).
