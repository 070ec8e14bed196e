//! Patchify / unpatchify: images and videos ↔ patch tokens, with normalisation fused.
//!
//! # Contract
//! - Image `[B, C, H, W]` ([`Layout::ChannelsFirst`], NCHW) or `[B, H, W, C]`
//!   ([`Layout::ChannelsLast`], NHWC); video `[B, C, T, H, W]` or `[B, T, H, W, C]`, with a
//!   tubelet of `pt` frames. Pixels are `u8`, `f32`, `f16` or `bf16`.
//! - Tokens `[B, L, P]` with `L = (T/pt)·(H/ph)·(W/pw)` in raster order `(t, h, w)` and
//!   `P = C·pt·ph·pw`. Within a patch, [`PatchOrder::Cpq`] orders pixels `(c, pt, ph, pw)`
//!   (timm's Conv2d / Conv3d patch-embedding weights) and [`PatchOrder::Pqc`] orders them
//!   `(pt, ph, pw, c)` (MAE's `patchify`). Tokens are `f32`, `f16` or `bf16`.
//! - Normalisation, fused: with per-channel coefficients computed once in f32 as
//!   `a[c] = scale / std[c]` and `b[c] = −(mean[c] / std[c])`, every backend computes
//!   `y = fma(x, a[c], b[c])` (one rounding) and then rounds `y` to the token dtype (nearest,
//!   ties to even). This equals `(x·scale − mean[c]) / std[c]` within 2 ulp of the larger of
//!   `x·scale/std[c]` and `mean[c]/std[c]` (the subtraction may cancel); it is *the*
//!   definition, so f32 tokens are bit-identical across backends. Without normalisation
//!   `a = 1, b = −0.0`, which makes the fma an exact copy (−0.0 and NaN included).
//! - Unpatchify inverts it: `x = fma(y, std[c] / scale, mean[c] / scale)`, then rounds to the
//!   image dtype; a `u8` image rounds to nearest (ties to even) and clamps to [0, 255]
//!   (NaN → 0).
//! - Sizes not divisible by the patch are an error unless [`PatchConfig::pad`] is set: then the
//!   image is zero-padded at the bottom / right (and at the end in time), as timm's
//!   `dynamic_img_pad`; padded positions are `+0.0` in the tokens, and unpatchify ignores them.
//!   A patch larger than the image is always an error.
//! - Every output element is written; the input is never written; input and output cannot
//!   alias (Rust's borrows guarantee it).
//!
//! ```
//! use vistok::{Backend, Layout, Normalize, PatchConfig, Patchify, View, ViewMut};
//! // Two 3×32×32 u8 images, NCHW → 16×16 patches, ImageNet normalisation, f32 tokens.
//! let image: Vec<u8> = (0..2 * 3 * 32 * 32).map(|i| (i * 7 % 256) as u8).collect();
//! let config = PatchConfig::image(Layout::ChannelsFirst, 16, 16)
//!     .normalize(Normalize::imagenet_u8());
//! let plan = Patchify::new(&config, &[2, 3, 32, 32])?;
//! assert_eq!(plan.tokens_dims(), [2, 4, 768]);
//! let mut tokens = vec![0.0f32; 2 * 4 * 768];
//! plan.forward(Backend::Cpu, View::new(&image, &[2, 3, 32, 32])?,
//!              ViewMut::new(&mut tokens, &plan.tokens_dims())?)?;
//! // And back to u8 pixels, exactly.
//! let mut back = vec![0u8; image.len()];
//! plan.inverse(Backend::Cpu, View::new(&tokens, &plan.tokens_dims())?,
//!              ViewMut::new(&mut back, &[2, 3, 32, 32])?)?;
//! assert_eq!(back, image);
//! # Ok::<(), vistok::Error>(())
//! ```

use crate::dtype::{Element, Float};
use crate::error::{checked_product, Error, Family, Result};
use crate::view::{View, ViewMut};
use crate::Backend;

/// Where the channel dimension sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `[B, C, H, W]` / `[B, C, T, H, W]` (NCHW, NCTHW).
    ChannelsFirst,
    /// `[B, H, W, C]` / `[B, T, H, W, C]` (NHWC, NTHWC).
    ChannelsLast,
}

/// Order of the pixels within one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PatchOrder {
    /// `(c, pt, ph, pw)`: timm's `PatchEmbed` (Conv2d / Conv3d weight) order.
    Cpq,
    /// `(pt, ph, pw, c)`: MAE's `patchify` order.
    Pqc,
}

