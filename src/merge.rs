//! Token merging (ToMe's bipartite soft matching) and token pruning (EViT top-k, DivPrune).
//!
//! As in ToMe's `merge.py`, computing *which* tokens merge ([`MergePlan::bipartite`]) is
//! separate from *applying* it ([`MergePlan::merge`], [`MergePlan::merge_weighted`],
//! [`MergePlan::unmerge`], [`SourceMap`]): one plan, computed once per layer from the metric
//! (ToMe uses the keys averaged over heads), is applied to any number of tensors.
//!
//! # Bipartite soft matching (ToMe's `bipartite_soft_matching`)
//! - Metric `[B, N, Cm]` (`f32`, `f16`, `bf16`), `N ≥ 2`, `Cm ≥ 1`, every element finite
//!   (else [`Error::NonFinite`] naming the first offending element in flat order).
//! - `r ← min(r, ⌊(N − protected)/2⌋)` where `protected` counts `class_token` and
//!   `distill_token` (ToMe's clamp; never an error). One deliberate addition: with a
//!   distillation token and `N = 3` the only B token is the distillation token, which is never a
//!   target, so `r ← 0` (ToMe would merge into it). After clamping, `r = 0` is the identity:
//!   the output is the input, in its original order (ToMe's `do_nothing`).
//! - Set A = even tokens `0, 2, 4, …` (`⌈N/2⌉` of them), set B = odd tokens `1, 3, …`
//!   (`⌊N/2⌋`). Score = cosine similarity of the L2-normalised metric rows. A token whose
//!   metric is all zeros has score 0 with everything (ToMe divides by zero there).
//! - With `class_token`, A's token 0 scores −∞ against every B token (it is never merged);
//!   with `distill_token`, B's token 0 (token 1) is never a target.
//! - For each A token: its best B token (ties → the lowest B index) and that score. A tokens
//!   are ranked by score, descending, **ties → the lower A index** (ToMe's `argsort` is
//!   unstable there; vistok is deterministic). The first `r` are merged into their best B
//!   token, the others are kept.
//! - Output order, as ToMe: the kept A tokens (in rank order; in ascending token order when
//!   there is a class token), then all B tokens; with a distillation token ToMe's
//!   `[unm0, dst0, unm1:, dst1:]`. With [`MatchConfig::keep_original_order`] every output token
//!   (kept A tokens and all B tokens) is instead in ascending order of its original index.
//!
//! ## Score arithmetic
//! The reference computes in f64 (normalise by `√Σx²`, then a plain dot product). The CPU
//! backend computes in f32 with one fixed order, so its plan is bit-identical on every ISA
//! level and thread count:
//! 1. `v = x as f32` (exact); `m = max|v|`; if `m = 0` the row is all zeros.
//! 2. `p = 2^−e` with `e = ⌊log₂ m⌋` clamped to `[−126, 126]`; `y_k = v_k·p` (exact but for
//!    underflow), so `max|y| ∈ [1, 2)` and no square below can overflow or vanish.
//! 3. `ss`: 16 lane sums, lane `l` adds `fma(y_k, y_k, ·)` for `k ≡ l (mod 16)` in increasing
//!    `k` from `+0`; then lanes `l += l+8`, `l += l+4`, `l += l+2`, `l += l+1`.
//! 4. `u_k = y_k · (1 / √ss)` (`√` and `/` correctly rounded).
//! 5. `score(a, b)`: `s = +0; for k in 0..Cm { s = fma(u_a[k], u_b[k], s) }`.
//!
//! Its scores differ from the f64 reference by at most about `(Cm + 6)·2⁻²⁴`, so plans agree
//! with the reference except where two relevant scores (the best and second-best B of a merged
//! A token, or neighbours in the ranking) are closer than that: such near-ties may resolve
//! either way. `−0` and `+0` compare equal.
//!
//! # Applying a plan
//! - [`MergePlan::merge`]: `x [B, N, C] → [B, N − r, C]`, [`MergeMode::Sum`] or
//!   [`MergeMode::Mean`] (ToMe's `scatter_reduce` with the destination included).
//! - [`MergePlan::merge_weighted`]: size-weighted average `x' = Σ sᵢxᵢ / Σ sᵢ`, `s' = Σ sᵢ`
//!   (ToMe's `merge_wavg`), sizes `[B, N]` f32 (default 1), finite and positive.
//! - [`MergePlan::unmerge`]: `y [B, N − r, C] → [B, N, C]`, every token gets the value of the
//!   slot it went to (tomesd's unmerge); [`SourceMap`] composes plans across layers in
//!   `O(B·N)` memory (ToMe's source tracking without its `N×N` matrix) and unmerges through
//!   all of them at once.
//! - [`size_bias`]: `log(size)`, the additive key bias of ToMe's proportional attention.
//!
//! Value arithmetic: the reference sums in f64 and rounds once. The CPU backend sums in f32 in
//! ascending original token order (sum / mean: `Σ xᵢ`, then `/ count`; weighted:
//! `Σ fma(xᵢ, sᵢ, ·) / Σ sᵢ`) and rounds once to the output type. An output token with a
//! single source (every kept A token, every B token nothing merged into) is an exact copy.
//! Within that, CPU results match the reference to float tolerance (tests: error against the
//! f64 oracle at most twice that of a naive same-dtype implementation).
//!
//! # Pruning
//! - [`Selection::top_k`] (EViT): keep the `k` tokens with the highest score (e.g. the class
//!   token's attention), in descending score order, ties → lower index;
//!   [`Selection::gather_fused`] appends EViT's fused token `Σ sᵢxᵢ` over the pruned tokens.
//! - [`Selection::div_prune`] (DivPrune): greedy max-min diversity under cosine distance.
//! - With `class_token`, token 0 is always kept (first) and never competes.
//!
//! ```
//! use vistok::merge::{MatchConfig, MergeMode, MergePlan};
//! use vistok::{Backend, View, ViewMut};
//! // One image, 4 tokens of 2 channels: token 2 is parallel to token 1.
//! let x = [1.0f32, 0.0, /* 1 */ 0.0, 1.0, /* 2 */ 0.0, 2.0, /* 3 */ 1.0, 1.0];
//! let plan = MergePlan::bipartite(Backend::Cpu, View::new(&x, &[1, 4, 2])?, &MatchConfig::new(1))?;
//! assert_eq!((plan.merged(0), plan.destinations(0), plan.kept(0)), (&[2][..], &[1][..], &[0][..]));
//! let mut y = [0.0f32; 6];
//! plan.merge(Backend::Cpu, View::new(&x, &[1, 4, 2])?, MergeMode::Mean, ViewMut::new(&mut y, &[1, 3, 2])?)?;
//! assert_eq!(y, [1.0, 0.0, /* (t1 + t2) / 2 */ 0.0, 1.5, /* t3 */ 1.0, 1.0]);
//! # Ok::<(), vistok::Error>(())
//! ```

