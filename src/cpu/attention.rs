//! CPU attention: flash-style tiles with queries in SIMD lanes.
//!
//! # Algorithm
//! One task computes [`MQ`] consecutive queries of one (batch, head) (rayon over
//! (batch, head, query tile); in the `[B, N, H, D]` layout over (batch, query tile), all heads).
//! Its queries are transposed once into `Qᵀ [D, MQ]`, pre-multiplied by the scale (rounded per
//! element, like a naive `(Q·scale)·Kᵀ`; folding `log₂e` in as well would turn the rounding of
//! `scale·log₂e` into a systematic error on every logit). Key tiles of [`KT`] keys then stream past:
//! 1. `Sᵀ [KT, MQ] = K·Qᵀ`: register-blocked, [`RK`] keys × `MQ` queries per block, each key
//!    value broadcast against two 16-lane query vectors (K is pre-packed into panels of `RK`
//!    keys, `[D, RK]` each, by one parallel pass per call, which also widens f16 / bf16);
//! 2. bias and mask (partially masked tiles only; tiles no query of the task sees are skipped,
//!    and band masks restrict the key range to the band);
//! 3. online softmax per lane: running max `m` and sum `l`, `P = 2^((S − m)·log₂e)` with the
//!    vectorised [`exp2`] (the difference first, so the error of the product stays small for
//!    the large weights), rescale factor `α = 2^((m_old − m_new)·log₂e)`;
//! 4. `Oᵀ [D, MQ] = α·Oᵀ + Vᵀ·P`: [`RD`] head-dim rows × `MQ` queries per block, each value of
//!    V (natural row layout, no packing for f32) broadcast against the `P` vectors.
//!
//! Since queries sit in lanes, the row max / sum of the softmax and the rescaling are plain
//! vertical vector operations. Finally `O = Oᵀ / l`, transposed back, and
//! `lse = m + ln l`. A lane whose every score is masked keeps `m = −∞`; it subtracts 0
//! instead, so `P = 0`, `l = 0`, and the output is zeros with `lse = −∞`.
//!
//! Every query row is computed by the same sequence of operations whatever the thread count,
//! so results are bit-identical across thread counts (not across ISA levels).
//!
//! The loop over key tiles ([`sweep`]) is shared by two operand formats: f32 (this file; every
//! dtype at every ISA level, f16 / bf16 widened on load) and bf16 pairs for `vdpbf16ps`
//! ([`bf16`]; bf16 inputs at `Isa::V4` on CPUs with AVX-512 BF16). Before the tiles run, one
//! parallel vectorised pass checks Q, K, V (and the bias) for non-finite values.
//!
//! Tuning constants sit below: a tile is [`MQ`] = 32 queries × [`KT`] = 96 keys; each worker
//! thread keeps one scratch (`Qᵀ`, `Oᵀ`, `Sᵀ`, `Pᵀ`: 28 KiB for `D = 64`) across calls.
//! Measured on Zen 4 (one thread, fraction of the f32 FMA peak of the same run):
//! 1×12×1024×64 f32 0.82, bf16 1.25 (the bf16 dot peak is 2.0); 1×16×1024×128 f32 0.85;
//! causal 0.74; 1×12×256×64 f32 0.72.

use crate::attention::{check_finite, Bad, Mask, Problem, QkvLayout};
use crate::cpu::par::for_each_chunk;
use crate::cpu::Isa;
use crate::dtype::{DType, Float};
use crate::error::{Error, Family, Result};
use core::f32::consts::LOG2_E;
use pulp::x86::{V3, V4};
use pulp::{Simd, WithSimd};

mod bf16;

/// SIMD lanes (f32).
const LANES: usize = 16;
/// Query vectors per tile.
const QV: usize = 2;
/// Queries per tile (the lanes of `QV` vectors).
pub(crate) const MQ: usize = LANES * QV;
/// Keys per QK register block: `RK × QV` accumulators.
const RK: usize = 12;
/// Keys per tile: a whole number of QK blocks.
const KT: usize = 8 * RK;
/// Head-dim rows per PV register block: `RD × QV` accumulators.
const RD: usize = 8;
/// The largest head dimension.
const DMAX: usize = crate::attention::MAX_HEAD_DIM_CPU;

const _: () = assert!(KT.is_multiple_of(RK) && RK * QV <= 28 && RD * QV <= 28);

// ---------------------------------------------------------------------------------------------
// exp2

/// Minimax coefficients of `2^f` on `[−½, ½]` (relative error 1.9·10⁻⁹ before rounding).
const EXP2_C: [f32; 7] =
    [1.0, core::f32::consts::LN_2, 0.240_226_46, 0.055_503_286, 0.009_618_489, 0.001_339_993_1, 0.000_153_458_12];
/// Inputs are clamped below at `EXP2_MIN`, where `2^x` rounds to 0.
const EXP2_MIN: f32 = -160.0;
/// Above this `2^x` is +∞ (the scalar code clamps there to keep its exponent arithmetic in range).
const EXP2_INF: f32 = 129.0;

