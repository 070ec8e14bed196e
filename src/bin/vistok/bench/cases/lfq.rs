//! LFQ cases: the shapes of the LFQ / FSQ issue, with the criterion benches' ids, on the host
//! backends, plus one tiny `-ci` shape for fast tests. Also the host-case machinery the FSQ
//! cases share ([`Quant`], [`host_cases`], [`signed`]).
//!
//! | id shape | G × d | what |
//! |---|---|---|
//! | `1048576x18` | 1 × 18 | MAGVIT-v2's 2^18 codebook: f32 and bf16 encode, f32 decode |
//! | `1048576x32` | 4 × 8 | group-wise LFQ (WeTok / Open-MAGVIT2 style), f32 encode |
//! | `65536x18` | 1 × 18 | a cache-resident batch, f32 encode |
//! | `1031x18-ci` | 2 × 9 | tests only (`--filter 'lfq/*-ci'`): odd N, two groups |
//! | `16777216x18-hbm` | 1 × 18 | cuda rows only: 1.2 GB of `z`, far beyond a GPU's L2, for the HBM-bandwidth target |
//!
//! Encode is `lfq/<backend>/<dtype>/<N>x<C>` (dtype of `z`), decode `lfq/<backend>/u32-f32/…`
//! (ids in, codes out). Bytes: what one call must move, input read + output written
//! (`N·C·size(z) + N·G·4` for encode, `N·G·4 + N·C·4` for decode). Flops: one comparison per
//! value of `z` (encode) or code written (decode), so that the cases sit on the roofline plot;
//! the kernels are memory-bound either way. MSB-first for d = 18 (vector-quantize-pytorch),
//! LSB-first for the group-wise shape (Open-MAGVIT2, WeTok).
//!
//! GPU-only rows ([`HBM`] shapes) have no reference / cpu rows (seconds per call on a CPU); their
//! check is against the cpu backend, which the property tests hold bit-identical to the
//! reference.
//!
//! Data: LFQ on non-negative data is trivial (every bit 1), so `z` is a deterministic hash
//! mapped to `[−2, 2)`, centred on 0, with exact `±0` mixed in ([`signed`]). Decode reads hashed
//! ids below `2^d`. Every backend must match the reference bit for bit (ids and codes).

use std::rc::Rc;

use vistok::{bf16, BitOrder, Float, Lfq, LfqConfig, View, ViewMut};

use crate::dev::Dev;

use super::{compare, Backend, Case, Check, Env, Peak, Runner, Shared};

pub fn cases(env: &Env) -> Result<Vec<Case>, String> {
    let msb18 = LfqConfig::new(1, 18, BitOrder::MsbFirst);
    let grouped = LfqConfig::new(4, 8, BitOrder::LsbFirst);
    let ci = LfqConfig::new(2, 9, BitOrder::LsbFirst);
    let mut out = vec![];
    out.extend(encode::<f32>(env, msb18, 1 << 20, "")?);
    out.extend(encode::<bf16>(env, msb18, 1 << 20, "")?);
    out.extend(encode::<f32>(env, grouped, 1 << 20, "")?);
    out.extend(encode::<f32>(env, msb18, 1 << 16, "")?);
    out.extend(decode(env, msb18, 1 << 20, "")?);
    out.extend(encode::<f32>(env, ci, 1031, "-ci")?);
    out.extend(decode(env, ci, 1031, "-ci")?);
    #[cfg(feature = "cuda")]
    if env.gpu.is_some() {
        out.extend(encode::<f32>(env, msb18, 1 << 24, HBM)?);
        out.extend(decode(env, msb18, 1 << 24, HBM)?);
    }
    Ok(out)
}

/// The shape suffix of GPU-only rows, sized to stream from HBM rather than L2.
pub(super) const HBM: &str = "-hbm";

fn plan(config: LfqConfig) -> Result<Lfq, String> {
    Lfq::new(&config).map_err(|e| format!("built-in lfq shape {config:?}: {e}"))
}

