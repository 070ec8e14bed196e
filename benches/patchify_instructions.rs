//! Instruction counts (valgrind / callgrind `Ir`) of the CPU patchify kernels: a deterministic
//! regression check for a noisy, shared machine, where wall-clock benches cannot see 2 %.
//!
//! Run it with `bash scripts/instructions-check.sh`, which installs the matching
//! `gungraun-runner`, runs this bench under valgrind and compares every `Ir` with the committed
//! `benches/instructions-baseline.json`. `cargo bench --no-run` only builds it (CI does that);
//! running the binary without the runner prints how to install it and exits non-zero.
//!
//! What is measured, and why the counts repeat:
//! - Only the kernel call: data, plan, output buffer and the thread pool are made in `setup`,
//!   and the case is handed back to gungraun so that freeing it falls outside the count too.
//! - One thread: a 1-thread rayon pool that adopts the current thread, so the parallel loop
//!   runs inline, without wake-ups or work stealing whose cost depends on scheduling.
//! - The environment is cleared by gungraun, so a `VISTOK_ISA` in your shell changes nothing.
//! - **Under valgrind the CPU reports no AVX-512**, so `Backend::Cpu` detects and measures the
//!   AVX2 + FMA path (`Isa::V3`); the AVX-512 micro-kernels are not covered here. The `cpu` cases
//!   check that in `setup` and fail loudly if a future valgrind changes it. `v3` and `scalar`
//!   pin the level explicitly.
//!
//! Ids: `<function>/<backend>`, the function naming direction, dtypes, shape and layout.

use gungraun::{library_benchmark, library_benchmark_group, main};
use std::hint::black_box;
use vistok::{bf16, Backend, Element, Isa, Layout, Normalize, PatchConfig, PatchOrder, Patchify, View, ViewMut};

/// One prepared call: the plan, an input filled with varied values, a poisoned output.
struct Case<I, O> {
    plan: Patchify,
    backend: Backend,
    input: Vec<I>,
    input_dims: Vec<usize>,
    output: Vec<O>,
    output_dims: Vec<usize>,
    pool: rayon::ThreadPool,
}

/// Deterministic, non-constant values (so no path can shortcut on zeros).
fn data<T: Element>(n: usize) -> Vec<T> {
    (0..n).map(|i| T::from_f32(((i * 2654435761) % 251) as f32)).collect()
}

/// Resolves the ISA outside the measured region (detection reads cpuid and the environment
/// once) and checks that `Backend::Cpu` measures the path this file says it does.
fn check_backend(backend: Backend) {
    let detected = Isa::detect();
    if backend == Backend::Cpu && detected != Isa::V3 {
        eprintln!(
            "patchify_instructions: Backend::Cpu detected {} but these counts are meant for v3 (AVX2): \
             valgrind used to report no AVX-512; re-check the bench and rebaseline",
            detected.name()
        );
        std::process::exit(2);
    }
    if let Backend::CpuIsa(isa) = backend {
        if !isa.is_available() {
            eprintln!("patchify_instructions: this CPU (as valgrind shows it) lacks {}", isa.name());
            std::process::exit(2);
        }
    }
}

/// A 1-thread pool in which the current thread is the worker: `install` runs inline.
fn one_thread_pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(1).use_current_thread().build().expect("a 1-thread rayon pool")
}

fn setup_forward<I: Element, O: vistok::Float>(config: PatchConfig, dims: &[usize], backend: Backend) -> Case<I, O> {
    check_backend(backend);
    let plan = Patchify::new(&config, dims).expect("valid bench shape");
    let output_dims = plan.tokens_dims().to_vec();
    Case {
        input: data(dims.iter().product()),
        input_dims: dims.to_vec(),
        output: vec![O::from_f32(f32::NAN); output_dims.iter().product()],
        output_dims,
        plan,
        backend,
        pool: one_thread_pool(),
    }
}

fn setup_inverse<I: vistok::Float, O: Element>(config: PatchConfig, dims: &[usize], backend: Backend) -> Case<I, O> {
    check_backend(backend);
    let plan = Patchify::new(&config, dims).expect("valid bench shape");
    let input_dims = plan.tokens_dims().to_vec();
    Case {
        input: data(input_dims.iter().product()),
        input_dims,
        output: vec![O::from_f32(7.0); dims.iter().product()],
        output_dims: dims.to_vec(),
        plan,
        backend,
        pool: one_thread_pool(),
    }
}

fn run_forward<I: Element, O: vistok::Float>(mut c: Case<I, O>) -> Case<I, O> {
    let Case { plan, backend, input, input_dims, output, output_dims, pool } = &mut c;
    pool.install(|| {
        plan.forward(
            black_box(*backend),
            View::new(black_box(input), input_dims).unwrap(),
            ViewMut::new(output, output_dims).unwrap(),
        )
        .unwrap()
    });
    black_box(c)
}

fn run_inverse<I: vistok::Float, O: Element>(mut c: Case<I, O>) -> Case<I, O> {
    let Case { plan, backend, input, input_dims, output, output_dims, pool } = &mut c;
    pool.install(|| {
        plan.inverse(
            black_box(*backend),
            View::new(black_box(input), input_dims).unwrap(),
            ViewMut::new(output, output_dims).unwrap(),
        )
        .unwrap()
    });
    black_box(c)
}

