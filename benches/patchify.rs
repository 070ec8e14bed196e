//! Patchify / unpatchify throughput: reference vs cpu in one run, plus a parallel memcpy of the
//! same bytes as the machine's practical ceiling (report cpu / copy as the roofline fraction).
//!
//! Ids: `patchify/<backend>/<in>-<out>/<shape>`, throughput = input + output bytes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use vistok::{bf16, Backend, Element, Float, Layout, Normalize, PatchConfig, Patchify, View, ViewMut};

struct Shape {
    name: &'static str,
    config: PatchConfig,
    dims: Vec<usize>,
}

fn shapes() -> Vec<Shape> {
    vec![
        Shape {
            name: "32x3x256x256-nchw-p16",
            config: PatchConfig::image(Layout::ChannelsFirst, 16, 16).normalize(Normalize::imagenet_u8()),
            dims: vec![32, 3, 256, 256],
        },
        Shape {
            name: "8x512x512x3-nhwc-p16",
            config: PatchConfig::image(Layout::ChannelsLast, 16, 16),
            dims: vec![8, 512, 512, 3],
        },
        Shape {
            name: "4x3x16x224x224-ncthw-p2x16x16",
            config: PatchConfig::video(Layout::ChannelsFirst, 2, 16, 16).normalize(Normalize::imagenet_u8()),
            dims: vec![4, 3, 16, 224, 224],
        },
    ]
}

fn data<T: Element>(n: usize) -> Vec<T> {
    (0..n).map(|i| T::from_f32(((i * 2654435761) % 251) as f32)).collect()
}

/// A rayon-parallel copy of `bytes` bytes: what "memory bound" means on this machine.
fn bench_copy(c: &mut Criterion, bytes: usize, name: &str) {
    use rayon::prelude::*;
    let src = vec![1u8; bytes / 2];
    let mut dst = vec![0u8; bytes / 2];
    let mut g = c.benchmark_group("copy");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function(BenchmarkId::new("cpu/u8", name), |b| {
        b.iter(|| dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s)))
    });
    g.finish();
}

fn bench_forward<I: Element, O: Float>(c: &mut Criterion, s: &Shape) {
    let plan = Patchify::new(&s.config, &s.dims).unwrap();
    let image = data::<I>(s.dims.iter().product());
    let mut tokens = vec![O::from_f32(0.0); plan.tokens_dims().iter().product()];
    let bytes = image.len() * size_of::<I>() + tokens.len() * size_of::<O>();
    let dtypes = format!("{}-{}", I::DTYPE.name(), O::DTYPE.name());
    let mut g = c.benchmark_group("patchify");
    g.throughput(Throughput::Bytes(bytes as u64));
    for (name, backend) in [("reference", Backend::Reference), ("cpu", Backend::Cpu)] {
        if name == "reference" {
            g.sample_size(10).measurement_time(Duration::from_secs(3));
        } else {
            g.sample_size(30).measurement_time(Duration::from_secs(3));
        }
        g.bench_function(BenchmarkId::new(format!("{name}/{dtypes}"), s.name), |b| {
            b.iter(|| {
                plan.forward(
                    backend,
                    View::new(black_box(&image), &s.dims).unwrap(),
                    ViewMut::new(&mut tokens, &plan.tokens_dims()).unwrap(),
                )
                .unwrap()
            })
        });
    }
    g.finish();
    bench_copy(c, bytes, s.name);
}

fn bench_inverse<I: Float, O: Element>(c: &mut Criterion, s: &Shape) {
    let plan = Patchify::new(&s.config, &s.dims).unwrap();
    let tokens = data::<I>(plan.tokens_dims().iter().product());
    let mut image = vec![O::from_f32(0.0); s.dims.iter().product()];
    let bytes = image.len() * size_of::<O>() + tokens.len() * size_of::<I>();
    let dtypes = format!("{}-{}", I::DTYPE.name(), O::DTYPE.name());
    let mut g = c.benchmark_group("unpatchify");
    g.throughput(Throughput::Bytes(bytes as u64));
    for (name, backend) in [("reference", Backend::Reference), ("cpu", Backend::Cpu)] {
        g.sample_size(if name == "reference" { 10 } else { 30 }).measurement_time(Duration::from_secs(3));
        g.bench_function(BenchmarkId::new(format!("{name}/{dtypes}"), s.name), |b| {
            b.iter(|| {
                plan.inverse(
                    backend,
                    View::new(black_box(&tokens), &plan.tokens_dims()).unwrap(),
                    ViewMut::new(&mut image, &s.dims).unwrap(),
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let s = shapes();
    bench_forward::<u8, f32>(c, &s[0]);
    bench_forward::<f32, bf16>(c, &s[1]);
    bench_forward::<u8, f32>(c, &s[2]);
    bench_inverse::<f32, u8>(c, &s[0]);
}

criterion_group! {
    name = patchify;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(patchify);
