//! CUDA patchify / unpatchify throughput, with a device-to-device copy of the same byte count
//! in the same run as the roofline.
//!
//! Ids: `{patchify,unpatchify}/cuda/<in>-<out>/<shape>` and `copy/cuda/<shape>`; throughput is
//! bytes read + bytes written (for the copy: half the bytes each way, so the numbers compare
//! directly). Timing: many launches between two stream synchronisations. Without a GPU it
//! prints `skipped: no CUDA device` and exits 0. Ends with a table: GB/s, % of the copy, % of
//! the H200's 4.8 TB/s.
//!
//! The B = 32 shapes (31.5 MB moved) fit in an H200's L2 (the copy then beats HBM's 4.8 TB/s);
//! the B = 256 shapes (252 MB) cannot, so their "% 4.8TB" is the honest HBM figure. Sweep rows
//! (table only) compare thread mappings and samples per thread against the default.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use vistok::cuda::patchify::{GridShape, Mapping};
use vistok::cuda::{Gpu, PatchifyKernel};
use vistok::{bf16, Element, Float, Layout, Normalize, PatchConfig, PatchOrder, Patchify};

/// Peak HBM bandwidth of an H200, for the last column.
const PEAK_BYTES_PER_S: f64 = 4.8e12;

struct Row {
    id: String,
    bytes: usize,
    secs: f64,
    copy_secs: f64,
}

/// Seconds per call of `f`: the best of 3 runs of `n` calls between synchronisations.
fn time_per_call(stream: &Arc<CudaStream>, n: u32, mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        stream.synchronize().unwrap();
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        stream.synchronize().unwrap();
        best = best.min(t.elapsed().as_secs_f64() / f64::from(n));
    }
    best
}

fn random<T: Element>(n: usize) -> Vec<T> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            T::from_f32((x >> 56) as f32)
        })
        .collect()
}

type Launch<I, O> = fn(&PatchifyKernel, &Arc<CudaStream>, &CudaSlice<I>, &mut CudaSlice<O>);

/// Table-only variants of a case: both patchify thread mappings (default grid), and the
/// default mapping at fixed samples per thread.
#[derive(Clone, Copy)]
struct Sweep {
    mappings: bool,
    per_thread: &'static [u32],
}

const NO_SWEEP: Sweep = Sweep { mappings: false, per_thread: &[] };

/// Benchmarks one direction (`launch`) of one shape and the equivalent copy.
fn bench_case<I, O>(
    c: &mut Criterion,
    gpu: &Gpu,
    rows: &mut Vec<Row>,
    id: [&str; 3],
    plan: &Patchify,
    launch: Launch<I, O>,
    sweep: Sweep,
) where
    I: Element + DeviceRepr,
    O: Element + DeviceRepr + cudarc::driver::ValidAsZeroBits,
{
    let [family, pair, shape] = id;
    let stream = gpu.stream();
    let kernel = PatchifyKernel::new(gpu, plan).unwrap();
    let (n_img, n_tok): (usize, usize) = (plan.image_dims().iter().product(), plan.tokens_dims().iter().product());
    let (n_in, n_out) = if family == "patchify" { (n_img, n_tok) } else { (n_tok, n_img) };
    let src: CudaSlice<I> = stream.clone_htod(&random::<I>(n_in)).unwrap();
    let mut dst: CudaSlice<O> = stream.alloc_zeros(n_out).unwrap();
    let bytes = n_in * std::mem::size_of::<I>() + n_out * std::mem::size_of::<O>();
    let mut run = || launch(&kernel, stream, &src, &mut dst);

    let mut g = c.benchmark_group(format!("{family}/cuda"));
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function(format!("{pair}/{shape}"), |b| {
        b.iter_custom(|iters| {
            stream.synchronize().unwrap();
            let t = Instant::now();
            for _ in 0..iters {
                run();
            }
            stream.synchronize().unwrap();
            t.elapsed()
        })
    });
    g.finish();
    let secs = time_per_call(stream, 200, &mut run);

    // The copy of the same byte count (once per byte count: unpatchify of a shape moves the
    // same bytes as its patchify).
    let copy_secs = match rows.iter().find(|r| r.bytes == bytes) {
        Some(r) => r.copy_secs,
        None => bench_copy(c, stream, bytes, shape),
    };
    rows.push(Row { id: format!("{family}/cuda/{pair}/{shape}"), bytes, secs, copy_secs });

    // Sweeps (table only), for the next tuning round.
    let mut variant = |id: String, k: PatchifyKernel| {
        let secs = time_per_call(stream, 200, || launch(&k, stream, &src, &mut dst));
        rows.push(Row { id, bytes, secs, copy_secs });
    };
    if sweep.mappings {
        for (name, m) in [("flat", Mapping::Flat), ("row-run", Mapping::RowRuns)] {
            let default = if m == Mapping::default() { ", the default" } else { "" };
            variant(format!("  {name} mapping{default}"), PatchifyKernel::new(gpu, plan).unwrap().with_mapping(m));
        }
    }
    let b = plan.geometry().batch as u32;
    for &per_thread in sweep.per_thread {
        let max_y = b.div_ceil(per_thread);
        let k = PatchifyKernel::new(gpu, plan).unwrap().with_grid_shape(GridShape::max_rows(max_y));
        variant(format!("  grid y = {max_y} ({per_thread} samples/thread)"), k);
    }
}

