//! LFQ throughput: reference vs cpu in one run, on the shapes of the LFQ / FSQ issue (the same
//! ids and data as `vistok bench`'s lfq cases).
//!
//! Ids: `lfq/<backend>/<dtype>/<N>x<C>` for encode (dtype of `z`; C = G·d: `1048576x18` and
//! `65536x18` are G = 1, d = 18, MSB-first; `1048576x32` is G = 4, d = 8, LSB-first) and
//! `lfq/<backend>/u32-f32/<N>x<C>` for decode. Throughput = input read + output written.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use vistok::{bf16, Backend, BitOrder, Float, Lfq, LfqConfig, View, ViewMut};

/// splitmix64 of the index.
fn hash(i: usize) -> u64 {
    let mut z = (i as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [−range, range), centred on 0 (LFQ on non-negative data would be trivial), with
/// one in 64 an exact ±0.
fn signed<T: Float>(n: usize, range: f32) -> Vec<T> {
    (0..n)
        .map(|i| {
            let h = hash(i);
            T::from_f32(match h & 63 {
                0 => 0.0,
                1 => -0.0,
                _ => ((h >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * range,
            })
        })
        .collect()
}

const BACKENDS: [(&str, Backend, usize); 2] = [("reference", Backend::Reference, 10), ("cpu", Backend::Cpu, 30)];

fn bench_encode<T: Float>(c: &mut Criterion, config: LfqConfig, n: usize) {
    let plan = Lfq::new(&config).unwrap();
    let z = signed::<T>(n * plan.channels(), 2.0);
    let mut ids = vec![0u32; n * plan.groups()];
    let bytes = z.len() * size_of::<T>() + ids.len() * 4;
    let mut g = c.benchmark_group("lfq");
    g.throughput(Throughput::Bytes(bytes as u64));
    for (name, backend, samples) in BACKENDS {
        g.sample_size(samples).measurement_time(Duration::from_secs(3));
        let id = BenchmarkId::new(format!("{name}/{}", T::DTYPE.name()), format!("{n}x{}", plan.channels()));
        g.bench_function(id, |b| {
            b.iter(|| {
                plan.encode(
                    backend,
                    View::new(black_box(&z), &plan.codes_dims(n)).unwrap(),
                    ViewMut::new(&mut ids, &plan.ids_dims(n)).unwrap(),
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn bench_decode(c: &mut Criterion, config: LfqConfig, n: usize) {
    let plan = Lfq::new(&config).unwrap();
    let max = (plan.codebook_size() - 1) as u32;
    let ids: Vec<u32> = (0..n * plan.groups()).map(|i| hash(i) as u32 & max).collect();
    let mut codes = vec![0f32; n * plan.channels()];
    let bytes = ids.len() * 4 + codes.len() * 4;
    let mut g = c.benchmark_group("lfq");
    g.throughput(Throughput::Bytes(bytes as u64));
    for (name, backend, samples) in BACKENDS {
        g.sample_size(samples).measurement_time(Duration::from_secs(3));
        g.bench_function(BenchmarkId::new(format!("{name}/u32-f32"), format!("{n}x{}", plan.channels())), |b| {
            b.iter(|| {
                plan.decode(
                    backend,
                    View::new(black_box(&ids), &plan.ids_dims(n)).unwrap(),
                    ViewMut::new(&mut codes, &plan.codes_dims(n)).unwrap(),
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let msb18 = LfqConfig::new(1, 18, BitOrder::MsbFirst);
    let grouped = LfqConfig::new(4, 8, BitOrder::LsbFirst);
    bench_encode::<f32>(c, msb18, 1 << 20);
    bench_encode::<bf16>(c, msb18, 1 << 20);
    bench_encode::<f32>(c, grouped, 1 << 20);
    bench_encode::<f32>(c, msb18, 1 << 16);
    bench_decode(c, msb18, 1 << 20);
}

criterion_group! {
    name = lfq;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(lfq);
