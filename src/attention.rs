//! Fused attention, forward: `O = softmax(Q·Kᵀ·scale + bias) · V` without writing the score
//! matrix (flash-style: key tiles stream past a tile of queries with an online softmax).
//!
//! # Contract
//! - Shapes, [`QkvLayout::Bhnd`]: `Q [B, H, Nq, D]`, `K` and `V [B, Hkv, Nk, D]`, output
//!   `O [B, H, Nq, D]`; [`QkvLayout::Bnhd`]: `Q [B, Nq, H, D]`, `K`, `V [B, Nk, Hkv, D]`,
//!   `O [B, Nq, H, D]` (PyTorch's `[batch, tokens, heads, dim]` as FlashAttention takes it).
//!   `H` must be a multiple of `Hkv` (grouped-query attention; `Hkv = 1` is multi-query): query
//!   head `h` uses key/value head `h / (H / Hkv)`. `D ≥ 1`; the CPU backend takes `D ≤ 256`
//!   ([`MAX_HEAD_DIM_CPU`]). `Nq = 0` or `B = 0` writes nothing; `Nk = 0` makes every row fully
//!   masked.
//! - Element types: `f32`, `f16`, `bf16` for Q, K, V and O (all the same); products, the
//!   softmax and the accumulation are f32 (the reference: f64); O is rounded to the element type
//!   at the end. The optional log-sum-exp output is f32 `[B, H, Nq]` in **both** layouts
//!   (FlashAttention's `softmax_lse`): `lse_i = ln Σ_j exp(s_ij)` over the visible keys, with
//!   `s_ij = scale·(q_i·k_j) + bias_ij`.
//! - `scale`: default `1/√D` (computed in f64, rounded to f32); any finite value.
//! - Masks ([`Mask`]), with `off = Nk − Nq` (FlashAttention ≥ 2.1's bottom-right alignment: the
//!   last query sees the last key):
//!   - [`Mask::Causal`]: query `i` sees key `j` iff `j ≤ i + off`. When `Nq > Nk` the first
//!     `Nq − Nk` queries see no key at all.
//!   - [`Mask::Window`]: iff `i + off − left ≤ j ≤ i + off + right` (`usize::MAX` = unbounded;
//!     `Window { left: usize::MAX, right: 0 }` is causal).
//!   - [`Mask::Segments`]: block-causal by segment ids: iff `k[j] ≤ q[i]` (query in segment `s`
//!     sees keys in segments `≤ s`; HieraTok's scale-causal and frame-causal video attention).
//!     The ids are shared by every batch and head; they need not be sorted.
//! - Biases ([`Bias`], f32, added to the scaled scores): [`Bias::Key`] `[B or 1, Nk]` (ToMe's
//!   proportional attention adds `log(size)`), [`Bias::Full`] `[B or 1, H or 1, Nq, Nk]`. A bias
//!   of `−∞` masks that score; NaN or `+∞` is an [`Error::NonFinite`].
//! - A fully masked row (by the mask, by `−∞` biases, or `Nk = 0`) gives an output row of zeros
//!   and a log-sum-exp of `−∞`, never NaN.
//! - Q, K and V must be finite: NaN or `±∞` is an [`Error::NonFinite`] naming the first one
//!   (checked in the order bias, Q, K, V, in flat order). The CPU backend accumulates in f32, so the
//!   scores must stay within f32 range (`|q·k|` and `|scale·q·k| < 3·10³⁸`), and so must the unnormalised
//!   weighted sums `Σ_j exp(s_ij − max_j s_ij)·v_j` (at most the number of visible keys times
//!   `max |v|`); beyond that its output is unspecified (it may be ±∞ or NaN).
//! - Accuracy, judged as FlashAttention's tests judge it: the error of a backend against the f64
//!   reference is at most twice the error of the naive three-step computation in the same
//!   element type (scores and probabilities rounded to it), plus a small absolute term. bf16
//!   inputs on a CPU with AVX-512 BF16 take dot-product instructions: the probabilities are
//!   rounded to bf16 for `P·V` (as FlashAttention does) and come from a `2^x` good to
//!   1.02·10⁻⁴, so the log-sum-exp is good to about 10⁻⁴ there (elsewhere: a few f32 ulps of
//!   the largest score).
//! - Every element of O (and of the log-sum-exp) is written. Results do not depend on the
//!   thread count (bit for bit).
//!
//! ```
//! use vistok::attention::{Attention, Mask};
//! use vistok::{Backend, View, ViewMut};
//! // One batch, two heads sharing one key/value head, 3 queries, 3 keys, D = 2.
//! let q = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, /* head 1 */ 0.5, 0.5, -1.0, 0.0, 0.0, 2.0];
//! let k = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
//! let v = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let mut o = [0.0f32; 12];
//! let mut lse = [0.0f32; 6];
//! Attention::new().mask(Mask::Causal).forward_lse(
//!     Backend::Cpu,
//!     View::new(&q, &[1, 2, 3, 2])?,
//!     View::new(&k, &[1, 1, 3, 2])?,
//!     View::new(&v, &[1, 1, 3, 2])?,
//!     ViewMut::new(&mut o, &[1, 2, 3, 2])?,
//!     ViewMut::new(&mut lse, &[1, 2, 3])?,
//! )?;
//! // The first query of each head sees only the first key.
//! assert_eq!((o[0], o[1], o[6], o[7]), (1.0, 2.0, 1.0, 2.0));
//! assert!((lse[0] - 1.0 / 2f32.sqrt()).abs() < 1e-6);
//! # Ok::<(), vistok::Error>(())
//! ```

