//! Patchify / unpatchify cases: the shapes of the patchify issue, with the criterion benches'
//! ids, on every backend, plus one tiny `-ci` shape for fast tests.
//!
//! Flops: the fused normalisation is one fma per element written (2 flops), so the arithmetic
//! intensity is well under 1 flop/byte: these kernels are memory-bound and their roofline
//! fraction is, in effect, achieved bandwidth over the machine's.

use std::rc::Rc;

use vistok::{bf16, Element, Float, Layout, Normalize, PatchConfig, Patchify, View, ViewMut};

use super::{compare, data, Backend, Case, Check, Env, Peak, Runner, Shared};

/// One shape of the suite.
struct Spec {
    name: &'static str,
    config: PatchConfig,
    dims: Vec<usize>,
}

fn spec(name: &'static str, config: PatchConfig, dims: &[usize]) -> Spec {
    Spec { name, config, dims: dims.to_vec() }
}

pub fn cases(env: &Env) -> Result<Vec<Case>, String> {
    let nchw = || PatchConfig::image(Layout::ChannelsFirst, 16, 16).normalize(Normalize::imagenet_u8());
    let image = spec("32x3x256x256-nchw-p16", nchw(), &[32, 3, 256, 256]);
    // As in benches/patchify.rs: an f32 image that is already normalised, so no normalisation.
    let nhwc = spec("8x512x512x3-nhwc-p16", PatchConfig::image(Layout::ChannelsLast, 16, 16), &[8, 512, 512, 3]);
    let video = spec(
        "4x3x16x224x224-ncthw-p2x16x16",
        PatchConfig::video(Layout::ChannelsFirst, 2, 16, 16).normalize(Normalize::imagenet_u8()),
        &[4, 3, 16, 224, 224],
    );
    // Not part of the suite: small enough for the test suite to run every backend in
    // milliseconds (`--filter '*-ci'`).
    let ci = spec("2x3x64x64-nchw-p16-ci", nchw(), &[2, 3, 64, 64]);

    let mut out = vec![];
    out.extend(direction(env, &image, Ops::<u8, f32>::forward())?);
    out.extend(direction(env, &nhwc, Ops::<f32, bf16>::forward())?);
    out.extend(direction(env, &video, Ops::<u8, f32>::forward())?);
    out.extend(direction(env, &image, Ops::<f32, u8>::inverse())?);
    out.extend(direction(env, &ci, Ops::<u8, f32>::forward())?);
    Ok(out)
}

/// A host kernel call: `plan` on `backend` from `input` to `output`.
type HostOp<I, O> = fn(&Patchify, vistok::Backend, &[I], &mut [O]) -> vistok::Result<()>;

/// One direction's entry points and input, so that one function builds the cases of both.
struct Ops<I, O> {
    family: &'static str,
    host: HostOp<I, O>,
    input: fn(&Patchify) -> Result<Vec<I>, String>,
    /// Elements read and written by one run.
    lens: fn(&Patchify) -> (usize, usize),
    #[cfg(feature = "cuda")]
    device: device::Op<I, O>,
}

impl<I: Element + Dev, O: Float + Dev> Ops<I, O> {
    /// image → tokens.
    fn forward() -> Self {
        Ops {
            family: "patchify",
            host: |plan, b, x, y| {
                plan.forward(b, View::new(x, plan.image_dims())?, ViewMut::new(y, &plan.tokens_dims())?)
            },
            input: |plan| Ok(data::<I>(plan.image_dims().iter().product())),
            lens: |plan| (plan.image_dims().iter().product(), plan.tokens_dims().iter().product()),
            #[cfg(feature = "cuda")]
            device: |k, s, x, y| k.forward(s, x, y),
        }
    }
}

impl<I: Float + Dev, O: Element + Dev> Ops<I, O> {
    /// tokens → image. The input is the tokens of deterministic u8 pixels (made by the cpu
    /// backend: only data here, not under test), so that a u8 output is a real round trip
    /// rather than mostly clamped values.
    fn inverse() -> Self {
        Ops {
            family: "unpatchify",
            host: |plan, b, x, y| {
                plan.inverse(b, View::new(x, &plan.tokens_dims())?, ViewMut::new(y, plan.image_dims())?)
            },
            input: |plan| {
                let image = data::<u8>(plan.image_dims().iter().product());
                let mut tokens = poisoned::<I>(plan.tokens_dims().iter().product());
                plan.forward(
                    vistok::Backend::Cpu,
                    View::new(&image, plan.image_dims()).map_err(|e| e.to_string())?,
                    ViewMut::new(&mut tokens, &plan.tokens_dims()).map_err(|e| e.to_string())?,
                )
                .map_err(|e| e.to_string())?;
                Ok(tokens)
            },
            lens: |plan| (plan.tokens_dims().iter().product(), plan.image_dims().iter().product()),
            #[cfg(feature = "cuda")]
            device: |k, s, x, y| k.inverse(s, x, y),
        }
    }
}

pub use crate::dev::Dev;

/// What the backends of one (shape, direction) share: the plan, the input (made once) and the
/// reference output (made once; every backend's check compares with it).
pub struct Flow<I, O> {
    pub plan: Rc<Patchify>,
    pub input: Rc<Shared<Vec<I>>>,
    pub oracle: Rc<Shared<Vec<O>>>,
    pub out_len: usize,
}

impl<I, O> Flow<I, O> {
    fn share(&self) -> Flow<I, O> {
        Flow { plan: self.plan.clone(), input: self.input.clone(), oracle: self.oracle.clone(), out_len: self.out_len }
    }
}

