//! The bench cases: what each kernel family contributes to `vistok bench`.
//!
//! A family lists its cases in `cases/<family>.rs` and is named once in [`FAMILIES`]; the
//! harness (timing, roofline, table, JSON, baseline, plot) knows nothing else about it. A case
//! is cheap to describe (id, bytes, flops) and expensive to prepare, so preparation is deferred
//! to [`Case::setup`] and only happens for cases that pass `--filter`.

mod argmin;
mod attention;
mod fsq;
mod lfq;
mod merge;
mod patchify;

use std::cell::OnceCell;
use std::rc::Rc;

use vistok::Element;

/// Every family's case list, in the order the table shows them. Adding a family: one file
/// under `cases/` and one entry here.
const FAMILIES: &[Family] = &[patchify::cases, lfq::cases, fsq::cases, argmin::cases, attention::cases, merge::cases];

/// A family's case list (an error only if a built-in shape is invalid).
type Family = fn(&Env) -> Result<Vec<Case>, String>;

/// What the families may use to build their cases.
pub struct Env {
    /// The GPU, when built with `--features cuda` and a device is present.
    #[cfg(feature = "cuda")]
    pub gpu: Option<vistok::cuda::Gpu>,
}

/// All cases of all families (described, not yet prepared).
pub fn all(env: &Env) -> Result<Vec<Case>, String> {
    let mut out = vec![];
    for family in FAMILIES {
        out.extend(family(env)?);
    }
    Ok(out)
}

/// Where a case runs; the roofline of its row comes from the matching machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The scalar oracle.
    Reference,
    /// SIMD + threads.
    Cpu,
    /// The CUDA device.
    Cuda,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Reference => "reference",
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }
}

/// Which compute ceiling bounds a case's flops (the memory ceiling is the same for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peak {
    /// f32 fused multiply-add.
    F32,
    /// bf16 dot products accumulating in f32 (`vdpbf16ps`, tensor cores).
    Bf16,
}

/// A prepared case: input and output allocated, ready to run.
pub trait Runner {
    /// Runs the kernel `n` times back to back. A device backend waits for the last launch, so
    /// the caller's clock covers all `n`.
    fn run(&mut self, n: u32) -> Result<(), String>;

    /// Compares the output of the last run with the reference backend's.
    fn check(self: Box<Self>) -> Result<Check, String>;
}

/// The outcome of comparing a backend's output with the reference.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// This row is the reference itself.
    Oracle,
    /// Bit-identical to the reference.
    Exact,
    /// Differs; `max_abs` is the largest absolute difference (∞ for a NaN mismatch), `tol` the
    /// family's allowance.
    Differs { max_abs: f64, tol: f64 },
}

impl Check {
    pub fn ok(&self) -> bool {
        match *self {
            Check::Oracle | Check::Exact => true,
            Check::Differs { max_abs, tol } => max_abs <= tol,
        }
    }
}

/// One bench case: a kernel of a family on one backend, dtype and shape.
pub struct Case {
    pub family: &'static str,
    pub backend: Backend,
    /// `in-out` element types, e.g. `u8-f32`.
    pub dtype: String,
    /// The shape's name, e.g. `32x3x256x256-nchw-p16`.
    pub shape: String,
    /// Minimum bytes moved by one run: every input byte read once, every output byte written
    /// once.
    pub bytes: u64,
    /// Useful flops of one run (0 where flops don't describe the work).
    pub flops: u64,
    pub peak: Peak,
    /// Allocates and fills the data (deferred: only cases that pass the filter pay for it).
    pub setup: Box<dyn Fn() -> Result<Box<dyn Runner>, String>>,
}

impl Case {
    /// `family/backend/dtype/shape`, as the criterion benches name it.
    pub fn id(&self) -> String {
        format!("{}/{}/{}/{}", self.family, self.backend.name(), self.dtype, self.shape)
    }
}

/// A value computed at most once and shared by the cases of one shape: the input data, and the
/// reference output that every backend's check compares with. The reference case donates its
/// own output (so the oracle runs once per shape); if `--filter` skipped it, the first check
/// computes it.
pub struct Shared<T> {
    cell: OnceCell<T>,
    make: Box<dyn Fn() -> Result<T, String>>,
}

impl<T> Shared<T> {
    pub fn new(make: impl Fn() -> Result<T, String> + 'static) -> Rc<Self> {
        Rc::new(Shared { cell: OnceCell::new(), make: Box::new(make) })
    }

    pub fn get(&self) -> Result<&T, String> {
        if let Some(v) = self.cell.get() {
            return Ok(v);
        }
        let v = (self.make)()?;
        Ok(self.cell.get_or_init(|| v))
    }

    /// Stores `v` unless a value is already there.
    pub fn offer(&self, v: T) {
        let _ = self.cell.set(v);
    }
}

/// Bit-identical → [`Check::Exact`]; otherwise the largest absolute difference.
pub fn compare<T: Element>(got: &[T], want: &[T], tol: f64) -> Result<Check, String> {
    if got.len() != want.len() {
        return Err(format!("output has {} elements, the reference {}", got.len(), want.len()));
    }
    if bytemuck::cast_slice::<T, u8>(got) == bytemuck::cast_slice::<T, u8>(want) {
        return Ok(Check::Exact);
    }
    let max_abs = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            let (g, w) = (f64::from(g.to_f32()), f64::from(w.to_f32()));
            match (g.is_nan(), w.is_nan()) {
                (true, true) => 0.0,
                (false, false) if g == w => 0.0,
                (false, false) => (g - w).abs(),
                _ => f64::INFINITY,
            }
        })
        .fold(0.0, f64::max);
    Ok(Check::Differs { max_abs, tol })
}

/// Deterministic, non-trivial data (a multiplicative hash mod 251): the same bytes on every
/// machine, so baselines compare like with like.
pub fn data<T: Element>(n: usize) -> Vec<T> {
    (0..n).map(|i| T::from_f32((i.wrapping_mul(2_654_435_761) % 251) as f32)).collect()
}