/// Benchmarks a device-to-device copy moving `bytes` in all (half read, half written).
fn bench_copy(c: &mut Criterion, stream: &Arc<CudaStream>, bytes: usize, shape: &str) -> f64 {
    let copy_src: CudaSlice<u8> = stream.alloc_zeros(bytes / 2).unwrap();
    let mut copy_dst: CudaSlice<u8> = stream.alloc_zeros(bytes / 2).unwrap();
    let mut copy = || stream.memcpy_dtod(&copy_src, &mut copy_dst).unwrap();
    let mut g = c.benchmark_group("copy/cuda");
    g.throughput(Throughput::Bytes((bytes / 2 * 2) as u64));
    g.bench_function(shape, |b| {
        b.iter_custom(|iters| {
            stream.synchronize().unwrap();
            let t = Instant::now();
            for _ in 0..iters {
                copy();
            }
            stream.synchronize().unwrap();
            t.elapsed()
        })
    });
    g.finish();
    time_per_call(stream, 200, &mut copy)
}

fn forward<I: Element, O: Float>(k: &PatchifyKernel, s: &Arc<CudaStream>, src: &CudaSlice<I>, dst: &mut CudaSlice<O>) {
    k.forward(s, src, dst).unwrap()
}

fn inverse<I: Float, O: Element>(k: &PatchifyKernel, s: &Arc<CudaStream>, src: &CudaSlice<I>, dst: &mut CudaSlice<O>) {
    k.inverse(s, src, dst).unwrap()
}

