//! The devices of the GPU suites: the one shared GPU (or a skip), and the PTX interpreter.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use vistok::cuda::Gpu;
use vistok::Error;

use super::{require_gpu, say_skipped};

/// The GPU shared by all tests of a binary (one context, the modules JIT-compiled once), or
/// `None` after a `skipped:` line. NoCudaDriver / NoDevice on machines without a GPU, or a
/// driver error (e.g. a driver too old), skip, unless `VISTOK_REQUIRE_GPU=1`: then they fail.
pub fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Result<Gpu, Error>> = OnceLock::new();
    match GPU.get_or_init(|| Gpu::new(0)) {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(!require_gpu(), "VISTOK_REQUIRE_GPU=1 but no usable CUDA device: {e}");
            say_skipped(&format!("no CUDA device ({e})"));
            None
        }
    }
}

/// kernels/ptx_sim.py of this checkout, if python3 can run it (else `None` after a `skipped:`
/// line).
pub fn simulator() -> Option<&'static Path> {
    static SIM: OnceLock<Option<PathBuf>> = OnceLock::new();
    let sim = SIM.get_or_init(|| {
        let sim = super::ptx::kernels_file("ptx_sim.py")?;
        let ok = Command::new("python3").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
        ok.then_some(sim)
    });
    if sim.is_none() {
        say_skipped("python3 or kernels/ptx_sim.py not found");
    }
    sim.as_deref()
}
