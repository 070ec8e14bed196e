//! Token merging on the GPU: ToMe's bipartite soft matching, with the SAME plan as the cpu
//! backend bit for bit, and the merge / weighted merge / unmerge of a plan on device buffers.
//!
//! Contract: the one in [`crate::merge`], on device buffers (`[B, N, C]` row-major).
//!
//! # The plan ([`MergeKernel::plan`])
//! The kernels follow the f32 score contract of [`crate::merge`] operation for operation
//! (`mul.rn`, `add.rn`, `fma.rn`, `sqrt.rn`, `div.rn`; nothing contracted, no `.ftz`), so the
//! scores are the cpu backend's bit for bit and so is the plan, for every input (f16 / bf16
//! metrics are widened exactly to f32 on load and take the same f32 path;
//! [`MergeKernel::with_tensor_cores`] switches them to a tensor-core similarity whose plan
//! equals the reference's up to near-ties instead):
//! 1. `merge_normalize_{dtype}`: half a warp per token row; lane `l` accumulates the contract's
//!    lane `l` (channels `k ≡ l mod 16`, in order), the lane tree by `shfl.down`; non-finite
//!    elements are reported through a status word (the lowest flat index wins).
//! 2. `merge_similarity`: per block 64 A tokens × 64 B tokens, 256 threads with 4×4 register
//!    tiles, 16 channels per shared-memory stage; each score is one `fma` chain over the
//!    channels in order; the block folds its scores into a per-A-row (max, lowest argmax) over
//!    its share ("split") of the B tiles. The `N/2 × N/2` score matrix is never written.
//! 3. `merge_reduce`: the splits in ascending order (strict `>`: the lowest B index).
//! 4. `merge_rank`: `rank(a) = #{a' : s(a') > s(a) or (s(a') = s(a) and a' < a)}` — a stable
//!    descending sort, ties to the lower A index, `−0 = +0`, computed as `O(N²/4)` compares
//!    per batch (cheap next to the similarity) — and `order[b, rank(a)] = (a, best B of a)`.
//!
//!
//! With [`MergeKernel::with_tensor_cores`] and an f16 / bf16 metric, steps 1–2 are instead
//! `merge_pack_{dtype}` (the contract's scaled rows `y`, exact in the input dtype, packed as
//! zero-padded A and B matrices, and `1/√ss` per token) and `merge_similarity_mma_{dtype}`
//! (blocks of 128 A × 128 B tokens, 8 warps of 32 × 64 `mma.sync` m16n8k16 tiles, channels in
//! cp.async double-buffered stages of 32, ldmatrix from XOR-swizzled shared memory; score =
//! dot · inv_a · inv_b), feeding the same reduce and rank. On compute capability 9.0 (H100,
//! H200) and `C ≥ 64` the similarity is instead `merge_similarity_wgmma_{dtype}` from the
//! sm_90a module `kernels/merge_sm90.ptx`: the same 128 × 128 token blocks as two warpgroups of
//! `wgmma.mma_async` m64n128k16 (both operands from shared memory, 128-byte swizzled, channels
//! in 64-wide k-blocks through a four-buffer cp.async ring, two accumulator sets so a tile's
//! epilogue overlaps the next tile's wgmma), with the same scores and partial bests
//! ([`MergeKernel::with_wgmma`] picks either).
//!
//! The `B·⌈N/2⌉` (A token, best B) pairs in rank order are copied back and the host assembles
//! the [`MergePlan`] (`O(B·N)`), exactly as the cpu backend does from the same ranking.
//!
//! [`MergeKernel::similarity_stage`] and [`MergeKernel::run_similarity`] expose steps 1–2 alone
//! (operands prepared once, the similarity launched as often as wanted): what the benches'
//! `merge/cuda/*/…-similarity` rows time against the tensor-core roofline.
//!
//! # Applying a plan ([`MergeKernel::merge`], [`MergeKernel::merge_weighted`], [`MergeKernel::unmerge`])
//! A plan is uploaded once ([`MergeKernel::upload`]: its slot map and its per-slot source
//! lists). One block per output slot, threads over channels; a slot's sources are combined in
//! ascending token order with the cpu backend's f32 arithmetic (a single source is copied bit
//! for bit; sum / mean: `x₀ + x₁ + …`, mean then `/ count`; weighted: `fma(xᵢ, sᵢ, ·)` from
//! `+0`, `/ Σ sᵢ`), rounded once to the output dtype: results equal the cpu backend's bit for
//! bit (NaN payloads aside). Unmerge is a gather of bit copies.
//!
//! # Limits
//! `B ≤ 65535`, `B·N < 2³¹`, `C < 2³¹`, `B·(N − r) < 2³¹` ([`Error::Unsupported`] beyond).
//!
//! ```no_run
//! use vistok::cuda::{merge::MergeKernel, Gpu};
//! use vistok::merge::{MatchConfig, MergeMode};
//! use vistok::View;
//! # fn main() -> vistok::Result<()> {
//! let gpu = Gpu::new(0)?;
//! let kernel = MergeKernel::new(&gpu)?;
//! let m = [1.0f32, 0.0, 0.0, 1.0, 0.0, 2.0, 1.0, 1.0];
//! let plan = kernel.plan_host(View::new(&m, &[1, 4, 2])?, &MatchConfig::new(1))?;
//! assert_eq!(plan.slots(), &[0, 1, 1, 2]);
//! let y = kernel.merge_host(&plan, View::new(&m, &[1, 4, 2])?, MergeMode::Mean)?;
//! assert_eq!(y, [1.0, 0.0, 0.0, 1.5, 1.0, 1.0]);
//! # Ok(()) }
//! ```

use std::mem::{offset_of, size_of};
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};

use super::{driver_error, Gpu};
use crate::dtype::{DType, Float};
use crate::error::{Error, Family, Result};
use crate::merge::{non_finite, MatchConfig, MergeMode, MergePlan, Parts};
use crate::view::View;

/// Name of the module in the [`Gpu`] cache.
pub const MODULE: &str = "merge";
/// The generated PTX (`kernels/merge.ptx`).
pub const PTX: &str = include_str!("../../kernels/merge.ptx");
/// Name of the Hopper-only module (`wgmma`, `.target sm_90a`) in the [`Gpu`] cache.
pub const MODULE_SM90: &str = "merge_sm90";
/// The generated PTX of the wgmma similarity (`kernels/merge_sm90.ptx`), JIT-compiled only on
/// compute capability 9.0 devices.
pub const PTX_SM90: &str = include_str!("../../kernels/merge_sm90.ptx");
/// Every entry of `kernels/merge_sm90.ptx`, in file order.
pub const WGMMA_NAMES: [&str; 2] = ["merge_similarity_wgmma_f16", "merge_similarity_wgmma_bf16"];
/// Dynamic shared memory of a wgmma similarity launch: 1 KB of alignment slack and four ring
/// buffers of the A rows' and the B tile's `[128][64]` 16-bit channels.
pub const WGMMA_SHARED: usize = 1024 + 4 * 2 * TC_TILE * 64 * 2;
/// The wgmma similarity applies from this channel count on (below it most of each 64-channel
/// k-block would be padding: `mma.sync` is the better kernel there).
pub const WGMMA_MIN_C: usize = 64;

// ---- Tuning and ABI constants: one place, checked against the PTX by tests/cuda_merge.rs. ----

