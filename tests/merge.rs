//! Token merging and pruning: every CPU ISA level and the detected one against the reference
//! (plans identical unless a relevant score gap is within the f32 tolerance — such near-ties
//! are detected with an f64 oracle of this file and counted; values within the FlashAttention
//! style tolerance), thread-count invariance, unmerge / source-map consistency, ToMe golden
//! outputs (from ToMe's own torch code), planted exact ties, pruning and bad input.

mod common;

use common::plans::{compare_plans, oracle_scores, tol};
use common::{assert_bits_eq, bits, poison, random_data, Rng};
use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use vistok::merge::{size_bias, MatchConfig, MergeMode, MergePlan, Selection, SourceMap};
use vistok::{bf16, f16, Backend, DType, Error, Family, Float, Isa, View, ViewMut};

fn cpu_backends() -> Vec<Backend> {
    Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa).chain([Backend::Cpu]).collect()
}

fn all_backends() -> Vec<Backend> {
    [Backend::Reference].into_iter().chain(cpu_backends()).collect()
}

fn plan<M: Float>(be: Backend, m: &[M], dims: [usize; 3], cfg: &MatchConfig) -> MergePlan {
    MergePlan::bipartite(be, View::new(m, &dims).unwrap(), cfg).unwrap()
}

/// Metric data: continuous values, or small integers with duplicate and all-zero rows (many
/// exact and near ties).
fn metric<M: Float>(len: usize, c: usize, integer: bool, seed: u64) -> Vec<M> {
    let mut r = Rng(seed);
    let mut v: Vec<f32> =
        (0..len).map(|_| if integer { (r.next_u64() % 5) as f32 - 2.0 } else { r.uniform(-1.0, 1.0) }).collect();
    if integer && c > 0 {
        for t in 0..len / c {
            match r.next_u64() % 8 {
                0 => v[t * c..][..c].fill(0.0),
                1 if t > 0 => v.copy_within((t - 1) * c..t * c, t * c),
                _ => {}
            }
        }
    }
    v.into_iter().map(M::from_f32).collect()
}

fn ulp_f64<T: Float>(v: f64) -> f64 {
    let mant = match T::DTYPE {
        DType::F32 => 24,
        DType::F16 => 11,
        _ => 8,
    };
    let min_exp = match T::DTYPE {
        DType::F16 => -14,
        _ => -126,
    };
    let e = if v == 0.0 { min_exp } else { (v.abs().log2().floor() as i32).max(min_exp) };
    2f64.powi(e - mant + 1)
}

/// Checks merged values against an f64 oracle of the plan's groups: single-source slots are
/// exact copies; others err at most twice a naive same-dtype implementation (sources
/// accumulated in `T`) plus the f32 accumulation bound.
fn check_values<T: Float>(
    p: &MergePlan,
    x: &[T],
    c: usize,
    mode: MergeMode,
    sizes: Option<&[f32]>,
    got: &[T],
    ctx: &str,
) {
    let (n, o) = (p.tokens(), p.out_tokens());
    let round = |v: f64| T::from_f32(v as f32).to_f32() as f64;
    for bi in 0..p.batch() {
        for s in 0..o {
            let src = p.sources(bi, s);
            for k in 0..c {
                let g = got[(bi * o + s) * c + k];
                let xv = |t: u32| x[(bi * n + t as usize) * c + k];
                if src.len() == 1 {
                    assert_eq!(bits(g), bits(xv(src[0])), "{ctx}: single-source slot {bi},{s},{k} is not a copy");
                    continue;
                }
                let w = |t: u32| sizes.map_or(1.0, |sz| sz[bi * n + t as usize] as f64);
                let (mut exact, mut wsum, mut mag) = (0.0f64, 0.0f64, 0.0f64);
                let (mut naive, mut nw) = (0.0f64, 0.0f64);
                for &t in src {
                    let v = xv(t).to_f32() as f64;
                    exact += v * w(t);
                    wsum += w(t);
                    mag += (v * w(t)).abs();
                    naive = round(naive + round(v * w(t)));
                    nw += w(t);
                }
                let divide = sizes.is_some() || mode == MergeMode::Mean;
                if divide {
                    exact /= wsum;
                    mag /= wsum;
                    naive = round(naive / nw);
                }
                let slack = (src.len() as f64 + 2.0) * 2f64.powi(-23) * mag + ulp_f64::<T>(0.0);
                let err = (g.to_f32() as f64 - exact).abs();
                let naive_err = (naive - exact).abs();
                assert!(
                    err <= 2.0 * naive_err + slack,
                    "{ctx}: slot {bi},{s},{k}: got {g:?}, exact {exact}, error {err} > 2·{naive_err} + {slack}"
                );
            }
        }
    }
}

