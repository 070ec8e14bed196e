//! Reference argmin (the oracle).
