//! Reference merge (the oracle).