use crate::dtype::Float;
use crate::error::{checked_product, Error, Family, Result};
use crate::view::{View, ViewMut};
use crate::Backend;

fn shape_err(msg: String) -> Error {
    Error::Shape { family: Family::Merge, msg }
}

fn invalid(msg: String) -> Error {
    Error::Invalid { family: Family::Merge, msg }
}

/// Options of [`MergePlan::bipartite`]: ToMe's `r`, `class_token`, `distill_token`, plus the
/// output order.
///
/// ```
/// use vistok::merge::MatchConfig;
/// let c = MatchConfig::new(16).class_token(true).keep_original_order(true);
/// assert_eq!((c.r, c.class_token, c.distill_token, c.keep_original_order), (16, true, false, true));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatchConfig {
    /// Tokens to remove (clamped, see the [module docs](self)).
    pub r: usize,
    /// Token 0 is a class token: never merged.
    pub class_token: bool,
    /// Token 1 is a distillation token (DeiT): never a merge target.
    pub distill_token: bool,
    /// Output tokens in their original order instead of ToMe's `[kept A…, B…]`.
    pub keep_original_order: bool,
}

impl MatchConfig {
    /// Remove `r` tokens, no protected tokens, ToMe's output order.
    pub fn new(r: usize) -> Self {
        MatchConfig { r, class_token: false, distill_token: false, keep_original_order: false }
    }

    /// Sets [`class_token`](Self::class_token).
    pub fn class_token(mut self, on: bool) -> Self {
        self.class_token = on;
        self
    }

    /// Sets [`distill_token`](Self::distill_token).
    pub fn distill_token(mut self, on: bool) -> Self {
        self.distill_token = on;
        self
    }

    /// Sets [`keep_original_order`](Self::keep_original_order).
    pub fn keep_original_order(mut self, on: bool) -> Self {
        self.keep_original_order = on;
        self
    }

    /// The `r` actually used for `n` tokens (see the [module docs](self)).
    ///
    /// ```
    /// use vistok::merge::MatchConfig;
    /// assert_eq!(MatchConfig::new(100).effective_r(197), 98);
    /// assert_eq!(MatchConfig::new(100).class_token(true).effective_r(197), 98);
    /// assert_eq!(MatchConfig::new(100).class_token(true).effective_r(198), 98);
    /// assert_eq!(MatchConfig::new(1).distill_token(true).effective_r(3), 0);
    /// ```
    pub fn effective_r(&self, n: usize) -> usize {
        let protected = self.class_token as usize + self.distill_token as usize;
        let r = self.r.min(n.saturating_sub(protected) / 2);
        if self.distill_token && n / 2 <= 1 {
            0
        } else {
            r
        }
    }
}

/// How [`MergePlan::merge`] combines the tokens that land in one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MergeMode {
    /// `Σ xᵢ` (ToMe `mode="sum"`).
    Sum,
    /// `Σ xᵢ / count` (ToMe's default `mode="mean"`).
    Mean,
}

/// Which tokens merge where: per batch, the kept A tokens, the merged A tokens and their
/// destinations, all as original token indices. Built by [`MergePlan::bipartite`]; applied by
/// [`merge`](Self::merge), [`merge_weighted`](Self::merge_weighted),
/// [`unmerge`](Self::unmerge) and [`SourceMap::apply`].
///
/// See the [module docs](self) for the contract and an example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergePlan {
    batch: usize,
    tokens: usize,
    r: usize,
    config: MatchConfig,
    /// `[B, ⌈N/2⌉ − r]`
    kept: Vec<u32>,
    /// `[B, r]`
    merged: Vec<u32>,
    /// `[B, r]`
    dest: Vec<u32>,
    /// `[B, N]`: the output slot of every input token.
    slots: Vec<u32>,
    /// `[B, N]`: input tokens grouped by slot, ascending within a slot (CSR with `offsets`).
    members: Vec<u32>,
    /// `[B, N − r + 1]`, relative to the batch's start in `members`.
    offsets: Vec<u32>,
}