/// Per-channel normalisation `(x·scale − mean[c]) / std[c]`, fused into patchify.
///
/// ```
/// let n = vistok::Normalize::new(1.0 / 255.0, vec![0.5; 3], vec![0.5; 3]);
/// assert_eq!(n.mean.len(), 3);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Normalize {
    /// Multiplies the raw pixel first (e.g. 1/255 for u8 images).
    pub scale: f32,
    /// Per-channel mean, subtracted after scaling.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation, divided by last.
    pub std: Vec<f32>,
}

impl Normalize {
    /// A normalisation with the given scale, means and standard deviations.
    pub fn new(scale: f32, mean: Vec<f32>, std: Vec<f32>) -> Self {
        Normalize { scale, mean, std }
    }

    /// ImageNet's mean / std for u8 RGB pixels (scale 1/255).
    ///
    /// ```
    /// assert_eq!(vistok::Normalize::imagenet_u8().std.len(), 3);
    /// ```
    pub fn imagenet_u8() -> Self {
        Normalize { scale: 1.0 / 255.0, mean: vec![0.485, 0.456, 0.406], std: vec![0.229, 0.224, 0.225] }
    }
}

/// What to patchify: layout, patch size, order, padding, normalisation.
///
/// ```
/// use vistok::{Layout, PatchConfig, PatchOrder};
/// let c = PatchConfig::video(Layout::ChannelsLast, 2, 16, 16).order(PatchOrder::Pqc).pad(true);
/// assert_eq!(c.patch, [2, 16, 16]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PatchConfig {
    /// Channel position in the image.
    pub layout: Layout,
    /// `[pt, ph, pw]`; `pt` must be 1 for rank-4 images.
    pub patch: [usize; 3],
    /// Pixel order within a token.
    pub order: PatchOrder,
    /// Zero-pad sizes that the patch does not divide (bottom / right / last frames).
    pub pad: bool,
    /// Optional fused normalisation.
    pub normalize: Option<Normalize>,
}

impl PatchConfig {
    /// An image configuration with `ph × pw` patches, `Cpq` order, no padding or normalisation.
    pub fn image(layout: Layout, ph: usize, pw: usize) -> Self {
        Self::video(layout, 1, ph, pw)
    }

    /// A video configuration with `pt × ph × pw` tubelets.
    pub fn video(layout: Layout, pt: usize, ph: usize, pw: usize) -> Self {
        PatchConfig { layout, patch: [pt, ph, pw], order: PatchOrder::Cpq, pad: false, normalize: None }
    }

    /// Sets the pixel order within a token.
    pub fn order(mut self, order: PatchOrder) -> Self {
        self.order = order;
        self
    }

    /// Enables or disables zero padding.
    pub fn pad(mut self, pad: bool) -> Self {
        self.pad = pad;
        self
    }

    /// Sets the fused normalisation.
    pub fn normalize(mut self, n: Normalize) -> Self {
        self.normalize = Some(n);
        self
    }
}

/// Validated sizes of one patchify problem. All products are known not to overflow `usize`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Layout of the image.
    pub layout: Layout,
    /// Pixel order within a token.
    pub order: PatchOrder,
    /// The image dims as given (rank 4 or 5).
    pub image_dims: Vec<usize>,
    /// Batch size B.
    pub batch: usize,
    /// Channels C.
    pub channels: usize,
    /// Frames T (1 for images).
    pub frames: usize,
    /// Height H.
    pub height: usize,
    /// Width W.
    pub width: usize,
    /// `[pt, ph, pw]`.
    pub patch: [usize; 3],
    /// Tokens along `[t, h, w]`: `[gt, gh, gw]` (rounded up when padding).
    pub grid: [usize; 3],
    /// Tokens per sample, L = gt·gh·gw.
    pub tokens: usize,
    /// Values per token, P = C·pt·ph·pw.
    pub patch_len: usize,
    /// Whether any padding happens (some grid dimension overhangs the image).
    pub padded: bool,
}

/// Element strides of the image along c, t, h, w and batch (dense layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    /// Channel stride.
    pub c: usize,
    /// Frame stride.
    pub t: usize,
    /// Row stride.
    pub h: usize,
    /// Column stride.
    pub w: usize,
    /// Sample stride (C·T·H·W).
    pub batch: usize,
}

