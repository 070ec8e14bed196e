//! The CUDA backend: hand-written PTX loaded at run time through `cudarc` (driver API only,
//! `libcuda` loaded dynamically, so binaries run — and report [`Error::NoCudaDriver`] — on
//! machines without a GPU).
//!
//! - [`Gpu`]: one device context, its default stream, and a cache of loaded PTX modules (each
//!   module is loaded at most once per context; functions are looked up by name).
//! - [`PatchifyKernel`]: patchify / unpatchify on device buffers (see [`patchify`]).
//! - [`LfqKernel`], [`FsqKernel`]: LFQ / BSQ and FSQ encode / decode on device buffers (see
//!   [`lfq`], [`fsq`]), bit-identical to the cpu backend; [`DeferredCheck`] reads their NaN /
//!   bad-id verdict later, so that back-to-back launches need no sync.
//! - [`CodebookGpu`]: nearest codebook entry (L2 / cosine; the exact f32 FFMA path gives the
//!   cpu backend's indices and distances bit for bit, bf16 / f16 optionally on tensor cores)
//!   and lookup, on device buffers (see [`argmin`]).
//! - [`AttentionKernel`]: FlashAttention-2 style forward (bf16 / f16 on tensor cores for
//!   D = 32, 64, 128; f32 on CUDA cores for D ≤ 256), every mask and bias of the cpu backend,
//!   GQA, both layouts, optional log-sum-exp (see [`attention`]).
//! - [`MergeKernel`]: ToMe bipartite matching (plans equal to the cpu backend's), merge (sum,
//!   mean, size-weighted) and unmerge on device buffers (see [`merge`]).
//!
//! Nothing here panics without a GPU: every entry point returns a [`Result`].
//!
//! ```no_run
//! use vistok::cuda::{Gpu, PatchifyKernel};
//! use vistok::{Layout, PatchConfig, Patchify};
//! let gpu = match Gpu::new(0) {
//!     Ok(gpu) => gpu,
//!     Err(e) => { eprintln!("no GPU: {e}"); return Ok(()); }
//! };
//! let plan = Patchify::new(&PatchConfig::image(Layout::ChannelsFirst, 16, 16), &[2, 3, 32, 32])?;
//! let kernel = PatchifyKernel::new(&gpu, &plan)?;
//! let tokens: Vec<f32> = kernel.forward_host(&vec![7u8; 2 * 3 * 32 * 32])?;
//! assert!(tokens.iter().all(|&t| t == 7.0));
//! # Ok::<(), vistok::Error>(())
//! ```

pub mod argmin;
pub mod attention;
pub mod fsq;
pub mod lfq;
pub mod merge;
pub mod patchify;

pub use argmin::CodebookGpu;
pub use attention::AttentionKernel;
pub use fsq::FsqKernel;
pub use lfq::{DeferredCheck, LfqKernel};
pub use merge::{DevicePlan, MergeKernel};
pub use patchify::PatchifyKernel;

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use cudarc::driver::{result, sys, CudaContext, CudaStream, DeviceRepr, DriverError};

use crate::error::{Error, Family, Result};

/// Maps a driver error to [`Error::Driver`], naming what was being done.
pub(crate) fn driver_error(what: &str, e: DriverError) -> Error {
    Error::Driver(format!("{what}: {e}"))
}

/// Number of CUDA devices, or [`Error::NoCudaDriver`] when `libcuda` cannot be loaded.
///
/// ```
/// match vistok::cuda::device_count() {
///     Ok(n) => println!("{n} CUDA devices"),
///     Err(e) => println!("no CUDA: {e}"),
/// }
/// ```
pub fn device_count() -> Result<usize> {
    // SAFETY: only tries to dlopen libcuda by its usual names; no CUDA call is made. cudarc
    // panics on the first driver call when the library is absent, so this check must come first.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoCudaDriver);
    }
    match CudaContext::device_count() {
        Ok(n) => Ok(usize::try_from(n).unwrap_or(0)),
        // cuInit reports a driver without devices as NO_DEVICE.
        Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => Ok(0),
        Err(e) => Err(driver_error("cuInit / cuDeviceGetCount", e)),
    }
}

/// A loaded PTX module; unloaded when the last [`Function`] using it is dropped.
struct Module {
    raw: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

// SAFETY: a CUmodule handle may be used from any thread once its context is current there;
// every use below binds `ctx` first, and the handle is never mutated after loading.
unsafe impl Send for Module {}
// SAFETY: as for Send; the driver's module calls are thread-safe.
unsafe impl Sync for Module {}

impl Drop for Module {
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: `raw` came from cuModuleLoadData in this context and is unloaded only here,
        // after every Function (which holds an Arc<Module>) is gone.
        self.ctx.record_err(unsafe { result::module::unload(self.raw) });
    }
}