/// `2^x` in f32 as the vector kernels compute it (see [`crate::attention::exp2`]): clamp, split
/// `x = n + f` with `n` the nearest integer, a degree-6 polynomial in `f` (Horner, fma), then
/// `·2^n` with one rounding (the vector code's `vscalefps`).
#[inline(always)]
pub(crate) fn exp2(x: f32) -> f32 {
    // `max` maps NaN to EXP2_MIN, as `vmaxps` with the constant second does (`clamp` would
    // keep the NaN).
    #[allow(clippy::manual_clamp)]
    let x = x.max(EXP2_MIN).min(EXP2_INF);
    let n = x.round_ties_even();
    let f = x - n;
    let mut p = EXP2_C[6];
    for c in EXP2_C[..6].iter().rev() {
        p = p.mul_add(f, *c);
    }
    let pow2 = |e: f32| f32::from_bits(((e as i32 + 127) as u32) << 23);
    if n < -126.0 {
        // p·2^(n+64) is exact (normal); the second product rounds once, as `vscalefps` does.
        p * pow2(n + 64.0) * pow2(-64.0)
    } else if n > 127.0 {
        p * pow2(127.0) * pow2(n - 127.0)
    } else {
        p * pow2(n)
    }
}

// ---------------------------------------------------------------------------------------------
// Micro-kernels

/// The per-ISA micro-kernels. `Sᵀ` / `Pᵀ` tiles are `[rows, MQ]`, `Qᵀ` / `Oᵀ` are `[D, MQ]`.
trait Kernel: Copy {
    /// `s[r][·] = Σ_c kp[c·RK + r] · qt[c][·]` for the `RK` keys of one packed panel `kp [d, RK]`;
    /// folds the lane-wise max of the first `valid` rows into `mx`.
    fn qk_panel(self, qt: &[f32], d: usize, kp: &[f32], s: &mut [f32], valid: usize, mx: &mut [f32; MQ]);
    /// Online softmax over `rows` rows of `s` whose lane-wise max is `tmax`: updates `m` and
    /// `l`, writes `P` over `s`, and the rescale factor of the old state into `alpha`.
    fn softmax(
        self,
        s: &mut [f32],
        rows: usize,
        tmax: &[f32; MQ],
        m: &mut [f32; MQ],
        l: &mut [f32; MQ],
        alpha: &mut [f32; MQ],
    );
    /// `ot[c][·] = alpha·ot[c][·] + Σ_r v.data[r·v.stride + c] · p[r][·]` for `c < d`.
    fn pv(self, p: &[f32], rows: usize, v: Rows<'_>, d: usize, alpha: &[f32; MQ], ot: &mut [f32]);
}

/// Plain loops (vectorised by the compiler under `Isa::V3`).
#[derive(Clone, Copy)]
struct Portable;

impl Kernel for Portable {
    #[inline(always)]
    fn qk_panel(self, qt: &[f32], d: usize, kp: &[f32], s: &mut [f32], valid: usize, mx: &mut [f32; MQ]) {
        for (r, srow) in s.chunks_exact_mut(MQ).take(RK).enumerate() {
            let mut acc = [0.0f32; MQ];
            for (c, q) in qt.chunks_exact(MQ).take(d).enumerate() {
                let kv = kp[c * RK + r];
                for (a, q) in acc.iter_mut().zip(q) {
                    *a += kv * q;
                }
            }
            srow.copy_from_slice(&acc);
            if r < valid {
                for (x, a) in mx.iter_mut().zip(&acc) {
                    *x = x.max(*a);
                }
            }
        }
    }

    #[inline(always)]
    fn softmax(
        self,
        s: &mut [f32],
        rows: usize,
        tmax: &[f32; MQ],
        m: &mut [f32; MQ],
        l: &mut [f32; MQ],
        alpha: &mut [f32; MQ],
    ) {
        let s = &mut s[..rows * MQ];
        let mut mx = *m;
        for (x, t) in mx.iter_mut().zip(tmax) {
            *x = x.max(*t);
        }
        let m_use = mx.map(|x| if x == f32::NEG_INFINITY { 0.0 } else { x });
        let mut sum = [0.0f32; MQ];
        for row in s.chunks_exact_mut(MQ) {
            for ((x, sm), mu) in row.iter_mut().zip(&mut sum).zip(&m_use) {
                *x = exp2((*x - mu) * LOG2_E);
                *sm += *x;
            }
        }
        for i in 0..MQ {
            alpha[i] = exp2((m[i] - m_use[i]) * LOG2_E);
            l[i] = l[i] * alpha[i] + sum[i];
        }
        *m = mx;
    }

    #[inline(always)]
    fn pv(self, p: &[f32], rows: usize, v: Rows<'_>, d: usize, alpha: &[f32; MQ], ot: &mut [f32]) {
        let Rows { data: v, stride: vs } = v;
        for (c, orow) in ot.chunks_exact_mut(MQ).take(d).enumerate() {
            let mut acc = [0.0f32; MQ];
            for (r, prow) in p.chunks_exact(MQ).take(rows).enumerate() {
                let vv = v[r * vs + c];
                for (a, p) in acc.iter_mut().zip(prow) {
                    *a += vv * p;
                }
            }
            for ((o, a), al) in orow.iter_mut().zip(&acc).zip(alpha) {
                *o = *o * al + a;
            }
        }
    }
}

/// AVX-512 through pulp's `V4` token.
#[derive(Clone, Copy)]
struct Avx512(V4);

use core::arch::x86_64::__m512;

/// 16 lanes from `x[..16]`.
#[inline(always)]
fn ld(x: &[f32]) -> __m512 {
    let a: &[f32; LANES] = x[..LANES].try_into().unwrap();
    pulp::cast(*a)
}

/// Stores 16 lanes into `x[..16]`.
#[inline(always)]
fn st(v: __m512, x: &mut [f32]) {
    let a: &mut [f32; LANES] = (&mut x[..LANES]).try_into().unwrap();
    *a = pulp::cast(v);
}

impl Avx512 {
    /// [`exp2`] on 16 lanes, bit-identical to the scalar version.
    #[inline(always)]
    fn exp2(self, x: __m512) -> __m512 {
        self.exp2_with(x, &EXP2_C)
    }

