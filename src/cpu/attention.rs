//! CPU attention.