/// Threads per block (every entry declares `.maxntid 256, 1, 1`).
pub const BLOCK: u32 = 256;
/// A tokens and B tokens per similarity block.
pub const TILE: usize = 64;
/// Channels per shared-memory stage of the similarity kernel.
pub const KSTEP: usize = 16;
/// Token rows per normalise block (half a warp each).
pub const NORM_ROWS: u32 = BLOCK / 16;
/// Largest batch (grid z of the similarity kernel).
pub const MAX_BATCH: usize = 65535;
/// Largest row / index counts (`B·N`, `C`, `B·(N − r)`): 32-bit signed indices.
pub const MAX_INDEX: usize = i32::MAX as usize;
/// The similarity grid aims at this many blocks per SM (splitting the B tiles when needed).
pub const BLOCKS_PER_SM: usize = 2;
/// The metric dtypes, in entry order.
pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

const _: () = assert!(TILE == 4 * 16 && KSTEP * TILE == 4 * BLOCK as usize && BLOCK.is_multiple_of(32));

/// A tokens and B tokens per tensor-core similarity block (also the row padding of its packed
/// operands).
pub const TC_TILE: usize = 128;
/// Channels per shared-memory stage of the tensor-core similarity (also the channel padding of
/// its packed operands).
pub const TC_K: usize = 32;
/// The metric dtypes the tensor-core similarity takes, in entry order.
pub const TC_DTYPES: [DType; 2] = [DType::F16, DType::BF16];

/// Every entry of `kernels/merge.ptx`, in file order.
pub const KERNEL_NAMES: [&str; 22] = [
    "merge_normalize_f32",
    "merge_normalize_f16",
    "merge_normalize_bf16",
    "merge_similarity",
    "merge_reduce",
    "merge_rank",
    "merge_sum_f32",
    "merge_sum_f16",
    "merge_sum_bf16",
    "merge_mean_f32",
    "merge_mean_f16",
    "merge_mean_bf16",
    "merge_wavg_f32",
    "merge_wavg_f16",
    "merge_wavg_bf16",
    "merge_unmerge_f32",
    "merge_unmerge_f16",
    "merge_unmerge_bf16",
    "merge_pack_f16",
    "merge_pack_bf16",
    "merge_similarity_mma_f16",
    "merge_similarity_mma_bf16",
];

/// The entry name of a per-dtype kernel (`"normalize"`, `"sum"`, `"mean"`, `"wavg"`,
/// `"unmerge"`; `"pack"` and `"similarity_mma"` for f16 / bf16).
///
/// ```
/// use vistok::{cuda::merge::kernel_name, DType};
/// assert_eq!(kernel_name("wavg", DType::BF16), "merge_wavg_bf16");
/// ```
pub fn kernel_name(kind: &str, dtype: DType) -> String {
    format!("merge_{kind}_{}", dtype.name())
}

/// The parameter block of every `merge_*` entry (`.param .align 8 .b8 p[96]`); each entry
/// reads the fields it needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct MergeParams {
    /// Input buffer (metric, normalised rows, packed tensor-core operands, partial bests, `x` or
    /// `y`).
    pub src: u64,
    /// Output buffer.
    pub dst: u64,
    /// The status word (one zeroed `u64`; `!index` of the first bad element).
    pub status: u64,
    /// Merge: the plan's members `[B, N]`; unmerge: its slots `[B, N]`; pack / tensor-core
    /// similarity: the inverse norms `[B·N]` f32.
    pub aux: u64,
    /// Merge: the plan's offsets `[B, N − r + 1]`.
    pub offsets: u64,
    /// Weighted merge: sizes `[B, N]`.
    pub sizes: u64,
    /// Weighted merge: output sizes `[B, N − r]`.
    pub out_sizes: u64,
    /// B.
    pub batch: u32,
    /// N.
    pub n: u32,
    /// C.
    pub c: u32,
    /// `⌈N/2⌉`.
    pub na: u32,
    /// `⌊N/2⌋`.
    pub nb: u32,
    /// `N − r`.
    pub out: u32,
    /// Similarity: splits of the B tiles (grid y).
    pub splits: u32,
    /// Similarity: B tiles per split.
    pub tiles: u32,
    /// Bit 0: class token; bit 1: distillation token.
    pub flags: u32,
    /// Padding to a multiple of 8 bytes.
    pub pad: u32,
}

// SAFETY: plain #[repr(C)] integers without padding (bytemuck's Pod derive checks it), laid
// out exactly as the PTX entries read them (offsets asserted below and in tests/cuda_merge.rs).
unsafe impl DeviceRepr for MergeParams {}

/// Byte size of the parameter block.
pub const PARAM_BYTES: usize = size_of::<MergeParams>();

const _: () = assert!(PARAM_BYTES == 96 && offset_of!(MergeParams, batch) == 56 && offset_of!(MergeParams, pad) == 92);

/// `(field, byte offset)` of every parameter, named as in the PTX `// abi` lines.
pub fn param_offsets() -> Vec<(&'static str, usize)> {
    vec![
        ("src", offset_of!(MergeParams, src)),
        ("dst", offset_of!(MergeParams, dst)),
        ("status", offset_of!(MergeParams, status)),
        ("aux", offset_of!(MergeParams, aux)),
        ("offsets", offset_of!(MergeParams, offsets)),
        ("sizes", offset_of!(MergeParams, sizes)),
        ("out_sizes", offset_of!(MergeParams, out_sizes)),
        ("batch", offset_of!(MergeParams, batch)),
        ("n", offset_of!(MergeParams, n)),
        ("c", offset_of!(MergeParams, c)),
        ("na", offset_of!(MergeParams, na)),
        ("nb", offset_of!(MergeParams, nb)),
        ("out", offset_of!(MergeParams, out)),
        ("splits", offset_of!(MergeParams, splits)),
        ("tiles", offset_of!(MergeParams, tiles)),
        ("flags", offset_of!(MergeParams, flags)),
        ("pad", offset_of!(MergeParams, pad)),
    ]
}

/// The similarity grid: `(blocks over A, splits, B tiles per split)` for `na` A tokens, `nb`
/// B tokens and `batch` batches, splitting the B tiles until about `target_blocks` blocks run.
/// Every split has at least one tile. The plan does not depend on the split.
///
/// ```
/// let (ax, splits, tiles) = vistok::cuda::merge::similarity_grid(8, 512, 512, 264);
/// assert_eq!((ax, splits, tiles), (8, 4, 2));
/// assert_eq!(vistok::cuda::merge::similarity_grid(8, 512, 512, 1), (8, 1, 8));
/// ```
pub fn similarity_grid(batch: usize, na: usize, nb: usize, target_blocks: usize) -> (u32, u32, u32) {
    grid_for(TILE, batch, na, nb, target_blocks)
}

/// [`similarity_grid`] for the tensor-core similarity (tiles of [`TC_TILE`] tokens).
///
/// ```
/// let (ax, splits, tiles) = vistok::cuda::merge::tc_similarity_grid(8, 512, 512, 264);
/// assert_eq!((ax, splits, tiles), (4, 4, 1));
/// ```
pub fn tc_similarity_grid(batch: usize, na: usize, nb: usize, target_blocks: usize) -> (u32, u32, u32) {
    grid_for(TC_TILE, batch, na, nb, target_blocks)
}

fn grid_for(tile: usize, batch: usize, na: usize, nb: usize, target_blocks: usize) -> (u32, u32, u32) {
    let ax = na.div_ceil(tile).max(1);
    let nbt = nb.div_ceil(tile).max(1);
    let want = target_blocks.div_ceil(ax * batch.max(1));
    let splits = want.clamp(1, nbt);
    let tiles = nbt.div_ceil(splits);
    let splits = nbt.div_ceil(tiles);
    (ax as u32, splits as u32, tiles as u32)
}

