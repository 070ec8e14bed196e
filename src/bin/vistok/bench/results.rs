//! One row of results: a case's timings and the figures derived from them against the
//! roofline. This is what the table prints, the JSON stores and a baseline is compared with.

use serde::{Deserialize, Serialize};

use super::cases::{Case, Check};
use super::roofline::Roofline;
use super::timing::Stats;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// `family/backend/dtype/shape`.
    pub id: String,
    pub family: String,
    pub backend: String,
    pub dtype: String,
    pub shape: String,
    /// Minimum bytes moved per call (input read once + output written once).
    pub bytes: u64,
    /// Useful flops per call (0 where flops don't describe the work).
    pub flops: u64,
    pub samples: usize,
    pub calls_per_sample: u32,
    /// Seconds per call: median, fastest and slowest sample.
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// At the median.
    pub gb_per_s: f64,
    pub gflop_per_s: Option<f64>,
    /// flops / bytes.
    pub arithmetic_intensity: Option<f64>,
    /// min(compute peak, intensity × bandwidth) in GFLOP/s; for flop-less kernels the
    /// bandwidth in GB/s.
    pub attainable: Option<f64>,
    /// Achieved / attainable.
    pub roofline_fraction: Option<f64>,
    /// `oracle`, `exact` or `max abs err …`.
    pub check: String,
    pub check_ok: bool,
    pub max_abs_error: Option<f64>,
}

impl Row {
    pub fn new(case: &Case, stats: &Stats, check: &Check, roofline: &Roofline) -> Row {
        let gb_per_s = case.bytes as f64 / stats.median / 1e9;
        let (gflop_per_s, intensity) = if case.flops > 0 {
            (Some(case.flops as f64 / stats.median / 1e9), Some(case.flops as f64 / case.bytes.max(1) as f64))
        } else {
            (None, None)
        };
        let bandwidth = roofline.memory(case.backend);
        let peak = roofline.compute(case.backend, case.peak);
        let (attainable, fraction) = match (gflop_per_s, intensity, bandwidth) {
            (Some(g), Some(ai), Some(bw)) => {
                let roof = peak.map_or(ai * bw, |p| p.min(ai * bw));
                (Some(roof), Some(g / roof))
            }
            (None, _, Some(bw)) => (Some(bw), Some(gb_per_s / bw)),
            _ => (None, None),
        };
        let (text, max_abs_error) = match *check {
            Check::Oracle => ("oracle".to_string(), None),
            Check::Exact => ("exact".to_string(), Some(0.0)),
            Check::Differs { max_abs, tol } => {
                let verdict = if check.ok() { "" } else { " FAIL" };
                (format!("max abs err {max_abs:.3e} (tol {tol:.1e}){verdict}"), Some(max_abs))
            }
        };
        Row {
            id: case.id(),
            family: case.family.to_string(),
            backend: case.backend.name().to_string(),
            dtype: case.dtype.clone(),
            shape: case.shape.clone(),
            bytes: case.bytes,
            flops: case.flops,
            samples: stats.samples,
            calls_per_sample: stats.calls_per_sample,
            median_s: stats.median,
            min_s: stats.min,
            max_s: stats.max,
            gb_per_s,
            gflop_per_s,
            arithmetic_intensity: intensity,
            attainable,
            roofline_fraction: fraction,
            check: text,
            check_ok: check.ok(),
            max_abs_error,
        }
    }
}
