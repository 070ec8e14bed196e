//! The CUDA side of the C entry points: every argument is checked on the host first (handles,
//! dtypes, dims, pointers), then the device and the caller's stream are taken, then the kernels
//! of [`crate::cuda`] run on the caller's pointers.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{sys, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};

use super::super::attention::{attention_from_options, seq_lens, VistokAttentionOptions};
use super::super::merge::{
    VISTOK_MERGE_CLASS_TOKEN, VISTOK_MERGE_DISTILL_TOKEN, VISTOK_MERGE_KEEP_ORIGINAL_ORDER, VISTOK_MERGE_MODE_MEAN,
    VISTOK_MERGE_MODE_SUM, VISTOK_MERGE_TENSOR_CORES,
};
use super::super::{
    dims as read_dims, dtype as read_dtype, handle, new_handle, numel, AnyCodebook, CError, CResult, VistokCodebook,
    VistokDType, VistokFsq, VistokLfq, VistokMergePlan, VistokPatchify, VistokStatus,
};
use super::{VistokCudaCodebook, VistokCudaDevice, VISTOK_CUDA_TENSOR_CORES};
use crate::attention::{Bias, Mask};
use crate::cuda::{
    driver_error, AttentionKernel, CodebookGpu, DeferredCheck, FsqKernel, Gpu, LfqKernel, MergeKernel, PatchifyKernel,
};
use crate::{Attention, DType, Float, MatchConfig, MergeMode, View};

/// Runs `$body` with `$T` the float type of `$dt` (`u8` is reported as unsupported).
macro_rules! with_float {
    ($dt:expr, $T:ident, $body:block) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = crate::f16;
                $body
            }
            DType::BF16 => {
                type $T = crate::bf16;
                $body
            }
            DType::U8 => Err(CError::unsupported_dtype("buffer", DType::U8)),
        }
    };
}

/// Runs `$body` with `$T` the element type of `$dt`.
macro_rules! with_element {
    ($dt:expr, $T:ident, $body:block) => {
        match $dt {
            DType::U8 => {
                type $T = u8;
                $body
            }
            other => with_float!(other, $T, $body),
        }
    };
}

/// A buffer argument as the C caller passed it: a device address and its dims.
#[derive(Clone, Copy)]
pub(super) struct Arg {
    pub ptr: *const c_void,
    pub dims: *const usize,
    pub rank: usize,
}

/// A checked device buffer: a non-null, aligned address (0 only when empty) and its element
/// count, whose byte size does not overflow the address space.
#[derive(Clone, Copy, Debug)]
struct Buf {
    addr: u64,
    len: usize,
}

impl Buf {
    /// The buffer as a cudarc device slice of `T` on `stream` (`T` must be the element type
    /// it was checked for).
    fn on<T>(self, stream: &Arc<CudaStream>) -> DevBuf<T> {
        DevBuf { addr: self.addr, len: self.len, stream: stream.clone(), _t: PhantomData }
    }
}

/// A caller's device memory seen through cudarc's buffer traits. vistok never allocates,
/// frees or tracks it: ordering is the caller's stream, so `device_ptr` records no event.
struct DevBuf<T> {
    addr: u64,
    len: usize,
    stream: Arc<CudaStream>,
    _t: PhantomData<fn() -> T>,
}

impl<T> DeviceSlice<T> for DevBuf<T> {
    fn len(&self) -> usize {
        self.len
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for DevBuf<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.addr, SyncOnDrop::Record(None))
    }
}

impl<T> DevicePtrMut<T> for DevBuf<T> {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.addr, SyncOnDrop::Record(None))
    }
}

fn shape(msg: String) -> CError {
    CError::Other(VistokStatus::Shape, msg)
}

/// A float dtype argument.
fn float(value: VistokDType, what: &str) -> CResult<DType> {
    match read_dtype(value, what)? {
        DType::U8 => Err(CError::unsupported_dtype(what, DType::U8)),
        t => Ok(t),
    }
}

