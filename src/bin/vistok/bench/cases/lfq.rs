//! `vistok bench` cases of the lfq family.

use super::{Case, Env};

/// The lfq cases (none yet).
pub fn cases(_env: &Env) -> Result<Vec<Case>, String> {
    Ok(vec![])
}
