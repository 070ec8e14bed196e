//! The portable argmin kernel: plain loops over 16-lane arrays that the compiler vectorises
//! (with AVX2 + FMA under `Isa::V3`). `FLUSH` selects the bf16 chain: subnormal inputs read as
//! zero and every subnormal partial sum flushed to a zero of its sign, which is what
//! `vdpbf16ps` does — so the indices match the AVX-512 BF16 kernel's bit for bit.

use super::{valid_mask, Kernel, Lanes, Score};
use crate::argmin::{Prepared, GROUP};
use crate::dtype::Float;

/// Rows per micro-block.
const MR: usize = 4;
/// Codes per tile: one group.
const NR: usize = GROUP;

#[derive(Clone, Copy)]
pub(crate) struct Portable<const FLUSH: bool>;

/// A subnormal becomes a zero of the same sign (zeros and normal values pass unchanged).
#[inline(always)]
fn flush(v: f32) -> f32 {
    // On the bits (keep the sign, clear the rest), which the compiler vectorises.
    let b = v.to_bits();
    let tiny = b & 0x7fff_ffff < f32::MIN_POSITIVE.to_bits();
    f32::from_bits(if tiny { b & 0x8000_0000 } else { b })
}

impl<const FLUSH: bool> Kernel for Portable<FLUSH> {
    type X = f32;

    fn mr(self, _d: usize) -> usize {
        MR
    }

    fn width(self, d: usize) -> usize {
        d
    }

    #[inline(always)]
    fn value<T: Float>(self, row: &[T], j: usize) -> f32 {
        let v = row[j].to_f32();
        if FLUSH {
            flush(v)
        } else {
            v
        }
    }

    #[inline(always)]
    fn search<S: Score>(self, p: &Prepared, panel: &[f32], lanes: &mut [Lanes]) {
        let d = p.d;
        for (g, (tile, bias)) in p.tiles.chunks_exact(d * NR).zip(p.bias.chunks_exact(NR)).enumerate() {
            if g * NR >= p.k {
                break;
            }
            let valid = valid_mask(p.k, g);
            let base = (g * NR) as u32;
            for (xp, ln) in panel.chunks_exact(d * MR).zip(lanes.chunks_exact_mut(MR)) {
                // Fixed-size arrays, so that the compiler sees 16-lane loops and vectorises them.
                let mut acc = [[0.0f32; NR]; MR];
                for (xs, es) in xp.chunks_exact(MR).zip(tile.chunks_exact(NR)) {
                    let xs: &[f32; MR] = xs.try_into().unwrap();
                    let es: &[f32; NR] = es.try_into().unwrap();
                    for (a, &x) in acc.iter_mut().zip(xs) {
                        for l in 0..NR {
                            let e = if FLUSH { flush(es[l]) } else { es[l] };
                            let v = x.mul_add(e, a[l]);
                            a[l] = if FLUSH { flush(v) } else { v };
                        }
                    }
                }
                let bias: &[f32; NR] = bias.try_into().unwrap();
                for (a, l) in acc.iter().zip(ln.iter_mut()) {
                    for j in 0..NR {
                        let s = S::scalar(a[j], bias[j]);
                        let take = (valid >> j & 1 != 0) & (s < l.s[j]);
                        l.s[j] = if take { s } else { l.s[j] };
                        l.i[j] = if take { base + j as u32 } else { l.i[j] };
                    }
                }
            }
        }
    }
}
