//! Fused attention forward on the GPU: FlashAttention-2 style PTX from `kernels/gen_attention.py`.
//!
//! Contract: the one in [`crate::attention`] (shapes, both layouts, grouped-query heads, scale,
//! masks with the bottom-right alignment, key / full biases, the log-sum-exp, fully masked rows
//! giving zeros and `−∞`), on device buffers. An [`AttentionKernel`] is built once per
//! (options, dtype, shapes) on a [`Gpu`]: it validates everything the cpu backend validates,
//! uploads the bias and the segment ids once, and then runs on device buffers.
//!
//! Differences from the host backends, all documented here:
//! - Head dimensions: f16 / bf16 take `D ∈ {32, 64, 128}` (tensor cores), f32 any `D ≤ 256`;
//!   anything else is [`Error::Unsupported`] naming what. `Nq`, `Nk ≤ 2²⁹`, `B`, `H ≤ 65535`.
//! - Q, K, V are not scanned for NaN / ±∞ by the device entry points (that would be a second
//!   pass over the data); their output is then unspecified. The `*_host` helpers scan on the
//!   host first and return the cpu backend's [`Error::NonFinite`]. The bias is scanned once, at
//!   [`AttentionKernel::new`].
//! - Accuracy, judged as in `tests/attention.rs` (FlashAttention's rule: error against the f64
//!   oracle ≤ 2× the naive same-dtype error + a small absolute term): f16 / bf16 compute `Q·Kᵀ`
//!   and `P·V` on tensor cores (mma.sync, or wgmma on Hopper; f32 accumulation), the
//!   probabilities rounded to the input type
//!   for `P·V` as FlashAttention does, `2^x` from `ex2.approx` (≤ 2 ulp relative, PTX ISA) on
//!   logits pre-multiplied by `scale·log₂e`; f32 runs on CUDA cores with f32 fma and the same
//!   `ex2.approx` on `(s − m)·log₂e`. O is rounded to the input type once; the log-sum-exp is f32.
//! - Results are deterministic (no atomics; one CTA owns each output row).
//!
//! # Kernels
//! `kernels/attention.ptx`: `attention_{bf16,f16}_d{32,64,128}` and `attention_f32`
//! ([`KERNEL_NAMES`]), one parameter block ([`AttentionParams`]). Tensor-core entries: one CTA
//! of `16·warps` query rows (4 warps for D = 32 / 64, 8 for D = 128) per (query tile, head,
//! batch), key tiles of [`BN`] = 64 keys through XOR-swizzled shared memory (K and V one
//! buffer each, cp.async overlapped as in FlashAttention-2: 8 / 16 / 32 KiB), ldmatrix,
//! mma.sync m16n8k16, online softmax in registers. f32 entry: 4 warps × 4 rows, 16-key tiles.
//! Key tiles outside the causal / window band are never visited; with segment ids, tiles whose
//! smallest key id exceeds the block's largest query id are skipped.
//!
//! On a compute capability 9.0 GPU (H100, H200), f16 / bf16 with D = 64 or 128 run instead
//! `attention_wgmma_{bf16,f16}_d{64,128}` from the sm_90a module `kernels/attention_sm90.ptx`
//! ([`WGMMA_KERNEL_NAMES`]; same parameter block, masks and rounding): CTAs of two warpgroups
//! and [`WG_BM`] = 128 query rows, key tiles of [`WG_BN`] = 128 double-buffered in dynamic
//! shared memory ([`wgmma_shared_bytes`]: 81 / 161 KiB), `wgmma.mma_async` for both products
//! (P from registers, V read MN-major as FlashAttention-3 does);
//! [`AttentionKernel::with_wgmma`] picks either. Not yet run on a GPU: emulated only.
//!
//! ptxas 12.9 (`scripts/ptx-check.sh`, sm_90 / sm_80), no spills, no stack; the module's
//! register budget is 255 (`// vistok: max-regs 255`): bf16 / f16 D = 32: 149 / 150 registers,
//! 8 KiB shared; D = 64: 172 / 174, 16 KiB; D = 128: 221 / 224, 32 KiB; f32: 168, 33 KiB;
//! wgmma (sm_90a): D = 64: 218, D = 128: 254.
//!
//! ```no_run
//! use vistok::attention::{Attention, Mask};
//! use vistok::cuda::{attention::AttentionKernel, Gpu};
//! use vistok::{bf16, DType};
//! # fn main() -> vistok::Result<()> {
//! let gpu = Gpu::new(0)?;
//! let (b, h, n, d) = (1, 12, 1024, 64);
//! let a = Attention::new().mask(Mask::Causal);
//! let kernel = AttentionKernel::new(&gpu, &a, DType::BF16, &[b, h, n, d], &[b, h, n, d])?;
//! let stream = gpu.stream();
//! let x = stream.clone_htod(&vec![bf16::from_f32(0.5); b * h * n * d]).unwrap();
//! let mut o = stream.alloc_zeros::<bf16>(b * h * n * d).unwrap();
//! let mut lse = stream.alloc_zeros::<f32>(b * h * n).unwrap();
//! kernel.forward_lse(stream, &x, &x, &x, &mut o, &mut lse)?; // asynchronous
//! gpu.synchronize()?;
//! # Ok(()) }
//! ```

use std::mem::{offset_of, size_of};
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};

use super::patchify::Launch;
use super::{driver_error, Gpu};
use crate::attention::{check_finite, Attention, BiasSpec, Mask, Problem, QkvLayout};
use crate::dtype::{DType, Float};
use crate::error::{Error, Family, Result};