    /// `2^x` with the polynomial `coef` (lowest degree first) for `2^f` on `[−½, ½]`.
    #[inline(always)]
    fn exp2_with(self, x: __m512, coef: &[f32]) -> __m512 {
        use core::arch::x86_64::{_MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT};
        let f = self.0.avx512f;
        let x = f._mm512_max_ps(x, f._mm512_set1_ps(EXP2_MIN));
        let n = f._mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let t = f._mm512_sub_ps(x, n);
        let (last, rest) = coef.split_last().unwrap();
        let mut p = f._mm512_set1_ps(*last);
        for c in rest.iter().rev() {
            p = f._mm512_fmadd_ps(p, t, f._mm512_set1_ps(*c));
        }
        f._mm512_scalef_ps(p, n)
    }

    #[inline(always)]
    fn pv_block<const R: usize>(
        self,
        p: &[f32],
        rows: usize,
        v: &[f32],
        vs: usize,
        alpha: &[__m512; QV],
        ot: &mut [f32],
    ) {
        let f = self.0.avx512f;
        let mut acc = [[f._mm512_setzero_ps(); QV]; R];
        // One check per row (each chunk of `v` holds at least R values: the caller's blocks end
        // within the row), and a fixed-size row so that the accumulators stay in registers.
        for (prow, vr) in p.chunks_exact(MQ).take(rows).zip(v.chunks(vs)) {
            let Some(vr) = vr.first_chunk::<R>() else { break };
            let pv: [__m512; QV] = core::array::from_fn(|q| ld(&prow[q * LANES..]));
            for (a, &x) in acc.iter_mut().zip(vr) {
                let b = f._mm512_set1_ps(x);
                for q in 0..QV {
                    a[q] = f._mm512_fmadd_ps(b, pv[q], a[q]);
                }
            }
        }
        for (a, orow) in acc.iter().zip(ot.chunks_exact_mut(MQ)) {
            for q in 0..QV {
                let o = &mut orow[q * LANES..];
                st(f._mm512_fmadd_ps(ld(o), alpha[q], a[q]), o);
            }
        }
    }
}

impl Kernel for Avx512 {
    #[inline(always)]
    fn qk_panel(self, qt: &[f32], d: usize, kp: &[f32], s: &mut [f32], valid: usize, mx: &mut [f32; MQ]) {
        let f = self.0.avx512f;
        let mut acc = [[f._mm512_setzero_ps(); QV]; RK];
        for (q, k) in qt.chunks_exact(MQ).zip(kp.chunks_exact(RK)).take(d) {
            let qv: [__m512; QV] = core::array::from_fn(|i| ld(&q[i * LANES..]));
            for (a, &x) in acc.iter_mut().zip(k) {
                let b = f._mm512_set1_ps(x);
                for i in 0..QV {
                    a[i] = f._mm512_fmadd_ps(b, qv[i], a[i]);
                }
            }
        }
        let mut m: [__m512; QV] = core::array::from_fn(|i| ld(&mx[i * LANES..]));
        for (r, (a, srow)) in acc.iter().zip(s.chunks_exact_mut(MQ)).enumerate() {
            for i in 0..QV {
                st(a[i], &mut srow[i * LANES..]);
                if r < valid {
                    m[i] = f._mm512_max_ps(m[i], a[i]);
                }
            }
        }
        for i in 0..QV {
            st(m[i], &mut mx[i * LANES..]);
        }
    }

    #[inline(always)]
    fn softmax(
        self,
        s: &mut [f32],
        rows: usize,
        tmax: &[f32; MQ],
        m: &mut [f32; MQ],
        l: &mut [f32; MQ],
        alpha: &mut [f32; MQ],
    ) {
        use core::arch::x86_64::_CMP_EQ_OQ;
        let f = self.0.avx512f;
        let s = &mut s[..rows * MQ];
        let log2e = f._mm512_set1_ps(LOG2_E);
        for q in 0..QV {
            let lane = q * LANES;
            let mx = f._mm512_max_ps(ld(&m[lane..]), ld(&tmax[lane..]));
            let ninf = f._mm512_set1_ps(f32::NEG_INFINITY);
            let masked = f._mm512_cmp_ps_mask::<_CMP_EQ_OQ>(mx, ninf);
            let m_use = f._mm512_mask_blend_ps(masked, mx, f._mm512_setzero_ps());
            // Four partial sums: the additions are not one serial chain.
            let mut sum = [f._mm512_setzero_ps(); 4];
            for (r, row) in s.chunks_exact_mut(MQ).enumerate() {
                let x = &mut row[lane..];
                let e = self.exp2(f._mm512_mul_ps(f._mm512_sub_ps(ld(x), m_use), log2e));
                st(e, x);
                sum[r % 4] = f._mm512_add_ps(sum[r % 4], e);
            }
            let total = f._mm512_add_ps(f._mm512_add_ps(sum[0], sum[1]), f._mm512_add_ps(sum[2], sum[3]));
            let a = self.exp2(f._mm512_mul_ps(f._mm512_sub_ps(ld(&m[lane..]), m_use), log2e));
            st(a, &mut alpha[lane..]);
            st(f._mm512_fmadd_ps(ld(&l[lane..]), a, total), &mut l[lane..]);
            st(mx, &mut m[lane..]);
        }
    }

