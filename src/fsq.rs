//! Finite scalar quantization (FSQ): tokens → integer codebook ids → codes.
//!
//! # Contract
//! - Input `z` `[N, D]` (tokens × dimensions, dimensions contiguous), `f32`, `f16` or `bf16`
//!   (f16 / bf16 widen to f32 exactly first). Levels `L_0..L_{D−1}`, each in `2..=2^24` (so every
//!   level is exact in f32), with `Π L_i ≤ 2^32` so ids fit `u32`. Output ids `[N]` (`u32`).
//! - This is vector-quantize-pytorch's `FSQ` (`finite_scalar_quantization.py`): `bound` computes
//!   `half_l = (L−1)(1 + 1e−3)/2`, `offset = 0.5` if `L` is even else `0`,
//!   `shift = atanh(offset / half_l)` and `tanh(z + shift)·half_l − offset`; `quantize` rounds
//!   that (`torch.round`: half to even) and divides by `half_width = ⌊L/2⌋`; `codes_to_indices`
//!   maps a code to `level = ẑ·half_width + half_width ∈ [0, L)` and sums `level_i·basis_i` with
//!   `basis_i = Π_{j<i} L_j` (dimension 0 least significant; the id is built from levels, not
//!   from codes). `indices_to_codes` inverts it: `level_i = (id / basis_i) mod L_i`,
//!   `code_i = (level_i − half_width_i) / half_width_i`.
//! - Levels are clamped to `[0, L−1]`. For `L ≤ 1000` the clamp never acts on the exact
//!   formula; above that the `1e−3` margin lets vector-quantize-pytorch round to `L` (an invalid
//!   code), which the clamp turns into `L−1`.
//! - **The f32 definition.** The fast backends (cpu at every ISA, and cuda) evaluate, per
//!   element and with the per-dimension constants of [`FsqDim`] precomputed once:
//!   `t = z + shift` (f32 add), `y = `[`tanh`]`(t)`, `v = fma(y, half_l, −offset)`,
//!   `level = clamp(round_ties_even(v) + half_width, 0, L−1)`, then `id = Σ level_i·basis_i` in
//!   `u32` (exact: it is below `Π L_i ≤ 2^32`). [`FsqDim::level`] is that definition, so all
//!   fast backends give identical ids, for any thread count.
//! - Against the f64 [reference](crate::reference::fsq) (which uses `f64::tanh` and the exact
//!   formula), an id may differ only where the reference's pre-rounding value is within a few
//!   f32 ulps of a `k + 0.5` boundary: [`tanh`] is within 2.6e−7 of `tanh` (see its docs) and
//!   the rest is a handful of f32 roundings. On values uniform in `[−4, 4]` the tests see no
//!   difference in 1.8 million; on values planted within an ulp of a boundary, about one in
//!   twenty differs.
//! - NaN anywhere in `z` is an [`Error::NonFinite`] naming the first NaN (lowest flat index) as
//!   `z[row, col]`; ±∞ saturate like any huge value. On error the ids are unspecified. `N = 0`
//!   is allowed (nothing is written).
//! - Decode writes codes `[N, D]` computed as the f32 `(level − half_width) / half_width`
//!   (correctly rounded), then rounded to the output dtype (nearest, ties to even); an id
//!   `≥ Π L_i` is an error naming its index.
//! - Round trips: codes are the quantizer's *outputs*, so `encode(decode(id))` is not the id
//!   in general (encode bounds its input with tanh first: the code `0.75` of `L = 8`, level 7, read
//!   as an input encodes to level 6). What holds, and is tested exhaustively for small
//!   codebooks, is (a) codes → ids (vector-quantize-pytorch's `codes_to_indices`,
//!   `Σ (code_i·⌊L_i/2⌋ + ⌊L_i/2⌋)·basis_i`) inverts decode exactly for L ≤ 16 and the published
//!   level lists, as tested (for large L the f32 code can lose the level: with L = 1002, levels
//!   246, 248 and 250 do not round-trip), and (b) the input whose
//!   pre-rounding value is exactly a code's integer `code_i·⌊L_i/2⌋` (the middle of its rounding
//!   cell, `atanh((q + offset)/half_l) − shift`) encodes to that code's id, on every backend and
//!   from f32, f16 and bf16.
//! - Statistics ([`Fsq::statistics`]): per-dimension level counts and the id histogram of a
//!   batch of ids, in one pass, as integer counts — identical on every backend and thread count.
//!
//! ```
//! use vistok::{Backend, Fsq, View, ViewMut};
//! let fsq = Fsq::new(&[8, 5, 5, 5])?;
//! assert_eq!(fsq.codebook_size(), 1000);
//! let z = [0.0f32, 0.0, 0.0, 0.0, 10.0, -10.0, 0.3, -0.3];
//! let mut ids = [0u32; 2];
//! fsq.encode(Backend::Cpu, View::new(&z, &[2, 4])?, ViewMut::new(&mut ids, &[2])?)?;
//! // z = 0: level 4 (even L: the shift makes tanh(shift)·half_l − 0.5 = 0) and 2, 2, 2.
//! // z = (10, −10, 0.3, −0.3): levels 7, 0, round(2.002·tanh(0.3)) + 2 = 3, 1.
//! assert_eq!(ids, [4 + 2 * 8 + 2 * 40 + 2 * 200, 7 + 0 * 8 + 3 * 40 + 1 * 200]);
//! let mut codes = [0.0f32; 8];
//! fsq.decode(Backend::Cpu, View::new(&ids, &[2])?, ViewMut::new(&mut codes, &[2, 4])?)?;
//! assert_eq!(codes, [0.0, 0.0, 0.0, 0.0, 0.75, -1.0, 0.5, -0.5]);
//! # Ok::<(), vistok::Error>(())
//! ```

