//! Patchify / unpatchify: every CPU ISA level and every dtype pair against the reference, on
//! random shapes (odd sizes, sizes 1, widths that are not multiples of the SIMD width), plus
//! hand-computed layouts, round trips, padding and bad input.

mod common;

use common::{assert_bits_eq, poison, random_data};
use proptest::prelude::*;
use vistok::{
    bf16, f16, Backend, Element, Error, Float, Isa, Layout, Normalize, PatchConfig, PatchOrder, Patchify, View, ViewMut,
};

fn forward<I: Element, O: Float>(plan: &Patchify, backend: Backend, image: &[I]) -> Vec<O> {
    let mut out = vec![poison::<O>(); plan.tokens_dims().iter().product()];
    plan.forward(
        backend,
        View::new(image, plan.image_dims()).unwrap(),
        ViewMut::new(&mut out, &plan.tokens_dims()).unwrap(),
    )
    .unwrap();
    out
}

fn inverse<I: Float, O: Element>(plan: &Patchify, backend: Backend, tokens: &[I]) -> Vec<O> {
    let mut out = vec![poison::<O>(); plan.image_dims().iter().product()];
    plan.inverse(
        backend,
        View::new(tokens, &plan.tokens_dims()).unwrap(),
        ViewMut::new(&mut out, plan.image_dims()).unwrap(),
    )
    .unwrap();
    out
}

fn cpu_backends() -> Vec<Backend> {
    Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa).chain([Backend::Cpu]).collect()
}

/// Forward and inverse for one dtype pair: every CPU backend bit-identical to the reference,
/// and the reference itself writes every element.
fn check_pair<I: Float, O: Float, P: Element>(plan: &Patchify, seed: u64) {
    let n = plan.image_dims().iter().product();
    // Forward with an image of type P (pixels), tokens of type O.
    let image = random_data::<P>(n, seed);
    let want: Vec<O> = forward(plan, Backend::Reference, &image);
    let untouched = want.iter().filter(|x| common::bits(**x) == common::bits(poison::<O>())).count();
    assert_eq!(untouched, 0, "reference left {untouched} token values unwritten");
    for be in cpu_backends() {
        let got: Vec<O> = forward(plan, be, &image);
        assert_bits_eq(&got, &want, &format!("forward {:?}->{:?} {be:?} {plan:?}", P::DTYPE, O::DTYPE));
    }
    // Inverse with tokens of type I, image of type P.
    let tokens = random_data::<I>(plan.tokens_dims().iter().product(), seed ^ 0x5555);
    let want: Vec<P> = inverse(plan, Backend::Reference, &tokens);
    for be in cpu_backends() {
        let got: Vec<P> = inverse(plan, be, &tokens);
        assert_bits_eq(&got, &want, &format!("inverse {:?}->{:?} {be:?} {plan:?}", I::DTYPE, P::DTYPE));
    }
}

fn check_all_pairs(plan: &Patchify, seed: u64) {
    // 4 pixel types × 3 token types, forward and inverse.
    check_pair::<f32, f32, u8>(plan, seed);
    check_pair::<f16, f16, u8>(plan, seed + 1);
    check_pair::<bf16, bf16, u8>(plan, seed + 2);
    check_pair::<f32, bf16, f32>(plan, seed + 3);
    check_pair::<bf16, f32, f32>(plan, seed + 4);
    check_pair::<f16, f16, f32>(plan, seed + 5);
    check_pair::<f16, f32, f16>(plan, seed + 6);
    check_pair::<bf16, f16, f16>(plan, seed + 7);
    check_pair::<f32, bf16, f16>(plan, seed + 8);
    check_pair::<f16, bf16, bf16>(plan, seed + 9);
    check_pair::<f32, f16, bf16>(plan, seed + 10);
    check_pair::<bf16, f32, bf16>(plan, seed + 11);
}

#[derive(Debug, Clone)]
struct Case {
    dims: Vec<usize>,
    config: PatchConfig,
    seed: u64,
}

