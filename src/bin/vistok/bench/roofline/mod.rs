//! `vistok roofline`: this machine's ceilings, measured with small built-in kernels.
//!
//! - Memory bandwidth: STREAM-style copy (`a = b`, 8 bytes counted per f32) and triad
//!   (`a = b + s·c`, 12 bytes), with regular and non-temporal stores, on 1 thread and on every
//!   thread of the pool, over arrays much larger than the last-level cache. The best of a few
//!   passes is reported (STREAM's convention: noise only ever slows a pass down).
//! - Compute: f32 FMA and bf16 dot-product (`vdpbf16ps`) loops with enough independent
//!   accumulators to fill the pipes, 1 thread and all threads.
//! - GPU (feature `cuda` + a device): a device-to-device copy and the peaks the device's
//!   properties imply.
//!
//! `vistok bench` measures it once per run and takes its ceilings from [`Roofline::memory`]
//! and [`Roofline::compute`].

pub mod kernels;

use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use vistok::Isa;

use self::kernels::{Line, Stores};
use super::cases::{Backend, Peak};
pub use super::gpu::GpuRoofline;

/// One bandwidth figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bandwidth {
    /// `copy` or `triad`.
    pub kernel: String,
    /// `regular` or `non-temporal`.
    pub stores: String,
    pub threads: usize,
    pub gb_per_s: f64,
}

/// One compute ceiling; `None` figures come with a `note` saying why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Compute {
    pub name: String,
    pub gflop_per_s_1_thread: Option<f64>,
    pub gflop_per_s_all_threads: Option<f64>,
    pub note: String,
}

impl Compute {
    /// The higher of the two figures.
    pub fn best(&self) -> Option<f64> {
        match (self.gflop_per_s_1_thread, self.gflop_per_s_all_threads) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Everything `vistok roofline` measures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Roofline {
    /// Threads of "all threads" (the rayon pool).
    pub threads: usize,
    /// Instruction-set level of the probe kernels (`vistok::Isa::detect()`).
    pub isa: String,
    /// Size of each array of the bandwidth probes.
    pub array_mib: usize,
    pub bandwidth: Vec<Bandwidth>,
    pub f32_fma: Compute,
    pub bf16_dot: Compute,
    pub gpu: Option<GpuRoofline>,
    /// Why there is no GPU roofline, when there is none.
    pub gpu_note: Option<String>,
}

/// Probe sizes: `quick` is for CI (a second or so), the default for a report.
struct Sizes {
    array_mib: usize,
    passes: usize,
    fma_iters: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        // 64 MiB is still twice a 32 MiB L3; 256 MiB leaves no doubt.
        if quick {
            Sizes { array_mib: 64, passes: 3, fma_iters: 1 << 21 }
        } else {
            Sizes { array_mib: 256, passes: 6, fma_iters: 1 << 24 }
        }
    }
}

impl Roofline {
    /// Measures this machine (and the GPU, if `gpu` is given). Takes ~1 s with `quick`.
    pub fn measure(quick: bool, gpu: super::gpu::Device<'_>) -> Roofline {
        let isa = Isa::detect();
        let sizes = Sizes::new(quick);
        let threads = rayon::current_num_threads();
        let (gpu, gpu_note) = match super::gpu::roofline(gpu, quick) {
            Ok(g) => (Some(g), None),
            Err(note) => (None, Some(note)),
        };
        Roofline {
            threads,
            isa: isa.name().to_string(),
            array_mib: sizes.array_mib,
            bandwidth: bandwidth(isa, &sizes, threads),
            f32_fma: fma_f32(isa, &sizes),
            bf16_dot: dot_bf16(isa, &sizes),
            gpu,
            gpu_note,
        }
    }

    /// The memory ceiling of `backend` in GB/s: for the CPU the best figure of any probe (any
    /// kernel, stores and thread count: the most this machine was seen to move; on a shared
    /// machine a neighbour can slow any one probe down, never speed it up), for the GPU its
    /// copy.
    pub fn memory(&self, backend: Backend) -> Option<f64> {
        match backend {
            Backend::Cuda => self.gpu.as_ref().map(|g| g.copy_gb_per_s),
            Backend::Reference | Backend::Cpu => {
                self.bandwidth.iter().map(|b| b.gb_per_s).fold(None, |m, x| Some(m.map_or(x, |m: f64| m.max(x))))
            }
        }
    }