    #[inline(always)]
    fn pv(self, p: &[f32], rows: usize, v: Rows<'_>, d: usize, alpha: &[f32; MQ], ot: &mut [f32]) {
        let Rows { data: v, stride: vs } = v;
        let al: [__m512; QV] = core::array::from_fn(|q| ld(&alpha[q * LANES..]));
        let mut c = 0;
        while c + RD <= d {
            self.pv_block::<RD>(p, rows, &v[c..], vs, &al, &mut ot[c * MQ..]);
            c += RD;
        }
        while c + 4 <= d {
            self.pv_block::<4>(p, rows, &v[c..], vs, &al, &mut ot[c * MQ..]);
            c += 4;
        }
        while c < d {
            self.pv_block::<1>(p, rows, &v[c..], vs, &al, &mut ot[c * MQ..]);
            c += 1;
        }
    }
}

/// Work to run with the kernels of an ISA.
trait Op {
    type Output;
    fn run<K: Kernel>(self, k: K) -> Self::Output;
}

struct WithKernel<O, K>(O, K);

impl<O: Op, K: Kernel> WithSimd for WithKernel<O, K> {
    type Output = O::Output;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> Self::Output {
        self.0.run(self.1)
    }
}

/// Runs `op` with the kernels of `isa`, inside a function compiled for its target features
/// (the portable kernels if the ISA is unavailable; callers check beforehand).
#[inline(always)]
fn dispatch<O: Op>(isa: Isa, op: O) -> O::Output {
    match isa {
        Isa::V4 => match V4::try_new() {
            Some(simd) => Simd::vectorize(simd, WithKernel(op, Avx512(simd))),
            None => op.run(Portable),
        },
        Isa::V3 => match V3::try_new() {
            Some(simd) => Simd::vectorize(simd, WithKernel(op, Portable)),
            None => op.run(Portable),
        },
        Isa::Scalar => op.run(Portable),
    }
}

// ---------------------------------------------------------------------------------------------
// The loop nest

/// Rows of one (batch, kv head) of a `[.., N, .., D]` f32 tensor: row `j` is
/// `data[j·stride..][..d]`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    stride: usize,
}

/// K and V, ready for the kernels.
struct Kv<'a> {
    /// K in panels: per (b, kv head) `panels·D·RK` floats, panel `t` holding keys
    /// `[t·RK, (t+1)·RK)` as `[D, RK]` (zero past `Nk`).
    kp: &'a [f32],
    panels: usize,
    /// V as f32: the input itself, or a widened `[B, Hkv, Nk, D]` copy.
    v: &'a [f32],
    v_bhnd: bool,
}

impl Kv<'_> {
    fn k_panels(&self, p: &Problem<'_>, b: usize, hk: usize) -> &[f32] {
        let len = self.panels * p.d * RK;
        &self.kp[(b * p.hkv + hk) * len..][..len]
    }

    fn v_rows(&self, p: &Problem<'_>, b: usize, hk: usize) -> Rows<'_> {
        if p.nk == 0 {
            Rows { data: &[], stride: p.d }
        } else if self.v_bhnd {
            let len = p.nk * p.d;
            Rows { data: &self.v[(b * p.hkv + hk) * len..][..len], stride: p.d }
        } else {
            // [B, Nk, Hkv, D]: the slab starts at (b, 0, hk) and runs to the last row's end.
            let start = (b * p.nk * p.hkv + hk) * p.d;
            let len = (p.nk - 1) * p.hkv * p.d + p.d;
            Rows { data: &self.v[start..][..len], stride: p.hkv * p.d }
        }
    }
}

/// Offset of `(b, head, token, 0)` and the token stride of a tensor in layout `l`.
fn place(l: QkvLayout, heads: usize, n: usize, d: usize, b: usize, head: usize, token: usize) -> (usize, usize) {
    match l {
        QkvLayout::Bhnd => (((b * heads + head) * n + token) * d, d),
        QkvLayout::Bnhd => (((b * n + token) * heads + head) * d, heads * d),
    }
}

/// How a key tile relates to a query tile.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cover {
    /// No query of the tile sees any key of it.
    Empty,
    /// Every query sees every key.
    Full,
    /// Mixed: apply the mask per element.
    Partial,
}

/// The mask of one problem in the form the loop nest uses.
#[derive(Clone, Copy)]
enum MaskSpec<'a> {
    None,
    /// Query `i` sees key `j` iff `lo ≤ j − i ≤ hi`.
    Band {
        lo: i64,
        hi: i64,
    },
    Segments {
        q: &'a [u32],
        k: &'a [u32],
    },
}

impl<'a> MaskSpec<'a> {
    fn new(p: &Problem<'a>) -> Self {
        // Far beyond any |j − i| (sizes are below 2^62), and no overflow when offset.
        const INF: i64 = 1 << 62;
        let off = p.nk as i64 - p.nq as i64;
        let side = |w: usize| (w as u64).min(INF as u64) as i64;
        match p.mask {
            Mask::None => MaskSpec::None,
            Mask::Causal => MaskSpec::Band { lo: -INF, hi: off },
            Mask::Window { left, right } => MaskSpec::Band { lo: off - side(left), hi: off + side(right) },
            Mask::Segments { q, k } => MaskSpec::Segments { q, k },
        }
    }

    /// Keys `[from, to)` some query of `[i0, i1)` may see.
    fn key_range(&self, nk: usize, i0: usize, i1: usize) -> (usize, usize) {
        match *self {
            MaskSpec::Band { lo, hi } => {
                let from = (i0 as i64 + lo).clamp(0, nk as i64) as usize;
                let to = (i1 as i64 - 1 + hi + 1).clamp(0, nk as i64) as usize;
                (from, to.max(from))
            }
            _ => (0, nk),
        }
    }

