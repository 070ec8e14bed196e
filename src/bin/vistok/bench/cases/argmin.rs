//! `vistok bench` cases of the argmin family.

use super::{Case, Env};

/// The argmin cases (none yet).
pub fn cases(_env: &Env) -> Result<Vec<Case>, String> {
    Ok(vec![])
}
