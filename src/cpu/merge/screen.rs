//! bf16 screening of the bipartite scores, on AVX-512 CPUs with AVX512-BF16 (`vdpbf16ps`).
//!
//! The contract's f32 score costs one f32 FMA per channel; `vdpbf16ps` does two bf16 products
//! per lane in the same time. So the scores are first estimated from bf16-rounded normalised
//! rows, and only the B tokens that can still be the best are scored exactly, with the very
//! fma chain of the contract. The plan is therefore bit-identical to the f32 tiles'.
//!
//! Why no best match is missed: let `u` be a normalised row (`‖u‖ ≤ 1 + 2⁻¹⁴` for
//! `c ≤ 2¹⁶`), `s*` the exact dot product of `u_a`, `u_b`, `s` the contract's f32 score and
//! `s'` the estimate. Rounding to bf16 changes each factor by at most `2⁻⁸` relatively, so
//! `|Σ û_a û_b − s*| ≤ (2⁻⁷ + 2⁻¹⁶)·Σ|u_a u_b| ≤ (2⁻⁷ + 2⁻¹⁶)·‖u_a‖‖u_b‖`; each estimate and
//! each exact score adds at most `c` roundings of `2⁻²⁴` relative to `Σ|u_a u_b|`, and
//! `vdpbf16ps` flushes subnormals (`≤ 2⁻¹²⁶` per step). Hence `|s − s'| ≤ δ` with
//! `δ = 1.02·(2⁻⁷ + 4c·2⁻²⁴) + c·2⁻¹²⁰` ([`margin`]). If `M'` is a row's largest estimate,
//! the best B token `j*` has `s'(j*) ≥ s(j*) − δ ≥ s(j) − δ ≥ s'(j) − 2δ` for every `j`, so
//! `s'(j*) ≥ M' − 2δ`: every token at or above that threshold (and ties of `j*` with it) is a
//! candidate, and every other token scores strictly below `j*`.
//!
//! Candidates are scored exactly by [`CHAINS`] interleaved scalar fma chains over the
//! row-major normalised rows. A panel of A rows with many candidates (near-duplicate tokens:
//! flat image regions, padding) instead runs the f32 tiles on every B panel, so the worst case
//! costs the estimate plus the plain f32 path.

use super::{fold_tile, panels_from_rows, Avx512, Geometry, Kernel, Packed};
use crate::cpu::Isa;
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
const CHAINS: usize = 16;

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

/// The bound δ on `|s − s'|` for `c` channels (see the module docs).
fn margin(c: usize) -> f32 {
    let c = c as f64;
    (1.02 * (2f64.powi(-7) + 4.0 * c * 2f64.powi(-24)) + c * 2f64.powi(-120)) as f32
}

/// 8 × 48 estimates: `out[i·48 + j] = Σ_kp dot(a[kp·8 + i], b[kp·48 + j])` over bf16 pairs.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16; `a.len() ≥ 8·pairs`, `b.len() ≥ 48·pairs`,
/// `pairs ≥ 1`.
#[inline(always)]
unsafe fn approx_tile(a: &[u32], b: &[u32], pairs: usize, out: &mut [f32; MR * NR]) {
    debug_assert!(pairs >= 1 && a.len() >= MR * pairs && b.len() >= NR * pairs);
    // SAFETY: the loop reads `pairs` rounds of 32 bytes from `a` and 192 from `b` (in bounds
    // by the caller's contract) and writes 24 × 64 bytes to `out` (its size); the instructions
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
            "vmovups zmmword ptr [rdx], zmm0", "vmovups zmmword ptr [rdx + 64], zmm1",
            "vmovups zmmword ptr [rdx + 128], zmm2", "vmovups zmmword ptr [rdx + 192], zmm3",
            "vmovups zmmword ptr [rdx + 256], zmm4", "vmovups zmmword ptr [rdx + 320], zmm5",
            "vmovups zmmword ptr [rdx + 384], zmm6", "vmovups zmmword ptr [rdx + 448], zmm7",
            "vmovups zmmword ptr [rdx + 512], zmm8", "vmovups zmmword ptr [rdx + 576], zmm9",
            "vmovups zmmword ptr [rdx + 640], zmm10", "vmovups zmmword ptr [rdx + 704], zmm11",
            "vmovups zmmword ptr [rdx + 768], zmm12", "vmovups zmmword ptr [rdx + 832], zmm13",
            "vmovups zmmword ptr [rdx + 896], zmm14", "vmovups zmmword ptr [rdx + 960], zmm15",
            "vmovups zmmword ptr [rdx + 1024], zmm16", "vmovups zmmword ptr [rdx + 1088], zmm17",
            "vmovups zmmword ptr [rdx + 1152], zmm18", "vmovups zmmword ptr [rdx + 1216], zmm19",
            "vmovups zmmword ptr [rdx + 1280], zmm20", "vmovups zmmword ptr [rdx + 1344], zmm21",
            "vmovups zmmword ptr [rdx + 1408], zmm22", "vmovups zmmword ptr [rdx + 1472], zmm23",
            inout("rdi") a.as_ptr() => _,
            inout("rsi") b.as_ptr() => _,
            inout("rcx") pairs => _,
            in("rdx") out.as_mut_ptr(),
            clobber_abi("C"),
            options(nostack),
        );
    }
}

