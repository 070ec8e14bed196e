//! Reference patchify / unpatchify: one output element at a time, straight from the contract
//! in [`crate::patchify`]. Slow and obvious on purpose.
//!
//! Public entry points: [`patchify`](super::patchify()), [`unpatchify`](super::unpatchify).

use crate::dtype::{Element, Float};
use crate::patchify::{Layout, PatchOrder, Patchify};

/// Index of pixel (b, c, t, h, w) in the dense image, from the dims alone.
fn image_index(p: &Patchify, b: usize, c: usize, t: usize, h: usize, w: usize) -> usize {
    let g = p.geometry();
    let (cc, tt, hh, ww) = (g.channels, g.frames, g.height, g.width);
    match g.layout {
        Layout::ChannelsFirst => (((b * cc + c) * tt + t) * hh + h) * ww + w,
        Layout::ChannelsLast => (((b * tt + t) * hh + h) * ww + w) * cc + c,
    }
}

/// Position of pixel (c, dt, dh, dw) within a token.
fn patch_index(p: &Patchify, c: usize, dt: usize, dh: usize, dw: usize) -> usize {
    let g = p.geometry();
    let [pt, ph, pw] = g.patch;
    match g.order {
        PatchOrder::Cpq => ((c * pt + dt) * ph + dh) * pw + dw,
        PatchOrder::Pqc => ((dt * ph + dh) * pw + dw) * g.channels + c,
    }
}

/// Visits every (image pixel or padding, token element) pair: `f(image_index, token_index, c)`
/// with `image_index = None` for padded positions.
fn for_each_pair(p: &Patchify, mut f: impl FnMut(Option<usize>, usize, usize)) {
    let g = p.geometry();
    let [pt, ph, pw] = g.patch;
    let [gt, gh, gw] = g.grid;
    for b in 0..g.batch {
        for it in 0..gt {
            for ih in 0..gh {
                for iw in 0..gw {
                    let token = (b * gt * gh * gw) + (it * gh + ih) * gw + iw;
                    for c in 0..g.channels {
                        for dt in 0..pt {
                            for dh in 0..ph {
                                for dw in 0..pw {
                                    let (t, h, w) = (it * pt + dt, ih * ph + dh, iw * pw + dw);
                                    let inside = t < g.frames && h < g.height && w < g.width;
                                    let src = inside.then(|| image_index(p, b, c, t, h, w));
                                    let dst = token * g.patch_len + patch_index(p, c, dt, dh, dw);
                                    f(src, dst, c);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Image → tokens. Lengths were checked by the caller.
pub(crate) fn forward<I: Element, O: Float>(p: &Patchify, image: &[I], tokens: &mut [O]) {
    let k = p.coefficients();
    for_each_pair(p, |src, dst, c| {
        tokens[dst] = match src {
            Some(s) => O::from_f32(image[s].to_f32().mul_add(k.a[c], k.b[c])),
            None => O::from_f32(0.0),
        };
    });
}

/// Tokens → image. Lengths were checked by the caller.
pub(crate) fn inverse<I: Float, O: Element>(p: &Patchify, tokens: &[I], image: &mut [O]) {
    let k = p.coefficients();
    for_each_pair(p, |src, dst, c| {
        if let Some(s) = src {
            image[s] = O::from_f32(tokens[dst].to_f32().mul_add(k.inv_a[c], k.inv_b[c]));
        }
    });
}