/// Merges `x` with `plan` on `be` (poisoned output first).
fn merged<T: Float>(plan: &MergePlan, be: Backend, x: &[T], c: usize, mode: MergeMode) -> Vec<T> {
    let (b, n, o) = (plan.batch(), plan.tokens(), plan.out_tokens());
    let mut y = vec![poison::<T>(); b * o * c];
    plan.merge(be, View::new(x, &[b, n, c]).unwrap(), mode, ViewMut::new(&mut y, &[b, o, c]).unwrap()).unwrap();
    y
}

fn weighted<T: Float>(plan: &MergePlan, be: Backend, x: &[T], c: usize, sizes: Option<&[f32]>) -> (Vec<T>, Vec<f32>) {
    let (b, n, o) = (plan.batch(), plan.tokens(), plan.out_tokens());
    let mut y = vec![poison::<T>(); b * o * c];
    let mut s = vec![f32::NAN; b * o];
    let sv = sizes.map(|s| View::new(s, &[b, n]).unwrap());
    plan.merge_weighted(
        be,
        View::new(x, &[b, n, c]).unwrap(),
        sv,
        ViewMut::new(&mut y, &[b, o, c]).unwrap(),
        ViewMut::new(&mut s, &[b, o]).unwrap(),
    )
    .unwrap();
    (y, s)
}

fn unmerged<T: Float>(plan: &MergePlan, be: Backend, y: &[T], c: usize) -> Vec<T> {
    let (b, n, o) = (plan.batch(), plan.tokens(), plan.out_tokens());
    let mut x = vec![poison::<T>(); b * n * c];
    plan.unmerge(be, View::new(y, &[b, o, c]).unwrap(), ViewMut::new(&mut x, &[b, n, c]).unwrap()).unwrap();
    x
}

/// Near-tie batches seen and batches compared, over all tests of this binary.
static TIED: AtomicUsize = AtomicUsize::new(0);
static COMPARED: AtomicUsize = AtomicUsize::new(0);

/// Plans of every backend against the reference for metric dtype `M`; values of every backend
/// (merge, weighted merge, unmerge) on the detected CPU plan for value dtype `T`.
#[allow(clippy::too_many_arguments)]
fn check_case<M: Float, T: Float>(b: usize, n: usize, c: usize, cx: usize, cfg: MatchConfig, integer: bool, seed: u64) {
    let ctx = format!("{:?}/{:?} b={b} n={n} c={c} cx={cx} {cfg:?} integer={integer} seed={seed}", M::DTYPE, T::DTYPE);
    let dims = [b, n, c];
    let m = metric::<M>(b * n * c, c, integer, seed);
    let want = plan(Backend::Reference, &m, dims, &cfg);
    assert_eq!(want.r(), cfg.effective_r(n), "{ctx}");
    let s = oracle_scores(&m, dims, &cfg);
    let t = tol(c);
    let cpu = plan(Backend::Cpu, &m, dims, &cfg);
    for be in cpu_backends() {
        let got = plan(be, &m, dims, &cfg);
        // The f32 arithmetic is fixed: every ISA level gives the same plan, ties or not.
        assert_eq!(got, cpu, "{ctx} {be:?}: differs from Backend::Cpu");
    }
    let tied = compare_plans(&cpu, &want, &s, t, &ctx);
    TIED.fetch_add(tied, Ordering::Relaxed);
    COMPARED.fetch_add(b, Ordering::Relaxed);

    // Values, on the CPU plan (any backend may apply any plan).
    let x = random_data::<T>(b * n * cx, seed ^ 0x5555);
    let mut r = Rng(seed ^ 0x7777);
    let sizes: Vec<f32> = (0..b * n)
        .map(|_| if r.next_u64().is_multiple_of(2) { (1 + r.next_u64() % 9) as f32 } else { r.uniform(0.1, 5.0) })
        .collect();
    for mode in [MergeMode::Sum, MergeMode::Mean] {
        for be in all_backends() {
            let y = merged(&cpu, be, &x, cx, mode);
            check_values(&cpu, &x, cx, mode, None, &y, &format!("{ctx} {be:?} {mode:?}"));
        }
    }
    let (want_y, want_s) = weighted(&cpu, Backend::Reference, &x, cx, Some(&sizes));
    for be in all_backends() {
        let (y, so) = weighted(&cpu, be, &x, cx, Some(&sizes));
        check_values(&cpu, &x, cx, MergeMode::Sum, Some(&sizes), &y, &format!("{ctx} {be:?} weighted"));
        for (g, w) in so.iter().zip(&want_s) {
            assert!((g - w).abs() <= w * 1e-6, "{ctx} {be:?}: sizes {g} vs {w}");
        }
        // Without sizes: all ones, so the sizes are the slot counts.
        let (_, ones) = weighted(&cpu, be, &x, cx, None);
        let counts: Vec<f32> = (0..b)
            .flat_map(|bi| (0..cpu.out_tokens()).map(move |s| (bi, s)))
            .map(|(bi, s)| cpu.sources(bi, s).len() as f32)
            .collect();
        assert_eq!(ones, counts, "{ctx} {be:?}: unit sizes");
    }
    let _ = want_y;
    // unmerge(merge(x)) follows the assignment map, and the reference's ToMe-style unmerge
    // equals the slot gather of the fast path.
    let y = merged(&cpu, Backend::Cpu, &x, cx, MergeMode::Mean);
    let want_z = unmerged(&cpu, Backend::Reference, &y, cx);
    for be in all_backends() {
        let z = unmerged(&cpu, be, &y, cx);
        assert_bits_eq(&z, &want_z, &format!("{ctx} {be:?}: unmerge"));
    }
    let o = cpu.out_tokens();
    for (i, &slot) in cpu.slots().iter().enumerate() {
        let bi = i / n;
        assert!((slot as usize) < o, "{ctx}: slot {slot}");
        assert_bits_eq(
            &want_z[i * cx..][..cx],
            &y[(bi * o + slot as usize) * cx..][..cx],
            &format!("{ctx}: token {i}"),
        );
    }
}

