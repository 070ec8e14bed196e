//! FSQ cases: the shape (1048576 tokens × 6 dimensions, levels `[8, 8, 8, 5, 5, 5]`,
//! 64000 ids), with the criterion benches' ids: f32 and bf16 encode
//! (`fsq/<backend>/<dtype>/1048576x6`), f32 decode (`fsq/<backend>/u32-f32/1048576x6`), plus a
//! tiny `1031x6-ci` shape for fast tests (`--filter 'fsq/*-ci'`), and on a GPU cuda-only
//! `16777216x6-hbm` rows (400 MB of `z`: HBM, not L2), checked against the cpu backend.
//!
//! Bytes: input read + output written (`N·D·size(z) + N·4` encode, `N·4 + N·D·4` decode).
//! Flops: [`ENCODE_FLOPS`] per value for encode (the shared rational `tanh` and the affine
//! steps around it), one per code for decode.
//!
//! Data: `z` uniform in `[−4, 4)` (the tanh range: the outer levels saturate, the inner ones
//! are all hit), with exact `±0` mixed in. The check: decode must be bit-identical to the
//! reference. Encode ids are compared with the f64 reference the way `tests/fsq.rs` does: an
//! id may differ only where a level differs by one and the reference's pre-rounding value is
//! within a few f32 ulps of a `.5` boundary ([`tolerance`]). Such ids are reported as
//! `Check::Differs { max_abs: ids that differ, tol: ids that differ at an allowed near-tie }`,
//! so the check passes exactly when every difference is an allowed near-tie, and the table
//! shows the count (any other difference makes `max_abs` exceed `tol`: a failure).

use vistok::reference::fsq::bound;
use vistok::{bf16, Float, Fsq, View, ViewMut};

use super::lfq::{compare_ids, hash, host_cases, signed, Quant, HBM};
use super::{compare, Case, Check, Env};

/// Flops per encoded value: `z + shift`, `c·c`, 9 FMAs (18 flops), `p·c`, the division, the
/// final FMA (2) and `+ half_width` — 25. Rounding, clamps and the id sum are not counted.
const ENCODE_FLOPS: u64 = 25;

pub fn cases(env: &Env) -> Result<Vec<Case>, String> {
    let levels = [8, 8, 8, 5, 5, 5];
    let mut out = vec![];
    out.extend(encode::<f32>(env, &levels, 1 << 20, "")?);
    out.extend(encode::<bf16>(env, &levels, 1 << 20, "")?);
    out.extend(decode(env, &levels, 1 << 20, "")?);
    out.extend(encode::<f32>(env, &levels, 1031, "-ci")?);
    out.extend(decode(env, &levels, 1031, "-ci")?);
    #[cfg(feature = "cuda")]
    if env.gpu.is_some() {
        out.extend(encode::<f32>(env, &levels, 1 << 24, HBM)?);
        out.extend(decode(env, &levels, 1 << 24, HBM)?);
    }
    Ok(out)
}

fn plan(levels: &[u32]) -> Result<Fsq, String> {
    Fsq::new(levels).map_err(|e| format!("built-in fsq levels {levels:?}: {e}"))
}

fn encode<T: Float + crate::dev::Dev>(env: &Env, levels: &[u32], n: usize, suffix: &str) -> Result<Vec<Case>, String> {
    let plan = plan(levels)?;
    let d = plan.dim();
    Ok(host_cases(
        env,
        Quant {
            family: "fsq",
            dtype: T::DTYPE.name().to_string(),
            shape: format!("{n}x{d}{suffix}"),
            in_len: n * d,
            out_len: n,
            flops: ENCODE_FLOPS * (n * d) as u64,
            plan,
            gpu_only: suffix == HBM,
            input: Box::new(move || signed::<T>(n * d, 4.0)),
            op: |p, b, z, ids| p.encode(b, View::new(z, &[ids.len(), p.dim()])?, ViewMut::new(ids, &[ids.len()])?),
            check: |p, z, got, want| Ok(near_ties(p, z, got, want)),
            poison: u32::MAX,
            #[cfg(feature = "cuda")]
            device: |gpu, p| {
                let k = vistok::cuda::FsqKernel::new(gpu, p)?;
                Ok(Box::new(move |s, z, ids, c| k.encode_deferred::<T>(s, z, ids, c)))
            },
        },
    ))
}

