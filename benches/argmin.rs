//! Criterion benches of the argmin family (none yet).

fn main() {}