fn unsupported(msg: String) -> Error {
    Error::Unsupported { family: Family::Merge, msg }
}

fn shape(msg: String) -> Error {
    Error::Shape { family: Family::Merge, msg }
}

fn check_index(what: &str, v: usize) -> Result<u32> {
    if v > MAX_INDEX {
        return Err(unsupported(format!("{what} = {v} exceeds the CUDA kernels' index range ({MAX_INDEX})")));
    }
    Ok(v as u32)
}

/// Checks `[B, N, C]` as [`MergePlan::bipartite`] does, plus the kernels' limits.
fn check_metric_dims(dims: [usize; 3]) -> Result<()> {
    let [b, n, c] = dims;
    if n < 2 {
        return Err(shape(format!("metric has N = {n} tokens, need at least 2")));
    }
    if c == 0 {
        return Err(shape("metric has C = 0 channels: cosine similarity is undefined".into()));
    }
    if b > MAX_BATCH {
        return Err(unsupported(format!("batch {b} exceeds the CUDA grid limit ({MAX_BATCH})")));
    }
    check_index("B·N", b.saturating_mul(n))?;
    check_index("C", c)?;
    Ok(())
}

/// A [`MergePlan`] uploaded to the device: its slot map `[B, N]` and its per-slot source lists
/// (CSR: members `[B, N]`, offsets `[B, N − r + 1]`). Built by [`MergeKernel::upload`].
pub struct DevicePlan {
    batch: usize,
    tokens: usize,
    out: usize,
    slots: CudaSlice<u32>,
    members: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
}

impl std::fmt::Debug for DevicePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePlan")
            .field("batch", &self.batch)
            .field("tokens", &self.tokens)
            .field("out", &self.out)
            .finish()
    }
}

impl DevicePlan {
    /// B.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// N.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// `N − r`.
    pub fn out_tokens(&self) -> usize {
        self.out
    }
}

/// ToMe matching and merging on one [`Gpu`] (see the [module docs](self)).
///
/// ```no_run
/// use vistok::cuda::{merge::MergeKernel, Gpu};
/// use vistok::merge::{MatchConfig, MergeMode};
/// # fn main() -> vistok::Result<()> {
/// let gpu = Gpu::new(0)?;
/// let kernel = MergeKernel::new(&gpu)?;
/// let stream = gpu.stream();
/// let (b, n, c) = (2, 197, 64);
/// let metric = stream.clone_htod(&vec![0.5f32; b * n * c]).unwrap();
/// let plan = kernel.plan(stream, &metric, [b, n, c], &MatchConfig::new(49).class_token(true))?;
/// let dplan = kernel.upload(stream, &plan)?;
/// let mut y = stream.alloc_zeros::<f32>(b * plan.out_tokens() * c).unwrap();
/// kernel.merge(stream, &dplan, &metric, MergeMode::Mean, &mut y)?;
/// # Ok(()) }
/// ```
pub struct MergeKernel {
    gpu: Gpu,
    target_blocks: usize,
    tensor_cores: bool,
    /// The tensor-core similarity runs the sm_90a wgmma kernel when `C ≥ WGMMA_MIN_C`.
    wgmma: bool,
}

impl std::fmt::Debug for MergeKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergeKernel").field("gpu", &self.gpu).field("tensor_cores", &self.tensor_cores).finish()
    }
}

fn check_stream(gpu: &Gpu, what: &str, s: &Arc<CudaStream>) -> Result<()> {
    if s.context() != gpu.context() {
        return Err(Error::Invalid {
            family: Family::Merge,
            msg: format!("{what} belongs to another CUDA context than the kernel"),
        });
    }
    Ok(())
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::Length { family: Family::Merge, what, expected, got });
    }
    Ok(())
}

fn alloc<T: DeviceRepr + ValidAsZeroBits>(stream: &Arc<CudaStream>, n: usize, what: &str) -> Result<CudaSlice<T>> {
    stream.alloc_zeros::<T>(n.max(1)).map_err(|e| driver_error(&format!("allocating {what}"), e))
}

/// The operands of a similarity stage.
enum Operands {
    /// Normalised f32 rows `[B, N, C]` (the exact FFMA similarity).
    Exact(CudaSlice<f32>),
    /// Packed scaled rows and inverse norms (the tensor-core similarity).
    TensorCores { packed: CudaSlice<u16>, inv: CudaSlice<f32>, wgmma: bool, dtype: DType },
}

/// A metric's prepared similarity stage on the device (see
/// [`MergeKernel::similarity_stage`]): its operands, the grid and the per-split partial bests
/// each [`MergeKernel::run_similarity`] overwrites.
pub struct SimilarityStage {
    batch: usize,
    na: usize,
    nb: usize,
    c: usize,
    operands: Operands,
    status: CudaSlice<u64>,
    partial: CudaSlice<u64>,
    params: MergeParams,
    grid: (u32, u32, u32),
}

impl std::fmt::Debug for SimilarityStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimilarityStage")
            .field("kernel", &self.kernel())
            .field("dims", &[self.batch, self.na + self.nb, self.c])
            .field("grid", &self.grid)
            .finish()
    }
}

impl SimilarityStage {
    /// Floating-point operations of one run: `2·B·⌈N/2⌉·⌊N/2⌋·C` (a multiply and an add per
    /// A token, B token and channel), as the benches count them.
    pub fn flops(&self) -> u64 {
        2 * (self.batch as u64) * (self.na as u64) * (self.nb as u64) * (self.c as u64)
    }

    /// The entry a run launches (`merge_similarity`, `merge_similarity_mma_{dtype}` or
    /// `merge_similarity_wgmma_{dtype}`).
    pub fn kernel(&self) -> String {
        match &self.operands {
            Operands::Exact(_) => "merge_similarity".into(),
            Operands::TensorCores { wgmma: true, dtype, .. } => {
                (if *dtype == DType::F16 { WGMMA_NAMES[0] } else { WGMMA_NAMES[1] }).into()
            }
            Operands::TensorCores { dtype, .. } => kernel_name("similarity_mma", *dtype),
        }
    }

    /// The partial bests of the last run, `[B, splits, ⌈N/2⌉]` keys (an internal encoding of
    /// (score, B token); for tests: equal runs give equal keys). Waits for the stream.
    ///
    /// Errors: driver errors.
    pub fn partial_bests(&self, stream: &Arc<CudaStream>) -> Result<Vec<u64>> {
        let v = stream.clone_dtoh(&self.partial).map_err(|e| driver_error("copying the partial bests", e))?;
        stream.synchronize().map_err(|e| driver_error("cuStreamSynchronize", e))?;
        Ok(v)
    }
}

