//! Criterion benches of the fsq family (none yet).

fn main() {}