use crate::dtype::Float;
use crate::error::{Error, Family, Result};
use crate::view::{View, ViewMut};
use crate::Backend;

/// The largest head dimension `D` the CPU backend takes.
pub const MAX_HEAD_DIM_CPU: usize = 256;

/// Where the head dimension sits in Q, K, V and O (D is always last and contiguous).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QkvLayout {
    /// `[B, H, N, D]`: heads before tokens (PyTorch's `scaled_dot_product_attention`).
    #[default]
    Bhnd,
    /// `[B, N, H, D]`: tokens before heads (FlashAttention's `flash_attn_func`, the output of a
    /// `[B, N, 3·H·D]` projection reshaped).
    Bnhd,
}

/// Which keys a query sees. See the [module docs](self) for the exact rules and the
/// bottom-right alignment when `Nq ≠ Nk`.
///
/// ```
/// use vistok::attention::Mask;
/// let seg = [0u32, 0, 1, 1, 2];
/// let m = Mask::Segments { q: &seg, k: &seg };
/// assert!(matches!(m, Mask::Segments { .. }));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mask<'a> {
    /// Every key is visible.
    #[default]
    None,
    /// Query `i` sees key `j` iff `j ≤ i + Nk − Nq`.
    Causal,
    /// Query `i` sees key `j` iff `i + Nk − Nq − left ≤ j ≤ i + Nk − Nq + right`;
    /// `usize::MAX` means unbounded on that side.
    Window {
        /// Keys visible before the aligned diagonal.
        left: usize,
        /// Keys visible after the aligned diagonal.
        right: usize,
    },
    /// Block-causal by segment ids: query `i` sees key `j` iff `k[j] ≤ q[i]`. `q` has `Nq`
    /// ids, `k` has `Nk`.
    Segments {
        /// Segment id of every query.
        q: &'a [u32],
        /// Segment id of every key.
        k: &'a [u32],
    },
}

/// An additive f32 bias on the scaled scores (`−∞` masks; NaN and `+∞` are errors).
///
/// ```
/// use vistok::attention::Bias;
/// use vistok::View;
/// let log_sizes = [0.0f32, 0.693, 1.099]; // ToMe: log of each merged token's size
/// let b = Bias::Key(View::new(&log_sizes, &[1, 3])?);
/// assert!(matches!(b, Bias::Key(_)));
/// # Ok::<(), vistok::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub enum Bias<'a> {
    /// No bias.
    #[default]
    None,
    /// Per key: `[B, Nk]` or `[1, Nk]` (broadcast over batches), the same for every head and
    /// query.
    Key(View<'a, f32>),
    /// Per score: `[B or 1, H or 1, Nq, Nk]` (size-1 dimensions broadcast).
    Full(View<'a, f32>),
}

/// Attention options: layout, scale, mask, bias. Build with [`Attention::new`] and the setters,
/// then call [`forward`](Self::forward) or [`forward_lse`](Self::forward_lse).
///
/// ```
/// use vistok::attention::{Attention, Mask, QkvLayout};
/// let a = Attention::new().layout(QkvLayout::Bnhd).scale(0.125).mask(Mask::Window { left: 8, right: 8 });
/// assert_eq!(a.scale, Some(0.125));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Attention<'a> {
    /// Memory layout of Q, K, V and O.
    pub layout: QkvLayout,
    /// Score scale; `None` is `1/√D`.
    pub scale: Option<f32>,
    /// Which keys each query sees.
    pub mask: Mask<'a>,
    /// Additive bias on the scaled scores.
    pub bias: Bias<'a>,
}

