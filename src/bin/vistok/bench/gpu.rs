//! The GPU side of the harness: opening the device once (or saying why there is none) and its
//! roofline (a measured device-to-device copy, and the peaks the device's properties imply).
//! Everything `cfg(feature = "cuda")` in the harness is here; the families' device runners sit
//! in their own case files.

use serde::{Deserialize, Serialize};

/// The GPU of this run, or why there is none.
pub struct Gpus {
    #[cfg(feature = "cuda")]
    pub gpu: Option<vistok::cuda::Gpu>,
    /// Why cuda cases are skipped (`None` when a device is open).
    pub skipped: Option<String>,
}

/// What [`super::roofline::Roofline::measure`] may probe.
pub type Device<'a> = &'a Gpus;

impl Gpus {
    /// Opens device 0, if the build and the machine have one.
    pub fn open() -> Gpus {
        #[cfg(feature = "cuda")]
        match vistok::cuda::Gpu::new(0) {
            Ok(gpu) => Gpus { gpu: Some(gpu), skipped: None },
            Err(e) => Gpus { gpu: None, skipped: Some(e.to_string()) },
        }
        #[cfg(not(feature = "cuda"))]
        Gpus { skipped: Some("built without the cuda feature (cargo build --features cuda)".into()) }
    }

    /// The device's name, for the machine info.
    pub fn name(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Some(g.name().unwrap_or_else(|e| format!("unknown ({e})")));
        }
        None
    }
}

/// The GPU's ceilings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuRoofline {
    pub name: String,
    pub compute_capability: String,
    pub sms: u32,
    /// Measured: device-to-device copy, bytes read + bytes written.
    pub copy_gb_per_s: f64,
    /// From the properties: 2 (DDR) × memory clock × bus width.
    pub peak_memory_gb_per_s: Option<f64>,
    /// From the properties: SMs × f32 lanes per SM (by architecture) × 2 × SM clock.
    pub peak_f32_gflop_per_s: Option<f64>,
    /// From the properties: SMs × dense bf16 tensor-core flops per SM per clock (by
    /// architecture: 2048 on sm_80, 4096 on sm_90) × SM clock; what bf16 / f16 rows are judged
    /// against.
    #[serde(default)]
    pub peak_tensor_bf16_gflop_per_s: Option<f64>,
    pub note: String,
}

impl GpuRoofline {
    pub fn print(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let f = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.0}"));
        writeln!(out, "gpu: {} (sm_{}, {} SMs)", self.name, self.compute_capability, self.sms)?;
        writeln!(out, "  device-to-device copy (measured)        {:>10.1} GB/s", self.copy_gb_per_s)?;
        writeln!(out, "  memory peak (properties)                {:>10} GB/s", f(self.peak_memory_gb_per_s))?;
        writeln!(out, "  f32 FMA peak (properties)               {:>10} GFLOP/s", f(self.peak_f32_gflop_per_s))?;
        writeln!(
            out,
            "  bf16 tensor-core peak (properties)      {:>10} GFLOP/s",
            f(self.peak_tensor_bf16_gflop_per_s)
        )?;
        if !self.note.is_empty() {
            writeln!(out, "  ({})", self.note)?;
        }
        Ok(())
    }
}

