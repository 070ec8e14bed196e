//! Criterion benches of the merge family (none yet).

fn main() {}