impl Geometry {
    /// Strides of the dense image in elements.
    pub fn strides(&self) -> Strides {
        let (c, t, h, w) = (self.channels, self.frames, self.height, self.width);
        let batch = c * t * h * w;
        match self.layout {
            Layout::ChannelsFirst => Strides { c: t * h * w, t: h * w, h: w, w: 1, batch },
            Layout::ChannelsLast => Strides { c: 1, t: h * w * c, h: w * c, w: c, batch },
        }
    }

    /// `[B, L, P]`.
    pub fn tokens_dims(&self) -> [usize; 3] {
        [self.batch, self.tokens, self.patch_len]
    }
}

/// Per-channel affine coefficients, the one place where they are computed.
#[derive(Debug, Clone, PartialEq)]
pub struct Coefficients {
    /// Forward multiplier `scale / std[c]` (1 without normalisation).
    pub a: Vec<f32>,
    /// Forward offset `−(mean[c] / std[c])` (−0.0 without normalisation).
    pub b: Vec<f32>,
    /// Inverse multiplier `std[c] / scale`.
    pub inv_a: Vec<f32>,
    /// Inverse offset `mean[c] / scale`.
    pub inv_b: Vec<f32>,
}

impl Coefficients {
    fn new(norm: Option<&Normalize>, channels: usize) -> Result<Self> {
        let inv = |msg: String| Error::Invalid { family: Family::Patchify, msg };
        let Some(n) = norm else {
            let ones = vec![1.0; channels];
            let nz = vec![-0.0; channels];
            return Ok(Coefficients { a: ones.clone(), b: nz.clone(), inv_a: ones, inv_b: nz });
        };
        for (what, len) in [("mean", n.mean.len()), ("std", n.std.len())] {
            if len != channels {
                return Err(Error::Length { family: Family::Patchify, what, expected: channels, got: len });
            }
        }
        if !n.scale.is_finite() || n.scale == 0.0 {
            return Err(inv(format!("normalisation scale {} must be finite and non-zero", n.scale)));
        }
        let mut c = Coefficients { a: vec![], b: vec![], inv_a: vec![], inv_b: vec![] };
        for (ch, (&m, &s)) in n.mean.iter().zip(&n.std).enumerate() {
            if !m.is_finite() || !s.is_finite() || s == 0.0 {
                return Err(inv(format!("channel {ch}: mean {m} / std {s} must be finite, std non-zero")));
            }
            let (a, b, ia, ib) = (n.scale / s, -(m / s), s / n.scale, m / n.scale);
            if ![a, b, ia, ib].iter().all(|v| v.is_finite()) {
                return Err(inv(format!(
                    "channel {ch}: coefficients overflow f32 (scale {}, mean {m}, std {s})",
                    n.scale
                )));
            }
            c.a.push(a);
            c.b.push(b);
            c.inv_a.push(ia);
            c.inv_b.push(ib);
        }
        Ok(c)
    }
}

/// A validated patchify plan for one image shape: build once, run forward / inverse many times.
///
/// See the [module docs](self) for the contract and an example.
#[derive(Debug, Clone, PartialEq)]
pub struct Patchify {
    geometry: Geometry,
    coefficients: Coefficients,
}

fn shape_err(msg: String) -> Error {
    Error::Shape { family: Family::Patchify, msg }
}

