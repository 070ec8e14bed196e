//! Property-testing support (feature `testing`): proptest strategies for the inputs that break
//! quantizers and kernels, and a differential harness against [`crate::reference`], so that an
//! engine of your own (a SIMD kernel, a GPU port, an ONNX graph) can be checked against
//! vistok's specification in a few lines.
//!
//! - **Strategies** ([`hard_f32`], [`fsq_boundary_values`], [`odd_len`], [`awkward_dim`],
//!   [`lfq_case`], [`fsq_case`], [`near_tie_codebook`], [`argmin_case`], [`attention_case`], …):
//!   exact zeros and `−0.0`, subnormals, values within ulps of FSQ's rounding boundaries,
//!   near-tie and duplicated codebook entries, fully masked attention rows, and lengths and
//!   dimensions one off a SIMD width or a tile.
//! - **Harness** ([`check_lfq`], [`check_fsq`], [`check_argmin`] and the decode checks): your
//!   outputs against the reference's. LFQ and decodes must match exactly; FSQ levels may
//!   differ by one within [`fsq_band`] of a rounding boundary; argmin indices may differ at a
//!   near-tie within the documented f32 bound. Accepted differences are counted in the
//!   [`Report`]; anything else is a [`Mismatch`] naming the first bad output.
//!
//! The proptest version is re-exported as [`proptest`], so you need not pin the same one.
//!
//! # Example: checking your own LFQ
//! ```
//! use vistok::testing::proptest::prelude::*;
//! use vistok::testing::{check_lfq, lfq_case};
//! use vistok::{BitOrder, Lfq};
//!
//! // "Your engine": a naive sign test, bit order as the plan says.
//! fn my_lfq(plan: &Lfq, z: &[f32]) -> Vec<u32> {
//!     let d = plan.bits() as usize;
//!     let weight = |k: usize| match plan.order() {
//!         BitOrder::MsbFirst => 1u32 << (d - 1 - k),
//!         BitOrder::LsbFirst => 1u32 << k,
//!     };
//!     z.chunks(d).map(|g| (0..d).filter(|&k| g[k] > 0.0).map(weight).sum()).collect()
//! }
//!
//! proptest!(ProptestConfig::with_cases(64), |((config, z) in lfq_case())| {
//!     let plan = Lfq::new(&config).unwrap();
//!     check_lfq(&plan, &z, &my_lfq(&plan, &z))?;
//! });
//! ```
//!
//! The same for argmin, with planted near-ties (the report counts the ones accepted):
//! ```
//! use vistok::argmin::{Codebook, Metric};
//! use vistok::testing::proptest::prelude::*;
//! use vistok::testing::{argmin_case, check_argmin};
//! use vistok::View;
//!
//! // "Your engine": L2 by the expanded form ‖e‖² − 2x·e, in f32.
//! fn my_argmin(e: &[f32], d: usize, x: &[f32]) -> Vec<u32> {
//!     x.chunks(d).map(|x| {
//!         let score = |e: &[f32]| e.iter().zip(x).map(|(e, x)| e * e - 2.0 * e * x).sum::<f32>();
//!         let mut best = (0u32, f32::INFINITY);
//!         for (k, e) in e.chunks(d).enumerate() {
//!             if score(e) < best.1 { best = (k as u32, score(e)); }
//!         }
//!         best.0
//!     }).collect()
//! }
//!
//! proptest!(ProptestConfig::with_cases(32), |(c in argmin_case())| {
//!     prop_assume!(c.metric == Metric::L2);
//!     let cb = Codebook::new(View::new(&c.codebook, &[c.k, c.d]).unwrap(), c.metric).unwrap();
//!     check_argmin(&cb, &c.x, &my_argmin(&c.codebook, c.d, &c.x), None)?;
//! });
//! ```

mod harness;
mod strategies;

pub use proptest;

pub use harness::{check_argmin, check_fsq, check_fsq_decode, check_lfq, check_lfq_decode, fsq_band, Mismatch, Report};
pub use strategies::{
    argmin_case, attention_case, awkward_dim, fsq_boundary_values, fsq_case, fsq_input, fsq_levels, hard_f32,
    hard_f32_or_inf, lfq_case, lfq_config, lfq_input, near_tie_codebook, odd_len, token_count, ArgminCase,
    AttentionCase, MaskCase, NearTie,
};