    fn cover(&self, i0: usize, i1: usize, j0: usize, j1: usize) -> Cover {
        match *self {
            MaskSpec::None => Cover::Full,
            MaskSpec::Band { lo, hi } => {
                let (min, max) = (j0 as i64 - (i1 as i64 - 1), j1 as i64 - 1 - i0 as i64);
                if max < lo || min > hi {
                    Cover::Empty
                } else if min >= lo && max <= hi {
                    Cover::Full
                } else {
                    Cover::Partial
                }
            }
            MaskSpec::Segments { q, k } => {
                let (qmin, qmax) = q[i0..i1].iter().fold((u32::MAX, 0), |(a, b), &x| (a.min(x), b.max(x)));
                let (kmin, kmax) = k[j0..j1].iter().fold((u32::MAX, 0), |(a, b), &x| (a.min(x), b.max(x)));
                if kmin > qmax {
                    Cover::Empty
                } else if kmax <= qmin {
                    Cover::Full
                } else {
                    Cover::Partial
                }
            }
        }
    }

    /// Sets the masked scores of a partial tile to −∞: `s [rows, MQ]` holds keys `j0..` and
    /// queries `i0..`.
    #[inline(always)]
    fn apply(&self, s: &mut [f32], rows: usize, i0: usize, j0: usize) {
        for (r, row) in s.chunks_exact_mut(MQ).take(rows).enumerate() {
            let j = j0 + r;
            match *self {
                MaskSpec::None => {}
                MaskSpec::Band { lo, hi } => {
                    // Visible lanes: j − hi ≤ i0 + lane ≤ j − lo.
                    let a = j as i64 - hi - i0 as i64;
                    let b = j as i64 - lo - i0 as i64;
                    for (lane, x) in row.iter_mut().enumerate() {
                        let lane = lane as i64;
                        if lane < a || lane > b {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                MaskSpec::Segments { q, k } => {
                    let kj = k[j];
                    for (x, &qi) in row.iter_mut().zip(&q[i0..]) {
                        if kj > qi {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
    }
}

/// Everything a task reads.
struct Ctx<'a, T> {
    p: &'a Problem<'a>,
    mask: MaskSpec<'a>,
    q: &'a [T],
    kv: KvData<'a>,
    /// Whether the caller asked for the log-sum-exp (else `finish` leaves it unwritten).
    want_lse: bool,
}

/// K and V as the kernels of the chosen path want them.
enum KvData<'a> {
    F32(Kv<'a>),
    Bf16(bf16::Kv<'a>),
}

/// A task's scratch: `Qᵀ [D, MQ]`, `Oᵀ [D, MQ]`, `Sᵀ [KT, MQ]` and the bf16 path's `Pᵀ` pairs
/// `[KT/2, MQ]`, each 64-byte aligned. One per thread, kept between calls (at most 85 KiB, for
/// `D = 256`): allocating and zeroing it per task costs a few percent on short sequences.
struct Scratch {
    buf: Vec<f32>,
    d: usize,
}

std::thread_local! {
    static SCRATCH: core::cell::RefCell<Scratch> = const { core::cell::RefCell::new(Scratch { buf: Vec::new(), d: 0 }) };
}

/// Runs `f` with this thread's scratch, sized for head dimension `d`.
fn with_scratch<R>(d: usize, f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => {
            s.ensure(d);
            f(&mut s)
        }
        // Tasks do not nest, but should one ever run inside another: a scratch of its own.
        Err(_) => {
            let mut s = Scratch { buf: Vec::new(), d: 0 };
            s.ensure(d);
            f(&mut s)
        }
    })
}

/// The parts of a [`Scratch`].
struct Parts<'s> {
    qt: &'s mut [f32],
    ot: &'s mut [f32],
    s: &'s mut [f32],
    pt: &'s mut [f32],
}

impl Scratch {
    fn ensure(&mut self, d: usize) {
        self.d = d.next_multiple_of(LANES);
        let len = 2 * self.d * MQ + KT * MQ + KT / 2 * MQ + LANES;
        if self.buf.len() < len {
            self.buf.resize(len, 0.0);
        }
    }

    fn split(&mut self) -> Parts<'_> {
        let start = self.buf.as_ptr().align_offset(64).min(LANES);
        let (qt, rest) = self.buf[start..].split_at_mut(self.d * MQ);
        let (ot, rest) = rest.split_at_mut(self.d * MQ);
        let (s, pt) = rest.split_at_mut(KT * MQ);
        Parts { qt, ot, s, pt: &mut pt[..KT / 2 * MQ] }
    }
}

/// The online-softmax state of one query tile, per lane: running max `m` (−∞ until a score is
/// seen), running sum `l`, and the last rescale factor `alpha`.
struct Running {
    m: [f32; MQ],
    l: [f32; MQ],
    alpha: [f32; MQ],
}

impl Running {
    fn new() -> Self {
        Running { m: [f32::NEG_INFINITY; MQ], l: [0.0; MQ], alpha: [0.0; MQ] }
    }
}

/// The loop over the key tiles that the query tile `[i0, i0 + nqt)` of head `h`, batch `b`
/// sees. For each tile that is not empty: `qk(first_panel, s_block, valid_rows, tmax)` fills
/// `Sᵀ` panel by panel and folds its lane-wise max into `tmax`; bias and mask are applied (and
/// the max recomputed if they changed anything); then `rest(s, rows, j0, tmax)` runs the softmax
/// and `P·V`. Tiles start on panel boundaries.
#[inline(always)]
fn sweep(
    p: &Problem<'_>,
    mask: &MaskSpec<'_>,
    (b, h, i0, nqt): (usize, usize, usize, usize),
    s: &mut [f32],
    mut qk: impl FnMut(usize, &mut [f32], usize, &mut [f32; MQ]),
    mut rest: impl FnMut(&mut [f32], usize, usize, &[f32; MQ]),
) {
    let i1 = i0 + nqt;
    let bias = &p.bias;
    let (from, to) = mask.key_range(p.nk, i0, i1);
    let mut j0 = from / RK * RK;
    while j0 < to {
        let j1 = (j0 + KT).min(to);
        let rows = j1 - j0;
        let cover = mask.cover(i0, i1, j0, j1);
        if cover == Cover::Empty {
            j0 = j1;
            continue;
        }
        // 1. Sᵀ = K·Qᵀ, whole panels (rows past j1 are computed and ignored), and its max.
        let mut tmax = [f32::NEG_INFINITY; MQ];
        for (t, sb) in s.chunks_exact_mut(RK * MQ).take(rows.div_ceil(RK)).enumerate() {
            qk(j0 / RK + t, sb, rows - t * RK, &mut tmax);
        }
        // 2. Bias and mask (then the max again).
        let mut changed = false;
        if !bias.is_none() {
            let base = b * bias.b_stride + h * bias.h_stride;
            if bias.i_stride == 0 {
                let kb = &bias.data[base + j0..][..rows];
                for (row, &x) in s.chunks_exact_mut(MQ).zip(kb) {
                    row.iter_mut().for_each(|v| *v += x);
                }
            } else {
                for lane in 0..nqt {
                    let br = &bias.data[base + (i0 + lane) * bias.i_stride + j0..][..rows];
                    for (r, &x) in br.iter().enumerate() {
                        s[r * MQ + lane] += x;
                    }
                }
            }
            changed = true;
        }
        if cover == Cover::Partial {
            mask.apply(s, rows, i0, j0);
            changed = true;
        }
        if changed {
            tmax = [f32::NEG_INFINITY; MQ];
            for row in s.chunks_exact(MQ).take(rows) {
                for (x, v) in tmax.iter_mut().zip(row) {
                    *x = x.max(*v);
                }
            }
        }
        // 3. Online softmax; 4. Oᵀ = α·Oᵀ + Vᵀ·P.
        rest(s, rows, j0, &tmax);
        j0 = j1;
    }
}

/// `O = Oᵀ / l` transposed back into `out[lane·o_stride..][..d]`, and, if `want_lse`,
/// `lse = m + ln l` (−∞ and zeros where `l = 0`: every score of the row was masked).
#[inline(always)]
fn finish<T: Float>(
    ot: &[f32],
    run: &Running,
    d: usize,
    out: &mut [T],
    o_stride: usize,
    lse: &mut [f32],
    want_lse: bool,
) {
    for (lane, lse) in lse.iter_mut().enumerate() {
        let l = run.l[lane];
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        let row = &mut out[lane * o_stride..][..d];
        for (c, o) in row.iter_mut().enumerate() {
            *o = T::from_f32(ot[c * MQ + lane] * inv);
        }
        if want_lse {
            *lse = if l > 0.0 { (run.m[lane] as f64 + (l as f64).ln()) as f32 } else { f32::NEG_INFINITY };
        }
    }
}

/// One query tile: `lse.len() ≤ MQ` queries from `i0` of head `h` of batch `b`. Writes the
/// output rows `out[r·o_stride..][..D]` and `lse`.
struct Tile<'a, 'c, T> {
    ctx: &'c Ctx<'a, T>,
    kv: &'c Kv<'a>,
    scratch: &'c mut Scratch,
    b: usize,
    h: usize,
    i0: usize,
    out: &'c mut [T],
    o_stride: usize,
    lse: &'c mut [f32],
}

impl<T: Float> Op for Tile<'_, '_, T> {
    type Output = ();

    #[inline(always)]
    fn run<K: Kernel>(self, kern: K) {
        let Tile { ctx, kv, scratch, b, h, i0, out, o_stride, lse } = self;
        let p = ctx.p;
        let (d, nqt) = (p.d, lse.len());
        let hk = h / (p.h / p.hkv);
        let Parts { qt, ot, s, .. } = scratch.split();
        let (qt, ot) = (&mut qt[..d * MQ], &mut ot[..d * MQ]);

        // Qᵀ, pre-scaled (one rounding per element, as a naive `(Q·scale)·Kᵀ`); lanes past the
        // tile's queries are zero.
        let (q0, qs) = place(p.layout, p.h, p.nq, d, b, h, i0);
        if nqt < MQ {
            qt.fill(0.0);
        }
        for lane in 0..nqt {
            let row = &ctx.q[q0 + lane * qs..][..d];
            for (c, x) in row.iter().enumerate() {
                qt[c * MQ + lane] = x.to_f32() * p.scale;
            }
        }
        ot.fill(0.0);
        let mut run = Running::new();
        let kp = kv.k_panels(p, b, hk);
        let v = kv.v_rows(p, b, hk);
        sweep(
            p,
            &ctx.mask,
            (b, h, i0, nqt),
            s,
            |t, sb, valid, tmax| kern.qk_panel(qt, d, &kp[t * d * RK..][..d * RK], sb, valid, tmax),
            |s, rows, j0, tmax| {
                kern.softmax(s, rows, tmax, &mut run.m, &mut run.l, &mut run.alpha);
                let vt = Rows { data: &v.data[j0 * v.stride..], stride: v.stride };
                kern.pv(s, rows, vt, d, &run.alpha, ot);
            },
        );
        finish(ot, &run, d, out, o_stride, lse, ctx.want_lse);
    }
}

/// Packs K of one (b, kv head) into panels (widened to f32).
struct PackK<'a, T> {
    k: &'a [T],
    k0: usize,
    ks: usize,
    nk: usize,
    d: usize,
    out: &'a mut [f32],
}

impl<T: Float> Op for PackK<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<K: Kernel>(self, _k: K) {
        let PackK { k, k0, ks, nk, d, out } = self;
        for (t, panel) in out.chunks_exact_mut(d * RK).enumerate() {
            for r in 0..RK {
                let j = t * RK + r;
                if j < nk {
                    let row = &k[k0 + j * ks..][..d];
                    for (c, x) in row.iter().enumerate() {
                        panel[c * RK + r] = x.to_f32();
                    }
                } else {
                    for c in 0..d {
                        panel[c * RK + r] = 0.0;
                    }
                }
            }
        }
    }
}

/// Widens V of one (b, kv head) to f32 `[Nk, D]`.
struct WidenV<'a, T> {
    v: &'a [T],
    v0: usize,
    vs: usize,
    d: usize,
    out: &'a mut [f32],
}

impl<T: Float> Op for WidenV<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<K: Kernel>(self, _k: K) {
        for (j, row) in self.out.chunks_exact_mut(self.d).enumerate() {
            for (o, x) in row.iter_mut().zip(&self.v[self.v0 + j * self.vs..][..self.d]) {
                *o = x.to_f32();
            }
        }
    }
}