    /// The compute ceiling of `backend` for `peak`-type flops in GFLOP/s (all threads, or one
    /// thread if that was faster: as for [`memory`](Self::memory)).
    pub fn compute(&self, backend: Backend, peak: Peak) -> Option<f64> {
        match (backend, peak) {
            (Backend::Cuda, Peak::F32) => self.gpu.as_ref().and_then(|g| g.peak_f32_gflop_per_s),
            (Backend::Cuda, Peak::Bf16) => self.gpu.as_ref().and_then(|g| g.peak_tensor_bf16_gflop_per_s),
            (_, Peak::F32) => self.f32_fma.best(),
            // Without a bf16 unit the f32 FMA is what bf16 work runs on.
            (_, Peak::Bf16) => self.bf16_dot.best().or(self.f32_fma.best()),
        }
    }

    /// The human-readable report.
    pub fn print(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let t = self.threads;
        writeln!(
            out,
            "memory bandwidth, GB/s ({} MiB f32 arrays, best of several passes; STREAM counting:",
            self.array_mib
        )?;
        writeln!(out, "copy 8 B and triad 12 B per element, no write-allocate traffic counted)")?;
        writeln!(out, "  {:<8} {:<14} {:>10} {:>12}", "kernel", "stores", "1 thread", format!("{t} threads"))?;
        for kernel in ["copy", "triad"] {
            for stores in [Stores::Regular, Stores::NonTemporal] {
                let get = |threads| {
                    self.bandwidth
                        .iter()
                        .find(|b| b.kernel == kernel && b.stores == stores.name() && b.threads == threads)
                        .map_or("n/a".to_string(), |b| format!("{:.1}", b.gb_per_s))
                };
                writeln!(out, "  {:<8} {:<14} {:>10} {:>12}", kernel, stores.name(), get(1), get(t))?;
            }
        }
        writeln!(out, "compute, GFLOP/s")?;
        writeln!(out, "  {:<50} {:>10} {:>12}", "", "1 thread", format!("{t} threads"))?;
        for c in [&self.f32_fma, &self.bf16_dot] {
            let f = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.1}"));
            writeln!(out, "  {:<50} {:>10} {:>12}", c.name, f(c.gflop_per_s_1_thread), f(c.gflop_per_s_all_threads))?;
            if !c.note.is_empty() {
                writeln!(out, "    ({})", c.note)?;
            }
        }
        match (&self.gpu, &self.gpu_note) {
            (Some(g), _) => g.print(out)?,
            (None, Some(note)) => writeln!(out, "gpu: none ({note})")?,
            (None, None) => {}
        }
        if let (Some(bw), Some(peak)) = (self.memory(Backend::Cpu), self.compute(Backend::Cpu, Peak::F32)) {
            writeln!(
                out,
                "cpu roofline used by bench: best bandwidth {bw:.1} GB/s, f32 peak {peak:.0} GFLOP/s, ridge point {:.1} flop/byte",
                peak / bw
            )?;
        }
        Ok(())
    }
}