fn encode<T: Float + Dev>(env: &Env, config: LfqConfig, n: usize, suffix: &str) -> Result<Vec<Case>, String> {
    let plan = plan(config)?;
    let (c, g) = (plan.channels(), plan.groups());
    Ok(host_cases(
        env,
        Quant {
            family: "lfq",
            dtype: T::DTYPE.name().to_string(),
            shape: format!("{n}x{c}{suffix}"),
            in_len: n * c,
            out_len: n * g,
            flops: (n * c) as u64,
            plan,
            gpu_only: suffix == HBM,
            input: Box::new(move || signed::<T>(n * c, 2.0)),
            op: |p, b, z, ids| {
                let n = ids.len() / p.groups();
                p.encode(b, View::new(z, &p.codes_dims(n))?, ViewMut::new(ids, &p.ids_dims(n))?)
            },
            check: |_, _, got, want| Ok(compare_ids(got, want)),
            poison: u32::MAX,
            #[cfg(feature = "cuda")]
            device: |gpu, p| {
                let k = vistok::cuda::LfqKernel::new(gpu, p)?;
                Ok(Box::new(move |s, z, ids, c| k.encode_deferred::<T>(s, z, ids, c)))
            },
        },
    ))
}

fn decode(env: &Env, config: LfqConfig, n: usize, suffix: &str) -> Result<Vec<Case>, String> {
    let plan = plan(config)?;
    let (c, g, max) = (plan.channels(), plan.groups(), (plan.codebook_size() - 1) as u32);
    Ok(host_cases(
        env,
        Quant {
            family: "lfq",
            dtype: "u32-f32".to_string(),
            shape: format!("{n}x{c}{suffix}"),
            in_len: n * g,
            out_len: n * c,
            flops: (n * c) as u64,
            plan,
            gpu_only: suffix == HBM,
            input: Box::new(move || (0..n * g).map(|i| hash(i) as u32 & max).collect()),
            op: |p, b, ids, codes| {
                let n = ids.len() / p.groups();
                p.decode(b, View::new(ids, &p.ids_dims(n))?, ViewMut::new(codes, &p.codes_dims(n))?)
            },
            check: |_, _, got, want| compare(got, want, 0.0),
            poison: f32::NAN,
            #[cfg(feature = "cuda")]
            device: |gpu, p| {
                let k = vistok::cuda::LfqKernel::new(gpu, p)?;
                Ok(Box::new(move |s, ids, codes, c| k.decode_deferred::<f32>(s, ids, codes, c)))
            },
        },
    ))
}

/// Bit-identical ids → [`Check::Exact`]; otherwise the largest difference of id values (any
/// difference fails: LFQ ids are exact by contract).
pub(super) fn compare_ids(got: &[u32], want: &[u32]) -> Check {
    let max_abs = got.iter().zip(want).map(|(&g, &w)| g.abs_diff(w)).max().unwrap_or(0);
    if max_abs == 0 && got.len() == want.len() {
        Check::Exact
    } else {
        Check::Differs { max_abs: if got.len() == want.len() { max_abs as f64 } else { f64::INFINITY }, tol: 0.0 }
    }
}