/// Reads the dims of `arg`.
///
/// # Safety
/// A non-null `arg.dims` must be valid for `arg.rank` reads.
unsafe fn dims_of<'a>(arg: &Arg, what: &str) -> CResult<&'a [usize]> {
    // SAFETY: forwarded contract.
    unsafe { read_dims(arg.dims, arg.rank, &format!("{what}_dims")) }
}

fn expect(what: &str, got: &[usize], want: &[usize]) -> CResult {
    if got != want {
        return Err(shape(format!("{what} dims {got:?}, expected {want:?}")));
    }
    Ok(())
}

/// `N` of dims `[N, last]`.
fn rows(what: &str, dims: &[usize], last: usize) -> CResult<usize> {
    match dims {
        &[n, l] if l == last => Ok(n),
        _ => Err(shape(format!("{what} dims {dims:?}, expected [N, {last}]"))),
    }
}

/// Checks a device buffer of `dims` elements of `elem` bytes at `ptr`.
fn buffer(ptr: *const c_void, dims: &[usize], elem: usize, what: &str) -> CResult<Buf> {
    let len = numel(dims, what)?;
    let end = len
        .checked_mul(elem)
        .and_then(|b| u64::try_from(b).ok())
        .and_then(|b| (ptr as u64).checked_add(b))
        .filter(|_| len <= isize::MAX as usize);
    if end.is_none() {
        return Err(CError::Other(
            VistokStatus::Overflow,
            format!("{what}: {len} elements of {elem} bytes overflow the address space"),
        ));
    }
    if ptr.is_null() {
        return if len == 0 { Ok(Buf { addr: 0, len }) } else { Err(CError::null(what)) };
    }
    if !(ptr as usize).is_multiple_of(elem) {
        return Err(CError::Other(VistokStatus::Alignment, format!("{what} must be aligned to {elem} bytes")));
    }
    Ok(Buf { addr: ptr as u64, len })
}

/// The device of a handle.
///
/// # Safety
/// A non-null `device` must be a live handle.
unsafe fn device<'a>(device: *const VistokCudaDevice) -> CResult<&'a Gpu> {
    // SAFETY: forwarded contract.
    Ok(&unsafe { handle(device, "device") }?.gpu)
}

