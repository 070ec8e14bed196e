//! Token-merging cases: ToMe's matching plus a mean merge (what ToMe's torch code does per
//! layer) on the shapes of the merge issue, reference, cpu and (with a GPU) cuda, plus one
//! tiny `-ci` shape.
//!
//! Flops: the similarity, `2·B·(N/2)²·C` (the matching's dominant term). Bytes: the tokens
//! read once and the merged tokens written once (the metric is the tokens themselves, as in
//! the peers' ToMe timing).
//!
//! Data: B tokens are pseudo-random; A token `i` is a noisy copy of B token `(7i + 3) mod N/2`
//! with a cosine that falls with `i`, so every best match wins by a wide margin and the ranking
//! is spread out. (Merge plans may differ from the reference at near-ties; with this data the
//! relevant score gaps are far above the f32 error, so the check can demand the reference's
//! output.)

use std::rc::Rc;

use vistok::merge::{MatchConfig, MergeMode, MergePlan};
use vistok::{bf16, Float, View, ViewMut};

use super::{compare, Backend, Case, Check, Env, Peak, Runner, Shared};

struct Spec {
    batch: usize,
    tokens: usize,
    channels: usize,
    config: MatchConfig,
    ci: bool,
}

impl Spec {
    fn name(&self) -> String {
        let ci = if self.ci { "-ci" } else { "" };
        format!("{}x{}x{}-r{}{ci}", self.batch, self.tokens, self.channels, self.config.r)
    }

    fn dims(&self) -> [usize; 3] {
        [self.batch, self.tokens, self.channels]
    }

    fn out_dims(&self) -> [usize; 3] {
        [self.batch, self.tokens - self.config.effective_r(self.tokens), self.channels]
    }
}

pub fn cases(env: &Env) -> Result<Vec<Case>, String> {
    let spec = |batch, tokens, channels, config, ci| Spec { batch, tokens, channels, config, ci };
    // ViT-B/16 (with its class token), a 1024-token ViT, a Stable Diffusion 64×64 latent.
    let vit = spec(8, 197, 768, MatchConfig::new(49).class_token(true), false);
    let big = spec(8, 1024, 768, MatchConfig::new(256).class_token(true), false);
    let sd = spec(2, 4096, 320, MatchConfig::new(2048), false);
    let ci = spec(2, 64, 32, MatchConfig::new(16).class_token(true), true);
    let mut out = vec![];
    out.extend(shape::<f32>(env, &vit));
    out.extend(shape::<f32>(env, &big));
    out.extend(shape::<bf16>(env, &big));
    out.extend(shape::<f32>(env, &sd));
    out.extend(shape::<bf16>(env, &sd));
    out.extend(shape::<f32>(env, &ci));
    Ok(out)
}

/// splitmix64 → uniform in [−1, 1).
fn uniform(i: u64) -> f32 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Tokens with clear best matches (see the module docs).
fn tokens<T: Float>(s: &Spec) -> Vec<T> {
    let [b, n, c] = s.dims();
    let (na, nb) = (n.div_ceil(2), n / 2);
    let mut x = vec![0.0f32; b * n * c];
    for bi in 0..b {
        for t in (1..n).step_by(2) {
            for k in 0..c {
                x[(bi * n + t) * c + k] = uniform(((bi * n + t) * c + k) as u64);
            }
        }
        for i in 0..na {
            let j = (7 * i + 3) % nb;
            // Cosine about 0.95 → 0.45 as i grows; the noise is nearly orthogonal to the copy.
            let w = 0.95 - 0.5 * i as f32 / na as f32;
            let noise = (1.0 - w * w).sqrt();
            for k in 0..c {
                let copy = x[(bi * n + 2 * j + 1) * c + k];
                let e = uniform((((bi * n + 2 * i) * c + k) as u64) ^ 0xABCD_EF01);
                x[(bi * n + 2 * i) * c + k] = w * copy + noise * e;
            }
        }
    }
    x.into_iter().map(T::from_f32).collect()
}

/// What the backends of one shape share: the input (made once) and the reference output.
struct Flow<T> {
    spec: Rc<Spec>,
    input: Rc<Shared<Vec<T>>>,
    oracle: Rc<Shared<Vec<T>>>,
}