/// `2^x` in f32, exactly as the CPU kernels compute it in the softmax
/// (`P = 2^((S − m)·log₂e)`): `x` is clamped to `[−160, 127]`, split as `n + f` with `n` the nearest
/// integer, `2^f` comes from a degree-6 minimax polynomial (fma, Horner) and is scaled by `2^n`
/// with one rounding.
///
/// Accuracy (tested over a dense sweep): at most 2 ulp of relative error where the result is a
/// normal float (`−126 ≤ x ≤ 127`); below that it is subnormal or 0 with an absolute error under
/// `2⁻¹⁴⁹`; `2^(−∞) = 0` exactly, which is how masked scores vanish.
///
/// ```
/// use vistok::attention::exp2;
/// assert_eq!(exp2(0.0), 1.0);
/// assert_eq!(exp2(-3.0), 0.125);
/// assert_eq!(exp2(f32::NEG_INFINITY), 0.0);
/// assert!((exp2(0.5) - std::f32::consts::SQRT_2).abs() <= f32::EPSILON);
/// ```
pub fn exp2(x: f32) -> f32 {
    crate::cpu::attention::exp2(x)
}

/// The validated problem the backends run: sizes, resolved scale, mask and bias.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Problem<'a> {
    pub b: usize,
    pub h: usize,
    pub hkv: usize,
    pub nq: usize,
    pub nk: usize,
    pub d: usize,
    pub layout: QkvLayout,
    pub scale: f32,
    pub mask: Mask<'a>,
    pub bias: BiasSpec<'a>,
}

/// A bias with its broadcast strides resolved: element `(b, h, i, j)` is at
/// `b·b_stride + h·h_stride + i·i_stride + j`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BiasSpec<'a> {
    pub data: &'a [f32],
    pub b_stride: usize,
    pub h_stride: usize,
    pub i_stride: usize,
    /// The bias view's dims (`[B or 1, Nk, 0, 0]` for a key bias), for error messages.
    pub dims: [usize; 4],
}

impl BiasSpec<'_> {
    pub(crate) fn is_none(&self) -> bool {
        self.data.is_empty()
    }
}

fn shape_err(msg: String) -> Error {
    Error::Shape { family: Family::Attention, msg }
}