fn cfg_strategy() -> impl Strategy<Value = (bool, bool, bool)> {
    (any::<bool>(), any::<bool>(), any::<bool>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn cpu_matches_reference(
        b in 1usize..4,
        n in prop_oneof![2usize..5, 2usize..40, 60usize..80],
        c in prop_oneof![1usize..4, 1usize..40, 60usize..70],
        cx in prop_oneof![0usize..3, 1usize..40],
        r_kind in 0usize..4,
        (class_token, distill_token, keep) in cfg_strategy(),
        integer in any::<bool>(),
        dtype in 0usize..3,
        seed in any::<u64>(),
    ) {
        // r: 0, 1, the maximum (and beyond), or anything.
        let r = [0, 1, n, (seed % (n as u64 + 2)) as usize][r_kind];
        let cfg = MatchConfig::new(r).class_token(class_token).distill_token(distill_token).keep_original_order(keep);
        match dtype {
            0 => check_case::<f32, f32>(b, n, c, cx, cfg, integer, seed),
            1 => check_case::<f16, bf16>(b, n, c, cx, cfg, integer, seed),
            _ => check_case::<bf16, f16>(b, n, c, cx, cfg, integer, seed),
        }
    }
}

/// Larger shapes than the proptest (several scoring tasks per batch, every tile edge), and the
/// near-tie count over integer data, where ties are common.
#[test]
fn larger_shapes_and_near_tie_count() {
    for (i, &(b, n, c)) in [(2, 197, 64), (1, 300, 33), (3, 130, 16), (1, 1025, 8)].iter().enumerate() {
        let cfg = MatchConfig::new(n / 4).class_token(i % 2 == 0);
        check_case::<f32, f32>(b, n, c, 17, cfg, false, i as u64);
        check_case::<bf16, bf16>(b, n, c, 5, cfg.keep_original_order(true), false, i as u64 + 9);
    }
    let (tied0, all0) = (TIED.load(Ordering::Relaxed), COMPARED.load(Ordering::Relaxed));
    for seed in 0..40u64 {
        let n = 8 + (seed as usize % 23);
        let cfg = MatchConfig::new(n / 3).class_token(seed % 3 == 0).distill_token(seed % 5 == 0);
        check_case::<f32, f32>(2, n, 3 + seed as usize % 5, 3, cfg, true, seed);
    }
    let (tied, all) = (TIED.load(Ordering::Relaxed) - tied0, COMPARED.load(Ordering::Relaxed) - all0);
    println!("merge near-ties (integer data): {tied} of {all} batches had a relevant score gap ≤ tol");
    assert!(tied > 0 && tied < all, "the near-tie detection should see both cases here: {tied} of {all}");
}

/// The plan is the same for 1, 2 and 3 threads, and so are the merged values.
#[test]
fn thread_count_invariance() {
    let (b, n, c) = (3, 301, 40);
    let m = metric::<f32>(b * n * c, c, false, 11);
    let x = random_data::<f32>(b * n * 24, 12);
    let cfg = MatchConfig::new(100).class_token(true);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let p = plan(Backend::Cpu, &m, [b, n, c], &cfg);
            let y = merged(&p, Backend::Cpu, &x, 24, MergeMode::Mean);
            let sel = Selection::div_prune(Backend::Cpu, View::new(&m, &[b, n, c]).unwrap(), 50, true).unwrap();
            (p, y, sel)
        })
    };
    let (p1, y1, s1) = run(1);
    for threads in [2, 3] {
        let (p, y, s) = run(threads);
        assert_eq!(p, p1, "{threads} threads: plan");
        assert_bits_eq(&y, &y1, &format!("{threads} threads: merge"));
        assert_eq!(s, s1, "{threads} threads: DivPrune");
    }
}

/// Metric data as the generator of ToMe's golden outputs computed it (exact in f32).
fn golden_data(len: usize) -> Vec<f32> {
    (0..len as u64).map(|i| ((i * 2_654_435_761 % 2003) as f64 / 1001.0 - 1.0) as f32).collect()
}