/// The caller's stream on `gpu`, checked to belong to its context, and `gpu` with that stream
/// for the kernels' uploads.
///
/// # Safety
/// `raw` must be null, `CU_STREAM_LEGACY`, `CU_STREAM_PER_THREAD` or a live stream, alive
/// until the work enqueued by this call has been enqueued.
unsafe fn caller_stream(gpu: &Gpu, raw: *mut c_void) -> CResult<(Gpu, Arc<CudaStream>)> {
    let ctx = gpu.context();
    ctx.bind_to_thread().map_err(|e| driver_error("cuCtxSetCurrent", e))?;
    let cu = raw as sys::CUstream;
    // The special handles (legacy and per-thread default streams) belong to the current context.
    if !cu.is_null() && raw as usize != 1 && raw as usize != 2 {
        let mut owner: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `cu` is a live stream (the caller's contract); `owner` is a valid out-pointer.
        let r = unsafe { sys::cuStreamGetCtx(cu, &mut owner) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(CError::invalid(format!("stream: cuStreamGetCtx failed ({r:?}): not a live CUDA stream")));
        }
        if owner != ctx.cu_ctx() {
            return Err(CError::invalid(format!(
                "stream belongs to another CUDA context than device {}'s primary context",
                gpu.ordinal()
            )));
        }
    }
    // SAFETY: a stream of this context (checked above, or a special handle of the current one),
    // alive for this call (the caller's contract); the wrapper does not destroy it, and every
    // use of it ends with this call (temporaries are freed stream-ordered on it before return).
    let stream = unsafe { ctx.wrap_borrowed_stream(cu) };
    Ok((gpu.on_stream(stream.clone())?, stream))
}

/// Patchify (`forward`) or unpatchify on the caller's buffers.
///
/// # Safety
/// The contract of `vistok_cuda_patchify_forward` / `_inverse`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn patchify(
    device_h: *const VistokCudaDevice,
    stream: *mut c_void,
    plan: *const VistokPatchify,
    src: Arg,
    src_dtype: VistokDType,
    dst: Arg,
    dst_dtype: VistokDType,
    forward: bool,
) -> CResult {
    // SAFETY: the caller's contract on every pointer, here and below.
    let plan = &unsafe { handle(plan, "plan") }?.0;
    let (sname, dname) = if forward { ("image", "tokens") } else { ("tokens", "image") };
    let st = read_dtype(src_dtype, &format!("{sname}_dtype"))?;
    let dt = read_dtype(dst_dtype, &format!("{dname}_dtype"))?;
    let (image_t, tokens_t) = if forward { (st, dt) } else { (dt, st) };
    if tokens_t == DType::U8 {
        return Err(CError::unsupported_dtype("tokens_dtype", DType::U8));
    }
    // SAFETY: as above.
    let (sd, dd) = unsafe { (dims_of(&src, sname)?, dims_of(&dst, dname)?) };
    let tokens_dims = plan.tokens_dims();
    let (want_s, want_d): (&[usize], &[usize]) =
        if forward { (plan.image_dims(), &tokens_dims) } else { (&tokens_dims, plan.image_dims()) };
    expect(sname, sd, want_s)?;
    expect(dname, dd, want_d)?;
    let sb = buffer(src.ptr, sd, st.size(), sname)?;
    let db = buffer(dst.ptr, dd, dt.size(), dname)?;
    // SAFETY: as above.
    let (g, s) = unsafe { caller_stream(device(device_h)?, stream)? };
    if sb.len == 0 || db.len == 0 {
        return Ok(()); // nothing to read or write
    }
    let k = PatchifyKernel::new(&g, plan)?;
    with_element!(image_t, I, {
        with_float!(tokens_t, O, {
            if forward {
                k.forward::<I, O>(&s, &sb.on(&s), &mut db.on(&s))?;
            } else {
                k.inverse::<O, I>(&s, &sb.on(&s), &mut db.on(&s))?;
            }
            Ok(())
        })
    })
}

/// LFQ encode (`z` → `ids`) or decode (`ids` → `codes`); `dtype` is that of `z` / `codes`;
/// `wait`: read the kernel's status word (NaN, bad id) and report it.
///
/// # Safety
/// The contract of `vistok_cuda_lfq_encode` / `_decode` (and their `_async` forms).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn lfq(
    device_h: *const VistokCudaDevice,
    stream: *mut c_void,
    lfq: *const VistokLfq,
    input: Arg,
    output: Arg,
    dtype: VistokDType,
    encode: bool,
    wait: bool,
) -> CResult {
    // SAFETY: the caller's contract on every pointer, here and below.
    let q = &unsafe { handle(lfq, "lfq") }?.0;
    let fname = if encode { "z" } else { "codes" };
    let t = float(dtype, &format!("{fname}_dtype"))?;
    let (fa, ia) = if encode { (&input, &output) } else { (&output, &input) };
    // SAFETY: as above.
    let (fd, id) = unsafe { (dims_of(fa, fname)?, dims_of(ia, "ids")?) };
    let (first, second) = if encode { ((fname, fd), ("ids", id)) } else { (("ids", id), (fname, fd)) };
    let last = |name| if name == "ids" { q.groups() } else { q.channels() };
    let n = rows(first.0, first.1, last(first.0))?;
    expect(second.0, second.1, &[n, last(second.0)])?;
    let fb = buffer(fa.ptr, fd, t.size(), fname)?;
    let ib = buffer(ia.ptr, id, 4, "ids")?;
    // SAFETY: as above.
    let (g, s) = unsafe { caller_stream(device(device_h)?, stream)? };
    let k = LfqKernel::new(&g, q)?;
    with_float!(t, T, {
        // Not waiting: the status word is armed and written but never read (freed
        // stream-ordered with the check).
        let mut check = DeferredCheck::new(&s)?;
        if encode {
            k.encode_deferred::<T>(&s, &fb.on(&s), &mut ib.on(&s), &mut check)?;
        } else {
            k.decode_deferred::<T>(&s, &ib.on(&s), &mut fb.on(&s), &mut check)?;
        }
        if wait {
            check.result()?;
        }
        Ok(())
    })
}

