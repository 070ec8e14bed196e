//! Attention cases: the shapes of the attention issue (`B×H×N×D`, self-attention, `Nq = Nk`),
//! f32 and bf16 on the cpu backend, the f64 reference on the small shapes only (it is naive),
//! plus one tiny `-ci` shape for fast tests.
//!
//! Flops: `4·B·H·Nq·Nk·D` (two matrix products), halved for causal masks, as FlashAttention
//! counts them; the softmax is not counted. Bytes: Q, K, V read once, O written once.
//!
//! The check compares the output of batch 0, head 0 with the reference computed on that head
//! alone (f64, from the inputs widened to f32): the whole problem would take the naive
//! reference minutes on the big shapes (on the GPU-sized shapes: the last 256 query rows).
//!
//! CUDA rows (`attention/cuda/{bf16,f16,f32}/…`, with `--features cuda` and a device): every
//! shape above plus GPU-sized ones (`8x16x4096x{64,128}`, also causal) that have no host rows.
//! Data stays on the device; timing covers the launches only (no transfers). The H200
//! target is bf16 / f16 at D = 64 and 128, N ≥ 2048: ≥ 350 TFLOP/s, i.e. 35% of the H200's
//! dense bf16 tensor peak of ≈ 989 TFLOP/s (NVIDIA's SXM figure without sparsity); the
//! GFLOP/s column of these rows divided by 989 000 is that fraction. On a compute capability
//! 9.0 GPU the f16 / bf16 rows at D = 64 and 128 run the sm_90a `wgmma` entry (the default
//! there), each with a sibling row `…-mma` running the `mma.sync` entry on the same data for a
//! same-run ratio.

use std::rc::Rc;

use vistok::attention::{Attention, Mask};
use vistok::{bf16, f16, DType, Float, View, ViewMut};

use crate::dev::Dev;

use super::{compare, Backend, Case, Check, Env, Peak, Runner, Shared};

/// One shape of the suite.
#[derive(Clone, Copy)]
struct Spec {
    b: usize,
    h: usize,
    n: usize,
    d: usize,
    causal: bool,
    ci: bool,
    /// Whether the reference gets a row.
    reference: bool,
    /// Only a CUDA row (too big for the host backends).
    gpu_only: bool,
}

impl Spec {
    fn name(&self) -> String {
        let mask = if self.causal { "-causal" } else { "" };
        let ci = if self.ci { "-ci" } else { "" };
        format!("{}x{}x{}x{}{mask}{ci}", self.b, self.h, self.n, self.d)
    }

    fn dims(&self) -> [usize; 4] {
        [self.b, self.h, self.n, self.d]
    }

    fn len(&self) -> usize {
        self.b * self.h * self.n * self.d
    }

    /// Query rows of batch 0, head 0 the check compares: the last ones (all rows on the host
    /// shapes; 256 on the GPU-sized ones, which the naive reference would take minutes on).
    /// With the bottom-right alignment the last rows against all keys are the same problem
    /// under a causal mask too.
    fn checked_rows(&self) -> usize {
        if self.gpu_only {
            self.n.min(256)
        } else {
            self.n
        }
    }

    fn attention(&self) -> Attention<'static> {
        Attention::new().mask(if self.causal { Mask::Causal } else { Mask::None })
    }
}

pub fn cases(env: &Env) -> Result<Vec<Case>, String> {
    let s = |b, h, n, d, causal, reference| Spec { b, h, n, d, causal, ci: false, reference, gpu_only: false };
    let g = |b, h, n, d, causal| Spec { b, h, n, d, causal, ci: false, reference: false, gpu_only: true };
    let specs = [
        // GPU-sized (cuda rows only), first: the GPU target, so that a run cut short
        // on a lent device (`--time-limit`) has them. No host rows, so the CPU table is
        // unchanged.
        g(8, 16, 4096, 64, false),
        g(8, 16, 4096, 128, false),
        g(8, 16, 4096, 64, true),
        g(8, 16, 4096, 128, true),
        s(1, 12, 256, 64, false, true),
        s(1, 12, 1024, 64, false, false),
        s(1, 12, 4096, 64, false, false),
        s(1, 16, 1024, 128, false, false),
        s(1, 12, 1024, 64, true, false),
        // Not part of the suite: small enough for the test suite (`--filter '*-ci'`).
        Spec { b: 1, h: 2, n: 64, d: 32, causal: true, ci: true, reference: true, gpu_only: false },
    ];
    let mut out = vec![];
    for spec in specs {
        out.extend(shape::<f32>(env, spec));
        out.extend(shape::<bf16>(env, spec));
        out.extend(shape::<f16>(env, spec));
    }
    Ok(out)
}

