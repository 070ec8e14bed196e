//! Criterion benches of the lfq family (none yet).

fn main() {}
