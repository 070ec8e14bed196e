//! What machine a run was on, for the JSON (a baseline from another machine is not comparable).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    pub logical_cpus: usize,
    /// Size of the rayon pool the kernels ran on.
    pub threads: usize,
    /// SIMD level the cpu backend used (`vistok::Isa::detect()`).
    pub simd: String,
    /// `VISTOK_ISA`, when set.
    pub simd_override: Option<String>,
    pub gpu: Option<String>,
    pub os: String,
    pub arch: String,
    /// /proc/sys/kernel/osrelease, where readable.
    pub kernel: Option<String>,
    pub vistok_version: String,
    pub unix_time: u64,
}

impl Machine {
    pub fn detect(gpu: Option<String>) -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpu_model,
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: rayon::current_num_threads(),
            simd: vistok::Isa::detect().name().into(),
            simd_override: std::env::var("VISTOK_ISA").ok(),
            gpu,
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
            vistok_version: env!("CARGO_PKG_VERSION").into(),
            unix_time: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        }
    }
}