fn main() {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            if std::env::var("VISTOK_REQUIRE_GPU").as_deref() == Ok("1") {
                eprintln!("VISTOK_REQUIRE_GPU=1: failing");
                std::process::exit(1);
            }
            return;
        }
    };
    let (major, minor) = gpu.compute_capability().unwrap_or((0, 0));
    println!("device: {} (sm_{major}{minor}, {} SMs)", gpu.name().unwrap_or_default(), gpu.sm_count());
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10)
        .configure_from_args();
    let mut rows = vec![];
    let norm = Normalize::imagenet_u8();

    let grids = Sweep { mappings: false, per_thread: &[1, 2, 4, 8] };
    let img =
        Patchify::new(&PatchConfig::image(Layout::ChannelsFirst, 16, 16).normalize(norm.clone()), &[32, 3, 256, 256])
            .unwrap();
    bench_case::<u8, f32>(
        &mut c,
        &gpu,
        &mut rows,
        ["patchify", "u8-f32", "32x3x256x256-nchw-p16"],
        &img,
        forward,
        Sweep { mappings: true, ..grids },
    );
    let nhwc =
        Patchify::new(&PatchConfig::image(Layout::ChannelsLast, 16, 16).normalize(norm.clone()), &[8, 512, 512, 3])
            .unwrap();
    bench_case::<f32, bf16>(
        &mut c,
        &gpu,
        &mut rows,
        ["patchify", "f32-bf16", "8x512x512x3-nhwc-p16"],
        &nhwc,
        forward,
        NO_SWEEP,
    );
    let video = Patchify::new(
        &PatchConfig::video(Layout::ChannelsFirst, 2, 16, 16).normalize(norm.clone()),
        &[4, 3, 16, 224, 224],
    )
    .unwrap();
    bench_case::<u8, f32>(
        &mut c,
        &gpu,
        &mut rows,
        ["patchify", "u8-f32", "4x3x16x224x224-ncthw-p2x16x16"],
        &video,
        forward,
        Sweep { mappings: true, per_thread: &[] },
    );
    bench_case::<f32, u8>(
        &mut c,
        &gpu,
        &mut rows,
        ["unpatchify", "f32-u8", "32x3x256x256-nchw-p16"],
        &img,
        inverse,
        grids,
    );
    // MAE / flax layout: NHWC, (ph, pw, c) tokens; the flat mapping can only go scalar (C = 3).
    let mae = Patchify::new(
        &PatchConfig::image(Layout::ChannelsLast, 16, 16).order(PatchOrder::Pqc).normalize(norm.clone()),
        &[32, 256, 256, 3],
    )
    .unwrap();
    bench_case::<u8, f32>(
        &mut c,
        &gpu,
        &mut rows,
        ["patchify", "u8-f32", "32x256x256x3-nhwc-pqc-p16"],
        &mae,
        forward,
        Sweep { mappings: true, per_thread: &[] },
    );
    // 252 MB per call: far beyond L2, so these rows measure HBM.
    let dram =
        Patchify::new(&PatchConfig::image(Layout::ChannelsFirst, 16, 16).normalize(norm.clone()), &[256, 3, 256, 256])
            .unwrap();
    bench_case::<u8, f32>(
        &mut c,
        &gpu,
        &mut rows,
        ["patchify", "u8-f32", "256x3x256x256-nchw-p16"],
        &dram,
        forward,
        Sweep { mappings: true, per_thread: &[4, 16, 64] },
    );
    bench_case::<f32, u8>(
        &mut c,
        &gpu,
        &mut rows,
        ["unpatchify", "f32-u8", "256x3x256x256-nchw-p16"],
        &dram,
        inverse,
        Sweep { mappings: false, per_thread: &[4, 16, 64] },
    );
    c.final_summary();

    println!();
    println!("{:<58} {:>9} {:>10} {:>8} {:>8}", "id", "us/call", "GB/s", "% copy", "% 4.8TB");
    for r in &rows {
        let gbs = r.bytes as f64 / r.secs / 1e9;
        println!(
            "{:<58} {:>9.2} {:>10.1} {:>7.1}% {:>7.1}%",
            r.id,
            r.secs * 1e6,
            gbs,
            100.0 * r.copy_secs / r.secs,
            100.0 * gbs * 1e9 / PEAK_BYTES_PER_S
        );
        if !r.id.starts_with(' ') {
            let cg = (r.bytes / 2 * 2) as f64 / r.copy_secs / 1e9;
            println!("{:<58} {:>9.2} {:>10.1}", "  copy of the same bytes", r.copy_secs * 1e6, cg);
        }
    }
    println!(
        "(default grid: {} samples per thread for patchify, {} for unpatchify; default mapping {:?}; \
         'grid y' rows fix samples per thread)",
        vistok::cuda::patchify::FORWARD_SAMPLES_PER_THREAD,
        vistok::cuda::patchify::INVERSE_SAMPLES_PER_THREAD,
        Mapping::default()
    );
}
