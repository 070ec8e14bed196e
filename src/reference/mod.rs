//! The scalar oracle: one file per kernel family, naive on purpose, sharing no code with the
//! fast paths. It is the specification the other backends are tested against.

pub mod argmin;
pub mod attention;
pub mod fsq;
pub mod lfq;
pub mod merge;
pub mod patchify;
