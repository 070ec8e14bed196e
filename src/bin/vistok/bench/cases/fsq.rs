//! `vistok bench` cases of the fsq family.

use super::{Case, Env};

/// The fsq cases (none yet).
pub fn cases(_env: &Env) -> Result<Vec<Case>, String> {
    Ok(vec![])
}