/// The GPU's roofline, or why there is none.
pub fn roofline(gpus: Device<'_>, quick: bool) -> Result<GpuRoofline, String> {
    #[cfg(feature = "cuda")]
    if let Some(gpu) = &gpus.gpu {
        return cuda::roofline(gpu, quick);
    }
    let _ = quick;
    Err(gpus.skipped.clone().unwrap_or_else(|| "no GPU".into()))
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::time::Instant;

    use cudarc::driver::sys::CUdevice_attribute as Attr;
    use cudarc::driver::CudaSlice;
    use vistok::cuda::Gpu;

    use super::GpuRoofline;

    /// f32 lanes per SM by architecture (CUDA programming guide, arithmetic instructions
    /// table); `None` for an architecture we don't know.
    fn f32_lanes_per_sm(major: i32, minor: i32) -> Option<u32> {
        match (major, minor) {
            (7, _) | (8, 0) => Some(64),
            (8, _) | (9, _) | (10, _) | (12, _) => Some(128),
            _ => None,
        }
    }

    /// Dense bf16 / f16 tensor-core flops per SM per clock (mma with f32 accumulation; A100
    /// and H100 datasheets: 312 and 989 TFLOP/s); `None` where we don't know it.
    fn tensor_bf16_flops_per_sm_clock(major: i32, minor: i32) -> Option<u32> {
        match (major, minor) {
            (8, 0) => Some(2048),
            (9, 0) => Some(4096),
            _ => None,
        }
    }

    pub fn roofline(gpu: &Gpu, quick: bool) -> Result<GpuRoofline, String> {
        let name = gpu.name().map_err(|e| e.to_string())?;
        let (major, minor) = gpu.compute_capability().map_err(|e| e.to_string())?;
        let attr = |a| gpu.context().attribute(a).ok().and_then(|v| u64::try_from(v).ok());
        let sm_khz = attr(Attr::CU_DEVICE_ATTRIBUTE_CLOCK_RATE);
        let mem_khz = attr(Attr::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE);
        let bus_bits = attr(Attr::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH);
        let peak_memory = match (mem_khz, bus_bits) {
            (Some(k), Some(b)) => Some(2.0 * k as f64 * 1e3 * b as f64 / 8.0 / 1e9),
            _ => None,
        };
        let peak_f32 = match (sm_khz, f32_lanes_per_sm(major, minor)) {
            (Some(k), Some(lanes)) => Some(f64::from(gpu.sm_count()) * f64::from(lanes) * 2.0 * k as f64 * 1e3 / 1e9),
            _ => None,
        };
        let peak_tc = match (sm_khz, tensor_bf16_flops_per_sm_clock(major, minor)) {
            (Some(k), Some(f)) => Some(f64::from(gpu.sm_count()) * f64::from(f) * k as f64 * 1e3 / 1e9),
            _ => None,
        };
        let copy = copy_gb_per_s(gpu, quick)?;
        let mut note = String::from("the copy is the memory ceiling of the cuda rows");
        if peak_f32.is_none() {
            note.push_str(&format!("; f32 peak unknown for sm_{major}{minor}"));
        }
        Ok(GpuRoofline {
            name,
            compute_capability: format!("{major}{minor}"),
            sms: gpu.sm_count(),
            copy_gb_per_s: copy,
            peak_memory_gb_per_s: peak_memory,
            peak_f32_gflop_per_s: peak_f32,
            peak_tensor_bf16_gflop_per_s: peak_tc,
            note,
        })
    }

    /// Best of a few batches of device-to-device copies of 256 MiB (1 GiB without `quick`).
    fn copy_gb_per_s(gpu: &Gpu, quick: bool) -> Result<f64, String> {
        let bytes: usize = if quick { 256 << 20 } else { 1 << 30 };
        let stream = gpu.stream();
        let err = |what: &str, e: cudarc::driver::DriverError| format!("gpu copy probe: {what}: {e}");
        let src: CudaSlice<u8> = stream.alloc_zeros(bytes).map_err(|e| err("alloc", e))?;
        let mut dst: CudaSlice<u8> = stream.alloc_zeros(bytes).map_err(|e| err("alloc", e))?;
        let reps = 10;
        let mut best = f64::INFINITY;
        for pass in 0..4 {
            stream.synchronize().map_err(|e| err("sync", e))?;
            let t = Instant::now();
            for _ in 0..reps {
                stream.memcpy_dtod(&src, &mut dst).map_err(|e| err("cuMemcpyDtoD", e))?;
            }
            stream.synchronize().map_err(|e| err("sync", e))?;
            // The first pass is a warm-up.
            if pass > 0 {
                best = best.min(t.elapsed().as_secs_f64() / f64::from(reps));
            }
        }
        Ok(2.0 * bytes as f64 / best / 1e9)
    }
}