impl<T> Flow<T> {
    fn share(&self) -> Flow<T> {
        Flow { spec: self.spec.clone(), input: self.input.clone(), oracle: self.oracle.clone() }
    }
}

/// Match + mean merge on `backend`, into `out`.
fn run<T: Float>(s: &Spec, backend: vistok::Backend, x: &[T], out: &mut [T]) -> vistok::Result<()> {
    let plan = MergePlan::bipartite(backend, View::new(x, &s.dims())?, &s.config)?;
    plan.merge(backend, View::new(x, &s.dims())?, MergeMode::Mean, ViewMut::new(out, &s.out_dims())?)
}

fn shape<T: Float + crate::dev::Dev>(env: &Env, s: &Spec) -> Vec<Case> {
    let spec = Rc::new(Spec { ..*s });
    let input = {
        let spec = spec.clone();
        Shared::new(move || Ok(tokens::<T>(&spec)))
    };
    let out_len: usize = s.out_dims().iter().product();
    let oracle = {
        let (spec, input) = (spec.clone(), input.clone());
        Shared::new(move || {
            let mut y = vec![T::from_f32(f32::NAN); out_len];
            run(&spec, vistok::Backend::Reference, input.get()?, &mut y).map_err(|e| e.to_string())?;
            Ok(y)
        })
    };
    let flow = Flow { spec, input, oracle };
    let [b, n, c] = s.dims();
    let half = (n / 2) as u64;
    let case = |backend: Backend, peak: Peak, setup: Box<dyn Fn() -> Result<Box<dyn Runner>, String>>| Case {
        family: "merge",
        backend,
        dtype: T::DTYPE.name().to_string(),
        shape: s.name(),
        bytes: ((b * n * c + out_len) * size_of::<T>()) as u64,
        flops: 2 * b as u64 * half * half * c as u64,
        peak,
        setup,
    };
    let mut cases = vec![];
    for (backend, on) in [(Backend::Reference, vistok::Backend::Reference), (Backend::Cpu, vistok::Backend::Cpu)] {
        let flow = flow.share();
        cases.push(case(
            backend,
            Peak::F32,
            Box::new(move || {
                let out = vec![T::from_f32(f32::NAN); out_len];
                Ok(Box::new(HostRunner { flow: flow.share(), backend: on, out }) as Box<dyn Runner>)
            }),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = &env.gpu {
        // 16-bit metrics on tensor cores (their roof is the bf16 one), f32 on the exact kernel.
        let peak = if T::DTYPE == vistok::DType::F32 { Peak::F32 } else { Peak::Bf16 };
        {
            let (gpu, flow) = (gpu.clone(), flow.share());
            cases.push(case(Backend::Cuda, peak, Box::new(move || device::runner(&gpu, flow.share(), None))));
        }
        // On compute capability 9.0 the 16-bit rows run the wgmma similarity (C ≥ 64): a
        // sibling row `…-mma` runs mma.sync on the same data, for a same-run ratio.
        let hopper = gpu.compute_capability().ok() == Some((9, 0));
        let both = hopper && T::DTYPE != vistok::DType::F32 && c >= vistok::cuda::merge::WGMMA_MIN_C;
        if both {
            let (gpu, flow) = (gpu.clone(), flow.share());
            let mut row = case(Backend::Cuda, peak, Box::new(move || device::runner(&gpu, flow.share(), Some(false))));
            row.shape.push_str("-mma");
            cases.push(row);
        }
        // The similarity kernel alone (`…-similarity`, the tensor-core target), not on
        // the tiny shape: bytes are its operands read once (packed 16-bit rows or f32 rows).
        if !s.ci {
            let variants: &[(&str, Option<bool>)] = if both {
                &[("-similarity", None), ("-similarity-mma", Some(false))]
            } else {
                &[("-similarity", None)]
            };
            let es = if T::DTYPE == vistok::DType::F32 { 4 } else { 2 };
            for &(tag, wgmma) in variants {
                let (gpu, flow) = (gpu.clone(), flow.share());
                let mut row =
                    case(Backend::Cuda, peak, Box::new(move || device::similarity_runner(&gpu, flow.share(), wgmma)));
                row.shape.push_str(tag);
                row.bytes = (b * n * c * es) as u64;
                cases.push(row);
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = env;
    cases
}

/// Compares a (non-reference) backend's output with the reference's.
fn check_against_oracle<T: Float>(flow: &Flow<T>, out: &[T]) -> Result<Check, String> {
    // Same plan (no near-ties in this data); values: f32 sums against f64 ones, rounded
    // once to T (a 2-ulp allowance at the largest magnitude).
    let want = flow.oracle.get()?;
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.to_f32().abs() as f64));
    let ulp = match T::DTYPE {
        vistok::DType::F32 => f32::EPSILON as f64,
        vistok::DType::F16 => 2f64.powi(-10),
        _ => 2f64.powi(-7),
    };
    compare(out, want, 2.0 * ulp * scale)
}

struct HostRunner<T> {
    flow: Flow<T>,
    backend: vistok::Backend,
    out: Vec<T>,
}

impl<T: Float> Runner for HostRunner<T> {
    fn run(&mut self, n: u32) -> Result<(), String> {
        let input = self.flow.input.get()?;
        for _ in 0..n {
            run(&self.flow.spec, self.backend, std::hint::black_box(input), &mut self.out)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn check(self: Box<Self>) -> Result<Check, String> {
        if self.backend == vistok::Backend::Reference {
            self.flow.oracle.offer(self.out);
            return Ok(Check::Oracle);
        }
        check_against_oracle(&self.flow, &self.out)
    }
}

/// The CUDA rows (`merge/cuda/<dtype>/<shape>`): tokens stay on the device; each run is the
/// whole per-layer step the API offers — the plan on the device (normalise, fused similarity +
/// row argmax, split reduce, rank; the `B·⌈N/2⌉` ranking copied back and the plan assembled on
/// the host), the plan's slot lists uploaded, the mean merge on the device. The input upload
/// and the output download are outside the timing; the plan's round trip is inside. f32
/// metrics take the exact FFMA similarity (% of the f32 roof, H200 ≈ 67 TFLOP/s); bf16 ones
/// the tensor-core similarity (`with_tensor_cores`; % of the dense bf16 roof, ≈ 989 TFLOP/s):
/// on an H100 / H200 the wgmma kernel, with a `-mma` sibling row on mma.sync. The
/// `…-similarity` rows time the similarity kernel alone (`MergeKernel::run_similarity` on
/// operands prepared once), the tensor-core target; `-similarity-mma` its mma.sync
/// sibling on Hopper.
#[cfg(feature = "cuda")]
mod device {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream};
    use vistok::cuda::merge::{MergeKernel, SimilarityStage};
    use vistok::cuda::Gpu;
    use vistok::merge::MergeMode;
    use vistok::Float;

    use super::{check_against_oracle, Check, Flow, Runner};
    use crate::dev::Dev;

    struct DeviceRunner<T> {
        flow: Flow<T>,
        kernel: MergeKernel,
        stream: Arc<CudaStream>,
        input: CudaSlice<T>,
        out: CudaSlice<T>,
    }

    /// The kernel (tensor cores on; `wgmma`: force the wgmma (`Some(true)`) or mma.sync
    /// similarity), its stream and the tokens uploaded.
    fn setup<T: Float + Dev>(
        gpu: &Gpu,
        flow: &Flow<T>,
        wgmma: Option<bool>,
    ) -> Result<(MergeKernel, Arc<CudaStream>, CudaSlice<T>), String> {
        let kernel = MergeKernel::new(gpu)
            .and_then(|k| k.with_tensor_cores(true))
            .and_then(|k| match wgmma {
                Some(on) => k.with_wgmma(on),
                None => Ok(k),
            })
            .map_err(|e| e.to_string())?;
        let stream = gpu.stream().clone();
        let input = stream.clone_htod(flow.input.get()?).map_err(|e| format!("copying the input to the GPU: {e}"))?;
        Ok((kernel, stream, input))
    }

    pub(super) fn runner<T: Float + Dev + 'static>(
        gpu: &Gpu,
        flow: Flow<T>,
        wgmma: Option<bool>,
    ) -> Result<Box<dyn Runner>, String> {
        let (kernel, stream, input) = setup(gpu, &flow, wgmma)?;
        let out_len: usize = flow.spec.out_dims().iter().product();
        let out = stream
            .clone_htod(&vec![T::from_f32(f32::NAN); out_len])
            .map_err(|e| format!("allocating the output on the GPU: {e}"))?;
        Ok(Box::new(DeviceRunner { flow, kernel, stream, input, out }))
    }

    /// The similarity stage alone: operands prepared once, `n` similarity launches timed.
    struct SimilarityRunner<T> {
        flow: Flow<T>,
        kernel: MergeKernel,
        stream: Arc<CudaStream>,
        input: CudaSlice<T>,
        stage: SimilarityStage,
    }

    pub(super) fn similarity_runner<T: Float + Dev + 'static>(
        gpu: &Gpu,
        flow: Flow<T>,
        wgmma: Option<bool>,
    ) -> Result<Box<dyn Runner>, String> {
        let (kernel, stream, input) = setup(gpu, &flow, wgmma)?;
        let stage = kernel.similarity_stage(&stream, &input, flow.spec.dims()).map_err(|e| e.to_string())?;
        Ok(Box::new(SimilarityRunner { flow, kernel, stream, input, stage }))
    }

    impl<T: Float + Dev> Runner for SimilarityRunner<T> {
        fn run(&mut self, n: u32) -> Result<(), String> {
            for _ in 0..n {
                self.kernel.run_similarity(&self.stream, &mut self.stage).map_err(|e| e.to_string())?;
            }
            self.stream.synchronize().map_err(|e| format!("cuStreamSynchronize: {e}"))
        }

        /// The timed launches' partial bests equal one launch's on a fresh stage, and the whole
        /// step through the same kernel gives the reference's merged tokens.
        fn check(self: Box<Self>) -> Result<Check, String> {
            let e = |e: vistok::Error| e.to_string();
            let s = &self.flow.spec;
            let timed = self.stage.partial_bests(&self.stream).map_err(e)?;
            let mut fresh = self.kernel.similarity_stage(&self.stream, &self.input, s.dims()).map_err(e)?;
            self.kernel.run_similarity(&self.stream, &mut fresh).map_err(e)?;
            if fresh.partial_bests(&self.stream).map_err(e)? != timed {
                return Ok(Check::Differs { max_abs: f64::INFINITY, tol: 0.0 });
            }
            let plan = self.kernel.plan(&self.stream, &self.input, s.dims(), &s.config).map_err(e)?;
            let dplan = self.kernel.upload(&self.stream, &plan).map_err(e)?;
            let out_len: usize = s.out_dims().iter().product();
            let mut out = self.stream.clone_htod(&vec![T::from_f32(f32::NAN); out_len]).map_err(|x| x.to_string())?;
            self.kernel.merge(&self.stream, &dplan, &self.input, MergeMode::Mean, &mut out).map_err(e)?;
            let got = self.stream.clone_dtoh(&out).map_err(|e| format!("copying the output to the host: {e}"))?;
            self.stream.synchronize().map_err(|e| format!("cuStreamSynchronize: {e}"))?;
            check_against_oracle(&self.flow, &got)
        }
    }

    impl<T: Float + Dev> Runner for DeviceRunner<T> {
        fn run(&mut self, n: u32) -> Result<(), String> {
            let s = &self.flow.spec;
            for _ in 0..n {
                let plan =
                    self.kernel.plan(&self.stream, &self.input, s.dims(), &s.config).map_err(|e| e.to_string())?;
                let dplan = self.kernel.upload(&self.stream, &plan).map_err(|e| e.to_string())?;
                self.kernel
                    .merge(&self.stream, &dplan, &self.input, MergeMode::Mean, &mut self.out)
                    .map_err(|e| e.to_string())?;
            }
            self.stream.synchronize().map_err(|e| format!("cuStreamSynchronize: {e}"))
        }

        fn check(self: Box<Self>) -> Result<Check, String> {
            let got = self.stream.clone_dtoh(&self.out).map_err(|e| format!("copying the output to the host: {e}"))?;
            self.stream.synchronize().map_err(|e| format!("cuStreamSynchronize: {e}"))?;
            check_against_oracle(&self.flow, &got)
        }
    }
}
