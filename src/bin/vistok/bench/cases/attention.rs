//! `vistok bench` cases of the attention family.

use super::{Case, Env};

/// The attention cases (none yet).
pub fn cases(_env: &Env) -> Result<Vec<Case>, String> {
    Ok(vec![])
}
