//! Reference codebook argmin: for every row, every entry, the exact distance in f64 — a naive
//! double loop, straight from the contract in [`crate::argmin`]. Slow and obvious on purpose.
//!
//! Public entry points: [`argmin`](super::argmin()) and [`distance`].

use crate::argmin::{Metric, Prepared};
use crate::dtype::Float;

/// The oracle's distance (f64) of row `x` to entry `e`: `‖x − e‖²` (L2) or
/// `1 − clamp(cos, −1, 1)` (cosine, with cosine 0 when either norm is 0, so distance 1). Every
/// product and sum is in f64, so for f32 inputs of moderate size it is exact up to f64 rounding.
/// This is the number [`argmin`](crate::reference::argmin()) minimises (the lowest index wins a
/// tie). Pairs past the shorter of `x` and `e` are ignored.
///
/// ```
/// use vistok::argmin::Metric;
/// use vistok::reference::argmin::distance;
/// assert_eq!(distance(Metric::L2, &[1.0, 2.0], &[1.0, 0.0]), 4.0);
/// assert_eq!(distance(Metric::Cosine, &[0.0, 2.0], &[3.0, 0.0]), 1.0); // orthogonal
/// assert_eq!(distance(Metric::Cosine, &[0.0, 0.0], &[3.0, 0.0]), 1.0); // zero x: cosine 0
/// ```
pub fn distance(metric: Metric, x: &[f64], e: &[f32]) -> f64 {
    match metric {
        Metric::L2 => x.iter().zip(e).map(|(&a, &b)| (a - b as f64) * (a - b as f64)).sum(),
        Metric::Cosine => {
            let (mut xe, mut xx, mut ee) = (0.0f64, 0.0f64, 0.0f64);
            for (&a, &b) in x.iter().zip(e) {
                let b = b as f64;
                xe += a * b;
                xx += a * a;
                ee += b * b;
            }
            if xx == 0.0 || ee == 0.0 {
                1.0
            } else {
                1.0 - (xe / (xx.sqrt() * ee.sqrt())).clamp(-1.0, 1.0)
            }
        }
    }
}

/// Nearest entry of row `x` (f64): the lowest index of the least distance, and that distance.
fn nearest(p: &Prepared, x: &[f64]) -> (u32, f64) {
    let mut best = (0u32, f64::INFINITY);
    for (k, e) in p.rows.chunks_exact(p.d).enumerate() {
        let dist = distance(p.metric, x, e);
        if dist < best.1 {
            best = (k as u32, dist);
        }
    }
    best
}

/// x `[N, D]` → indices `[N]` and distances `[N]`.
pub(crate) fn argmin<T: Float>(p: &Prepared, x: &[T], indices: &mut [u32], mut dist: Option<&mut [f32]>) {
    for (n, row) in x.chunks_exact(p.d).enumerate() {
        let row: Vec<f64> = row.iter().map(|v| v.to_f32() as f64).collect();
        let (k, dd) = nearest(p, &row);
        indices[n] = k;
        if let Some(dist) = dist.as_deref_mut() {
            dist[n] = dd as f32;
        }
    }
}

/// `out[i, :] = entries[indices[i], :]`.
pub(crate) fn lookup<O: Float>(p: &Prepared, indices: &[u32], out: &mut [O]) {
    for (&i, o) in indices.iter().zip(out.chunks_exact_mut(p.d)) {
        for (o, &v) in o.iter_mut().zip(&p.rows[i as usize * p.d..][..p.d]) {
            *o = O::from_f32(v);
        }
    }
}

/// Residual quantization: the f64 search per stage, the residual and the sum in f32.
pub(crate) fn residual<T: Float, O: Float>(
    stages: &[&Prepared],
    x: &[T],
    indices: &mut [u32],
    recon: Option<&mut [O]>,
) {
    let (s_count, d) = (stages.len(), stages[0].d);
    let n = x.len() / d;
    let mut q = vec![0.0f32; n * d];
    for row in 0..n {
        let mut r: Vec<f32> = x[row * d..][..d].iter().map(|v| v.to_f32()).collect();
        for (s, p) in stages.iter().enumerate() {
            let r64: Vec<f64> = r.iter().map(|&v| v as f64).collect();
            let (k, _) = nearest(p, &r64);
            indices[row * s_count + s] = k;
            let e = &p.rows[k as usize * d..][..d];
            for j in 0..d {
                r[j] -= e[j];
                q[row * d + j] = if s == 0 { e[j] } else { q[row * d + j] + e[j] };
            }
        }
    }
    if let Some(recon) = recon {
        for (o, &v) in recon.iter_mut().zip(&q) {
            *o = O::from_f32(v);
        }
    }
}

/// The residual reconstruction from indices `[N, S]`.
pub(crate) fn residual_decode<O: Float>(stages: &[&Prepared], indices: &[u32], out: &mut [O]) {
    let (s_count, d) = (stages.len(), stages[0].d);
    for (ids, o) in indices.chunks_exact(s_count).zip(out.chunks_exact_mut(d)) {
        for (j, o) in o.iter_mut().enumerate() {
            let mut q = 0.0f32;
            for (s, p) in stages.iter().enumerate() {
                let e = p.rows[ids[s] as usize * d + j];
                q = if s == 0 { e } else { q + e };
            }
            *o = O::from_f32(q);
        }
    }
}
