//! CPU patchify / unpatchify.
//!
//! Loop nest (the micro-kernels are in [`crate::cpu::simd`]):
//! - forward: threads take chunks of whole token rows (the `gw` tokens of one `(b, t, h)` band
//!   of patches); a row is built in blocks of ~16 KiB of tokens. For each patch row `(dt, dh)`
//!   the image row segment under the block feeds all its tokens in one micro-kernel call: runs
//!   of `pw` values per channel (`cpq`) or `pw·C` values (`pqc`), scattered at the token
//!   stride. NCHW + `cpq` and NHWC + `pqc` read the image directly; the two transposing
//!   combinations first gather the segment into token order (a scalar pass over the input
//!   type, before the conversion). Large outputs are staged per block and streamed out.
//! - inverse: threads take chunks of whole image rows (`(b, c, t, h)` for NCHW, `(b, t, h)` for
//!   NHWC — contiguous in the image), and each row is filled token by token the same way.
//!
//! Padded tokens are zero-filled first and then only their in-image extent is written.

use crate::cpu::par::{for_each_chunk, units_per_chunk};
use crate::cpu::simd::{dispatch, KernelOp, RunKernel};
use crate::cpu::Isa;
use crate::dtype::{Element, Float};
use crate::error::Result;
use crate::patchify::{Geometry, Layout, PatchOrder, Patchify, Strides};

/// Outputs at least this large are written with streaming stores: they would not stay in
/// cache anyway, and skipping the read-for-ownership of each line is most of the win of a
/// memory-bound permutation.
const STREAMING_BYTES: usize = 8 << 20;

/// What every chunk needs: geometry, strides and coefficients, the latter also repeated
/// `pw` times (`rep_*[dw·C + c] = coef[c]`) for runs that span channels.
struct Ctx<'a> {
    g: &'a Geometry,
    s: Strides,
    a: &'a [f32],
    b: &'a [f32],
    rep_a: Vec<f32>,
    rep_b: Vec<f32>,
    /// Write the output with cache-bypassing stores (it is far larger than the caches).
    streaming: bool,
}

impl<'a> Ctx<'a> {
    fn new(g: &'a Geometry, a: &'a [f32], b: &'a [f32], out_bytes: usize) -> Self {
        let pw = g.patch[2];
        let rep = |v: &[f32]| v.iter().copied().cycle().take(pw * v.len()).collect();
        Ctx { g, s: g.strides(), a, b, rep_a: rep(a), rep_b: rep(b), streaming: out_bytes >= STREAMING_BYTES }
    }
}

/// Image → tokens.
pub(crate) fn forward<I: Element, O: Float>(p: &Patchify, isa: Isa, image: &[I], tokens: &mut [O]) -> Result<()> {
    let g = p.geometry();
    let k = p.coefficients();
    let ctx = Ctx::new(g, &k.a, &k.b, std::mem::size_of_val(tokens));
    // Threads take whole token rows (gw tokens: one (b, t, h) band of patches).
    let row_len = g.grid[2] * g.patch_len;
    let per_chunk = units_per_chunk(row_len * std::mem::size_of::<O>());
    for_each_chunk(tokens, per_chunk * row_len, |i, out| {
        dispatch(isa, ForwardChunk { ctx: &ctx, image, first_row: i * per_chunk, out });
    });
    Ok(())
}

/// Tokens built per block: about 16 KiB of output, so a block stays in L1 while it is
/// assembled and then streamed out.
fn block_tokens<O>(patch_len: usize) -> usize {
    (16 * 1024 / (patch_len * std::mem::size_of::<O>()).max(1)).max(1)
}

struct ForwardChunk<'a, 'b, I, O> {
    ctx: &'b Ctx<'a>,
    image: &'b [I],
    first_row: usize,
    out: &'b mut [O],
}

impl<I: Element, O: Float> KernelOp for ForwardChunk<'_, '_, I, O> {
    type Output = ();

    #[inline(always)]
    fn run<K: RunKernel>(self, k: K) {
        let ForwardChunk { ctx, image, first_row, out } = self;
        let g = ctx.g;
        let (p_len, gw) = (g.patch_len, g.grid[2]);
        let nb = block_tokens::<O>(p_len);
        let streaming = ctx.streaming && K::STREAMS;
        let mut tmp = vec![I::from_f32(0.0); nb * g.patch[2] * g.channels];
        let mut stage = vec![O::from_f32(0.0); if streaming { nb * p_len } else { 0 }];
        for (r, row) in out.chunks_exact_mut(gw * p_len).enumerate() {
            for (bi, block) in row.chunks_mut(nb * p_len).enumerate() {
                let first = (first_row + r) * gw + bi * nb;
                if streaming {
                    let staged = &mut stage[..block.len()];
                    forward_block(k, ctx, image, first, staged, &mut tmp);
                    k.copy_streaming(staged, block);
                } else {
                    forward_block(k, ctx, image, first, block, &mut tmp);
                }
            }
        }
        if streaming {
            k.fence();
        }
    }
}

