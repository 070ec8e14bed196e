//! `vistok bench` cases of the merge family.

use super::{Case, Env};

/// The merge cases (none yet).
pub fn cases(_env: &Env) -> Result<Vec<Case>, String> {
    Ok(vec![])
}
