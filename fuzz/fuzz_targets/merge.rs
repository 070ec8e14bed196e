//! Fuzz target `merge`, two parts on the same input bytes.
//!
//! Part 1 (raw bits): arbitrary batch / token / channel counts, r, class and distillation
//! flags, output order, and metric and token values from raw bits (NaN, ±∞, huge, subnormal).
//! 1. No call panics; errors are fine.
//! 2. `MergePlan::bipartite` succeeds or fails alike on the reference and every cpu backend
//!    (detected and each available pinned ISA).
//! 3. On success: every plan has the same `r`, `N − r` output tokens and slots `< N − r`; every
//!    cpu backend returns the SAME plan (deterministic); `merge` (sum and mean) and `unmerge`
//!    agree across cpu backends bit for bit (any NaN equal to any NaN), and `unmerge` gives
//!    every token the value of its slot.
//!
//! Part 2 (structured, via `arbitrary`): f32 / f16 / bf16 metrics, special values, duplicate
//! rows (exact ties), malformed view dims, and pruning.
//! 4. Reference and cpu backends fail with the SAME error.
//! 5. The cpu plan equals the reference's in every batch whose relevant score gaps (an f64
//!    oracle here) exceed the f32 tolerance; near-tie batches only have to be valid plans.
//! 6. Merge (sum, mean) within a relative tolerance of the reference; weighted merge succeeds;
//!    unmerge bit-identical on every backend and follows the slot map.
//! 7. Pruning: top-k identical on every backend; DivPrune identical across cpu levels and
//!    failing alike with the reference.
//!
//! Sizes stay small (≤ 4096 metric elements in part 2) so that one run is fast.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vistok::merge::{MatchConfig, MergeMode, MergePlan, Selection};
use vistok::{bf16, f16, Backend, Float, Isa, View, ViewMut};

/// Part 1 (see the module docs).
fn raw_bits(data: &[u8]) {
    if data.len() < 6 {
        return;
    }
    let (head, rest) = data.split_at(6);
    let b = 1 + usize::from(head[0] % 3);
    let n = usize::from(head[1] % 40);
    let c = usize::from(head[2] % 12);
    let r = usize::from(head[3] % 24);
    let flags = head[4];
    let config = MatchConfig::new(r)
        .class_token(flags & 1 != 0)
        .distill_token(flags & 2 != 0)
        .keep_original_order(flags & 4 != 0);
    let raw = |i: usize| -> f32 {
        let k = 4 * i;
        if rest.len() < 4 {
            return (i as f32 * 0.37).sin();
        }
        let k = k % (rest.len() - 3);
        let bits = u32::from_le_bytes([rest[k], rest[k + 1], rest[k + 2], rest[k + 3]]);
        if head[5] & 1 == 0 {
            // Mostly tame values: small integers and fractions (many exact ties).
            ((bits % 17) as f32 - 8.0) / (1 + bits % 3) as f32
        } else {
            f32::from_bits(bits)
        }
    };
    let metric: Vec<f32> = (0..b * n * c).map(raw).collect();
    let x: Vec<f32> = (0..b * n * c).map(|i| raw(i + 7)).collect();
    let Ok(mv) = View::new(&metric, &[b, n, c]) else { return };

    let reference = MergePlan::bipartite(Backend::Reference, mv, &config);
    let mut backends = vec![Backend::Cpu];
    backends.extend(Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa));
    let plans: Vec<_> = backends.iter().map(|&be| MergePlan::bipartite(be, mv, &config)).collect();
    for (be, p) in backends.iter().zip(&plans) {
        assert_eq!(
            p.is_ok(),
            reference.is_ok(),
            "{be:?}: {:?} vs reference {:?}",
            p.as_ref().err(),
            reference.as_ref().err()
        );
    }
    let Ok(reference) = reference else { return };
    let plans: Vec<MergePlan> = plans.into_iter().map(Result::unwrap).collect();
    let first = &plans[0];
    for (be, p) in backends.iter().zip(&plans) {
        assert_eq!(p, first, "{be:?}: cpu backends disagree on the plan");
    }
    assert_eq!(first.r(), reference.r());
    assert_eq!(first.out_tokens(), n - first.r());
    assert!(first.slots().iter().all(|&s| (s as usize) < first.out_tokens()));

    let out_n = first.out_tokens();
    let Ok(xv) = View::new(&x, &[b, n, c]) else { return };
    for mode in [MergeMode::Sum, MergeMode::Mean] {
        let mut outs = vec![];
        for &be in &backends {
            let mut y = vec![f32::NAN; b * out_n * c];
            let res = first.merge(be, xv, mode, ViewMut::new(&mut y, &[b, out_n, c]).unwrap());
            outs.push(res.map(|()| y));
        }
        for (be, o) in backends.iter().zip(&outs) {
            let same = match (o, &outs[0]) {
                // Bit for bit, except that any NaN equals any NaN (payloads are not specified).
                (Ok(a), Ok(z)) => {
                    a.iter().zip(z).all(|(p, q)| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()))
                }
                (Err(_), Err(_)) => true,
                _ => false,
            };
            assert!(same, "{be:?}: merge {mode:?} differs across cpu backends");
        }
    }
    let y: Vec<f32> = (0..b * out_n * c).map(|i| raw(i + 3)).collect();
    let mut back = vec![f32::NAN; b * n * c];
    if first
        .unmerge(Backend::Cpu, View::new(&y, &[b, out_n, c]).unwrap(), ViewMut::new(&mut back, &[b, n, c]).unwrap())
        .is_ok()
    {
        for bi in 0..b {
            for t in 0..n {
                let s = first.slots()[bi * n + t] as usize;
                for k in 0..c {
                    let (got, want) = (back[(bi * n + t) * c + k], y[(bi * out_n + s) * c + k]);
                    assert_eq!(got.to_bits(), want.to_bits(), "unmerge: batch {bi} token {t} slot {s}");
                }
            }
        }
    }
}

