//! The differential harness: an engine's outputs against [`crate::reference`], with the
//! near-ties that float rounding may decide either way tolerated, bounded and counted.

use std::fmt;

use crate::argmin::{Codebook, Metric};
use crate::dtype::{DType, Float};
use crate::error::Family;
use crate::fsq::{Fsq, EPS};
use crate::lfq::Lfq;
use crate::reference;
use crate::view::{View, ViewMut};

/// What a passing check saw.
///
/// ```
/// use vistok::testing::Report;
/// let mut total = Report::default();
/// total += Report { compared: 10, near_ties: 1, exact_ties: 0 };
/// total += Report { compared: 5, near_ties: 0, exact_ties: 2 };
/// assert_eq!(total, Report { compared: 15, near_ties: 1, exact_ties: 2 });
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Outputs compared: ids (LFQ), levels (FSQ: ids × dimensions), rows (argmin), elements
    /// (decode).
    pub compared: usize,
    /// Outputs that differ from the reference but were accepted as near-ties: an FSQ level one
    /// away where the exact value is within the band of a rounding boundary; an argmin index
    /// whose entry is worse than the reference's by at most the documented bound. On random
    /// data these are rare; many of them means a wrong kernel hiding behind the tolerance.
    pub near_ties: usize,
    /// Argmin rows where the engine chose another entry exactly as near as the reference's
    /// (an exact tie in f64 that f32 rounding broke the other way). Not errors.
    pub exact_ties: usize,
}

impl std::ops::AddAssign for Report {
    fn add_assign(&mut self, o: Report) {
        self.compared += o.compared;
        self.near_ties += o.near_ties;
        self.exact_ties += o.exact_ties;
    }
}

/// Why a check failed: the first output that disagrees with the reference beyond the
/// tolerance, or inputs that cannot be compared (lengths, or inputs the reference rejects).
///
/// It implements [`std::error::Error`], so `?` turns it into a proptest failure.
///
/// ```
/// use vistok::testing::check_lfq;
/// use vistok::{BitOrder, Lfq, LfqConfig};
/// let plan = Lfq::new(&LfqConfig::new(1, 2, BitOrder::MsbFirst))?;
/// let m = check_lfq(&plan, &[1.0f32, -1.0], &[0b01]).unwrap_err();
/// assert_eq!(m.index, Some(0));
/// assert!(m.to_string().contains("the reference gives 2"), "{m}");
/// # Ok::<(), vistok::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// The kernel family checked.
    pub family: Family,
    /// The flat index of the first bad output (`None`: the inputs themselves).
    pub index: Option<usize>,
    /// What was wrong, with the values involved.
    pub message: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.family, self.message)
    }
}

impl std::error::Error for Mismatch {}

fn input(family: Family, message: String) -> Mismatch {
    Mismatch { family, index: None, message }
}

fn output(family: Family, index: usize, message: String) -> Mismatch {
    Mismatch { family, index: Some(index), message }
}