/// A kernel entry point of a loaded module. Cheap to clone; keeps its module loaded.
#[derive(Clone)]
pub struct Function {
    raw: sys::CUfunction,
    name: String,
    module: Arc<Module>,
}

// SAFETY: a CUfunction handle is immutable and usable from any thread with its context bound;
// `launch` binds the context of the module first.
unsafe impl Send for Function {}
// SAFETY: as for Send.
unsafe impl Sync for Function {}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function").field("name", &self.name).finish()
    }
}

impl Function {
    /// The entry point's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Launches the entry with one by-value parameter block `params` on `stream`.
    ///
    /// # Safety
    /// `P` must have exactly the layout the entry declares (`.param .align 8 .b8 p[N]`,
    /// N = `size_of::<P>()`), and every pointer inside `params` must be valid for every
    /// access the kernel makes with these values, until the launch completes on `stream`.
    pub(crate) unsafe fn launch<P: DeviceRepr>(
        &self,
        stream: &CudaStream,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        params: &P,
    ) -> Result<()> {
        // SAFETY: the caller's contract, unchanged; no dynamic shared memory.
        unsafe { self.launch_shared(stream, grid, block, 0, params) }
    }

    /// Lets launches of this entry use up to `bytes` of dynamic shared memory (above the
    /// driver's default of 48 KB): `cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)`.
    ///
    /// Errors: [`Error::Driver`] when the device cannot give that much to one block.
    pub(crate) fn allow_dynamic_shared(&self, bytes: u32) -> Result<()> {
        let v = i32::try_from(bytes).map_err(|_| Error::Invalid {
            family: Family::Cuda,
            msg: format!("{bytes} bytes of dynamic shared memory for {}", self.name),
        })?;
        self.module.ctx.bind_to_thread().map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        // SAFETY: `raw` is a live function of a module loaded in the now-current context.
        unsafe {
            result::function::set_function_attribute(
                self.raw,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                v,
            )
        }
        .map_err(|e| driver_error(&format!("allowing {bytes} bytes of dynamic shared memory for {}", self.name), e))
    }

    /// [`launch`](Self::launch) with `shared` bytes of dynamic shared memory (above 48 KB only
    /// after [`allow_dynamic_shared`](Self::allow_dynamic_shared)).
    ///
    /// # Safety
    /// As for [`launch`](Self::launch).
    pub(crate) unsafe fn launch_shared<P: DeviceRepr>(
        &self,
        stream: &CudaStream,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared: u32,
        params: &P,
    ) -> Result<()> {
        if stream.context().as_ref() != self.module.ctx.as_ref() {
            return Err(Error::Invalid {
                family: Family::Cuda,
                msg: format!("kernel {} launched on a stream of another context", self.name),
            });
        }
        stream.context().bind_to_thread().map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        // cuLaunchKernel reads parameter i through kernelParams[i]; the driver copies the
        // parameter block before returning, so `params` only has to live through this call.
        let mut args = [params as *const P as *mut c_void];
        // SAFETY: `raw` is a function of a module loaded in this stream's context (checked
        // above); the parameter block layout and pointer validity are the caller's contract.
        unsafe { result::launch_kernel(self.raw, grid, block, shared, stream.cu_stream(), &mut args) }
            .map_err(|e| driver_error(&format!("launching {}", self.name), e))
    }
}

struct Inner {
    ctx: Arc<CudaContext>,
    sm_count: u32,
    modules: Mutex<HashMap<&'static str, Arc<Module>>>,
    functions: Mutex<HashMap<(&'static str, String), Function>>,
}

/// One CUDA device: its (primary) context, default stream and module cache. Cheap to clone.
///
/// ```
/// // Never panics, with or without a GPU.
/// match vistok::cuda::Gpu::new(0) {
///     Ok(gpu) => println!("GPU {}", gpu.ordinal()),
///     Err(e) => println!("skipped: {e}"),
/// }
/// ```
#[derive(Clone)]
pub struct Gpu {
    inner: Arc<Inner>,
    /// The stream of the `*_host` helpers and of the uploads made by the kernels' constructors:
    /// the context's default stream, or a caller's stream ([`Gpu::on_stream`]).
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("ordinal", &self.ordinal()).finish()
    }
}