const MAX_ELEMS: usize = 4096;

fn cpu_backends() -> &'static [Backend] {
    static B: OnceLock<Vec<Backend>> = OnceLock::new();
    B.get_or_init(|| {
        let pinned = Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa);
        [Backend::Cpu].into_iter().chain(pinned).collect()
    })
}

const SPECIAL: [f32; 14] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MAX,
    f32::MIN_POSITIVE,
    1e-45,
    1e-30,
    1e30,
    65504.0,
];

#[derive(Debug, Clone, Copy)]
enum DTypeChoice {
    F32,
    F16,
    BF16,
}

#[derive(Debug)]
struct Case {
    dims: [usize; 3],
    /// Dims the metric view is built with (mostly `dims`).
    view_dims: Vec<usize>,
    config: MatchConfig,
    dtype: DTypeChoice,
    cx: usize,
    k: usize,
    values: Vec<f32>,
}

fn any_f32(u: &mut Unstructured<'_>, i: usize) -> Result<f32> {
    if u.is_empty() {
        return Ok(((i * 37 + 11) % 17) as f32 - 8.0);
    }
    Ok(match u.int_in_range(0u8..=15)? {
        0 => f32::from_bits(u.arbitrary()?),
        1 => *u.choose(&SPECIAL)?,
        2..=5 => f32::from(u.arbitrary::<i8>()?) / 16.0,
        _ => f32::from(u.arbitrary::<i16>()?) / 4096.0,
    })
}

impl<'a> Arbitrary<'a> for Case {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let b = u.int_in_range(0..=3)?;
        let n = u.int_in_range(0..=70)?;
        let c = u.int_in_range(0..=19)?;
        let dims = [b, n, c];
        let mut view_dims = dims.to_vec();
        if u.ratio(1, 16)? {
            match u.int_in_range(0..=2)? {
                0 => {
                    view_dims.pop();
                }
                1 => view_dims.swap(0, 1),
                _ => view_dims = vec![b * n * c],
            }
        }
        let config = MatchConfig::new(u.int_in_range(0..=80)?)
            .class_token(u.arbitrary()?)
            .distill_token(u.arbitrary()?)
            .keep_original_order(u.arbitrary()?);
        let dtype = *u.choose(&[DTypeChoice::F32, DTypeChoice::F16, DTypeChoice::BF16])?;
        let cx = u.int_in_range(0..=9)?;
        let k = u.int_in_range(0..=n + 1)?;
        let len = (b * n * c).min(MAX_ELEMS);
        let mut values = Vec::with_capacity(len);
        for i in 0..len {
            // Duplicates and zero rows now and then: exact ties.
            let v = if c > 0 && i >= c && u.ratio(1, 32)? { values[i - c] } else { any_f32(u, i)? };
            values.push(v);
        }
        Ok(Case { dims, view_dims, config, dtype, cx, k, values })
    }
}

