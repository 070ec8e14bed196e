//! `--baseline FILE --max-regression PCT`: compare this run's medians with an earlier JSON.
//!
//! A kernel fails when its median is slower than the baseline's by more than PCT; faster,
//! unchanged and new kernels are reported, never failures. Each difference says whether it is
//! outside the run-to-run spread: whether the [min, max] ranges of the two runs are disjoint
//! (overlapping ranges mean the noise of a shared machine could explain it).

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::results::Row;
use super::table::time;

/// What a baseline file must hold; everything else in it is ignored.
#[derive(Deserialize)]
struct File {
    results: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    id: String,
    median_s: f64,
    min_s: f64,
    max_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Slower by more than the allowed percentage: the run fails.
    Regressed,
    /// Faster by more than the allowed percentage.
    Faster,
    /// Within ± the allowed percentage.
    Unchanged,
    /// Not in the baseline.
    New,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub id: String,
    pub verdict: Verdict,
    pub baseline_median_s: Option<f64>,
    pub median_s: f64,
    /// (median / baseline median − 1) × 100.
    pub change_pct: Option<f64>,
    /// The [min, max] ranges don't overlap.
    pub outside_spread: Option<bool>,
}

/// Reads a baseline; a clear message for a missing or malformed file.
fn read(path: &Path) -> Result<HashMap<String, Entry>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--baseline {}: {e}", path.display()))?;
    let file: File = serde_json::from_str(&text)
        .map_err(|e| format!("--baseline {}: not a vistok bench JSON ({e})", path.display()))?;
    for e in &file.results {
        if !(e.median_s > 0.0 && e.min_s > 0.0 && e.max_s >= e.min_s && e.median_s.is_finite()) {
            return Err(format!("--baseline {}: {}: times must be positive with min ≤ max", path.display(), e.id));
        }
    }
    Ok(file.results.into_iter().map(|e| (e.id.clone(), e)).collect())
}

pub fn compare(path: &Path, rows: &[Row], max_regression_pct: f64) -> Result<Vec<Comparison>, String> {
    let base = read(path)?;
    Ok(rows
        .iter()
        .map(|r| match base.get(&r.id) {
            None => Comparison {
                id: r.id.clone(),
                verdict: Verdict::New,
                baseline_median_s: None,
                median_s: r.median_s,
                change_pct: None,
                outside_spread: None,
            },
            Some(b) => {
                let change = (r.median_s / b.median_s - 1.0) * 100.0;
                let verdict = if change > max_regression_pct {
                    Verdict::Regressed
                } else if change < -max_regression_pct {
                    Verdict::Faster
                } else {
                    Verdict::Unchanged
                };
                Comparison {
                    id: r.id.clone(),
                    verdict,
                    baseline_median_s: Some(b.median_s),
                    median_s: r.median_s,
                    change_pct: Some(change),
                    outside_spread: Some(r.min_s > b.max_s || r.max_s < b.min_s),
                }
            }
        })
        .collect())
}

pub fn print(
    out: &mut impl std::io::Write,
    path: &Path,
    max_regression_pct: f64,
    cmp: &[Comparison],
) -> std::io::Result<()> {
    writeln!(out, "\nbaseline {} (fail above +{max_regression_pct}%):", path.display())?;
    let w = cmp.iter().map(|c| c.id.len()).max().unwrap_or(2);
    for c in cmp {
        let (Some(base), Some(change), Some(outside)) = (c.baseline_median_s, c.change_pct, c.outside_spread) else {
            writeln!(out, "  {:<w$}  new (not in the baseline): {}", c.id, time(c.median_s))?;
            continue;
        };
        let word = match c.verdict {
            Verdict::Regressed => "REGRESSED",
            Verdict::Faster => "faster",
            Verdict::Unchanged => "unchanged",
            Verdict::New => "new",
        };
        let spread = if outside {
            "outside the run-to-run spread"
        } else {
            "within the run-to-run spread ([min, max] ranges overlap)"
        };
        writeln!(out, "  {:<w$}  {} -> {}  {change:+.1}%  {word}, {spread}", c.id, time(base), time(c.median_s))?;
    }
    Ok(())
}

/// The error for the regressions in `cmp`, if any.
pub fn failure(cmp: &[Comparison], max_regression_pct: f64) -> Option<String> {
    let bad: Vec<String> = cmp
        .iter()
        .filter(|c| c.verdict == Verdict::Regressed)
        .map(|c| format!("{} ({:+.1}%)", c.id, c.change_pct.unwrap_or(0.0)))
        .collect();
    (!bad.is_empty()).then(|| {
        format!(
            "bench: {} kernel(s) slower than the baseline by more than {max_regression_pct}%: {}",
            bad.len(),
            bad.join(", ")
        )
    })
}
