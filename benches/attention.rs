//! Attention throughput: the f64 reference vs the cpu backend in f32 and bf16, in one run.
//!
//! Ids: `attention/<backend>/<dtype>/<B>x<H>x<N>x<D>[-causal]` (self-attention, `Nq = Nk = N`).
//! Throughput is in flops, counted as FlashAttention counts them: `4·B·H·N²·D` (the two matrix
//! products), halved for causal masks; criterion prints it as elements per second, so read
//! `Gelem/s` as GFLOP/s. The reference (naive, f64) only runs on the smallest shape.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use vistok::attention::{Attention, Mask};
use vistok::{bf16, Backend, Float, View, ViewMut};

#[derive(Clone, Copy)]
struct Shape {
    h: usize,
    n: usize,
    d: usize,
    causal: bool,
}

impl Shape {
    fn name(&self) -> String {
        format!("1x{}x{}x{}{}", self.h, self.n, self.d, if self.causal { "-causal" } else { "" })
    }

    fn flops(&self) -> u64 {
        (4 * self.h * self.n * self.n * self.d / if self.causal { 2 } else { 1 }) as u64
    }
}

/// Deterministic values in [−1, 1].
fn data<T: Float>(n: usize, salt: usize) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f32(((i.wrapping_add(salt).wrapping_mul(2_654_435_761) % 251) as f32) / 125.0 - 1.0))
        .collect()
}

fn bench_one<T: Float>(c: &mut Criterion, s: Shape, backend: Backend, name: &str) {
    let dims = [1, s.h, s.n, s.d];
    let len = s.h * s.n * s.d;
    let (q, k, v) = (data::<T>(len, 1), data::<T>(len, 2), data::<T>(len, 3));
    let mut out = vec![T::from_f32(0.0); len];
    let a = Attention::new().mask(if s.causal { Mask::Causal } else { Mask::None });
    let mut g = c.benchmark_group("attention");
    g.throughput(Throughput::Elements(s.flops()));
    if backend == Backend::Reference {
        g.sample_size(10).measurement_time(Duration::from_secs(5));
    } else {
        g.sample_size(20).measurement_time(Duration::from_secs(4));
    }
    g.bench_function(BenchmarkId::new(format!("{name}/{}", T::DTYPE.name()), s.name()), |b| {
        b.iter(|| {
            a.forward(
                backend,
                View::new(black_box(&q), &dims).unwrap(),
                View::new(&k, &dims).unwrap(),
                View::new(&v, &dims).unwrap(),
                ViewMut::new(&mut out, &dims).unwrap(),
            )
            .unwrap()
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let s = |h, n, d, causal| Shape { h, n, d, causal };
    let shapes = [
        s(12, 256, 64, false),
        s(12, 1024, 64, false),
        s(12, 4096, 64, false),
        s(16, 1024, 128, false),
        s(12, 1024, 64, true),
    ];
    for (i, &shape) in shapes.iter().enumerate() {
        if i == 0 {
            bench_one::<f32>(c, shape, Backend::Reference, "reference");
        }
        bench_one::<f32>(c, shape, Backend::Cpu, "cpu");
        bench_one::<bf16>(c, shape, Backend::Cpu, "cpu");
    }
}

criterion_group! {
    name = attention;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(attention);
