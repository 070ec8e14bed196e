//! Codebook argmin: the nearest codebook entry of every vector (L2 or cosine), code lookup and
//! residual quantization — the vector-quantization step of VQGAN / LlamaGen / ViT-VQGAN /
//! RQ-VAE style tokenizers. The `N × K` distance matrix is never written: scores are computed
//! tile by tile in registers and reduced to a running (best score, index) per row.
//!
//! # Contract
//! - `x` `[..., D]` (any leading dims, flattened to `N` rows), codebook `[K, D]`, both `f32`,
//!   `f16` or `bf16` (the same type); indices `[...]` (`u32`), optional distances `[...]`
//!   (`f32`). `K ≥ 1`, `D ≥ 1`, `K ≤ 2³²`. `N = 0` is fine and writes nothing.
//! - [`Metric::L2`]: the entry minimising `‖x − e‖²`. [`Metric::Cosine`]: the entry maximising
//!   `x·e / (‖x‖‖e‖)`, where a zero-norm `x` or `e` has cosine similarity 0 (so a zero `x`
//!   picks entry 0, and a zero entry scores 0 against every `x`).
//! - Ties go to the lowest index. NaN or ±∞ in the codebook is an [`Error::NonFinite`] from
//!   [`Codebook::new`] (also a squared norm `‖e_k‖²` that overflows f32); NaN or ±∞ in `x` is an
//!   [`Error::NonFinite`] from [`Codebook::argmin`] naming the first such element, found by a
//!   check before anything is written.
//! - Deterministic: the same indices on every run, for every thread count and every
//!   [`Backend::CpuIsa`] level.
//!
//! # The arithmetic (cpu, and the cuda f32 path to come, bit for bit)
//! Everything is f32; inputs are widened exactly. Per code `k` the prepared codebook holds
//! `n_k = ‖e_k‖²` — an FMA chain over `d` ascending starting from `+0`, `n ← fma(e_d, e_d, n)` —
//! and from it `h_k = 0.5·n_k` (L2) or `c_k = −(1 / sqrt(n_k))` with correctly rounded `sqrt`
//! and division (cosine; `c_k = 0` when `n_k = 0`). Per row and code:
//! - `p_k = ⟨x, e_k⟩`, the FMA chain `p ← fma(x_d, e_kd, p)` over `d = 0, 1, …, D−1` from `+0`
//!   (one rounding per step, in exactly this order, whatever the SIMD width);
//! - the score `s_k = h_k − p_k` (L2; `= (‖e_k‖² − 2⟨x, e_k⟩)/2`, since `‖x‖²` is the same for
//!   every `k`) or `s_k = p_k · c_k` (cosine), each rounded once;
//! - the index is the lowest `k` with the least score. Formally: scan `k = 0, 1, …` with
//!   `best = +∞, index = 0`, and take `k` when `s_k < best` — so a NaN score never wins, and a
//!   row whose scores all overflow gets index 0.
//!
//! **bf16** inputs follow the same chain with two changes, which are what AVX-512 BF16's
//! `vdpbf16ps` does (and what PTX `fma.rn.ftz.f32` does): subnormal inputs are read as zero, and
//! a partial sum whose rounded value is subnormal becomes a zero of the same sign. (`h_k`, `c_k`
//! and the distances use the plain f32 rule.) The cpu backend uses `vdpbf16ps` where the CPU has
//! it and the same chain in plain FMAs elsewhere, so the indices are the same on every ISA. The
//! sign of a zero `p_k` is not specified (it never changes an index).
//!
//! The optional distance of the chosen entry is recomputed from `x` and `e` (not from the
//! score), in f32: L2 `Σ_d (x_d − e_d)²` as an FMA chain over `d` ascending (so it is exactly 0
//! when `x` equals the entry); cosine `1 − clamp(p / (sqrt(‖x‖²)·sqrt(‖e‖²)), −1, 1)` with each
//! FMA chain as above and each operation rounded once (`1 − 0` when either norm is 0).
//!
//! # Against the exact answer (the reference backend)
//! [`Backend::Reference`] is a naive f64 double loop. The f32 scores carry rounding error, so an
//! index may differ from the reference's where two entries are nearly tied. The bound: with
//! `u = 2⁻²⁴`, the entry `k̂` chosen here and the exact best `k*` satisfy
//! `‖x − e_k̂‖² − ‖x − e_k*‖² ≤ 2(D + 2)·u·(‖x‖² + ‖e_k̂‖² + ‖e_k*‖²)` (L2; each score is off by at
//! most `(D + 1)·u·(‖x‖²/2 + ‖e_k‖²)` from an FMA chain of `D` steps plus the subtraction), and
//! `cos(x, e_k*) − cos(x, e_k̂) ≤ (3D + 8)·u` (cosine). For bf16, each `p_k` may further move by
//! `D·2⁻¹²⁶` (flushed partial sums) plus `|x_d·e_kd|` for every term with a subnormal factor. Distances
//! written by the cpu backend are within `(D + 3)·u` (relative, L2) or `(2D + 6)·u` (absolute,
//! cosine) of the exact distance of the chosen entry. The bounds assume no overflow or
//! underflow: values whose squares overflow f32 (`|v| ≳ 1.8e19`) give scores of ±∞ or NaN
//! (the index is then valid and deterministic but not meaningful; a NaN distance's sign and
//! payload are not specified: the cpu gives x86's default NaN, the cuda backend the GPU's
//! canonical one — every other distance bit is the same), products below `2⁻¹²⁶`
//! lose precision, and for cosine an entry whose squared norm underflows to 0 in f32 (every
//! `|e_d| ≲ 1e-19`) is a zero vector.
//!
//! ```
//! use vistok::argmin::{Codebook, Metric};
//! use vistok::{Backend, View, ViewMut};
//! // Four 2-d codes; entries 1 and 3 are equal.
//! let codes = [0.0f32, 0.0, /* 1 */ 1.0, 1.0, /* 2 */ -1.0, 2.0, /* 3 */ 1.0, 1.0];
//! let cb = Codebook::new(View::new(&codes, &[4, 2])?, Metric::L2)?;
//! let x = [0.9f32, 1.2, /* row 1 */ -0.1, 0.1, /* row 2 */ 1.0, 1.0];
//! let (mut idx, mut dist) = ([0u32; 3], [0.0f32; 3]);
//! cb.argmin(Backend::Cpu, View::new(&x, &[3, 2])?, ViewMut::new(&mut idx, &[3])?,
//!           Some(ViewMut::new(&mut dist, &[3])?))?;
//! assert_eq!(idx, [1, 0, 1]); // the tie between 1 and 3 goes to 1
//! assert_eq!(dist[2], 0.0);
//! // Back to vectors.
//! let mut q = [0.0f32; 6];
//! cb.lookup(Backend::Cpu, View::new(&idx, &[3])?, ViewMut::new(&mut q, &[3, 2])?)?;
//! assert_eq!(q, [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
//! # Ok::<(), vistok::Error>(())
//! ```