/// Scores the candidates `(row in the panel, B index)` exactly, folding them into `best`
/// (ties → the lower B index). `a_rows` are the panel's rows, `b_rows` all B rows.
#[inline(always)]
fn exact(a_rows: &[f32], b_rows: &[f32], c: usize, cands: &[(u32, u32)], best: &mut [(f32, u32)]) {
    for chunk in cands.chunks(CHAINS) {
        let pick = |p: usize| chunk[p.min(chunk.len() - 1)];
        let a: [&[f32]; CHAINS] = core::array::from_fn(|p| &a_rows[pick(p).0 as usize * c..][..c]);
        let b: [&[f32]; CHAINS] = core::array::from_fn(|p| &b_rows[pick(p).1 as usize * c..][..c]);
        let mut s = [0.0f32; CHAINS];
        for k in 0..c {
            for p in 0..CHAINS {
                s[p] = a[p][k].mul_add(b[p][k], s[p]);
            }
        }
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
        let panels = best.len().div_ceil(MR);
        // Estimates of the whole block: B panel by B panel, so each stays in L2 while the
        // block's A panels pass over it.
        let mut approx = vec![0.0f32; panels * MR * width];
        let mut tile = [0.0f32; MR * NR];
        let a_pairs = &pk.a_pairs[row0 * pairs..][..panels * MR * pairs];
        for (q, bp) in pk.b_pairs.chunks_exact(NR * pairs).enumerate() {
            for (pi, ap) in a_pairs.chunks_exact(MR * pairs).enumerate() {
                // SAFETY: `screen::available` checked AVX-512F and AVX512-BF16 before any
                // screening; `ap` and `bp` are whole panels of `pairs ≥ 1` rounds.
                unsafe { approx_tile(ap, bp, pairs, &mut tile) };
                for (ii, t) in tile.chunks_exact(NR).enumerate() {
                    approx[(pi * MR + ii) * width + q * NR..][..NR].copy_from_slice(t);
                }
            }
        }
        let j_lo = skip_col0 as usize;
        if j_lo >= nb {
            return; // no target at all: every row keeps (−∞, 0)
        }
        let two_delta = 2.0 * margin(c);
        let mut cands: Vec<(u32, u32)> = vec![];
        for (pi, best) in best.chunks_mut(MR).enumerate() {
            cands.clear();
            let first = (skip_row0 && pi == 0) as usize;
            for ii in first..best.len() {
                let row = &approx[(pi * MR + ii) * width..][j_lo..nb];
                let thr = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s)) - two_delta;
                cands.extend(
                    row.iter().enumerate().filter(|&(_, &s)| s >= thr).map(|(j, _)| (ii as u32, (j_lo + j) as u32)),
                );
            }
            let a_rows = &pk.a_rows[(row0 + pi * MR) * c..][..best.len() * c];
            if cands.len() <= HEAVY_PER_ROW * best.len() {
                exact(a_rows, &pk.b_rows, c, &cands, best);
                continue;
            }
            // Too many near-equal estimates: the f32 tiles, every B panel (exact and complete,
            // so the fold gives the same answer as the candidates would).
            let mut ap = vec![0.0f32; MR * c];
            panels_from_rows(a_rows, c, MR, &mut ap);
            let k = Avx512(simd);
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