fn decode(env: &Env, levels: &[u32], n: usize, suffix: &str) -> Result<Vec<Case>, String> {
    let plan = plan(levels)?;
    let (d, size) = (plan.dim(), plan.codebook_size());
    Ok(host_cases(
        env,
        Quant {
            family: "fsq",
            dtype: "u32-f32".to_string(),
            shape: format!("{n}x{d}{suffix}"),
            in_len: n,
            out_len: n * d,
            flops: (n * d) as u64,
            plan,
            gpu_only: suffix == HBM,
            input: Box::new(move || (0..n).map(|i| (hash(i) % size) as u32).collect()),
            op: |p, b, ids, codes| {
                p.decode(b, View::new(ids, &[ids.len()])?, ViewMut::new(codes, &[ids.len(), p.dim()])?)
            },
            check: |_, _, got, want| compare(got, want, 0.0),
            poison: f32::NAN,
            #[cfg(feature = "cuda")]
            device: |gpu, p| {
                let k = vistok::cuda::FsqKernel::new(gpu, p)?;
                Ok(Box::new(move |s, ids, codes, c| k.decode_deferred::<f32>(s, ids, codes, c)))
            },
        },
    ))
}

/// The f32 ulp of `x` (as f64).
fn ulp(x: f64) -> f64 {
    let f = (x.abs() as f32).max(f32::MIN_POSITIVE);
    (f32::from_bits(f.to_bits() + 1) - f) as f64
}

/// How far the f32 pipeline may be from the f64 pre-rounding value of `z` (levels `l`): the
/// rounding of `z + shift` (times `tanh' ≤ 1`, times `half_l`), the shared tanh's error
/// (≤ 3e−7) times `half_l`, and two roundings of the result. As in `tests/fsq.rs`.
fn tolerance(l: u32, z: f64) -> f64 {
    let half_l = (l - 1) as f64 * (1.0 + vistok::fsq::EPS) / 2.0;
    let shift = if l.is_multiple_of(2) { (0.5 / half_l).atanh() } else { 0.0 };
    half_l * (3e-7 + ulp(z + shift)) + 2.0 * ulp(bound(l, z))
}

/// Distance of `b` from the nearest `k + 0.5`.
fn to_boundary(b: f64) -> f64 {
    (b - (b - 0.5).round() - 0.5).abs()
}

/// Ids vs the f64 reference's, allowing (and counting) near-ties: see the module docs.
fn near_ties<T: Float>(plan: &Fsq, z: &[T], got: &[u32], want: &[u32]) -> Check {
    let exact = compare_ids(got, want);
    if exact == Check::Exact || got.len() != want.len() {
        return exact;
    }
    let d = plan.dim();
    let (mut differ, mut allowed) = (0u64, 0u64);
    for (n, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g == w {
            continue;
        }
        differ += 1;
        let tie = plan.dims().iter().enumerate().all(|(i, k)| {
            let (lg, lw) = ((g / k.basis) % k.levels, (w / k.basis) % k.levels);
            let x = z[n * d + i].to_f32() as f64;
            lg == lw || (lg.abs_diff(lw) == 1 && to_boundary(bound(k.levels, x)) <= tolerance(k.levels, x))
        });
        // An id at or above the codebook size is never a near-tie.
        allowed += u64::from(tie && (g as u64) < plan.codebook_size());
    }
    Check::Differs { max_abs: differ as f64, tol: allowed as f64 }
}