/// Copy and triad, both store kinds, 1 thread and all threads.
fn bandwidth(isa: Isa, sizes: &Sizes, threads: usize) -> Vec<Bandwidth> {
    let n = sizes.array_mib * (1 << 20) / size_of::<Line>();
    // Distinct values, so no page is shared copy-on-write zero; written once here so the page
    // faults don't land in the timed passes.
    let mut a = vec![Line([0.0; 16]); n];
    let b = vec![Line([1.0; 16]); n];
    let c = vec![Line([2.0; 16]); n];
    let mut out = vec![];
    let mut counts = vec![1];
    if threads > 1 {
        counts.push(threads);
    }
    for &t in &counts {
        for stores in [Stores::Regular, Stores::NonTemporal] {
            if !stores.available(isa) {
                continue;
            }
            let copy = best_secs(sizes.passes, || split(t, &mut a, |a, i| kernels::copy(isa, stores, a, &b[i..])));
            let triad = best_secs(sizes.passes, || {
                split(t, &mut a, |a, i| kernels::triad(isa, stores, a, &b[i..], &c[i..], 3.0))
            });
            let bytes = (n * size_of::<Line>()) as f64;
            for (kernel, secs, arrays) in [("copy", copy, 2.0), ("triad", triad, 3.0)] {
                out.push(Bandwidth {
                    kernel: kernel.into(),
                    stores: stores.name().into(),
                    threads: t,
                    gb_per_s: arrays * bytes / secs / 1e9,
                });
            }
        }
    }
    out
}

/// Runs `f(chunk, offset)` over `threads` contiguous chunks of `a`, one per thread (on the
/// calling thread alone for 1).
fn split(threads: usize, a: &mut [Line], f: impl Fn(&mut [Line], usize) + Sync) {
    if threads <= 1 {
        return f(a, 0);
    }
    let chunk = a.len().div_ceil(threads).max(1);
    a.par_chunks_mut(chunk).enumerate().for_each(|(i, a)| f(a, i * chunk));
}

/// The fastest of `passes` runs of `f`, in seconds.
fn best_secs(passes: usize, mut f: impl FnMut()) -> f64 {
    (0..passes.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
        .max(1e-9)
}

/// GFLOP/s of `probe(iters)` (which does `flops_per_iter · iters` flops) on 1 thread and on
/// every pool thread at once.
fn gflops(iters: u64, flops_per_iter: u64, probe: impl Fn(u64) -> f32 + Sync) -> (f64, f64) {
    // A short warm-up: AVX-512 frequency licence, thread wake-up.
    std::hint::black_box(probe(iters / 16 + 1));
    let flops = (iters * flops_per_iter) as f64;
    let one = best_secs(3, || {
        std::hint::black_box(probe(iters));
    });
    let all = best_secs(3, || {
        std::hint::black_box(rayon::broadcast(|_| probe(iters)));
    });
    (flops / one / 1e9, flops * rayon::current_num_threads() as f64 / all / 1e9)
}

fn fma_f32(isa: Isa, sizes: &Sizes) -> Compute {
    let lanes = kernels::fma_lanes(isa);
    let per_iter = 2 * kernels::ACCUMULATORS as u64 * lanes;
    let (one, all) = gflops(sizes.fma_iters, per_iter, |n| kernels::fma(isa, n));
    let name = match isa {
        Isa::V4 => "f32 FMA (AVX-512 vfmadd, 512-bit)",
        Isa::V3 => "f32 FMA (AVX2 vfmadd, 256-bit)",
        Isa::Scalar => "f32 multiply + add (scalar)",
    };
    Compute {
        name: name.into(),
        gflop_per_s_1_thread: Some(one),
        gflop_per_s_all_threads: Some(all),
        note: format!("{} independent accumulators, {lanes} lanes", kernels::ACCUMULATORS),
    }
}

fn dot_bf16(isa: Isa, sizes: &Sizes) -> Compute {
    let name = "bf16 dot (AVX512-BF16 vdpbf16ps, f32 accumulate)".to_string();
    if let Some(why) = kernels::bf16_unavailable(isa) {
        return Compute {
            name,
            gflop_per_s_1_thread: None,
            gflop_per_s_all_threads: None,
            note: format!("n/a: {why}"),
        };
    }
    let per_iter = 2 * kernels::BF16_PAIRS * kernels::ACCUMULATORS as u64;
    let (one, all) = gflops(sizes.fma_iters, per_iter, |n| kernels::dot_bf16(isa, n).unwrap_or(0.0));
    Compute {
        name,
        gflop_per_s_1_thread: Some(one),
        gflop_per_s_all_threads: Some(all),
        note: format!("{} independent accumulators, 32 bf16 pairs each = 64 flops", kernels::ACCUMULATORS),
    }
}
