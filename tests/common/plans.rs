//! Token-merge plans against an f64 oracle of the scores: which score gaps are near-ties, what
//! any correct plan satisfies, and plan equality up to near-ties (tests/merge.rs, the cpu
//! backends; tests/cuda_merge.rs, the tensor-core similarity).

use vistok::merge::{MatchConfig, MergePlan};
use vistok::Float;

/// The f32 score tolerance of the contract (`(Cm + 6)·2⁻²⁴`), doubled.
pub fn tol(c: usize) -> f64 {
    (c as f64 + 8.0) * 2f64.powi(-23)
}

/// An f64 oracle of the A×B cosine scores, `[B, na, nb]`, −∞ where masked.
pub fn oracle_scores<M: Float>(m: &[M], [b, n, c]: [usize; 3], cfg: &MatchConfig) -> Vec<f64> {
    let units: Vec<Vec<f64>> = (0..b * n)
        .map(|t| {
            let row: Vec<f64> = m[t * c..][..c].iter().map(|v| v.to_f32() as f64).collect();
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            row.iter().map(|v| if norm == 0.0 { 0.0 } else { v / norm }).collect()
        })
        .collect();
    let (na, nb) = (n.div_ceil(2), n / 2);
    let mut s = vec![f64::NEG_INFINITY; b * na * nb];
    for bi in 0..b {
        for i in 0..na {
            for j in 0..nb {
                if (cfg.class_token && i == 0) || (cfg.distill_token && j == 0) {
                    continue;
                }
                let (u, w) = (&units[bi * n + 2 * i], &units[bi * n + 2 * j + 1]);
                s[(bi * na + i) * nb + j] = u.iter().zip(w).map(|(x, y)| x * y).sum();
            }
        }
    }
    s
}

/// (best, second best) score of every A row of batch `bi`.
pub fn best_two(s: &[f64], bi: usize, na: usize, nb: usize) -> Vec<(f64, f64)> {
    (0..na)
        .map(|i| {
            let row = &s[(bi * na + i) * nb..][..nb];
            let mut v: Vec<f64> = row.to_vec();
            v.sort_by(|a, b| b.partial_cmp(a).unwrap());
            (v[0], v.get(1).copied().unwrap_or(f64::NEG_INFINITY))
        })
        .collect()
}

pub fn close(a: f64, b: f64, tol: f64) -> bool {
    a.is_finite() && b.is_finite() && (a - b).abs() <= tol
}

/// Relevant near-ties of batch `bi`: neighbours in the ranking, and best vs second-best B of
/// every merged A token of `want`.
pub fn near_ties(want: &MergePlan, s: &[f64], bi: usize, tol: f64) -> usize {
    let n = want.tokens();
    let (na, nb) = (n.div_ceil(2), n / 2);
    let two = best_two(s, bi, na, nb);
    let mut ranked: Vec<f64> = two.iter().map(|t| t.0).collect();
    ranked.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let rank = ranked.windows(2).filter(|w| close(w[0], w[1], tol)).count();
    let arg = want.merged(bi).iter().filter(|&&m| close(two[m as usize / 2].0, two[m as usize / 2].1, tol)).count();
    rank + arg
}

/// What any correct plan satisfies, up to `tol` in the f64 scores: a partition of A, `r`
/// merges into valid B targets that are best within `tol`, ranks consistent within `tol`.
pub fn check_valid(p: &MergePlan, s: &[f64], bi: usize, tol: f64, ctx: &str) {
    let (n, r, cfg) = (p.tokens(), p.r(), *p.config());
    let (na, nb) = (n.div_ceil(2), n / 2);
    if r == 0 {
        assert!(p.kept(bi).is_empty() && p.merged(bi).is_empty(), "{ctx}");
        return;
    }
    let two = best_two(s, bi, na, nb);
    let mut all: Vec<u32> = p.kept(bi).iter().chain(p.merged(bi)).copied().collect();
    all.sort();
    assert_eq!(all, (0..n as u32).step_by(2).collect::<Vec<_>>(), "{ctx}: kept ∪ merged");
    let best = |t: u32| two[t as usize / 2].0;
    for (&m, &d) in p.merged(bi).iter().zip(p.destinations(bi)) {
        assert!(d % 2 == 1 && (d as usize) < n, "{ctx}: destination {d}");
        assert!(!(cfg.distill_token && d == 1), "{ctx}: merged into the distillation token");
        assert!(!(cfg.class_token && m == 0), "{ctx}: merged the class token");
        let sc = s[(bi * na + m as usize / 2) * nb + d as usize / 2];
        assert!(sc >= best(m) - tol, "{ctx}: {m} → {d} scores {sc}, best {}", best(m));
    }
    let merged = p.merged(bi);
    assert!(merged.windows(2).all(|w| best(w[0]) >= best(w[1]) - tol), "{ctx}: merged order");
    let lowest_merged = merged.iter().map(|&m| best(m)).fold(f64::INFINITY, f64::min);
    for &k in p.kept(bi) {
        assert!(best(k) <= lowest_merged + tol, "{ctx}: kept {k} scores above a merged token");
    }
    let kept = p.kept(bi);
    if cfg.class_token || cfg.keep_original_order {
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "{ctx}: kept not ascending");
    } else {
        assert!(kept.windows(2).all(|w| best(w[0]) >= best(w[1]) - tol), "{ctx}: kept order");
    }
}

/// Compares a plan with the reference's, batch by batch: identical where no near-tie, else
/// valid. Returns the batches with near-ties.
pub fn compare_plans(got: &MergePlan, want: &MergePlan, s: &[f64], tol: f64, ctx: &str) -> usize {
    assert_eq!((got.batch(), got.tokens(), got.r()), (want.batch(), want.tokens(), want.r()), "{ctx}");
    let mut tied = 0;
    for bi in 0..want.batch() {
        let ctx = format!("{ctx} batch {bi}");
        if near_ties(want, s, bi, tol) == 0 {
            assert_eq!(got.kept(bi), want.kept(bi), "{ctx}: kept");
            assert_eq!(got.merged(bi), want.merged(bi), "{ctx}: merged");
            assert_eq!(got.destinations(bi), want.destinations(bi), "{ctx}: destinations");
        } else {
            tied += 1;
        }
        check_valid(got, s, bi, tol, &ctx);
        check_valid(want, s, bi, tol, &format!("{ctx} (reference)"));
    }
    if tied == 0 {
        assert_eq!(got, want, "{ctx}: whole plan");
    }
    tied
}