/// Consecutive tokens `first..` of one token row into `out` (whole tokens). For each patch
/// row `(dt, dh)`, one image row segment feeds all tokens of the block in one micro-kernel
/// call. Where the segment is not already in token order (NHWC + `cpq`, NCHW + `pqc`) it is
/// first gathered into `tmp` in token order (a cheap scalar pass over the input type).
#[inline(always)]
fn forward_block<K: RunKernel, I: Element, O: Float>(
    k: K,
    ctx: &Ctx<'_>,
    image: &[I],
    first: usize,
    out: &mut [O],
    tmp: &mut [I],
) {
    let g = ctx.g;
    let pw = g.patch[2];
    let p_len = g.patch_len;
    let n = out.len() / p_len;
    let iw = first % g.tokens % g.grid[2];
    // The last token of a row may overhang the image width: it goes alone, with its width.
    if (iw + n) * pw > g.width {
        let vw = g.width - (iw + n - 1) * pw;
        let (full, last) = out.split_at_mut((n - 1) * p_len);
        forward_runs(k, ctx, image, first, n - 1, pw, full, tmp);
        forward_runs(k, ctx, image, first + n - 1, 1, vw, last, tmp);
    } else {
        forward_runs(k, ctx, image, first, n, pw, out, tmp);
    }
}

/// `n` tokens from `first` whose in-image width is `vw` (`vw == pw` whenever `n > 1`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_runs<K: RunKernel, I: Element, O: Float>(
    k: K,
    ctx: &Ctx<'_>,
    image: &[I],
    first: usize,
    n: usize,
    vw: usize,
    out: &mut [O],
    tmp: &mut [I],
) {
    if n == 0 {
        return;
    }
    let (g, s) = (ctx.g, ctx.s);
    let [pt, ph, pw] = g.patch;
    let [_, gh, gw] = g.grid;
    let (c_n, p_len) = (g.channels, g.patch_len);
    let (b, l) = (first / g.tokens, first % g.tokens);
    let (it, ih, iw) = (l / (gh * gw), l / gw % gh, l % gw);
    let (t0, h0) = (it * pt, ih * ph);
    let (vt, vh) = (pt.min(g.frames - t0), ph.min(g.height - h0));
    if (vt, vh, vw) != (pt, ph, pw) {
        out.fill(O::from_f32(0.0));
    }
    let origin = b * s.batch + t0 * s.t + h0 * s.h + iw * pw * s.w;
    let m = n * vw; // pixels per channel in this row segment
    for dt in 0..vt {
        for dh in 0..vh {
            let row = origin + dt * s.t + dh * s.h;
            match (g.layout, g.order) {
                (Layout::ChannelsFirst, PatchOrder::Cpq) => {
                    for c in 0..c_n {
                        let j = ((c * pt + dt) * ph + dh) * pw;
                        k.affine_runs(&image[row + c * s.c..][..m], vw, ctx.a[c], ctx.b[c], &mut out[j..], p_len);
                    }
                }
                (Layout::ChannelsLast, PatchOrder::Cpq) => {
                    split_channels(&image[row..][..m * c_n], c_n, &mut tmp[..m * c_n]);
                    for c in 0..c_n {
                        let j = ((c * pt + dt) * ph + dh) * pw;
                        k.affine_runs(&tmp[c * m..][..m], vw, ctx.a[c], ctx.b[c], &mut out[j..], p_len);
                    }
                }
                (Layout::ChannelsLast, PatchOrder::Pqc) => {
                    let (j, r) = ((dt * ph + dh) * pw * c_n, vw * c_n);
                    k.affine_vec_runs(&image[row..][..m * c_n], &ctx.rep_a[..r], &ctx.rep_b[..r], &mut out[j..], p_len);
                }
                (Layout::ChannelsFirst, PatchOrder::Pqc) => {
                    for c in 0..c_n {
                        let plane = &image[row + c * s.c..][..m];
                        for (x, y) in tmp[c..m * c_n].iter_mut().step_by(c_n).zip(plane) {
                            *x = *y;
                        }
                    }
                    let (j, r) = ((dt * ph + dh) * pw * c_n, vw * c_n);
                    k.affine_vec_runs(&tmp[..m * c_n], &ctx.rep_a[..r], &ctx.rep_b[..r], &mut out[j..], p_len);
                }
            }
        }
    }
}

/// Splits pixels `(i, c)` of `seg` into planes: `planes[c·m + i] = seg[i·C + c]`, in one
/// sequential pass (unrolled for RGB).
#[inline(always)]
fn split_channels<T: Copy>(seg: &[T], c_n: usize, planes: &mut [T]) {
    #[inline(always)]
    fn split3<T: Copy>(seg: &[T], planes: &mut [T]) {
        let m = seg.len() / 3;
        let (p0, rest) = planes.split_at_mut(m);
        let (p1, p2) = rest.split_at_mut(m);
        for (((px, a), b), c) in seg.chunks_exact(3).zip(p0).zip(p1).zip(p2) {
            (*a, *b, *c) = (px[0], px[1], px[2]);
        }
    }
    match c_n {
        1 => planes.copy_from_slice(seg),
        3 => split3(seg, planes),
        _ => {
            let m = seg.len() / c_n;
            for (i, px) in seg.chunks_exact(c_n).enumerate() {
                for (c, &x) in px.iter().enumerate() {
                    planes[c * m + i] = x;
                }
            }
        }
    }
}