impl<'a> Attention<'a> {
    /// Defaults: [`QkvLayout::Bhnd`], scale `1/√D`, no mask, no bias.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the layout of Q, K, V and O.
    pub fn layout(mut self, layout: QkvLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Sets the score scale (default `1/√D`).
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Sets the mask.
    pub fn mask(mut self, mask: Mask<'a>) -> Self {
        self.mask = mask;
        self
    }

    /// Sets the additive bias.
    pub fn bias(mut self, bias: Bias<'a>) -> Self {
        self.bias = bias;
        self
    }

    /// Output `O` for `q`, `k`, `v`. Errors ([`Error`], family attention): dims of `q` / `k` /
    /// `v` / `out` that do not match (rank 4, same `B` and `D`, `V` as `K`, `H` a multiple of
    /// `Hkv`, `out` as `q`), a bias or segment ids of the wrong shape, a non-finite scale, a NaN
    /// or `+∞` bias, a non-finite element of Q, K or V, `D = 0`, `D > 256` on the CPU
    /// ([`Error::Unsupported`]), or a forced [`Backend::CpuIsa`] this CPU lacks.
    ///
    /// ```
    /// use vistok::attention::Attention;
    /// use vistok::{Backend, View, ViewMut};
    /// let (q, k, v) = ([0.0f32; 4], [0.0f32; 4], [1.0f32, 2.0, 3.0, 4.0]);
    /// let mut o = [0.0f32; 4];
    /// let dims = [1, 1, 2, 2];
    /// Attention::new().forward(Backend::Cpu, View::new(&q, &dims)?, View::new(&k, &dims)?,
    ///     View::new(&v, &dims)?, ViewMut::new(&mut o, &dims)?)?;
    /// assert_eq!(o, [2.0, 3.0, 2.0, 3.0]); // equal scores: the mean of the values
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn forward<T: Float>(
        &self,
        backend: Backend,
        q: View<'_, T>,
        k: View<'_, T>,
        v: View<'_, T>,
        mut out: ViewMut<'_, T>,
    ) -> Result<()> {
        let p = self.check(q.dims(), k.dims(), v.dims(), out.dims(), None)?;
        run(backend, &p, q.data(), k.data(), v.data(), out.data_mut(), None)
    }

    /// Output `O` and the log-sum-exp `[B, H, Nq]` (f32, natural log; `−∞` for fully masked
    /// rows). Errors: those of [`forward`](Self::forward), and `lse` dims other than
    /// `[B, H, Nq]`.
    ///
    /// ```
    /// use vistok::attention::{Attention, Bias};
    /// use vistok::{Backend, View, ViewMut};
    /// let (q, k, v) = ([1.0f32, 0.0], [1.0f32, 0.0, 0.0, 1.0], [1.0f32, 0.0, 0.0, 1.0]);
    /// let kb = [0.0f32, f32::NEG_INFINITY]; // the second key is masked by its bias
    /// let (mut o, mut lse) = ([0.0f32; 2], [0.0f32; 1]);
    /// Attention::new().scale(1.0).bias(Bias::Key(View::new(&kb, &[1, 2])?)).forward_lse(
    ///     Backend::Reference, View::new(&q, &[1, 1, 1, 2])?, View::new(&k, &[1, 1, 2, 2])?,
    ///     View::new(&v, &[1, 1, 2, 2])?, ViewMut::new(&mut o, &[1, 1, 1, 2])?,
    ///     ViewMut::new(&mut lse, &[1, 1, 1])?)?;
    /// assert_eq!((o, lse), ([1.0, 0.0], [1.0]));
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn forward_lse<T: Float>(
        &self,
        backend: Backend,
        q: View<'_, T>,
        k: View<'_, T>,
        v: View<'_, T>,
        mut out: ViewMut<'_, T>,
        mut lse: ViewMut<'_, f32>,
    ) -> Result<()> {
        let p = self.check(q.dims(), k.dims(), v.dims(), out.dims(), Some(lse.dims()))?;
        run(backend, &p, q.data(), k.data(), v.data(), out.data_mut(), Some(lse.data_mut()))
    }

    /// Validates every shape and the scale; resolves the bias strides.
    pub(crate) fn check(
        &self,
        qd: &[usize],
        kd: &[usize],
        vd: &[usize],
        od: &[usize],
        lse: Option<&[usize]>,
    ) -> Result<Problem<'a>> {
        let names = match self.layout {
            QkvLayout::Bhnd => ("[B, H, Nq, D]", "[B, Hkv, Nk, D]"),
            QkvLayout::Bnhd => ("[B, Nq, H, D]", "[B, Nk, Hkv, D]"),
        };
        if qd.len() != 4 {
            return Err(shape_err(format!("q dims {qd:?}, expected {}", names.0)));
        }
        if kd.len() != 4 {
            return Err(shape_err(format!("k dims {kd:?}, expected {}", names.1)));
        }
        let (b, h, nq, d, hkv, nk) = match self.layout {
            QkvLayout::Bhnd => (qd[0], qd[1], qd[2], qd[3], kd[1], kd[2]),
            QkvLayout::Bnhd => (qd[0], qd[2], qd[1], qd[3], kd[2], kd[1]),
        };
        if d == 0 {
            return Err(shape_err(format!("head dimension D is 0 (q dims {qd:?})")));
        }
        if kd[0] != b || kd[3] != d {
            return Err(shape_err(format!(
                "k dims {kd:?} do not match q dims {qd:?}: batch and head dimension D must agree"
            )));
        }
        if vd != kd {
            return Err(shape_err(format!("v dims {vd:?}, expected the dims of k {kd:?}")));
        }
        if hkv == 0 || h == 0 || !h.is_multiple_of(hkv) {
            return Err(shape_err(format!(
                "query heads H = {h} is not a positive multiple of key/value heads Hkv = {hkv}"
            )));
        }
        if od != qd {
            return Err(shape_err(format!("out dims {od:?}, expected the dims of q {qd:?}")));
        }
        if let Some(ld) = lse {
            if ld != [b, h, nq] {
                return Err(shape_err(format!("lse dims {ld:?}, expected [B, H, Nq] = [{b}, {h}, {nq}]")));
            }
        }
        let scale = match self.scale {
            Some(s) if !s.is_finite() => {
                return Err(Error::NonFinite { family: Family::Attention, what: format!("scale {s}") })
            }
            Some(s) => s,
            None => (1.0 / (d as f64).sqrt()) as f32,
        };
        if let Mask::Segments { q, k } = self.mask {
            if q.len() != nq || k.len() != nk {
                return Err(shape_err(format!(
                    "segment ids: {} for queries and {} for keys, expected Nq = {nq} and Nk = {nk}",
                    q.len(),
                    k.len()
                )));
            }
        }
        let none = BiasSpec { data: &[], b_stride: 0, h_stride: 0, i_stride: 0, dims: [0; 4] };
        let bias = match self.bias {
            Bias::None => none,
            Bias::Key(v) => {
                let bd = v.dims();
                if bd.len() != 2 || (bd[0] != b && bd[0] != 1) || bd[1] != nk {
                    return Err(shape_err(format!("key bias dims {bd:?}, expected [B or 1, Nk] = [{b} or 1, {nk}]")));
                }
                let b_stride = if bd[0] == 1 { 0 } else { nk };
                BiasSpec { data: v.data(), b_stride, h_stride: 0, i_stride: 0, dims: [bd[0], bd[1], 0, 0] }
            }
            Bias::Full(v) => {
                let bd = v.dims();
                if bd.len() != 4 || (bd[0] != b && bd[0] != 1) || (bd[1] != h && bd[1] != 1) || bd[2..] != [nq, nk] {
                    return Err(shape_err(format!(
                        "bias dims {bd:?}, expected [B or 1, H or 1, Nq, Nk] = [{b} or 1, {h} or 1, {nq}, {nk}]"
                    )));
                }
                let h_stride = if bd[1] == 1 { 0 } else { nq * nk };
                let b_stride = if bd[0] == 1 { 0 } else { bd[1] * nq * nk };
                BiasSpec { data: v.data(), b_stride, h_stride, i_stride: nk, dims: [bd[0], bd[1], nq, nk] }
            }
        };
        // An empty bias (Nq·Nk = 0) is as good as none.
        let bias = if bias.data.is_empty() { none } else { bias };
        Ok(Problem { b, h, hkv, nq, nk, d, layout: self.layout, scale, mask: self.mask, bias })
    }
}