/// Name of the module in the [`Gpu`] cache.
pub const MODULE: &str = "attention";
/// The generated PTX (`kernels/attention.ptx`).
pub const PTX: &str = include_str!("../../kernels/attention.ptx");

// ---- Kernel traits and ABI constants: one place, checked against the PTX by tests. ----

/// Name of the Hopper-only module (`wgmma`, `.target sm_90a`) in the [`Gpu`] cache.
pub const MODULE_SM90: &str = "attention_sm90";
/// The generated PTX of the wgmma entries (`kernels/attention_sm90.ptx`), JIT-compiled only on
/// compute capability 9.0.
pub const PTX_SM90: &str = include_str!("../../kernels/attention_sm90.ptx");

/// Keys per tile of the tensor-core entries.
pub const BN: usize = 64;
/// Query rows per CTA of the wgmma entries (two warpgroups of 64).
pub const WG_BM: usize = 128;
/// Keys per tile of the wgmma entries.
pub const WG_BN: usize = 128;
/// Threads per CTA of the wgmma entries.
pub const WG_THREADS: u32 = 256;
/// Head dimensions of the wgmma entries.
pub const WG_HEAD_DIMS: [usize; 2] = [64, 128];
/// Dynamic shared memory a wgmma launch adds to align its base up to the 1024-byte swizzle atom.
pub const WG_SLACK: usize = 1024;
/// `(D, warps)` of the tensor-core entries (query rows per CTA: `16·warps`).
pub const TC_HEAD_DIMS: [(usize, u32); 3] = [(32, 4), (64, 4), (128, 8)];
/// Query rows per CTA of the f32 entry (4 warps × 4 rows).
pub const F32_BM: usize = 16;
/// Keys per tile of the f32 entry.
pub const F32_BN: usize = 16;
/// Threads per CTA of the f32 entry.
pub const F32_THREADS: u32 = 128;
/// The largest `D` of the f32 entry.
pub const F32_DMAX: usize = 256;
/// Largest `Nq` / `Nk` (the kernels index tokens with 32-bit integers).
pub const MAX_TOKENS: usize = 1 << 29;
/// Largest `B` and `H` (grid dimensions z and y).
pub const MAX_GRID_YZ: usize = 65535;
/// `flags` bit: write the log-sum-exp.
pub const FLAG_LSE: u32 = 1;
/// `flags` bit: a bias is present.
pub const FLAG_BIAS: u32 = 2;
/// `flags` bit: segment ids are present.
pub const FLAG_SEG: u32 = 4;

/// Every entry of `kernels/attention.ptx`, in file order.
pub const KERNEL_NAMES: [&str; 7] = [
    "attention_bf16_d32",
    "attention_bf16_d64",
    "attention_bf16_d128",
    "attention_f16_d32",
    "attention_f16_d64",
    "attention_f16_d128",
    "attention_f32",
];

/// Every entry of `kernels/attention_sm90.ptx`, in file order.
pub const WGMMA_KERNEL_NAMES: [&str; 4] =
    ["attention_wgmma_bf16_d64", "attention_wgmma_bf16_d128", "attention_wgmma_f16_d64", "attention_wgmma_f16_d128"];

/// Dynamic shared memory of a wgmma launch for head dimension `d`: the slack, the Q tile and
/// two stages of K and V tiles, each `[128][d]` 16-bit elements.
///
/// ```
/// use vistok::cuda::attention::wgmma_shared_bytes;
/// assert_eq!(wgmma_shared_bytes(64), 1024 + 5 * 16384);
/// assert_eq!(wgmma_shared_bytes(128), 1024 + 10 * 16384);
/// ```
pub fn wgmma_shared_bytes(d: usize) -> usize {
    WG_SLACK + 5 * WG_BN * d * 2
}

const _: () = {
    assert!(PARAM_BYTES == 192 && offset_of!(AttentionParams, nq) == 152 && offset_of!(AttentionParams, pad) == 188);
    assert!(F32_BM == 16 && F32_BN == 16 && BN == 64 && MAX_TOKENS <= 1 << 29);
};

/// The entry for `dtype` and head dimension `d`, or [`Error::Unsupported`] naming what is not
/// supported: the one place the name scheme lives.
///
/// ```
/// use vistok::{cuda::attention::kernel_name, DType};
/// assert_eq!(kernel_name(DType::BF16, 64).unwrap(), "attention_bf16_d64");
/// assert_eq!(kernel_name(DType::F32, 80).unwrap(), "attention_f32");
/// assert!(kernel_name(DType::F16, 80).is_err());
/// ```
pub fn kernel_name(dtype: DType, d: usize) -> Result<String> {
    Ok(traits(dtype, d)?.name)
}

/// Compile-time choices of one entry, as the host needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Traits {
    name: String,
    /// Query rows per CTA.
    bm: usize,
    /// Keys per tile.
    bn: usize,
    threads: u32,
    /// Required byte alignment of Q, K, V, O (cp.async moves 16 bytes).
    align: usize,
    /// An entry of the sm_90a module (else of `attention.ptx`).
    sm90: bool,
    /// Dynamic shared memory bytes of a launch.
    shared: u32,
}

impl Traits {
    fn module(&self) -> (&'static str, &'static str) {
        if self.sm90 {
            (MODULE_SM90, PTX_SM90)
        } else {
            (MODULE, PTX)
        }
    }
}

