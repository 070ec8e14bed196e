//! Fuzz target `attention`: arbitrary sizes (sometimes mismatched), layouts, masks, biases,
//! scales, dtypes and values.
//!
//! Invariants (any violation panics, which libFuzzer reports as a crash):
//! 1. No call panics; errors are fine.
//! 2. `Backend::Reference`, `Backend::Cpu` and `Backend::CpuIsa(isa)` for every level this
//!    machine has return the same error, or all succeed, except that the CPU backends reject
//!    `D > 256` (`Error::Unsupported`) where the reference computes.
//! 3. When they succeed: rows the mask hides are zeros with a log-sum-exp of −∞ on every
//!    backend. Rows whose scores and unnormalised sums stay well inside f32 range (the contract
//!    leaves the others unspecified): no output element is left unwritten (outputs are
//!    poisoned with NaN) or NaN, the log-sum-exp is −∞ exactly where the reference's is (−∞
//!    biases), and every CPU output is within a tolerance of the reference derived from the
//!    size of the scores (their worst-case f32 rounding, propagated through the softmax) and
//!    the rounding of the element type.
//!
//! Sizes stay small (Nq, Nk ≤ 40, D ≤ 300, B·H ≤ 18) so that one run is fast.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vistok::attention::{Attention, Bias, Mask, QkvLayout};
use vistok::{bf16, f16, Backend, DType, Error, Float, Isa, View, ViewMut};

fn backends() -> &'static [Backend] {
    static BACKENDS: OnceLock<Vec<Backend>> = OnceLock::new();
    BACKENDS.get_or_init(|| {
        let pinned = Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa);
        [Backend::Reference, Backend::Cpu].into_iter().chain(pinned).collect()
    })
}

const SPECIAL: [f32; 14] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    1e4,
    -1e4,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MIN_POSITIVE,
    1e-40,
    65504.0,
    1e20,
    0.5,
];

