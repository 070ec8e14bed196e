//! Fuzz target `merge`: arbitrary shapes, flags, dtypes, values (NaN, ±∞, subnormals, huge,
//! duplicates, zero rows) and view dims for token merging and pruning.
//!
//! Invariants (any violation panics, which libFuzzer reports as a crash):
//! 1. No call panics; errors are fine.
//! 2. `MergePlan::bipartite`: the reference and every CPU backend (each ISA level this machine
//!    has, and the detected one) all succeed or all fail, with the same error.
//! 3. CPU plans are identical across ISA levels (the f32 arithmetic is fixed).
//! 4. The CPU plan equals the reference's in every batch whose relevant score gaps (an f64
//!    oracle here) exceed the f32 tolerance; near-tie batches only have to be valid plans.
//! 5. Applying the CPU plan: merge (sum, mean), weighted merge and unmerge succeed on every
//!    backend; unmerge is bit-identical everywhere and follows the slot map; merged values
//!    agree with the reference within a relative tolerance.
//! 6. Pruning: top-k is identical on every backend; DivPrune is identical across CPU levels.
//!
//! Sizes stay small (≤ 4096 metric elements) so that one run is fast.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vistok::merge::{MatchConfig, MergeMode, MergePlan, Selection};
use vistok::{bf16, f16, Backend, Float, Isa, View, ViewMut};

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

fuzz_target!(|case: Case| {
    match case.dtype {
        DTypeChoice::F32 => run::<f32>(&case),
        DTypeChoice::F16 => run::<f16>(&case),
        DTypeChoice::BF16 => run::<bf16>(&case),
    }
});