/// What a backend's scan looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bad {
    /// NaN or ±∞ (Q, K, V).
    NonFinite,
    /// NaN or +∞ (a bias: −∞ masks).
    NanOrPosInf,
}

impl Bad {
    #[inline(always)]
    pub(crate) fn test(self, x: f32) -> bool {
        match self {
            Bad::NonFinite => !x.is_finite(),
            Bad::NanOrPosInf => x.is_nan() || x == f32::INFINITY,
        }
    }
}

/// The first bad value of the bias, then of Q, K and V (in that order, flat order within each)
/// as an error. `first(kind, data)` finds the first index of one buffer where `kind.test` holds:
/// each backend brings its own scan (the reference a plain loop, the cpu a parallel vectorised
/// one); the error is the same.
pub(crate) fn check_finite<T: Float>(
    p: &Problem<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    first_bias: impl Fn(Bad, &[f32]) -> Option<usize>,
    first: impl Fn(Bad, &[T]) -> Option<usize>,
) -> Result<()> {
    if let Some(i) = first_bias(Bad::NanOrPosInf, p.bias.data) {
        let rank = if p.bias.i_stride == 0 { 2 } else { 4 };
        let what = format!("bias{} = {}", index(&p.bias.dims[..rank], i), p.bias.data[i]);
        return Err(Error::NonFinite { family: Family::Attention, what });
    }
    let (qd, kd) = match p.layout {
        QkvLayout::Bhnd => ([p.b, p.h, p.nq, p.d], [p.b, p.hkv, p.nk, p.d]),
        QkvLayout::Bnhd => ([p.b, p.nq, p.h, p.d], [p.b, p.nk, p.hkv, p.d]),
    };
    for (name, data, dims) in [("q", q, &qd), ("k", k, &kd), ("v", v, &kd)] {
        if let Some(i) = first(Bad::NonFinite, data) {
            let what = format!("{name}{} = {}", index(dims, i), data[i].to_f32());
            return Err(Error::NonFinite { family: Family::Attention, what });
        }
    }
    Ok(())
}

/// `[a, b, …]`: the multi-index of flat element `i` in `dims`.
fn index(dims: &[usize], mut i: usize) -> String {
    let mut idx = vec![0; dims.len()];
    for (slot, &d) in idx.iter_mut().zip(dims).rev() {
        *slot = i % d.max(1);
        i /= d.max(1);
    }
    format!("{idx:?}")
}

fn run<T: Float>(
    backend: Backend,
    p: &Problem<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    match backend {
        Backend::Reference => crate::reference::attention::forward(p, q, k, v, out, lse),
        Backend::Cpu => crate::cpu::attention::forward(p, crate::cpu::Isa::detect(), q, k, v, out, lse),
        Backend::CpuIsa(isa) => crate::cpu::attention::forward(p, isa.check()?, q, k, v, out, lse),
    }
}