/// Checks an LFQ / BSQ engine's ids `[N, G]` for `z` `[N, G·d]` against the reference:
/// **exactly** (the sign test leaves nothing to rounding, so no difference is tolerated).
///
/// Fails on the first id that differs, on lengths that don't match the plan, and when the
/// reference rejects `z` (a NaN: then there is nothing to compare).
///
/// ```
/// use vistok::testing::check_lfq;
/// use vistok::{BitOrder, Lfq, LfqConfig};
/// let plan = Lfq::new(&LfqConfig::new(1, 3, BitOrder::LsbFirst))?;
/// let r = check_lfq(&plan, &[0.5f32, -0.0, 1e-40], &[0b101]).unwrap();
/// assert_eq!((r.compared, r.near_ties), (1, 0));
/// assert!(check_lfq(&plan, &[0.5f32, 0.0, 1e-40], &[0b111]).is_err());
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn check_lfq<T: Float>(lfq: &Lfq, z: &[T], ids: &[u32]) -> Result<Report, Mismatch> {
    let f = Family::Lfq;
    let c = lfq.channels();
    if !z.len().is_multiple_of(c) {
        return Err(input(f, format!("z has {} elements, not a multiple of G·d = {c}", z.len())));
    }
    let n = z.len() / c;
    let g = lfq.groups();
    if ids.len() != n * g {
        return Err(input(f, format!("{} ids for {n} tokens of {g} groups (want {})", ids.len(), n * g)));
    }
    let mut want = vec![0u32; n * g];
    let views = View::new(z, &lfq.codes_dims(n)).and_then(|z| Ok((z, ViewMut::new(&mut want, &lfq.ids_dims(n))?)));
    views
        .and_then(|(z, w)| reference::lfq_encode(lfq, z, w))
        .map_err(|e| input(f, format!("the reference rejects the input: {e}")))?;
    if let Some(i) = (0..ids.len()).find(|&i| ids[i] != want[i]) {
        let (t, grp) = (i / g, i % g);
        let d = lfq.bits() as usize;
        let zs: Vec<f32> = z[t * c + grp * d..][..d].iter().map(|v| v.to_f32()).collect();
        return Err(output(
            f,
            i,
            format!("ids[{t}, {grp}] = {} but the reference gives {} (z group {zs:?})", ids[i], want[i]),
        ));
    }
    Ok(Report { compared: ids.len(), ..Report::default() })
}

/// Checks an LFQ / BSQ engine's codes `[N, G·d]` for ids `[N, G]` against the reference, bit
/// for bit (`±v` rounded to `O`).
///
/// ```
/// use vistok::testing::check_lfq_decode;
/// use vistok::{BitOrder, Lfq, LfqConfig};
/// let plan = Lfq::new(&LfqConfig::new(1, 2, BitOrder::MsbFirst))?;
/// assert!(check_lfq_decode(&plan, &[0b10], &[1.0f32, -1.0]).is_ok());
/// assert!(check_lfq_decode(&plan, &[0b10], &[1.0f32, 0.0]).is_err());
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn check_lfq_decode<O: Float>(lfq: &Lfq, ids: &[u32], codes: &[O]) -> Result<Report, Mismatch> {
    let f = Family::Lfq;
    let g = lfq.groups();
    if !ids.len().is_multiple_of(g) || codes.len() != ids.len() / g * lfq.channels() {
        return Err(input(
            f,
            format!("{} ids and {} codes do not fit G = {g}, d = {}", ids.len(), codes.len(), lfq.bits()),
        ));
    }
    let n = ids.len() / g;
    let mut want = vec![O::from_f32(0.0); codes.len()];
    View::new(ids, &lfq.ids_dims(n))
        .and_then(|v| reference::lfq_decode(lfq, v, ViewMut::new(&mut want, &lfq.codes_dims(n))?))
        .map_err(|e| input(f, format!("the reference rejects the ids: {e}")))?;
    same_bits(f, codes, &want)
}

/// The first element of `got` whose bits differ from `want`.
fn same_bits<O: Float>(family: Family, got: &[O], want: &[O]) -> Result<Report, Mismatch> {
    let bits = |v: O| bytemuck::bytes_of(&v).to_vec();
    match (0..got.len()).find(|&i| bits(got[i]) != bits(want[i])) {
        Some(i) => Err(output(family, i, format!("codes[{i}] = {:?} but the reference gives {:?}", got[i], want[i]))),
        None => Ok(Report { compared: got.len(), ..Report::default() }),
    }
}

/// The f32 ulp of `|x|` (as f64; the smallest normal's for smaller values).
fn ulp(x: f64) -> f64 {
    let f = (x.abs() as f32).max(f32::MIN_POSITIVE);
    (f32::from_bits(f.to_bits() + 1) - f) as f64
}