fn direction<I: Element + Dev, O: Element + Dev>(env: &Env, s: &Spec, ops: Ops<I, O>) -> Result<Vec<Case>, String> {
    let plan = Rc::new(Patchify::new(&s.config, &s.dims).map_err(|e| format!("built-in shape {}: {e}", s.name))?);
    let (in_len, out_len) = (ops.lens)(&plan);
    let (host, make_input) = (ops.host, ops.input);
    let input = {
        let plan = plan.clone();
        Shared::new(move || make_input(&plan))
    };
    let oracle = {
        let (plan, input) = (plan.clone(), input.clone());
        Shared::new(move || {
            let mut y = poisoned::<O>(out_len);
            host(&plan, vistok::Backend::Reference, input.get()?, &mut y).map_err(|e| e.to_string())?;
            Ok(y)
        })
    };
    let flow = Flow { plan, input, oracle, out_len };
    let case = |backend: Backend, setup: Box<dyn Fn() -> Result<Box<dyn Runner>, String>>| Case {
        family: ops.family,
        backend,
        dtype: format!("{}-{}", I::DTYPE.name(), O::DTYPE.name()),
        shape: s.name.to_string(),
        bytes: (in_len * size_of::<I>() + out_len * size_of::<O>()) as u64,
        // One fma per element written.
        flops: 2 * out_len as u64,
        peak: Peak::F32,
        setup,
    };
    let mut cases = vec![];
    for (backend, on) in [(Backend::Reference, vistok::Backend::Reference), (Backend::Cpu, vistok::Backend::Cpu)] {
        let flow = flow.share();
        cases.push(case(
            backend,
            Box::new(move || {
                let out = poisoned::<O>(flow.out_len);
                Ok(Box::new(HostRunner { flow: flow.share(), backend: on, op: host, out }) as Box<dyn Runner>)
            }),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = &env.gpu {
        let (gpu, flow, op) = (gpu.clone(), flow.share(), ops.device);
        cases.push(case(Backend::Cuda, Box::new(move || device::runner(&gpu, flow.share(), op))));
    }
    #[cfg(not(feature = "cuda"))]
    let _ = env;
    Ok(cases)
}

/// Outputs start as NaN (0 for u8) so that an element a kernel forgets to write shows up in the
/// check.
pub fn poisoned<O: Element>(n: usize) -> Vec<O> {
    vec![O::from_f32(f32::NAN); n]
}

struct HostRunner<I, O> {
    flow: Flow<I, O>,
    backend: vistok::Backend,
    op: HostOp<I, O>,
    out: Vec<O>,
}

impl<I: Element, O: Element> Runner for HostRunner<I, O> {
    fn run(&mut self, n: u32) -> Result<(), String> {
        let input = self.flow.input.get()?;
        for _ in 0..n {
            (self.op)(&self.flow.plan, self.backend, std::hint::black_box(input), &mut self.out)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn check(self: Box<Self>) -> Result<Check, String> {
        if self.backend == vistok::Backend::Reference {
            self.flow.oracle.offer(self.out);
            return Ok(Check::Oracle);
        }
        // The contract makes every backend bit-identical to the reference.
        compare(&self.out, self.flow.oracle.get()?, 0.0)
    }
}

/// The CUDA backend's runner: data stays on the device; `n` launches, then one synchronisation.
#[cfg(feature = "cuda")]
mod device {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream};
    use vistok::cuda::{Gpu, PatchifyKernel};
    use vistok::Element;

    use super::{compare, Check, Dev, Flow, Runner};

    /// A device kernel call: `kernel` on `stream` from `input` to `output`.
    pub type Op<I, O> = fn(&PatchifyKernel, &Arc<CudaStream>, &CudaSlice<I>, &mut CudaSlice<O>) -> vistok::Result<()>;

    struct DeviceRunner<I, O> {
        flow: Flow<I, O>,
        kernel: PatchifyKernel,
        stream: Arc<CudaStream>,
        op: Op<I, O>,
        input: CudaSlice<I>,
        out: CudaSlice<O>,
    }

    pub fn runner<I: Element + Dev, O: Element + Dev>(
        gpu: &Gpu,
        flow: Flow<I, O>,
        op: Op<I, O>,
    ) -> Result<Box<dyn Runner>, String> {
        let kernel = PatchifyKernel::new(gpu, &flow.plan).map_err(|e| e.to_string())?;
        let stream = gpu.stream().clone();
        let input = stream.clone_htod(flow.input.get()?).map_err(|e| format!("copying the input to the GPU: {e}"))?;
        // Poisoned like the host outputs: NaN for floats.
        let out = stream
            .clone_htod(&super::poisoned::<O>(flow.out_len))
            .map_err(|e| format!("allocating the output on the GPU: {e}"))?;
        Ok(Box::new(DeviceRunner { flow, kernel, stream, op, input, out }))
    }

    impl<I: Element + Dev, O: Element + Dev> Runner for DeviceRunner<I, O> {
        fn run(&mut self, n: u32) -> Result<(), String> {
            for _ in 0..n {
                (self.op)(&self.kernel, &self.stream, &self.input, &mut self.out).map_err(|e| e.to_string())?;
            }
            self.stream.synchronize().map_err(|e| format!("cuStreamSynchronize: {e}"))
        }

        fn check(self: Box<Self>) -> Result<Check, String> {
            let got = self.stream.clone_dtoh(&self.out).map_err(|e| format!("copying the output to the host: {e}"))?;
            self.stream.synchronize().map_err(|e| format!("cuStreamSynchronize: {e}"))?;
            compare(&got, self.flow.oracle.get()?, 0.0)
        }
    }
}