/// One unit of parallel work: query tile `t` of batch `b`, head `h` (all heads when `None`, in
/// the `[B, N, H, D]` layout), with the output and lse chunks it writes.
struct Task<'a, T> {
    b: usize,
    h: Option<usize>,
    t: usize,
    out: &'a mut [T],
    lse: &'a mut [f32],
}

/// Runs `f(scratch, task)` for every task, in parallel when rayon is on, with the scratch of
/// the thread it runs on.
fn run_tasks<T: Send>(tasks: Vec<Task<'_, T>>, d: usize, f: impl Fn(&mut Scratch, Task<'_, T>) + Sync + Send) {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        tasks.into_par_iter().for_each(|t| with_scratch(d, |s| f(s, t)));
    }
    #[cfg(not(feature = "rayon"))]
    {
        tasks.into_iter().for_each(|t| with_scratch(d, |s| f(s, t)));
    }
}

/// Whether a block holds a bad value: a branch-free fold the compiler vectorises.
struct AnyBad<'a, T>(&'a [T], Bad);

impl<T: Float> Op for AnyBad<'_, T> {
    type Output = bool;

    #[inline(always)]
    fn run<K: Kernel>(self, _k: K) -> bool {
        match self.1 {
            Bad::NonFinite => self.0.iter().fold(false, |acc, x| acc | !x.to_f32().is_finite()),
            Bad::NanOrPosInf => self.0.iter().fold(false, |acc, x| {
                let x = x.to_f32();
                acc | x.is_nan() | (x == f32::INFINITY)
            }),
        }
    }
}