/// Checks `metric` `[B, N, Cm]`; returns `(B, N, Cm)`.
fn check_metric(dims: &[usize]) -> Result<(usize, usize, usize)> {
    if dims.len() != 3 {
        return Err(shape_err(format!("metric dims {dims:?}, expected [B, N, C]")));
    }
    let (b, n, c) = (dims[0], dims[1], dims[2]);
    if n < 2 {
        return Err(shape_err(format!("metric has N = {n} tokens, need at least 2")));
    }
    if c == 0 {
        return Err(shape_err("metric has C = 0 channels: cosine similarity is undefined".into()));
    }
    if u32::try_from(n).is_err() {
        return Err(Error::Overflow { family: Family::Merge, what: format!("token count {n} exceeds u32") });
    }
    Ok((b, n, c))
}

/// The error for a non-finite element at flat index `i` of a `[.., n, c]` tensor.
pub(crate) fn non_finite(what: &str, i: usize, n: usize, c: usize) -> Error {
    Error::NonFinite { family: Family::Merge, what: format!("{what}[{}, {}, {}]", i / (n * c), i / c % n, i % c) }
}

/// The first size that is not finite and positive, as an error.
pub(crate) fn check_sizes(sizes: &[f32], n: usize) -> Result<()> {
    match sizes.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        None => Ok(()),
        Some(i) if sizes[i].is_finite() => {
            Err(invalid(format!("sizes[{}, {}] = {} is not positive", i / n, i % n, sizes[i])))
        }
        Some(i) => Err(Error::NonFinite { family: Family::Merge, what: format!("sizes[{}, {}]", i / n, i % n) }),
    }
}

/// The per-batch result of a matcher backend: original token indices.
pub(crate) struct Parts {
    pub kept: Vec<u32>,
    pub merged: Vec<u32>,
    pub dest: Vec<u32>,
}

impl MergePlan {
    /// Matches the tokens of `metric` `[B, N, Cm]` (ToMe's `bipartite_soft_matching`).
    ///
    /// Errors: dims not `[B, N, Cm]`, `N < 2`, `Cm = 0`, a non-finite metric element (naming
    /// the first), or a forced [`Backend::CpuIsa`] level this CPU lacks.
    ///
    /// ```
    /// use vistok::merge::{MatchConfig, MergePlan};
    /// use vistok::{Backend, View};
    /// // 5 tokens, 1 channel, a class token: r = 3 is clamped to ⌊(5 − 1)/2⌋ = 2.
    /// let m = [9.0f32, 1.0, 1.0, -1.0, -1.0];
    /// let plan = MergePlan::bipartite(Backend::Reference, View::new(&m, &[1, 5, 1])?,
    ///                                 &MatchConfig::new(3).class_token(true))?;
    /// assert_eq!((plan.r(), plan.out_tokens()), (2, 3));
    /// assert_eq!(plan.kept(0), &[0]); // the class token stays
    /// assert_eq!(plan.merged(0), &[2, 4]); // ranked: both score 1, lower index first
    /// assert_eq!(plan.destinations(0), &[1, 3]);
    /// assert!(MergePlan::bipartite(Backend::Cpu, View::new(&m[..1], &[1, 1, 1])?, &MatchConfig::new(1)).is_err());
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn bipartite<M: Float>(backend: Backend, metric: View<'_, M>, config: &MatchConfig) -> Result<MergePlan> {
        let (b, n, c) = check_metric(metric.dims())?;
        let r = config.effective_r(n);
        let parts = match backend {
            Backend::Reference => crate::reference::merge::bipartite(metric.data(), b, n, c, config, r)?,
            Backend::Cpu => crate::cpu::merge::bipartite(crate::cpu::Isa::detect(), metric.data(), b, n, c, config, r)?,
            Backend::CpuIsa(isa) => crate::cpu::merge::bipartite(isa.check()?, metric.data(), b, n, c, config, r)?,
        };
        Ok(MergePlan::from_parts(b, n, r, *config, parts))
    }

    /// Assembles a plan from a matcher's output (`r` already clamped; indices valid).
    pub(crate) fn from_parts(batch: usize, n: usize, r: usize, config: MatchConfig, parts: Parts) -> MergePlan {
        let na = n.div_ceil(2);
        let out = n - r;
        let mut slots = vec![0u32; batch * n];
        let mut members = vec![0u32; batch * n];
        let mut offsets = vec![0u32; batch * (out + 1)];
        for bi in 0..batch {
            let slots = &mut slots[bi * n..][..n];
            let nk = if r == 0 { 0 } else { na - r };
            let kept = &parts.kept[bi * nk..][..nk];
            if r == 0 {
                slots.iter_mut().enumerate().for_each(|(t, s)| *s = t as u32);
            } else if config.keep_original_order {
                // Survivors (kept A tokens and all B tokens) in ascending token order.
                let mut survive = vec![false; n];
                kept.iter().for_each(|&t| survive[t as usize] = true);
                (1..n).step_by(2).for_each(|t| survive[t] = true);
                let mut next = 0u32;
                for (t, s) in slots.iter_mut().enumerate() {
                    if survive[t] {
                        *s = next;
                        next += 1;
                    }
                }
            } else {
                // ToMe: [kept…, B…], or [kept0, B0, kept1…, B1…] with a distillation token.
                let d = config.distill_token as usize;
                for (i, &t) in kept.iter().enumerate() {
                    slots[t as usize] = if d == 1 && i > 0 { i + 1 } else { i } as u32;
                }
                for j in 0..n / 2 {
                    slots[2 * j + 1] = if d == 1 && j == 0 { 1 } else { nk + j } as u32;
                }
            }
            if r > 0 {
                let merged = &parts.merged[bi * r..][..r];
                let dest = &parts.dest[bi * r..][..r];
                for (&m, &d) in merged.iter().zip(dest) {
                    slots[m as usize] = slots[d as usize];
                }
            }
            // Counting sort of the tokens by slot (stable: ascending token order within a slot).
            let offsets = &mut offsets[bi * (out + 1)..][..out + 1];
            slots.iter().for_each(|&s| offsets[s as usize + 1] += 1);
            for s in 0..out {
                offsets[s + 1] += offsets[s];
            }
            let mut fill = offsets[..out].to_vec();
            let members = &mut members[bi * n..][..n];
            for (t, &s) in slots.iter().enumerate() {
                members[fill[s as usize] as usize] = t as u32;
                fill[s as usize] += 1;
            }
        }
        MergePlan {
            batch,
            tokens: n,
            r,
            config,
            kept: parts.kept,
            merged: parts.merged,
            dest: parts.dest,
            slots,
            members,
            offsets,
        }
    }