mod residual;

pub use residual::ResidualCodebooks;

use crate::dtype::{DType, Float};
use crate::error::{Error, Family, Result};
use crate::view::{View, ViewMut};
use crate::Backend;
use std::marker::PhantomData;

/// What "nearest" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Least squared Euclidean distance `‖x − e‖²`.
    L2,
    /// Greatest cosine similarity `x·e / (‖x‖‖e‖)` (0 for a zero-norm vector). Distances are
    /// reported as `1 − cos`.
    Cosine,
}

/// Codes per group of the packed layout: one 512-bit vector of f32.
pub(crate) const GROUP: usize = 16;
/// The packed codebook is padded to a multiple of this many codes, so that every tile width the
/// kernels use (1, 2 or 4 groups) divides it.
pub(crate) const PAD: usize = 64;
const _: () = assert!(PAD.is_multiple_of(4 * GROUP));

/// The codebook data every backend reads, independent of the input type.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub metric: Metric,
    pub k: usize,
    pub d: usize,
    /// `[K, D]`, the entries widened exactly to f32.
    pub rows: Vec<f32>,
    /// `n_k = ‖e_k‖²` (f32 FMA chain), `[K]`.
    pub norms: Vec<f32>,
    /// Per padded code: `h_k = 0.5·n_k` (L2) or `c_k` (cosine); 0 for padding codes.
    pub bias: Vec<f32>,
    /// `[K_pad / 16][D][16]`: for each group of 16 codes, dimension-major, codes in lanes.
    pub tiles: Vec<f32>,
    /// bf16 codebooks only: `[K_pad / 16][⌈D/2⌉][16]` u32 lanes holding the pair
    /// `(e_2j, e_2j+1)` with `e_2j` in the **high** half (`vdpbf16ps` takes the high half
    /// first); an odd `D` is padded with 0.
    pub tiles_bf16: Vec<u32>,
}