/// The flat index of the first bad value of `x`: blocks scanned in parallel, the culprit
/// located in the first failing block.
fn first_bad<T: Float>(isa: Isa, bad: Bad, x: &[T]) -> Option<usize> {
    const BLOCK: usize = 1 << 14;
    let first = |(c, blk): (usize, &[T])| -> Option<usize> {
        if dispatch(isa, AnyBad(blk, bad)) {
            blk.iter().position(|v| bad.test(v.to_f32())).map(|i| c * BLOCK + i)
        } else {
            None
        }
    };
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        x.par_chunks(BLOCK).enumerate().filter_map(first).min()
    }
    #[cfg(not(feature = "rayon"))]
    {
        x.chunks(BLOCK).enumerate().find_map(first)
    }
}

/// Packed K and V, owned.
enum Packed {
    /// K panels (f32) and V widened to f32 (empty when V is f32 already).
    F32 {
        kp: Vec<f32>,
        widened: Vec<f32>,
    },
    Bf16(bf16::Token, bf16::Storage),
}

/// K into f32 panels; V widened to f32 `[B, Hkv, Nk, D]` unless it is f32. One (b, kv head)
/// per parallel chunk.
fn pack_f32<T: Float>(p: &Problem<'_>, isa: Isa, k: &[T], v: &[T]) -> (Vec<f32>, Vec<f32>) {
    let d = p.d;
    let slab = p.nk.div_ceil(RK) * d * RK;
    let mut kp = vec![0.0f32; p.b * p.hkv * slab];
    if slab > 0 {
        for_each_chunk(&mut kp, slab, |i, out| {
            let (b, hk) = (i / p.hkv, i % p.hkv);
            let (k0, ks) = place(p.layout, p.hkv, p.nk, d, b, hk, 0);
            dispatch(isa, PackK { k, k0, ks, nk: p.nk, d, out });
        });
    }
    let mut widened = vec![];
    if T::DTYPE != DType::F32 && p.nk > 0 {
        widened = vec![0.0f32; p.b * p.hkv * p.nk * d];
        for_each_chunk(&mut widened, p.nk * d, |i, out| {
            let (b, hk) = (i / p.hkv, i % p.hkv);
            let (v0, vs) = place(p.layout, p.hkv, p.nk, d, b, hk, 0);
            dispatch(isa, WidenV { v, v0, vs, d, out });
        });
    }
    (kp, widened)
}

