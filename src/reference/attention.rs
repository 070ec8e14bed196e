//! Reference attention: the naive three steps (scores, softmax, weighted sum of values) in f64,
//! one query row at a time, straight from the contract in [`crate::attention`]. The mask rules
//! are written out here from their definitions, independently of the fast paths.
//!
//! Public entry point: [`attention_forward`](super::attention_forward).

use crate::attention::{check_finite, Mask, Problem, QkvLayout};
use crate::dtype::Float;
use crate::error::Result;

/// Offset of element `(b, head, token, 0)` of a `[B, heads, N, D]` / `[B, N, heads, D]` tensor.
fn row(p: &Problem<'_>, heads: usize, n: usize, b: usize, head: usize, token: usize) -> usize {
    match p.layout {
        QkvLayout::Bhnd => ((b * heads + head) * n + token) * p.d,
        QkvLayout::Bnhd => ((b * n + token) * heads + head) * p.d,
    }
}

/// Whether query `i` sees key `j`.
fn visible(p: &Problem<'_>, i: usize, j: usize) -> bool {
    // i + (Nk − Nq) in exact integer arithmetic.
    let diag = i as i128 + p.nk as i128 - p.nq as i128;
    let j = j as i128;
    match p.mask {
        Mask::None => true,
        Mask::Causal => j <= diag,
        Mask::Window { left, right } => diag - left as i128 <= j && j <= diag + right as i128,
        Mask::Segments { q, k } => k[j as usize] <= q[i],
    }
}

/// `O` and (optionally) the log-sum-exp, for a validated problem. Errors: a non-finite element
/// of Q, K or V (the first).
pub(crate) fn forward<T: Float>(
    p: &Problem<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    mut lse: Option<&mut [f32]>,
) -> Result<()> {
    check_finite(
        p,
        q,
        k,
        v,
        |bad, x| x.iter().position(|e| bad.test(*e)),
        |bad, x| x.iter().position(|e| bad.test(e.to_f32())),
    )?;
    let x = |t: &[T], at: usize| t[at].to_f32() as f64;
    let group = p.h / p.hkv;
    let mut scores = vec![0.0f64; p.nk];
    let mut o = vec![0.0f64; p.d];
    for b in 0..p.b {
        for h in 0..p.h {
            let hk = h / group;
            for i in 0..p.nq {
                let qi = row(p, p.h, p.nq, b, h, i);
                // 1. Scores of the visible keys (None for the others).
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = f64::NEG_INFINITY;
                    if !visible(p, i, j) {
                        continue;
                    }
                    let kj = row(p, p.hkv, p.nk, b, hk, j);
                    let dot: f64 = (0..p.d).map(|c| x(q, qi + c) * x(k, kj + c)).sum();
                    let bias = if p.bias.is_none() {
                        0.0
                    } else {
                        let bs = &p.bias;
                        bs.data[b * bs.b_stride + h * bs.h_stride + i * bs.i_stride + j] as f64
                    };
                    *s = dot * p.scale as f64 + bias;
                    max = max.max(*s);
                }
                // 2. Softmax (a row with no finite score is fully masked).
                o.fill(0.0);
                let mut sum = 0.0;
                if max > f64::NEG_INFINITY {
                    for (j, s) in scores.iter().enumerate() {
                        if *s == f64::NEG_INFINITY {
                            continue;
                        }
                        let e = (s - max).exp();
                        sum += e;
                        // 3. Weighted sum of the values.
                        let vj = row(p, p.hkv, p.nk, b, hk, j);
                        for (c, oc) in o.iter_mut().enumerate() {
                            *oc += e * x(v, vj + c);
                        }
                    }
                }
                let oi = row(p, p.h, p.nq, b, h, i);
                for (c, oc) in o.iter().enumerate() {
                    let y = if sum > 0.0 { oc / sum } else { 0.0 };
                    out[oi + c] = T::from_f32(y as f32);
                }
                if let Some(l) = lse.as_deref_mut() {
                    l[(b * p.h + h) * p.nq + i] = if sum > 0.0 { (max + sum.ln()) as f32 } else { f32::NEG_INFINITY };
                }
            }
        }
    }
    Ok(())
}