impl MergeKernel {
    /// Loads the module on `gpu` (JIT-compiled on first use).
    ///
    /// Errors: [`Error::MissingKernel`] / [`Error::Driver`] from the driver.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        gpu.function(MODULE, PTX, KERNEL_NAMES[0])?;
        Ok(MergeKernel {
            gpu: gpu.clone(),
            target_blocks: gpu.sm_count() as usize * BLOCKS_PER_SM,
            tensor_cores: false,
            wgmma: false,
        })
    }

    /// Switches the similarity of f16 / bf16 metrics to tensor cores (`mma.sync` m16n8k16, f32
    /// accumulation in an order the hardware chooses) or back to the exact f32 kernel (the
    /// default). f32 metrics always take the exact kernel.
    ///
    /// With tensor cores, `merge_pack_{dtype}` writes each token's scaled row `y` (steps 1–2
    /// of the [score contract](crate::merge#score-arithmetic), exact in the input dtype because
    /// the scale is a power of two) and `1/√ss` (step 3–4), and `merge_similarity_mma_{dtype}`
    /// computes `score(a, b) = (Σₖ y_a[k]·y_b[k]) · inv_a · inv_b`: the products are exact, the
    /// sum is accumulated in f32 by the tensor cores, then two correctly rounded products.
    /// The scores differ from the f64 reference by a few units of `C·2⁻²⁴` (relative to
    /// `Σ|u_a[k]·u_b[k]| ≤ 1`; how the tensor cores round inside an `mma` is not specified, so
    /// tests/cuda_merge.rs allows `(C/4 + 4)·2⁻²³` for the sum plus the inverse norms' error,
    /// doubled), like the exact kernel's but not bit for bit: the plan equals the reference's
    /// (and the cpu backend's) except at such near-ties. Ties between equal
    /// scores still go to the lowest index, the ranking is the same stable sort, non-finite
    /// metrics are reported the same way, and the result is the same on every run.
    ///
    /// Errors: driver errors loading the entries.
    ///
    /// ```no_run
    /// use vistok::cuda::{merge::MergeKernel, Gpu};
    /// use vistok::merge::MatchConfig;
    /// use vistok::{bf16, View};
    /// # fn main() -> vistok::Result<()> {
    /// let gpu = Gpu::new(0)?;
    /// let kernel = MergeKernel::new(&gpu)?.with_tensor_cores(true)?;
    /// let m: Vec<bf16> = [1.0f32, 0.0, 0.0, 1.0, 0.0, 2.0, 1.0, 1.0].map(bf16::from_f32).to_vec();
    /// let plan = kernel.plan_host(View::new(&m, &[1, 4, 2])?, &MatchConfig::new(1))?;
    /// assert_eq!(plan.slots(), &[0, 1, 1, 2]);
    /// # Ok(()) }
    /// ```
    ///
    /// On a compute capability 9.0 GPU (H100, H200) metrics of `C ≥ 64` channels take the
    /// Hopper kernel `merge_similarity_wgmma_*` (the same scores and partial bests, on
    /// warpgroup `wgmma`); elsewhere `merge_similarity_mma_*`. [`with_wgmma`](Self::with_wgmma)
    /// picks one explicitly.
    pub fn with_tensor_cores(mut self, on: bool) -> Result<Self> {
        if on {
            for t in TC_DTYPES {
                self.gpu.function(MODULE, PTX, &kernel_name("pack", t))?;
                self.gpu.function(MODULE, PTX, &kernel_name("similarity_mma", t))?;
            }
        }
        self.tensor_cores = on;
        let hopper = on && self.gpu.compute_capability()? == (9, 0);
        self.with_wgmma(hopper)
    }

    /// With tensor cores, chooses the sm_90a `wgmma` similarity for metrics of `C ≥ 64`
    /// channels (`true`) or the `mma.sync` one for every C (`false`, any GPU from sm_80 on),
    /// e.g. to compare the two.
    ///
    /// Errors: [`Error::Unsupported`] for `true` without tensor cores or on a GPU other than
    /// compute capability 9.0; driver errors.
    ///
    /// ```no_run
    /// use vistok::cuda::{merge::MergeKernel, Gpu};
    /// # fn main() -> vistok::Result<()> {
    /// let gpu = Gpu::new(0)?;
    /// let kernel = MergeKernel::new(&gpu)?.with_tensor_cores(true)?.with_wgmma(false)?;
    /// assert!(!kernel.wgmma());
    /// # Ok(()) }
    /// ```
    pub fn with_wgmma(mut self, on: bool) -> Result<Self> {
        if on {
            let cc = self.gpu.compute_capability()?;
            if !self.tensor_cores || cc != (9, 0) {
                return Err(Error::Unsupported {
                    family: Family::Merge,
                    msg: format!(
                        "the wgmma similarity needs tensor cores on and compute capability 9.0 (sm_90a), not {}.{}",
                        cc.0, cc.1
                    ),
                });
            }
            for name in WGMMA_NAMES {
                // ≤ 129 KB: fits u32; the same size for every launch
                self.gpu.function(MODULE_SM90, PTX_SM90, name)?.allow_dynamic_shared(WGMMA_SHARED as u32)?;
            }
        }
        self.wgmma = on;
        Ok(self)
    }

    /// Whether f16 / bf16 metrics use the tensor-core similarity.
    pub fn tensor_cores(&self) -> bool {
        self.tensor_cores
    }

    /// Whether the tensor-core similarity is the sm_90a `wgmma` kernel (for `C ≥ 64`).
    pub fn wgmma(&self) -> bool {
        self.wgmma
    }

    /// Sets the similarity grid's target block count (tests of the B-tile splits, tuning).
    #[doc(hidden)]
    pub fn with_target_blocks(mut self, blocks: usize) -> Self {
        self.target_blocks = blocks.max(1);
        self
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Reads a status word (after the stream's work) and maps it to `Ok` / the error `bad(i)`.
    fn status(&self, stream: &Arc<CudaStream>, word: &CudaSlice<u64>, bad: impl Fn(usize) -> Error) -> Result<()> {
        let w = stream.clone_dtoh(word).map_err(|e| driver_error("copying the status word", e))?;
        stream.synchronize().map_err(|e| driver_error("cuStreamSynchronize", e))?;
        match w[0] {
            0 => Ok(()),
            x => Err(bad(!x as usize)),
        }
    }

    /// ToMe's bipartite soft matching of `metric` `[B, N, C]` (`dims`) on the device; returns
    /// the same [`MergePlan`] as [`MergePlan::bipartite`] on [`Backend::Cpu`](crate::Backend::Cpu)
    /// (with [`tensor_cores`](Self::with_tensor_cores) and an f16 / bf16 metric: the same up to
    /// near-ties). Waits for the stream (the plan is copied back).
    ///
    /// Errors: as [`MergePlan::bipartite`] (dims, `N < 2`, `C = 0`, [`Error::NonFinite`] naming
    /// the first non-finite element), [`Error::Length`] if `metric.len() ≠ B·N·C`,
    /// [`Error::Unsupported`] beyond the [limits](self#limits), a stream of another context,
    /// driver errors.
    pub fn plan<M: Float>(
        &self,
        stream: &Arc<CudaStream>,
        metric: &impl DevicePtr<M>,
        dims: [usize; 3],
        config: &MatchConfig,
    ) -> Result<MergePlan> {
        let [b, n, c] = dims;
        // Validates the metric dims (before `effective_r` looks at N), its length and streams.
        let stage = self.stage(stream, metric, dims, config.effective_r(n.max(2)) > 0, config)?;
        let r = config.effective_r(n);
        let parts_empty = Parts { kept: vec![], merged: vec![], dest: vec![] };
        let Some(mut stage) = stage else {
            return Ok(MergePlan::from_parts(b, n, r, *config, parts_empty));
        };
        if r == 0 {
            self.status(stream, &stage.status, |i| non_finite("metric", i, n, c))?;
            return Ok(MergePlan::from_parts(b, n, r, *config, parts_empty));
        }
        self.run_similarity(stream, &mut stage)?;
        let na = stage.na;
        let p = stage.params;
        let mut reduced = alloc::<u64>(stream, b * na, "best B tokens")?;
        let mut order = alloc::<u64>(stream, b * na, "the ranking")?;
        {
            let f = self.gpu.function(MODULE, PTX, "merge_reduce")?;
            let (src, _r) = stage.partial.device_ptr(stream);
            let (dst, _w) = reduced.device_ptr_mut(stream);
            let params = MergeParams { src, dst, ..p };
            let grid = ((b * na).div_ceil(BLOCK as usize) as u32, 1, 1);
            // SAFETY: MergeParams as above. Thread g < B·na reads partial[(b·splits + s)·na + a]
            // (s < splits) and writes reduced[g]; both buffers have exactly those lengths.
            unsafe { f.launch(stream, grid, (BLOCK, 1, 1), &params) }?;
        }
        {
            let f = self.gpu.function(MODULE, PTX, "merge_rank")?;
            let (src, _r) = reduced.device_ptr(stream);
            let (dst, _w) = order.device_ptr_mut(stream);
            let params = MergeParams { src, dst, ..p };
            let grid = (na.div_ceil(BLOCK as usize) as u32, b as u32, 1);
            // SAFETY: MergeParams as above. Block (x, b) reads reduced[b·na + a'] for a' < na and
            // writes order[b·na + rank] with rank < na (a count of the other na − 1 tokens).
            unsafe { f.launch(stream, grid, (BLOCK, 1, 1), &params) }?;
        }
        self.status(stream, &stage.status, |i| non_finite("metric", i, n, c))?;
        let pairs = stream.clone_dtoh(&order).map_err(|e| driver_error("copying the ranking", e))?;
        stream.synchronize().map_err(|e| driver_error("cuStreamSynchronize", e))?;
        Ok(MergePlan::from_parts(b, n, r, *config, parts_from_ranking(&pairs[..b * na], b, na, r, config)))
    }

    /// The matching's similarity stage alone, for timing it (the benches' `-similarity` rows)
    /// or for engines that run it repeatedly on one metric: prepares the operands of `metric`
    /// `[B, N, C]` on `stream` (normalised f32 rows, or with
    /// [`tensor_cores`](Self::with_tensor_cores) and an f16 / bf16 metric the packed scaled rows
    /// and inverse norms) and allocates the per-split partial bests;
    /// [`run_similarity`](Self::run_similarity) then launches only the similarity kernel (the
    /// `B·⌈N/2⌉·⌊N/2⌋·C` multiply-adds, [`SimilarityStage::flops`]) — exactly the launch
    /// [`plan`](Self::plan) makes. Asynchronous; the metric's non-finite check is not read back.
    ///
    /// Errors: those of [`plan`](Self::plan) on the metric (dims, length, `N < 2`, `C = 0`,
    /// limits, streams), and [`Error::Invalid`] for `B = 0` (nothing to run).
    ///
    /// ```no_run
    /// use vistok::cuda::{merge::MergeKernel, Gpu};
    /// use vistok::bf16;
    /// # fn main() -> vistok::Result<()> {
    /// let gpu = Gpu::new(0)?;
    /// let kernel = MergeKernel::new(&gpu)?.with_tensor_cores(true)?;
    /// let stream = gpu.stream();
    /// let (b, n, c) = (8, 1024, 768);
    /// let metric = stream.clone_htod(&vec![bf16::from_f32(0.5); b * n * c]).unwrap();
    /// let mut stage = kernel.similarity_stage(stream, &metric, [b, n, c])?;
    /// let t = std::time::Instant::now();
    /// for _ in 0..10 {
    ///     kernel.run_similarity(stream, &mut stage)?;
    /// }
    /// gpu.synchronize()?;
    /// let tflops = 10.0 * stage.flops() as f64 / t.elapsed().as_secs_f64() / 1e12;
    /// println!("{}: {tflops:.0} TFLOP/s", stage.kernel());
    /// # Ok(()) }
    /// ```
    pub fn similarity_stage<M: Float>(
        &self,
        stream: &Arc<CudaStream>,
        metric: &impl DevicePtr<M>,
        dims: [usize; 3],
    ) -> Result<SimilarityStage> {
        self.stage(stream, metric, dims, true, &MatchConfig::new(1))?.ok_or_else(|| Error::Invalid {
            family: Family::Merge,
            msg: "a similarity stage of B = 0 metrics: nothing to run".into(),
        })
    }

    /// Validates, prepares the operands (`similarity`: for the similarity, else only the
    /// normalisation that checks the metric) and plans the similarity grid; `None` for B = 0.
    fn stage<M: Float>(
        &self,
        stream: &Arc<CudaStream>,
        metric: &impl DevicePtr<M>,
        dims: [usize; 3],
        similarity: bool,
        config: &MatchConfig,
    ) -> Result<Option<SimilarityStage>> {
        if !DTYPES.contains(&M::DTYPE) {
            return Err(unsupported(format!("no CUDA kernel for a {} metric", M::DTYPE.name())));
        }
        check_metric_dims(dims)?;
        let [b, n, c] = dims;
        check_len("metric", b * n * c, metric.len())?;
        check_stream(&self.gpu, "stream", stream)?;
        check_stream(&self.gpu, "metric buffer", metric.stream())?;
        if b == 0 {
            return Ok(None);
        }
        let (na, nb) = (n.div_ceil(2), n / 2);
        let tc = similarity && self.tensor_cores && TC_DTYPES.contains(&M::DTYPE);
        let mut status = alloc::<u64>(stream, 1, "the status word")?;
        let mut p = MergeParams {
            batch: b as u32,
            n: n as u32,
            c: c as u32,
            na: na as u32,
            nb: nb as u32,
            flags: u32::from(config.class_token) | (u32::from(config.distill_token) << 1),
            ..MergeParams::default()
        };
        let operands = if !tc {
            let mut buf = alloc::<f32>(stream, b * n * c, "normalised metric rows")?;
            let f = self.gpu.function(MODULE, PTX, &kernel_name("normalize", M::DTYPE))?;
            let (src, _r) = metric.device_ptr(stream);
            let (dst, _w) = buf.device_ptr_mut(stream);
            let (st, _s) = status.device_ptr_mut(stream);
            let params = MergeParams { src, dst, status: st, ..p };
            let grid = ((b * n).div_ceil(NORM_ROWS as usize) as u32, 1, 1);
            // SAFETY: parameter block MergeParams (size and offsets checked by tests/cuda_merge.rs).
            // The kernel reads metric [0, B·N·C) (= metric.len(), checked), writes u [0, B·N·C)
            // (allocated with that length) and the one status word; B·N < 2³¹ and C < 2³¹
            // (checked), flat indices are 64-bit. The guards keep the buffers borrowed until the
            // launch is enqueued; cudarc's stream-ordered frees keep them alive until it ends.
            unsafe { f.launch(stream, grid, (BLOCK, 1, 1), &params) }?;
            drop((_r, _w, _s));
            Operands::Exact(buf)
        } else {
            // Packed operands: per batch NP = ⌈na/128⌉·128 A rows then NP B rows (nb ≤ na), each
            // of CP = ⌈C/32⌉·32 channels, zero-filled padding (alloc_zeros).
            let np = na.div_ceil(TC_TILE) * TC_TILE;
            let cp = c.div_ceil(TC_K) * TC_K;
            let elems = b
                .checked_mul(2 * np)
                .and_then(|v| v.checked_mul(cp))
                .ok_or_else(|| unsupported(format!("packed tensor-core operands for [{b}, {n}, {c}] overflow")))?;
            let mut packed = alloc::<u16>(stream, elems, "packed tensor-core operands")?;
            let mut inv = alloc::<f32>(stream, b * n, "inverse norms")?;
            let f = self.gpu.function(MODULE, PTX, &kernel_name("pack", M::DTYPE))?;
            let (src, _r) = metric.device_ptr(stream);
            let (dst, _w) = packed.device_ptr_mut(stream);
            let (aux, _a) = inv.device_ptr_mut(stream);
            let (st, _s) = status.device_ptr_mut(stream);
            let params = MergeParams { src, dst, aux, status: st, ..p };
            let grid = ((b * n).div_ceil(NORM_ROWS as usize) as u32, 1, 1);
            // SAFETY: MergeParams as above. Reads metric [0, B·N·C) (checked length); token
            // row b·N + t < B·N writes packed[((2b + t mod 2)·NP + ⌊t/2⌋)·CP + k] for k < C
            // (< B·2·NP·CP = the allocation, computed without overflow above; the kernel
            // computes these offsets in 64 bits) and inv[b·N + t] (B·N entries allocated),
            // plus the status word.
            unsafe { f.launch(stream, grid, (BLOCK, 1, 1), &params) }?;
            drop((_r, _w, _a, _s));
            let wgmma = self.wgmma && c >= WGMMA_MIN_C;
            Operands::TensorCores { packed, inv, wgmma, dtype: M::DTYPE }
        };
        let (ax, splits, tiles) = if tc {
            tc_similarity_grid(b, na, nb, self.target_blocks)
        } else {
            similarity_grid(b, na, nb, self.target_blocks)
        };
        check_index("B·splits·⌈N/2⌉", b * splits as usize * na)?;
        p.splits = splits;
        p.tiles = tiles;
        let partial = alloc::<u64>(stream, b * splits as usize * na, "partial bests")?;
        let grid = (ax, splits, b as u32);
        Ok(Some(SimilarityStage { batch: b, na, nb, c, operands, status, partial, params: p, grid }))
    }

    /// Launches the similarity kernel of `stage` on `stream` (asynchronous), overwriting its
    /// partial bests: the launch [`plan`](Self::plan) makes.
    ///
    /// Errors: [`Error::Invalid`] for a stream of another context; driver errors.
    pub fn run_similarity(&self, stream: &Arc<CudaStream>, stage: &mut SimilarityStage) -> Result<()> {
        check_stream(&self.gpu, "stream", stream)?;
        let p = stage.params;
        let block = (BLOCK, 1, 1);
        match &stage.operands {
            Operands::Exact(u) => {
                let f = self.gpu.function(MODULE, PTX, "merge_similarity")?;
                let (src, _r) = u.device_ptr(stream);
                let (dst, _w) = stage.partial.device_ptr_mut(stream);
                let params = MergeParams { src, dst, ..p };
                // SAFETY: MergeParams as above. Reads u rows of batch < B (grid z = B ≤ 65535,
                // checked), A tokens 2a < N and B tokens 2j + 1 < N (guarded by na / nb), channels
                // < C; writes partial[(b·splits + s)·na + a] for a < na, s < splits: inside the
                // B·splits·na entries allocated (< 2³¹, checked). The stage owns both buffers.
                unsafe { f.launch(stream, stage.grid, block, &params) }
            }
            Operands::TensorCores { packed, inv, wgmma, dtype } => {
                let (f, shared) = if *wgmma {
                    let name = if *dtype == DType::F16 { WGMMA_NAMES[0] } else { WGMMA_NAMES[1] };
                    (self.gpu.function(MODULE_SM90, PTX_SM90, name)?, WGMMA_SHARED as u32)
                } else {
                    (self.gpu.function(MODULE, PTX, &kernel_name("similarity_mma", *dtype))?, 0)
                };
                let (src, _r) = packed.device_ptr(stream);
                let (aux, _a) = inv.device_ptr(stream);
                let (dst, _w) = stage.partial.device_ptr_mut(stream);
                let params = MergeParams { src, dst, aux, ..p };
                // SAFETY: MergeParams as above. Block (x, s, b) reads the packed A rows
                // [2b·NP + 128x, +128) and B rows (2b + 1)·NP + [128t, 128t + 128) for its tiles
                // t < ⌈nb/128⌉ ≤ NP/128, all CP channels (the wgmma kernel's 64-channel k-blocks
                // zero-fill chunks at or past CP instead of reading them): inside the allocation;
                // inv of tokens < B·N (guarded by na / nb); writes partial[(b·splits + s)·na + a]
                // for a < na as above. The wgmma kernel's dynamic shared memory is WGMMA_SHARED
                // bytes, what its layout needs (allowed in with_wgmma, which `wgmma` implies).
                unsafe { f.launch_shared(stream, stage.grid, block, shared, &params) }
            }
        }
    }

    /// [`plan`](Self::plan) from host memory on the default stream.
    pub fn plan_host<M: Float + DeviceRepr>(&self, metric: View<'_, M>, config: &MatchConfig) -> Result<MergePlan> {
        let dims: [usize; 3] = metric
            .dims()
            .try_into()
            .map_err(|_| shape(format!("metric dims {:?}, expected [B, N, C]", metric.dims())))?;
        check_metric_dims(dims)?;
        if dims[0] == 0 {
            return Ok(MergePlan::from_parts(
                0,
                dims[1],
                config.effective_r(dims[1]),
                *config,
                Parts { kept: vec![], merged: vec![], dest: vec![] },
            ));
        }
        let stream = self.gpu.stream();
        let buf = stream.clone_htod(metric.data()).map_err(|e| driver_error("copying the metric to the device", e))?;
        self.plan(stream, &buf, dims, config)
    }

    /// Uploads `plan` (its slot map and source lists) for [`merge`](Self::merge),
    /// [`merge_weighted`](Self::merge_weighted) and [`unmerge`](Self::unmerge).
    ///
    /// Errors: [`Error::Unsupported`] beyond the [limits](self#limits); driver errors.
    pub fn upload(&self, stream: &Arc<CudaStream>, plan: &MergePlan) -> Result<DevicePlan> {
        check_stream(&self.gpu, "stream", stream)?;
        let (b, n, o) = (plan.batch(), plan.tokens(), plan.out_tokens());
        check_index("B·N", b * n)?;
        check_index("B·(N − r)", b * o)?;
        let (members, offsets) = plan.csr();
        let up = |v: &[u32], what: &str| -> Result<CudaSlice<u32>> {
            if v.is_empty() {
                alloc::<u32>(stream, 1, what)
            } else {
                stream.clone_htod(v).map_err(|e| driver_error(&format!("uploading {what}"), e))
            }
        };
        Ok(DevicePlan {
            batch: b,
            tokens: n,
            out: o,
            slots: up(plan.slots(), "the plan's slots")?,
            members: up(members, "the plan's members")?,
            offsets: up(offsets, "the plan's offsets")?,
        })
    }

    /// Channels C of `x` `[B, rows, C]` with `len` elements.
    fn channels(plan: &DevicePlan, what: &str, len: usize, rows: usize) -> Result<usize> {
        let br = plan.batch * rows;
        if br == 0 {
            return Ok(0);
        }
        if !len.is_multiple_of(br) {
            return Err(shape(format!("{what} has {len} elements, not [{}, {rows}, C]", plan.batch)));
        }
        let c = len / br;
        check_index("C", c)?;
        Ok(c)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply<T: Float, S: DevicePtr<f32>, OS: DevicePtrMut<f32>>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &DevicePlan,
        kind: &str,
        x: &impl DevicePtr<T>,
        sizes: Option<&S>,
        out: &mut impl DevicePtrMut<T>,
        out_sizes: Option<&mut OS>,
    ) -> Result<Option<CudaSlice<u64>>> {
        check_stream(&self.gpu, "stream", stream)?;
        check_stream(&self.gpu, "input buffer", x.stream())?;
        check_stream(&self.gpu, "output buffer", out.stream())?;
        let c = Self::channels(plan, "x", x.len(), plan.tokens)?;
        check_len("merged output", plan.batch * plan.out * c, out.len())?;
        if let Some(s) = &sizes {
            check_len("sizes", plan.batch * plan.tokens, s.len())?;
        }
        if let Some(s) = &out_sizes {
            check_len("out_sizes", plan.batch * plan.out, s.len())?;
        }
        let f = self.gpu.function(MODULE, PTX, &kernel_name(kind, T::DTYPE))?;
        if plan.batch * plan.out == 0 {
            return Ok(None);
        }
        let mut status = alloc::<u64>(stream, 1, "the status word")?;
        let (src, _r) = x.device_ptr(stream);
        let (dst, _w) = out.device_ptr_mut(stream);
        let (st, _s) = status.device_ptr_mut(stream);
        let (aux, _m) = plan.members.device_ptr(stream);
        let (offsets, _o) = plan.offsets.device_ptr(stream);
        let (sz, _sz) = match sizes {
            Some(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (osz, _osz) = match out_sizes {
            Some(s) => {
                let (p, g) = s.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let params = MergeParams {
            src,
            dst,
            status: st,
            aux,
            offsets,
            sizes: sz,
            out_sizes: osz,
            batch: plan.batch as u32,
            n: plan.tokens as u32,
            c: c as u32,
            out: plan.out as u32,
            ..MergeParams::default()
        };
        // SAFETY: MergeParams (checked by tests/cuda_merge.rs). Block g < B·O (grid, < 2³¹)
        // reads offsets[g + b, g + b + 1] of the uploaded plan ([B, O + 1]), members
        // [b·N + off0, b·N + off1) ⊂ [b·N, (b + 1)·N) (a CSR built by MergePlan), x rows
        // b·N + t < B·N with channels < C (x.len() = B·N·C, checked), sizes [B·N] (wavg only:
        // length checked, otherwise never read), writes out row g (out.len() = B·O·C, checked),
        // out_sizes[g] (wavg only, checked) and the status word.
        unsafe { f.launch(stream, ((plan.batch * plan.out) as u32, 1, 1), (BLOCK, 1, 1), &params) }?;
        drop((_r, _w, _s, _m, _o, _sz, _osz));
        Ok(Some(status))
    }

    /// `x` `[B, N, C]` → `out` `[B, N − r, C]` (sum or mean), as [`MergePlan::merge`] on the
    /// cpu backend (bit for bit). Asynchronous (nothing to check on the device).
    ///
    /// Errors: [`Error::Shape`] if `x.len()` is not `B·N·C`, [`Error::Length`] for `out`,
    /// buffers of another context, [`Error::Unsupported`] beyond the [limits](self#limits).
    pub fn merge<T: Float>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &DevicePlan,
        x: &impl DevicePtr<T>,
        mode: MergeMode,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let kind = match mode {
            MergeMode::Sum => "sum",
            MergeMode::Mean => "mean",
        };
        self.apply::<T, CudaSlice<f32>, CudaSlice<f32>>(stream, plan, kind, x, None, out, None).map(|_| ())
    }

    /// Size-weighted average (ToMe's `merge_wavg`) as [`MergePlan::merge_weighted`] on the cpu
    /// backend (bit for bit): `out = Σ sᵢxᵢ / Σ sᵢ`, `out_sizes = Σ sᵢ`, `sizes` `[B, N]`.
    /// Waits for the size check.
    ///
    /// Errors: as [`merge`](Self::merge), [`Error::Length`] for `sizes` / `out_sizes`; a size
    /// that is not finite and positive: [`Error::Invalid`] / [`Error::NonFinite`] naming the
    /// first (outputs then unspecified).
    pub fn merge_weighted<T: Float>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &DevicePlan,
        x: &impl DevicePtr<T>,
        sizes: &CudaSlice<f32>,
        out: &mut impl DevicePtrMut<T>,
        out_sizes: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.merge_weighted_into(stream, plan, x, sizes, out, out_sizes)
    }

    /// [`merge_weighted`](Self::merge_weighted) with any device buffers for the sizes (the C
    /// ABI passes the caller's pointers).
    pub(crate) fn merge_weighted_into<T: Float>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &DevicePlan,
        x: &impl DevicePtr<T>,
        sizes: &impl DevicePtr<f32>,
        out: &mut impl DevicePtrMut<T>,
        out_sizes: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_stream(&self.gpu, "sizes buffer", sizes.stream())?;
        check_stream(&self.gpu, "out_sizes buffer", out_sizes.stream())?;
        let status = self.apply(stream, plan, "wavg", x, Some(sizes), out, Some(out_sizes))?;
        let Some(status) = status else { return Ok(()) };
        let n = plan.tokens;
        let w = stream.clone_dtoh(&status).map_err(|e| driver_error("copying the status word", e))?;
        stream.synchronize().map_err(|e| driver_error("cuStreamSynchronize", e))?;
        if w[0] == 0 {
            return Ok(());
        }
        let i = !w[0] as usize;
        // Name the size as the cpu backend does (value read back for the message).
        let all = stream.clone_dtoh(sizes).map_err(|e| driver_error("copying sizes", e))?;
        crate::merge::check_sizes(&all[..plan.batch * n], n)?;
        Err(Error::Invalid { family: Family::Merge, msg: format!("sizes[{}, {}] is not positive", i / n, i % n) })
    }

    /// `y` `[B, N − r, C]` → `out` `[B, N, C]`: every token gets its slot's row (bit copies),
    /// as [`MergePlan::unmerge`]. Asynchronous.
    ///
    /// Errors: [`Error::Shape`] if `y.len()` is not `B·(N − r)·C`, [`Error::Length`] for
    /// `out`, buffers of another context.
    pub fn unmerge<T: Float>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &DevicePlan,
        y: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        check_stream(&self.gpu, "stream", stream)?;
        check_stream(&self.gpu, "input buffer", y.stream())?;
        check_stream(&self.gpu, "output buffer", out.stream())?;
        let c = Self::channels(plan, "y", y.len(), plan.out)?;
        check_len("unmerged output", plan.batch * plan.tokens * c, out.len())?;
        let f = self.gpu.function(MODULE, PTX, &kernel_name("unmerge", T::DTYPE))?;
        if plan.batch * plan.tokens == 0 {
            return Ok(());
        }
        let (src, _r) = y.device_ptr(stream);
        let (dst, _w) = out.device_ptr_mut(stream);
        let (aux, _s) = plan.slots.device_ptr(stream);
        let params = MergeParams {
            src,
            dst,
            aux,
            batch: plan.batch as u32,
            n: plan.tokens as u32,
            c: c as u32,
            out: plan.out as u32,
            ..MergeParams::default()
        };
        // SAFETY: MergeParams (checked by tests/cuda_merge.rs). Block g < B·N (< 2³¹, checked by
        // `upload`) reads slots[g] < N − r (a MergePlan invariant), y row b·O + slot (y.len() =
        // B·O·C, checked) and writes out row g (out.len() = B·N·C, checked).
        unsafe { f.launch(stream, ((plan.batch * plan.tokens) as u32, 1, 1), (BLOCK, 1, 1), &params) }
    }

    /// [`merge`](Self::merge) from and to host memory on the default stream (uploads the plan).
    pub fn merge_host<T: Float + DeviceRepr + ValidAsZeroBits>(
        &self,
        plan: &MergePlan,
        x: View<'_, T>,
        mode: MergeMode,
    ) -> Result<Vec<T>> {
        let (b, n, o) = (plan.batch(), plan.tokens(), plan.out_tokens());
        let c = host_channels(x.dims(), b, n, "x")?;
        if b * o * c == 0 {
            return Ok(Vec::new());
        }
        let stream = self.gpu.stream();
        let dplan = self.upload(stream, plan)?;
        let xs = upload(stream, x.data())?;
        let mut y = alloc::<T>(stream, b * o * c, "the merged output")?;
        self.merge(stream, &dplan, &xs, mode, &mut y)?;
        download(stream, &y)
    }

    /// [`merge_weighted`](Self::merge_weighted) from and to host memory (sizes default to 1);
    /// returns `(out, out_sizes)`.
    pub fn merge_weighted_host<T: Float + DeviceRepr + ValidAsZeroBits>(
        &self,
        plan: &MergePlan,
        x: View<'_, T>,
        sizes: Option<View<'_, f32>>,
    ) -> Result<(Vec<T>, Vec<f32>)> {
        let (b, n, o) = (plan.batch(), plan.tokens(), plan.out_tokens());
        let c = host_channels(x.dims(), b, n, "x")?;
        let ones;
        let sizes = match sizes {
            Some(s) => {
                if s.dims() != [b, n] {
                    return Err(shape(format!("sizes dims {:?}, expected [{b}, {n}]", s.dims())));
                }
                s.data()
            }
            None => {
                ones = vec![1.0f32; b * n];
                &ones[..]
            }
        };
        if b * o == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        if c == 0 {
            // No values to move: only the sizes, summed as the kernel (and the cpu) does.
            crate::merge::check_sizes(sizes, n)?;
            let out = (0..b * o)
                .map(|g| plan.sources(g / o, g % o).iter().fold(0.0f32, |w, &t| w + sizes[(g / o) * n + t as usize]))
                .collect();
            return Ok((Vec::new(), out));
        }
        let stream = self.gpu.stream();
        let dplan = self.upload(stream, plan)?;
        let xs = upload(stream, x.data())?;
        let ss = upload(stream, sizes)?;
        let mut y = alloc::<T>(stream, b * o * c, "the merged output")?;
        let mut so = alloc::<f32>(stream, b * o, "the merged sizes")?;
        self.merge_weighted(stream, &dplan, &xs, &ss, &mut y, &mut so)?;
        Ok((download(stream, &y)?, download(stream, &so)?))
    }

    /// [`unmerge`](Self::unmerge) from and to host memory on the default stream.
    pub fn unmerge_host<T: Float + DeviceRepr + ValidAsZeroBits>(
        &self,
        plan: &MergePlan,
        y: View<'_, T>,
    ) -> Result<Vec<T>> {
        let (b, n, o) = (plan.batch(), plan.tokens(), plan.out_tokens());
        let c = host_channels(y.dims(), b, o, "y")?;
        if b * n * c == 0 {
            return Ok(Vec::new());
        }
        let stream = self.gpu.stream();
        let dplan = self.upload(stream, plan)?;
        let ys = upload(stream, y.data())?;
        let mut out = alloc::<T>(stream, b * n * c, "the unmerged output")?;
        self.unmerge(stream, &dplan, &ys, &mut out)?;
        download(stream, &out)
    }
}

/// `C` of host dims `[B, rows, C]`.
fn host_channels(dims: &[usize], b: usize, rows: usize, what: &str) -> Result<usize> {
    if dims.len() != 3 || dims[0] != b || dims[1] != rows {
        return Err(shape(format!("{what} dims {dims:?}, expected [{b}, {rows}, C]")));
    }
    Ok(dims[2])
}

fn upload<T: DeviceRepr + ValidAsZeroBits>(stream: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
    if v.is_empty() {
        return alloc::<T>(stream, 1, "an empty buffer");
    }
    stream.clone_htod(v).map_err(|e| driver_error("copying to the device", e))
}

fn download<T: DeviceRepr>(stream: &Arc<CudaStream>, v: &CudaSlice<T>) -> Result<Vec<T>> {
    let out = stream.clone_dtoh(v).map_err(|e| driver_error("copying to the host", e))?;
    stream.synchronize().map_err(|e| driver_error("cuStreamSynchronize", e))?;
    Ok(out)
}

/// The plan's parts from the ranking `order[b·na + rank] = (a, best B)` (low word: A index,
/// high word: B index), as the cpu backend assembles them from its stable sort.
///
/// ```
/// use vistok::cuda::merge::ranking_to_parts_for_tests as f;
/// use vistok::merge::MatchConfig;
/// // One batch, 3 A tokens ranked 2, 0, 1; bests B 0, 1, 0; r = 1.
/// let order = [2 | (0u64 << 32), 0 | (1 << 32), 1 | (0 << 32)];
/// assert_eq!(f(&order, 1, 3, 1, &MatchConfig::new(1)), (vec![0, 2], vec![4], vec![1]));
/// ```
pub(crate) fn parts_from_ranking(order: &[u64], batch: usize, na: usize, r: usize, cfg: &MatchConfig) -> Parts {
    let mut parts = Parts { kept: vec![], merged: vec![], dest: vec![] };
    for bi in 0..batch {
        let o = &order[bi * na..][..na];
        let a = |w: u64| (w & 0xffff_ffff) as u32;
        let j = |w: u64| (w >> 32) as u32;
        let mut unm: Vec<u32> = o[r..].iter().map(|&w| a(w)).collect();
        if cfg.class_token || cfg.keep_original_order {
            unm.sort_unstable();
        }
        parts.kept.extend(unm.iter().map(|&i| 2 * i));
        parts.merged.extend(o[..r].iter().map(|&w| 2 * a(w)));
        parts.dest.extend(o[..r].iter().map(|&w| 2 * j(w) + 1));
    }
    parts
}

/// [`parts_from_ranking`] as `(kept, merged, dest)` (for doc tests).
#[doc(hidden)]
pub fn ranking_to_parts_for_tests(
    order: &[u64],
    batch: usize,
    na: usize,
    r: usize,
    cfg: &MatchConfig,
) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let p = parts_from_ranking(order, batch, na, r, cfg);
    (p.kept, p.merged, p.dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_scheme_in_file_order() {
        let mut names: Vec<String> = DTYPES.iter().map(|&t| kernel_name("normalize", t)).collect();
        names.extend(["merge_similarity", "merge_reduce", "merge_rank"].map(String::from));
        for kind in ["sum", "mean", "wavg", "unmerge"] {
            names.extend(DTYPES.iter().map(|&t| kernel_name(kind, t)));
        }
        for kind in ["pack", "similarity_mma"] {
            names.extend(TC_DTYPES.iter().map(|&t| kernel_name(kind, t)));
        }
        assert_eq!(names, KERNEL_NAMES);
    }

    #[test]
    fn similarity_grid_covers_every_tile_without_empty_splits() {
        for batch in [1, 2, 8, 300] {
            for na in [1, 63, 64, 65, 99, 512, 2048] {
                for nb in [1, 63, 64, 65, 98, 512, 2048] {
                    let (ax, s, t) = similarity_grid(batch, na, nb, 264);
                    let nbt = nb.div_ceil(TILE) as u32;
                    assert_eq!(ax as usize, na.div_ceil(TILE));
                    assert!(s >= 1 && t >= 1 && s * t >= nbt && (s - 1) * t < nbt, "{batch} {na} {nb}");
                }
            }
        }
    }
}
