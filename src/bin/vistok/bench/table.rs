//! The table on stdout: one line per case, the spread next to the median.

use std::io::Write;

use super::cases::{Backend, Peak};
use super::results::Row;
use super::roofline::Roofline;

/// `1.23 ms`, `456 µs`, … : three significant digits in the largest unit below the value.
pub fn time(s: f64) -> String {
    let (v, unit) = match s {
        s if s >= 1.0 => (s, "s"),
        s if s >= 1e-3 => (s * 1e3, "ms"),
        s if s >= 1e-6 => (s * 1e6, "µs"),
        s => (s * 1e9, "ns"),
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {unit}")
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".to_string(), |x| format!("{x:.digits$}"))
}

pub fn print(out: &mut impl Write, rows: &[Row], roofline: &Roofline) -> std::io::Result<()> {
    let ceiling = |b| {
        let bw = opt(roofline.memory(b), 1);
        let peak = opt(roofline.compute(b, Peak::F32), 0);
        format!("{bw} GB/s, f32 {peak} GFLOP/s")
    };
    writeln!(out, "roofline: cpu {} ({} threads, {})", ceiling(Backend::Cpu), roofline.threads, roofline.isa)?;
    if roofline.gpu.is_some() {
        writeln!(out, "roofline: gpu {}", ceiling(Backend::Cuda))?;
    }
    let w = rows.iter().map(|r| r.id.len()).max().unwrap_or(2).max(2);
    writeln!(
        out,
        "{:<w$}  {:>9}  {:>21}  {:>9}  {:>8}  {:>7}  {:>6}  check",
        "id", "median", "[min, max]", "GB/s", "GFLOP/s", "flop/B", "% roof"
    )?;
    for r in rows {
        writeln!(out, "{}", line(r, w))?;
    }
    writeln!(
        out,
        "(GB/s: minimum bytes moved (input + output) / median; % roof: achieved / min(f32 peak, flop/B × bandwidth);"
    )?;
    writeln!(out, " [min, max]: fastest and slowest sample, per call)")?;
    Ok(())
}

/// One row of the table, its id padded to `w`.
pub fn line(r: &Row, w: usize) -> String {
    let range = format!("[{}, {}]", time(r.min_s), time(r.max_s));
    format!(
        "{:<w$}  {:>9}  {:>21}  {:>9.2}  {:>8}  {:>7}  {:>6}  {}",
        r.id,
        time(r.median_s),
        range,
        r.gb_per_s,
        opt(r.gflop_per_s, 2),
        opt(r.arithmetic_intensity, 2),
        r.roofline_fraction.map_or("-".to_string(), |f| format!("{:.1}%", 100.0 * f)),
        r.check
    )
}

/// The cases `--time-limit` left out, after the table (nothing when there are none).
pub fn not_run(out: &mut impl Write, ids: &[String]) -> std::io::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    writeln!(out, "not run (--time-limit reached): {}", ids.len())?;
    for id in ids {
        writeln!(out, "  {id}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_pick_a_unit() {
        assert_eq!(super::time(1.5e-3), "1.50 ms");
        assert_eq!(super::time(123.4e-6), "123 µs");
        assert_eq!(super::time(2.0), "2.00 s");
        assert_eq!(super::time(5e-9), "5.00 ns");
    }
}