// The shapes: small, so that valgrind (~50x slower) finishes each case in about a second.

/// 2x3x64x64 u8 NCHW → f32 tokens [2, 16, 768], 16x16 patches, `cpq`, ImageNet normalisation.
fn nchw_u8(backend: Backend) -> Case<u8, f32> {
    let config = PatchConfig::image(Layout::ChannelsFirst, 16, 16).normalize(Normalize::imagenet_u8());
    setup_forward(config, &[2, 3, 64, 64], backend)
}

/// 1x64x64x3 f32 NHWC → bf16 tokens [1, 16, 768], `cpq` (the transposing gather path).
fn nhwc_f32(backend: Backend) -> Case<f32, bf16> {
    setup_forward(PatchConfig::image(Layout::ChannelsLast, 16, 16), &[1, 64, 64, 3], backend)
}

/// 1x3x50x37 f32 NCHW → f32 tokens [1, 12, 768], `pqc`, zero-padded bottom and right.
fn padded_f32(backend: Backend) -> Case<f32, f32> {
    let config = PatchConfig::image(Layout::ChannelsFirst, 16, 16).order(PatchOrder::Pqc).pad(true);
    setup_forward(config, &[1, 3, 50, 37], backend)
}

/// f32 tokens [2, 16, 768] → 2x3x64x64 u8 NCHW, de-normalised, rounded and clamped.
fn inv_nchw_u8(backend: Backend) -> Case<f32, u8> {
    let config = PatchConfig::image(Layout::ChannelsFirst, 16, 16).normalize(Normalize::imagenet_u8());
    setup_inverse(config, &[2, 3, 64, 64], backend)
}

/// bf16 tokens [1, 16, 768] (`pqc`) → 1x64x64x3 f32 NHWC.
fn inv_nhwc_f32(backend: Backend) -> Case<bf16, f32> {
    setup_inverse(PatchConfig::image(Layout::ChannelsLast, 16, 16).order(PatchOrder::Pqc), &[1, 64, 64, 3], backend)
}

#[library_benchmark]
#[bench::cpu(args = (Backend::Cpu), setup = nchw_u8)]
#[bench::v3(args = (Backend::CpuIsa(Isa::V3)), setup = nchw_u8)]
#[bench::scalar(args = (Backend::CpuIsa(Isa::Scalar)), setup = nchw_u8)]
fn forward_u8_f32_nchw_2x3x64x64_p16_imagenet(c: Case<u8, f32>) -> Case<u8, f32> {
    run_forward(c)
}

#[library_benchmark]
#[bench::cpu(args = (Backend::Cpu), setup = nhwc_f32)]
#[bench::v3(args = (Backend::CpuIsa(Isa::V3)), setup = nhwc_f32)]
#[bench::scalar(args = (Backend::CpuIsa(Isa::Scalar)), setup = nhwc_f32)]
fn forward_f32_bf16_nhwc_1x64x64x3_p16(c: Case<f32, bf16>) -> Case<f32, bf16> {
    run_forward(c)
}

#[library_benchmark]
#[bench::cpu(args = (Backend::Cpu), setup = padded_f32)]
#[bench::v3(args = (Backend::CpuIsa(Isa::V3)), setup = padded_f32)]
#[bench::scalar(args = (Backend::CpuIsa(Isa::Scalar)), setup = padded_f32)]
fn forward_f32_f32_nchw_1x3x50x37_p16_pqc_pad(c: Case<f32, f32>) -> Case<f32, f32> {
    run_forward(c)
}

#[library_benchmark]
#[bench::cpu(args = (Backend::Cpu), setup = inv_nchw_u8)]
#[bench::v3(args = (Backend::CpuIsa(Isa::V3)), setup = inv_nchw_u8)]
#[bench::scalar(args = (Backend::CpuIsa(Isa::Scalar)), setup = inv_nchw_u8)]
fn inverse_f32_u8_nchw_2x3x64x64_p16_imagenet(c: Case<f32, u8>) -> Case<f32, u8> {
    run_inverse(c)
}

#[library_benchmark]
#[bench::cpu(args = (Backend::Cpu), setup = inv_nhwc_f32)]
#[bench::v3(args = (Backend::CpuIsa(Isa::V3)), setup = inv_nhwc_f32)]
#[bench::scalar(args = (Backend::CpuIsa(Isa::Scalar)), setup = inv_nhwc_f32)]
fn inverse_bf16_f32_nhwc_1x64x64x3_p16_pqc(c: Case<bf16, f32>) -> Case<bf16, f32> {
    run_inverse(c)
}

library_benchmark_group!(
    name = patchify,
    benchmarks = [
        forward_u8_f32_nchw_2x3x64x64_p16_imagenet,
        forward_f32_bf16_nhwc_1x64x64x3_p16,
        forward_f32_f32_nchw_1x3x50x37_p16_pqc_pad,
        inverse_f32_u8_nchw_2x3x64x64_p16_imagenet,
        inverse_bf16_f32_nhwc_1x64x64x3_p16_pqc
    ]
);

main!(library_benchmark_groups = patchify);
