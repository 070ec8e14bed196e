//! The bf16 path: AVX-512 BF16 dot products (`vdpbf16ps`: two bf16 products summed into each
//! f32 lane per instruction, twice the f32 FMA rate) for bf16 inputs on CPUs that have them.
//!
//! Same loop nest as the f32 path ([`super::sweep`]), different operands: each is a pair of bf16
//! values in one 32-bit lane, paired along the reduction dimension.
//! - `Qᵀ` pairs `[⌈D/2⌉, MQ]`: lane `i` of row `c` holds `(q[i, 2c], q[i, 2c+1])`, the input
//!   itself: the scale multiplies the f32 scores, so Q is not rounded again.
//! - K panels `[⌈D/2⌉, RK]` of pairs `(k[j, 2c], k[j, 2c+1])`, packed once per call.
//! - `Pᵀ` pairs `[KT/2, MQ]`: `(p[2r, i], p[2r+1, i])`, the probabilities rounded to bf16
//!   (nearest even) as FlashAttention rounds them for its second product; the running sum `l`
//!   adds them before rounding. Since they are rounded to 8 bits, `2^x` takes a degree-3
//!   polynomial here ([`EXP2_BF16`]).
//! - V pairs `[⌈Nk/2⌉, D]`: `(v[2r, c], v[2r+1, c])`, packed once per call.
//!
//! Odd `D` and odd `Nk` are padded with zeros. Products are exact in f32 and accumulate in f32;
//! `vdpbf16ps` flushes subnormal inputs and results to zero (magnitudes below 1.2·10⁻³⁸).
//!
//! The two BF16 instructions are written with `asm!`: `std::arch`'s AVX-512 intrinsics (and
//! `__m512bh`) are stable only since Rust 1.89, above the crate's MSRV; everything else goes
//! through pulp's `V4` wrappers. Every function here enables the same target features: pulp's
//! V4 set plus `avx512bf16`.

use core::arch::x86_64::{__m512, __m512i, _CMP_EQ_OQ};

use super::{finish, ld, place, st, sweep, Avx512, Ctx, Parts, Running, Scratch, KT, LANES, LOG2_E, MQ, QV, RD, RK};
use crate::attention::Problem;
use crate::cpu::par::for_each_chunk;
use crate::dtype::Float;
use pulp::x86::V4;

// Pairs of keys start on panel boundaries, and P pairs fill the tile.
const _: () = assert!(RK.is_multiple_of(2) && KT.is_multiple_of(2));

/// Minimax coefficients of `2^f` on `[−½, ½]`, degree 3 with `2^0 = 1` exactly (so the largest
/// score of a row weighs exactly 1): relative error at most 1.02·10⁻⁴ (tested), far below the
/// 2⁻⁹ of the bf16 rounding that follows. For the probabilities only; the rescale factors use
/// the full [`super::exp2`].
pub(super) const EXP2_BF16: [f32; 4] = [1.0, 0.693_282_9, 0.242_210_97, 0.055_008_93];

/// Proof that this CPU has AVX-512 (pulp's V4) and AVX-512 BF16.
#[derive(Clone, Copy)]
pub(super) struct Token(V4);

impl Token {
    pub(super) fn try_new() -> Option<Token> {
        let v4 = V4::try_new()?;
        std::is_x86_feature_detected!("avx512bf16").then_some(Token(v4))
    }
}

/// bf16 bits of an element (exact for bf16: the top half of its f32 widening).
#[inline(always)]
fn bits<T: Float>(x: T) -> u32 {
    x.to_f32().to_bits() >> 16
}

/// Element 0 in the low half, as `vdpbf16ps` pairs `[2i, 2i+1]`.
#[inline(always)]
fn pair(lo: u32, hi: u32) -> u32 {
    lo | hi << 16
}

/// Packed K and V, owned.
pub(super) struct Storage {
    kp: Vec<u32>,
    vp: Vec<u32>,
    panels: usize,
    d2: usize,
    np: usize,
    d: usize,
    hkv: usize,
}

/// Packed K and V, borrowed.
pub(super) struct Kv<'a> {
    pub(super) token: Token,
    st: &'a Storage,
}