    /// Batch size B.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Input tokens N.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Tokens removed (the clamped `r`).
    pub fn r(&self) -> usize {
        self.r
    }

    /// Output tokens `N − r`.
    pub fn out_tokens(&self) -> usize {
        self.tokens - self.r
    }

    /// The configuration the plan was built with (`r` as asked, before clamping).
    pub fn config(&self) -> &MatchConfig {
        &self.config
    }

    /// The kept A tokens of batch `b` (original indices), in ToMe's `unm_idx` order: by rank,
    /// or ascending with a class token or [`MatchConfig::keep_original_order`]. Empty when
    /// `r = 0`. Panics if `b ≥ B`.
    pub fn kept(&self, b: usize) -> &[u32] {
        let k = if self.r == 0 { 0 } else { self.tokens.div_ceil(2) - self.r };
        &self.kept[b * k..][..k]
    }

    /// The merged A tokens of batch `b` (original indices), best score first. Panics if `b ≥ B`.
    pub fn merged(&self, b: usize) -> &[u32] {
        &self.merged[b * self.r..][..self.r]
    }

    /// The destination B token (original index) of each of [`merged`](Self::merged)`(b)`.
    /// Panics if `b ≥ B`.
    pub fn destinations(&self, b: usize) -> &[u32] {
        &self.dest[b * self.r..][..self.r]
    }

    /// The assignment map `[B, N]`: the output slot (`< N − r`) every input token goes to.
    ///
    /// ```
    /// use vistok::merge::{MatchConfig, MergePlan};
    /// use vistok::{Backend, View};
    /// let m = [1.0f32, 0.0, 0.0, 1.0, 0.0, 2.0, 1.0, 1.0];
    /// let plan = MergePlan::bipartite(Backend::Cpu, View::new(&m, &[1, 4, 2])?, &MatchConfig::new(1))?;
    /// assert_eq!(plan.slots(), &[0, 1, 1, 2]); // token 2 went into token 1's slot
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// The input tokens of output slot `s` of batch `b`, ascending. Panics if out of range.
    pub fn sources(&self, b: usize, s: usize) -> &[u32] {
        let off = &self.offsets[b * (self.out_tokens() + 1)..];
        &self.members[b * self.tokens..][off[s] as usize..off[s + 1] as usize]
    }

    /// `(members [B, N], offsets [B, N − r + 1])`: the CSR form of [`sources`](Self::sources).
    pub(crate) fn csr(&self) -> (&[u32], &[u32]) {
        (&self.members, &self.offsets)
    }

    /// Checks `x` `[B, N, C]` against the plan; returns C.
    fn check_in(&self, what: &str, dims: &[usize], n: usize) -> Result<usize> {
        if dims.len() != 3 || dims[0] != self.batch || dims[1] != n {
            return Err(shape_err(format!("{what} dims {dims:?}, expected [{}, {n}, C]", self.batch)));
        }
        Ok(dims[2])
    }

    fn check_out(&self, what: &str, dims: &[usize], n: usize, c: usize) -> Result<()> {
        if dims != [self.batch, n, c] {
            return Err(shape_err(format!("{what} dims {dims:?}, expected [{}, {n}, {c}]", self.batch)));
        }
        Ok(())
    }

    /// `x [B, N, C] → out [B, N − r, C]`: each output slot is the sum or mean of its sources.
    ///
    /// Errors: dims that do not fit the plan, or a forced [`Backend::CpuIsa`] level this CPU
    /// lacks.
    ///
    /// ```
    /// use vistok::merge::{MatchConfig, MergeMode, MergePlan};
    /// use vistok::{Backend, View, ViewMut};
    /// let m = [1.0f32, 0.0, 0.0, 1.0, 0.0, 2.0, 1.0, 1.0];
    /// let plan = MergePlan::bipartite(Backend::Cpu, View::new(&m, &[1, 4, 2])?, &MatchConfig::new(1))?;
    /// let x = [1.0f32, 2.0, 3.0, 4.0];
    /// let mut y = [0.0f32; 3];
    /// plan.merge(Backend::Cpu, View::new(&x, &[1, 4, 1])?, MergeMode::Sum, ViewMut::new(&mut y, &[1, 3, 1])?)?;
    /// assert_eq!(y, [1.0, 5.0, 4.0]);
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn merge<T: Float>(
        &self,
        backend: Backend,
        x: View<'_, T>,
        mode: MergeMode,
        mut out: ViewMut<'_, T>,
    ) -> Result<()> {
        let c = self.check_in("x", x.dims(), self.tokens)?;
        self.check_out("merged output", out.dims(), self.out_tokens(), c)?;
        let (x, out) = (x.data(), out.data_mut());
        match backend {
            Backend::Reference => crate::reference::merge::merge(self, x, c, mode, None, out, None),
            Backend::Cpu => crate::cpu::merge::merge(self, crate::cpu::Isa::detect(), x, c, mode, None, out, None),
            Backend::CpuIsa(isa) => crate::cpu::merge::merge(self, isa.check()?, x, c, mode, None, out, None),
        }
        Ok(())
    }

