//! CPU merge.