/// FSQ encode (`z` → `ids`) or decode (`ids` → `codes`); `dtype` is that of `z` / `codes`;
/// `wait`: read the kernel's status word (NaN, bad id) and report it.
///
/// # Safety
/// The contract of `vistok_cuda_fsq_encode` / `_decode` (and their `_async` forms).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn fsq(
    device_h: *const VistokCudaDevice,
    stream: *mut c_void,
    fsq: *const VistokFsq,
    input: Arg,
    output: Arg,
    dtype: VistokDType,
    encode: bool,
    wait: bool,
) -> CResult {
    // SAFETY: the caller's contract on every pointer, here and below.
    let q = &unsafe { handle(fsq, "fsq") }?.0;
    let fname = if encode { "z" } else { "codes" };
    let t = float(dtype, &format!("{fname}_dtype"))?;
    let (fa, ia) = if encode { (&input, &output) } else { (&output, &input) };
    // SAFETY: as above.
    let (fd, id) = unsafe { (dims_of(fa, fname)?, dims_of(ia, "ids")?) };
    if encode {
        let n = rows(fname, fd, q.dim())?;
        expect("ids", id, &[n])?;
    } else {
        let n = match id {
            &[n] => n,
            _ => return Err(shape(format!("ids dims {id:?}, expected [N]"))),
        };
        expect(fname, fd, &[n, q.dim()])?;
    }
    let fb = buffer(fa.ptr, fd, t.size(), fname)?;
    let ib = buffer(ia.ptr, id, 4, "ids")?;
    // SAFETY: as above.
    let (g, s) = unsafe { caller_stream(device(device_h)?, stream)? };
    let k = FsqKernel::new(&g, q)?;
    with_float!(t, T, {
        // Not waiting: the status word is armed and written but never read (freed
        // stream-ordered with the check).
        let mut check = DeferredCheck::new(&s)?;
        if encode {
            k.encode_deferred::<T>(&s, &fb.on(&s), &mut ib.on(&s), &mut check)?;
        } else {
            k.decode_deferred::<T>(&s, &ib.on(&s), &mut fb.on(&s), &mut check)?;
        }
        if wait {
            check.result()?;
        }
        Ok(())
    })
}

/// A codebook on the device, of any float dtype.
#[derive(Debug)]
pub(crate) enum AnyCodebookGpu {
    F32(CodebookGpu<f32>),
    F16(CodebookGpu<crate::f16>),
    BF16(CodebookGpu<crate::bf16>),
}