/// The squared norm `‖v‖²` as the contract's f32 FMA chain.
#[inline]
pub(crate) fn norm2(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |n, &e| e.mul_add(e, n))
}

/// The cosine score scale `c = −1/sqrt(n)`, 0 for `n = 0`.
#[inline]
pub(crate) fn cosine_scale(n: f32) -> f32 {
    if n == 0.0 {
        0.0
    } else {
        -(1.0 / n.sqrt())
    }
}

/// The distance the contract reports for `x` against `e` (f32).
#[inline]
pub(crate) fn distance(metric: Metric, x: &[f32], e: &[f32], e_norm: f32) -> f32 {
    match metric {
        Metric::L2 => x.iter().zip(e).fold(0.0f32, |acc, (&a, &b)| {
            let t = a - b;
            t.mul_add(t, acc)
        }),
        Metric::Cosine => {
            let xx = norm2(x);
            if xx == 0.0 || e_norm == 0.0 {
                return 1.0;
            }
            let p = x.iter().zip(e).fold(0.0f32, |acc, (&a, &b)| a.mul_add(b, acc));
            1.0 - (p / (xx.sqrt() * e_norm.sqrt())).clamp(-1.0, 1.0)
        }
    }
}

/// A codebook `[K, D]` prepared for repeated nearest-entry search: squared norms (L2) or
/// inverse norms (cosine) and a packed, code-interleaved copy for the SIMD micro-kernels are
/// computed once. `Send + Sync`: share one across threads.
///
/// See the [module docs](self) for the contract and the arithmetic.
#[derive(Debug, Clone)]
pub struct Codebook<T: Float> {
    prep: Prepared,
    _t: PhantomData<fn() -> T>,
}

pub(crate) fn shape_error(msg: String) -> Error {
    Error::Shape { family: Family::Argmin, msg }
}

/// The first non-finite element of `v` (`[rows, d]`), as an error naming `what[row, col]`.
fn check_finite<T: Float>(what: &str, v: &[T], d: usize) -> Result<()> {
    match crate::cpu::argmin::first_non_finite(v) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite {
            family: Family::Argmin,
            what: format!("{what}[{}, {}] (element {i}) = {}", i / d, i % d, v[i].to_f32()),
        }),
    }
}

/// Rows of a `[..., D]` view whose last dim must be `d`; returns N.
fn rows_of(what: &str, dims: &[usize], d: usize) -> Result<usize> {
    if dims.len() < 2 || dims[dims.len() - 1] != d {
        return Err(shape_error(format!("{what} dims {dims:?}, expected [..., {d}] (rank ≥ 2)")));
    }
    Ok(dims[..dims.len() - 1].iter().product())
}

/// Checks that `got` (an output's dims) equals `want`.
fn same_dims(what: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(shape_error(format!("{what} dims {got:?}, expected {want:?}")));
    }
    Ok(())
}