impl Storage {
    /// Packs K into pair panels and V into row pairs, one (b, kv head) per parallel chunk.
    /// `T` must be bf16.
    pub(super) fn pack<T: Float>(p: &Problem<'_>, k: &[T], v: &[T]) -> Storage {
        let (d, nk) = (p.d, p.nk);
        let (panels, d2, np) = (nk.div_ceil(RK), d.div_ceil(2), nk.div_ceil(2));
        let kslab = panels * d2 * RK;
        let mut kp = vec![0u32; p.b * p.hkv * kslab];
        if kslab > 0 {
            for_each_chunk(&mut kp, kslab, |i, out| {
                let (k0, ks) = place(p.layout, p.hkv, nk, d, i / p.hkv, i % p.hkv, 0);
                for (t, panel) in out.chunks_exact_mut(d2 * RK).enumerate() {
                    for r in 0..RK.min(nk - t * RK) {
                        let row = &k[k0 + (t * RK + r) * ks..][..d];
                        for (c, two) in row.chunks(2).enumerate() {
                            panel[c * RK + r] = pair(bits(two[0]), two.get(1).map_or(0, |x| bits(*x)));
                        }
                    }
                }
            });
        }
        let vslab = np * d;
        let mut vp = vec![0u32; p.b * p.hkv * vslab];
        if vslab > 0 {
            for_each_chunk(&mut vp, vslab, |i, out| {
                let (v0, vs) = place(p.layout, p.hkv, nk, d, i / p.hkv, i % p.hkv, 0);
                for (r, prow) in out.chunks_exact_mut(d).enumerate() {
                    let even = &v[v0 + 2 * r * vs..][..d];
                    let odd = (2 * r + 1 < nk).then(|| &v[v0 + (2 * r + 1) * vs..][..d]);
                    for (c, x) in prow.iter_mut().enumerate() {
                        *x = pair(bits(even[c]), odd.map_or(0, |o| bits(o[c])));
                    }
                }
            });
        }
        Storage { kp, vp, panels, d2, np, d, hkv: p.hkv }
    }

    pub(super) fn view(&self, token: Token) -> Kv<'_> {
        Kv { token, st: self }
    }
}

impl Kv<'_> {
    fn k_panels(&self, b: usize, hk: usize) -> &[u32] {
        let len = self.st.panels * self.st.d2 * RK;
        &self.st.kp[(b * self.st.hkv + hk) * len..][..len]
    }

    fn v_pairs(&self, b: usize, hk: usize) -> &[u32] {
        let len = self.st.np * self.st.d;
        &self.st.vp[(b * self.st.hkv + hk) * len..][..len]
    }
}

/// 16 lanes of bf16 pairs from `x[..16]`.
#[inline(always)]
fn ld_pairs(x: &[u32]) -> __m512i {
    let a: &[u32; LANES] = x[..LANES].try_into().unwrap();
    pulp::cast(*a)
}