    /// Size-weighted average (ToMe's `merge_wavg`): `out = Σ sᵢxᵢ / Σ sᵢ` and
    /// `out_sizes = Σ sᵢ` over each slot's sources, with `sizes` `[B, N]` (all 1 if `None`).
    ///
    /// Errors: dims that do not fit the plan (`sizes` `[B, N]`, `out_sizes` `[B, N − r]`), a
    /// size that is not finite and positive, or a forced [`Backend::CpuIsa`] level this CPU
    /// lacks.
    ///
    /// ```
    /// use vistok::merge::{MatchConfig, MergePlan};
    /// use vistok::{Backend, View, ViewMut};
    /// let m = [1.0f32, 0.0, 0.0, 1.0, 0.0, 2.0, 1.0, 1.0];
    /// let plan = MergePlan::bipartite(Backend::Cpu, View::new(&m, &[1, 4, 2])?, &MatchConfig::new(1))?;
    /// let (x, sizes) = ([1.0f32, 2.0, 5.0, 4.0], [1.0f32, 1.0, 3.0, 1.0]);
    /// let (mut y, mut s) = ([0.0f32; 3], [0.0f32; 3]);
    /// plan.merge_weighted(Backend::Cpu, View::new(&x, &[1, 4, 1])?, Some(View::new(&sizes, &[1, 4])?),
    ///                     ViewMut::new(&mut y, &[1, 3, 1])?, ViewMut::new(&mut s, &[1, 3])?)?;
    /// assert_eq!((y, s), ([1.0, 4.25, 4.0], [1.0, 4.0, 1.0]));
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn merge_weighted<T: Float>(
        &self,
        backend: Backend,
        x: View<'_, T>,
        sizes: Option<View<'_, f32>>,
        mut out: ViewMut<'_, T>,
        mut out_sizes: ViewMut<'_, f32>,
    ) -> Result<()> {
        let c = self.check_in("x", x.dims(), self.tokens)?;
        self.check_out("merged output", out.dims(), self.out_tokens(), c)?;
        let (b, n, o) = (self.batch, self.tokens, self.out_tokens());
        if out_sizes.dims() != [b, o] {
            return Err(shape_err(format!("out_sizes dims {:?}, expected [{b}, {o}]", out_sizes.dims())));
        }
        let ones;
        let sizes = match sizes {
            Some(s) => {
                if s.dims() != [b, n] {
                    return Err(shape_err(format!("sizes dims {:?}, expected [{b}, {n}]", s.dims())));
                }
                check_sizes(s.data(), n)?;
                s.data()
            }
            None => {
                ones = vec![1.0f32; b * n];
                &ones[..]
            }
        };
        let (x, out, so) = (x.data(), out.data_mut(), Some(out_sizes.data_mut()));
        let mode = MergeMode::Sum;
        match backend {
            Backend::Reference => crate::reference::merge::merge(self, x, c, mode, Some(sizes), out, so),
            Backend::Cpu => crate::cpu::merge::merge(self, crate::cpu::Isa::detect(), x, c, mode, Some(sizes), out, so),
            Backend::CpuIsa(isa) => crate::cpu::merge::merge(self, isa.check()?, x, c, mode, Some(sizes), out, so),
        }
        Ok(())
    }

    /// `y [B, N − r, C] → out [B, N, C]`: every input token position gets the value of the
    /// slot it was merged into (tomesd's unmerge). Exact copies on every backend.
    ///
    /// ```
    /// use vistok::merge::{MatchConfig, MergePlan};
    /// use vistok::{Backend, View, ViewMut};
    /// let m = [1.0f32, 0.0, 0.0, 1.0, 0.0, 2.0, 1.0, 1.0];
    /// let plan = MergePlan::bipartite(Backend::Cpu, View::new(&m, &[1, 4, 2])?, &MatchConfig::new(1))?;
    /// let mut x = [0.0f32; 4];
    /// plan.unmerge(Backend::Cpu, View::new(&[7.0f32, 8.0, 9.0], &[1, 3, 1])?, ViewMut::new(&mut x, &[1, 4, 1])?)?;
    /// assert_eq!(x, [7.0, 8.0, 8.0, 9.0]);
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn unmerge<T: Float>(&self, backend: Backend, y: View<'_, T>, mut out: ViewMut<'_, T>) -> Result<()> {
        let c = self.check_in("y", y.dims(), self.out_tokens())?;
        self.check_out("unmerged output", out.dims(), self.tokens, c)?;
        if backend == Backend::Reference {
            crate::reference::merge::unmerge_plan(self, y.data(), c, out.data_mut());
            return Ok(());
        }
        gather_rows(backend, &self.slots, self.tokens, self.out_tokens(), y.data(), c, out.data_mut())
    }
}

/// `out[b, t] = y[b, slots[b, t]]` for `slots` `[B, n]` with values `< ny`.
fn gather_rows<T: Float>(
    backend: Backend,
    slots: &[u32],
    n: usize,
    ny: usize,
    y: &[T],
    c: usize,
    out: &mut [T],
) -> Result<()> {
    match backend {
        Backend::Reference => crate::reference::merge::gather(slots, n, ny, y, c, out),
        Backend::Cpu => crate::cpu::merge::unmerge(crate::cpu::Isa::detect(), slots, n, ny, y, c, out),
        Backend::CpuIsa(isa) => crate::cpu::merge::unmerge(isa.check()?, slots, n, ny, y, c, out),
    }
    Ok(())
}