fn value(u: &mut Unstructured<'_>, i: usize) -> Result<f32> {
    if u.is_empty() {
        return Ok(((i * 37 + 11) % 23) as f32 / 11.0 - 1.0);
    }
    Ok(match u.int_in_range(0u8..=31)? {
        0 => f32::from_bits(u.arbitrary()?),
        1 => *u.choose(&SPECIAL)?,
        _ => f32::from(u.arbitrary::<i8>()?) / 32.0,
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum MaskKind {
    None,
    Causal,
    Window(usize, usize),
    Segments,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BiasKind {
    None,
    Key,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Ty {
    F32,
    F16,
    Bf16,
}

/// One fuzz case. Its `Debug` is what `cargo fuzz fmt attention <artifact>` prints.
#[derive(Debug)]
struct Case {
    layout: QkvLayout,
    /// b, h, hkv, nq, nk, d.
    sizes: [usize; 6],
    /// The dims of q, k, v, out, lse (usually consistent with `sizes`).
    q_dims: Vec<usize>,
    k_dims: Vec<usize>,
    v_dims: Vec<usize>,
    lse_dims: Vec<usize>,
    with_lse: bool,
    scale: Option<f32>,
    mask: MaskKind,
    qseg: Vec<u32>,
    kseg: Vec<u32>,
    bias: BiasKind,
    bias_dims: Vec<usize>,
    ty: Ty,
    bias_values: Vec<f32>,
    /// Q, K, V values, cycled (last: it takes what bytes are left).
    pool: Vec<f32>,
}

fn layout_dims(layout: QkvLayout, b: usize, heads: usize, n: usize, d: usize) -> Vec<usize> {
    match layout {
        QkvLayout::Bhnd => vec![b, heads, n, d],
        QkvLayout::Bnhd => vec![b, n, heads, d],
    }
}

/// Mostly `dims`; now and then one dimension bumped or the rank changed.
fn perturb(u: &mut Unstructured<'_>, mut dims: Vec<usize>) -> Result<Vec<usize>> {
    if u.ratio(1, 24)? {
        match u.int_in_range(0u8..=2)? {
            0 => {
                let i = u.choose_index(dims.len())?;
                dims[i] += 1;
            }
            1 => {
                dims.pop();
            }
            _ => dims.push(1),
        }
    }
    Ok(dims)
}

impl<'a> Arbitrary<'a> for Case {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let layout = if u.arbitrary()? { QkvLayout::Bhnd } else { QkvLayout::Bnhd };
        let b = u.int_in_range(0..=2)?;
        let hkv = u.int_in_range(1..=3)?;
        let h = if u.ratio(1, 16)? { u.int_in_range(1..=6)? } else { hkv * u.int_in_range(1..=3)? };
        let nq = if u.ratio(1, 16)? { 0 } else { u.int_in_range(1..=40)? };
        let nk = if u.ratio(1, 16)? { 0 } else { u.int_in_range(1..=40)? };
        let d = match u.int_in_range(0u8..=15)? {
            0 => 0,
            1 => u.int_in_range(250..=300)?,
            2..=5 => *u.choose(&[16, 32, 64, 128])?,
            _ => u.int_in_range(1..=40)?,
        };
        let q_dims = perturb(u, layout_dims(layout, b, h, nq, d))?;
        let k_dims = perturb(u, layout_dims(layout, b, hkv, nk, d))?;
        let v_dims = perturb(u, k_dims.clone())?;
        let lse_dims = perturb(u, vec![b, h, nq])?;
        let scale = match u.int_in_range(0u8..=7)? {
            0 => Some(value(u, 0)?),
            1..=3 => Some(f32::from(u.arbitrary::<i8>()?) / 16.0),
            _ => None,
        };
        let mask = match u.int_in_range(0u8..=3)? {
            0 => MaskKind::None,
            1 => MaskKind::Causal,
            2 => MaskKind::Window(
                if u.ratio(1, 8)? { usize::MAX } else { u.int_in_range(0..=50)? },
                if u.ratio(1, 8)? { usize::MAX } else { u.int_in_range(0..=50)? },
            ),
            _ => MaskKind::Segments,
        };
        let seg = |u: &mut Unstructured<'a>, n: usize| -> Result<Vec<u32>> {
            let n = if u.ratio(1, 24)? { n + 1 } else { n };
            (0..n).map(|_| Ok(u32::from(u.int_in_range(0u8..=4)?))).collect()
        };
        let (qseg, kseg) = if mask == MaskKind::Segments { (seg(u, nq)?, seg(u, nk)?) } else { (vec![], vec![]) };
        let (bias, bias_dims) = match u.int_in_range(0u8..=3)? {
            0 => {
                let bb = if u.arbitrary()? { 1 } else { b };
                (BiasKind::Key, perturb(u, vec![bb, nk])?)
            }
            1 => {
                let bb = if u.arbitrary()? { 1 } else { b };
                let hh = if u.arbitrary()? { 1 } else { h };
                (BiasKind::Full, perturb(u, vec![bb, hh, nq, nk])?)
            }
            _ => (BiasKind::None, vec![]),
        };
        let ty = *u.choose(&[Ty::F32, Ty::F16, Ty::Bf16])?;
        let n_bias: usize = bias_dims.iter().product();
        let bias_values = (0..n_bias.min(4096))
            .map(|i| {
                Ok(match u.int_in_range(0u8..=15)? {
                    0 => f32::NEG_INFINITY,
                    1 => value(u, i)?,
                    _ => f32::from(u.arbitrary::<i8>()?) / 16.0,
                })
            })
            .collect::<Result<_>>()?;
        let n_pool = u.int_in_range(1..=256)?;
        let pool = (0..n_pool).map(|i| value(u, i)).collect::<Result<_>>()?;
        Ok(Case {
            layout,
            sizes: [b, h, hkv, nq, nk, d],
            q_dims,
            k_dims,
            v_dims,
            lse_dims,
            with_lse: u.arbitrary()?,
            scale,
            mask,
            qseg,
            kseg,
            bias,
            bias_dims,
            ty,
            bias_values,
            pool,
        })
    }
}

fn numel(dims: &[usize]) -> usize {
    dims.iter().product()
}

/// One backend's run: the result and the outputs.
struct Run<T> {
    result: vistok::Result<()>,
    out: Vec<T>,
    lse: Vec<f32>,
}

fn run<T: Float>(case: &Case, backend: Backend, q: &[T], k: &[T], v: &[T], bias: &[f32]) -> Option<Run<T>> {
    let c = case;
    let mut a = Attention::new().layout(c.layout);
    if let Some(s) = c.scale {
        a = a.scale(s);
    }
    a = a.mask(match c.mask {
        MaskKind::None => Mask::None,
        MaskKind::Causal => Mask::Causal,
        MaskKind::Window(l, r) => Mask::Window { left: l, right: r },
        MaskKind::Segments => Mask::Segments { q: &c.qseg, k: &c.kseg },
    });
    // Views over buffers sized by their dims always build (ranks are 1..=6 here).
    match c.bias {
        BiasKind::None => {}
        BiasKind::Key => a = a.bias(Bias::Key(View::new(bias, &c.bias_dims).ok()?)),
        BiasKind::Full => a = a.bias(Bias::Full(View::new(bias, &c.bias_dims).ok()?)),
    }
    let mut out = vec![T::from_f32(f32::NAN); numel(&c.q_dims)];
    let mut lse = vec![f32::NAN; numel(&c.lse_dims)];
    let (qv, kv, vv) = (View::new(q, &c.q_dims).ok()?, View::new(k, &c.k_dims).ok()?, View::new(v, &c.v_dims).ok()?);
    let ov = ViewMut::new(&mut out, &c.q_dims).ok()?;
    let result = if c.with_lse {
        a.forward_lse(backend, qv, kv, vv, ov, ViewMut::new(&mut lse, &c.lse_dims).ok()?)
    } else {
        a.forward(backend, qv, kv, vv, ov)
    };
    Some(Run { result, out, lse })
}

/// Whether query `i` sees key `j`.
fn visible(c: &Case, nq: usize, nk: usize, i: usize, j: usize) -> bool {
    let diag = i as i128 + nk as i128 - nq as i128;
    match c.mask {
        MaskKind::None => true,
        MaskKind::Causal => (j as i128) <= diag,
        MaskKind::Window(l, r) => diag - l as i128 <= j as i128 && j as i128 <= diag + r as i128,
        MaskKind::Segments => c.kseg[j] <= c.qseg[i],
    }
}

fn check<T: Float>(case: &Case) {
    let len = |dims: &[usize]| numel(dims);
    let pool: Vec<T> = case.pool.iter().map(|x| T::from_f32(*x)).collect();
    let fill = |n: usize, off: usize| -> Vec<T> { (0..n).map(|i| pool[(i * 7 + off) % pool.len()]).collect() };
    let (q, k, v) = (fill(len(&case.q_dims), 0), fill(len(&case.k_dims), 3), fill(len(&case.v_dims), 5));
    let mut bias = case.bias_values.clone();
    bias.resize(len(&case.bias_dims), 0.25);

    let runs: Vec<Run<T>> = match backends().iter().map(|be| run(case, *be, &q, &k, &v, &bias)).collect() {
        Some(r) => r,
        None => return,
    };
    // 2. Same outcome everywhere (bar the CPU's D limit).
    let reference = &runs[0];
    for (run, be) in runs.iter().zip(backends()).skip(1) {
        match (&reference.result, &run.result) {
            (Ok(()), Err(Error::Unsupported { .. })) if case.sizes[5] > 256 => return,
            (a, b) => assert_eq!(a, b, "{be:?} disagrees with the reference\n{case:?}"),
        }
    }
    if reference.result.is_err() {
        return;
    }
    // 3. Every element written, no NaN; masked rows exact; the rest within tolerance. (Sizes
    // from the dims that were accepted: a perturbation can be consistent.)
    let (qd, kd) = (&case.q_dims, &case.k_dims);
    let [b, h, hkv, nq, nk, d] = match case.layout {
        QkvLayout::Bhnd => [qd[0], qd[1], kd[1], qd[2], kd[2], qd[3]],
        QkvLayout::Bnhd => [qd[0], qd[2], kd[2], qd[1], kd[1], qd[3]],
    };
    let bias_max = bias.iter().filter(|x| x.is_finite()).fold(0.0f64, |m, x| m.max(x.abs() as f64));
    let at = |heads: usize, n: usize, bb: usize, hh: usize, t: usize| match case.layout {
        QkvLayout::Bhnd => ((bb * heads + hh) * n + t) * d,
        QkvLayout::Bnhd => ((bb * n + t) * heads + hh) * d,
    };
    let scale = case.scale.unwrap_or((1.0 / (d as f64).sqrt()) as f32) as f64;
    let eps_t = match T::DTYPE {
        DType::F32 => f32::EPSILON as f64,
        DType::BF16 => 2f64.powi(-8),
        _ => 2f64.powi(-11),
    };
    for bb in 0..b {
        for hh in 0..h {
            let hk = hh / (h / hkv);
            for i in 0..nq {
                let qi = at(h, nq, bb, hh, i);
                let li = (bb * h + hh) * nq + i;
                // Worst-case size of a score's rounding error, and the largest |v|.
                let (mut err, mut vmax, mut any) = (0.0f64, 0.0f64, false);
                for j in 0..nk {
                    let kj = at(hkv, nk, bb, hk, j);
                    let abs: f64 =
                        (0..d).map(|c| (q[qi + c].to_f32() as f64 * k[kj + c].to_f32() as f64).abs()).sum();
                    // Recursive summation of d products (the scale rounded into each), then the
                    // bias added.
                    // (The bf16 path scales after the dot product: |q·k| itself must stay in range.)
                    if abs > 1e30 {
                        err = f64::INFINITY;
                    }
                    let s = abs * scale.abs();
                    err = err.max((s * (d as f64 + 2.0) + 2.0 * (s + bias_max)) * f32::EPSILON as f64);
                    if visible(case, nq, nk, i, j) {
                        vmax = (0..d).fold(vmax, |m, c| m.max(v[kj + c].to_f32().abs() as f64));
                        any = true;
                    }
                }
                // Rows the mask hides: zeros and −∞, always.
                if !any {
                    for (run, be) in runs.iter().zip(backends()) {
                        let row = &run.out[qi..qi + d];
                        assert!(row.iter().all(|x| x.to_f32() == 0.0), "{be:?}: masked row {i}\n{case:?}");
                        if case.with_lse {
                            assert_eq!(run.lse[li], f32::NEG_INFINITY, "{be:?}: masked row {i}\n{case:?}");
                        }
                    }
                    continue;
                }
                // The contract leaves rows unspecified whose scores or unnormalised sums leave
                // f32 range; below that, with some margin: no NaN, masked (by −∞ biases) where
                // the reference is, and close to it.
                if err > 0.5 || !err.is_finite() || vmax * (nk as f64 + 1.0) > 1e37 {
                    continue;
                }
                for (run, be) in runs.iter().zip(backends()) {
                    let row = &run.out[qi..qi + d];
                    assert!(row.iter().all(|x| !x.to_f32().is_nan()), "{be:?}: NaN in output row {i}\n{case:?}");
                    if case.with_lse {
                        assert!(!run.lse[li].is_nan(), "{be:?}: NaN lse, row {i}\n{case:?}");
                        let masked = reference.lse[li] == f32::NEG_INFINITY;
                        assert_eq!(run.lse[li] == f32::NEG_INFINITY, masked, "{be:?}: lse row {i}\n{case:?}");
                        if masked {
                            assert!(row.iter().all(|x| x.to_f32() == 0.0), "{be:?}: masked row {i}\n{case:?}");
                        }
                    }
                }
                // Score errors through the softmax; sums of nk terms; exp2; the output's rounding;
                // the bf16 path's rounding of P.
                let p_round = if T::DTYPE == DType::BF16 { 2f64.powi(-7) } else { 0.0 };
                let sums = (nk as f64 + 8.0) * f32::EPSILON as f64;
                let tol = vmax * ((4.0 * err).exp_m1() + sums + 3.0 * eps_t + p_round) + 1e-30;
                let want = &reference.out[qi..qi + d];
                for (run, be) in runs.iter().zip(backends()).skip(1) {
                    for (c, (g, w)) in run.out[qi..qi + d].iter().zip(want).enumerate() {
                        let diff = (g.to_f32() as f64 - w.to_f32() as f64).abs();
                        assert!(
                            diff <= tol,
                            "{be:?}: out row {i} col {c}: {g:?} vs reference {w:?} (tolerance {tol:e})\n{case:?}"
                        );
                    }
                    if case.with_lse && reference.lse[li].is_finite() {
                        let diff = (run.lse[li] as f64 - reference.lse[li] as f64).abs();
                        // (bf16: the probabilities' exp2 is good to 1.02e−4, relative.)
                        let exp = if T::DTYPE == DType::BF16 { 1.1e-4 } else { 0.0 };
                        let tol = 2.0 * err + sums + exp + 4.0 * f32::EPSILON as f64 * (reference.lse[li].abs() as f64 + 1.0);
                        assert!(diff <= tol, "{be:?}: lse row {i}: {} vs {} (tolerance {tol:e})\n{case:?}", run.lse[li], reference.lse[li]);
                    }
                }
            }
        }
    }
}

fuzz_target!(|case: Case| {
    match case.ty {
        Ty::F32 => check::<f32>(&case),
        Ty::F16 => check::<f16>(&case),
        Ty::Bf16 => check::<bf16>(&case),
    }
});