/// Outputs of ToMe's own `bipartite_soft_matching` (torch, f32) on `golden_data`: for each
/// output slot, the tokens merged into it (ToMe's `merge_source`), and the first 12 values of
/// `merge(metric, mode="mean")`. The relevant score gaps are all above 1e-5.
type Golden = (usize, usize, usize, usize, bool, bool, &'static [&'static [&'static [u32]]], &'static [f32]);
const GOLDEN: &[Golden] = &[
    (
        2,
        9,
        5,
        3,
        false,
        false,
        &[&[&[2], &[8], &[0, 1, 6], &[3, 4], &[5], &[7]], &[&[4], &[2], &[0, 1, 6], &[3, 8], &[5], &[7]]],
        &[
            -0.290709, -0.21978, -0.148851, -0.077922, -0.006993, -0.163836, -0.092907, -0.021978, 0.048951, 0.11988,
            -0.839494, -0.768565,
        ],
    ),
    (
        2,
        10,
        4,
        3,
        true,
        false,
        &[&[&[0], &[4], &[1, 8], &[3], &[5, 6], &[7], &[2, 9]], &[&[0], &[4], &[1, 8], &[3], &[5, 6], &[7], &[2, 9]]],
        &[
            -1.0, -0.929071, -0.858142, -0.787213, 0.134865, 0.205794, 0.276723, 0.347652, -0.723776, -0.652847,
            -0.581918, -0.510989,
        ],
    ),
    (
        1,
        12,
        6,
        4,
        true,
        true,
        &[&[&[0], &[1], &[4], &[3, 8], &[5, 6, 10], &[2, 7], &[9], &[11]]],
        &[
            -1.0, -0.929071, -0.858142, -0.787213, -0.716284, -0.645355, -0.574426, -0.503497, -0.432567, -0.361638,
            -0.290709, -0.21978,
        ],
    ),
    (
        1,
        11,
        3,
        100,
        false,
        false,
        &[&[&[4], &[0, 1, 2, 10], &[3], &[5], &[6, 7, 8], &[9]]],
        &[
            -0.148851, -0.077922, -0.006993, -0.808691, -0.737762, -0.666833, -0.361638, -0.290709, -0.21978, 0.063936,
            0.134865, 0.205794,
        ],
    ),
    (
        3,
        16,
        8,
        5,
        false,
        true,
        &[
            &[&[8], &[1], &[0], &[12], &[3, 10], &[5], &[7, 14], &[2, 9], &[4, 11], &[6, 13], &[15]],
            &[&[6], &[1], &[14], &[10], &[3], &[5, 12], &[0, 7], &[2, 9], &[4, 11], &[13], &[8, 15]],
            &[&[10], &[1], &[12], &[8], &[3], &[5], &[0, 7, 14], &[2, 9], &[4, 11], &[6, 13], &[15]],
        ],
        &[
            -0.462537, -0.391608, -0.320679, -0.24975, -0.178821, -0.107892, -0.036963, 0.033966, -0.432567, -0.361638,
            -0.290709, -0.21978,
        ],
    ),
];

#[test]
fn matches_tome_golden_outputs() {
    for &(b, n, c, r, class_token, distill_token, groups, values) in GOLDEN {
        let cfg = MatchConfig::new(r).class_token(class_token).distill_token(distill_token);
        let m = golden_data(b * n * c);
        for be in all_backends() {
            let ctx = format!("golden {b}x{n}x{c} r={r} {cfg:?} {be:?}");
            let p = plan(be, &m, [b, n, c], &cfg);
            for (bi, g) in groups.iter().enumerate() {
                assert_eq!(p.out_tokens(), g.len(), "{ctx}");
                for (s, want) in g.iter().enumerate() {
                    assert_eq!(p.sources(bi, s), *want, "{ctx}: batch {bi} slot {s}");
                }
            }
            let y = merged(&p, be, &m, c, MergeMode::Mean);
            for (i, (g, w)) in y.iter().zip(values).enumerate() {
                assert!((g - w).abs() <= 1e-6, "{ctx}: value {i}: {g} vs ToMe {w}");
            }
        }
    }
}

/// Exact ties planted with duplicate rows: every backend breaks them the documented way.
#[test]
fn planted_ties_break_to_lower_indices() {
    // A tokens 0, 2, 4, 6; B tokens 1, 3, 5, 7. B 3 and 5 are identical; A 2 and 4 are
    // identical and closest to them; A 6 is identical to B 7 (score 1, ranked first).
    let rows: [[f32; 3]; 8] = [
        [0.0, 0.0, 1.0],  // 0
        [-1.0, 0.0, 0.0], // 1
        [1.0, 0.5, 0.0],  // 2
        [1.0, 0.4, 0.1],  // 3
        [1.0, 0.5, 0.0],  // 4 (= 2)
        [1.0, 0.4, 0.1],  // 5 (= 3)
        [0.3, -2.0, 0.7], // 6
        [0.3, -2.0, 0.7], // 7 (= 6)
    ];
    let m: Vec<f32> = rows.iter().flatten().copied().collect();
    for be in all_backends() {
        let p = plan(be, &m, [1, 8, 3], &MatchConfig::new(3));
        assert_eq!(p.merged(0), &[6, 2, 4], "{be:?}: ranked by score, tie 2 = 4 → lower first");
        assert_eq!(p.destinations(0), &[7, 3, 3], "{be:?}: B tie 3 = 5 → lower B");
        assert_eq!(p.kept(0), &[0], "{be:?}");
        // Class token: token 0 is kept even though r asks for everything.
        let p = plan(be, &m, [1, 8, 3], &MatchConfig::new(9).class_token(true));
        assert_eq!((p.r(), p.kept(0), p.merged(0)), (3, &[0u32][..], &[6u32, 2, 4][..]), "{be:?}");
        // Distillation token: B token 1 is never a target.
        let p = plan(be, &m, [1, 8, 3], &MatchConfig::new(3).distill_token(true));
        assert!(!p.destinations(0).contains(&1), "{be:?}");
    }
}

#[test]
fn output_orders() {
    // 7 tokens, 1 channel: A = 0, 2, 4, 6; B = 1, 3, 5.
    let m = [1.0f32, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0];
    for be in all_backends() {
        // Scores: A 0, 2, 6 → 1 (best B = 3), A 4 → 1 with B 1. Ranked 0, 2, 4, 6; r = 2.
        let p = plan(be, &m, [1, 7, 1], &MatchConfig::new(2));
        assert_eq!((p.merged(0), p.destinations(0), p.kept(0)), (&[0u32, 2][..], &[3u32, 3][..], &[4u32, 6][..]));
        assert_eq!(p.slots(), &[3, 2, 3, 3, 0, 4, 1], "{be:?}: [kept 4, 6, B 1, 3, 5]");
        let p = plan(be, &m, [1, 7, 1], &MatchConfig::new(2).keep_original_order(true));
        assert_eq!(p.slots(), &[1, 0, 1, 1, 2, 3, 4], "{be:?}: original order");
        let p = plan(be, &m, [1, 7, 1], &MatchConfig::new(2).class_token(true).distill_token(true));
        // Distillation order [unm0, dst0, unm1:, dst1:]; B 1 is no target, so A 2 and 6 merge
        // into 3 (A 4 has only −1 scores left).
        assert_eq!((p.merged(0), p.destinations(0)), (&[2u32, 6][..], &[3u32, 3][..]), "{be:?}");
        assert_eq!(p.slots(), &[0, 1, 3, 3, 2, 4, 3], "{be:?}: [0, 1, 4, 3, 5]");
    }
}

#[test]
fn r_zero_is_the_identity_and_r_is_clamped() {
    let (b, n, c) = (2, 9, 4);
    let m = metric::<f32>(b * n * c, c, false, 3);
    let x = random_data::<f16>(b * n * 6, 4);
    for be in all_backends() {
        for cfg in
            [MatchConfig::new(0), MatchConfig::new(5).distill_token(true).class_token(true).keep_original_order(true)]
        {
            let cfg = if cfg.r == 5 { MatchConfig { r: 0, ..cfg } } else { cfg };
            let p = plan(be, &m, [b, n, c], &cfg);
            assert_eq!((p.r(), p.out_tokens()), (0, n));
            assert_eq!(p.slots(), (0..b * n).map(|i| (i % n) as u32).collect::<Vec<_>>());
            assert_bits_eq(&merged(&p, be, &x, 6, MergeMode::Mean), &x, "r = 0 merge");
            assert_bits_eq(&unmerged(&p, be, &x, 6), &x, "r = 0 unmerge");
        }
        assert_eq!(plan(be, &m, [b, n, c], &MatchConfig::new(1000)).r(), 4);
        assert_eq!(plan(be, &m, [b, n, c], &MatchConfig::new(1000).class_token(true).distill_token(true)).r(), 3);
        assert_eq!(plan(be, &m[..3 * c], [1, 3, c], &MatchConfig::new(1).distill_token(true)).r(), 0);
        assert_eq!(plan(be, &m[..2 * c], [1, 2, c], &MatchConfig::new(1)).r(), 1);
    }
}

/// Composing plans: the source map equals applying the plans' slot maps in sequence; unmerging
/// through it equals unmerging layer by layer; its sizes equal the weighted merge's.
#[test]
fn composed_source_maps() {
    let (b, n0, c) = (2, 50, 6);
    let mut map = SourceMap::identity(b, n0).unwrap();
    let mut sizes: Option<Vec<f32>> = None;
    let mut plans = vec![];
    let mut n = n0;
    for (layer, r) in [10usize, 7, 30, 0, 2].into_iter().enumerate() {
        let m = metric::<f32>(b * n * c, c, layer % 2 == 1, layer as u64);
        let cfg = MatchConfig::new(r).class_token(layer == 1).keep_original_order(layer == 2);
        let p = plan(Backend::Cpu, &m, [b, n, c], &cfg);
        let before = map.slots().to_vec();
        map.apply(&p).unwrap();
        for (i, (&after, &prev)) in map.slots().iter().zip(&before).enumerate() {
            assert_eq!(after, p.slots()[i / n0 * n + prev as usize], "layer {layer}: token {i}");
        }
        let x = vec![1.0f32; b * n];
        let (_, s) = weighted(&p, Backend::Cpu, &x, 1, sizes.as_deref());
        sizes = Some(s);
        n = p.out_tokens();
        plans.push(p);
    }
    assert_eq!(map.out_tokens(), n);
    assert_eq!(Some(map.sizes()), sizes, "source-map sizes vs merge_wavg sizes");
    let y = random_data::<bf16>(b * n * 5, 8);
    for be in all_backends() {
        let mut via_map = vec![poison::<bf16>(); b * n0 * 5];
        map.unmerge(be, View::new(&y, &[b, n, 5]).unwrap(), ViewMut::new(&mut via_map, &[b, n0, 5]).unwrap()).unwrap();
        let mut z = y.clone();
        for p in plans.iter().rev() {
            z = unmerged(p, be, &z, 5);
        }
        assert_bits_eq(&via_map, &z, &format!("{be:?}: unmerge through the map"));
    }
    let other = plan(Backend::Cpu, &metric::<f32>(b * 7 * c, c, false, 1), [b, 7, c], &MatchConfig::new(1));
    assert!(matches!(map.apply(&other), Err(Error::Shape { family: Family::Merge, .. })));
}

#[test]
fn size_bias_is_log_size() {
    let sizes = [1.0f32, 2.0, 3.5, 100.0];
    let mut bias = [f32::NAN; 4];
    size_bias(View::new(&sizes, &[2, 2]).unwrap(), ViewMut::new(&mut bias, &[2, 2]).unwrap()).unwrap();
    for (b, s) in bias.iter().zip(&sizes) {
        assert_eq!(*b, s.ln());
    }
    let bad = [1.0f32, 0.0];
    let e = size_bias(View::new(&bad, &[1, 2]).unwrap(), ViewMut::new(&mut bias[..2], &[1, 2]).unwrap()).unwrap_err();
    assert!(matches!(&e, Error::Invalid { family: Family::Merge, msg } if msg.contains("sizes[0, 1]")), "{e}");
    let nan = [f32::NAN, 1.0];
    let e = size_bias(View::new(&nan, &[1, 2]).unwrap(), ViewMut::new(&mut bias[..2], &[1, 2]).unwrap()).unwrap_err();
    assert!(matches!(e, Error::NonFinite { family: Family::Merge, .. }), "{e}");
    assert!(size_bias(View::new(&sizes, &[2, 2]).unwrap(), ViewMut::new(&mut bias, &[4, 1]).unwrap()).is_err());
}

#[test]
fn bad_input_is_a_typed_error() {
    let m = metric::<f32>(2 * 6 * 3, 3, false, 1);
    let cfg = MatchConfig::new(2);
    let shape = |e: Error| matches!(e, Error::Shape { family: Family::Merge, .. });
    for be in all_backends() {
        assert!(shape(MergePlan::bipartite(be, View::new(&m, &[36]).unwrap(), &cfg).unwrap_err()));
        assert!(shape(MergePlan::bipartite(be, View::new(&m[..6], &[6, 1, 1]).unwrap(), &cfg).unwrap_err()), "N < 2");
        assert!(shape(MergePlan::bipartite(be, View::new(&m[..0], &[2, 6, 0]).unwrap(), &cfg).unwrap_err()), "C = 0");
        // The first non-finite metric element, in flat order, for r > 0 and r = 0 alike.
        let mut bad = m.clone();
        bad[2 * 3 * 3 + 4] = f32::INFINITY;
        bad[3 * 3 * 3 + 1] = f32::NAN;
        for r in [0, 2] {
            let e = MergePlan::bipartite(be, View::new(&bad, &[2, 6, 3]).unwrap(), &MatchConfig::new(r)).unwrap_err();
            assert!(
                matches!(&e, Error::NonFinite { family: Family::Merge, what } if what == "metric[1, 1, 1]"),
                "{be:?}: {e}"
            );
        }
        let p = plan(be, &m, [2, 6, 3], &cfg);
        let x = vec![1.0f32; 2 * 6 * 4];
        let mut y = vec![0.0f32; 2 * 4 * 4];
        let mut so = vec![0.0f32; 2 * 4];
        let xv = || View::new(&x, &[2, 6, 4]).unwrap();
        assert!(shape(
            p.merge(be, View::new(&x, &[2, 4, 6]).unwrap(), MergeMode::Sum, ViewMut::new(&mut y, &[2, 4, 4]).unwrap())
                .unwrap_err()
        ));
        assert!(shape(p.merge(be, xv(), MergeMode::Sum, ViewMut::new(&mut y, &[2, 2, 8]).unwrap()).unwrap_err()));
        let wrong_sizes = vec![1.0f32; 2 * 5];
        let e = p.merge_weighted(
            be,
            xv(),
            Some(View::new(&wrong_sizes, &[2, 5]).unwrap()),
            ViewMut::new(&mut y, &[2, 4, 4]).unwrap(),
            ViewMut::new(&mut so, &[2, 4]).unwrap(),
        );
        assert!(shape(e.unwrap_err()), "sizes of the wrong shape");
        for (v, nonfinite) in [(0.0f32, false), (-1.0, false), (f32::NAN, true), (f32::INFINITY, true)] {
            let mut sz = vec![1.0f32; 12];
            sz[7] = v;
            let e = p
                .merge_weighted(
                    be,
                    xv(),
                    Some(View::new(&sz, &[2, 6]).unwrap()),
                    ViewMut::new(&mut y, &[2, 4, 4]).unwrap(),
                    ViewMut::new(&mut so, &[2, 4]).unwrap(),
                )
                .unwrap_err();
            if nonfinite {
                assert!(matches!(&e, Error::NonFinite { what, .. } if what == "sizes[1, 1]"), "{e}");
            } else {
                assert!(
                    matches!(&e, Error::Invalid { family: Family::Merge, msg } if msg.contains("sizes[1, 1]")),
                    "{e}"
                );
            }
        }
        assert!(shape(
            p.merge_weighted(
                be,
                xv(),
                None,
                ViewMut::new(&mut y, &[2, 4, 4]).unwrap(),
                ViewMut::new(&mut so, &[1, 8]).unwrap()
            )
            .unwrap_err()
        ));
        assert!(shape(
            p.unmerge(be, View::new(&y, &[2, 4, 4]).unwrap(), ViewMut::new(&mut [0.0; 40], &[2, 5, 4]).unwrap())
                .unwrap_err()
        ));
        // Pruning: k > N, wrong dims, non-finite scores.
        let score = vec![0.5f32; 12];
        let sv = || View::new(&score, &[2, 6]).unwrap();
        assert!(matches!(Selection::top_k(be, sv(), 7, false), Err(Error::Invalid { family: Family::Merge, .. })));
        assert!(matches!(Selection::top_k(be, sv(), 6, true), Err(Error::Invalid { family: Family::Merge, .. })));
        assert!(matches!(
            Selection::div_prune(be, View::new(&m, &[2, 6, 3]).unwrap(), 7, false),
            Err(Error::Invalid { .. })
        ));
        assert!(shape(Selection::top_k(be, View::new(&score, &[12]).unwrap(), 1, false).unwrap_err()));
        let mut s2 = score.clone();
        s2[3] = f32::NAN;
        assert!(matches!(
            Selection::top_k(be, View::new(&s2, &[2, 6]).unwrap(), 1, false),
            Err(Error::NonFinite { .. })
        ));
        // A class token with no tokens at all (found by the fuzz target: div_prune underflowed).
        let empty: [f32; 0] = [];
        assert!(shape(Selection::div_prune(be, View::new(&empty, &[2, 0, 3]).unwrap(), 0, true).unwrap_err()));
        assert!(shape(Selection::top_k(be, View::new(&empty, &[2, 0]).unwrap(), 0, true).unwrap_err()));
        let e = Selection::div_prune(be, View::new(&bad, &[2, 6, 3]).unwrap(), 2, false).unwrap_err();
        assert!(matches!(&e, Error::NonFinite { what, .. } if what == "metric[1, 1, 1]"), "{be:?}: {e}");
        let sel = Selection::top_k(be, sv(), 2, false).unwrap();
        assert!(shape(sel.gather(be, xv(), ViewMut::new(&mut y[..24], &[2, 3, 4]).unwrap()).unwrap_err()));
        let mut g = vec![0.0f32; 2 * 3 * 4];
        let e = sel.gather_fused(be, xv(), View::new(&s2, &[2, 6]).unwrap(), ViewMut::new(&mut g, &[2, 3, 4]).unwrap());
        assert!(matches!(e, Err(Error::NonFinite { .. })));
    }
}

/// DivPrune on the f64 oracle, recording the gap between the best and second-best candidate at
/// every greedy step: `(picks, gaps)`.
fn div_prune_oracle(m: &[f32], n: usize, c: usize, bi: usize, k: usize, class_token: bool) -> (Vec<u32>, Vec<f64>) {
    let first = class_token as usize;
    let cand: Vec<usize> = (first..n).collect();
    let unit = |t: usize| -> Vec<f64> {
        let row: Vec<f64> = m[(bi * n + t) * c..][..c].iter().map(|v| *v as f64).collect();
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        row.iter().map(|v| if norm == 0.0 { 0.0 } else { v / norm }).collect()
    };
    let u: Vec<Vec<f64>> = cand.iter().map(|&t| unit(t)).collect();
    let sim = |i: usize, j: usize| u[i].iter().zip(&u[j]).map(|(a, b)| a * b).sum::<f64>();
    let mm = cand.len();
    let mut key: Vec<f64> =
        (0..mm).map(|i| (0..mm).filter(|&j| j != i).map(|j| sim(i, j)).fold(f64::NEG_INFINITY, f64::max)).collect();
    let mut sel = vec![false; mm];
    let (mut picks, mut gaps) = (vec![], vec![]);
    for step in 0..k {
        let mut order: Vec<usize> = (0..mm).filter(|&i| !sel[i]).collect();
        order.sort_by(|&a, &b| key[a].partial_cmp(&key[b]).unwrap().then(a.cmp(&b)));
        gaps.push(if order.len() > 1 { key[order[1]] - key[order[0]] } else { f64::INFINITY });
        let pick = order[0];
        sel[pick] = true;
        picks.push(cand[pick] as u32);
        if step == 0 {
            key.fill(f64::NEG_INFINITY);
        }
        for (j, kj) in key.iter_mut().enumerate() {
            *kj = kj.max(sim(pick, j));
        }
    }
    (picks, gaps)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn pruning_matches_reference(
        b in 1usize..3,
        n in 1usize..60,
        c in 1usize..20,
        k_frac in 0.0f64..=1.0,
        class_token in any::<bool>(),
        integer in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let cand = n - (class_token && n > 0) as usize;
        let class_token = class_token && n > 0;
        let k = ((cand as f64) * k_frac) as usize;
        // Top-k: exact (scores are inputs, ties by index).
        let mut r = Rng(seed);
        let score: Vec<f32> = (0..b * n).map(|_| if integer { (r.next_u64() % 4) as f32 } else { r.uniform(0.0, 1.0) }).collect();
        let sv = View::new(&score, &[b, n]).unwrap();
        let want = Selection::top_k(Backend::Reference, sv, k, class_token).unwrap();
        for be in cpu_backends() {
            prop_assert_eq!(&Selection::top_k(be, sv, k, class_token).unwrap(), &want);
        }
        for bi in 0..b {
            let kept = want.kept(bi);
            let s = |t: u32| score[bi * n + t as usize];
            prop_assert!(kept.windows(2).all(|w| s(w[0]) > s(w[1]) || (s(w[0]) == s(w[1]) && w[0] < w[1])));
        }
        // Gather and the fused token.
        let x = random_data::<f32>(b * n * 7, seed ^ 1);
        let o = want.out_tokens(true);
        let mut want_y = vec![0.0f32; b * o * 7];
        let xv = View::new(&x, &[b, n, 7]).unwrap();
        want.gather_fused(Backend::Reference, xv, sv, ViewMut::new(&mut want_y, &[b, o, 7]).unwrap()).unwrap();
        for be in all_backends() {
            let mut y = vec![poison::<f32>(); b * o * 7];
            want.gather_fused(be, xv, sv, ViewMut::new(&mut y, &[b, o, 7]).unwrap()).unwrap();
            let mut g = vec![poison::<f32>(); b * (o - 1) * 7];
            want.gather(be, xv, ViewMut::new(&mut g, &[b, o - 1, 7]).unwrap()).unwrap();
            for bi in 0..b {
                assert_bits_eq(&y[bi * o * 7..][..(o - 1) * 7], &g[bi * (o - 1) * 7..][..(o - 1) * 7], "gather");
                assert_bits_eq(&y[bi * o * 7..][..(o - 1) * 7], &want_y[bi * o * 7..][..(o - 1) * 7], "kept rows");
                for ch in 0..7 {
                    let (got, w) = (y[(bi * o + o - 1) * 7 + ch], want_y[(bi * o + o - 1) * 7 + ch]);
                    let mag: f32 = (0..n).map(|t| (score[bi * n + t] * x[(bi * n + t) * 7 + ch]).abs()).sum();
                    prop_assert!((got - w).abs() <= (n as f32 + 2.0) * f32::EPSILON * mag, "fused {} vs {}", got, w);
                }
            }
        }
        // DivPrune: the prefix before the first near-tie is identical.
        let m = metric::<f32>(b * n * c, c, integer, seed ^ 2);
        let mv = View::new(&m, &[b, n, c]).unwrap();
        let want = Selection::div_prune(Backend::Reference, mv, k, class_token).unwrap();
        let cpu = Selection::div_prune(Backend::Cpu, mv, k, class_token).unwrap();
        for be in cpu_backends() {
            prop_assert_eq!(&Selection::div_prune(be, mv, k, class_token).unwrap(), &cpu);
        }
        for bi in 0..b {
            let (picks, gaps) = div_prune_oracle(&m, n, c, bi, k, class_token);
            let sure = gaps.iter().position(|&g| g <= tol(c)).unwrap_or(k);
            prop_assert_eq!(&want.kept(bi)[..sure], &picks[..sure]);
            prop_assert_eq!(&cpu.kept(bi)[..sure], &picks[..sure]);
            let mut all = cpu.kept(bi).to_vec();
            all.sort();
            all.dedup();
            prop_assert_eq!(all.len(), k);
            prop_assert!(!class_token || !all.contains(&0));
        }
    }
}
