//! bf16 screening of the bipartite scores, on AVX-512 CPUs with AVX512-BF16 (`vdpbf16ps`).
//!
//! The contract's f32 score costs one f32 FMA per channel; `vdpbf16ps` does two bf16 products
//! per lane in the same time. So the scores are first estimated from bf16-rounded normalised
//! rows, and only the B tokens that can still be the best are scored exactly, with the very
//! fma chain of the contract. The plan is therefore bit-identical to the f32 tiles'.
//!
//! Why no best match is missed: let `u` be a normalised row (`‖u‖ ≤ 1 + 2⁻¹²` for
//! `c ≤ 2¹⁶`), `û` its bf16 rounding, `e = ‖û − u‖` (bounded from above per row while
//! packing), `s` the contract's f32 score of rows `i`, `j` and `s'` the estimate. By
//! Cauchy–Schwarz, `|Σ û_i û_j − Σ u_i u_j| ≤ e_i‖û_j‖ + ‖u_i‖e_j ≤ 1.005·(e_i + e_j)`; the f32
//! sums behind `s` and `s'` each add at most `c` roundings of `2⁻²⁴` relative to a sum below
//! 1.01, `vdpbf16ps` flushes subnormals (`≤ 2⁻¹²⁶` per step) and the threshold arithmetic
//! below rounds a few times; so `|s − s'| ≤ δ_ij = 1.005·(e_i + e_j) + ε` with
//! `ε = 2.1·c·2⁻²⁴ + c·2⁻¹²⁰ + 2⁻²⁰` ([`slack`]). With `lo_j = s'_j − 1.005·e_j` and
//! `hi_j = s'_j + 1.005·e_j`, the best B token `j*` has `s(j*) ≥ max_l s(l) ≥ max_l (s'_l −
//! δ_il)`, so a token with `hi_j < max_l lo_l − 2·(1.005·e_i + ε)` scores strictly below
//! `j*`: every other token is a candidate (ties of `j*` included). For random data `e` is
//! about `2⁻¹⁰`, a few times below the worst case `2⁻⁸`, and a row has one or two candidates.
//!
//! Candidates are scored exactly by [`CHAINS`] interleaved scalar fma chains over the
//! row-major normalised rows. A panel of A rows with many candidates (near-duplicate tokens:
//! flat image regions, padding) instead runs the f32 tiles on every B panel, so the worst case
//! costs the estimate plus the plain f32 path.

use super::{fold_tile, panels_from_rows, Avx512, Geometry, Kernel, Packed};
use crate::cpu::Isa;
use core::arch::x86_64::{__m512, _CMP_GE_OQ};
use pulp::x86::V4;
use pulp::{Simd, WithSimd};
use std::sync::OnceLock;

const MR: usize = Avx512::MR;
const NR: usize = Avx512::NR;
const _: () = assert!(MR == 8 && NR == 48, "the asm tile below spells out 8 rows × 3 vectors");

/// Candidates per A row above which a panel falls back to the f32 tiles: an exact chain costs
/// about `c/1.5` cycles, a row of f32 tiles about `nb·c/16`.
const HEAVY_PER_ROW: usize = 24;

/// Exact fma chains run side by side (independent, so their latencies overlap).
const CHAINS: usize = 6;

/// The largest `c` screened (the margin grows with `c`).
const MAX_C: usize = 1 << 16;

/// Whether the scores of `c`-channel rows are screened at `isa`.
pub(super) fn available(isa: Isa, c: usize) -> bool {
    isa == Isa::V4 && c <= MAX_C && V4::try_new().is_some() && has_bf16()
}

/// CPUID leaf 7, sub-leaf 1, EAX bit 5: AVX512-BF16 (the OS's AVX-512 state support is part of
/// `V4::try_new`). Read directly: the `avx512bf16` feature name needs Rust ≥ 1.89.
fn has_bf16() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        use core::arch::x86_64::{__cpuid, __cpuid_count};
        // SAFETY: `cpuid` exists on every x86-64 CPU; sub-leaf 7.1 is read only when the
        // maximum basic leaf is at least 7. (The intrinsics are safe from Rust 1.89 on.)
        #[allow(unused_unsafe)]
        unsafe {
            __cpuid(0).eax >= 7 && __cpuid_count(7, 1).eax & (1 << 5) != 0
        }
    })
}

