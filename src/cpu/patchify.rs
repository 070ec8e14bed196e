//! CPU patchify / unpatchify.
//!
//! Loop nest (the micro-kernels are in [`crate::cpu::simd`]):
//! - forward: threads take chunks of whole token rows (the `gw` tokens of one `(b, t, h)` band
//!   of patches); a row is built in blocks of ~16 KiB of tokens. For each patch row `(dt, dh)`
//!   the image row segment under the block feeds all its tokens in one micro-kernel call: runs
//!   of `pw` values per channel (`cpq`) or `pw·C` values (`pqc`), scattered at the token
//!   stride. NCHW + `cpq` and NHWC + `pqc` read the image directly; the two transposing
//!   combinations first gather the segment into token order (a scalar pass over the input
//!   type, before the conversion). Large outputs are staged per block and streamed out. For
//!   NHWC the next block's row segments are prefetched.
//! - inverse: threads take chunks of whole image rows (`(b, c, t, h)` for NCHW, `(b, t, h)` for
//!   NHWC — contiguous in the image), or whole NCHW samples when there are at least two per
//!   thread (then a token is read in one pass, not once per channel). The rows under one row
//!   of patches (a band) are filled token by token — each token's part read in one run,
//!   prefetched a few tokens ahead — and, for large outputs, staged and streamed out.
//!
//! Padded tokens are zero-filled first and then only their in-image extent is written.

use crate::cpu::par::{for_each_chunk, threads, units_per_chunk};
use crate::cpu::simd::{dispatch, KernelOp, RunKernel};
use crate::cpu::{prefetch, Isa};
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
                    // NHWC: the next block of this token row reads the segments that follow these in the
                    // same image rows, many short streams that the hardware prefetchers pick up too late.
                    // (NCHW segments are C times shorter; prefetching them measured slower.)
    if g.layout == Layout::ChannelsLast && iw + n < gw {
        let seg = m * c_n;
        for dt in 0..vt {
            for dh in 0..vh {
                let next = origin + dt * s.t + dh * s.h + seg;
                if let Some(next) = image.get(next..next + seg) {
                    prefetch(next);
                }
            }
        }
    }
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
    // NCHW with several channels: a chunk of rows holds one channel, so it would read each
    // token in C separate passes. Where there are samples enough to share out and a sample is
    // not huge, threads take whole samples instead and read every token in one pass.
    let sample = g.channels * g.frames * g.height;
    let sample_bytes = sample * row_len * std::mem::size_of::<O>();
    let whole_samples = g.layout == Layout::ChannelsFirst
        && g.channels > 1
        && g.batch >= 2 * threads()
        && sample_bytes <= WHOLE_SAMPLE_BYTES;
    let per_chunk = if whole_samples { sample } else { units_per_chunk(row_len * std::mem::size_of::<O>()) };
    for_each_chunk(image, per_chunk * row_len, |i, out| {
        dispatch(isa, InverseChunk { ctx: &ctx, tokens, first: i * per_chunk, row_len, whole_samples, out });
    });
    Ok(())
}

/// The largest sample (in output bytes) that [`inverse`] gives one thread whole.
const WHOLE_SAMPLE_BYTES: usize = 4 << 20;

struct InverseChunk<'a, 'b, I, O> {
    ctx: &'b Ctx<'a>,
    tokens: &'b [I],
    /// The image row `out` starts at.
    first: usize,
    row_len: usize,
    /// `out` holds whole samples (NCHW only): fill each band of rows for all channels at once.
    whole_samples: bool,
    out: &'b mut [O],
}

impl<I: Float, O: Element> KernelOp for InverseChunk<'_, '_, I, O> {
    type Output = ();

    #[inline(always)]
    fn run<K: RunKernel>(self, k: K) {
        let InverseChunk { ctx, tokens, first, row_len, whole_samples, out } = self;
        let g = ctx.g;
        let (ph, c_n, t_n, h_n) = (g.patch[1], g.channels, g.frames, g.height);
        let mut tmp = vec![I::from_f32(0.0); g.patch[2] * c_n];
        let streaming = ctx.streaming && K::STREAMS;
        let bands = if whole_samples { c_n } else { 1 };
        let mut stage = vec![O::from_f32(0.0); if streaming { bands * ph * row_len } else { 0 }];
        if whole_samples {
            // Row (c, t, h) of a sample is at ((c·T + t)·H + h)·W.
            let plane = t_n * h_n * row_len;
            for (i, sample) in out.chunks_exact_mut(c_n * plane).enumerate() {
                let b = first / (c_n * t_n * h_n) + i;
                for t in 0..t_n {
                    for h0 in (0..h_n).step_by(ph) {
                        let n = ph.min(h_n - h0);
                        let band = Band { b, c: 0, t, h0, n, row_len };
                        let at = (t * h_n + h0) * row_len;
                        if streaming {
                            let staged = &mut stage[..c_n * n * row_len];
                            inverse_band(k, ctx, tokens, band, c_n, n * row_len, staged, &mut tmp);
                            for (c, rows) in staged.chunks_exact(n * row_len).enumerate() {
                                k.copy_streaming(rows, &mut sample[c * plane + at..][..n * row_len]);
                            }
                        } else {
                            inverse_band(k, ctx, tokens, band, c_n, plane, &mut sample[at..], &mut tmp);
                        }
                    }
                }
            }
        } else {
            let n_rows = out.len() / row_len;
            let mut i = 0;
            while i < n_rows {
                // Rows `i..i + n` lie under one row of patches (same b, c, t; h in one band).
                let r = first + i;
                let h0 = r % h_n;
                let n = (ph - h0 % ph).min(h_n - h0).min(n_rows - i);
                let t = r / h_n % t_n;
                let (c, b) = match g.layout {
                    Layout::ChannelsFirst => (r / (h_n * t_n) % c_n, r / (h_n * t_n * c_n)),
                    Layout::ChannelsLast => (0, r / (h_n * t_n)),
                };
                let band = Band { b, c, t, h0, n, row_len };
                let rows = &mut out[i * row_len..(i + n) * row_len];
                if streaming {
                    let staged = &mut stage[..rows.len()];
                    inverse_band(k, ctx, tokens, band, 1, 0, staged, &mut tmp);
                    k.copy_streaming(staged, rows);
                } else {
                    inverse_band(k, ctx, tokens, band, 1, 0, rows, &mut tmp);
                }
                i += n;
            }
        }
        if streaming {
            k.fence();
        }
    }
}