/// Random problems: rank 4 or 5, both layouts and orders, padding on/off, sizes from 1,
/// patch widths up to 37 (tails shorter and longer than 16 lanes), optional normalisation.
fn case() -> impl Strategy<Value = Case> {
    (
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        // Batches up to 5: from 2 per thread the CPU unpatchify gives threads whole NCHW samples.
        (1usize..6, 1usize..6, 1usize..4, 1usize..7, 1usize..38),
        (1usize..3, 1usize..3, 1usize..4, 0usize..16, any::<u64>()),
    )
        .prop_map(|((video, last, pqc, pad, norm), (b, c, pt, ph, pw), (gt, gh, gw, rem, seed))| {
            let pt = if video { pt } else { 1 };
            let gt = if video { gt } else { 1 };
            // With padding, shave up to (patch − 1) off each size, never below one patch.
            let shave = |g: usize, p: usize| if pad { (g * p).saturating_sub(rem % p).max(p) } else { g * p };
            let (t, h, w) = (shave(gt, pt), shave(gh, ph), shave(gw, pw));
            let layout = if last { Layout::ChannelsLast } else { Layout::ChannelsFirst };
            let dims = match (video, last) {
                (false, false) => vec![b, c, h, w],
                (false, true) => vec![b, h, w, c],
                (true, false) => vec![b, c, t, h, w],
                (true, true) => vec![b, t, h, w, c],
            };
            let mut config = PatchConfig::video(layout, pt, ph, pw)
                .order(if pqc { PatchOrder::Pqc } else { PatchOrder::Cpq })
                .pad(pad);
            if norm {
                let mean = (0..c).map(|i| 0.1 + 0.2 * i as f32).collect();
                let std = (0..c).map(|i| 0.3 - 0.02 * i as f32).collect();
                config = config.normalize(Normalize::new(1.0 / 255.0, mean, std));
            }
            Case { dims, config, seed }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn cpu_matches_reference(case in case()) {
        let plan = Patchify::new(&case.config, &case.dims).unwrap();
        check_all_pairs(&plan, case.seed);
    }

    #[test]
    fn round_trip_is_exact(case in case()) {
        let plan = Patchify::new(&case.config, &case.dims).unwrap();
        let n = case.dims.iter().product();
        // u8 pixels survive f32 and f16 tokens (normalised or not) exactly.
        let image = random_data::<u8>(n, case.seed);
        for be in [Backend::Reference, Backend::Cpu] {
            let t32: Vec<f32> = forward(&plan, be, &image);
            prop_assert_eq!(&inverse::<f32, u8>(&plan, be, &t32), &image);
            let t16: Vec<f16> = forward(&plan, be, &image);
            prop_assert_eq!(&inverse::<f16, u8>(&plan, be, &t16), &image);
            // bf16 keeps 8 significant bits: a u8 pixel comes back within 1.
            let tb: Vec<bf16> = forward(&plan, be, &image);
            let back: Vec<u8> = inverse(&plan, be, &tb);
            prop_assert!(back.iter().zip(&image).all(|(a, b)| a.abs_diff(*b) <= 1));
        }
        // Without normalisation, f32 pixels survive f32 tokens bit for bit.
        if case.config.normalize.is_none() {
            let image = random_data::<f32>(n, case.seed);
            let t: Vec<f32> = forward(&plan, Backend::Cpu, &image);
            let back: Vec<f32> = inverse(&plan, Backend::Cpu, &t);
            assert_bits_eq(&back, &image, "f32 round trip");
        }
    }
}

/// The bench shapes, once each, against the reference (the ISA levels all run them).
#[test]
fn bench_shapes_match_reference() {
    let cases = [
        (PatchConfig::image(Layout::ChannelsFirst, 16, 16).normalize(Normalize::imagenet_u8()), vec![2, 3, 256, 256]),
        (PatchConfig::image(Layout::ChannelsLast, 16, 16), vec![1, 512, 512, 3]),
        (PatchConfig::video(Layout::ChannelsFirst, 2, 16, 16), vec![1, 3, 4, 224, 224]),
        (PatchConfig::image(Layout::ChannelsLast, 14, 14).order(PatchOrder::Pqc), vec![1, 224, 224, 3]),
        // Outputs over 8 MiB take the streaming-store path (f32 tokens, f32 images).
        (PatchConfig::image(Layout::ChannelsFirst, 16, 16).pad(true), vec![12, 3, 250, 256]),
        (PatchConfig::image(Layout::ChannelsLast, 16, 16).order(PatchOrder::Pqc), vec![3, 512, 512, 3]),
        // Whole samples per thread, streaming (f32 images over 8 MiB).
        (PatchConfig::image(Layout::ChannelsFirst, 16, 16).pad(true), vec![6, 3, 250, 250]),
    ];
    for (i, (config, dims)) in cases.iter().enumerate() {
        let plan = Patchify::new(config, dims).unwrap();
        check_pair::<f32, f32, u8>(&plan, i as u64);
        check_pair::<bf16, f32, f32>(&plan, i as u64);
    }
}

/// timm's Conv2d order (cpq) and MAE's order (pqc) on a hand-built 2-channel 2×4 image.
#[test]
fn layouts_and_orders_by_hand() {
    // Pixel value = 100·c + 10·h + w, NCHW [1, 2, 2, 4], patches 2×2 → 2 tokens of 8.
    let nchw: Vec<f32> =
        (0..2).flat_map(|c| (0..2).flat_map(move |h| (0..4).map(move |w| (100 * c + 10 * h + w) as f32))).collect();
    let nhwc: Vec<f32> =
        (0..2).flat_map(|h| (0..4).flat_map(move |w| (0..2).map(move |c| (100 * c + 10 * h + w) as f32))).collect();
    let cpq: Vec<f32> = [0., 1., 10., 11., 100., 101., 110., 111., 2., 3., 12., 13., 102., 103., 112., 113.].to_vec();
    let pqc: Vec<f32> = [0., 100., 1., 101., 10., 110., 11., 111., 2., 102., 3., 103., 12., 112., 13., 113.].to_vec();
    for be in [Backend::Reference, Backend::Cpu, Backend::CpuIsa(Isa::Scalar)] {
        for (layout, image, dims) in
            [(Layout::ChannelsFirst, &nchw, vec![1, 2, 2, 4]), (Layout::ChannelsLast, &nhwc, vec![1, 2, 4, 2])]
        {
            for (order, want) in [(PatchOrder::Cpq, &cpq), (PatchOrder::Pqc, &pqc)] {
                let plan = Patchify::new(&PatchConfig::image(layout, 2, 2).order(order), &dims).unwrap();
                let got: Vec<f32> = forward(&plan, be, image);
                assert_eq!(&got, want, "{be:?} {layout:?} {order:?}");
                let back: Vec<f32> = inverse(&plan, be, &got);
                assert_eq!(&back, image, "{be:?} {layout:?} {order:?} inverse");
            }
        }
    }
}

/// Normalisation is `fma(x, scale/std, −mean/std)` and differs from the textbook formula by
/// at most 2 ulp of the larger of `x·scale/std` and `mean/std`; padded positions are +0.0.
#[test]
fn normalisation_and_padding() {
    let n = Normalize::imagenet_u8();
    let config = PatchConfig::image(Layout::ChannelsFirst, 4, 4).normalize(n.clone()).pad(true);
    let dims = [1, 3, 6, 7];
    let plan = Patchify::new(&config, &dims).unwrap();
    assert_eq!(plan.tokens_dims(), [1, 4, 48]);
    let image = random_data::<u8>(3 * 6 * 7, 9);
    for be in [Backend::Reference, Backend::Cpu] {
        let t: Vec<f32> = forward(&plan, be, &image);
        for (tok, vals) in t.chunks(48).enumerate() {
            for (j, &v) in vals.iter().enumerate() {
                let (c, dh, dw) = (j / 16, j / 4 % 4, j % 4);
                let (h, w) = (tok / 2 * 4 + dh, tok % 2 * 4 + dw);
                if h >= 6 || w >= 7 {
                    assert_eq!(v.to_bits(), 0, "padded position must be +0.0");
                } else {
                    let x = image[(c * 6 + h) * 7 + w] as f64;
                    let (xa, b) = (x * n.scale as f64 / n.std[c] as f64, n.mean[c] as f64 / n.std[c] as f64);
                    let textbook = xa - b;
                    // Two roundings of the coefficients and one of the fma, each at most half
                    // an ulp of the larger term (the subtraction may cancel).
                    let big = xa.abs().max(b.abs()) as f32;
                    let ulp = f32::from_bits(big.to_bits() + 1) - big;
                    assert!(((v as f64) - textbook).abs() <= 2.0 * ulp as f64, "{v} vs {textbook}");
                }
            }
        }
    }
}

/// Results do not depend on the number of threads. (For the NCHW case, unpatchify with one
/// thread gives it whole samples and with 7 threads splits samples into rows: two loop nests.)
#[test]
fn thread_count_does_not_change_results() {
    let configs = [
        (PatchConfig::image(Layout::ChannelsLast, 16, 16).pad(true), [3, 100, 90, 3]),
        (
            PatchConfig::image(Layout::ChannelsFirst, 16, 16).pad(true).normalize(Normalize::imagenet_u8()),
            [5, 3, 90, 100],
        ),
        (PatchConfig::image(Layout::ChannelsFirst, 8, 8).order(PatchOrder::Pqc), [6, 4, 40, 24]),
    ];
    for (config, dims) in configs {
        let plan = Patchify::new(&config, &dims).unwrap();
        let image = random_data::<f32>(dims.iter().product(), 4);
        let tokens = random_data::<f32>(plan.tokens_dims().iter().product(), 5);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                (
                    forward::<f32, bf16>(&plan, Backend::Cpu, &image),
                    inverse::<f32, u8>(&plan, Backend::Cpu, &tokens),
                    inverse::<f32, f32>(&plan, Backend::Cpu, &tokens),
                )
            })
        };
        let one = run(1);
        assert_eq!(one.1, inverse::<f32, u8>(&plan, Backend::Reference, &tokens), "{dims:?} inverse vs reference");
        for threads in [2, 3, 7] {
            let many = run(threads);
            assert_bits_eq(&many.0, &one.0, "forward");
            assert_eq!(many.1, one.1, "{dims:?} inverse, {threads} threads");
            assert_bits_eq(&many.2, &one.2, "inverse f32");
        }
    }
}