/// The band around a rounding boundary in which an FSQ level may differ from the reference:
/// for `L` levels and input `z`, `half_l·(3·10⁻⁷ + ulp(z + shift)) + 2·ulp(bound(L, z))` —
/// the rounding of `z + shift` (times `tanh' ≤ 1` times `half_l`), an f32 `tanh` within
/// 3·10⁻⁷, and a couple of roundings of the result (`ulp` in f32).
///
/// ```
/// let band = vistok::testing::fsq_band(8, 0.3);
/// assert!(band > 0.0 && band < 1e-5); // a few f32 ulps of the level scale
/// ```
pub fn fsq_band(levels: u32, z: f64) -> f64 {
    let half_l = (levels - 1) as f64 * (1.0 + EPS) / 2.0;
    let shift = if levels.is_multiple_of(2) { (0.5 / half_l).atanh() } else { 0.0 };
    half_l * (3e-7 + ulp(z + shift)) + 2.0 * ulp(reference::fsq::bound(levels, z))
}

/// Checks an FSQ engine's ids `[N]` for `z` `[N, D]` against the f64 reference. A level may
/// differ from the reference's only by one, and only where the reference's pre-rounding value
/// [`bound`](reference::fsq::bound)`(L, z)` is within [`fsq_band`] of a `k + 0.5` boundary
/// (an f32 engine — vistok's own fast backends included — rounds those either way); such
/// levels are counted in [`Report::near_ties`]. Everything else must match exactly. The band
/// suits f32 evaluations of the formula; it does not cover bf16 / f16 arithmetic, or levels
/// so large (≳ 2^20) that f32 cannot resolve them.
///
/// Fails on the first id that is out of range or differs beyond that, on lengths that don't
/// match, and when the reference rejects `z` (a NaN).
///
/// ```
/// use vistok::testing::check_fsq;
/// use vistok::Fsq;
/// let fsq = Fsq::new(&[5])?;
/// let r = check_fsq(&fsq, &[-9.0f32, 0.0, 9.0], &[0, 2, 4]).unwrap();
/// assert_eq!((r.compared, r.near_ties), (3, 0));
/// assert!(check_fsq(&fsq, &[0.0f32], &[3]).is_err());
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn check_fsq<T: Float>(fsq: &Fsq, z: &[T], ids: &[u32]) -> Result<Report, Mismatch> {
    let f = Family::Fsq;
    let d = fsq.dim();
    if !z.len().is_multiple_of(d) || ids.len() != z.len() / d {
        return Err(input(f, format!("{} ids for z of {} elements and D = {d}", ids.len(), z.len())));
    }
    let n = ids.len();
    let mut want = vec![0u32; n];
    View::new(z, &[n, d])
        .and_then(|z| reference::fsq_encode(fsq, z, ViewMut::new(&mut want, &[n])?))
        .map_err(|e| input(f, format!("the reference rejects the input: {e}")))?;
    let mut near = 0;
    for (t, (&got, &w)) in ids.iter().zip(&want).enumerate() {
        if got as u64 >= fsq.codebook_size() {
            return Err(output(
                f,
                t,
                format!("ids[{t}] = {got} is not below the codebook size {}", fsq.codebook_size()),
            ));
        }
        if got == w {
            continue;
        }
        for (i, k) in fsq.dims().iter().enumerate() {
            let (g, l) = ((got / k.basis) % k.levels, (w / k.basis) % k.levels);
            if g == l {
                continue;
            }
            let x = z[t * d + i].to_f32() as f64;
            let b = reference::fsq::bound(k.levels, x);
            let off = (b - (b - 0.5).round() - 0.5).abs();
            let band = fsq_band(k.levels, x);
            if g.abs_diff(l) != 1 || off > band {
                return Err(output(
                    f,
                    t,
                    format!(
                        "ids[{t}] = {got} but the reference gives {w}: dimension {i} (L = {}) has level {g}, \
                         reference {l}, for z = {x:e} (pre-rounding value {b}, {off:e} from a boundary; \
                         band {band:e})",
                        k.levels
                    ),
                ));
            }
            near += 1;
        }
    }
    Ok(Report { compared: n * d, near_ties: near, exact_ties: 0 })
}

