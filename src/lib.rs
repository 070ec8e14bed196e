//! # vistok — compute kernels for vision tokenizers
//!
//! Each kernel family has three backends behind one safe API: a scalar **reference** (the
//! oracle, naive on purpose), **cpu** (SIMD through `pulp`, threads through `rayon`) and
//! **cuda** (hand-written PTX loaded at run time through `cudarc`, behind the `cuda` feature).
//!
//! | family | module | status |
//! |---|---|---|
//! | patchify / unpatchify | [`patchify`] | reference, cpu, cuda |
//! | finite scalar quantization (FSQ), level / id statistics | [`fsq`] | reference, cpu, cuda (encode / decode) |
//! | LFQ / group-wise LFQ / BSQ (sign → token ids), usage statistics, entropy terms | [`lfq`] | reference, cpu, cuda (encode / decode) |
//! | codebook argmin (L2 / cosine), lookup, residual VQ | [`argmin`] | reference, cpu, cuda |
//! | fused attention (flash-style; masks, biases, log-sum-exp) | [`attention`] | reference, cpu, cuda |
//! | token merging (ToMe bipartite matching, merge / unmerge) and pruning | [`merge`] | reference, cpu, cuda |
//!
//! Every public function returns [`Result`]; bad shapes, lengths and parameters are typed
//! [`Error`]s, never panics. Optional features: `cuda` (the GPU backend), `capi` (the C ABI in
//! `capi`, header `include/vistok.h`), `testing` (proptest strategies and a differential
//! harness against [`reference`](mod@reference), in `testing`), `cli` (the `vistok` command, on by default).
//!
//! **Thread safety.** Every prepared object (plans, quantizers, codebooks, merge plans, CUDA
//! kernels) is `Send + Sync` and immutable after creation: share one across threads and call
//! it from many at once. The cpu backend parallelises inside a call on rayon's global pool.
//!
//! ```
//! use vistok::{Backend, Layout, PatchConfig, Patchify, View, ViewMut};
//! let image = vec![7u8; 1 * 3 * 8 * 8];
//! let plan = Patchify::new(&PatchConfig::image(Layout::ChannelsFirst, 4, 4), &[1, 3, 8, 8])?;
//! let mut tokens = vec![0.0f32; 4 * 48];
//! plan.forward(Backend::Cpu, View::new(&image, &[1, 3, 8, 8])?,
//!              ViewMut::new(&mut tokens, &plan.tokens_dims())?)?;
//! assert!(tokens.iter().all(|&t| t == 7.0));
//! # Ok::<(), vistok::Error>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod argmin;
pub mod attention;
#[cfg(feature = "capi")]
pub mod capi;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod fsq;
pub mod lfq;
pub mod merge;
pub mod patchify;
pub mod reference;
#[cfg(feature = "testing")]
pub mod testing;
pub mod view;

pub use argmin::{Codebook, Metric, ResidualCodebooks};
pub use attention::{Attention, Bias, Mask, QkvLayout};
pub use cpu::Isa;
pub use dtype::{bf16, f16, DType, Element, Float};
pub use error::{Error, Family, Result};
pub use fsq::{Fsq, FsqDim, FsqStats};
pub use lfq::{BitOrder, Lfq, LfqConfig, LfqEntropy, LfqStats};
pub use merge::{MatchConfig, MergeMode, MergePlan, SourceMap};
pub use patchify::{Layout, Normalize, PatchConfig, PatchOrder, Patchify};
pub use view::{Shape, View, ViewMut};

/// The README's examples, compiled and run as doc tests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Which host implementation runs a kernel. (The CUDA backend has its own entry points in
/// `vistok::cuda`, since its data lives on the device.)
///
/// ```
/// assert_eq!(vistok::Backend::default(), vistok::Backend::Cpu);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// The scalar oracle: naive loops, the specification.
    Reference,
    /// SIMD + threads, with the instruction set detected once (overridable with the
    /// `VISTOK_ISA` environment variable: `scalar`, `v3` (AVX2+FMA) or `v4` (AVX-512)).
    #[default]
    Cpu,
    /// SIMD + threads with a forced instruction set (an error if this CPU lacks it).
    CpuIsa(Isa),
}