impl Patchify {
    /// Validates `config` against `image_dims` and precomputes the coefficients.
    ///
    /// Errors: rank not 4 or 5, a zero-sized dimension, `pt ≠ 1` for a rank-4 image, a patch
    /// dimension of 0 or larger than the image, a size the patch does not divide (without
    /// padding), mean/std of the wrong length or invalid values, or sizes that overflow.
    ///
    /// ```
    /// use vistok::{Layout, PatchConfig, Patchify};
    /// let cfg = PatchConfig::image(Layout::ChannelsLast, 16, 16);
    /// assert!(Patchify::new(&cfg, &[1, 250, 256, 3]).is_err()); // 250 % 16 != 0
    /// assert!(Patchify::new(&cfg.clone().pad(true), &[1, 250, 256, 3]).is_ok());
    /// ```
    pub fn new(config: &PatchConfig, image_dims: &[usize]) -> Result<Self> {
        let rank = image_dims.len();
        let (b, c, t, h, w) = match (rank, config.layout) {
            (4, Layout::ChannelsFirst) => (image_dims[0], image_dims[1], 1, image_dims[2], image_dims[3]),
            (4, Layout::ChannelsLast) => (image_dims[0], image_dims[3], 1, image_dims[1], image_dims[2]),
            (5, Layout::ChannelsFirst) => (image_dims[0], image_dims[1], image_dims[2], image_dims[3], image_dims[4]),
            (5, Layout::ChannelsLast) => (image_dims[0], image_dims[4], image_dims[1], image_dims[2], image_dims[3]),
            _ => {
                return Err(shape_err(format!(
                    "image rank must be 4 (image) or 5 (video), got {rank} (dims {image_dims:?})"
                )))
            }
        };
        let names = ["batch", "channels", "frames", "height", "width"];
        for (name, d) in names.iter().zip([b, c, t, h, w]) {
            if d == 0 {
                return Err(shape_err(format!("image {name} is 0 (dims {image_dims:?})")));
            }
        }
        checked_product(Family::Patchify, "image", image_dims)?;
        let [pt, ph, pw] = config.patch;
        if rank == 4 && pt != 1 {
            return Err(shape_err(format!("tubelet size pt = {pt} needs a rank-5 video, got a rank-4 image")));
        }
        let mut grid = [0; 3];
        let mut padded = false;
        for (i, (name, size, p)) in [("frames", t, pt), ("height", h, ph), ("width", w, pw)].into_iter().enumerate() {
            if p == 0 {
                return Err(shape_err(format!("patch {name} is 0")));
            }
            if p > size {
                return Err(shape_err(format!("patch {name} {p} is larger than the image {name} {size}")));
            }
            if size % p != 0 && !config.pad {
                return Err(shape_err(format!(
                    "image {name} {size} is not a multiple of patch {name} {p} (set pad to zero-pad)"
                )));
            }
            grid[i] = size.div_ceil(p);
            padded |= size % p != 0;
        }
        let tokens = checked_product(Family::Patchify, "tokens per sample (grid)", &grid)?;
        let patch_len = checked_product(Family::Patchify, "values per token (C, pt, ph, pw)", &[c, pt, ph, pw])?;
        checked_product(Family::Patchify, "tokens [B, L, P]", &[b, tokens, patch_len])?;
        // The padded image must be addressable too (the fast paths compute padded coordinates).
        checked_product(Family::Patchify, "padded image", &[b, c, grid[0] * pt, grid[1] * ph, grid[2] * pw])?;
        let coefficients = Coefficients::new(config.normalize.as_ref(), c)?;
        Ok(Patchify {
            geometry: Geometry {
                layout: config.layout,
                order: config.order,
                image_dims: image_dims.to_vec(),
                batch: b,
                channels: c,
                frames: t,
                height: h,
                width: w,
                patch: config.patch,
                grid,
                tokens,
                patch_len,
                padded,
            },
            coefficients,
        })
    }

    /// The validated sizes.
    ///
    /// ```
    /// use vistok::{Layout, PatchConfig, Patchify};
    /// let plan = Patchify::new(&PatchConfig::image(Layout::ChannelsLast, 16, 16).pad(true), &[2, 250, 256, 3])?;
    /// let g = plan.geometry();
    /// assert_eq!((g.grid, g.tokens, g.patch_len, g.padded), ([1, 16, 16], 256, 768, true));
    /// assert_eq!(g.strides().h, 256 * 3);
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The per-channel coefficients every backend uses.
    ///
    /// ```
    /// use vistok::{Layout, Normalize, PatchConfig, Patchify};
    /// let cfg = PatchConfig::image(Layout::ChannelsFirst, 8, 8).normalize(Normalize::new(2.0, vec![1.0], vec![4.0]));
    /// let k = Patchify::new(&cfg, &[1, 1, 8, 8])?.coefficients().clone();
    /// assert_eq!((k.a[0], k.b[0], k.inv_a[0], k.inv_b[0]), (0.5, -0.25, 2.0, 0.5));
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn coefficients(&self) -> &Coefficients {
        &self.coefficients
    }

    /// The image dims this plan was built for.
    ///
    /// ```
    /// use vistok::{Layout, PatchConfig, Patchify};
    /// let plan = Patchify::new(&PatchConfig::video(Layout::ChannelsFirst, 2, 4, 4), &[1, 3, 4, 8, 8])?;
    /// assert_eq!(plan.image_dims(), &[1, 3, 4, 8, 8]);
    /// assert_eq!(plan.tokens_dims(), [1, 2 * 2 * 2, 3 * 2 * 4 * 4]);
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn image_dims(&self) -> &[usize] {
        &self.geometry.image_dims
    }