use crate::dtype::Float;
use crate::error::{Error, Family, Result};
use crate::view::{View, ViewMut};
use crate::Backend;

/// vistok's f32 `tanh`, the one every fast FSQ backend evaluates, in this exact operation order.
///
/// An odd rational minimax approximation `x·P(x²)/Q(x²)` of degrees 13/6 (the coefficients of
/// Eigen's / XLA's fast `tanh`), on `x` clamped to ±7.90531110763549805 (beyond which `tanh`
/// rounds to ±1 in f32). With `c = clamp(x)` and `s = c·c`:
/// `p = fma(s, α13, α11)`, then `p = fma(s, p, α_k)` for `k = 9, 7, 5, 3, 1`, `p = p·c`;
/// `q = fma(s, β6, β4)`, `q = fma(s, q, β2)`, `q = fma(s, q, β0)`; the result is `p / q`
/// (IEEE division). The clamp is `max(x, −C)` then `min(·, C)` (`f32::clamp`; NaN never reaches it). Every operation is correctly
/// rounded, so any hardware with FMA reproduces it bit for bit.
///
/// Accuracy (measured against `f64::tanh` by `tests/fsq.rs` over a sweep of every 97th f32 in
/// `[0, 9]`, and asserted there): absolute error ≤ 2.6e−7 (below 3e−7 asserted), and within
/// 4.4 ulps of the result (below 5 asserted) wherever `|x| ≥ 1e−35` (below that `x·α1` is
/// subnormal, so only the absolute bound holds). Odd (`tanh(−x) = −tanh(x)`, `tanh(±0) = ±0`),
/// `|tanh(x)| ≤ 1 − 2^−24` for every f32 (checked exhaustively over `[0, CLAMP]` by an ignored
/// test in `tests/fsq.rs`; the SIMD kernels rely on it to skip level clamps that cannot act);
/// `±∞` give the value at the clamp. NaN returns NaN. Not monotonic at the ulp level.
///
/// ```
/// let t = vistok::fsq::tanh(0.5);
/// assert!((t as f64 - 0.5f64.tanh()).abs() < 3e-7);
/// assert_eq!(vistok::fsq::tanh(100.0), vistok::fsq::tanh(8.0));
/// assert_eq!(vistok::fsq::tanh(-0.0).to_bits(), (-0.0f32).to_bits());
/// ```
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    tanh_clamped(x.clamp(-tanh_coef::CLAMP, tanh_coef::CLAMP))
}