/// The wgmma entry for `dtype` and `d` (sm_90a), or [`Error::Unsupported`] naming what.
///
/// ```
/// use vistok::{cuda::attention::wgmma_kernel_name, DType};
/// assert_eq!(wgmma_kernel_name(DType::F16, 128).unwrap(), "attention_wgmma_f16_d128");
/// assert!(wgmma_kernel_name(DType::BF16, 32).is_err());
/// assert!(wgmma_kernel_name(DType::F32, 64).is_err());
/// ```
pub fn wgmma_kernel_name(dtype: DType, d: usize) -> Result<String> {
    Ok(wgmma_traits(dtype, d)?.name)
}

fn wgmma_traits(dtype: DType, d: usize) -> Result<Traits> {
    let unsupported = |msg: String| Error::Unsupported { family: Family::Attention, msg };
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return Err(unsupported(format!("no wgmma attention kernel for {}", dtype.name())));
    }
    if !WG_HEAD_DIMS.contains(&d) {
        return Err(unsupported(format!("head dimension D = {d} for the wgmma kernel (64 or 128)")));
    }
    Ok(Traits {
        name: format!("attention_wgmma_{}_d{d}", dtype.name()),
        bm: WG_BM,
        bn: WG_BN,
        threads: WG_THREADS,
        align: 16,
        sm90: true,
        shared: wgmma_shared_bytes(d) as u32,
    })
}

fn traits(dtype: DType, d: usize) -> Result<Traits> {
    let unsupported = |msg: String| Error::Unsupported { family: Family::Attention, msg };
    match dtype {
        DType::F32 if (1..=F32_DMAX).contains(&d) => Ok(Traits {
            name: "attention_f32".into(),
            bm: F32_BM,
            bn: F32_BN,
            threads: F32_THREADS,
            align: 4,
            sm90: false,
            shared: 0,
        }),
        DType::F32 => Err(unsupported(format!("head dimension D = {d} on the GPU for f32 (1..={F32_DMAX})"))),
        DType::F16 | DType::BF16 => match TC_HEAD_DIMS.iter().find(|(hd, _)| *hd == d) {
            Some(&(_, warps)) => Ok(Traits {
                name: format!("attention_{}_d{d}", dtype.name()),
                bm: 16 * warps as usize,
                bn: BN,
                threads: 32 * warps,
                align: 16,
                sm90: false,
                shared: 0,
            }),
            None => Err(unsupported(format!("head dimension D = {d} on the GPU for {} (32, 64 or 128)", dtype.name()))),
        },
        other => Err(unsupported(format!("no CUDA attention kernel for {}", other.name()))),
    }
}

/// The parameter block of every `attention_*` entry (`.param .align 8 .b8 p[192]`). Byte
/// strides; pointers of absent options are 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct AttentionParams {
    /// Q (element 0).
    pub q: u64,
    /// K.
    pub k: u64,
    /// V.
    pub v: u64,
    /// O (same dims, dtype and strides as Q).
    pub o: u64,
    /// Log-sum-exp, f32 `[B, H, Nq]`.
    pub lse: u64,
    /// Bias, f32.
    pub bias: u64,
    /// Query segment ids, u32 `[Nq]`.
    pub qseg: u64,
    /// Key segment ids, u32 `[Nk]`.
    pub kseg: u64,
    /// Largest query id per query tile (u32).
    pub qmax: u64,
    /// Smallest key id per key tile (u32).
    pub kmin: u64,
    /// Q / O byte stride of a batch.
    pub q_sb: u64,
    /// Q / O byte stride of a head.
    pub q_sh: u64,
    /// Q / O byte stride of a token.
    pub q_sn: u64,
    /// K / V byte stride of a batch.
    pub kv_sb: u64,
    /// K / V byte stride of a head.
    pub kv_sh: u64,
    /// K / V byte stride of a token.
    pub kv_sn: u64,
    /// Bias byte stride of a batch (0: broadcast).
    pub bias_sb: u64,
    /// Bias byte stride of a head (0: broadcast).
    pub bias_sh: u64,
    /// Bias byte stride of a query row (0: key bias).
    pub bias_si: u64,
    /// Queries.
    pub nq: u32,
    /// Keys.
    pub nk: u32,
    /// Head dimension.
    pub d: u32,
    /// `H / Hkv`.
    pub group: u32,
    /// Key `j` is visible to query `i` iff `lo ≤ j − i ≤ hi` (and the segment rule).
    pub lo: i32,
    /// See `lo`.
    pub hi: i32,
    /// Score scale.
    pub scale: f32,
    /// `scale·log₂e`.
    pub scale_log2: f32,
    /// [`FLAG_LSE`] | [`FLAG_BIAS`] | [`FLAG_SEG`].
    pub flags: u32,
    /// Zero.
    pub pad: u32,
}

// SAFETY: plain #[repr(C)] scalars without padding (bytemuck's Pod derive checks it), laid out
// exactly as the PTX entries read them (offsets asserted above and in tests/cuda_attention.rs).
unsafe impl DeviceRepr for AttentionParams {}

/// Byte size of the parameter block.
pub const PARAM_BYTES: usize = size_of::<AttentionParams>();