impl<T: Float> Codebook<T> {
    /// Prepares `codebook` `[K, D]` for `metric`.
    ///
    /// Errors: a rank other than 2, `K = 0` or `D = 0` ([`Error::Shape`]), `K > 2³²`
    /// ([`Error::Overflow`]), a NaN / ±∞ entry or an entry whose squared norm overflows f32
    /// ([`Error::NonFinite`], naming the first).
    ///
    /// ```
    /// use vistok::argmin::{Codebook, Metric};
    /// use vistok::{bf16, View};
    /// let e: Vec<bf16> = [1.0f32, 0.0, 0.0, 1.0, 0.6, 0.8].map(bf16::from_f32).to_vec();
    /// let cb = Codebook::new(View::new(&e, &[3, 2])?, Metric::Cosine)?;
    /// assert_eq!((cb.len(), cb.dim(), cb.metric()), (3, 2, Metric::Cosine));
    /// assert!(Codebook::new(View::new(&[1.0f32, f32::NAN], &[1, 2])?, Metric::L2).is_err());
    /// assert!(Codebook::new(View::new(&[0.0f32; 0], &[0, 2])?, Metric::L2).is_err());
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn new(codebook: View<'_, T>, metric: Metric) -> Result<Self> {
        let dims = codebook.dims();
        if dims.len() != 2 {
            return Err(shape_error(format!("codebook dims {dims:?}, expected [K, D]")));
        }
        let (k, d) = (dims[0], dims[1]);
        if k == 0 || d == 0 {
            return Err(shape_error(format!("codebook dims {dims:?}: K and D must be at least 1")));
        }
        if k as u64 > 1u64 << 32 {
            return Err(Error::Overflow {
                family: Family::Argmin,
                what: format!("K = {k} codes do not fit u32 indices"),
            });
        }
        let data = codebook.data();
        check_finite("codebook", data, d)?;
        let rows: Vec<f32> = data.iter().map(|v| v.to_f32()).collect();
        let norms: Vec<f32> = rows.chunks_exact(d).map(norm2).collect();
        if let Some(i) = norms.iter().position(|n| !n.is_finite()) {
            return Err(Error::NonFinite {
                family: Family::Argmin,
                what: format!("the squared norm of codebook row {i} (in f32)"),
            });
        }
        let k_pad = k.div_ceil(PAD) * PAD;
        let mut bias = vec![0.0f32; k_pad];
        for (b, &n) in bias.iter_mut().zip(&norms) {
            *b = match metric {
                Metric::L2 => 0.5 * n,
                Metric::Cosine => cosine_scale(n),
            };
        }
        let mut tiles = vec![0.0f32; k_pad * d];
        for (c, row) in rows.chunks_exact(d).enumerate() {
            let (g, l) = (c / GROUP, c % GROUP);
            for (j, &v) in row.iter().enumerate() {
                tiles[(g * d + j) * GROUP + l] = v;
            }
        }
        let mut tiles_bf16 = vec![];
        if T::DTYPE == DType::BF16 {
            let bits: &[u16] = bytemuck::cast_slice(data);
            let pairs = d.div_ceil(2);
            tiles_bf16 = vec![0u32; k_pad * pairs];
            for (c, row) in bits.chunks_exact(d).enumerate() {
                let (g, l) = (c / GROUP, c % GROUP);
                for j in 0..pairs {
                    let lo = row.get(2 * j + 1).copied().unwrap_or(0);
                    tiles_bf16[(g * pairs + j) * GROUP + l] = (row[2 * j] as u32) << 16 | lo as u32;
                }
            }
        }
        Ok(Codebook { prep: Prepared { metric, k, d, rows, norms, bias, tiles, tiles_bf16 }, _t: PhantomData })
    }

    /// Number of entries, K.
    #[allow(clippy::len_without_is_empty)] // K ≥ 1 always
    pub fn len(&self) -> usize {
        self.prep.k
    }

    /// Dimension of an entry, D.
    pub fn dim(&self) -> usize {
        self.prep.d
    }

    /// The metric the codebook was prepared for.
    pub fn metric(&self) -> Metric {
        self.prep.metric
    }

    /// The entries widened to f32 (exactly), `[K, D]` row-major.
    pub fn entries(&self) -> &[f32] {
        &self.prep.rows
    }

    pub(crate) fn prepared(&self) -> &Prepared {
        &self.prep
    }