/// `ε` of the module docs for `c` channels.
fn slack(c: usize) -> f32 {
    let c = c as f64;
    (2.1 * c * 2f64.powi(-24) + c * 2f64.powi(-120) + 2f64.powi(-20)) as f32
}

/// The factor on the rounding error bounds (covers `‖û‖, ‖u‖ ≤ 1.005`).
const NORM: f32 = 1.005;

/// 8 × 48 estimates: `out[i·stride + j] = Σ_kp dot(a[kp·8 + i], b[kp·48 + j])` over bf16
/// pairs.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16; `a.len() ≥ 8·pairs`, `b.len() ≥ 48·pairs`,
/// `pairs ≥ 1`.
#[inline(always)]
unsafe fn approx_tile(a: &[u32], b: &[u32], pairs: usize, out: &mut [f32], stride: usize) {
    assert!(pairs >= 1 && a.len() >= MR * pairs && b.len() >= NR * pairs);
    assert!(stride >= NR && out.len() >= (MR - 1) * stride + NR);
    // SAFETY: the loop reads `pairs` rounds of 32 bytes from `a` and 192 from `b`, and writes
    // 8 rows of 192 bytes `stride` elements apart into `out`, all in bounds (asserted); the instructions
    // exist on this CPU (caller's contract); every vector register it writes is clobbered via
    // clobber_abi("C") (xmm0–31 with their upper parts); no stack use.
    unsafe {
        core::arch::asm!(
            "vpxord zmm0, zmm0, zmm0",
            "vmovaps zmm1, zmm0", "vmovaps zmm2, zmm0", "vmovaps zmm3, zmm0", "vmovaps zmm4, zmm0",
            "vmovaps zmm5, zmm0", "vmovaps zmm6, zmm0", "vmovaps zmm7, zmm0", "vmovaps zmm8, zmm0",
            "vmovaps zmm9, zmm0", "vmovaps zmm10, zmm0", "vmovaps zmm11, zmm0", "vmovaps zmm12, zmm0",
            "vmovaps zmm13, zmm0", "vmovaps zmm14, zmm0", "vmovaps zmm15, zmm0", "vmovaps zmm16, zmm0",
            "vmovaps zmm17, zmm0", "vmovaps zmm18, zmm0", "vmovaps zmm19, zmm0", "vmovaps zmm20, zmm0",
            "vmovaps zmm21, zmm0", "vmovaps zmm22, zmm0", "vmovaps zmm23, zmm0",
            "2:",
            "vmovups zmm24, zmmword ptr [rsi]",
            "vmovups zmm25, zmmword ptr [rsi + 64]",
            "vmovups zmm26, zmmword ptr [rsi + 128]",
            "vpbroadcastd zmm27, dword ptr [rdi]",
            "vdpbf16ps zmm0, zmm27, zmm24", "vdpbf16ps zmm1, zmm27, zmm25", "vdpbf16ps zmm2, zmm27, zmm26",
            "vpbroadcastd zmm28, dword ptr [rdi + 4]",
            "vdpbf16ps zmm3, zmm28, zmm24", "vdpbf16ps zmm4, zmm28, zmm25", "vdpbf16ps zmm5, zmm28, zmm26",
            "vpbroadcastd zmm29, dword ptr [rdi + 8]",
            "vdpbf16ps zmm6, zmm29, zmm24", "vdpbf16ps zmm7, zmm29, zmm25", "vdpbf16ps zmm8, zmm29, zmm26",
            "vpbroadcastd zmm30, dword ptr [rdi + 12]",
            "vdpbf16ps zmm9, zmm30, zmm24", "vdpbf16ps zmm10, zmm30, zmm25", "vdpbf16ps zmm11, zmm30, zmm26",
            "vpbroadcastd zmm31, dword ptr [rdi + 16]",
            "vdpbf16ps zmm12, zmm31, zmm24", "vdpbf16ps zmm13, zmm31, zmm25", "vdpbf16ps zmm14, zmm31, zmm26",
            "vpbroadcastd zmm27, dword ptr [rdi + 20]",
            "vdpbf16ps zmm15, zmm27, zmm24", "vdpbf16ps zmm16, zmm27, zmm25", "vdpbf16ps zmm17, zmm27, zmm26",
            "vpbroadcastd zmm28, dword ptr [rdi + 24]",
            "vdpbf16ps zmm18, zmm28, zmm24", "vdpbf16ps zmm19, zmm28, zmm25", "vdpbf16ps zmm20, zmm28, zmm26",
            "vpbroadcastd zmm29, dword ptr [rdi + 28]",
            "vdpbf16ps zmm21, zmm29, zmm24", "vdpbf16ps zmm22, zmm29, zmm25", "vdpbf16ps zmm23, zmm29, zmm26",
            "add rdi, 32",
            "add rsi, 192",
            "dec rcx",
            "jnz 2b",
            "vmovups zmmword ptr [rdx + 0], zmm0", "vmovups zmmword ptr [rdx + 64], zmm1", "vmovups zmmword ptr [rdx + 128], zmm2",
            "add rdx, r8", "vmovups zmmword ptr [rdx + 0], zmm3", "vmovups zmmword ptr [rdx + 64], zmm4",
            "vmovups zmmword ptr [rdx + 128], zmm5", "add rdx, r8", "vmovups zmmword ptr [rdx + 0], zmm6",
            "vmovups zmmword ptr [rdx + 64], zmm7", "vmovups zmmword ptr [rdx + 128], zmm8", "add rdx, r8",
            "vmovups zmmword ptr [rdx + 0], zmm9", "vmovups zmmword ptr [rdx + 64], zmm10", "vmovups zmmword ptr [rdx + 128], zmm11",
            "add rdx, r8", "vmovups zmmword ptr [rdx + 0], zmm12", "vmovups zmmword ptr [rdx + 64], zmm13",
            "vmovups zmmword ptr [rdx + 128], zmm14", "add rdx, r8", "vmovups zmmword ptr [rdx + 0], zmm15",
            "vmovups zmmword ptr [rdx + 64], zmm16", "vmovups zmmword ptr [rdx + 128], zmm17", "add rdx, r8",
            "vmovups zmmword ptr [rdx + 0], zmm18", "vmovups zmmword ptr [rdx + 64], zmm19", "vmovups zmmword ptr [rdx + 128], zmm20",
            "add rdx, r8", "vmovups zmmword ptr [rdx + 0], zmm21", "vmovups zmmword ptr [rdx + 64], zmm22",
            "vmovups zmmword ptr [rdx + 128], zmm23",
            inout("rdi") a.as_ptr() => _,
            inout("rsi") b.as_ptr() => _,
            inout("rcx") pairs => _,
            inout("rdx") out.as_mut_ptr() => _,
            in("r8") stride * 4,
            clobber_abi("C"),
            options(nostack),
        );
    }
}

