//! The JSON files (`vistok bench --json`, `vistok roofline --json`) and writing output files
//! whole or not at all.

use std::path::Path;

use serde::Serialize;

use super::baseline::Comparison;
use super::machine::Machine;
use super::results::Row;
use super::roofline::Roofline;

/// `vistok bench --json`: every figure of the run. A later run reads `results` back as its
/// baseline.
#[derive(Serialize)]
pub struct Bench<'a> {
    pub command: &'static str,
    pub quick: bool,
    pub filters: &'a [String],
    pub machine: &'a Machine,
    pub roofline: &'a Roofline,
    pub results: &'a [Row],
    /// Selected cases that `--time-limit` left out (not timed, not checked).
    pub not_run: &'a [String],
    pub baseline: Option<BaselineSummary<'a>>,
}

#[derive(Serialize)]
pub struct BaselineSummary<'a> {
    pub file: String,
    pub max_regression_pct: f64,
    pub comparisons: &'a [Comparison],
}

/// `vistok roofline --json`.
#[derive(Serialize)]
pub struct RooflineFile<'a> {
    pub command: &'static str,
    pub machine: &'a Machine,
    pub roofline: &'a Roofline,
}

pub fn json(path: &Path, value: &impl Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| format!("{}: {e}", path.display()))?;
    write(path, text.as_bytes())
}

/// Writes `bytes` to a temporary name next to `path`, then renames: a reader never sees half a
/// file, and a failed run leaves no file behind.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let name = path.file_name().ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
}