/// splitmix64 of the index: deterministic, the same on every machine.
pub(super) fn hash(i: usize) -> u64 {
    let mut z = (i as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` deterministic values uniform in `[−range, range)` (24-bit steps, centred on 0), with
/// one in 64 an exact `+0` or `−0` so the `z > 0` rule for zeros is exercised too.
pub(super) fn signed<T: Float>(n: usize, range: f32) -> Vec<T> {
    (0..n)
        .map(|i| {
            let h = hash(i);
            let v = match h & 63 {
                0 => 0.0,
                1 => -0.0,
                _ => ((h >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * range,
            };
            T::from_f32(v)
        })
        .collect()
}

/// A host kernel call: `plan` on `backend` from `input` to `output` (dims from the lengths).
pub(super) type HostOp<P, I, O> = fn(&P, vistok::Backend, &[I], &mut [O]) -> vistok::Result<()>;

/// Compares a backend's output with the reference's: `(plan, input, got, want)`.
pub(super) type CheckOp<P, I, O> = fn(&P, &[I], &[O], &[O]) -> Result<Check, String>;

/// One (plan, direction, dtype, shape) of a quantizer family: everything its cases need.
pub(super) struct Quant<P, I, O> {
    pub family: &'static str,
    pub dtype: String,
    pub shape: String,
    /// Elements read and written by one call.
    pub in_len: usize,
    pub out_len: usize,
    pub flops: u64,
    pub plan: P,
    /// Only a cuda row (a GPU-sized shape), checked against the cpu backend.
    pub gpu_only: bool,
    /// Makes the input (deferred: only when a case of this shape passes the filter).
    pub input: Box<dyn Fn() -> Vec<I>>,
    pub op: HostOp<P, I, O>,
    pub check: CheckOp<P, I, O>,
    /// The value outputs start as, so that an element a kernel forgets to write shows up.
    pub poison: O,
    /// Makes the device kernel of `plan` (the cuda row).
    #[cfg(feature = "cuda")]
    pub device: device::Make<P, I, O>,
}

/// What the backends of one [`Quant`] share: the plan, the input and the reference output
/// (each made at most once).
struct Flow<P, I, O> {
    plan: Rc<P>,
    input: Rc<Shared<Vec<I>>>,
    oracle: Rc<Shared<Vec<O>>>,
    out_len: usize,
    op: HostOp<P, I, O>,
    check: CheckOp<P, I, O>,
    poison: O,
}

impl<P, I, O: Copy> Flow<P, I, O> {
    fn share(&self) -> Self {
        Flow {
            plan: self.plan.clone(),
            input: self.input.clone(),
            oracle: self.oracle.clone(),
            out_len: self.out_len,
            op: self.op,
            check: self.check,
            poison: self.poison,
        }
    }
}

/// The reference and cpu cases of `q`.
pub(super) fn host_cases<P: 'static, I: Dev + 'static, O: Dev + Copy + 'static>(
    env: &Env,
    q: Quant<P, I, O>,
) -> Vec<Case> {
    #[cfg(feature = "cuda")]
    let make = q.device;
    let Quant { family, dtype, shape, in_len, out_len, flops, plan, gpu_only, input, op, check, poison, .. } = q;
    let oracle_backend = if gpu_only { vistok::Backend::Cpu } else { vistok::Backend::Reference };
    let plan = Rc::new(plan);
    let input = Shared::new(move || Ok(input()));
    let oracle = {
        let (plan, input) = (plan.clone(), input.clone());
        Shared::new(move || {
            let mut y = vec![poison; out_len];
            op(&plan, oracle_backend, input.get()?, &mut y).map_err(|e| e.to_string())?;
            Ok(y)
        })
    };
    let flow = Flow { plan, input, oracle, out_len, op, check, poison };
    let case = |backend, setup| Case {
        family,
        backend,
        dtype: dtype.clone(),
        shape: shape.clone(),
        bytes: (in_len * size_of::<I>() + out_len * size_of::<O>()) as u64,
        flops,
        peak: Peak::F32,
        setup,
    };
    let mut cases = vec![];
    let hosts: &[_] = if gpu_only {
        &[]
    } else {
        &[(Backend::Reference, vistok::Backend::Reference), (Backend::Cpu, vistok::Backend::Cpu)]
    };
    for &(backend, on) in hosts {
        let flow = flow.share();
        cases.push(case(
            backend,
            Box::new(move || {
                let out = vec![flow.poison; flow.out_len];
                Ok(Box::new(HostRunner { flow: flow.share(), backend: on, out }) as Box<dyn Runner>)
            }),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = &env.gpu {
        let (gpu, flow) = (gpu.clone(), flow.share());
        cases.push(case(Backend::Cuda, Box::new(move || device::runner(&gpu, flow.share(), make))));
    }
    #[cfg(not(feature = "cuda"))]
    let _ = env;
    cases
}

struct HostRunner<P, I, O> {
    flow: Flow<P, I, O>,
    backend: vistok::Backend,
    out: Vec<O>,
}

impl<P, I, O: Copy> Runner for HostRunner<P, I, O> {
    fn run(&mut self, n: u32) -> Result<(), String> {
        let input = self.flow.input.get()?;
        for _ in 0..n {
            (self.flow.op)(&self.flow.plan, self.backend, std::hint::black_box(input), &mut self.out)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn check(self: Box<Self>) -> Result<Check, String> {
        if self.backend == vistok::Backend::Reference {
            self.flow.oracle.offer(self.out);
            return Ok(Check::Oracle);
        }
        (self.flow.check)(&self.flow.plan, self.flow.input.get()?, &self.out, self.flow.oracle.get()?)
    }
}

/// The CUDA rows: data stays on the device; `n` launches with the NaN / bad-id check deferred,
/// then one wait (which also reads the check). The output is then compared as the host rows'.
#[cfg(feature = "cuda")]
pub(super) mod device {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream};
    use vistok::cuda::{DeferredCheck, Gpu};

    use super::{Check, Flow, Runner};
    use crate::dev::Dev;

    /// One launch: `(stream, input, output, check)`.
    pub type Launch<I, O> =
        Box<dyn Fn(&Arc<CudaStream>, &CudaSlice<I>, &mut CudaSlice<O>, &mut DeferredCheck) -> vistok::Result<()>>;

    /// Makes the device kernel of a plan and returns its launch.
    pub type Make<P, I, O> = fn(&Gpu, &P) -> vistok::Result<Launch<I, O>>;

    struct DeviceRunner<P, I, O> {
        flow: Flow<P, I, O>,
        launch: Launch<I, O>,
        stream: Arc<CudaStream>,
        input: CudaSlice<I>,
        out: CudaSlice<O>,
        check: DeferredCheck,
    }

    pub(super) fn runner<P: 'static, I: Dev + 'static, O: Dev + Copy + 'static>(
        gpu: &Gpu,
        flow: Flow<P, I, O>,
        make: Make<P, I, O>,
    ) -> Result<Box<dyn Runner>, String> {
        let launch = make(gpu, &flow.plan).map_err(|e| e.to_string())?;
        let stream = gpu.stream().clone();
        let input = stream.clone_htod(flow.input.get()?).map_err(|e| format!("copying the input to the GPU: {e}"))?;
        let out = stream
            .clone_htod(&vec![flow.poison; flow.out_len])
            .map_err(|e| format!("allocating the output on the GPU: {e}"))?;
        let check = DeferredCheck::new(&stream).map_err(|e| e.to_string())?;
        Ok(Box::new(DeviceRunner { flow, launch, stream, input, out, check }))
    }

    impl<P, I: Dev, O: Dev + Copy> Runner for DeviceRunner<P, I, O> {
        fn run(&mut self, n: u32) -> Result<(), String> {
            for _ in 0..n {
                (self.launch)(&self.stream, &self.input, &mut self.out, &mut self.check).map_err(|e| e.to_string())?;
            }
            self.check.result().map_err(|e| e.to_string())
        }

        fn check(self: Box<Self>) -> Result<Check, String> {
            let got = self.stream.clone_dtoh(&self.out).map_err(|e| format!("copying the output to the host: {e}"))?;
            self.stream.synchronize().map_err(|e| format!("cuStreamSynchronize: {e}"))?;
            (self.flow.check)(&self.flow.plan, self.flow.input.get()?, &got, self.flow.oracle.get()?)
        }
    }
}