/// [`tanh`] after the clamp (`|c| ≤ CLAMP`, not NaN): the polynomials and the division.
#[inline(always)]
pub(crate) fn tanh_clamped(c: f32) -> f32 {
    use tanh_coef::*;
    let s = c * c;
    let mut p = s.mul_add(A13, A11);
    p = s.mul_add(p, A9);
    p = s.mul_add(p, A7);
    p = s.mul_add(p, A5);
    p = s.mul_add(p, A3);
    p = s.mul_add(p, A1);
    p *= c;
    let mut q = s.mul_add(B6, B4);
    q = s.mul_add(q, B2);
    q = s.mul_add(q, B0);
    p / q
}

/// The coefficients of [`tanh`] (shared with the SIMD and CUDA kernels), as Eigen and XLA
/// print them; each literal rounds to the f32 used.
#[allow(clippy::excessive_precision)]
pub mod tanh_coef {
    /// Inputs are clamped to ±`CLAMP`.
    pub const CLAMP: f32 = 7.905_311_107_635_498_05;
    /// Numerator coefficient of `x`.
    pub const A1: f32 = 4.893_524_558_917_86e-3;
    /// Numerator coefficient of `x³`.
    pub const A3: f32 = 6.372_619_288_754_36e-4;
    /// Numerator coefficient of `x⁵`.
    pub const A5: f32 = 1.485_722_357_179_79e-5;
    /// Numerator coefficient of `x⁷`.
    pub const A7: f32 = 5.122_297_090_371_14e-8;
    /// Numerator coefficient of `x⁹`.
    pub const A9: f32 = -8.604_671_522_137_35e-11;
    /// Numerator coefficient of `x¹¹`.
    pub const A11: f32 = 2.000_187_904_824_77e-13;
    /// Numerator coefficient of `x¹³`.
    pub const A13: f32 = -2.760_768_477_423_55e-16;
    /// Denominator constant term.
    pub const B0: f32 = 4.893_525_185_543_85e-3;
    /// Denominator coefficient of `x²`.
    pub const B2: f32 = 2.268_434_632_439_00e-3;
    /// Denominator coefficient of `x⁴`.
    pub const B4: f32 = 1.185_347_056_866_54e-4;
    /// Denominator coefficient of `x⁶`.
    pub const B6: f32 = 1.198_258_394_667_02e-6;
}

/// vector-quantize-pytorch's `eps` in `bound`: the margin that keeps `tanh·half_l` off the
/// outermost half-integers.
pub const EPS: f64 = 1e-3;

/// The largest level: every level (and `level − half_width`) is exact in f32.
pub const MAX_LEVEL: u32 = 1 << 24;

/// The precomputed f32 constants of one dimension (computed in f64, rounded to f32 once).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FsqDim {
    /// The number of levels `L`.
    pub levels: u32,
    /// `atanh(offset / half_l)`.
    pub shift: f32,
    /// `half_l = (L−1)(1 + EPS)/2`.
    pub half_l: f32,
    /// `0.5` for even `L`, `0` for odd.
    pub offset: f32,
    /// `⌊L/2⌋`, as f32 (exact).
    pub half_width: f32,
    /// `L − 1`, as f32 (exact).
    pub max_level: f32,
    /// `Π_{j<i} L_j`.
    pub basis: u32,
}

impl FsqDim {
    fn new(levels: u32, basis: u32) -> Self {
        let half_l = (levels - 1) as f64 * (1.0 + EPS) / 2.0;
        let offset = if levels.is_multiple_of(2) { 0.5 } else { 0.0 };
        FsqDim {
            levels,
            shift: (offset / half_l).atanh() as f32,
            half_l: half_l as f32,
            offset: offset as f32,
            half_width: (levels / 2) as f32,
            max_level: (levels - 1) as f32,
            basis,
        }
    }