/// Deterministic values in [−1, 1] (the shared `data` spans 0..250, which would make every
/// softmax one-hot).
fn values<T: Float>(n: usize, salt: usize) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f32(((i.wrapping_add(salt).wrapping_mul(2_654_435_761) % 251) as f32) / 125.0 - 1.0))
        .collect()
}

/// Q, K, V of one shape and dtype.
struct Inputs<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
}

/// What the backends of one (shape, dtype) share.
struct Flow<T> {
    spec: Spec,
    input: Rc<Shared<Inputs<T>>>,
    /// Batch 0, head 0 of the output (its last `checked_rows`), from the reference on that head alone.
    oracle: Rc<Shared<Vec<f32>>>,
}

fn shape<T: Float + Dev>(env: &Env, spec: Spec) -> Vec<Case> {
    let input = Shared::new(move || {
        let n = spec.len();
        Ok(Inputs { q: values::<T>(n, 1), k: values::<T>(n, 2), v: values::<T>(n, 3) })
    });
    let oracle = {
        let input = input.clone();
        Shared::new(move || {
            let x = input.get()?;
            let head = spec.n * spec.d;
            let rows = spec.checked_rows();
            let wide = |t: &[T]| t.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
            let (q, k, v) = (wide(&x.q[(spec.n - rows) * spec.d..head]), wide(&x.k[..head]), wide(&x.v[..head]));
            let (qdims, kdims) = ([1, 1, rows, spec.d], [1, 1, spec.n, spec.d]);
            let mut o = vec![f32::NAN; rows * spec.d];
            let e = |e: vistok::Error| e.to_string();
            spec.attention()
                .forward(
                    vistok::Backend::Reference,
                    View::new(&q, &qdims).map_err(e)?,
                    View::new(&k, &kdims).map_err(e)?,
                    View::new(&v, &kdims).map_err(e)?,
                    ViewMut::new(&mut o, &qdims).map_err(e)?,
                )
                .map_err(e)?;
            Ok(o)
        })
    };
    let flops = 4 * (spec.b * spec.h * spec.n * spec.n * spec.d) as u64 / if spec.causal { 2 } else { 1 };
    let case = |backend: Backend, on: vistok::Backend| {
        let flow = Rc::new(Flow { spec, input: input.clone(), oracle: oracle.clone() });
        Case {
            family: "attention",
            backend,
            dtype: T::DTYPE.name().to_string(),
            shape: spec.name(),
            bytes: (4 * spec.len() * size_of::<T>()) as u64,
            flops,
            // bf16 runs on the bf16 dot-product instructions where the CPU has them (the
            // roofline falls back to the f32 FMA peak where it has not).
            peak: match (T::DTYPE, backend) {
                (DType::BF16, Backend::Cpu) => Peak::Bf16,
                (DType::BF16 | DType::F16, Backend::Cuda) => Peak::Bf16,
                _ => Peak::F32,
            },
            setup: Box::new(move || {
                Ok(Box::new(HostRunner {
                    flow: flow.clone(),
                    backend: on,
                    out: vec![T::from_f32(f32::NAN); spec.len()],
                }) as Box<dyn Runner>)
            }),
        }
    };
    let mut cases = vec![];
    // The reference in f32 only: it computes in f64 whatever the input type. No f16 host rows
    // (the suite's host dtypes are f32 and bf16).
    if !spec.gpu_only && T::DTYPE != DType::F16 {
        if spec.reference && T::DTYPE == DType::F32 {
            cases.push(case(Backend::Reference, vistok::Backend::Reference));
        }
        cases.push(case(Backend::Cpu, vistok::Backend::Cpu));
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = &env.gpu {
        // compute capability 9.0, 16-bit, D with a wgmma entry: the default (wgmma) row and the
        // mma.sync entry on the same data
        let both = T::DTYPE != DType::F32
            && gpu.compute_capability().ok() == Some((9, 0))
            && vistok::cuda::attention::WG_HEAD_DIMS.contains(&spec.d);
        let variants: &[(&str, Option<bool>)] = if both { &[("", None), ("-mma", Some(false))] } else { &[("", None)] };
        for &(tag, wgmma) in variants {
            let mut c = case(Backend::Cuda, vistok::Backend::Reference);
            c.shape.push_str(tag);
            let (gpu, flow) = (gpu.clone(), Rc::new(Flow { spec, input: input.clone(), oracle: oracle.clone() }));
            c.setup = Box::new(move || device::runner::<T>(&gpu, flow.clone(), wgmma));
            cases.push(c);
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = env;
    cases
}

struct HostRunner<T> {
    flow: Rc<Flow<T>>,
    backend: vistok::Backend,
    out: Vec<T>,
}

impl<T: Float> Runner for HostRunner<T> {
    fn run(&mut self, n: u32) -> Result<(), String> {
        let x = self.flow.input.get()?;
        let spec = self.flow.spec;
        let dims = spec.dims();
        let e = |e: vistok::Error| e.to_string();
        let a = spec.attention();
        for _ in 0..n {
            a.forward(
                self.backend,
                View::new(std::hint::black_box(&x.q), &dims).map_err(e)?,
                View::new(&x.k, &dims).map_err(e)?,
                View::new(&x.v, &dims).map_err(e)?,
                ViewMut::new(&mut self.out, &dims).map_err(e)?,
            )
            .map_err(e)?;
        }
        Ok(())
    }

    fn check(self: Box<Self>) -> Result<Check, String> {
        if self.backend == vistok::Backend::Reference {
            return Ok(Check::Oracle);
        }
        check_head(&self.flow, &self.out)
    }
}

/// Batch 0, head 0 of `out` (its last `checked_rows`) against the oracle. |O| ≤ 1; f32 within a few ulps of accumulated
/// error, f16 / bf16 within their rounding of inputs, probabilities and outputs.
fn check_head<T: Float>(flow: &Flow<T>, out: &[T]) -> Result<Check, String> {
    let spec = flow.spec;
    let got: Vec<f32> =
        out[(spec.n - spec.checked_rows()) * spec.d..spec.n * spec.d].iter().map(|v| v.to_f32()).collect();
    let tol = if T::DTYPE == DType::F32 { 1e-5 } else { 2e-2 };
    compare(&got, flow.oracle.get()?, tol)
}

/// The CUDA rows: Q, K, V uploaded once, `n` launches back to back, then one wait.
#[cfg(feature = "cuda")]
mod device {
    use std::rc::Rc;
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream};
    use vistok::cuda::attention::AttentionKernel;
    use vistok::cuda::Gpu;
    use vistok::Float;

    use super::{check_head, Check, Flow, Runner};
    use crate::dev::Dev;

    struct DeviceRunner<T: Float> {
        flow: Rc<Flow<T>>,
        kernel: AttentionKernel,
        stream: Arc<CudaStream>,
        q: CudaSlice<T>,
        k: CudaSlice<T>,
        v: CudaSlice<T>,
        out: CudaSlice<T>,
    }

    /// `wgmma`: force the sm_90a entry (`Some(true)`) or the mma.sync / f32 one; `None`: the
    /// default for this GPU.
    pub(super) fn runner<T: Float + Dev + 'static>(
        gpu: &Gpu,
        flow: Rc<Flow<T>>,
        wgmma: Option<bool>,
    ) -> Result<Box<dyn Runner>, String> {
        let spec = flow.spec;
        let e = |e: vistok::Error| e.to_string();
        let mut kernel =
            AttentionKernel::new(gpu, &spec.attention(), T::DTYPE, &spec.dims(), &spec.dims()).map_err(e)?;
        if let Some(on) = wgmma {
            kernel = kernel.with_wgmma(on).map_err(e)?;
        }
        let stream = gpu.stream().clone();
        let x = flow.input.get()?;
        let up = |v: &[T]| stream.clone_htod(v).map_err(|e| format!("copying the input to the GPU: {e}"));
        let (q, k, v) = (up(&x.q)?, up(&x.k)?, up(&x.v)?);
        let out = stream
            .clone_htod(&vec![T::from_f32(f32::NAN); spec.len()])
            .map_err(|e| format!("allocating the output on the GPU: {e}"))?;
        Ok(Box::new(DeviceRunner { flow, kernel, stream, q, k, v, out }))
    }

    impl<T: Float + Dev> Runner for DeviceRunner<T> {
        fn run(&mut self, n: u32) -> Result<(), String> {
            for _ in 0..n {
                self.kernel
                    .forward(&self.stream, &self.q, &self.k, &self.v, &mut self.out)
                    .map_err(|e| e.to_string())?;
            }
            self.stream.synchronize().map_err(|e| format!("cuStreamSynchronize: {e}"))
        }

        fn check(self: Box<Self>) -> Result<Check, String> {
            let got = self.stream.clone_dtoh(&self.out).map_err(|e| format!("copying the output to the host: {e}"))?;
            self.stream.synchronize().map_err(|e| format!("cuStreamSynchronize: {e}"))?;
            check_head(&self.flow, &got)
        }
    }
}
