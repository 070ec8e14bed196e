//! Criterion benches of the attention family (none yet).

fn main() {}
