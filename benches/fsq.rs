//! FSQ throughput: reference vs cpu in one run, on the shape of the LFQ / FSQ issue (the same
//! ids and data as `vistok bench`'s fsq cases): 1048576 tokens × 6 dimensions, levels
//! `[8, 8, 8, 5, 5, 5]`.
//!
//! Ids: `fsq/<backend>/<dtype>/1048576x6` for encode (dtype of `z`) and
//! `fsq/<backend>/u32-f32/1048576x6` for decode. Throughput = input read + output written.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use vistok::{bf16, Backend, Float, Fsq, View, ViewMut};

const LEVELS: [u32; 6] = [8, 8, 8, 5, 5, 5];
const N: usize = 1 << 20;

/// splitmix64 of the index.
fn hash(i: usize) -> u64 {
    let mut z = (i as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [−4, 4) (the tanh range), with one in 64 an exact ±0.
fn data<T: Float>(n: usize) -> Vec<T> {
    (0..n)
        .map(|i| {
            let h = hash(i);
            T::from_f32(match h & 63 {
                0 => 0.0,
                1 => -0.0,
                _ => ((h >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * 4.0,
            })
        })
        .collect()
}

const BACKENDS: [(&str, Backend, usize); 2] = [("reference", Backend::Reference, 10), ("cpu", Backend::Cpu, 30)];

fn bench_encode<T: Float>(c: &mut Criterion, fsq: &Fsq) {
    let d = fsq.dim();
    let z = data::<T>(N * d);
    let mut ids = vec![0u32; N];
    let mut g = c.benchmark_group("fsq");
    g.throughput(Throughput::Bytes((z.len() * size_of::<T>() + ids.len() * 4) as u64));
    for (name, backend, samples) in BACKENDS {
        g.sample_size(samples).measurement_time(Duration::from_secs(3));
        g.bench_function(BenchmarkId::new(format!("{name}/{}", T::DTYPE.name()), format!("{N}x{d}")), |b| {
            b.iter(|| {
                fsq.encode(backend, View::new(black_box(&z), &[N, d]).unwrap(), ViewMut::new(&mut ids, &[N]).unwrap())
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn bench_decode(c: &mut Criterion, fsq: &Fsq) {
    let d = fsq.dim();
    let ids: Vec<u32> = (0..N).map(|i| (hash(i) % fsq.codebook_size()) as u32).collect();
    let mut codes = vec![0f32; N * d];
    let mut g = c.benchmark_group("fsq");
    g.throughput(Throughput::Bytes((ids.len() * 4 + codes.len() * 4) as u64));
    for (name, backend, samples) in BACKENDS {
        g.sample_size(samples).measurement_time(Duration::from_secs(3));
        g.bench_function(BenchmarkId::new(format!("{name}/u32-f32"), format!("{N}x{d}")), |b| {
            b.iter(|| {
                fsq.decode(
                    backend,
                    View::new(black_box(&ids), &[N]).unwrap(),
                    ViewMut::new(&mut codes, &[N, d]).unwrap(),
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let fsq = Fsq::new(&LEVELS).unwrap();
    bench_encode::<f32>(c, &fsq);
    bench_encode::<bf16>(c, &fsq);
    bench_decode(c, &fsq);
}

criterion_group! {
    name = fsq;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(fsq);