    /// The level of `z` in this dimension: the f32 definition every fast backend follows (see
    /// the [module docs](self)). `z` must not be NaN (the kernels reject NaN first).
    ///
    /// ```
    /// let fsq = vistok::Fsq::new(&[4])?;
    /// let d = fsq.dims()[0];
    /// assert_eq!([d.level(-9.0), d.level(0.0), d.level(9.0)], [0, 2, 3]);
    /// # Ok::<(), vistok::Error>(())
    /// ```
    #[inline(always)]
    pub fn level(&self, z: f32) -> u32 {
        let t = (z + self.shift).clamp(-tanh_coef::CLAMP, tanh_coef::CLAMP);
        let v = tanh_clamped(t).mul_add(self.half_l, -self.offset);
        (v.round_ties_even() + self.half_width).max(0.0).min(self.max_level) as u32
    }
}

/// A validated FSQ codebook: build once from the levels, encode / decode many times.
///
/// See the [module docs](self) for the contract and an example.
#[derive(Debug, Clone, PartialEq)]
pub struct Fsq {
    levels: Vec<u32>,
    dims: Vec<FsqDim>,
    codebook_size: u64,
}

fn invalid(msg: String) -> Error {
    Error::Invalid { family: Family::Fsq, msg }
}

impl Fsq {
    /// Validates the levels and precomputes the per-dimension constants.
    ///
    /// Errors: no levels, a level below 2 or above [`MAX_LEVEL`], or a product of levels above
    /// `2^32` (ids would not fit `u32`).
    ///
    /// ```
    /// use vistok::Fsq;
    /// assert_eq!(Fsq::new(&[8, 8, 8, 5, 5, 5])?.codebook_size(), 64000);
    /// assert!(Fsq::new(&[8, 1, 5]).is_err());
    /// assert!(Fsq::new(&[1 << 16, 1 << 16]).is_ok()); // exactly 2^32 ids
    /// assert!(Fsq::new(&[1 << 16, 1 << 16, 2]).is_err());
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn new(levels: &[u32]) -> Result<Self> {
        if levels.is_empty() {
            return Err(invalid("no levels (need at least one dimension)".into()));
        }
        if let Some((i, &l)) = levels.iter().enumerate().find(|(_, l)| !(2..=MAX_LEVEL).contains(*l)) {
            return Err(invalid(format!("level {l} of dimension {i} is not in 2..={MAX_LEVEL}")));
        }
        let size = levels.iter().fold(1u64, |acc, &l| acc.saturating_mul(l as u64));
        if size > 1 << 32 {
            return Err(Error::Overflow {
                family: Family::Fsq,
                what: format!("codebook size (product of levels {levels:?}) exceeds 2^32 (u32 ids)"),
            });
        }
        // basis_i = Π_{j<i} L_j ≤ 2^32 / L_i ≤ 2^31: fits u32.
        let mut basis = 1u64;
        let mut dims = Vec::with_capacity(levels.len());
        for &l in levels {
            dims.push(FsqDim::new(l, basis as u32));
            basis *= l as u64;
        }
        Ok(Fsq { levels: levels.to_vec(), dims, codebook_size: size })
    }

    /// The levels, one per dimension.
    pub fn levels(&self) -> &[u32] {
        &self.levels
    }

    /// The number of dimensions `D`.
    pub fn dim(&self) -> usize {
        self.levels.len()
    }

    /// `Π L_i`: ids are in `0..codebook_size()`.
    pub fn codebook_size(&self) -> u64 {
        self.codebook_size
    }

    /// The per-dimension constants every fast backend uses.
    ///
    /// ```
    /// let d = vistok::Fsq::new(&[3, 4])?.dims().to_vec();
    /// assert_eq!((d[0].basis, d[1].basis, d[0].offset, d[1].offset), (1, 3, 0.0, 0.5));
    /// assert_eq!((d[0].half_width, d[1].half_width, d[0].shift), (1.0, 2.0, 0.0));
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn dims(&self) -> &[FsqDim] {
        &self.dims
    }