/// The f32 score tolerance (twice the contract's `(Cm + 6)·2⁻²⁴`).
fn tol(c: usize) -> f64 {
    (c as f64 + 8.0) * 2f64.powi(-23)
}

/// Whether batch `bi` has a relevant near-tie (f64 oracle): ranking neighbours, or best vs
/// second-best B of a merged A token.
fn near_tie<M: Float>(m: &[M], [_, n, c]: [usize; 3], cfg: &MatchConfig, plan: &MergePlan, bi: usize) -> bool {
    let unit = |t: usize| -> Vec<f64> {
        let row: Vec<f64> = m[(bi * n + t) * c..][..c].iter().map(|v| v.to_f32() as f64).collect();
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        row.iter().map(|v| if norm == 0.0 { 0.0 } else { v / norm }).collect()
    };
    let (na, nb) = (n.div_ceil(2), n / 2);
    let t = tol(c);
    let mut bests = vec![];
    for i in 0..na {
        let mut row: Vec<f64> = (0..nb)
            .map(|j| {
                if (cfg.class_token && i == 0) || (cfg.distill_token && j == 0) {
                    f64::NEG_INFINITY
                } else {
                    unit(2 * i).iter().zip(unit(2 * j + 1)).map(|(x, y)| x * y).sum()
                }
            })
            .collect();
        row.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let (best, second) = (row[0], row.get(1).copied().unwrap_or(f64::NEG_INFINITY));
        let merged = plan.merged(bi).contains(&(2 * i as u32));
        if merged && best.is_finite() && second.is_finite() && best - second <= t {
            return true;
        }
        bests.push(best);
    }
    bests.sort_by(|a, b| b.partial_cmp(a).unwrap());
    bests.windows(2).any(|w| w[0].is_finite() && w[1].is_finite() && w[0] - w[1] <= t)
}

fn run<M: Float>(case: &Case) {
    let m: Vec<M> = case.values.iter().map(|&v| M::from_f32(v)).collect();
    let Ok(view) = View::new(&m, &case.view_dims) else { return };
    let want = MergePlan::bipartite(Backend::Reference, view, &case.config);
    let mut cpu_plan: Option<MergePlan> = None;
    for &be in cpu_backends() {
        let got = MergePlan::bipartite(be, view, &case.config);
        match (&want, &got) {
            (Ok(_), Ok(p)) => match &cpu_plan {
                None => cpu_plan = Some(p.clone()),
                Some(q) => assert_eq!(p, q, "{be:?}: CPU plans differ across ISA levels"),
            },
            (Err(a), Err(b)) => assert_eq!(a, b, "{be:?}: different errors"),
            _ => panic!("{be:?}: reference {want:?} vs {got:?}"),
        }
    }
    let (Ok(want), Some(plan)) = (want, cpu_plan) else { return };
    // The plan's dims are the view's (which the case may have permuted).
    let dims: [usize; 3] = view.dims().try_into().expect("a plan exists only for rank 3");
    for bi in 0..plan.batch() {
        if !near_tie(&m, dims, &case.config, &want, bi) {
            assert_eq!(plan.kept(bi), want.kept(bi), "batch {bi}: kept");
            assert_eq!(plan.merged(bi), want.merged(bi), "batch {bi}: merged");
            assert_eq!(plan.destinations(bi), want.destinations(bi), "batch {bi}: destinations");
        }
    }
    apply::<M>(&plan, case);
    prune(&m, case);
}

