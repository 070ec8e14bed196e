//! Fuzz target `patchify`: arbitrary configs, dims, dtypes, values and buffer lengths.
//!
//! Invariants (any violation panics, which libFuzzer reports as a crash):
//! 1. No call panics; errors are fine.
//! 2. `View::new` / `ViewMut::new` accept a buffer exactly when its length is the product of a
//!    rank-1..=6 shape.
//! 3. Once `Patchify::new` accepts a config, `Backend::Reference`, `Backend::Cpu` and
//!    `Backend::CpuIsa(isa)` for every level this machine has all succeed or all fail, for
//!    `forward` and `inverse` alike; a view whose dims are not the plan's makes all fail.
//! 4. When they succeed, every output equals the reference's bit for bit. Each backend's
//!    output is poisoned with a different value first, so an element one backend forgets to
//!    write is a mismatch.
//! 5. Without normalisation, u8 → f32/bf16 tokens → u8 and f32 → f32 tokens → f32 round-trip
//!    exactly (any NaN matches any NaN).
//!
//! Sizes stay small (≤ 4096 image elements) so that one run is fast and libFuzzer explores
//! shapes, padding and special values rather than big buffers.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vistok::{
    bf16, Backend, DType, Element, Float, Isa, Layout, Normalize, PatchConfig, PatchOrder, Patchify, View, ViewMut,
};

/// Upper bound on the image's element count (dims are shrunk until they fit).
const MAX_ELEMS: usize = 4096;

/// The backends run on every case: the reference first (what the others are compared
/// against), then the detected CPU level, then each CPU level this machine has, pinned.
fn backends() -> &'static [Backend] {
    static BACKENDS: OnceLock<Vec<Backend>> = OnceLock::new();
    BACKENDS.get_or_init(|| {
        let pinned = Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa);
        [Backend::Reference, Backend::Cpu].into_iter().chain(pinned).collect()
    })
}

/// Values that tend to break float code: signed zeros, NaNs (quiet, signalling, negative),
/// infinities, extremes, subnormals, and the usual normalisation constants.
const SPECIAL_F32: [f32; 24] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    255.0,
    255.5,
    254.5,
    -0.5,
    1.0 / 255.0,
    0.229,
    0.485,
    f32::NAN,
    -f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MAX,
    f32::MIN,
    f32::MIN_POSITIVE,
    f32::EPSILON,
    1e-45, // smallest subnormal
    1e30,
    1e-30,
    65504.0,
];

/// How a view's dims differ from the plan's: mostly not at all.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Perturb {
    None,
    Swap(usize, usize),
    Bump(usize),
    Flatten,
    DropLast,
}

impl Perturb {
    fn arbitrary(u: &mut Unstructured<'_>) -> Result<Self> {
        if !u.ratio(1, 16)? {
            return Ok(Perturb::None);
        }
        Ok(match u.int_in_range(0..=3)? {
            0 => Perturb::Swap(u.int_in_range(0..=5)?, u.int_in_range(0..=5)?),
            1 => Perturb::Bump(u.int_in_range(0..=5)?),
            2 => Perturb::Flatten,
            _ => Perturb::DropLast,
        })
    }

    fn apply(self, dims: &[usize]) -> Vec<usize> {
        let mut d = dims.to_vec();
        let n = d.len().max(1);
        match self {
            Perturb::None => {}
            Perturb::Swap(i, j) if !d.is_empty() => d.swap(i % n, j % n),
            Perturb::Bump(i) if !d.is_empty() => d[i % n] += 1,
            Perturb::Flatten => d = vec![d.iter().product()],
            Perturb::DropLast => {
                d.pop();
            }
            _ => {}
        }
        d
    }
}