    fn tokens_of(&self, what: &str, dims: &[usize]) -> Result<usize> {
        match dims {
            [n, d] if *d == self.dim() => Ok(*n),
            _ => Err(Error::Shape {
                family: Family::Fsq,
                msg: format!("{what} dims {dims:?}, expected [N, {}]", self.dim()),
            }),
        }
    }

    fn check_ids(n: usize, dims: &[usize]) -> Result<()> {
        if dims != [n] {
            return Err(Error::Shape { family: Family::Fsq, msg: format!("ids dims {dims:?}, expected [{n}]") });
        }
        Ok(())
    }

    /// `z` `[N, D]` → ids `[N]` on a host backend. Errors if the dims disagree, if `z` holds a
    /// NaN ([`Error::NonFinite`] naming the first one), or if a forced [`Backend::CpuIsa`] level
    /// is not available.
    ///
    /// ```
    /// use vistok::{bf16, Backend, Fsq, View, ViewMut};
    /// let fsq = Fsq::new(&[5])?;
    /// let z = [bf16::from_f32(-1.0), bf16::from_f32(0.2), bf16::from_f32(f32::INFINITY)];
    /// let mut ids = [0u32; 3];
    /// fsq.encode(Backend::Reference, View::new(&z, &[3, 1])?, ViewMut::new(&mut ids, &[3])?)?;
    /// assert_eq!(ids, [0, 2, 4]); // round(2.002·tanh(−1)) = round(−1.52) = −2
    /// let bad = [0.5f32, f32::NAN];
    /// let e = fsq.encode(Backend::Cpu, View::new(&bad, &[2, 1])?, ViewMut::new(&mut ids[..2], &[2])?);
    /// assert_eq!(e.unwrap_err().to_string(), "fsq: z[1, 0] is not finite");
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn encode<T: Float>(&self, backend: Backend, z: View<'_, T>, mut ids: ViewMut<'_, u32>) -> Result<()> {
        let n = self.tokens_of("z", z.dims())?;
        Self::check_ids(n, ids.dims())?;
        match backend {
            Backend::Reference => crate::reference::fsq::encode(self, z.data(), ids.data_mut()),
            Backend::Cpu => crate::cpu::fsq::encode(self, crate::cpu::Isa::detect(), z.data(), ids.data_mut()),
            Backend::CpuIsa(isa) => crate::cpu::fsq::encode(self, isa.check()?, z.data(), ids.data_mut()),
        }
    }

    /// ids `[N]` → codes `[N, D]` on a host backend (exact: every backend gives the same bits).
    /// Errors if the dims disagree, if an id is `≥ codebook_size()` (naming the first), or if a
    /// forced [`Backend::CpuIsa`] level is not available.
    ///
    /// ```
    /// use vistok::{Backend, Fsq, View, ViewMut};
    /// let fsq = Fsq::new(&[3, 4])?;
    /// let mut codes = [0.0f32; 4];
    /// fsq.decode(Backend::Cpu, View::new(&[0u32, 11], &[2])?, ViewMut::new(&mut codes, &[2, 2])?)?;
    /// assert_eq!(codes, [-1.0, -1.0, 1.0, 0.5]);
    /// assert!(fsq.decode(Backend::Cpu, View::new(&[12u32], &[1])?, ViewMut::new(&mut codes[..2], &[1, 2])?).is_err());
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn decode<O: Float>(&self, backend: Backend, ids: View<'_, u32>, mut codes: ViewMut<'_, O>) -> Result<()> {
        let n = self.tokens_of("codes", codes.dims())?;
        Self::check_ids(n, ids.dims())?;
        match backend {
            Backend::Reference => crate::reference::fsq::decode(self, ids.data(), codes.data_mut()),
            Backend::Cpu => crate::cpu::fsq::decode(self, crate::cpu::Isa::detect(), ids.data(), codes.data_mut()),
            Backend::CpuIsa(isa) => crate::cpu::fsq::decode(self, isa.check()?, ids.data(), codes.data_mut()),
        }
    }

