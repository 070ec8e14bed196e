//! Codebook argmin cases: the shapes of the argmin issue (`<N>x<K>x<D>`, L2), cpu f32 and
//! bf16 at full size; the reference (a naive f64 double loop, hours at full size) on the first
//! [`REFERENCE_ROWS`] rows only, with that N in its shape name; plus one tiny `-ci` shape
//! (not `-ci`: `tests/cli_bench.rs` expects `--filter '*-ci'` to select patchify's two rows only).
//!
//! Flops: `2·N·K·D` (one multiply-add per row, code and dimension), as FAISS and the issue
//! count them. Bytes: x, the codebook and the indices once each — far below the flops, so these
//! rows are compute-bound; bf16 rows are held to the bf16 dot-product peak.
//!
//! cuda rows (`--features cuda` with a device): `argmin/cuda/{f32,bf16}/<N>x<K>x<D>` at full size,
//! inputs and outputs already on the device (host transfers are not timed; each call includes
//! its NaN check, the search, the finish kernel and the 8-byte status read that syncs). The
//! bf16 rows run the tensor-core kernel (f32 accumulation; indices equal to the reference's up
//! to near-ties): on an H100 / H200 with `64 ≤ D ≤ 256` the sm_90a `wgmma` search, with a
//! second row `…-mma` running the `mma.sync` m16n8k16 search on the same data for a
//! same-run ratio; elsewhere `mma.sync`.
//! Peaks to compare with on an H200 SXM: FP32 FMA ≈ 67 TFLOP/s, dense bf16 tensor core ≈ 989
//! TFLOP/s (NVIDIA's datasheet figures); the targets are ≥ 60 % and ≥ 50 % of those.
//!
//! Check: indices equal to the reference's on the rows it ran, except at near-ties; a
//! differing row reports how much farther the chosen entry is than the best one, as a fraction
//! of the documented bound for that row (`max_abs` is the worst fraction, `tol` is 1).

use std::rc::Rc;

use vistok::argmin::{Codebook, Metric};
use vistok::{bf16, Float, View, ViewMut};

use crate::dev::Dev;

use super::{Backend, Case, Check, Env, Peak, Runner, Shared};

/// Rows the reference runs (and every backend is checked on).
const REFERENCE_ROWS: usize = 256;

/// The shapes `(N, K, D)`, and the `-ci` one.
const SHAPES: &[(usize, usize, usize, &str)] = &[
    (65536, 16384, 8, ""),
    (65536, 16384, 256, ""),
    (65536, 1024, 256, ""),
    (4096, 262144, 8, ""),
    (96, 200, 8, "-ci"),
];

pub fn cases(env: &Env) -> Result<Vec<Case>, String> {
    let mut out = vec![];
    for &(n, k, d, suffix) in SHAPES {
        out.extend(shape::<f32>(env, n, k, d, suffix, Peak::F32));
        out.extend(shape::<bf16>(env, n, k, d, suffix, Peak::Bf16));
    }
    Ok(out)
}