/// Source tracking across layers: for every original token, the slot it is in now. `O(B·N₀)`
/// memory, where ToMe keeps a `B×N×N₀` matrix.
///
/// ```
/// use vistok::merge::{MatchConfig, MergePlan, SourceMap};
/// use vistok::{Backend, View, ViewMut};
/// let m1 = [0.0f32, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]; // 4 tokens, 2 channels
/// let p1 = MergePlan::bipartite(Backend::Cpu, View::new(&m1, &[1, 4, 2])?, &MatchConfig::new(1))?;
/// let m2 = [1.0f32, 2.0, 3.0]; // 3 tokens, 1 channel
/// let p2 = MergePlan::bipartite(Backend::Cpu, View::new(&m2, &[1, 3, 1])?, &MatchConfig::new(1))?;
/// let mut map = SourceMap::identity(1, 4)?;
/// map.apply(&p1)?;
/// map.apply(&p2)?;
/// assert_eq!(map.out_tokens(), 2);
/// // Unmerge the 2 final tokens back to the 4 original positions in one step.
/// let mut x = [0.0f32; 4];
/// map.unmerge(Backend::Cpu, View::new(&[5.0f32, 6.0], &[1, 2, 1])?, ViewMut::new(&mut x, &[1, 4, 1])?)?;
/// assert!(x.iter().all(|v| *v == 5.0 || *v == 6.0));
/// # Ok::<(), vistok::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceMap {
    batch: usize,
    tokens: usize,
    out: usize,
    slots: Vec<u32>,
}

impl SourceMap {
    /// Every one of `tokens` original tokens in its own slot. Errors if `B·N` overflows or N
    /// exceeds `u32`.
    pub fn identity(batch: usize, tokens: usize) -> Result<SourceMap> {
        let len = checked_product(Family::Merge, "source map [B, N]", &[batch, tokens])?;
        if u32::try_from(tokens).is_err() {
            return Err(Error::Overflow { family: Family::Merge, what: format!("token count {tokens} exceeds u32") });
        }
        Ok(SourceMap { batch, tokens, out: tokens, slots: (0..len).map(|i| (i % tokens.max(1)) as u32).collect() })
    }

    /// Composes a plan for the current tokens (`plan.tokens() == self.out_tokens()`, same
    /// batch): afterwards every original token maps to its slot after `plan`. `O(B·N₀)`.
    pub fn apply(&mut self, plan: &MergePlan) -> Result<()> {
        if plan.batch() != self.batch || plan.tokens() != self.out {
            return Err(shape_err(format!(
                "plan for [{}, {}] tokens applied to a source map with [{}, {}] current tokens",
                plan.batch(),
                plan.tokens(),
                self.batch,
                self.out
            )));
        }
        let n = plan.tokens();
        for (bi, row) in self.slots.chunks_mut(self.tokens.max(1)).enumerate().take(self.batch) {
            let p = &plan.slots()[bi * n..][..n];
            row.iter_mut().for_each(|s| *s = p[*s as usize]);
        }
        self.out = plan.out_tokens();
        Ok(())
    }

    /// Batch size B.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Original tokens N₀.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Current tokens (slots).
    pub fn out_tokens(&self) -> usize {
        self.out
    }

    /// `[B, N₀]`: the current slot of every original token.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// How many original tokens each current slot holds, `[B, out_tokens]`: the sizes ToMe's
    /// `merge_wavg` tracks when it starts from all-ones.
    pub fn sizes(&self) -> Vec<f32> {
        let mut s = vec![0.0f32; self.batch * self.out];
        for (bi, row) in self.slots.chunks(self.tokens.max(1)).enumerate().take(self.batch) {
            row.iter().for_each(|&t| s[bi * self.out + t as usize] += 1.0);
        }
        s
    }

    /// `y [B, out_tokens, C] → out [B, N₀, C]`: every original token gets its slot's value.
    pub fn unmerge<T: Float>(&self, backend: Backend, y: View<'_, T>, mut out: ViewMut<'_, T>) -> Result<()> {
        let dims = y.dims();
        if dims.len() != 3 || dims[0] != self.batch || dims[1] != self.out {
            return Err(shape_err(format!("y dims {dims:?}, expected [{}, {}, C]", self.batch, self.out)));
        }
        let c = dims[2];
        if out.dims() != [self.batch, self.tokens, c] {
            return Err(shape_err(format!(
                "unmerged output dims {:?}, expected [{}, {}, {c}]",
                out.dims(),
                self.batch,
                self.tokens
            )));
        }
        gather_rows(backend, &self.slots, self.tokens, self.out, y.data(), c, out.data_mut())
    }
}

/// `log(size)` `[B, N]`: the additive key bias of ToMe's proportional attention
/// (`attn + size.log()`), in the `[B, Nk]` f32 layout the attention kernels take.
///
/// Errors: `bias` not the dims of `sizes`, `sizes` not rank 2, or a size that is not finite
/// and positive.
///
/// ```
/// use vistok::{View, ViewMut};
/// let sizes = [1.0f32, 2.0, 4.0];
/// let mut bias = [9.0f32; 3];
/// vistok::merge::size_bias(View::new(&sizes, &[1, 3])?, ViewMut::new(&mut bias, &[1, 3])?)?;
/// assert_eq!(bias, [0.0, 2f32.ln(), 4f32.ln()]);
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn size_bias(sizes: View<'_, f32>, mut bias: ViewMut<'_, f32>) -> Result<()> {
    let dims = sizes.dims();
    if dims.len() != 2 || bias.dims() != dims {
        return Err(shape_err(format!("sizes dims {dims:?} and bias dims {:?}, expected equal [B, N]", bias.dims())));
    }
    check_sizes(sizes.data(), dims[1])?;
    bias.data_mut().iter_mut().zip(sizes.data()).for_each(|(o, s)| *o = s.ln());
    Ok(())
}