fn shape_error(config: &PatchConfig, dims: &[usize]) -> String {
    match Patchify::new(config, dims) {
        Err(e @ (Error::Shape { .. } | Error::Overflow { .. } | Error::Length { .. } | Error::Invalid { .. })) => {
            e.to_string()
        }
        other => panic!("expected a typed error for {dims:?}, got {other:?}"),
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let img = PatchConfig::image(Layout::ChannelsFirst, 16, 16);
    assert!(shape_error(&img, &[1, 3, 250, 256]).contains("height 250 is not a multiple of patch height 16"));
    assert!(shape_error(&img, &[1, 3, 0, 256]).contains("height is 0"));
    assert!(shape_error(&img, &[1, 3, 8, 256]).contains("larger than the image"));
    assert!(shape_error(&img, &[3, 256, 256]).contains("rank"));
    assert!(
        shape_error(&PatchConfig::image(Layout::ChannelsFirst, 0, 16), &[1, 3, 16, 16]).contains("patch height is 0")
    );
    assert!(shape_error(&PatchConfig::video(Layout::ChannelsFirst, 2, 16, 16), &[1, 3, 16, 16]).contains("rank-5"));
    assert!(shape_error(&img, &[usize::MAX / 2, 3, 16, 16]).contains("overflow"));
    assert!(shape_error(&img.clone().pad(true), &[1 << 40, 1 << 20, 16, 16]).contains("overflow"));
    let wrong_len = img.clone().normalize(Normalize::new(1.0, vec![0.0; 2], vec![1.0; 3]));
    assert!(shape_error(&wrong_len, &[1, 3, 16, 16]).contains("mean has 2 elements, expected 3"));
    let zero_std = img.clone().normalize(Normalize::new(1.0, vec![0.0; 3], vec![1.0, 0.0, 1.0]));
    assert!(shape_error(&zero_std, &[1, 3, 16, 16]).contains("channel 1"));
    let nan_scale = img.clone().normalize(Normalize::new(f32::NAN, vec![0.0; 3], vec![1.0; 3]));
    assert!(shape_error(&nan_scale, &[1, 3, 16, 16]).contains("scale"));

    // Buffers that disagree with the plan.
    let plan = Patchify::new(&img, &[1, 3, 32, 32]).unwrap();
    let image = vec![1u8; 3 * 32 * 32];
    let mut tokens = vec![0.0f32; 4 * 768];
    assert!(matches!(View::new(&image[1..], &[1, 3, 32, 32]), Err(Error::Length { .. })));
    let wrong_dims = plan.forward(
        Backend::Cpu,
        View::new(&image, &[1, 3, 16, 64]).unwrap(),
        ViewMut::new(&mut tokens, &[1, 4, 768]).unwrap(),
    );
    assert!(matches!(wrong_dims, Err(Error::Shape { .. })), "{wrong_dims:?}");
    let mut short = vec![0.0f32; 3 * 768];
    let wrong_tokens = plan.forward(
        Backend::Reference,
        View::new(&image, &[1, 3, 32, 32]).unwrap(),
        ViewMut::new(&mut short, &[1, 3, 768]).unwrap(),
    );
    assert!(wrong_tokens
        .unwrap_err()
        .to_string()
        .starts_with("patchify: tokens dims [1, 3, 768], expected [1, 4, 768]"));
    let mut img_out = vec![0u8; 3 * 32 * 32];
    let wrong_inverse = plan.inverse(
        Backend::Cpu,
        View::new(&short, &[1, 3, 768]).unwrap(),
        ViewMut::new(&mut img_out, &[1, 3, 32, 32]).unwrap(),
    );
    assert!(wrong_inverse.unwrap_err().to_string().starts_with("unpatchify: tokens dims"));
}