/// Checks an FSQ engine's codes `[N, D]` for ids `[N]` against the reference, bit for bit.
///
/// ```
/// use vistok::testing::check_fsq_decode;
/// let fsq = vistok::Fsq::new(&[5, 4])?;
/// assert!(check_fsq_decode(&fsq, &[4], &[1.0f32, -1.0]).is_ok());
/// assert!(check_fsq_decode(&fsq, &[4], &[1.0f32, -0.5]).is_err());
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn check_fsq_decode<O: Float>(fsq: &Fsq, ids: &[u32], codes: &[O]) -> Result<Report, Mismatch> {
    let f = Family::Fsq;
    let (n, d) = (ids.len(), fsq.dim());
    if codes.len() != n * d {
        return Err(input(f, format!("{} codes for {n} ids of D = {d}", codes.len())));
    }
    let mut want = vec![O::from_f32(0.0); n * d];
    View::new(ids, &[n])
        .and_then(|v| reference::fsq_decode(fsq, v, ViewMut::new(&mut want, &[n, d])?))
        .map_err(|e| input(f, format!("the reference rejects the ids: {e}")))?;
    same_bits(f, codes, &want)
}

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn norm2(v: &[f64]) -> f64 {
    v.iter().map(|a| a * a).sum()
}

/// The f32 squared norm as the argmin contract computes it (an FMA chain).
fn norm2_f32(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |n, &e| e.mul_add(e, n))
}

/// The most bf16's flushes (subnormal inputs and partial sums read as zero) move `⟨x, e⟩`.
fn flush_error(dtype: DType, x: &[f64], e: &[f64]) -> f64 {
    if dtype != DType::BF16 {
        return 0.0;
    }
    let tiny = |v: f64| v != 0.0 && v.abs() < f32::MIN_POSITIVE as f64;
    let lost: f64 = x.iter().zip(e).filter(|(a, b)| tiny(**a) || tiny(**b)).map(|(a, b)| (a * b).abs()).sum();
    lost + x.len() as f64 * 2f64.powi(-126)
}

/// An f32 result below the normal range is off by up to half its spacing, 2⁻¹⁵⁰, per
/// operation: the absolute allowance of one score of `d` steps, doubled for safety.
fn underflow(d: f64) -> f64 {
    (2.0 * d + 2.0) * 2f64.powi(-149)
}

/// The similarity the contract ranks by: `cos(x, e)` in f64, 0 for a zero `x` or an entry whose
/// f32 squared norm is 0 (the contract's zero vector).
fn cosine(x: &[f64], e: &[f32]) -> f64 {
    let ee: Vec<f64> = e.iter().map(|&v| v as f64).collect();
    let (xx, n2) = (norm2(x), norm2(&ee));
    if xx == 0.0 || n2 == 0.0 || norm2_f32(e) == 0.0 {
        return 0.0;
    }
    x.iter().zip(&ee).map(|(a, b)| a * b).sum::<f64>() / (xx.sqrt() * n2.sqrt())
}

/// How much worse (in distance) the chosen entry may be than the best: the bound of
/// [`crate::argmin`]'s docs, plus bf16's flushes and underflow.
fn index_tolerance(metric: Metric, dtype: DType, x: &[f64], e_got: &[f64], e_best: &[f64]) -> f64 {
    let d = x.len() as f64;
    let (fg, fb) = (flush_error(dtype, x, e_got), flush_error(dtype, x, e_best));
    match metric {
        Metric::L2 => {
            2.0 * (d + 2.0) * U * (norm2(x) + norm2(e_got) + norm2(e_best)) + 2.0 * (fg + fb) + 4.0 * underflow(d)
        }
        Metric::Cosine => {
            // The dot product's absolute error, relative to the norms; and an entry's squared
            // norm below the normal range is off by up to `underflow` (relative: / ‖e‖²).
            let rel = |f: f64, e: &[f64]| {
                let den = (norm2(x) * norm2(e)).sqrt();
                if den == 0.0 {
                    0.0
                } else {
                    (f + underflow(d)) / den + underflow(d) / norm2(e)
                }
            };
            (3.0 * d + 8.0) * U + rel(fg, e_got) + rel(fb, e_best)
        }
    }
}