const LANES: usize = 16;
const _: () = assert!(NR.is_multiple_of(LANES));

/// 16 lanes from `x[j..j + 16]`.
#[inline(always)]
fn load16(x: &[f32], j: usize) -> __m512 {
    pulp::cast(*x[j..].first_chunk::<LANES>().expect("16 lanes"))
}

/// Six exact scores at once: `s_p = fma-chain(a_p, b_p)` over `c ≥ 1` channels, the
/// contract's sequential order.
///
/// Scalar loads, side by side: the compiler would otherwise turn the six chains into vector
/// gathers, several times slower here. Each step is two loads and one fma per chain; six
/// chains cover the fma latency.
///
/// # Safety
/// The CPU must have FMA; every `a[p]`, `b[p]` must hold at least `c` elements.
#[inline(always)]
unsafe fn six_chains(a: [&[f32]; CHAINS], b: [&[f32]; CHAINS], c: usize) -> [f32; CHAINS] {
    for p in 0..CHAINS {
        assert!(a[p].len() >= c && b[p].len() >= c);
    }
    let end = |x: &[f32]| x[c..].as_ptr();
    let (s0, s1, s2, s3, s4, s5): (f32, f32, f32, f32, f32, f32);
    // SAFETY: with `rax` running from −c to −1, every load is `x_end[rax]` = `x[c + rax]` with
    // `0 ≤ c + rax < c`, inside the rows (asserted above); FMA is the caller's contract; the
    // vector registers written are clobbered via clobber_abi("C") or are outputs; no stack.
    unsafe {
        core::arch::asm!(
            "vxorps xmm0, xmm0, xmm0", "vxorps xmm1, xmm1, xmm1", "vxorps xmm2, xmm2, xmm2",
            "vxorps xmm3, xmm3, xmm3", "vxorps xmm4, xmm4, xmm4", "vxorps xmm5, xmm5, xmm5",
            "2:",
            "vmovss xmm6, dword ptr [r8 + rax*4]", "vfmadd231ss xmm0, xmm6, dword ptr [r9 + rax*4]",
            "vmovss xmm7, dword ptr [r10 + rax*4]", "vfmadd231ss xmm1, xmm7, dword ptr [r11 + rax*4]",
            "vmovss xmm8, dword ptr [r12 + rax*4]", "vfmadd231ss xmm2, xmm8, dword ptr [r13 + rax*4]",
            "vmovss xmm9, dword ptr [r14 + rax*4]", "vfmadd231ss xmm3, xmm9, dword ptr [r15 + rax*4]",
            "vmovss xmm10, dword ptr [rsi + rax*4]", "vfmadd231ss xmm4, xmm10, dword ptr [rdi + rax*4]",
            "vmovss xmm11, dword ptr [rdx + rax*4]", "vfmadd231ss xmm5, xmm11, dword ptr [rcx + rax*4]",
            "inc rax",
            "jnz 2b",
            inout("rax") -(c as isize) => _,
            in("r8") end(a[0]), in("r9") end(b[0]),
            in("r10") end(a[1]), in("r11") end(b[1]),
            in("r12") end(a[2]), in("r13") end(b[2]),
            in("r14") end(a[3]), in("r15") end(b[3]),
            in("rsi") end(a[4]), in("rdi") end(b[4]),
            in("rdx") end(a[5]), in("rcx") end(b[5]),
            lateout("xmm0") s0, lateout("xmm1") s1, lateout("xmm2") s2,
            lateout("xmm3") s3, lateout("xmm4") s4, lateout("xmm5") s5,
            clobber_abi("C"),
            options(nostack, readonly),
        );
    }
    [s0, s1, s2, s3, s4, s5]
}