/// `(field, byte offset)` of every parameter, named as in the PTX `// abi` lines.
pub fn param_offsets() -> Vec<(&'static str, usize)> {
    macro_rules! offs {
        ($($f:ident),*) => { vec![$((stringify!($f), offset_of!(AttentionParams, $f))),*] };
    }
    offs!(
        q, k, v, o, lse, bias, qseg, kseg, qmax, kmin, q_sb, q_sh, q_sn, kv_sb, kv_sh, kv_sn, bias_sb, bias_sh,
        bias_si, nq, nk, d, group, lo, hi, scale, scale_log2, flags, pad
    )
}

/// Sizes of one problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sizes {
    b: usize,
    h: usize,
    hkv: usize,
    nq: usize,
    nk: usize,
    d: usize,
}

/// The visible band `lo ≤ j − i ≤ hi` of a mask (segments: the whole range), clamped to
/// `[−Nq − 1, Nk + 1]` (beyond that the clamp changes nothing).
///
/// ```
/// use vistok::attention::Mask;
/// use vistok::cuda::attention::band;
/// assert_eq!(band(&Mask::Causal, 4, 6), (-5, 2)); // query i sees keys j <= i + 2
/// assert_eq!(band(&Mask::Window { left: 1, right: usize::MAX }, 3, 3), (-1, 4));
/// ```
pub fn band(mask: &Mask<'_>, nq: usize, nk: usize) -> (i32, i32) {
    let (nq, nk) = (nq as i128, nk as i128);
    let off = nk - nq;
    let (lo, hi) = match *mask {
        Mask::None | Mask::Segments { .. } => (i128::MIN, i128::MAX),
        Mask::Causal => (i128::MIN, off),
        Mask::Window { left, right } => (off - left as i128, off + right as i128),
    };
    let clamp = |x: i128| x.clamp(-nq - 1, nk + 1) as i32;
    (clamp(lo), clamp(hi))
}

/// Per tile of `tile` consecutive ids: the largest (`max = true`) or smallest id.
///
/// ```
/// use vistok::cuda::attention::tile_extremes;
/// assert_eq!(tile_extremes(&[0, 3, 1, 2, 5], 2, true), [3, 2, 5]);
/// assert_eq!(tile_extremes(&[0, 3, 1, 2, 5], 2, false), [0, 1, 5]);
/// ```
pub fn tile_extremes(ids: &[u32], tile: usize, max: bool) -> Vec<u32> {
    ids.chunks(tile.max(1))
        .map(|c| if max { c.iter().copied().max() } else { c.iter().copied().min() }.unwrap_or(0))
        .collect()
}

/// Device copies of the bias and the segment ids.
struct Uploaded {
    bias: Option<CudaSlice<f32>>,
    seg: Option<[CudaSlice<u32>; 4]>, // qseg, kseg, qmax, kmin
    /// The segment ids on the host, to redo `qmax` / `kmin` when the tile sizes change.
    seg_host: Option<(Vec<u32>, Vec<u32>)>,
}

/// `qmax` per query tile of `t.bm` and `kmin` per key tile of `t.bn`, on the device.
fn upload_extremes(gpu: &Gpu, q: &[u32], k: &[u32], t: &Traits) -> Result<[CudaSlice<u32>; 2]> {
    let stream = gpu.stream();
    let up = |what: &str, x: Vec<u32>| {
        stream.clone_htod(&x).map_err(|e| driver_error(&format!("copying the segment {what} to the device"), e))
    };
    Ok([up("maxima", tile_extremes(q, t.bm, true))?, up("minima", tile_extremes(k, t.bn, false))?])
}

/// Whether the wgmma entries can run on `gpu` for `dtype` and `d`: `Ok(Ok(()))`, or
/// `Ok(Err(why))`.
fn wgmma_applies(gpu: &Gpu, dtype: DType, d: usize) -> Result<Result<Traits>> {
    let t = match wgmma_traits(dtype, d) {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    let cc = gpu.compute_capability()?;
    if cc != (9, 0) {
        return Ok(Err(Error::Unsupported {
            family: Family::Attention,
            msg: format!("the wgmma kernel needs compute capability 9.0 (sm_90a), not {}.{}", cc.0, cc.1),
        }));
    }
    Ok(Ok(t))
}

/// One attention configuration (options, dtype, shapes) on one [`Gpu`]; data stays on the
/// device.
///
/// ```no_run
/// use vistok::attention::{Attention, Bias};
/// use vistok::cuda::{attention::AttentionKernel, Gpu};
/// use vistok::{DType, View};
/// # fn main() -> vistok::Result<()> {
/// let gpu = Gpu::new(0)?;
/// let key_bias = [0.0f32, 0.69, 1.1]; // ToMe's log(size) per key
/// let a = Attention::new().bias(Bias::Key(View::new(&key_bias, &[1, 3])?));
/// let kernel = AttentionKernel::new(&gpu, &a, DType::F32, &[1, 2, 4, 8], &[1, 2, 3, 8])?;
/// let (q, kv) = (vec![0.1f32; 64], vec![0.2f32; 48]);
/// let (o, lse) = kernel.forward_lse_host(&q, &kv, &kv)?;
/// assert_eq!((o.len(), lse.len()), (64, 8));
/// # Ok(()) }
/// ```
pub struct AttentionKernel {
    gpu: Gpu,
    dtype: DType,
    layout: QkvLayout,
    sizes: Sizes,
    q_dims: Vec<usize>,
    kv_dims: Vec<usize>,
    traits: Traits,
    /// Parameters without buffer pointers (filled per launch).
    base: AttentionParams,
    up: Uploaded,
}

impl std::fmt::Debug for AttentionKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttentionKernel")
            .field("gpu", &self.gpu)
            .field("entry", &self.traits.name)
            .field("q_dims", &self.q_dims)
            .field("kv_dims", &self.kv_dims)
            .finish()
    }
}