impl AnyCodebookGpu {
    pub(crate) fn gpu(&self) -> &Gpu {
        match self {
            AnyCodebookGpu::F32(c) => c.gpu(),
            AnyCodebookGpu::F16(c) => c.gpu(),
            AnyCodebookGpu::BF16(c) => c.gpu(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            AnyCodebookGpu::F32(_) => DType::F32,
            AnyCodebookGpu::F16(_) => DType::F16,
            AnyCodebookGpu::BF16(_) => DType::BF16,
        }
    }

    fn dim(&self) -> usize {
        match self {
            AnyCodebookGpu::F32(c) => c.dim(),
            AnyCodebookGpu::F16(c) => c.dim(),
            AnyCodebookGpu::BF16(c) => c.dim(),
        }
    }
}

/// # Safety
/// The contract of `vistok_cuda_codebook_new`.
pub(super) unsafe fn codebook_new(
    device_h: *const VistokCudaDevice,
    codebook: *const VistokCodebook,
    flags: u32,
    out: *mut *mut VistokCudaCodebook,
) -> CResult {
    if out.is_null() {
        return Err(CError::null("out"));
    }
    // SAFETY: the caller's contract on every pointer, here and below.
    let cb = &unsafe { handle(codebook, "codebook") }?.0;
    if flags & !VISTOK_CUDA_TENSOR_CORES != 0 {
        return Err(CError::invalid(format!("flags: unknown bits {:#x}", flags & !VISTOK_CUDA_TENSOR_CORES)));
    }
    let tc = flags & VISTOK_CUDA_TENSOR_CORES != 0;
    // SAFETY: as above.
    let gpu = unsafe { device(device_h) }?;
    // The copies run on the device's default (legacy) stream; waiting for it makes the codebook
    // visible to every stream.
    let any = match cb {
        AnyCodebook::F32(c) => AnyCodebookGpu::F32(CodebookGpu::new(gpu, c)?.with_tensor_cores(tc)?),
        AnyCodebook::F16(c) => AnyCodebookGpu::F16(CodebookGpu::new(gpu, c)?.with_tensor_cores(tc)?),
        AnyCodebook::BF16(c) => AnyCodebookGpu::BF16(CodebookGpu::new(gpu, c)?.with_tensor_cores(tc)?),
    };
    gpu.synchronize()?;
    // SAFETY: as above (`out` checked non-null).
    unsafe { new_handle(out, VistokCudaCodebook { cb: any }, "out") }
}

fn argmin_on<T: Float>(
    c: &CodebookGpu<T>,
    s: &Arc<CudaStream>,
    x: Buf,
    idx: Buf,
    dist: Option<Buf>,
) -> crate::Result<()> {
    let mut dist = dist.map(|d| d.on::<f32>(s));
    c.argmin_into(s, &x.on::<T>(s), &mut idx.on::<u32>(s), dist.as_mut())
}

/// # Safety
/// The contract of `vistok_cuda_argmin`.
pub(super) unsafe fn argmin(
    codebook: *const VistokCudaCodebook,
    stream: *mut c_void,
    x: Arg,
    x_dtype: VistokDType,
    indices: Arg,
    dist: *mut c_void,
) -> CResult {
    // SAFETY: the caller's contract on every pointer, here and below.
    let cb = &unsafe { handle(codebook, "codebook") }?.cb;
    let t = read_dtype(x_dtype, "x_dtype")?;
    if t != cb.dtype() {
        // The host entry point's status for the same mistake.
        return Err(CError::Other(
            VistokStatus::Unsupported,
            format!("x: dtype {} differs from the codebook's {}", t.name(), cb.dtype().name()),
        ));
    }
    // SAFETY: as above.
    let (xd, id) = unsafe { (dims_of(&x, "x")?, dims_of(&indices, "indices")?) };
    let d = cb.dim();
    match xd.split_last() {
        // At least one leading dim, as on the host: rank-0 indices are refused.
        Some((&last, lead)) if last == d && !lead.is_empty() => expect("indices", id, lead)?,
        _ => return Err(shape(format!("x dims {xd:?}, expected [..., {d}]"))),
    }
    let xb = buffer(x.ptr, xd, t.size(), "x")?;
    let ib = buffer(indices.ptr, id, 4, "indices")?;
    let db = if dist.is_null() { None } else { Some(buffer(dist, id, 4, "dist")?) };
    // SAFETY: as above.
    let (_, s) = unsafe { caller_stream(cb.gpu(), stream)? };
    match cb {
        AnyCodebookGpu::F32(c) => argmin_on(c, &s, xb, ib, db)?,
        AnyCodebookGpu::F16(c) => argmin_on(c, &s, xb, ib, db)?,
        AnyCodebookGpu::BF16(c) => argmin_on(c, &s, xb, ib, db)?,
    }
    Ok(())
}

fn lookup_on<T: Float>(c: &CodebookGpu<T>, s: &Arc<CudaStream>, idx: Buf, out: Buf, ot: DType) -> CResult {
    with_float!(ot, O, {
        c.lookup::<O>(s, &idx.on::<u32>(s), &mut out.on::<O>(s))?;
        Ok(())
    })
}

/// # Safety
/// The contract of `vistok_cuda_lookup`.
pub(super) unsafe fn lookup(
    codebook: *const VistokCudaCodebook,
    stream: *mut c_void,
    indices: Arg,
    out: Arg,
    out_dtype: VistokDType,
) -> CResult {
    // SAFETY: the caller's contract on every pointer, here and below.
    let cb = &unsafe { handle(codebook, "codebook") }?.cb;
    let ot = float(out_dtype, "out_dtype")?;
    // SAFETY: as above.
    let (id, od) = unsafe { (dims_of(&indices, "indices")?, dims_of(&out, "out")?) };
    if id.is_empty() {
        return Err(shape("indices: rank 0 (at least one dim, as on the host)".into()));
    }
    let mut want = id.to_vec();
    want.push(cb.dim());
    expect("out", od, &want)?;
    let ib = buffer(indices.ptr, id, 4, "indices")?;
    let ob = buffer(out.ptr, od, ot.size(), "out")?;
    // SAFETY: as above.
    let (_, s) = unsafe { caller_stream(cb.gpu(), stream)? };
    match cb {
        AnyCodebookGpu::F32(c) => lookup_on(c, &s, ib, ob, ot),
        AnyCodebookGpu::F16(c) => lookup_on(c, &s, ib, ob, ot),
        AnyCodebookGpu::BF16(c) => lookup_on(c, &s, ib, ob, ot),
    }
}

/// The buffer arguments of `vistok_cuda_attention_forward`.
pub(super) struct AttentionArgs {
    pub dtype: VistokDType,
    pub q: *const c_void,
    pub q_dims: *const usize,
    pub q_rank: usize,
    pub k: *const c_void,
    pub v: *const c_void,
    pub kv_dims: *const usize,
    pub kv_rank: usize,
    pub out: *mut c_void,
    pub lse: *mut c_void,
}

/// # Safety
/// The contract of `vistok_cuda_attention_forward`.
pub(super) unsafe fn attention(
    device_h: *const VistokCudaDevice,
    stream: *mut c_void,
    options: *const VistokAttentionOptions,
    a: AttentionArgs,
) -> CResult {
    let t = float(a.dtype, "dtype")?;
    // SAFETY: the caller's contract on every pointer, here and below.
    let (qd, kd) = unsafe { (read_dims(a.q_dims, a.q_rank, "q_dims")?, read_dims(a.kv_dims, a.kv_rank, "kv_dims")?) };
    // Nq / Nk size the segment ids (0 for a wrong rank, which the validation below reports).
    // SAFETY: as above.
    let (nq, nk) = unsafe { seq_lens(options, qd, kd) };
    // SAFETY: as above.
    let caller = unsafe { attention_from_options(options, nq, nk) }?;
    // The kernel's constructor uploads the bias and segment ids with cuMemcpyHtoDAsync on the
    // caller's stream. From pinned caller memory that copy could run after we return, breaking
    // "host pointers are read only during the call"; from these pageable copies the driver
    // stages the data before the call returns.
    let segments = match caller.mask {
        Mask::Segments { q, k } => Some((q.to_vec(), k.to_vec())),
        _ => None,
    };
    let bias = match caller.bias {
        Bias::Key(b) | Bias::Full(b) => Some((b.data().to_vec(), b.dims().to_vec())),
        Bias::None => None,
    };
    let mut attn: Attention<'_> = caller;
    if let Some((q, k)) = &segments {
        attn.mask = Mask::Segments { q, k };
    }
    if let Some((data, dims)) = &bias {
        let view = View::new(data, dims)?;
        attn.bias = if matches!(caller.bias, Bias::Key(_)) { Bias::Key(view) } else { Bias::Full(view) };
    }
    let p = crate::cuda::attention::validate(&attn, qd, kd)?;
    crate::cuda::attention::kernel_name(t, p.d)?;
    let es = t.size();
    let qb = buffer(a.q, qd, es, "q")?;
    let kb = buffer(a.k, kd, es, "k")?;
    let vb = buffer(a.v, kd, es, "v")?;
    let ob = buffer(a.out, qd, es, "out")?;
    let lb = if a.lse.is_null() { None } else { Some(buffer(a.lse, &[p.b, p.h, p.nq], 4, "lse")?) };
    // SAFETY: as above.
    let (g, s) = unsafe { caller_stream(device(device_h)?, stream)? };
    let k = AttentionKernel::new(&g, &attn, t, qd, kd)?;
    with_float!(t, T, {
        // Empty K / V (Nk = 0) point into a small zeroed allocation, as in the host helpers, so
        // the kernel never gets a null base (it reads nothing there).
        let dummy = match kb.len == 0 && qb.len > 0 {
            true => Some(s.alloc_zeros::<T>(8).map_err(|e| driver_error("allocating an empty K / V", e))?),
            false => None,
        };
        let guard = dummy.as_ref().map(|d| d.device_ptr(&s));
        let base = |b: Buf| match &guard {
            Some((addr, _)) if b.len == 0 => Buf { addr: *addr, len: 0 },
            _ => b,
        };
        let (q, kk, v, mut o) = (qb.on::<T>(&s), base(kb).on::<T>(&s), base(vb).on::<T>(&s), ob.on::<T>(&s));
        match lb {
            Some(l) => k.forward_lse(&s, &q, &kk, &v, &mut o, &mut l.on::<f32>(&s))?,
            None => k.forward(&s, &q, &kk, &v, &mut o)?,
        }
        Ok(())
    })
}

/// # Safety
/// The contract of `vistok_cuda_merge_plan`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn merge_plan(
    device_h: *const VistokCudaDevice,
    stream: *mut c_void,
    metric: Arg,
    dtype: VistokDType,
    r: usize,
    flags: u32,
    out: *mut *mut VistokMergePlan,
) -> CResult {
    if out.is_null() {
        return Err(CError::null("out"));
    }
    let t = float(dtype, "metric_dtype")?;
    let known = VISTOK_MERGE_CLASS_TOKEN
        | VISTOK_MERGE_DISTILL_TOKEN
        | VISTOK_MERGE_KEEP_ORIGINAL_ORDER
        | VISTOK_MERGE_TENSOR_CORES;
    if flags & !known != 0 {
        return Err(CError::invalid(format!("flags: unknown bits {:#x}", flags & !known)));
    }
    // SAFETY: the caller's contract on every pointer, here and below.
    let md = unsafe { dims_of(&metric, "metric") }?;
    let dims: [usize; 3] = match *md {
        [b, n, c] if n >= 2 && c > 0 => [b, n, c],
        [_, n, _] if n < 2 => return Err(shape(format!("metric has N = {n} tokens, need at least 2"))),
        [_, _, _] => return Err(shape("metric has C = 0 channels: cosine similarity is undefined".into())),
        _ => return Err(shape(format!("metric dims {md:?}, expected [B, N, C]"))),
    };
    let mb = buffer(metric.ptr, md, t.size(), "metric")?;
    let cfg = MatchConfig::new(r)
        .class_token(flags & VISTOK_MERGE_CLASS_TOKEN != 0)
        .distill_token(flags & VISTOK_MERGE_DISTILL_TOKEN != 0)
        .keep_original_order(flags & VISTOK_MERGE_KEEP_ORIGINAL_ORDER != 0);
    // SAFETY: as above.
    let (g, s) = unsafe { caller_stream(device(device_h)?, stream)? };
    let k = MergeKernel::new(&g)?.with_tensor_cores(flags & VISTOK_MERGE_TENSOR_CORES != 0)?;
    let plan = with_float!(t, T, { Ok(k.plan::<T>(&s, &mb.on(&s), dims, &cfg)?) })?;
    // SAFETY: as above (`out` checked non-null).
    unsafe { new_handle(out, VistokMergePlan(plan), "out") }
}