/// Scores the candidates `(row in the panel, B index)` exactly, folding them into `best`
/// (ties → the lower B index). `a_rows` are the panel's rows, `b_rows` all B rows.
#[inline(always)]
fn exact(a_rows: &[f32], b_rows: &[f32], c: usize, cands: &[(u32, u32)], best: &mut [(f32, u32)]) {
    for chunk in cands.chunks(CHAINS) {
        // A short chunk repeats its last candidate.
        let pick = |p: usize| chunk[p.min(chunk.len() - 1)];
        let a: [&[f32]; CHAINS] = core::array::from_fn(|p| &a_rows[pick(p).0 as usize * c..][..c]);
        let b: [&[f32]; CHAINS] = core::array::from_fn(|p| &b_rows[pick(p).1 as usize * c..][..c]);
        // SAFETY: screening runs on AVX-512 CPUs (with FMA); every row holds `c ≥ 1` values.
        let s = unsafe { six_chains(a, b, c) };
        for (&(i, j), &s) in chunk.iter().zip(&s) {
            let b = &mut best[i as usize];
            if s > b.0 || (s == b.0 && j < b.1) {
                *b = (s, j);
            }
        }
    }
}

/// The best B (score, index) of the A rows `row0 ..` (`best.len()` of them, `row0` at a panel
/// start), as [`super::ScoreBlock`] computes them, but screened.
pub(super) fn score_block(
    pk: &Packed,
    geo: Geometry,
    row0: usize,
    skip_col0: bool,
    skip_row0: bool,
    best: &mut [(f32, u32)],
) {
    let simd = V4::try_new().expect("screening runs only where AVX-512 is available");
    Simd::vectorize(simd, Block { pk, geo, row0, skip_col0, skip_row0, best, simd });
}

struct Block<'a> {
    pk: &'a Packed,
    geo: Geometry,
    row0: usize,
    skip_col0: bool,
    skip_row0: bool,
    best: &'a mut [(f32, u32)],
    simd: V4,
}