    /// The token dims `[B, L, P]`.
    pub fn tokens_dims(&self) -> [usize; 3] {
        self.geometry.tokens_dims()
    }

    /// Checks that `got` equals `expected` dims.
    pub(crate) fn check_dims(family: Family, what: &str, got: &[usize], expected: &[usize]) -> Result<()> {
        if got != expected {
            return Err(Error::Shape { family, msg: format!("{what} dims {got:?}, expected {expected:?}") });
        }
        Ok(())
    }

    /// Image → tokens on a host backend. `image` must have this plan's image dims, `tokens`
    /// `[B, L, P]`; every token element is written. Errors if the views' dims differ from the
    /// plan's, or if a forced [`Backend::CpuIsa`] level is not available on this CPU.
    ///
    /// ```
    /// use vistok::{bf16, Backend, Layout, PatchConfig, PatchOrder, Patchify, View, ViewMut};
    /// // MAE order on an NHWC f32 image, bf16 tokens.
    /// let image: Vec<f32> = (0..2 * 2 * 3).map(|i| i as f32).collect();
    /// let plan = Patchify::new(&PatchConfig::image(Layout::ChannelsLast, 2, 2).order(PatchOrder::Pqc), &[1, 2, 2, 3])?;
    /// let mut tokens = vec![bf16::ZERO; 12];
    /// plan.forward(Backend::Reference, View::new(&image, &[1, 2, 2, 3])?, ViewMut::new(&mut tokens, &[1, 1, 12])?)?;
    /// assert_eq!(tokens[5].to_f32(), 5.0); // NHWC + pqc is a plain copy
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn forward<I: Element, O: Float>(
        &self,
        backend: Backend,
        image: View<'_, I>,
        mut tokens: ViewMut<'_, O>,
    ) -> Result<()> {
        Self::check_dims(Family::Patchify, "image", image.dims(), self.image_dims())?;
        Self::check_dims(Family::Patchify, "tokens", tokens.dims(), &self.tokens_dims())?;
        match backend {
            Backend::Reference => {
                crate::reference::patchify::forward(self, image.data(), tokens.data_mut());
                Ok(())
            }
            Backend::Cpu => {
                crate::cpu::patchify::forward(self, crate::cpu::Isa::detect(), image.data(), tokens.data_mut())
            }
            Backend::CpuIsa(isa) => crate::cpu::patchify::forward(self, isa.check()?, image.data(), tokens.data_mut()),
        }
    }

    /// Tokens → image on a host backend: the exact inverse of [`forward`](Self::forward) (padded
    /// positions are dropped), de-normalising with the plan's coefficients. Every image element
    /// is written; a `u8` image rounds to nearest-even and clamps.
    ///
    /// ```
    /// use vistok::{Backend, Layout, PatchConfig, Patchify, View, ViewMut};
    /// let plan = Patchify::new(&PatchConfig::image(Layout::ChannelsFirst, 2, 2), &[1, 1, 2, 2])?;
    /// let tokens = [-3.0f32, 0.5, 1.5, 300.0];
    /// let mut pixels = [0u8; 4];
    /// plan.inverse(Backend::Cpu, View::new(&tokens, &[1, 1, 4])?, ViewMut::new(&mut pixels, &[1, 1, 2, 2])?)?;
    /// assert_eq!(pixels, [0, 0, 2, 255]);
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn inverse<I: Float, O: Element>(
        &self,
        backend: Backend,
        tokens: View<'_, I>,
        mut image: ViewMut<'_, O>,
    ) -> Result<()> {
        Self::check_dims(Family::Unpatchify, "tokens", tokens.dims(), &self.tokens_dims())?;
        Self::check_dims(Family::Unpatchify, "image", image.dims(), self.image_dims())?;
        match backend {
            Backend::Reference => {
                crate::reference::patchify::inverse(self, tokens.data(), image.data_mut());
                Ok(())
            }
            Backend::Cpu => {
                crate::cpu::patchify::inverse(self, crate::cpu::Isa::detect(), tokens.data(), image.data_mut())
            }
            Backend::CpuIsa(isa) => crate::cpu::patchify::inverse(self, isa.check()?, tokens.data(), image.data_mut()),
        }
    }
}
