//! `--plot FILE.svg`: the roofline chart, drawn by hand as SVG.
//!
//! Log-log: arithmetic intensity (flop/byte) across, achieved GFLOP/s up. Each roof is
//! min(peak, intensity × bandwidth): a diagonal (memory-bound) meeting a horizontal
//! (compute-bound) at the ridge point. Each kernel row is a numbered point coloured by backend;
//! the legend beside the chart names each number, since memory-bound kernels crowd together at
//! the same intensity and full ids would overlap.

use std::fmt::Write;

use super::cases::Backend;
use super::machine::Machine;
use super::results::Row;
use super::roofline::Roofline;

/// Canvas and plot-area geometry, in pixels.
const LEFT: f64 = 80.0;
const TOP: f64 = 60.0;
const PLOT_W: f64 = 600.0;
const PLOT_H: f64 = 480.0;
const LEGEND_X: f64 = LEFT + PLOT_W + 40.0;
const LINE: f64 = 15.0;
/// Average advance of an 11 px legend character, generous so that text never overflows.
const CHAR_W: f64 = 6.4;

fn colour(backend: &str) -> &'static str {
    match backend {
        "reference" => "#7f7f7f",
        "cpu" => "#1f77b4",
        "cuda" => "#2ca02c",
        _ => "#d62728",
    }
}

/// Log-scale axes covering whole decades.
struct Axes {
    x: (f64, f64),
    y: (f64, f64),
}

impl Axes {
    fn px(&self, ai: f64, gflops: f64) -> (f64, f64) {
        let fx = (ai.log10() - self.x.0) / (self.x.1 - self.x.0);
        let fy = (gflops.log10() - self.y.0) / (self.y.1 - self.y.0);
        (LEFT + fx * PLOT_W, TOP + (1.0 - fy) * PLOT_H)
    }
}

/// A roof: a label, its colour, memory bandwidth (GB/s) and compute peak (GFLOP/s).
struct Roof {
    label: String,
    colour: &'static str,
    bandwidth: f64,
    peak: Option<f64>,
    dashed: bool,
}

