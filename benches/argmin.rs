//! Codebook argmin throughput (L2): cpu f32 and cpu bf16 at the shapes in one run, and
//! the reference on the first 256 rows of each (the naive f64 loop takes hours at full size;
//! the row count is in its id).
//!
//! Ids: `argmin/<backend>/<dtype>/<N>x<K>x<D>`. Throughput is reported as elements = flops
//! (`2·N·K·D`), so criterion's "Gelem/s" reads as GFLOP/s.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use vistok::argmin::{Codebook, Metric};
use vistok::{bf16, Backend, Float, View, ViewMut};

const SHAPES: &[(usize, usize, usize)] =
    &[(65536, 16384, 8), (65536, 16384, 256), (65536, 1024, 256), (4096, 262144, 8)];
const REFERENCE_ROWS: usize = 256;

/// Deterministic values uniform in [-1, 1).
fn data<T: Float>(len: usize, seed: u64) -> Vec<T> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            T::from_f32((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

fn bench_dtype<T: Float>(c: &mut Criterion, (n, k, d): (usize, usize, usize)) {
    let e = data::<T>(k * d, 2);
    let cb = Codebook::new(View::new(&e, &[k, d]).unwrap(), Metric::L2).unwrap();
    let x = data::<T>(n * d, 1);
    let mut idx = vec![0u32; n];
    let mut g = c.benchmark_group("argmin");
    for (name, backend, rows) in [("reference", Backend::Reference, REFERENCE_ROWS), ("cpu", Backend::Cpu, n)] {
        g.throughput(Throughput::Elements(2 * (rows * k * d) as u64));
        g.sample_size(10).measurement_time(Duration::from_secs(if name == "cpu" { 20 } else { 10 }));
        let id = BenchmarkId::new(format!("{name}/{}", T::DTYPE.name()), format!("{rows}x{k}x{d}"));
        g.bench_function(id, |b| {
            b.iter(|| {
                cb.argmin(
                    backend,
                    View::new(black_box(&x[..rows * d]), &[rows, d]).unwrap(),
                    ViewMut::new(&mut idx[..rows], &[rows]).unwrap(),
                    None,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    for &s in SHAPES {
        bench_dtype::<f32>(c, s);
        bench_dtype::<bf16>(c, s);
    }
}

criterion_group! {
    name = argmin;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(argmin);