/// Tokens → image.
pub(crate) fn inverse<I: Float, O: Element>(p: &Patchify, isa: Isa, tokens: &[I], image: &mut [O]) -> Result<()> {
    let g = p.geometry();
    let k = p.coefficients();
    let ctx = Ctx::new(g, &k.inv_a, &k.inv_b, std::mem::size_of_val(image));
    let row_len = match g.layout {
        Layout::ChannelsFirst => g.width,
        Layout::ChannelsLast => g.width * g.channels,
    };
    let per_chunk = units_per_chunk(row_len * std::mem::size_of::<O>());
    for_each_chunk(image, per_chunk * row_len, |i, out| {
        dispatch(isa, InverseChunk { ctx: &ctx, tokens, first: i * per_chunk, row_len, out });
    });
    Ok(())
}

struct InverseChunk<'a, 'b, I, O> {
    ctx: &'b Ctx<'a>,
    tokens: &'b [I],
    first: usize,
    row_len: usize,
    out: &'b mut [O],
}

impl<I: Float, O: Element> KernelOp for InverseChunk<'_, '_, I, O> {
    type Output = ();

    #[inline(always)]
    fn run<K: RunKernel>(self, k: K) {
        let InverseChunk { ctx, tokens, first, row_len, out } = self;
        let g = ctx.g;
        let mut tmp = vec![I::from_f32(0.0); g.patch[2] * g.channels];
        if ctx.streaming && K::STREAMS {
            let mut stage = vec![O::from_f32(0.0); row_len];
            for (i, row) in out.chunks_exact_mut(row_len).enumerate() {
                inverse_row(k, ctx, tokens, first + i, &mut stage, &mut tmp);
                k.copy_streaming(&stage, row);
            }
            k.fence();
        } else {
            for (i, row) in out.chunks_exact_mut(row_len).enumerate() {
                inverse_row(k, ctx, tokens, first + i, row, &mut tmp);
            }
        }
    }
}

#[inline(always)]
fn inverse_row<K: RunKernel, I: Float, O: Element>(
    k: K,
    ctx: &Ctx<'_>,
    tokens: &[I],
    r: usize,
    row: &mut [O],
    tmp: &mut [I],
) {
    let g = ctx.g;
    let [pt, ph, pw] = g.patch;
    let [_, gh, gw] = g.grid;
    let (c_n, p_len) = (g.channels, g.patch_len);
    // Row r is (b, c, t, h) for NCHW, (b, t, h) for NHWC.
    let (h, t) = (r % g.height, r / g.height % g.frames);
    let (c, b) = match g.layout {
        Layout::ChannelsFirst => (r / (g.height * g.frames) % c_n, r / (g.height * g.frames * c_n)),
        Layout::ChannelsLast => (0, r / (g.height * g.frames)),
    };
    let (it, dt, ih, dh) = (t / pt, t % pt, h / ph, h % ph);
    for iw in 0..gw {
        let w0 = iw * pw;
        let vw = pw.min(g.width - w0);
        let base = (b * g.tokens + (it * gh + ih) * gw + iw) * p_len;
        let tok = &tokens[base..base + p_len];
        match (g.layout, g.order) {
            (Layout::ChannelsFirst, PatchOrder::Cpq) => {
                let j = ((c * pt + dt) * ph + dh) * pw;
                k.affine(&tok[j..j + vw], ctx.a[c], ctx.b[c], &mut row[w0..w0 + vw]);
            }
            (Layout::ChannelsFirst, PatchOrder::Pqc) => {
                let j = (dt * ph + dh) * pw * c_n + c;
                for (dw, x) in tmp[..vw].iter_mut().enumerate() {
                    *x = tok[j + dw * c_n];
                }
                k.affine(&tmp[..vw], ctx.a[c], ctx.b[c], &mut row[w0..w0 + vw]);
            }
            (Layout::ChannelsLast, PatchOrder::Pqc) => {
                let (j, n) = ((dt * ph + dh) * pw * c_n, vw * c_n);
                k.affine_vec(&tok[j..j + n], &ctx.rep_a[..n], &ctx.rep_b[..n], &mut row[w0 * c_n..][..n]);
            }
            (Layout::ChannelsLast, PatchOrder::Cpq) => {
                let n = vw * c_n;
                for (i, x) in tmp[..n].iter_mut().enumerate() {
                    let (dw, c) = (i / c_n, i % c_n);
                    *x = tok[((c * pt + dt) * ph + dh) * pw + dw];
                }
                k.affine_vec(&tmp[..n], &ctx.rep_a[..n], &ctx.rep_b[..n], &mut row[w0 * c_n..][..n]);
            }
        }
    }
}