/// Applies the CPU plan to tokens made of the same values (finite ones only).
fn apply<M: Float>(plan: &MergePlan, case: &Case) {
    let (b, n, o, cx) = (plan.batch(), plan.tokens(), plan.out_tokens(), case.cx);
    let x: Vec<M> = (0..b * n * cx).map(|i| M::from_f32(((i * 7919) % 61) as f32 / 8.0 - 3.0)).collect();
    let sizes: Vec<f32> = (0..b * n).map(|i| 1.0 + (i % 5) as f32).collect();
    let xv = View::new(&x, &[b, n, cx]).unwrap();
    for mode in [MergeMode::Sum, MergeMode::Mean] {
        let mut want = vec![M::from_f32(0.0); b * o * cx];
        plan.merge(Backend::Reference, xv, mode, ViewMut::new(&mut want, &[b, o, cx]).unwrap()).unwrap();
        for &be in cpu_backends() {
            let mut got = vec![M::from_f32(f32::NAN); b * o * cx];
            plan.merge(be, xv, mode, ViewMut::new(&mut got, &[b, o, cx]).unwrap()).unwrap();
            for (g, w) in got.iter().zip(&want) {
                let (g, w) = (g.to_f32() as f64, w.to_f32() as f64);
                assert!((g - w).abs() <= 1e-2 * w.abs().max(1.0), "{be:?} {mode:?}: {g} vs {w}");
            }
        }
    }
    let (mut y, mut s) = (vec![M::from_f32(0.0); b * o * cx], vec![0.0f32; b * o]);
    for &be in cpu_backends() {
        let sv = View::new(&sizes, &[b, n]).unwrap();
        plan.merge_weighted(
            be,
            xv,
            Some(sv),
            ViewMut::new(&mut y, &[b, o, cx]).unwrap(),
            ViewMut::new(&mut s, &[b, o]).unwrap(),
        )
        .unwrap();
    }
    let mut want = vec![M::from_f32(0.0); b * n * cx];
    let yv = View::new(&y, &[b, o, cx]).unwrap();
    plan.unmerge(Backend::Reference, yv, ViewMut::new(&mut want, &[b, n, cx]).unwrap()).unwrap();
    for (i, &slot) in plan.slots().iter().enumerate() {
        let (bi, s) = (i / n.max(1), slot as usize);
        for k in 0..cx {
            assert_eq!(want[i * cx + k].to_f32().to_bits(), y[(bi * o + s) * cx + k].to_f32().to_bits(), "unmerge");
        }
    }
    for &be in cpu_backends() {
        let mut got = vec![M::from_f32(f32::NAN); b * n * cx];
        plan.unmerge(be, yv, ViewMut::new(&mut got, &[b, n, cx]).unwrap()).unwrap();
        assert!(got.iter().zip(&want).all(|(g, w)| g.to_f32().to_bits() == w.to_f32().to_bits()), "{be:?}: unmerge");
    }
}

fn prune<M: Float>(m: &[M], case: &Case) {
    let [b, n, c] = case.dims;
    if m.len() != b * n * c {
        return;
    }
    let class = case.config.class_token;
    let score: Vec<f32> = (0..b * n).map(|i| ((i * 31) % 7) as f32).collect();
    let sv = View::new(&score, &[b, n]).unwrap();
    let want = Selection::top_k(Backend::Reference, sv, case.k, class);
    for &be in cpu_backends() {
        assert_eq!(Selection::top_k(be, sv, case.k, class), want, "{be:?}: top-k");
    }
    let mv = View::new(m, &[b, n, c]).unwrap();
    let first = Selection::div_prune(Backend::Cpu, mv, case.k, class);
    for &be in cpu_backends() {
        assert_eq!(Selection::div_prune(be, mv, case.k, class), first, "{be:?}: DivPrune");
    }
    let reference = Selection::div_prune(Backend::Reference, mv, case.k, class);
    match (&reference, &first) {
        (Err(a), Err(b)) => assert_eq!(a, b, "DivPrune errors"),
        (Ok(_), Ok(_)) => {}
        _ => panic!("DivPrune: reference {reference:?} vs cpu {first:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    raw_bits(data);
    let Ok(case) = Case::arbitrary_take_rest(Unstructured::new(data)) else { return };
    match case.dtype {
        DTypeChoice::F32 => run::<f32>(&case),
        DTypeChoice::F16 => run::<f16>(&case),
        DTypeChoice::BF16 => run::<bf16>(&case),
    }
});