fn roofs(r: &Roofline) -> Vec<Roof> {
    let mut out = vec![];
    if let Some(bw) = r.memory(Backend::Cpu) {
        let t = r.threads;
        out.push(Roof {
            label: format!("cpu f32 FMA, {t} threads"),
            colour: "#1f77b4",
            bandwidth: bw,
            peak: r.f32_fma.best(),
            dashed: false,
        });
        if let Some(p) = r.bf16_dot.best() {
            out.push(Roof {
                label: format!("cpu bf16 dot, {t} threads"),
                colour: "#9467bd",
                bandwidth: bw,
                peak: Some(p),
                dashed: true,
            });
        }
    }
    if let Some(g) = &r.gpu {
        out.push(Roof {
            label: format!("gpu f32 ({})", g.name),
            colour: "#2ca02c",
            bandwidth: g.copy_gb_per_s,
            peak: g.peak_f32_gflop_per_s,
            dashed: false,
        });
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// `0.1`, `1`, `10`, `1k`, … for a decade exponent.
fn decade(k: i32) -> String {
    match k {
        k if k < 0 => format!("{}", 10f64.powi(k)),
        k if k < 3 => format!("{}", 10i64.pow(k as u32)),
        k if k < 6 => format!("{}k", 10i64.pow(k as u32 - 3)),
        k => format!("{}M", 10i64.pow(k as u32 - 6)),
    }
}

pub fn svg(rows: &[Row], roofline: &Roofline, machine: &Machine) -> String {
    let roofs = roofs(roofline);
    let pts: Vec<(usize, &Row, f64, f64)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i + 1, r, r.arithmetic_intensity?, r.gflop_per_s?)))
        .filter(|(_, _, ai, g)| *ai > 0.0 && *g > 0.0 && ai.is_finite() && g.is_finite())
        .collect();

    // Axis ranges: every point, every peak and every ridge point, with some air.
    let mut xs: Vec<f64> = pts.iter().map(|p| p.2).collect();
    let mut ys: Vec<f64> = pts.iter().map(|p| p.3).collect();
    for r in &roofs {
        if let Some(p) = r.peak {
            xs.push(p / r.bandwidth);
            ys.push(p);
        }
    }
    let range = |v: &[f64], lo_default: f64, hi_default: f64| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if lo.is_finite() && hi.is_finite() { (lo, hi) } else { (lo_default, hi_default) };
        let (a, b) = ((lo / 2.0).log10().floor(), (hi * 2.0).log10().ceil());
        (a, b.max(a + 1.0))
    };
    let axes = Axes { x: range(&xs, 0.1, 10.0), y: range(&ys, 1.0, 100.0) };
    let legend_rows = rows.len() + roofs.len() + 4;
    let longest = rows.iter().map(|r| r.id.chars().count() + 44).max().unwrap_or(40);
    let width = (LEGEND_X + 20.0 + CHAR_W * longest as f64).max(1000.0);
    let height = (TOP + PLOT_H + 70.0).max(TOP + LINE * legend_rows as f64 + 20.0);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!(
        "vistok roofline: {}, {} threads ({}){}",
        machine.cpu_model,
        machine.threads,
        machine.simd,
        machine.gpu.as_ref().map_or(String::new(), |g| format!(", {g}"))
    );
    let _ = writeln!(s, r#"<text x="{LEFT}" y="28" font-size="16" font-weight="bold">{}</text>"#, escape(&title));
    let _ = writeln!(
        s,
        r#"<defs><clipPath id="area"><rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}"/></clipPath></defs>"#
    );

    // Grid and axes.
    for k in axes.x.0 as i32..=axes.x.1 as i32 {
        let (x, _) = axes.px(10f64.powi(k), 1.0);
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#ddd"/>"##, TOP + PLOT_H);
        let _ =
            writeln!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#, TOP + PLOT_H + 18.0, decade(k));
    }
    for k in axes.y.0 as i32..=axes.y.1 as i32 {
        let (_, y) = axes.px(1.0, 10f64.powi(k));
        let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/>"##, LEFT + PLOT_W);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 8.0, y + 4.0, decade(k));
    }
    let _ =
        writeln!(s, r#"<rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="none" stroke="black"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">arithmetic intensity (flop/byte, minimum bytes moved)</text>"#,
        LEFT + PLOT_W / 2.0,
        TOP + PLOT_H + 42.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(24 {}) rotate(-90)" text-anchor="middle">achieved GFLOP/s</text>"#,
        TOP + PLOT_H / 2.0
    );

    // Roofs: the diagonal from the left edge to the ridge, then the flat peak (or the diagonal
    // alone where the peak is unknown), clipped to the plot area.
    let (x_lo, x_hi) = (10f64.powf(axes.x.0), 10f64.powf(axes.x.1));
    let mut labelled = std::collections::HashSet::new();
    for r in &roofs {
        let ridge = r.peak.map_or(x_hi, |p| (p / r.bandwidth).min(x_hi));
        let mut path = vec![axes.px(x_lo, x_lo * r.bandwidth), axes.px(ridge, ridge * r.bandwidth)];
        if let Some(p) = r.peak {
            path.push(axes.px(x_hi, p));
        }
        let d: Vec<String> = path.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let dash = if r.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash} clip-path="url(#area)"/>"#,
            d.join(" "),
            r.colour
        );
        if let Some(p) = r.peak {
            let (_, y) = axes.px(x_hi, p);
            let text = format!("{}: {p:.0} GFLOP/s", r.label);
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end" fill="{}">{}</text>"#,
                LEFT + PLOT_W - 6.0,
                y - 5.0,
                r.colour,
                escape(&text)
            );
        }
        // The bandwidth label along the diagonal, near its start inside the plot (once per
        // bandwidth: the cpu roofs share theirs).
        if !labelled.insert(r.bandwidth.to_bits()) {
            continue;
        }
        let start = (10f64.powf(axes.y.0) / r.bandwidth).max(x_lo) * 1.6;
        if start < ridge {
            let (x, y) = axes.px(start, start * r.bandwidth);
            let angle = -(PLOT_H / (axes.y.1 - axes.y.0)).atan2(PLOT_W / (axes.x.1 - axes.x.0)).to_degrees();
            let text = format!("{} memory {:.1} GB/s", r.label.split(' ').next().unwrap_or(""), r.bandwidth);
            let _ = writeln!(
                s,
                r#"<text transform="translate({x:.1} {:.1}) rotate({angle:.1})" fill="{}">{}</text>"#,
                y - 6.0,
                r.colour,
                escape(&text)
            );
        }
    }

    // Points, then their numbers: pushed apart vertically where points crowd.
    let mut labels: Vec<(f64, f64, f64, usize)> = vec![]; // (point x, point y, label y, number)
    for &(n, r, ai, g) in &pts {
        let (x, y) = axes.px(ai, g);
        let _ = writeln!(
            s,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="5" fill="{}" stroke="black" stroke-width="0.7"/>"#,
            colour(&r.backend)
        );
        labels.push((x, y, y, n));
    }
    // Crowded points share one label column, right of the rightmost of them.
    let column: Vec<f64> = labels
        .iter()
        .map(|l| labels.iter().filter(|m| (m.0 - l.0).abs() < 60.0).map(|m| m.0).fold(l.0, f64::max))
        .collect();
    let mut labels: Vec<(f64, f64, f64, usize, f64)> =
        labels.into_iter().zip(column).map(|((x, y, ly, n), c)| (x, y, ly, n, c)).collect();
    labels.sort_by(|a, b| a.1.total_cmp(&b.1));
    for i in 1..labels.len() {
        let prev: Vec<f64> = labels[..i].iter().filter(|l| (l.0 - labels[i].0).abs() < 60.0).map(|l| l.2).collect();
        if let Some(&last) = prev.iter().max_by(|a, b| a.total_cmp(b)) {
            labels[i].2 = labels[i].2.max(last + 13.0);
        }
    }
    for (x, y, ly, n, column) in labels {
        if (ly - y).abs() > 1.0 || column - x > 1.0 {
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{:.1}" stroke="#999" stroke-width="0.7"/>"##,
                x + 5.0,
                column + 14.0,
                ly - 4.0
            );
        }
        let _ = writeln!(s, r#"<text x="{:.1}" y="{ly:.1}" font-weight="bold">{n}</text>"#, column + 16.0);
    }

    // Legend.
    let mut y = TOP + 4.0;
    let _ = writeln!(s, r#"<text x="{LEGEND_X}" y="{y}" font-weight="bold">kernels (GFLOP/s, GB/s, % of roof)</text>"#);
    y += LINE + 2.0;
    for (i, r) in rows.iter().enumerate() {
        let figures = match (r.gflop_per_s, r.roofline_fraction) {
            (Some(g), Some(f)) => format!("{g:.2} GFLOP/s, {:.1} GB/s, {:.0}%", r.gb_per_s, 100.0 * f),
            (Some(g), None) => format!("{g:.2} GFLOP/s, {:.1} GB/s", r.gb_per_s),
            (None, _) => format!("{:.1} GB/s (no flops: not plotted)", r.gb_per_s),
        };
        let _ = writeln!(
            s,
            r##"<circle cx="{}" cy="{:.1}" r="4" fill="{}"/><text x="{}" y="{y:.1}" font-size="11"><tspan font-weight="bold">{}</tspan>  {}  <tspan fill="#555">{}</tspan></text>"##,
            LEGEND_X + 4.0,
            y - 4.0,
            colour(&r.backend),
            LEGEND_X + 12.0,
            i + 1,
            escape(&r.id),
            escape(&figures)
        );
        y += LINE;
    }
    y += LINE / 2.0;
    for (backend, what) in
        [("reference", "reference (scalar oracle)"), ("cpu", "cpu (SIMD + threads)"), ("cuda", "cuda")]
    {
        if rows.iter().any(|r| r.backend == backend) {
            let _ = writeln!(
                s,
                r#"<circle cx="{}" cy="{:.1}" r="5" fill="{}" stroke="black" stroke-width="0.7"/><text x="{}" y="{y:.1}">{what}</text>"#,
                LEGEND_X + 4.0,
                y - 4.0,
                colour(backend),
                LEGEND_X + 14.0
            );
            y += LINE;
        }
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn decades_read_naturally() {
        assert_eq!(super::decade(-1), "0.1");
        assert_eq!(super::decade(0), "1");
        assert_eq!(super::decade(2), "100");
        assert_eq!(super::decade(4), "10k");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(super::escape("a<b & c>"), "a&lt;b &amp; c&gt;");
    }
}