    /// Usage statistics of ids `[N]`: per-dimension level counts (when `Σ L_i ≤`
    /// [`STATS_MAX_BINS`]) and the id histogram (when `Π L_i ≤` [`STATS_MAX_BINS`]), in one
    /// pass. Integer counts, so the result is the same on every backend and thread count.
    /// Errors: `ids` not `[N]`-shaped (rank 1), an id `≥ codebook_size()` (naming the first), or
    /// a forced [`Backend::CpuIsa`] level this CPU lacks.
    ///
    /// ```
    /// use vistok::{Backend, Fsq, View};
    /// let fsq = Fsq::new(&[3, 2])?;
    /// // ids 0..6 are (level_0, level_1) = (id % 3, id / 3).
    /// let s = fsq.statistics(Backend::Cpu, View::new(&[0u32, 4, 5, 5], &[4])?)?;
    /// assert_eq!(s.tokens, 4);
    /// assert_eq!(s.levels, Some(vec![vec![1, 1, 2], vec![1, 3]]));
    /// assert_eq!(s.histogram, Some(vec![1, 0, 0, 0, 1, 2]));
    /// assert_eq!(s.level_frequency().unwrap()[1], [0.25, 0.75]);
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn statistics(&self, backend: Backend, ids: View<'_, u32>) -> Result<FsqStats> {
        let dims = ids.dims();
        if dims.len() != 1 {
            return Err(Error::Shape { family: Family::Fsq, msg: format!("ids dims {dims:?}, expected [N]") });
        }
        match backend {
            Backend::Reference => crate::reference::fsq::statistics(self, ids.data()),
            Backend::Cpu => crate::cpu::fsq::statistics(self, crate::cpu::Isa::detect(), ids.data()),
            Backend::CpuIsa(isa) => crate::cpu::fsq::statistics(self, isa.check()?, ids.data()),
        }
    }
}

/// The most bins [`Fsq::statistics`] counts: the id histogram needs `Π L_i ≤ 2^20`, the
/// per-dimension level counts `Σ L_i ≤ 2^20`.
pub const STATS_MAX_BINS: u64 = 1 << 20;

/// Codebook usage of a batch of FSQ ids, from [`Fsq::statistics`].
///
/// ```
/// use vistok::{Backend, Fsq, View};
/// let fsq = Fsq::new(&[4])?;
/// let s = fsq.statistics(Backend::Reference, View::new(&[3u32, 3, 0, 1], &[4])?)?;
/// assert_eq!(s.level_frequency(), Some(vec![vec![0.25, 0.25, 0.0, 0.5]]));
/// assert_eq!(s.histogram, Some(vec![1, 1, 0, 2]));
/// # Ok::<(), vistok::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsqStats {
    /// Ids counted, N.
    pub tokens: usize,
    /// `[D][L_i]` when `Σ L_i ≤` [`STATS_MAX_BINS`]: `levels[i][l]` is how many ids have level
    /// `l` in dimension `i` (`(id / basis_i) mod L_i`); `None` otherwise.
    pub levels: Option<Vec<Vec<u64>>>,
    /// `[Π L_i]` when `Π L_i ≤` [`STATS_MAX_BINS`]: how many ids have each value; `None`
    /// otherwise.
    pub histogram: Option<Vec<u64>>,
}

impl FsqStats {
    /// `levels / N` per dimension and level: the frequency of each level (all 0 when `N = 0`).
    pub fn level_frequency(&self) -> Option<Vec<Vec<f64>>> {
        let n = self.tokens.max(1) as f64;
        self.levels.as_ref().map(|l| l.iter().map(|d| d.iter().map(|&c| c as f64 / n).collect()).collect())
    }
}

/// The error for a NaN at flat index `i` of `z` `[N, D]`.
pub(crate) fn nan_error(i: usize, d: usize) -> Error {
    Error::NonFinite { family: Family::Fsq, what: format!("z[{}, {}]", i / d, i % d) }
}

/// The error for an out-of-range id at index `i`.
pub(crate) fn id_error(i: usize, id: u32, size: u64) -> Error {
    invalid(format!("ids[{i}] = {id} is not below the codebook size {size}"))
}