impl WithSimd for Block<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        let Block { pk, geo, row0, skip_col0, skip_row0, best, simd } = self;
        let (c, nb, pairs, width) = (geo.c, geo.nb, geo.pairs, geo.nb_pad);
        let j_lo = skip_col0 as usize;
        if j_lo >= nb {
            return; // no target at all: every row keeps (−∞, 0)
        }
        let eps = slack(c);
        // Per column: `lo_j = s'_j − e_lo[j]`, `hi_j = s'_j + e_hi[j]`; columns that are no
        // target get `lo = −∞` (no part in the maximum) and `hi = −∞` (never a candidate).
        let (mut e_lo, mut e_hi) = (vec![f32::INFINITY; width], vec![f32::NEG_INFINITY; width]);
        for j in j_lo..nb {
            (e_lo[j], e_hi[j]) = (NORM * pk.b_errs[j], NORM * pk.b_errs[j]);
        }
        let f = simd.avx512f;
        // One A panel at a time: its estimates against every B panel, then its candidates.
        // (The B pairs of a batch mostly stay in L2 across panels.)
        let mut approx = vec![0.0f32; MR * width];
        let mut cands: Vec<(u32, u32)> = vec![];
        for (pi, best) in best.chunks_mut(MR).enumerate() {
            let ap = &pk.a_pairs[(row0 + pi * MR) * pairs..][..MR * pairs];
            for (q, bp) in pk.b_pairs.chunks_exact(NR * pairs).enumerate() {
                // SAFETY: `screen::available` checked AVX-512F and AVX512-BF16 before any
                // screening; `ap` and `bp` are whole panels of `pairs ≥ 1` rounds.
                unsafe { approx_tile(ap, bp, pairs, &mut approx[q * NR..], width) };
            }
            cands.clear();
            let first = (skip_row0 && pi == 0) as usize;
            for ii in first..best.len() {
                // (Loops, not closures, so the intrinsics inline into this AVX-512 function.)
                let row = &approx[ii * width..][..width];
                let mut vmax = f._mm512_set1_ps(f32::NEG_INFINITY);
                let mut j = 0;
                while j < width {
                    let (s, e): (__m512, __m512) = (load16(row, j), load16(&e_lo, j));
                    vmax = f._mm512_max_ps(vmax, f._mm512_sub_ps(s, e));
                    j += LANES;
                }
                let lo = pulp::cast::<__m512, [f32; LANES]>(vmax).into_iter().fold(f32::NEG_INFINITY, f32::max);
                let thr = f._mm512_set1_ps(lo - 2.0 * (NORM * pk.a_errs[row0 + pi * MR + ii] + eps));
                let mut j = 0;
                while j < width {
                    let (s, e): (__m512, __m512) = (load16(row, j), load16(&e_hi, j));
                    let mut hits = f._mm512_cmp_ps_mask::<_CMP_GE_OQ>(f._mm512_add_ps(s, e), thr);
                    while hits != 0 {
                        cands.push((ii as u32, (j + hits.trailing_zeros() as usize) as u32));
                        hits &= hits - 1;
                    }
                    j += LANES;
                }
            }
            let a_rows = &pk.a_rows[(row0 + pi * MR) * c..][..best.len() * c];
            if cands.len() <= HEAVY_PER_ROW * best.len() {
                exact(a_rows, &pk.b_rows, c, &cands, best);
                continue;
            }
            // Too many near-equal estimates: the f32 tiles, every B panel (exact and complete,
            // so the fold gives the same answer as the candidates would).
            let mut ap = vec![0.0f32; MR * c];
            let k = Avx512(simd);
            panels_from_rows(k, a_rows, c, MR, &mut ap);
            let mut ftile = [0.0f32; MR * NR];
            for (q, bp) in pk.b_panels(&geo).chunks_exact(NR * c).enumerate() {
                let j0 = q * NR;
                let lo = if q == 0 { j_lo } else { 0 };
                let hi = (nb - j0).min(NR);
                if lo >= hi {
                    continue;
                }
                k.tile(c, &ap, bp, &mut ftile);
                fold_tile(&ftile[first * NR..], NR, &mut best[first..], j0, lo, hi);
            }
        }
    }
}
