//! Reference token merging and pruning: ToMe's, EViT's and DivPrune's algorithms step by step,
//! scores and values in f64. Slow and obvious on purpose; it uses only the plan's kept / merged
//! / destination lists (never the slot map or the grouping the fast paths use).
//!
//! Public entry point: [`merge_plan`](super::merge_plan) (and [`Backend::Reference`](crate::Backend::Reference)
//! in [`crate::merge`]).

use crate::dtype::Float;
use crate::error::Result;
use crate::merge::{non_finite, MatchConfig, MergeMode, MergePlan, Parts, Selection};

/// The first non-finite element of a `[B, n, c]` metric, as an error.
fn check_finite<M: Float>(metric: &[M], n: usize, c: usize) -> Result<()> {
    match metric.iter().position(|x| !x.to_f32().is_finite()) {
        Some(i) => Err(non_finite("metric", i, n, c)),
        None => Ok(()),
    }
}

/// Row `t` of `rows` `[_, c]` divided by its L2 norm, in f64 (an all-zero row stays zero).
fn unit<M: Float>(rows: &[M], c: usize, t: usize) -> Vec<f64> {
    let row: Vec<f64> = rows[t * c..][..c].iter().map(|x| x.to_f32() as f64).collect();
    let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
    row.iter().map(|v| if norm == 0.0 { 0.0 } else { v / norm }).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// ToMe's bipartite soft matching, per batch; `r` is already clamped.
pub(crate) fn bipartite<M: Float>(
    metric: &[M],
    batch: usize,
    n: usize,
    c: usize,
    cfg: &MatchConfig,
    r: usize,
) -> Result<Parts> {
    check_finite(metric, n, c)?;
    let mut parts = Parts { kept: vec![], merged: vec![], dest: vec![] };
    if r == 0 {
        return Ok(parts);
    }
    let (na, nb) = (n.div_ceil(2), n / 2);
    for b in 0..batch {
        let x = &metric[b * n * c..][..n * c];
        let u: Vec<Vec<f64>> = (0..n).map(|t| unit(x, c, t)).collect();
        // Step 2: each A token's best B token (strict `>`: ties keep the lowest B index).
        let mut best = vec![(f64::NEG_INFINITY, 0usize); na];
        for (i, best) in best.iter_mut().enumerate() {
            if cfg.class_token && i == 0 {
                continue;
            }
            for j in 0..nb {
                if cfg.distill_token && j == 0 {
                    continue;
                }
                let s = dot(&u[2 * i], &u[2 * j + 1]);
                if s > best.0 {
                    *best = (s, j);
                }
            }
        }
        // Step 3: rank by score, descending; the sort is stable, so ties keep the lower A index.
        let mut order: Vec<usize> = (0..na).collect();
        order.sort_by(|&p, &q| best[q].0.partial_cmp(&best[p].0).expect("scores are not NaN"));
        let mut unm = order[r..].to_vec();
        if cfg.class_token || cfg.keep_original_order {
            unm.sort();
        }
        parts.kept.extend(unm.iter().map(|&i| (2 * i) as u32));
        parts.merged.extend(order[..r].iter().map(|&i| (2 * i) as u32));
        parts.dest.extend(order[..r].iter().map(|&i| (2 * best[i].1 + 1) as u32));
    }
    Ok(parts)
}

/// The tokens that head the output slots of batch `b`, in output order: ToMe's
/// `cat([unm, dst])`, its distillation order, or ascending with `keep_original_order`.
fn heads(plan: &MergePlan, b: usize) -> Vec<u32> {
    let n = plan.tokens();
    if plan.r() == 0 {
        return (0..n as u32).collect();
    }
    let unm = plan.kept(b);
    let dst: Vec<u32> = (1..n as u32).step_by(2).collect();
    let cfg = plan.config();
    if cfg.keep_original_order {
        let mut all: Vec<u32> = unm.iter().chain(&dst).copied().collect();
        all.sort();
        all
    } else if cfg.distill_token {
        [&unm[..1], &dst[..1], &unm[1..], &dst[1..]].concat()
    } else {
        [unm, &dst[..]].concat()
    }
}

/// Sum / mean (`sizes = None`) or size-weighted average (`sizes = Some`, with `out_sizes`):
/// ToMe's gather + `scatter_reduce` + `cat`, in f64, rounded once.
pub(crate) fn merge<T: Float>(
    plan: &MergePlan,
    x: &[T],
    c: usize,
    mode: MergeMode,
    sizes: Option<&[f32]>,
    out: &mut [T],
    mut out_sizes: Option<&mut [f32]>,
) {
    let (n, o) = (plan.tokens(), plan.out_tokens());
    for b in 0..plan.batch() {
        let weight = |t: u32| sizes.map_or(1.0, |s| s[b * n + t as usize] as f64);
        let row = |t: u32| x[(b * n + t as usize) * c..][..c].iter().map(|v| v.to_f32() as f64);
        for (s, &head) in heads(plan, b).iter().enumerate() {
            // The head and every merged token whose destination it is.
            let mut sources = vec![head];
            for (&m, &d) in plan.merged(b).iter().zip(plan.destinations(b)) {
                if d == head {
                    sources.push(m);
                }
            }
            let mut acc = vec![0.0f64; c];
            let mut wsum = 0.0f64;
            for &t in &sources {
                let w = weight(t);
                acc.iter_mut().zip(row(t)).for_each(|(a, v)| *a += v * w);
                wsum += w;
            }
            let divide = sizes.is_some() || mode == MergeMode::Mean;
            let y = &mut out[(b * o + s) * c..][..c];
            if sources.len() == 1 {
                // Nothing merged into it: the token itself (−0.0 included).
                y.copy_from_slice(&x[(b * n + head as usize) * c..][..c]);
            } else {
                for (y, a) in y.iter_mut().zip(&acc) {
                    *y = T::from_f32((if divide { a / wsum } else { *a }) as f32);
                }
            }
            if let Some(os) = out_sizes.as_deref_mut() {
                os[b * o + s] = wsum as f32;
            }
        }
    }
}

/// ToMe's unmerge: each output slot's value goes back to its head and to every token merged
/// into it.
pub(crate) fn unmerge_plan<T: Float>(plan: &MergePlan, y: &[T], c: usize, out: &mut [T]) {
    let (n, o) = (plan.tokens(), plan.out_tokens());
    for b in 0..plan.batch() {
        for (s, &head) in heads(plan, b).iter().enumerate() {
            let src = &y[(b * o + s) * c..][..c];
            out[(b * n + head as usize) * c..][..c].copy_from_slice(src);
            for (&m, &d) in plan.merged(b).iter().zip(plan.destinations(b)) {
                if d == head {
                    out[(b * n + m as usize) * c..][..c].copy_from_slice(src);
                }
            }
        }
    }
}

/// `out[b, t] = y[b, slots[b, t]]`, row by row.
pub(crate) fn gather<T: Float>(slots: &[u32], n: usize, ny: usize, y: &[T], c: usize, out: &mut [T]) {
    for (i, &s) in slots.iter().enumerate() {
        let b = i / n;
        out[i * c..][..c].copy_from_slice(&y[(b * ny + s as usize) * c..][..c]);
    }
}

/// The candidates of a pruning method: every token, or all but the class token.
fn candidates(n: usize, class_token: bool) -> Vec<usize> {
    (class_token as usize..n).collect()
}

/// Per batch: the `k` highest scores (stable sort, descending: ties keep the lower index).
pub(crate) fn top_k(score: &[f32], batch: usize, n: usize, k: usize, class_token: bool) -> Vec<u32> {
    let mut kept = vec![];
    for b in 0..batch {
        let s = &score[b * n..][..n];
        let mut order = candidates(n, class_token);
        order.sort_by(|&p, &q| s[q].partial_cmp(&s[p]).expect("scores are finite"));
        kept.extend(order[..k].iter().map(|&t| t as u32));
    }
    kept
}

/// Per batch: DivPrune's greedy max-min selection, in similarity terms (the farthest nearest
/// neighbour = the lowest highest similarity); ties → lower index.
pub(crate) fn div_prune<M: Float>(
    metric: &[M],
    batch: usize,
    n: usize,
    c: usize,
    k: usize,
    class_token: bool,
) -> Result<Vec<u32>> {
    check_finite(metric, n, c)?;
    let mut kept = vec![];
    for b in 0..batch {
        let x = &metric[b * n * c..][..n * c];
        let cand = candidates(n, class_token);
        let u: Vec<Vec<f64>> = cand.iter().map(|&t| unit(x, c, t)).collect();
        let m = cand.len();
        let sim = |i: usize, j: usize| dot(&u[i], &u[j]);
        // First pick: the token whose most similar other token is least similar.
        let mut nearest = vec![f64::NEG_INFINITY; m];
        for (i, near) in nearest.iter_mut().enumerate() {
            for j in (0..m).filter(|&j| j != i) {
                *near = near.max(sim(i, j));
            }
        }
        let mut selected = vec![false; m];
        let mut closest = nearest; // for the first pick; then: max similarity to the selection
        for step in 0..k {
            let mut pick = usize::MAX;
            for i in (0..m).filter(|&i| !selected[i]) {
                if pick == usize::MAX || closest[i] < closest[pick] {
                    pick = i;
                }
            }
            selected[pick] = true;
            kept.push(cand[pick] as u32);
            if step == 0 {
                closest = vec![f64::NEG_INFINITY; m];
            }
            for (j, cl) in closest.iter_mut().enumerate() {
                *cl = cl.max(sim(pick, j));
            }
        }
    }
    Ok(kept)
}

/// `[cls,] kept…, Σ sᵢxᵢ` over the pruned tokens, in f64, rounded once.
pub(crate) fn gather_fused<T: Float>(sel: &Selection, x: &[T], score: &[f32], c: usize, out: &mut [T]) {
    let (n, o) = (sel.tokens(), sel.out_tokens(true));
    for b in 0..sel.batch() {
        let mut rows: Vec<usize> = vec![];
        if sel.class_token() {
            rows.push(0);
        }
        rows.extend(sel.kept(b).iter().map(|&t| t as usize));
        for (s, &t) in rows.iter().enumerate() {
            out[(b * o + s) * c..][..c].copy_from_slice(&x[(b * n + t) * c..][..c]);
        }
        let mut acc = vec![0.0f64; c];
        for t in candidates(n, sel.class_token()).into_iter().filter(|t| !rows.contains(t)) {
            let w = score[b * n + t] as f64;
            acc.iter_mut().zip(&x[(b * n + t) * c..][..c]).for_each(|(a, v)| *a += w * v.to_f32() as f64);
        }
        for (y, a) in out[(b * o + o - 1) * c..][..c].iter_mut().zip(&acc) {
            *y = T::from_f32(*a as f32);
        }
    }
}