    /// Nearest entry of every row of `x` `[..., D]`: `indices` `[...]` and, if given, its
    /// distance `dist` `[...]` (`‖x − e‖²` or `1 − cos`, see the module docs).
    ///
    /// Errors: dims that don't match (naming which), NaN / ±∞ in `x` (naming the first, before
    /// anything is written), or a forced [`Backend::CpuIsa`] level this CPU lacks.
    ///
    /// ```
    /// use vistok::argmin::{Codebook, Metric};
    /// use vistok::{Backend, View, ViewMut};
    /// let codes = [1.0f32, 0.0, 0.0, 1.0, -1.0, 0.0];
    /// let cb = Codebook::new(View::new(&codes, &[3, 2])?, Metric::Cosine)?;
    /// // A [2, 2, 2] batch: four vectors.
    /// let x = [5.0f32, 1.0, 0.0, 0.0, -0.1, -0.3, 2.0, 2.0];
    /// let mut idx = [9u32; 4];
    /// cb.argmin(Backend::Cpu, View::new(&x, &[2, 2, 2])?, ViewMut::new(&mut idx, &[2, 2])?, None)?;
    /// // A zero vector has cosine 0 with everything: the tie goes to entry 0; [2, 2] ties 0 and 1.
    /// assert_eq!(idx, [0, 0, 2, 0]);
    /// let bad = [0.0f32, f32::INFINITY];
    /// let e = cb.argmin(Backend::Cpu, View::new(&bad, &[1, 2])?, ViewMut::new(&mut idx[..1], &[1])?, None);
    /// assert!(e.unwrap_err().to_string().contains("x[0, 1]"));
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn argmin(
        &self,
        backend: Backend,
        x: View<'_, T>,
        mut indices: ViewMut<'_, u32>,
        dist: Option<ViewMut<'_, f32>>,
    ) -> Result<()> {
        let d = self.prep.d;
        let n = rows_of("x", x.dims(), d)?;
        let lead = &x.dims()[..x.dims().len() - 1];
        same_dims("indices", indices.dims(), lead)?;
        let mut dist = dist;
        if let Some(dv) = &dist {
            same_dims("dist", dv.dims(), lead)?;
        }
        let isa = match backend {
            Backend::Reference => None,
            Backend::Cpu => Some(crate::cpu::Isa::detect()),
            Backend::CpuIsa(isa) => Some(isa.check()?),
        };
        check_finite("x", x.data(), d)?;
        if n == 0 {
            return Ok(());
        }
        let dist = dist.as_mut().map(|v| v.data_mut());
        match isa {
            None => crate::reference::argmin::argmin(&self.prep, x.data(), indices.data_mut(), dist),
            Some(isa) => crate::cpu::argmin::argmin(&self.prep, isa, x.data(), indices.data_mut(), dist),
        }
        Ok(())
    }

    /// Entries by index: `out[i, :] = codebook[indices[i], :]`, rounded to `O` (exact when `O`
    /// is `T` or f32). `indices` `[...]`, `out` `[..., D]`.
    ///
    /// Errors: dims that don't match, an index `≥ K` ([`Error::Invalid`], naming the first,
    /// before anything is written), or a forced [`Backend::CpuIsa`] level this CPU lacks.
    ///
    /// ```
    /// use vistok::argmin::{Codebook, Metric};
    /// use vistok::{Backend, View, ViewMut};
    /// let cb = Codebook::new(View::new(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2])?, Metric::L2)?;
    /// let mut out = [0.0f32; 6];
    /// cb.lookup(Backend::Cpu, View::new(&[1u32, 0, 1], &[3])?, ViewMut::new(&mut out, &[3, 2])?)?;
    /// assert_eq!(out, [3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    /// let e = cb.lookup(Backend::Cpu, View::new(&[0u32, 2, 0], &[3])?, ViewMut::new(&mut out, &[3, 2])?);
    /// assert!(e.unwrap_err().to_string().contains("indices[1] = 2"));
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn lookup<O: Float>(&self, backend: Backend, indices: View<'_, u32>, mut out: ViewMut<'_, O>) -> Result<()> {
        let d = self.prep.d;
        let mut want = indices.dims().to_vec();
        want.push(d);
        same_dims("lookup output", out.dims(), &want)?;
        if let Backend::CpuIsa(isa) = backend {
            isa.check()?;
        }
        self.check_indices("indices", indices.data())?;
        let (ids, out) = (indices.data(), out.data_mut());
        match backend {
            Backend::Reference => crate::reference::argmin::lookup(&self.prep, ids, out),
            Backend::Cpu | Backend::CpuIsa(_) => crate::cpu::argmin::lookup(&self.prep, ids, out),
        }
        Ok(())
    }

    /// An error naming the first index `≥ K`, if any.
    pub(crate) fn check_indices(&self, what: &str, ids: &[u32]) -> Result<()> {
        match ids.iter().position(|&i| i as usize >= self.prep.k) {
            None => Ok(()),
            Some(i) => Err(Error::Invalid {
                family: Family::Argmin,
                msg: format!("{what}[{i}] = {} is out of range for a codebook of {} entries", ids[i], self.prep.k),
            }),
        }
    }
}