/// Forward attention on the CPU (shapes validated by the caller).
pub(crate) fn forward<T: Float>(
    p: &Problem<'_>,
    isa: Isa,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    // Inputs first (the reference reports the same error), then what this backend supports.
    check_finite(p, q, k, v, |bad, x| first_bad(isa, bad, x), |bad, x| first_bad(isa, bad, x))?;
    if p.d > DMAX {
        return Err(Error::Unsupported {
            family: Family::Attention,
            msg: format!("head dimension D = {} on the cpu backend (at most {DMAX})", p.d),
        });
    }
    if p.b == 0 || p.nq == 0 {
        return Ok(());
    }
    let d = p.d;

    // bf16 inputs on a CPU with AVX-512 BF16 take the dot-product path.
    let token = if T::DTYPE == DType::BF16 && isa == Isa::V4 { bf16::Token::try_new() } else { None };
    let packed = if let Some(token) = token {
        Packed::Bf16(token, bf16::Storage::pack(p, k, v))
    } else {
        let (kp, widened) = pack_f32(p, isa, k, v);
        Packed::F32 { kp, widened }
    };
    let kv = match &packed {
        Packed::Bf16(token, st) => KvData::Bf16(st.view(*token)),
        Packed::F32 { kp, widened } => {
            // V is used in place when it is f32, else its widened copy.
            let (v, v_bhnd) = match (T::DTYPE, bytemuck::try_cast_slice::<T, f32>(v)) {
                (DType::F32, Ok(vf)) => (vf, p.layout == QkvLayout::Bhnd),
                _ => (&widened[..], true),
            };
            KvData::F32(Kv { kp, panels: p.nk.div_ceil(RK), v, v_bhnd })
        }
    };
    let ctx = Ctx { p, mask: MaskSpec::new(p), q, kv, want_lse: lse.is_some() };
    // One query tile of one head.
    let tile =
        |scratch: &mut Scratch, b: usize, h: usize, i0: usize, out: &mut [T], o_stride: usize, lse: &mut [f32]| {
            match &ctx.kv {
                KvData::F32(kv) => dispatch(isa, Tile { ctx: &ctx, kv, scratch, b, h, i0, out, o_stride, lse }),
                KvData::Bf16(kv) => bf16::tile(&ctx, kv, scratch, (b, h, i0), out, o_stride, lse),
            }
        };
    let tiles = p.nq.div_ceil(MQ);

    match p.layout {
        QkvLayout::Bhnd => {
            let mut scratch;
            let lse = match lse {
                Some(l) => l,
                None => {
                    scratch = vec![0.0f32; p.b * p.h * p.nq];
                    &mut scratch[..]
                }
            };
            // One (b, h, query tile) per task.
            let mut tasks = Vec::with_capacity(p.b * p.h * tiles);
            for (bh, (o, l)) in out.chunks_mut(p.nq * d).zip(lse.chunks_mut(p.nq)).enumerate() {
                for (t, (out, lse)) in o.chunks_mut(MQ * d).zip(l.chunks_mut(MQ)).enumerate() {
                    tasks.push(Task { b: bh / p.h, h: Some(bh % p.h), t, out, lse });
                }
            }
            run_tasks(tasks, d, |scratch, task| {
                let Task { b, h, t, out, lse } = task;
                tile(scratch, b, h.unwrap_or(0), t * MQ, out, d, lse);
            });
        }
        QkvLayout::Bnhd => {
            // One (b, query tile) per task, all heads; the lse goes to a [B, tiles, H, MQ] scratch
            // first, since the [B, H, Nq] tiles are not contiguous.
            let mut scratch = vec![0.0f32; p.b * tiles * p.h * MQ];
            let mut tasks = Vec::with_capacity(p.b * tiles);
            for (b, (o, l)) in out.chunks_mut(p.nq * p.h * d).zip(scratch.chunks_mut(tiles * p.h * MQ)).enumerate() {
                for (t, (out, lse)) in o.chunks_mut(MQ * p.h * d).zip(l.chunks_mut(p.h * MQ)).enumerate() {
                    tasks.push(Task { b, h: None, t, out, lse });
                }
            }
            run_tasks(tasks, d, |scratch, task| {
                let Task { b, t, out, lse, .. } = task;
                let nqt = out.len() / (p.h * d);
                for (h, lse) in lse.chunks_exact_mut(MQ).enumerate() {
                    tile(scratch, b, h, t * MQ, &mut out[h * d..], p.h * d, &mut lse[..nqt]);
                }
            });
            if let Some(lse) = lse {
                for (bh, row) in lse.chunks_exact_mut(p.nq).enumerate() {
                    let (b, h) = (bh / p.h, bh % p.h);
                    for (i, x) in row.iter_mut().enumerate() {
                        *x = scratch[((b * tiles + i / MQ) * p.h + h) * MQ + i % MQ];
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 exp2 equals the scalar one bit for bit over a dense sweep.
    #[test]
    fn exp2_vector_matches_scalar() {
        let Some(simd) = V4::try_new() else {
            println!("skipped: no AVX-512");
            return;
        };
        struct Check(Vec<f32>);
        impl WithSimd for Check {
            type Output = Vec<f32>;
            #[inline(always)]
            fn with_simd<S: Simd>(self, _s: S) -> Vec<f32> {
                let k = Avx512(V4::try_new().unwrap());
                let mut out = self.0.clone();
                for c in out.chunks_exact_mut(LANES) {
                    st(k.exp2(ld(c)), c);
                }
                out
            }
        }
        let mut xs: Vec<f32> = (0..200_000).map(|i| -170.0 + i as f32 * (300.0 / 200_000.0)).collect();
        xs.extend([f32::NEG_INFINITY, -0.0, 0.0, -126.0, -126.5, -149.0, -149.5, -150.0, 127.0, 200.0, -1e30, 1e-30]);
        xs.resize(xs.len().next_multiple_of(LANES), 0.5);
        let got = Simd::vectorize(simd, Check(xs.clone()));
        for (x, g) in xs.iter().zip(&got) {
            assert_eq!(g.to_bits(), exp2(*x).to_bits(), "exp2({x})");
        }
    }
}