/// Whether two entries hold the same bits (`+0.0` and `−0.0` differ, which can matter to bf16).
fn same_entry(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Checks an argmin engine against the reference: `indices` `[N]` (and, if given, `distances`
/// `[N]`) for queries `x` `[N, D]` and the entries of `codebook` (build one from your own
/// entries with [`Codebook::new`]; its metric says L2 or cosine).
///
/// **Indices.** Equal to the reference's (the lowest index of the exact minimum), or else a
/// near-tie: with `u = 2⁻²⁴`, the chosen entry `ĝ` may be worse than the reference's `k*` by at
/// most `2(D + 2)·u·(‖x‖² + ‖e_ĝ‖² + ‖e_k*‖²)` in squared distance (L2) or `(3D + 8)·u` in
/// cosine — the bound [`crate::argmin`] documents for an f32 FMA evaluation — plus, for
/// `bf16`, what its flushed subnormals can move a dot product, and an absolute `(2D + 2)·2⁻¹⁴⁹`
/// per score for results below the normal range. Exact distances are f64 (cosine: 0 for a zero
/// vector, including an entry whose f32 squared norm underflows to 0, as the contract says).
/// An index `ĝ` is never accepted when a lower-indexed entry holds exactly the same values:
/// every arithmetic scores the two alike, so ties → lowest index applies. Accepted differences count as [`Report::near_ties`] (strictly worse) or
/// [`Report::exact_ties`] (exactly as near).
///
/// **Distances** of the chosen entries: within `2(D + 3)·u·(‖x‖² + ‖e‖²)` of the exact
/// `‖x − e‖²` (this admits the expanded `‖x‖² − 2x·e + ‖e‖²` form as well as the direct sum),
/// or within `(2D + 6)·u` of the exact `1 − cos` (cosine), plus the same underflow allowance
/// (for cosine also relative to `‖x‖²` and `‖e‖²`, whose f32 values lose bits when subnormal).
///
/// Fails on the first row beyond that, on an index out of range, on lengths that don't
/// match, and when the reference rejects `x` (NaN or `±∞`).
///
/// ```
/// use vistok::argmin::{Codebook, Metric};
/// use vistok::testing::check_argmin;
/// use vistok::View;
/// // Entries 0 and 1 are equally near x; 2 is far; 3 duplicates 0.
/// let e = [1.0f32, 2.0, 1.0, 3.0, -5.0, 0.0, 1.0, 2.0];
/// let cb = Codebook::new(View::new(&e, &[4, 2])?, Metric::L2)?;
/// let x = [1.0f32, 2.5];
/// assert!(check_argmin(&cb, &x, &[0], Some(&[0.25])).is_ok());
/// let r = check_argmin(&cb, &x, &[1], None).unwrap(); // an exact tie broken the other way
/// assert_eq!((r.near_ties, r.exact_ties), (0, 1));
/// assert!(check_argmin(&cb, &x, &[2], None).is_err()); // far worse: a bug
/// assert!(check_argmin(&cb, &x, &[3], None).is_err()); // a duplicate of 0: 0 must win
/// assert!(check_argmin(&cb, &x, &[0], Some(&[0.3])).is_err()); // wrong distance
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn check_argmin<T: Float>(
    codebook: &Codebook<T>,
    x: &[T],
    indices: &[u32],
    distances: Option<&[f32]>,
) -> Result<Report, Mismatch> {
    let f = Family::Argmin;
    let (d, k) = (codebook.dim(), codebook.len());
    if !x.len().is_multiple_of(d) || indices.len() != x.len() / d {
        return Err(input(f, format!("{} indices for x of {} elements and D = {d}", indices.len(), x.len())));
    }
    let n = indices.len();
    if let Some(dist) = distances {
        if dist.len() != n {
            return Err(input(f, format!("{} distances for {n} rows", dist.len())));
        }
    }
    let mut want = vec![0u32; n];
    View::new(x, &[n, d])
        .and_then(|xv| reference::argmin(codebook, xv, ViewMut::new(&mut want, &[n])?, None))
        .map_err(|e| input(f, format!("the reference rejects the input: {e}")))?;
    let metric = codebook.metric();
    let entries = codebook.entries();
    let entry = |i: u32| &entries[i as usize * d..][..d];
    let wide = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| a as f64).collect() };
    let mut report = Report { compared: n, ..Report::default() };
    for (r, (&g, &w)) in indices.iter().zip(&want).enumerate() {
        if g as usize >= k {
            return Err(output(f, r, format!("indices[{r}] = {g} is out of range for {k} entries")));
        }
        let xf: Vec<f32> = x[r * d..][..d].iter().map(|v| v.to_f32()).collect();
        let xr = wide(&xf);
        if g != w {
            // Bitwise-equal entries get equal scores from any arithmetic: the lowest must win.
            if let Some(j) = (0..g).find(|&j| same_entry(entry(j), entry(g))) {
                return Err(output(
                    f,
                    r,
                    format!("indices[{r}] = {g} but entry {j} is identical to it: ties go to the lowest index"),
                ));
            }
            let (eg, ew) = (wide(entry(g)), wide(entry(w)));
            let worse = match metric {
                Metric::L2 => {
                    reference::argmin::distance(metric, &xr, entry(g))
                        - reference::argmin::distance(metric, &xr, entry(w))
                }
                Metric::Cosine => cosine(&xr, entry(w)) - cosine(&xr, entry(g)),
            };
            let tol = index_tolerance(metric, T::DTYPE, &xr, &eg, &ew);
            if worse > tol {
                return Err(output(
                    f,
                    r,
                    format!(
                        "indices[{r}] = {g} but the reference gives {w}: entry {g} is {worse:e} worse \
                         ({metric:?}), beyond the near-tie tolerance {tol:e}"
                    ),
                ));
            }
            if worse > 0.0 {
                report.near_ties += 1;
            } else {
                report.exact_ties += 1;
            }
        }
        if let Some(dist) = distances {
            let e = entry(g);
            let ew = wide(e);
            let dd = d as f64;
            let (exact, tol, alt) = match metric {
                Metric::L2 => {
                    let s = reference::argmin::distance(metric, &xr, e);
                    (s, 2.0 * (dd + 3.0) * U * (norm2(&xr) + norm2(&ew)) + 4.0 * underflow(dd), s)
                }
                Metric::Cosine => {
                    let s = reference::argmin::distance(metric, &xr, e);
                    let den = (norm2(&xr) * norm2(&ew)).sqrt();
                    let uf = if den == 0.0 {
                        0.0
                    } else {
                        4.0 * underflow(dd) * (1.0 / den + 1.0 / norm2(&xr) + 1.0 / norm2(&ew))
                    };
                    // A vector whose f32 squared norm underflows is a zero vector: distance 1.
                    let zero = norm2_f32(&xf) == 0.0 || norm2_f32(e) == 0.0;
                    (s, (2.0 * dd + 6.0) * U + uf, if zero { 1.0 } else { s })
                }
            };
            let got = dist[r] as f64;
            let off = (got - exact).abs().min((got - alt).abs());
            if off.is_nan() || off > tol {
                return Err(output(
                    f,
                    r,
                    format!(
                        "distances[{r}] = {got:e} for entry {g}, exact {exact:e}: off by {off:e}, tolerance {tol:e}"
                    ),
                ));
            }
        }
    }
    Ok(report)
}