/// Deterministic values uniform in [-1, 1) (splitmix64): the same on every machine.
fn data<T: Float>(len: usize, seed: u64) -> Vec<T> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            T::from_f32((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// What the backends of one shape and dtype share: the prepared codebook, the input, and the
/// reference's indices on the first rows.
struct Flow<T: Float> {
    codebook: Rc<Shared<Codebook<T>>>,
    x: Rc<Shared<Vec<T>>>,
    oracle: Rc<Shared<Vec<u32>>>,
    d: usize,
}

impl<T: Float> Flow<T> {
    fn share(&self) -> Flow<T> {
        Flow { codebook: self.codebook.clone(), x: self.x.clone(), oracle: self.oracle.clone(), d: self.d }
    }
}

fn shape<T: Float + Dev>(env: &Env, n: usize, k: usize, d: usize, suffix: &str, peak: Peak) -> Vec<Case> {
    let codebook = Shared::new(move || {
        let e = data::<T>(k * d, 2);
        let view = View::new(&e, &[k, d]).map_err(|e| e.to_string())?;
        Codebook::new(view, Metric::L2).map_err(|e| e.to_string())
    });
    let x = Shared::new(move || Ok(data::<T>(n * d, 1)));
    let ref_rows = REFERENCE_ROWS.min(n);
    let oracle = {
        let (codebook, x) = (codebook.clone(), x.clone());
        Shared::new(move || {
            let mut idx = vec![u32::MAX; ref_rows];
            search(codebook.get()?, vistok::Backend::Reference, &x.get()?[..ref_rows * d], &mut idx)?;
            Ok(idx)
        })
    };
    let flow = Flow { codebook, x, oracle, d };
    let mut cases = vec![];
    for (backend, on, rows) in
        [(Backend::Reference, vistok::Backend::Reference, ref_rows), (Backend::Cpu, vistok::Backend::Cpu, n)]
    {
        let flow = flow.share();
        cases.push(Case {
            family: "argmin",
            backend,
            dtype: T::DTYPE.name().to_string(),
            shape: format!("{rows}x{k}x{d}{suffix}"),
            bytes: ((rows + k) * d * size_of::<T>() + rows * size_of::<u32>()) as u64,
            flops: 2 * (rows * k * d) as u64,
            peak,
            setup: Box::new(move || {
                Ok(Box::new(HostRunner { flow: flow.share(), backend: on, idx: vec![u32::MAX; rows] })
                    as Box<dyn Runner>)
            }),
        });
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = &env.gpu {
        // bf16 on compute capability 9.0 in the wgmma range: the default (wgmma) row, and the
        // mma.sync search on the same data
        let both = T::DTYPE == vistok::DType::BF16
            && gpu.compute_capability().ok() == Some((9, 0))
            && (vistok::cuda::argmin::WG_MIN_D..=vistok::cuda::argmin::WG_MAX_D).contains(&d);
        let variants: &[(&str, Option<bool>)] = if both { &[("", None), ("-mma", Some(false))] } else { &[("", None)] };
        for &(tag, wgmma) in variants {
            let (gpu, flow) = (gpu.clone(), flow.share());
            cases.push(Case {
                family: "argmin",
                backend: Backend::Cuda,
                dtype: T::DTYPE.name().to_string(),
                shape: format!("{n}x{k}x{d}{suffix}{tag}"),
                bytes: ((n + k) * d * size_of::<T>() + n * size_of::<u32>()) as u64,
                flops: 2 * (n * k * d) as u64,
                peak,
                setup: Box::new(move || device::runner(&gpu, flow.share(), wgmma)),
            });
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = env;
    cases
}

fn search<T: Float>(cb: &Codebook<T>, backend: vistok::Backend, x: &[T], idx: &mut [u32]) -> Result<(), String> {
    let (n, d) = (idx.len(), cb.dim());
    let x = View::new(x, &[n, d]).map_err(|e| e.to_string())?;
    let out = ViewMut::new(idx, &[n]).map_err(|e| e.to_string())?;
    cb.argmin(backend, x, out, None).map_err(|e| e.to_string())
}

struct HostRunner<T: Float> {
    flow: Flow<T>,
    backend: vistok::Backend,
    idx: Vec<u32>,
}

impl<T: Float> Runner for HostRunner<T> {
    fn run(&mut self, n: u32) -> Result<(), String> {
        let (cb, x) = (self.flow.codebook.get()?, self.flow.x.get()?);
        let x = &x[..self.idx.len() * self.flow.d];
        for _ in 0..n {
            search(cb, self.backend, std::hint::black_box(x), &mut self.idx)?;
        }
        Ok(())
    }

    fn check(self: Box<Self>) -> Result<Check, String> {
        if self.backend == vistok::Backend::Reference {
            self.flow.oracle.offer(self.idx);
            return Ok(Check::Oracle);
        }
        against_oracle(&self.flow, &self.idx)
    }
}

/// Indices of the first rows against the reference's: equal, or near-ties measured against the
/// documented bound.
fn against_oracle<T: Float>(flow: &Flow<T>, idx: &[u32]) -> Result<Check, String> {
    let want = flow.oracle.get()?;
    let got = &idx[..want.len()];
    if got == &want[..] {
        return Ok(Check::Exact);
    }
    let (cb, x, d) = (flow.codebook.get()?, flow.x.get()?, flow.d);
    let entry = |k: u32| cb.entries()[k as usize * d..][..d].iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let n2 = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
    let mut worst = 0.0f64;
    for (r, (&g, &w)) in got.iter().zip(want).enumerate().filter(|(_, (g, w))| g != w) {
        let xr: Vec<f64> = x[r * d..][..d].iter().map(|v| v.to_f32() as f64).collect();
        let dist = |e: &[f64]| xr.iter().zip(e).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
        let (eg, ew) = (entry(g), entry(w));
        // The module docs' bound; bf16 flushes only matter for subnormal inputs (none here).
        let tol = 2.0 * (d as f64 + 2.0) * 2f64.powi(-24) * (n2(&xr) + n2(&eg) + n2(&ew));
        worst = worst.max((dist(&eg) - dist(&ew)) / tol);
    }
    Ok(Check::Differs { max_abs: worst, tol: 1.0 })
}

#[cfg(feature = "cuda")]
mod device {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream};
    use vistok::cuda::argmin::CodebookGpu;
    use vistok::cuda::Gpu;
    use vistok::Float;

    use super::{against_oracle, Check, Flow, Runner};
    use crate::dev::Dev;

    struct DeviceRunner<T: Float> {
        flow: Flow<T>,
        kernel: CodebookGpu<T>,
        stream: Arc<CudaStream>,
        x: CudaSlice<T>,
        idx: CudaSlice<u32>,
    }

    /// `wgmma`: force the wgmma (`Some(true)`) or mma.sync search of the bf16 rows.
    pub(super) fn runner<T: Float + Dev + 'static>(
        gpu: &Gpu,
        flow: Flow<T>,
        wgmma: Option<bool>,
    ) -> Result<Box<dyn Runner>, String> {
        // bf16 rows run on tensor cores (the target); f32 on the exact FFMA kernel.
        let tc = T::DTYPE == vistok::DType::BF16;
        let kernel = CodebookGpu::new(gpu, flow.codebook.get()?)
            .and_then(|k| k.with_tensor_cores(tc))
            .and_then(|k| match wgmma {
                Some(on) => k.with_wgmma(on),
                None => Ok(k),
            })
            .map_err(|e| e.to_string())?;
        let stream = gpu.stream().clone();
        let x = stream.clone_htod(flow.x.get()?).map_err(|e| format!("copying x to the GPU: {e}"))?;
        let n = flow.x.get()?.len() / flow.d;
        let idx = stream.clone_htod(&vec![u32::MAX; n]).map_err(|e| format!("allocating indices on the GPU: {e}"))?;
        Ok(Box::new(DeviceRunner { flow, kernel, stream, x, idx }))
    }

    impl<T: Float + Dev> Runner for DeviceRunner<T> {
        fn run(&mut self, n: u32) -> Result<(), String> {
            for _ in 0..n {
                self.kernel.argmin(&self.stream, &self.x, &mut self.idx, None).map_err(|e| e.to_string())?;
            }
            Ok(())
        }

        fn check(self: Box<Self>) -> Result<Check, String> {
            let got = self.stream.clone_dtoh(&self.idx).map_err(|e| format!("copying indices to the host: {e}"))?;
            self.stream.synchronize().map_err(|e| format!("cuStreamSynchronize: {e}"))?;
            against_oracle(&self.flow, &got)
        }
    }
}