/// What [`merge`] applies.
pub(super) enum MergeOp {
    /// Sum or mean (`VISTOK_MERGE_MODE_*`).
    Merge(u32),
    /// Size-weighted, with the sizes buffers.
    Weighted { sizes: *const c_void, out_sizes: *mut c_void },
    /// Unmerge.
    Unmerge,
}

/// # Safety
/// The contract of `vistok_cuda_merge` / `_merge_weighted` / `_unmerge`.
pub(super) unsafe fn merge(
    device_h: *const VistokCudaDevice,
    stream: *mut c_void,
    plan: *const VistokMergePlan,
    op: MergeOp,
    input: Arg,
    output: Arg,
    dtype: VistokDType,
) -> CResult {
    // SAFETY: the caller's contract on every pointer, here and below.
    let plan = &unsafe { handle(plan, "plan") }?.0;
    let mode = match op {
        MergeOp::Merge(VISTOK_MERGE_MODE_SUM) => MergeMode::Sum,
        MergeOp::Merge(VISTOK_MERGE_MODE_MEAN) => MergeMode::Mean,
        MergeOp::Merge(m) => return Err(CError::invalid(format!("mode: unknown value {m}"))),
        _ => MergeMode::Sum, // unused
    };
    let t = float(dtype, "dtype")?;
    let (b, n, o) = (plan.batch(), plan.tokens(), plan.out_tokens());
    let (iname, in_rows, out_rows) = match op {
        MergeOp::Unmerge => ("y", o, n),
        _ => ("x", n, o),
    };
    // SAFETY: as above.
    let (id, od) = unsafe { (dims_of(&input, iname)?, dims_of(&output, "out")?) };
    let c = match id {
        &[bb, rr, c] if bb == b && rr == in_rows => c,
        _ => return Err(shape(format!("{iname} dims {id:?}, expected [{b}, {in_rows}, C]"))),
    };
    expect("out", od, &[b, out_rows, c])?;
    let ib = buffer(input.ptr, id, t.size(), iname)?;
    let ob = buffer(output.ptr, od, t.size(), "out")?;
    let sizes = match op {
        MergeOp::Weighted { sizes, out_sizes } => {
            Some((buffer(sizes, &[b, n], 4, "sizes")?, buffer(out_sizes, &[b, o], 4, "out_sizes")?))
        }
        _ => None,
    };
    if sizes.is_some() && c == 0 && b * o > 0 {
        return Err(CError::Other(
            VistokStatus::Unsupported,
            "merge_weighted with C = 0 channels on the GPU (use the host function)".into(),
        ));
    }
    // SAFETY: as above.
    let (g, s) = unsafe { caller_stream(device(device_h)?, stream)? };
    if b * n * c == 0 {
        return Ok(()); // nothing to read or write
    }
    let k = MergeKernel::new(&g)?;
    let dplan = k.upload(&s, plan)?;
    with_float!(t, T, {
        let (x, mut y) = (ib.on::<T>(&s), ob.on::<T>(&s));
        match sizes {
            Some((sb, osb)) => {
                k.merge_weighted_into(&s, &dplan, &x, &sb.on::<f32>(&s), &mut y, &mut osb.on::<f32>(&s))?
            }
            None if matches!(op, MergeOp::Unmerge) => k.unmerge(&s, &dplan, &x, &mut y)?,
            None => k.merge(&s, &dplan, &x, mode, &mut y)?,
        }
        Ok(())
    })
}