/// Tokens kept by a pruning method, per batch: built by [`Selection::top_k`] or
/// [`Selection::div_prune`], applied by [`Selection::gather`] / [`Selection::gather_fused`].
///
/// ```
/// use vistok::merge::Selection;
/// use vistok::{Backend, View, ViewMut};
/// // EViT: a class token plus 4 tokens scored by the class attention; keep 2.
/// let score = [0.0f32, 0.1, 0.4, 0.1, 0.3];
/// let sel = Selection::top_k(Backend::Cpu, View::new(&score, &[1, 5])?, 2, true)?;
/// assert_eq!(sel.kept(0), &[2, 4]);
/// let x = [0.0f32, 1.0, 2.0, 3.0, 4.0];
/// let mut y = [0.0f32; 4]; // [cls, kept…, fused]
/// sel.gather_fused(Backend::Cpu, View::new(&x, &[1, 5, 1])?, View::new(&score, &[1, 5])?,
///                  ViewMut::new(&mut y, &[1, 4, 1])?)?;
/// assert_eq!(y, [0.0, 2.0, 4.0, 0.1 * 1.0 + 0.1 * 3.0]);
/// # Ok::<(), vistok::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    batch: usize,
    tokens: usize,
    k: usize,
    class_token: bool,
    /// `[B, k]`
    kept: Vec<u32>,
}

/// Checks `k` against `n` tokens; returns the candidates' count.
fn check_k(k: usize, n: usize, class_token: bool) -> Result<usize> {
    if class_token && n == 0 {
        return Err(shape_err("class_token with N = 0: there is no token 0 to keep".to_string()));
    }
    let candidates = n.saturating_sub(class_token as usize);
    if k > candidates {
        return Err(invalid(format!(
            "k = {k} exceeds the {candidates} tokens that can be kept (N = {n}{})",
            if class_token { ", class token excluded" } else { "" }
        )));
    }
    if u32::try_from(n).is_err() {
        return Err(Error::Overflow { family: Family::Merge, what: format!("token count {n} exceeds u32") });
    }
    Ok(candidates)
}

impl Selection {
    /// EViT's top-k: per batch, the `k` tokens with the highest `score` `[B, N]`, in descending
    /// score order, ties → lower index. With `class_token`, token 0 is always kept (not counted
    /// in `k`, its score ignored).
    ///
    /// Errors: `score` not rank 2, `k` larger than the tokens available, a non-finite score.
    ///
    /// ```
    /// use vistok::merge::Selection;
    /// use vistok::{Backend, View};
    /// let score = [0.5f32, 0.2, 0.5, 0.9];
    /// let sel = Selection::top_k(Backend::Reference, View::new(&score, &[1, 4])?, 3, false)?;
    /// assert_eq!(sel.kept(0), &[3, 0, 2]);
    /// assert!(Selection::top_k(Backend::Cpu, View::new(&score, &[1, 4])?, 5, false).is_err());
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn top_k(backend: Backend, score: View<'_, f32>, k: usize, class_token: bool) -> Result<Selection> {
        let dims = score.dims();
        if dims.len() != 2 {
            return Err(shape_err(format!("score dims {dims:?}, expected [B, N]")));
        }
        let (b, n) = (dims[0], dims[1]);
        check_k(k, n, class_token)?;
        if let Some(i) = score.data().iter().position(|s| !s.is_finite()) {
            return Err(Error::NonFinite { family: Family::Merge, what: format!("score[{}, {}]", i / n, i % n) });
        }
        let kept = match backend {
            Backend::Reference => crate::reference::merge::top_k(score.data(), b, n, k, class_token),
            Backend::Cpu | Backend::CpuIsa(_) => {
                if let Backend::CpuIsa(isa) = backend {
                    isa.check()?;
                }
                crate::cpu::merge::top_k(score.data(), b, n, k, class_token)
            }
        };
        Ok(Selection { batch: b, tokens: n, k, class_token, kept })
    }

    /// DivPrune: per batch, `k` tokens chosen greedily for diversity under the cosine distance
    /// `1 − cos` of `metric` `[B, N, Cm]`: first the token whose nearest neighbour is farthest,
    /// then repeatedly the token whose nearest selected token is farthest; ties → lower index.
    /// Kept in selection order. With `class_token`, token 0 is always kept and takes no part.
    ///
    /// Scores are cosine similarities with the arithmetic of [`MergePlan::bipartite`] (f64 in
    /// the reference, the fixed f32 order on CPU), so near-ties may resolve differently.
    ///
    /// Errors: dims not `[B, N, Cm]`, `Cm = 0`, `k` larger than the tokens available, a
    /// non-finite metric element, or a forced [`Backend::CpuIsa`] level this CPU lacks.
    ///
    /// ```
    /// use vistok::merge::Selection;
    /// use vistok::{Backend, View};
    /// // Three near-duplicates and one outlier: the outlier goes first.
    /// let m = [1.0f32, 0.0, 1.0, 0.1, 1.0, 0.2, 0.0, 1.0];
    /// let sel = Selection::div_prune(Backend::Cpu, View::new(&m, &[1, 4, 2])?, 2, false)?;
    /// assert_eq!(sel.kept(0), &[3, 0]);
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn div_prune<M: Float>(
        backend: Backend,
        metric: View<'_, M>,
        k: usize,
        class_token: bool,
    ) -> Result<Selection> {
        let dims = metric.dims();
        if dims.len() != 3 || dims[2] == 0 {
            return Err(shape_err(format!("metric dims {dims:?}, expected [B, N, C] with C ≥ 1")));
        }
        let (b, n, c) = (dims[0], dims[1], dims[2]);
        check_k(k, n, class_token)?;
        let kept = match backend {
            Backend::Reference => crate::reference::merge::div_prune(metric.data(), b, n, c, k, class_token)?,
            Backend::Cpu => {
                crate::cpu::merge::div_prune(crate::cpu::Isa::detect(), metric.data(), b, n, c, k, class_token)?
            }
            Backend::CpuIsa(isa) => crate::cpu::merge::div_prune(isa.check()?, metric.data(), b, n, c, k, class_token)?,
        };
        Ok(Selection { batch: b, tokens: n, k, class_token, kept })
    }