/// `vdpbf16ps`: `acc[i] += a.bf16[2i]·b.bf16[2i] + a.bf16[2i+1]·b.bf16[2i+1]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
fn dpbf16(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
    let mut acc = acc;
    // SAFETY: the instruction exists (the caller's target features include AVX-512 BF16); it
    // reads and writes only the named registers.
    unsafe {
        core::arch::asm!(
            "vdpbf16ps {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// `vcvtne2ps2bf16`: words 0..16 are `lo` rounded to bf16 (nearest even), words 16..32 `hi`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
fn cvt2bf16(hi: __m512, lo: __m512) -> __m512i {
    let out: __m512i;
    // SAFETY: as in `dpbf16`.
    unsafe {
        core::arch::asm!(
            "vcvtne2ps2bf16 {out}, {hi}, {lo}",
            out = lateout(zmm_reg) out,
            hi = in(zmm_reg) hi,
            lo = in(zmm_reg) lo,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    out
}

/// One query tile (see [`super::Tile`]), on the bf16 path.
pub(super) fn tile<T: Float>(
    ctx: &Ctx<'_, T>,
    kv: &Kv<'_>,
    scratch: &mut Scratch,
    at: (usize, usize, usize),
    out: &mut [T],
    o_stride: usize,
    lse: &mut [f32],
) {
    // SAFETY: `kv.token` exists only if the CPU has AVX-512 (V4) and AVX-512 BF16, every
    // feature `tile_impl` enables.
    unsafe { tile_impl(ctx, kv, scratch, at, out, o_stride, lse) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
fn tile_impl<T: Float>(
    ctx: &Ctx<'_, T>,
    kv: &Kv<'_>,
    scratch: &mut Scratch,
    (b, h, i0): (usize, usize, usize),
    out: &mut [T],
    o_stride: usize,
    lse: &mut [f32],
) {
    let p = ctx.p;
    let (d, d2, nqt) = (p.d, p.d.div_ceil(2), lse.len());
    let hk = h / (p.h / p.hkv);
    let k = Avx512(kv.token.0);
    let Parts { qt, ot, s, pt } = scratch.split();
    let qt: &mut [u32] = &mut bytemuck::cast_slice_mut(qt)[..d2 * MQ];
    let pt: &mut [u32] = bytemuck::cast_slice_mut(pt);
    let ot = &mut ot[..d * MQ];

    // Qᵀ pairs; lanes past the tile's queries are zero.
    let (q0, qs) = place(p.layout, p.h, p.nq, d, b, h, i0);
    if nqt < MQ {
        qt.fill(0);
    }
    for lane in 0..nqt {
        let row = &ctx.q[q0 + lane * qs..][..d];
        for (c, two) in row.chunks(2).enumerate() {
            qt[c * MQ + lane] = pair(bits(two[0]), two.get(1).map_or(0, |x| bits(*x)));
        }
    }
    ot.fill(0.0);
    let mut run = Running::new();
    let kp = kv.k_panels(b, hk);
    let vp = kv.v_pairs(b, hk);
    sweep(
        p,
        &ctx.mask,
        (b, h, i0, nqt),
        s,
        |t, sb, valid, tmax| qk_panel(k, qt, d2, &kp[t * d2 * RK..][..d2 * RK], p.scale, sb, valid, tmax),
        |s, rows, j0, tmax| {
            softmax_pairs(k, s, rows, tmax, &mut run, pt);
            pv(k, pt, rows.div_ceil(2), &vp[j0 / 2 * d..], d, &run.alpha, ot);
        },
    );
    finish(ot, &run, d, out, o_stride, lse, ctx.want_lse);
}

/// `s[r][·] = scale · Σ_c kp[c·RK + r] · qt[c][·]` (pairs), and the lane-wise max of the first
/// `valid` rows folded into `mx`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
#[allow(clippy::too_many_arguments)]
fn qk_panel(k: Avx512, qt: &[u32], d2: usize, kp: &[u32], scale: f32, s: &mut [f32], valid: usize, mx: &mut [f32; MQ]) {
    let f = k.0.avx512f;
    let mut acc = [[f._mm512_setzero_ps(); QV]; RK];
    for (q, kr) in qt.chunks_exact(MQ).zip(kp.chunks_exact(RK)).take(d2) {
        let qv: [__m512i; QV] = core::array::from_fn(|i| ld_pairs(&q[i * LANES..]));
        for (a, &x) in acc.iter_mut().zip(kr) {
            let kb = f._mm512_set1_epi32(x as i32);
            for i in 0..QV {
                a[i] = dpbf16(a[i], qv[i], kb);
            }
        }
    }
    let sc = f._mm512_set1_ps(scale);
    let mut m: [__m512; QV] = core::array::from_fn(|i| ld(&mx[i * LANES..]));
    for (r, (a, srow)) in acc.iter().zip(s.chunks_exact_mut(MQ)).enumerate() {
        for i in 0..QV {
            let x = f._mm512_mul_ps(a[i], sc);
            st(x, &mut srow[i * LANES..]);
            if r < valid {
                m[i] = f._mm512_max_ps(m[i], x);
            }
        }
    }
    for i in 0..QV {
        st(m[i], &mut mx[i * LANES..]);
    }
}

/// The online softmax of [`super::Kernel::softmax`], writing `P` as bf16 pairs of rows into `pt`
/// (a zero row pads an odd count).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
fn softmax_pairs(k: Avx512, s: &[f32], rows: usize, tmax: &[f32; MQ], run: &mut Running, pt: &mut [u32]) {
    let (f, bw) = (k.0.avx512f, k.0.avx512bw);
    // Word 2i ← word i (row 2r, lane i), word 2i + 1 ← word 16 + i (row 2r + 1, lane i).
    let idx: [u16; 2 * LANES] = core::array::from_fn(|w| (w / 2 + (w % 2) * LANES) as u16);
    let idx: __m512i = pulp::cast(idx);
    let log2e = f._mm512_set1_ps(LOG2_E);
    let s = &s[..rows * MQ];
    for q in 0..QV {
        let lane = q * LANES;
        let mx = f._mm512_max_ps(ld(&run.m[lane..]), ld(&tmax[lane..]));
        let masked = f._mm512_cmp_ps_mask::<_CMP_EQ_OQ>(mx, f._mm512_set1_ps(f32::NEG_INFINITY));
        let m_use = f._mm512_mask_blend_ps(masked, mx, f._mm512_setzero_ps());
        let e = |r: usize| {
            let x = f._mm512_mul_ps(f._mm512_sub_ps(ld(&s[r * MQ + lane..]), m_use), log2e);
            k.exp2_with(x, &EXP2_BF16)
        };
        let mut sum = [f._mm512_setzero_ps(); 2];
        for (r2, prow) in pt.chunks_exact_mut(MQ).take(rows.div_ceil(2)).enumerate() {
            let e0 = e(2 * r2);
            let e1 = if 2 * r2 + 1 < rows { e(2 * r2 + 1) } else { f._mm512_setzero_ps() };
            sum[0] = f._mm512_add_ps(sum[0], e0);
            sum[1] = f._mm512_add_ps(sum[1], e1);
            let packed = bw._mm512_permutexvar_epi16(idx, cvt2bf16(e1, e0));
            let out: &mut [u32; LANES] = (&mut prow[lane..lane + LANES]).try_into().unwrap();
            *out = pulp::cast(packed);
        }
        let total = f._mm512_add_ps(sum[0], sum[1]);
        let a = k.exp2(f._mm512_mul_ps(f._mm512_sub_ps(ld(&run.m[lane..]), m_use), log2e));
        st(a, &mut run.alpha[lane..]);
        st(f._mm512_fmadd_ps(ld(&run.l[lane..]), a, total), &mut run.l[lane..]);
        st(mx, &mut run.m[lane..]);
    }
}

/// `ot[c][·] = alpha·ot[c][·] + Σ_r vp[r·d + c] · pt[r][·]` over `pairs` row pairs, `c < d`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
fn pv(k: Avx512, pt: &[u32], pairs: usize, vp: &[u32], d: usize, alpha: &[f32; MQ], ot: &mut [f32]) {
    let al: [__m512; QV] = core::array::from_fn(|q| ld(&alpha[q * LANES..]));
    let mut c = 0;
    while c + RD <= d {
        pv_block::<RD>(k, pt, pairs, &vp[c..], d, &al, &mut ot[c * MQ..]);
        c += RD;
    }
    while c + 4 <= d {
        pv_block::<4>(k, pt, pairs, &vp[c..], d, &al, &mut ot[c * MQ..]);
        c += 4;
    }
    while c < d {
        pv_block::<1>(k, pt, pairs, &vp[c..], d, &al, &mut ot[c * MQ..]);
        c += 1;
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
fn pv_block<const R: usize>(
    k: Avx512,
    pt: &[u32],
    pairs: usize,
    vp: &[u32],
    vs: usize,
    al: &[__m512; QV],
    ot: &mut [f32],
) {
    let f = k.0.avx512f;
    let mut acc = [[f._mm512_setzero_ps(); QV]; R];
    // One check per row (each chunk of `vp` holds at least R values: the caller's blocks end
    // within the row), and a fixed-size row so that the accumulators stay in registers.
    for (prow, vrow) in pt.chunks_exact(MQ).take(pairs).zip(vp.chunks(vs)) {
        let Some(vrow) = vrow.first_chunk::<R>() else { break };
        let pv: [__m512i; QV] = core::array::from_fn(|q| ld_pairs(&prow[q * LANES..]));
        for (a, &x) in acc.iter_mut().zip(vrow) {
            let vb = f._mm512_set1_epi32(x as i32);
            for q in 0..QV {
                a[q] = dpbf16(a[q], pv[q], vb);
            }
        }
    }
    for (a, orow) in acc.iter().zip(ot.chunks_exact_mut(MQ)) {
        for q in 0..QV {
            let o = &mut orow[q * LANES..];
            st(f._mm512_fmadd_ps(ld(o), al[q], a[q]), o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The degree-3 `2^x` of the probabilities against f64, where the result is normal.
    #[test]
    fn exp2_bf16_accuracy() {
        let Some(v4) = V4::try_new() else {
            println!("skipped: no AVX-512");
            return;
        };
        struct Sweep(V4);
        impl pulp::WithSimd for Sweep {
            type Output = f64;
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _s: S) -> f64 {
                let k = Avx512(self.0);
                let mut worst = 0.0f64;
                let mut x = [0.0f32; LANES];
                for step in 0..200_000 {
                    for (l, v) in x.iter_mut().enumerate() {
                        *v = -126.0 + (step * LANES + l) as f32 * (126.0 / (200_000 * LANES) as f32);
                    }
                    let mut y = [0.0f32; LANES];
                    st(k.exp2_with(ld(&x), &EXP2_BF16), &mut y);
                    for (a, b) in x.iter().zip(&y) {
                        let want = (*a as f64).exp2();
                        worst = worst.max((*b as f64 - want).abs() / want);
                    }
                }
                worst
            }
        }
        let worst = pulp::Simd::vectorize(v4, Sweep(v4));
        println!("degree-3 exp2: max relative error {worst:e}");
        assert!(worst <= 1.02e-4, "{worst:e}");
    }
}
