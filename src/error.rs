//! One error type for every kernel family.
//!
//! Every public function of vistok returns [`Result`]. A message always names the kernel family
//! and what was wrong, e.g. `patchify: image height 250 is not a multiple of patch height 16`.

use std::fmt;

/// The kernel family an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Family {
    /// Image / video → patch tokens.
    Patchify,
    /// Patch tokens → image / video.
    Unpatchify,
    /// Lookup-free quantization (LFQ, group-wise LFQ, BSQ).
    Lfq,
    /// Finite scalar quantization.
    Fsq,
    /// Codebook nearest-entry search (vector quantization) and code lookup.
    Argmin,
    /// Fused (flash-style) attention.
    Attention,
    /// Token merging (ToMe) and token pruning.
    Merge,
    /// Tensor views, before any kernel runs.
    View,
    /// The CUDA runtime layer (context, modules, launches).
    Cuda,
    /// The CPU backend itself (e.g. a forced instruction set this CPU lacks).
    Cpu,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Patchify => "patchify",
            Family::Unpatchify => "unpatchify",
            Family::Lfq => "lfq",
            Family::Fsq => "fsq",
            Family::Argmin => "argmin",
            Family::Attention => "attention",
            Family::Merge => "merge",
            Family::View => "view",
            Family::Cuda => "cuda",
            Family::Cpu => "cpu",
        })
    }
}

/// Everything that can go wrong in vistok.
///
/// ```
/// use vistok::{Error, Family};
/// let e = Error::Length { family: Family::Patchify, what: "image", expected: 12, got: 11 };
/// assert_eq!(e.to_string(), "patchify: image has 11 elements, expected 12");
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A buffer has the wrong number of elements for its shape.
    Length {
        /// Kernel family.
        family: Family,
        /// Which buffer.
        what: &'static str,
        /// Elements the shape requires.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// A shape is wrong: rank, a zero-sized dimension, a size that does not divide, …
    Shape {
        /// Kernel family.
        family: Family,
        /// What is wrong, naming the dimension, expected vs got.
        msg: String,
    },
    /// A parameter is invalid (e.g. a zero std, a non-finite scale).
    Invalid {
        /// Kernel family.
        family: Family,
        /// What is wrong.
        msg: String,
    },
    /// A product of sizes overflows `usize` (or the index type a backend uses).
    Overflow {
        /// Kernel family.
        family: Family,
        /// Which product overflowed, with its factors.
        what: String,
    },
    /// A buffer is not aligned as the kernel requires.
    Alignment {
        /// Kernel family.
        family: Family,
        /// Which buffer.
        what: &'static str,
        /// Required alignment in bytes.
        required: usize,
    },
    /// An input holds a value the kernel defines no result for (NaN, or ±∞ where that matters).
    NonFinite {
        /// Kernel family.
        family: Family,
        /// Which buffer and where, e.g. `x[3, 7]`: the first offending element in flat order.
        what: String,
    },
    /// The combination of dtype / shape / option is not supported by this backend.
    Unsupported {
        /// Kernel family.
        family: Family,
        /// What is not supported.
        msg: String,
    },
    /// The CUDA driver library (libcuda) could not be loaded.
    NoCudaDriver,
    /// The CUDA driver loaded but there is no device with this ordinal.
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A kernel entry point is missing from the embedded PTX.
    MissingKernel {
        /// Module name.
        module: &'static str,
        /// Entry point name.
        name: String,
    },
    /// An error reported by the CUDA driver.
    Driver(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Length { family, what, expected, got } => {
                write!(f, "{family}: {what} has {got} elements, expected {expected}")
            }
            Error::Shape { family, msg } | Error::Invalid { family, msg } => write!(f, "{family}: {msg}"),
            Error::Overflow { family, what } => write!(f, "{family}: size overflow: {what}"),
            Error::Alignment { family, what, required } => {
                write!(f, "{family}: {what} must be aligned to {required} bytes")
            }
            Error::NonFinite { family, what } => write!(f, "{family}: {what} is not finite"),
            Error::Unsupported { family, msg } => write!(f, "{family}: unsupported: {msg}"),
            Error::NoCudaDriver => f.write_str("cuda: no CUDA driver (libcuda could not be loaded)"),
            Error::NoDevice { ordinal, count } => {
                write!(f, "cuda: no device with ordinal {ordinal} ({count} devices present)")
            }
            Error::MissingKernel { module, name } => {
                write!(f, "cuda: kernel {name} is missing from module {module}")
            }
            Error::Driver(msg) => write!(f, "cuda: driver error: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with vistok's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Multiplies sizes, reporting overflow as a typed error naming `what`.
pub(crate) fn checked_product(family: Family, what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Overflow { family, what: format!("{what} {dims:?}") })
}