impl Gpu {
    /// Opens device `ordinal`.
    ///
    /// Errors: [`Error::NoCudaDriver`] when `libcuda` cannot be loaded, [`Error::NoDevice`] when
    /// there is no device with this ordinal, [`Error::Driver`] for any other driver failure.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error("creating a context", e))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_error("cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)", e))?;
        let stream = ctx.default_stream();
        Ok(Gpu {
            inner: Arc::new(Inner {
                ctx,
                sm_count: u32::try_from(sms).unwrap_or(1).max(1),
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
            }),
            stream,
        })
    }

    /// This device with `stream` in place of its default stream: the kernels' constructors
    /// then upload their constants on `stream` (so that a kernel enqueued there later is
    /// ordered after the upload, and the constants' stream-ordered frees after the kernel).
    /// Shares the context and the module cache. Used by the C ABI, which runs on the caller's
    /// stream.
    ///
    /// Errors: [`Error::Invalid`] for a stream of another context.
    #[cfg_attr(not(feature = "capi"), allow(dead_code))]
    pub(crate) fn on_stream(&self, stream: Arc<CudaStream>) -> Result<Gpu> {
        if stream.context() != self.context() {
            return Err(Error::Invalid {
                family: Family::Cuda,
                msg: "stream belongs to another CUDA context than the device".into(),
            });
        }
        Ok(Gpu { inner: self.inner.clone(), stream })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ctx.ordinal()
    }

    /// Number of streaming multiprocessors (sizes the grids).
    pub fn sm_count(&self) -> u32 {
        self.inner.sm_count
    }

    /// The device context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// The context's default stream (used by the `*_host` helpers).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> Result<String> {
        self.inner.ctx.name().map_err(|e| driver_error("cuDeviceGetName", e))
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.inner.ctx.compute_capability().map_err(|e| driver_error("cuDeviceGetAttribute", e))
    }

    /// Waits for all work on the default stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_error("cuStreamSynchronize", e))
    }

    /// The entry `name` of the PTX module `module` (source `ptx`), loading the module on first
    /// use: each module is JIT-compiled at most once per context (while any `Gpu` using it
    /// lives). The module name identifies the PTX: one name, one source.
    ///
    /// Errors: [`Error::MissingKernel`] if the module has no such entry, [`Error::Driver`] if the
    /// driver rejects the PTX.
    pub fn function(&self, module: &'static str, ptx: &'static str, name: &str) -> Result<Function> {
        let key = (module, name.to_string());
        if let Some(f) = lock(&self.inner.functions).get(&key) {
            return Ok(f.clone());
        }
        let m = self.module(module, ptx)?;
        let cname = CString::new(name).map_err(|_| Error::MissingKernel { module, name: name.to_string() })?;
        m.ctx.bind_to_thread().map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        // SAFETY: `m.raw` is a live module of the now-current context.
        let raw = match unsafe { result::module::get_function(m.raw, cname) } {
            Ok(raw) => raw,
            Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_FOUND)) => {
                return Err(Error::MissingKernel { module, name: name.to_string() })
            }
            Err(e) => return Err(driver_error(&format!("cuModuleGetFunction({name})"), e)),
        };
        let f = Function { raw, name: name.to_string(), module: m };
        lock(&self.inner.functions).insert(key, f.clone());
        Ok(f)
    }

    fn module(&self, module: &'static str, ptx: &'static str) -> Result<Arc<Module>> {
        let mut mine = lock(&self.inner.modules);
        if let Some(m) = mine.get(module) {
            return Ok(m.clone());
        }
        // Another Gpu on the same (primary) context may have loaded it already. The process-wide
        // map holds weak references, keyed by the context handle: a module keeps its context
        // retained, so a live entry can never belong to an older context at the same address.
        // Held across the load so that two threads never JIT the same module twice.
        let mut shared = lock(shared_modules());
        let key = (self.inner.ctx.cu_ctx() as usize, module);
        if let Some(m) = shared.get(&key).and_then(Weak::upgrade) {
            mine.insert(module, m.clone());
            return Ok(m);
        }
        let src = CString::new(ptx).map_err(|_| Error::Invalid {
            family: Family::Cuda,
            msg: format!("PTX of module {module} contains a NUL byte"),
        })?;
        self.inner.ctx.bind_to_thread().map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        // SAFETY: `src` is a NUL-terminated PTX text that outlives the call (the driver
        // compiles it before returning); the context is current on this thread.
        let raw = unsafe { result::module::load_data(src.as_ptr() as *const c_void) }
            .map_err(|e| driver_error(&format!("loading PTX module {module}"), e))?;
        let m = Arc::new(Module { raw, ctx: self.inner.ctx.clone() });
        shared.retain(|_, w| w.strong_count() > 0);
        shared.insert(key, Arc::downgrade(&m));
        mine.insert(module, m.clone());
        Ok(m)
    }
}

type SharedModules = Mutex<HashMap<(usize, &'static str), Weak<Module>>>;

/// Modules loaded by any [`Gpu`] of this process, by (context handle, module name).
fn shared_modules() -> &'static SharedModules {
    static SHARED: OnceLock<SharedModules> = OnceLock::new();
    SHARED.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Locks a cache, recovering from poisoning (the caches hold no invariant a panic can break).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
