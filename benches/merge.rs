//! Token merging: ToMe's matching plus a mean merge (what ToMe's torch code does per layer),
//! reference vs cpu in one run, and the cpu's two phases (the plan, the merge) on their own.
//!
//! Ids: `merge/<backend>/<dtype>/<B>x<N>x<C>-r<r>` (`merge-plan/…`, `merge-apply/…` for the
//! phases). Throughput: the similarity's flops `2·B·(N/2)²·C` (criterion prints them as
//! elem/s: read Gelem/s as GFLOP/s); the apply phase reports bytes.
//!
//! `VISTOK_BENCH_REFERENCE=0` skips the (slow: seconds per call) reference rows.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use vistok::merge::{MatchConfig, MergeMode, MergePlan};
use vistok::{bf16, Backend, Float, View, ViewMut};

struct Shape {
    dims: [usize; 3],
    config: MatchConfig,
}

impl Shape {
    fn name(&self) -> String {
        let [b, n, c] = self.dims;
        format!("{b}x{n}x{c}-r{}", self.config.r)
    }

    fn out_dims(&self) -> [usize; 3] {
        let [b, n, c] = self.dims;
        [b, n - self.config.effective_r(n), c]
    }

    fn flops(&self) -> u64 {
        let [b, n, c] = self.dims;
        2 * (b * (n / 2) * (n / 2) * c) as u64
    }
}

fn shapes() -> Vec<Shape> {
    vec![
        Shape { dims: [8, 197, 768], config: MatchConfig::new(49).class_token(true) },
        Shape { dims: [8, 1024, 768], config: MatchConfig::new(256).class_token(true) },
        Shape { dims: [2, 4096, 320], config: MatchConfig::new(2048) },
    ]
}

/// splitmix64 → uniform in [−1, 1).
fn uniform(i: u64) -> f32 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

fn tokens<T: Float>(len: usize) -> Vec<T> {
    (0..len as u64).map(|i| T::from_f32(uniform(i))).collect()
}

fn match_and_merge<T: Float>(s: &Shape, be: Backend, x: &[T], out: &mut [T]) {
    let plan = MergePlan::bipartite(be, View::new(black_box(x), &s.dims).unwrap(), &s.config).unwrap();
    plan.merge(be, View::new(x, &s.dims).unwrap(), MergeMode::Mean, ViewMut::new(out, &s.out_dims()).unwrap()).unwrap();
}

fn bench_shape<T: Float>(c: &mut Criterion, s: &Shape) {
    let x = tokens::<T>(s.dims.iter().product());
    let mut out = vec![T::from_f32(0.0); s.out_dims().iter().product()];
    let dtype = T::DTYPE.name();
    let reference = std::env::var("VISTOK_BENCH_REFERENCE").map_or(true, |v| v != "0");

    let mut g = c.benchmark_group("merge");
    g.throughput(Throughput::Elements(s.flops()));
    for (name, be) in [("reference", Backend::Reference), ("cpu", Backend::Cpu)] {
        if be == Backend::Reference && !reference {
            continue;
        }
        let (n, t) = if be == Backend::Reference { (10, 5) } else { (30, 5) };
        g.sample_size(n).measurement_time(Duration::from_secs(t));
        g.bench_function(BenchmarkId::new(format!("{name}/{dtype}"), s.name()), |b| {
            b.iter(|| match_and_merge(s, be, &x, &mut out))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("merge-plan");
    g.throughput(Throughput::Elements(s.flops())).sample_size(30).measurement_time(Duration::from_secs(4));
    g.bench_function(BenchmarkId::new(format!("cpu/{dtype}"), s.name()), |b| {
        b.iter(|| MergePlan::bipartite(Backend::Cpu, View::new(black_box(&x), &s.dims).unwrap(), &s.config).unwrap())
    });
    g.finish();

    let plan = MergePlan::bipartite(Backend::Cpu, View::new(&x, &s.dims).unwrap(), &s.config).unwrap();
    let bytes = (x.len() + out.len()) * size_of::<T>();
    let mut g = c.benchmark_group("merge-apply");
    g.throughput(Throughput::Bytes(bytes as u64)).sample_size(30).measurement_time(Duration::from_secs(3));
    g.bench_function(BenchmarkId::new(format!("cpu/{dtype}"), s.name()), |b| {
        b.iter(|| {
            let (xv, ov) = (View::new(black_box(&x), &s.dims).unwrap(), ViewMut::new(&mut out, &s.out_dims()).unwrap());
            plan.merge(Backend::Cpu, xv, MergeMode::Mean, ov).unwrap()
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let s = shapes();
    bench_shape::<f32>(c, &s[0]);
    bench_shape::<f32>(c, &s[1]);
    bench_shape::<bf16>(c, &s[1]);
    bench_shape::<f32>(c, &s[2]);
}

criterion_group! {
    name = merge;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(merge);