impl AttentionKernel {
    /// Validates `attention` for `dtype`, Q dims `q_dims` and K / V dims `kv_dims` (in the
    /// options' layout), uploads the bias and segment ids, and loads the module.
    ///
    /// Errors ([`Error`], family attention), all before any device work: the shape errors of
    /// [`Attention::forward`] (rank, batch / D mismatch, `H` not a multiple of `Hkv`, bias or
    /// segment ids of the wrong shape), a non-finite scale or a NaN / `+∞` bias
    /// ([`Error::NonFinite`]), `D = 0`, and [`Error::Unsupported`] for what the GPU kernels do
    /// not take (dtype / D, more than 2²⁹ tokens, more than 65535 batches or heads); then
    /// driver errors.
    pub fn new(
        gpu: &Gpu,
        attention: &Attention<'_>,
        dtype: DType,
        q_dims: &[usize],
        kv_dims: &[usize],
    ) -> Result<Self> {
        let p = validate(attention, q_dims, kv_dims)?;
        let s = Sizes { b: p.b, h: p.h, hkv: p.hkv, nq: p.nq, nk: p.nk, d: p.d };
        let mut traits = traits(dtype, s.d)?;
        let unsupported = |msg: String| Error::Unsupported { family: Family::Attention, msg };
        if s.nq > MAX_TOKENS || s.nk > MAX_TOKENS {
            return Err(unsupported(format!("Nq = {}, Nk = {}: at most {MAX_TOKENS} tokens on the GPU", s.nq, s.nk)));
        }
        if s.b > MAX_GRID_YZ || s.h > MAX_GRID_YZ {
            return Err(unsupported(format!("B = {}, H = {}: at most {MAX_GRID_YZ} each on the GPU", s.b, s.h)));
        }
        // The bias must be checked before it is uploaded (Q, K, V are checked per call by the
        // host helpers only).
        check_finite::<f32>(&p, &[], &[], &[], |bad, x| x.iter().position(|e| bad.test(*e)), |_, _| None)?;
        gpu.function(MODULE, PTX, &traits.name)?;
        if let Ok(t) = wgmma_applies(gpu, dtype, s.d)? {
            gpu.function(MODULE_SM90, PTX_SM90, &t.name)?.allow_dynamic_shared(t.shared)?;
            traits = t;
        }
        let stream = gpu.stream();
        let up_err = |what: &'static str| move |e| driver_error(&format!("copying the {what} to the device"), e);
        let bias = if p.bias.is_none() { None } else { Some(stream.clone_htod(p.bias.data).map_err(up_err("bias"))?) };
        let (seg, seg_host) = match p.mask {
            Mask::Segments { q, k } if s.nq > 0 && s.nk > 0 => {
                let [qm, km] = upload_extremes(gpu, q, k, &traits)?;
                let qs = stream.clone_htod(q).map_err(up_err("query segment ids"))?;
                let ks = stream.clone_htod(k).map_err(up_err("key segment ids"))?;
                (Some([qs, ks, qm, km]), Some((q.to_vec(), k.to_vec())))
            }
            _ => (None, None),
        };
        let es = dtype.size() as u64;
        let (b, h, hkv, nq, nk, d) = (s.b as u64, s.h as u64, s.hkv as u64, s.nq as u64, s.nk as u64, s.d as u64);
        let ((q_sb, q_sh, q_sn), (kv_sb, kv_sh, kv_sn)) = match p.layout {
            QkvLayout::Bhnd => ((h * nq * d, nq * d, d), (hkv * nk * d, nk * d, d)),
            QkvLayout::Bnhd => ((nq * h * d, d, h * d), (nk * hkv * d, d, hkv * d)),
        };
        let _ = b;
        let (lo, hi) = band(&p.mask, s.nq, s.nk);
        let mut flags = 0;
        if bias.is_some() {
            flags |= FLAG_BIAS;
        }
        if seg.is_some() {
            flags |= FLAG_SEG;
        }
        let base = AttentionParams {
            q_sb: q_sb * es,
            q_sh: q_sh * es,
            q_sn: q_sn * es,
            kv_sb: kv_sb * es,
            kv_sh: kv_sh * es,
            kv_sn: kv_sn * es,
            bias_sb: 4 * p.bias.b_stride as u64,
            bias_sh: 4 * p.bias.h_stride as u64,
            bias_si: 4 * p.bias.i_stride as u64,
            nq: s.nq as u32,
            nk: s.nk as u32,
            d: s.d as u32,
            group: (s.h / s.hkv) as u32,
            lo,
            hi,
            scale: p.scale,
            scale_log2: (p.scale as f64 * std::f64::consts::LOG2_E) as f32,
            flags,
            ..AttentionParams::default()
        };
        Ok(AttentionKernel {
            gpu: gpu.clone(),
            dtype,
            layout: p.layout,
            sizes: s,
            q_dims: q_dims.to_vec(),
            kv_dims: kv_dims.to_vec(),
            traits,
            base,
            up: Uploaded { bias, seg, seg_host },
        })
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The entry this configuration launches.
    pub fn entry(&self) -> &str {
        &self.traits.name
    }

    /// Chooses the sm_90a `wgmma` entry (`true`; what [`new`](Self::new) picks on a compute
    /// capability 9.0 GPU for f16 / bf16 with D = 64 or 128) or the `mma.sync` / f32 one
    /// (`false`, any GPU from sm_80 on), e.g. to compare the two.
    ///
    /// Errors: [`Error::Unsupported`] for `true` when the GPU is not compute capability 9.0 or
    /// the dtype / D has no wgmma entry; driver errors.
    ///
    /// ```no_run
    /// use vistok::attention::Attention;
    /// use vistok::cuda::{attention::AttentionKernel, Gpu};
    /// use vistok::DType;
    /// # fn main() -> vistok::Result<()> {
    /// let gpu = Gpu::new(0)?;
    /// let dims = [1, 12, 1024, 64];
    /// let kernel = AttentionKernel::new(&gpu, &Attention::new(), DType::BF16, &dims, &dims)?
    ///     .with_wgmma(false)?; // mma.sync even on an H100
    /// assert_eq!(kernel.entry(), "attention_bf16_d64");
    /// # Ok(()) }
    /// ```
    pub fn with_wgmma(mut self, on: bool) -> Result<Self> {
        if on == self.traits.sm90 {
            return Ok(self);
        }
        let t =
            if on { wgmma_applies(&self.gpu, self.dtype, self.sizes.d)?? } else { traits(self.dtype, self.sizes.d)? };
        let (module, ptx) = t.module();
        let f = self.gpu.function(module, ptx, &t.name)?;
        if t.shared > 0 {
            f.allow_dynamic_shared(t.shared)?;
        }
        if let (Some((q, k)), Some(seg)) = (&self.up.seg_host, &mut self.up.seg) {
            let [qm, km] = upload_extremes(&self.gpu, q, k, &t)?;
            (seg[2], seg[3]) = (qm, km);
        }
        self.traits = t;
        Ok(self)
    }

    /// Whether this configuration runs the sm_90a `wgmma` entry.
    pub fn wgmma(&self) -> bool {
        self.traits.sm90
    }

    /// Dynamic shared memory bytes of a launch (0 but for the wgmma entries).
    pub fn shared_bytes(&self) -> u32 {
        self.traits.shared
    }

    /// Elements of Q (and O), of K (and V), and of the log-sum-exp.
    pub fn lens(&self) -> (usize, usize, usize) {
        let s = self.sizes;
        (s.b * s.h * s.nq * s.d, s.b * s.hkv * s.nk * s.d, s.b * s.h * s.nq)
    }

    /// The launch (grid, block, parameters) for the given device addresses (`lse = 0`: none).
    /// Pure data, so it can be checked without a GPU.
    pub fn plan(&self, q: u64, k: u64, v: u64, o: u64, lse: u64) -> Launch<AttentionParams> {
        let s = self.sizes;
        let mut params = self.base;
        (params.q, params.k, params.v, params.o, params.lse) = (q, k, v, o, lse);
        if lse != 0 {
            params.flags |= FLAG_LSE;
        }
        Launch {
            name: self.traits.name.clone(),
            // nq <= 2^30, h, b <= 65535 (checked in `new`).
            grid: (s.nq.div_ceil(self.traits.bm).max(1) as u32, s.h as u32, s.b as u32),
            block: (self.traits.threads, 1, 1),
            params,
        }
    }

    fn check_dtype(&self, got: DType) -> Result<()> {
        if got != self.dtype {
            return Err(Error::Invalid {
                family: Family::Attention,
                msg: format!("buffers of {} for a kernel built for {}", got.name(), self.dtype.name()),
            });
        }
        Ok(())
    }

    /// `O = softmax(Q·Kᵀ·scale + bias)·V` on `stream` (asynchronous: returns once enqueued).
    ///
    /// Errors, before any launch: [`Error::Invalid`] for element type `T` other than the
    /// kernel's dtype or a stream / buffer of another context, [`Error::Length`] for a buffer
    /// whose length is not its dims' product, [`Error::Alignment`] for a buffer not aligned to
    /// 16 bytes (f16 / bf16; 4 for f32); driver errors.
    pub fn forward<T: Float>(
        &self,
        stream: &Arc<CudaStream>,
        q: &impl DevicePtr<T>,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.launch::<T, CudaSlice<f32>>(stream, q, k, v, out, None)
    }

    /// [`forward`](Self::forward) that also writes the log-sum-exp `[B, H, Nq]` (f32, natural
    /// log; `−∞` for fully masked rows). Errors: those of `forward`, and [`Error::Length`] for
    /// `lse`.
    pub fn forward_lse<T: Float>(
        &self,
        stream: &Arc<CudaStream>,
        q: &impl DevicePtr<T>,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        self.launch(stream, q, k, v, out, Some(lse))
    }

    fn launch<T: Float, L: DevicePtrMut<f32>>(
        &self,
        stream: &Arc<CudaStream>,
        q: &impl DevicePtr<T>,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: Option<&mut L>,
    ) -> Result<()> {
        self.check_dtype(T::DTYPE)?;
        let (nq_len, nk_len, l_len) = self.lens();
        let len = |what, expected, got| {
            if expected != got {
                return Err(Error::Length { family: Family::Attention, what, expected, got });
            }
            Ok(())
        };
        len("q", nq_len, q.len())?;
        len("k", nk_len, k.len())?;
        len("v", nk_len, v.len())?;
        len("out", nq_len, out.len())?;
        if let Some(l) = &lse {
            len("lse", l_len, l.len())?;
        }
        let ctx = self.gpu.context();
        let mut streams = vec![("stream", stream), ("q", q.stream()), ("k", k.stream()), ("v", v.stream())];
        streams.push(("out", out.stream()));
        if let Some(l) = &lse {
            streams.push(("lse", l.stream()));
        }
        for (what, s) in streams {
            if s.context() != ctx {
                return Err(Error::Invalid {
                    family: Family::Attention,
                    msg: format!("{what} belongs to another CUDA context than the kernel"),
                });
            }
        }
        if nq_len == 0 {
            return Ok(()); // B = 0, H = 0 or Nq = 0: nothing to write
        }
        let (module, ptx) = self.traits.module();
        let f = self.gpu.function(module, ptx, &self.traits.name)?;
        let (qp, _gq) = q.device_ptr(stream);
        let (kp, _gk) = k.device_ptr(stream);
        let (vp, _gv) = v.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let (lp, _gl) = match lse {
            Some(l) => {
                let (p, g) = l.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let align = self.traits.align as u64;
        for (what, p) in [("q", qp), ("k", kp), ("v", vp), ("out", op)] {
            if !p.is_multiple_of(align) {
                return Err(Error::Alignment { family: Family::Attention, what, required: self.traits.align });
            }
        }
        if !lp.is_multiple_of(4) {
            return Err(Error::Alignment { family: Family::Attention, what: "lse", required: 4 });
        }
        let mut l = self.plan(qp, kp, vp, op, lp);
        let (_gb, _gs);
        if let Some(b) = &self.up.bias {
            let (p, g) = b.device_ptr(stream);
            l.params.bias = p;
            _gb = Some(g);
        }
        if let Some([qs, ks, qm, km]) = &self.up.seg {
            let ((a, ga), (b, gb), (c, gc), (d, gd)) =
                (qs.device_ptr(stream), ks.device_ptr(stream), qm.device_ptr(stream), km.device_ptr(stream));
            (l.params.qseg, l.params.kseg, l.params.qmax, l.params.kmin) = (a, b, c, d);
            _gs = Some((ga, gb, gc, gd));
        }
        // SAFETY: the entry's parameter block is AttentionParams (tests/cuda_attention.rs checks
        // its size and every offset against the PTX `// abi` lines). With the lengths checked
        // above, the kernel reads Q rows (b, h, i < Nq) and K / V rows (b, h / group, j < Nk)
        // at the byte strides of `new` (loads of rows past the end are zero-filled with source
        // size 0 and a clamped, valid address), writes O rows i < Nq and lse [B, H, Nq] only
        // when `lse` is non-zero; it reads the bias at b·sb + h·sh + min(i, Nq − 1)·si + 4j for
        // j < Nk (strides of the validated bias dims) and the segment arrays at indices < Nq,
        // < Nk and < the tile counts of `tile_extremes`. Every buffer is borrowed (its stream
        // events recorded by the guards) until the launch is enqueued, and cudarc's
        // stream-ordered frees keep them alive until it completes; the uploads live in `self`.
        // The wgmma entries' dynamic shared memory (`traits.shared`, the size the PTX docstring
        // lays out) was allowed on the function when the entry was chosen.
        unsafe { f.launch_shared(stream, l.grid, l.block, self.traits.shared, &l.params) }
    }

    /// [`forward`](Self::forward) from and to host memory on the default stream; first scans
    /// Q, K and V for NaN / ±∞ as the cpu backend does ([`Error::NonFinite`] naming the first).
    pub fn forward_host<T: Float + DeviceRepr + ValidAsZeroBits>(&self, q: &[T], k: &[T], v: &[T]) -> Result<Vec<T>> {
        Ok(self.host(q, k, v, false)?.0)
    }

    /// [`forward_lse`](Self::forward_lse) from and to host memory: `(O, lse)`.
    pub fn forward_lse_host<T: Float + DeviceRepr + ValidAsZeroBits>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<(Vec<T>, Vec<f32>)> {
        self.host(q, k, v, true)
    }

    fn host<T: Float + DeviceRepr + ValidAsZeroBits>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        want_lse: bool,
    ) -> Result<(Vec<T>, Vec<f32>)> {
        self.check_dtype(T::DTYPE)?;
        let (nq_len, nk_len, l_len) = self.lens();
        for (what, expected, got) in [("q", nq_len, q.len()), ("k", nk_len, k.len()), ("v", nk_len, v.len())] {
            if expected != got {
                return Err(Error::Length { family: Family::Attention, what, expected, got });
            }
        }
        let s = self.sizes;
        let none = BiasSpec { data: &[], b_stride: 0, h_stride: 0, i_stride: 0, dims: [0; 4] };
        let p = Problem {
            b: s.b,
            h: s.h,
            hkv: s.hkv,
            nq: s.nq,
            nk: s.nk,
            d: s.d,
            layout: self.layout,
            scale: self.base.scale,
            mask: Mask::None,
            bias: none,
        };
        check_finite(&p, q, k, v, |_, _| None, |bad, x| x.iter().position(|e| bad.test(e.to_f32())))?;
        if nq_len == 0 {
            return Ok((Vec::new(), vec![0.0; if want_lse { l_len } else { 0 }]));
        }
        let stream = self.gpu.stream();
        // cudarc cannot allocate 0 elements: an empty K / V (Nk = 0) gets one unread element.
        let up = |x: &[T], what: &str| {
            if x.is_empty() { stream.alloc_zeros::<T>(1) } else { stream.clone_htod(x) }
                .map_err(|e| driver_error(&format!("copying {what} to the device"), e))
        };
        let (dq, dk, dv) = (up(q, "q")?, up(k, "k")?, up(v, "v")?);
        let mut o = stream.alloc_zeros::<T>(nq_len).map_err(|e| driver_error("allocating out", e))?;
        let lse = if want_lse {
            let mut l = stream.alloc_zeros::<f32>(l_len).map_err(|e| driver_error("allocating lse", e))?;
            self.launch_any(stream, &dq, &dk, &dv, &mut o, Some(&mut l), nk_len)?;
            stream.clone_dtoh(&l).map_err(|e| driver_error("copying lse to the host", e))?
        } else {
            self.launch_any::<T>(stream, &dq, &dk, &dv, &mut o, None, nk_len)?;
            Vec::new()
        };
        let out = stream.clone_dtoh(&o).map_err(|e| driver_error("copying out to the host", e))?;
        self.gpu.synchronize()?;
        Ok((out, lse))
    }

    /// Launch from the host helper: K / V may be a 1-element placeholder when `Nk = 0`.
    #[allow(clippy::too_many_arguments)]
    fn launch_any<T: Float>(
        &self,
        stream: &Arc<CudaStream>,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        o: &mut CudaSlice<T>,
        lse: Option<&mut CudaSlice<f32>>,
        nk_len: usize,
    ) -> Result<()> {
        if nk_len == 0 {
            let (k0, v0) = (k.slice(0..0), v.slice(0..0));
            self.launch(stream, q, &k0, &v0, o, lse)
        } else {
            self.launch(stream, q, k, v, o, lse)
        }
    }
}

/// The checks of [`Attention::forward`] on dims alone (no data), resolving the bias strides.
pub(crate) fn validate<'a>(a: &Attention<'a>, qd: &[usize], kd: &[usize]) -> Result<Problem<'a>> {
    // Device buffers come with bare dims (no host view vouches for their product): check that
    // the element counts and byte sizes fit first.
    for (what, dims) in [("q", qd), ("k", kd)] {
        if dims.iter().try_fold(1usize, |acc, &x| acc.checked_mul(x)).and_then(|n| n.checked_mul(4)).is_none() {
            return Err(Error::Overflow { family: Family::Attention, what: format!("{what} dims {dims:?}") });
        }
    }
    // Then exactly the host API's validation, with V shaped as K and O as Q.
    a.check(qd, kd, kd, qd, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_scheme_in_file_order() {
        let mut names = vec![];
        for t in [DType::BF16, DType::F16] {
            for (d, _) in TC_HEAD_DIMS {
                names.push(kernel_name(t, d).unwrap());
            }
        }
        names.push(kernel_name(DType::F32, 1).unwrap());
        assert_eq!(names, KERNEL_NAMES);
        for (t, d) in [(DType::BF16, 48), (DType::F16, 256), (DType::F32, 257), (DType::F32, 0), (DType::U8, 64)] {
            let e = kernel_name(t, d).unwrap_err();
            assert!(matches!(e, Error::Unsupported { family: Family::Attention, .. }), "{e}");
        }
    }

    #[test]
    fn band_matches_the_mask_rules() {
        for (nq, nk) in [(1usize, 1usize), (5, 9), (9, 5), (7, 7)] {
            let masks = [
                Mask::None,
                Mask::Causal,
                Mask::Window { left: 2, right: 1 },
                Mask::Window { left: 0, right: 0 },
                Mask::Window { left: usize::MAX, right: 3 },
                Mask::Window { left: 1, right: usize::MAX },
            ];
            for m in masks {
                let (lo, hi) = band(&m, nq, nk);
                for i in 0..nq {
                    for j in 0..nk {
                        let diag = i as i64 + nk as i64 - nq as i64;
                        let want = match m {
                            Mask::Causal => j as i64 <= diag,
                            Mask::Window { left, right } => {
                                diag - left.min(1 << 40) as i64 <= j as i64
                                    && j as i64 <= diag + right.min(1 << 40) as i64
                            }
                            _ => true,
                        };
                        let dd = j as i64 - i as i64;
                        assert_eq!(lo as i64 <= dd && dd <= hi as i64, want, "{m:?} {nq}x{nk} ({i}, {j})");
                    }
                }
            }
        }
    }

    #[test]
    fn validation_errors_are_typed() {
        let a = Attention::new();
        assert!(matches!(validate(&a, &[1, 2, 3], &[1, 2, 3, 4]), Err(Error::Shape { .. })));
        assert!(matches!(validate(&a, &[1, 3, 4, 8], &[1, 2, 4, 8]), Err(Error::Shape { .. })));
        assert!(matches!(validate(&a, &[1, 2, 4, 8], &[1, 2, 4, 16]), Err(Error::Shape { .. })));
        let s = Attention::new().scale(f32::NAN);
        assert!(matches!(validate(&s, &[1, 2, 4, 8], &[1, 2, 4, 8]), Err(Error::NonFinite { .. })));
        let kb = [0.0f32; 5];
        let bad = Attention::new().bias(crate::attention::Bias::Key(crate::View::new(&kb, &[1, 5]).unwrap()));
        assert!(matches!(validate(&bad, &[1, 2, 4, 8], &[1, 2, 4, 8]), Err(Error::Shape { .. })));
        assert!(validate(&bad, &[1, 2, 4, 8], &[1, 2, 5, 8]).is_ok());
    }
}