/// `n` image rows `h0..h0 + n` of sample `b`, frame `t`, all under one row of patches; for
/// NCHW, of channel `c` (the first of the channels filled). For NHWC a row holds every channel.
#[derive(Clone, Copy)]
struct Band {
    b: usize,
    c: usize,
    t: usize,
    h0: usize,
    n: usize,
    row_len: usize,
}

/// How many tokens ahead [`inverse_band`] prefetches.
const PREFETCH_TOKENS: usize = 4;

/// Fills a band of rows for `c_count` channels from `band.c` (1 for NHWC): row `dh` of channel
/// `band.c + k` is `dst[k·c_stride + dh·row_len..][..row_len]`. Token by token: each token's
/// part under the band is read in one pass, and the band's rows stay in L1.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn inverse_band<K: RunKernel, I: Float, O: Element>(
    k: K,
    ctx: &Ctx<'_>,
    tokens: &[I],
    band: Band,
    c_count: usize,
    c_stride: usize,
    dst: &mut [O],
    tmp: &mut [I],
) {
    let g = ctx.g;
    let [pt, ph, pw] = g.patch;
    let [_, gh, gw] = g.grid;
    let (c_n, p_len) = (g.channels, g.patch_len);
    let Band { b, c: c0, t, h0, n, row_len } = band;
    let (it, dt, ih, dh0) = (t / pt, t % pt, h0 / ph, h0 % ph);
    // The part of each token the band reads (with the gaps between channels where it spans
    // several: NHWC + cpq, or several NCHW channels).
    let (lo, hi) = match (g.order, g.layout) {
        (PatchOrder::Cpq, Layout::ChannelsFirst) => {
            (((c0 * pt + dt) * ph + dh0) * pw, (((c0 + c_count - 1) * pt + dt) * ph + dh0 + n) * pw)
        }
        (PatchOrder::Cpq, Layout::ChannelsLast) => ((dt * ph + dh0) * pw, (((c_n - 1) * pt + dt) * ph + dh0 + n) * pw),
        (PatchOrder::Pqc, _) => ((dt * ph + dh0) * pw * c_n, (dt * ph + dh0 + n) * pw * c_n),
    };
    let row_base = (b * g.tokens + (it * gh + ih) * gw) * p_len;
    for iw in 0..gw {
        // A band reads runs a token apart, which the hardware prefetchers pick up too late:
        // ask for the run a few tokens ahead (past the row's end, those of the next row of
        // patches, which the next band usually reads).
        let ahead = row_base + (iw + PREFETCH_TOKENS) * p_len;
        if let Some(run) = tokens.get(ahead + lo..ahead + hi) {
            prefetch(run);
        }
        let w0 = iw * pw;
        let vw = pw.min(g.width - w0);
        let base = row_base + iw * p_len;
        let tok = &tokens[base..base + p_len];
        for ci in 0..c_count {
            let c = c0 + ci;
            for i in 0..n {
                let dh = dh0 + i;
                let row = &mut dst[ci * c_stride + i * row_len..][..row_len];
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
                        let (j, m) = ((dt * ph + dh) * pw * c_n, vw * c_n);
                        k.affine_vec(&tok[j..j + m], &ctx.rep_a[..m], &ctx.rep_b[..m], &mut row[w0 * c_n..][..m]);
                    }
                    (Layout::ChannelsLast, PatchOrder::Cpq) => {
                        let m = vw * c_n;
                        for (i, x) in tmp[..m].iter_mut().enumerate() {
                            let (dw, c) = (i / c_n, i % c_n);
                            *x = tok[((c * pt + dt) * ph + dh) * pw + dw];
                        }
                        k.affine_vec(&tmp[..m], &ctx.rep_a[..m], &ctx.rep_b[..m], &mut row[w0 * c_n..][..m]);
                    }
                }
            }
        }
    }
}