#[derive(Debug, Clone)]
enum Pixels {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum TokenType {
    F32,
    BF16,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ImageType {
    U8,
    F32,
}

/// One fuzz case. Its `Debug` is what `cargo fuzz fmt patchify <artifact>` prints.
#[derive(Debug)]
struct Case {
    config: PatchConfig,
    dims: Vec<usize>,
    image_perturb: Perturb,
    token_perturb: Perturb,
    /// Extra (or missing) elements in image buffers, forward input and inverse output.
    image_len_delta: isize,
    /// Extra (or missing) elements in token buffers, forward output and inverse input.
    token_len_delta: isize,
    tokens: TokenType,
    inverse_image: ImageType,
    /// Inverse input: `None` reuses the reference's forward output; `Some` cycles these values
    /// (bf16 tokens take the top 16 bits, so NaN payloads survive).
    inverse_pool: Option<Vec<f32>>,
    /// Forward input; its length follows the perturbed image dims and `image_len_delta`.
    /// Last, so that a one-line `Debug` shows the shape before the values.
    pixels: Pixels,
}

fn any_f32(u: &mut Unstructured<'_>, i: usize) -> Result<f32> {
    if u.is_empty() {
        // Never fall back to all zeros once the bytes run out.
        return Ok(((i * 37 + 11) % 256) as f32);
    }
    Ok(match u.int_in_range(0u8..=15)? {
        0..=1 => f32::from_bits(u.arbitrary()?),
        2..=4 => *u.choose(&SPECIAL_F32)?,
        5..=7 => f32::from(u.arbitrary::<i8>()?) / 64.0,
        _ => f32::from(u.arbitrary::<u8>()?),
    })
}

fn any_u8(u: &mut Unstructured<'_>, i: usize) -> Result<u8> {
    if u.is_empty() {
        return Ok((i * 37 + 11) as u8);
    }
    u.arbitrary()
}

/// A normalisation coefficient: usually usable, sometimes zero / NaN / huge / raw bits.
fn any_coef(u: &mut Unstructured<'_>) -> Result<f32> {
    Ok(match u.int_in_range(0u8..=15)? {
        0 => f32::from_bits(u.arbitrary()?),
        1..=2 => *u.choose(&SPECIAL_F32)?,
        3..=5 => *u.choose(&[1.0 / 255.0, 0.229, 0.224, 0.225, 0.485, 0.456, 0.406, 0.5, 2.0, 127.5])?,
        _ => (f32::from(u.arbitrary::<i8>()?) + 0.5) / 32.0,
    })
}

fn len_delta(u: &mut Unstructured<'_>) -> Result<isize> {
    if u.ratio(1, 16)? {
        u.int_in_range(-2..=2)
    } else {
        Ok(0)
    }
}

fn buffer_len(dims: &[usize], delta: isize) -> usize {
    dims.iter().product::<usize>().saturating_add_signed(delta)
}

impl<'a> Arbitrary<'a> for Case {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        // Mostly rank 4 / 5; now and then a rank the plan must reject.
        let rank = match u.int_in_range(0u8..=15)? {
            0 => 3,
            1 => 6,
            n => 4 + usize::from(n & 1),
        };
        let mut dims = Vec::with_capacity(rank);
        for _ in 0..rank {
            dims.push(if u.ratio(1, 32)? { 0 } else { u.int_in_range(1..=12)? });
        }
        while dims.iter().product::<usize>() > MAX_ELEMS {
            let big = (0..rank).max_by_key(|&i| dims[i]).unwrap_or(0);
            dims[big] /= 2;
        }
        let layout = if u.arbitrary()? { Layout::ChannelsFirst } else { Layout::ChannelsLast };
        let order = if u.arbitrary()? { PatchOrder::Cpq } else { PatchOrder::Pqc };
        let mut patch = [0; 3];
        for p in &mut patch {
            *p = if u.ratio(1, 16)? { 0 } else { u.int_in_range(1..=6)? };
        }
        if rank != 5 && !u.ratio(1, 8)? {
            patch[0] = 1;
        }
        let mut config = PatchConfig::video(layout, patch[0], patch[1], patch[2]).order(order).pad(u.arbitrary()?);
        if u.arbitrary()? {
            let channels = match (rank, layout) {
                (4 | 5, Layout::ChannelsFirst) => dims[1],
                (4 | 5, Layout::ChannelsLast) => dims[rank - 1],
                _ => 3,
            };
            let n = if u.ratio(1, 16)? { u.int_in_range(0..=13)? } else { channels };
            let scale = any_coef(u)?;
            let mean = (0..n).map(|_| any_coef(u)).collect::<Result<_>>()?;
            let std = (0..n).map(|_| any_coef(u)).collect::<Result<_>>()?;
            config = config.normalize(Normalize::new(scale, mean, std));
        }
        let image_perturb = Perturb::arbitrary(u)?;
        let token_perturb = Perturb::arbitrary(u)?;
        let image_len_delta = len_delta(u)?;
        let token_len_delta = len_delta(u)?;
        let tokens = if u.arbitrary()? { TokenType::F32 } else { TokenType::BF16 };
        let inverse_image = if u.arbitrary()? { ImageType::U8 } else { ImageType::F32 };
        let inverse_pool = if u.ratio(1, 4)? {
            let n = u.int_in_range(1..=64)?;
            Some((0..n).map(|i| any_f32(u, i)).collect::<Result<_>>()?)
        } else {
            None
        };
        // Pixels last: they take whatever bytes are left.
        let n = buffer_len(&image_perturb.apply(&dims), image_len_delta).min(2 * MAX_ELEMS);
        let pixels = if u.arbitrary()? {
            Pixels::U8((0..n).map(|i| any_u8(u, i)).collect::<Result<_>>()?)
        } else {
            Pixels::F32((0..n).map(|i| any_f32(u, i)).collect::<Result<_>>()?)
        };
        Ok(Case {
            config,
            dims,
            image_perturb,
            token_perturb,
            image_len_delta,
            token_len_delta,
            tokens,
            inverse_image,
            inverse_pool,
            pixels,
        })
    }
}

/// Bit-level access and per-backend poison for the element types the target uses.
trait Bits: Element {
    fn bits(self) -> u32;
    fn is_nan(self) -> bool;
    /// A distinct, unlikely value per backend index.
    fn poison(backend: usize) -> Self;
    /// Builds an element from an f32 pool value, keeping NaN payloads where possible.
    fn from_pool(v: f32) -> Self;
}

impl Bits for u8 {
    fn bits(self) -> u32 {
        u32::from(self)
    }
    fn is_nan(self) -> bool {
        false
    }
    fn poison(backend: usize) -> Self {
        0xA5 ^ (backend as u8).wrapping_mul(0x3b)
    }
    fn from_pool(v: f32) -> Self {
        v.to_bits() as u8
    }
}

impl Bits for f32 {
    fn bits(self) -> u32 {
        self.to_bits()
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    fn poison(backend: usize) -> Self {
        f32::from_bits(0x7fa0_dead + backend as u32)
    }
    fn from_pool(v: f32) -> Self {
        v
    }
}

impl Bits for bf16 {
    fn bits(self) -> u32 {
        u32::from(self.to_bits())
    }
    fn is_nan(self) -> bool {
        bf16::is_nan(self)
    }
    fn poison(backend: usize) -> Self {
        bf16::from_bits(0x7fd1 + backend as u16)
    }
    fn from_pool(v: f32) -> Self {
        bf16::from_bits((v.to_bits() >> 16) as u16)
    }
}

fn rank_ok_and_len(dims: &[usize], len: usize) -> bool {
    (1..=6).contains(&dims.len()) && dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) == Some(len)
}

/// Checks invariant 2 for one view constructor result.
fn check_view(what: &str, ok: bool, dims: &[usize], len: usize, case: &Case) {
    assert_eq!(
        ok,
        rank_ok_and_len(dims, len),
        "{what}: view over {len} elements with dims {dims:?} was {}\n{case:?}",
        if ok { "accepted" } else { "rejected" },
    );
}

/// Invariants 3 and 4 for one operation, given each backend's result and output.
fn check_agree<T: Bits>(
    what: &str,
    dims_ok: bool,
    results: &[vistok::Result<()>],
    outputs: &[Vec<T>],
    case: &Case,
) -> bool {
    let reference = &results[0];
    for (k, r) in results.iter().enumerate().skip(1) {
        assert_eq!(
            reference.is_ok(),
            r.is_ok(),
            "{what}: reference returned {reference:?} but {:?} returned {r:?}\n{case:?}",
            backends()[k],
        );
    }
    if !dims_ok {
        assert!(reference.is_err(), "{what}: accepted views whose dims are not the plan's\n{case:?}");
    }
    if reference.is_err() {
        return false;
    }
    let want = &outputs[0];
    for (k, got) in outputs.iter().enumerate().skip(1) {
        let bad: Vec<usize> = (0..want.len()).filter(|&i| want[i].bits() != got[i].bits()).collect();
        if let Some(&i) = bad.first() {
            panic!(
                "{what}: {:?} differs from the reference ({}) at {} of {} elements; first at {i}: \
                 reference {:?} (bits {:#x}), {:?} {:?} (bits {:#x})\n{case:?}",
                backends()[k],
                T::DTYPE.name(),
                bad.len(),
                want.len(),
                want[i],
                want[i].bits(),
                backends()[k],
                got[i],
                got[i].bits(),
            );
        }
    }
    true
}

/// Runs `forward` on every backend; returns the reference's tokens when all agreed and succeeded.
fn forward<I: Bits, O: Bits + Float>(case: &Case, plan: &Patchify, pixels: &[I]) -> Option<Vec<O>> {
    let image_dims = case.image_perturb.apply(plan.image_dims());
    let image = View::new(pixels, &image_dims);
    check_view("forward image", image.is_ok(), &image_dims, pixels.len(), case);
    let image = image.ok()?;
    let token_dims = case.token_perturb.apply(&plan.tokens_dims());
    let len = buffer_len(&token_dims, case.token_len_delta);
    let mut outputs: Vec<Vec<O>> = (0..backends().len()).map(|k| vec![O::poison(k); len]).collect();
    let mut results = Vec::with_capacity(backends().len());
    for (backend, out) in backends().iter().zip(&mut outputs) {
        let view = ViewMut::new(out, &token_dims);
        check_view("forward tokens", view.is_ok(), &token_dims, len, case);
        results.push(plan.forward(*backend, image, view.ok()?));
    }
    let dims_ok = image_dims == plan.image_dims() && token_dims == plan.tokens_dims();
    check_agree("forward", dims_ok, &results, &outputs, case).then(|| outputs.swap_remove(0))
}

/// Runs `inverse` on every backend; returns the reference's image when all agreed and succeeded.
fn inverse<O: Bits + Float, J: Bits>(case: &Case, plan: &Patchify, forward_tokens: Option<&[O]>) -> Option<Vec<J>> {
    let token_dims = case.token_perturb.apply(&plan.tokens_dims());
    let pooled: Vec<O>;
    let tokens: &[O] = match (&case.inverse_pool, forward_tokens) {
        (None, Some(t)) => t,
        (pool, _) => {
            let len = buffer_len(&token_dims, case.token_len_delta);
            pooled = match pool {
                Some(p) => (0..len).map(|i| O::from_pool(p[i % p.len()])).collect(),
                None => (0..len).map(|i| O::from_f32(((i * 37 + 11) % 256) as f32)).collect(),
            };
            &pooled
        }
    };
    let view = View::new(tokens, &token_dims);
    check_view("inverse tokens", view.is_ok(), &token_dims, tokens.len(), case);
    let view = view.ok()?;
    let image_dims = case.image_perturb.apply(plan.image_dims());
    let len = buffer_len(&image_dims, case.image_len_delta);
    let mut outputs: Vec<Vec<J>> = (0..backends().len()).map(|k| vec![J::poison(k); len]).collect();
    let mut results = Vec::with_capacity(backends().len());
    for (backend, out) in backends().iter().zip(&mut outputs) {
        let image = ViewMut::new(out, &image_dims);
        check_view("inverse image", image.is_ok(), &image_dims, len, case);
        results.push(plan.inverse(*backend, view, image.ok()?));
    }
    let dims_ok = image_dims == plan.image_dims() && token_dims == plan.tokens_dims();
    check_agree("inverse", dims_ok, &results, &outputs, case).then(|| outputs.swap_remove(0))
}

/// Forward, then inverse into `J`, then the round-trip check where the contract makes it exact.
fn forward_inverse<I: Bits, O: Bits + Float, J: Bits>(case: &Case, plan: &Patchify, pixels: &[I]) {
    let tokens = forward::<I, O>(case, plan, pixels);
    let back = inverse::<O, J>(case, plan, tokens.as_deref());
    let exact = case.config.normalize.is_none()
        && case.inverse_pool.is_none()
        && I::DTYPE == J::DTYPE
        && (I::DTYPE == DType::U8 || O::DTYPE == DType::F32);
    if let (true, Some(_), Some(back)) = (exact, &tokens, &back) {
        for (i, (&x, &y)) in pixels.iter().zip(back).enumerate() {
            let same = x.bits() == y.bits() || (x.is_nan() && y.is_nan());
            assert!(
                same,
                "round trip {} → {} → {} changed element {i}: {x:?} (bits {:#x}) came back as {y:?} (bits {:#x})\n{case:?}",
                I::DTYPE.name(),
                O::DTYPE.name(),
                J::DTYPE.name(),
                x.bits(),
                y.bits(),
            );
        }
    }
}

fn with_image<I: Bits, O: Bits + Float>(case: &Case, plan: &Patchify, pixels: &[I]) {
    match case.inverse_image {
        ImageType::U8 => forward_inverse::<I, O, u8>(case, plan, pixels),
        ImageType::F32 => forward_inverse::<I, O, f32>(case, plan, pixels),
    }
}

fn with_tokens<I: Bits>(case: &Case, plan: &Patchify, pixels: &[I]) {
    match case.tokens {
        TokenType::F32 => with_image::<I, f32>(case, plan, pixels),
        TokenType::BF16 => with_image::<I, bf16>(case, plan, pixels),
    }
}

fuzz_target!(|case: Case| {
    let Ok(plan) = Patchify::new(&case.config, &case.dims) else { return };
    match &case.pixels {
        Pixels::U8(p) => with_tokens(&case, &plan, p),
        Pixels::F32(p) => with_tokens(&case, &plan, p),
    }
});