    /// Batch size B.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Input tokens N.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Tokens selected per batch, the class token not counted.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether token 0 is a class token, kept first.
    pub fn class_token(&self) -> bool {
        self.class_token
    }

    /// The selected tokens of batch `b` (original indices, class token excluded). Panics if
    /// `b ≥ B`.
    pub fn kept(&self, b: usize) -> &[u32] {
        &self.kept[b * self.k..][..self.k]
    }

    /// Sorts each batch's selection into ascending token order (what DivPrune's LLaVA code
    /// does before gathering).
    ///
    /// ```
    /// use vistok::merge::Selection;
    /// use vistok::{Backend, View};
    /// let mut sel = Selection::top_k(Backend::Cpu, View::new(&[0.1f32, 0.9, 0.5], &[1, 3])?, 2, false)?;
    /// sel.sort();
    /// assert_eq!(sel.kept(0), &[1, 2]);
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn sort(&mut self) {
        self.kept.chunks_mut(self.k.max(1)).for_each(|c| c.sort_unstable());
    }

    /// Output tokens of [`gather`](Self::gather) (`fused = false`) or
    /// [`gather_fused`](Self::gather_fused) (`fused = true`): class token + `k` (+ 1).
    pub fn out_tokens(&self, fused: bool) -> usize {
        self.class_token as usize + self.k + fused as usize
    }

    fn check(&self, x: &[usize], out: &[usize], fused: bool) -> Result<usize> {
        if x.len() != 3 || x[0] != self.batch || x[1] != self.tokens {
            return Err(shape_err(format!("x dims {x:?}, expected [{}, {}, C]", self.batch, self.tokens)));
        }
        let want = [self.batch, self.out_tokens(fused), x[2]];
        if out != want {
            return Err(shape_err(format!("output dims {out:?}, expected {want:?}")));
        }
        Ok(x[2])
    }

    /// `x [B, N, C] → out [B, class + k, C]`: the class token (if any), then the kept tokens in
    /// [`kept`](Self::kept) order. Exact copies.
    pub fn gather<T: Float>(&self, backend: Backend, x: View<'_, T>, mut out: ViewMut<'_, T>) -> Result<()> {
        let c = self.check(x.dims(), out.dims(), false)?;
        let slots = self.source_rows();
        let (b, o) = (self.batch, self.out_tokens(false));
        // The gather is unmerge's row copy with the roles of the token counts swapped.
        gather_rows(backend, &slots, o, self.tokens, x.data(), c, out.data_mut())?;
        debug_assert_eq!(slots.len(), b * o);
        Ok(())
    }

    /// Like [`gather`](Self::gather), plus EViT's fused token last: `Σ sᵢxᵢ` over the pruned
    /// tokens `i` (neither kept nor the class token) with `score` `[B, N]` (finite), zero when
    /// nothing was pruned. Accumulated in f64 by the reference and in f32 (fma, ascending `i`)
    /// on CPU, rounded once.
    pub fn gather_fused<T: Float>(
        &self,
        backend: Backend,
        x: View<'_, T>,
        score: View<'_, f32>,
        mut out: ViewMut<'_, T>,
    ) -> Result<()> {
        let c = self.check(x.dims(), out.dims(), true)?;
        let (b, n) = (self.batch, self.tokens);
        if score.dims() != [b, n] {
            return Err(shape_err(format!("score dims {:?}, expected [{b}, {n}]", score.dims())));
        }
        if let Some(i) = score.data().iter().position(|s| !s.is_finite()) {
            return Err(Error::NonFinite { family: Family::Merge, what: format!("score[{}, {}]", i / n, i % n) });
        }
        let (x, s, out) = (x.data(), score.data(), out.data_mut());
        match backend {
            Backend::Reference => crate::reference::merge::gather_fused(self, x, s, c, out),
            Backend::Cpu => crate::cpu::merge::gather_fused(self, crate::cpu::Isa::detect(), x, s, c, out),
            Backend::CpuIsa(isa) => crate::cpu::merge::gather_fused(self, isa.check()?, x, s, c, out),
        }
        Ok(())
    }

    /// The input row of every output row of [`gather`](Self::gather), `[B, class + k]`.
    pub(crate) fn source_rows(&self) -> Vec<u32> {
        let mut rows = Vec::with_capacity(self.batch * self.out_tokens(false));
        for b in 0..self.batch {
            if self.class_token {
                rows.push(0);
            }
            rows.extend_from_slice(self.kept(b));
        }
        rows
    }
}
