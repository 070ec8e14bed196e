//! Lookup-free quantization: LFQ (MAGVIT-v2), group-wise LFQ (Open-MAGVIT2, WeTok) and BSQ
//! (binary spherical quantization, BSQ-ViT). Token ids come from signs alone.
//!
//! # Contract
//! - Input `z` `[N, G·d]` (tokens × channels, channels contiguous), `f32`, `f16` or `bf16`;
//!   `f16` / `bf16` are widened to f32 exactly first. Group `g` is channels `[g·d, (g+1)·d)`.
//!   Output ids `[N, G]`, `u32`, with `1 ≤ d ≤ 32`.
//! - `bit_k = (z_k > 0)`: exact `0.0` and `−0.0` give bit 0, subnormals and infinities follow
//!   their sign.
//! - The bit order is an explicit option, never a default: [`BitOrder::MsbFirst`] — channel 0
//!   of a group is the most significant bit, `id = Σ bit_k·2^(d−1−k)` (vector-quantize-pytorch's
//!   `LFQ`) — or [`BitOrder::LsbFirst`] — `id = Σ bit_k·2^k` (Open-MAGVIT2, WeTok).
//! - NaN anywhere in `z` is an [`Error::NonFinite`] naming the **first** (lowest flat index) NaN
//!   element as `z[row, col]`. It is detected in the same pass that encodes, so when it is
//!   reported the outputs may have been partly written: treat them as unspecified.
//! - Codes (decode): `q_k = +v` if `bit_k` else `−v`, with `v = s` (the codebook scale,
//!   default 1) or, for BSQ ([`LfqConfig::spherical`]), `v = s / √d` computed once in f32 as
//!   `s / (d as f32).sqrt()` ([`Lfq::code_value`]); `±v` is then rounded to the output dtype.
//!   Decoding an id with bits at or above `d` set is an [`Error::Invalid`] naming the first such
//!   id; codes may have been partly written then.
//! - BSQ ids equal LFQ ids (normalising does not change signs). [`Lfq::encode_normalized`]
//!   also writes `u = z / ‖z‖₂` per group: the sum of squares is accumulated in f64 in channel
//!   order, `u_k = (z_k as f64 / sqrt(sum)) as f32`, then rounded to the output dtype. A group
//!   that is all zeros stays zero (its zeros are written unchanged, `−0.0` included); a group
//!   holding an infinity follows IEEE arithmetic (NaN / zero outputs).
//! - Statistics ([`Lfq::statistics`]): ones per channel and, for `d ≤ 20`, the histogram of
//!   ids (all groups pooled), as integer counts — identical on every backend and thread count.
//! - Entropy terms of the LFQ / BSQ training loss ([`Lfq::entropy`], see [Entropy](#entropy)):
//!   exact per-token entropy, exact codebook entropy for `d ≤ 16` and its factorized form.
//! - `N = 0` is allowed and writes nothing. Every other output element is written. Inputs are
//!   never written; inputs and outputs cannot alias (Rust's borrows guarantee it).
//! - Results are bit-identical across [`Backend::Reference`], [`Backend::Cpu`], every
//!   [`Backend::CpuIsa`] level and every thread count.
//!
//! # Token factorization
//! WeTok / Open-MAGVIT2's `factorized_bits` split a token's bits into consecutive chunks, each
//! its own id (e.g. 18 bits as `[9, 9]`). That is group-wise LFQ: use `G` groups of `d` bits
//! (`G = 2, d = 9`), with the bit order of the model (`LsbFirst` for those code bases).
//! Chunks of unequal size are not supported.
//!
//! # Entropy
//! MAGVIT-v2's entropy loss (and BSQ-ViT's) scores a soft assignment of each token to the
//! codes: for a group with input `z ∈ ℝ^d`, `p(c) ∝ exp(−τ·‖z − c‖²)` over the `2^d` codes
//! `c ∈ {±v}^d` (`v` = [`Lfq::code_value`]: `s`, or `s/√d` for BSQ, whose `z` should then be
//! the normalised input; `τ` is an inverse temperature, vector-quantize-pytorch's
//! `inv_temperature`). Since `‖z − c‖² = Σ_k (z_k − c_k)²` and
//! `(z_k + v)² − (z_k − v)² = 4v·z_k`, the distribution **factorizes over bits**: the bits are
//! independent with `P(bit_k = 1) = P(c_k = +v) = σ(a_k)`, `a_k = 4τv·z_k`, `σ(a) = 1/(1+e^−a)`.
//! [`Lfq::entropy`] computes, in nats, with `N` tokens and per group:
//! - **per-token entropy** (exact, `O(d)` instead of `O(2^d)`): the entropy of a product of
//!   independent bits is the sum of their binary entropies,
//!   `H(p_n) = Σ_k h(a_{n,k})` with `h(a) = H_b(σ(a)) = ln(1 + e^−|a|) + |a|·e^−|a| / (1 + e^−|a|)`
//!   (the softplus form `softplus(|a|) − |a|·σ(|a|)`, finite for every `a`, `h(±∞) = 0`,
//!   `h(0) = ln 2`). [`LfqEntropy::per_token`] is its mean over the batch,
//!   `(1/N) Σ_n H(p_n)`.
//! - **codebook entropy** (exact, `d ≤` [`EXACT_ENTROPY_MAX_BITS`]): the entropy of the batch's
//!   average distribution `p̄(c) = (1/N) Σ_n Π_k p_{n,k}(c_k)`, `−Σ_c p̄(c) ln p̄(c)` over the
//!   `2^d` codes. The average of product distributions is no longer a product, so this costs
//!   `O(N·2^d)` per group (`None` for larger `d`; [`Lfq::entropy_factorized`] skips it).
//! - **factorized codebook entropy** (any `d`, `O(N·d)`): the entropy of the product of the
//!   averaged bit marginals, `Σ_k H_b(P̄_k)` with `P̄_k = (1/N) Σ_n σ(a_{n,k})` — the
//!   approximation used for large codebooks, and an upper bound of the exact one (the entropy of
//!   a joint distribution is at most the sum of its marginals' entropies).
//!
//! With groups (group-wise LFQ), every group has its own distribution: each term is reported
//! per group, and [`LfqEntropy::per_token_mean`] / [`LfqEntropy::codebook_mean`] average over
//! groups, as vector-quantize-pytorch's `per_sample_entropy` / `codebook_entropy` do with
//! several codebooks (its loss is `per_sample_entropy − γ·codebook_entropy`; note it also
//! clamps probabilities below `1e−5` inside the logarithm, which these exact values do not).
//!
//! ```
//! use vistok::{Backend, BitOrder, Lfq, LfqConfig, View};
//! let plan = Lfq::new(&LfqConfig::new(1, 2, BitOrder::MsbFirst))?;
//! // A token at the origin is uniform over the 4 codes; a far one is certain.
//! let z = [0.0f32, 0.0, 50.0, -50.0];
//! let e = plan.entropy(Backend::Cpu, View::new(&z, &[2, 2])?, 1.0)?;
//! let ln2 = std::f64::consts::LN_2;
//! assert!((e.per_token[0] - ln2).abs() < 1e-6); // (2·ln 2 + 0) / 2
//! assert!((e.bit_probability[0] - 0.75).abs() < 1e-6 && (e.bit_probability[1] - 0.25).abs() < 1e-6);
//! // p̄ = (1/4, 1/4, 1/4, 1/4)/2 + (code +−)/2: entropy of (5/8, 1/8, 1/8, 1/8).
//! let want = -(0.625f64 * 0.625f64.ln() + 3.0 * 0.125 * 0.125f64.ln());
//! assert!((e.codebook_mean().unwrap() - want).abs() < 1e-6);
//! assert!(e.codebook_factorized_mean() >= e.codebook_mean().unwrap());
//! # Ok::<(), vistok::Error>(())
//! ```
//!
//! ```
//! use vistok::{Backend, BitOrder, Lfq, LfqConfig, View, ViewMut};
//! // Two tokens, one group of 4 bits.
//! let z = [1.0f32, -1.0, -1.0, -1.0, /* token 1 */ 0.5, -0.0, 0.0, 2.0];
//! let msb = Lfq::new(&LfqConfig::new(1, 4, BitOrder::MsbFirst))?;
//! let lsb = Lfq::new(&LfqConfig::new(1, 4, BitOrder::LsbFirst))?;
//! let mut ids = [0u32; 2];
//! msb.encode(Backend::Cpu, View::new(&z, &[2, 4])?, ViewMut::new(&mut ids, &[2, 1])?)?;
//! assert_eq!(ids, [0b1000, 0b1001]);
//! lsb.encode(Backend::Cpu, View::new(&z, &[2, 4])?, ViewMut::new(&mut ids, &[2, 1])?)?;
//! assert_eq!(ids, [0b0001, 0b1001]);
//! // And back to codes ±1.
//! let mut codes = [0.0f32; 8];
//! lsb.decode(Backend::Cpu, View::new(&ids, &[2, 1])?, ViewMut::new(&mut codes, &[2, 4])?)?;
//! assert_eq!(codes, [1.0, -1.0, -1.0, -1.0, 1.0, -1.0, -1.0, 1.0]);
//! # Ok::<(), vistok::Error>(())
//! ```

use crate::dtype::Float;
use crate::error::{Error, Family, Result};
use crate::view::{View, ViewMut};
use crate::Backend;

/// How the `d` bits of a group make an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BitOrder {
    /// Channel 0 of a group is the most significant bit: `id = Σ bit_k·2^(d−1−k)`
    /// (vector-quantize-pytorch's `LFQ`).
    MsbFirst,
    /// Channel 0 of a group is the least significant bit: `id = Σ bit_k·2^k` (Open-MAGVIT2,
    /// WeTok's group-wise LFQ).
    LsbFirst,
}

/// What to quantize: groups, bits per group, bit order, code scale, BSQ.
///
/// ```
/// use vistok::{BitOrder, LfqConfig};
/// let c = LfqConfig::new(4, 8, BitOrder::LsbFirst).scale(0.5).spherical(true);
/// assert_eq!((c.groups, c.bits, c.scale, c.spherical), (4, 8, 0.5, true));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LfqConfig {
    /// Groups per token, G ≥ 1.
    pub groups: usize,
    /// Bits per group, `1 ≤ d ≤ 32`.
    pub bits: u32,
    /// Bit order within a group.
    pub order: BitOrder,
    /// Codebook scale `s` (finite, > 0; default 1).
    pub scale: f32,
    /// BSQ: codes are `±s/√d` instead of `±s`.
    pub spherical: bool,
}

impl LfqConfig {
    /// `groups` groups of `bits` bits in `order`, scale 1, not spherical.
    pub fn new(groups: usize, bits: u32, order: BitOrder) -> Self {
        LfqConfig { groups, bits, order, scale: 1.0, spherical: false }
    }

    /// Sets the codebook scale `s`.
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// Enables or disables BSQ's spherical codes `±s/√d`.
    pub fn spherical(mut self, spherical: bool) -> Self {
        self.spherical = spherical;
        self
    }
}

/// A validated LFQ plan: build once, encode / decode any number of tokens.
///
/// See the [module docs](self) for the contract and an example.
#[derive(Debug, Clone, PartialEq)]
pub struct Lfq {
    config: LfqConfig,
    channels: usize,
    value: f32,
}

fn invalid(msg: String) -> Error {
    Error::Invalid { family: Family::Lfq, msg }
}

impl Lfq {
    /// Validates `config`.
    ///
    /// Errors: `G = 0`, `d = 0` or `d > 32`, `G·d` overflowing, a scale that is not finite and
    /// positive, or a code value `s/√d` that underflows to 0.
    ///
    /// ```
    /// use vistok::{BitOrder, Lfq, LfqConfig};
    /// assert!(Lfq::new(&LfqConfig::new(1, 33, BitOrder::MsbFirst)).is_err());
    /// assert!(Lfq::new(&LfqConfig::new(0, 8, BitOrder::MsbFirst)).is_err());
    /// assert!(Lfq::new(&LfqConfig::new(1, 8, BitOrder::MsbFirst).scale(f32::NAN)).is_err());
    /// let plan = Lfq::new(&LfqConfig::new(2, 9, BitOrder::LsbFirst))?;
    /// assert_eq!((plan.channels(), plan.codebook_size()), (18, 512));
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn new(config: &LfqConfig) -> Result<Self> {
        let c = *config;
        if c.groups == 0 {
            return Err(Error::Shape { family: Family::Lfq, msg: "groups G is 0".into() });
        }
        if !(1..=32).contains(&c.bits) {
            return Err(invalid(format!("bits per group d = {} is not in 1..=32", c.bits)));
        }
        let channels = c.groups.checked_mul(c.bits as usize).ok_or_else(|| Error::Overflow {
            family: Family::Lfq,
            what: format!("channels G·d = {}·{}", c.groups, c.bits),
        })?;
        if !(c.scale.is_finite() && c.scale > 0.0) {
            return Err(invalid(format!("codebook scale {} must be finite and positive", c.scale)));
        }
        let value = if c.spherical { c.scale / (c.bits as f32).sqrt() } else { c.scale };
        if value == 0.0 {
            return Err(invalid(format!("code value s/√d = {} / √{} underflows to 0", c.scale, c.bits)));
        }
        Ok(Lfq { config: c, channels, value })
    }

    /// The validated configuration.
    pub fn config(&self) -> &LfqConfig {
        &self.config
    }

    /// Groups per token, G.
    pub fn groups(&self) -> usize {
        self.config.groups
    }

    /// Bits per group, d.
    pub fn bits(&self) -> u32 {
        self.config.bits
    }

    /// The bit order.
    pub fn order(&self) -> BitOrder {
        self.config.order
    }

    /// Channels per token, `G·d`.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Ids per group, `2^d`.
    pub fn codebook_size(&self) -> u64 {
        1u64 << self.config.bits
    }

    /// The magnitude `v` of every code: `s`, or `s/√d` (f32) for BSQ.
    ///
    /// ```
    /// use vistok::{BitOrder, Lfq, LfqConfig};
    /// let bsq = Lfq::new(&LfqConfig::new(1, 4, BitOrder::MsbFirst).spherical(true))?;
    /// assert_eq!(bsq.code_value(), 0.5);
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn code_value(&self) -> f32 {
        self.value
    }

    /// `[N, G·d]`: the dims of `z` and of codes for `n` tokens.
    pub fn codes_dims(&self, n: usize) -> [usize; 2] {
        [n, self.channels]
    }

    /// `[N, G]`: the dims of the ids for `n` tokens.
    pub fn ids_dims(&self, n: usize) -> [usize; 2] {
        [n, self.config.groups]
    }

    /// The largest valid id, `2^d − 1`.
    pub(crate) fn max_id(&self) -> u32 {
        (self.codebook_size() - 1) as u32
    }

    /// The error for a NaN at flat element `i` of `z`.
    pub(crate) fn nan_error(&self, i: usize) -> Error {
        let c = self.channels;
        Error::NonFinite { family: Family::Lfq, what: format!("z[{}, {}]", i / c, i % c) }
    }

    /// The error for an id at flat index `k` whose value has bits at or above d set.
    pub(crate) fn bad_id_error(&self, k: usize, id: u32) -> Error {
        let g = self.config.groups;
        invalid(format!(
            "ids[{}, {}] (element {k}) = {id} has bits at or above d = {} set",
            k / g,
            k % g,
            self.config.bits
        ))
    }

    /// Checks `z` `[N, G·d]` and an output `[N, G]`-shaped view against each other; returns N.
    fn check(
        &self,
        what_in: &str,
        in_dims: &[usize],
        in_last: usize,
        what_out: &str,
        out_dims: &[usize],
        out_last: usize,
    ) -> Result<usize> {
        let shape = |msg: String| Error::Shape { family: Family::Lfq, msg };
        if in_dims.len() != 2 || in_dims[1] != in_last {
            return Err(shape(format!("{what_in} dims {in_dims:?}, expected [N, {in_last}]")));
        }
        let n = in_dims[0];
        if out_dims != [n, out_last] {
            return Err(shape(format!("{what_out} dims {out_dims:?}, expected [{n}, {out_last}]")));
        }
        Ok(n)
    }

    /// z → ids. `z` must be `[N, G·d]`, `ids` `[N, G]`. Errors: other dims (naming which), NaN
    /// in `z` ([`Error::NonFinite`] naming the first), or a forced [`Backend::CpuIsa`] level this
    /// CPU lacks.
    ///
    /// ```
    /// use vistok::{bf16, Backend, BitOrder, Lfq, LfqConfig, View, ViewMut};
    /// // Group-wise: 2 groups of 3 bits, bf16 input.
    /// let z: Vec<bf16> = [1.0, -1.0, 1.0, -2.0, -0.0, 3.0].map(bf16::from_f32).to_vec();
    /// let plan = Lfq::new(&LfqConfig::new(2, 3, BitOrder::MsbFirst))?;
    /// let mut ids = [0u32; 2];
    /// plan.encode(Backend::Cpu, View::new(&z, &[1, 6])?, ViewMut::new(&mut ids, &[1, 2])?)?;
    /// assert_eq!(ids, [0b101, 0b001]);
    /// let bad = [0.0f32, f32::NAN, 1.0, 1.0, 1.0, 1.0];
    /// let e = plan.encode(Backend::Cpu, View::new(&bad, &[1, 6])?, ViewMut::new(&mut ids, &[1, 2])?);
    /// assert_eq!(e.unwrap_err().to_string(), "lfq: z[0, 1] is not finite");
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn encode<T: Float>(&self, backend: Backend, z: View<'_, T>, mut ids: ViewMut<'_, u32>) -> Result<()> {
        self.check("z", z.dims(), self.channels, "ids", ids.dims(), self.config.groups)?;
        match backend {
            Backend::Reference => crate::reference::lfq::encode(self, z.data(), ids.data_mut()),
            Backend::Cpu => crate::cpu::lfq::encode(self, crate::cpu::Isa::detect(), z.data(), ids.data_mut()),
            Backend::CpuIsa(isa) => crate::cpu::lfq::encode(self, isa.check()?, z.data(), ids.data_mut()),
        }
    }

    /// z → ids and the per-group L2-normalised input `u` `[N, G·d]` (BSQ). Same errors as
    /// [`encode`](Self::encode), plus `u`'s dims; on error both outputs are unspecified.
    ///
    /// ```
    /// use vistok::{Backend, BitOrder, Lfq, LfqConfig, View, ViewMut};
    /// let plan = Lfq::new(&LfqConfig::new(2, 2, BitOrder::LsbFirst).spherical(true))?;
    /// let z = [3.0f32, -4.0, 0.0, -0.0];
    /// let (mut ids, mut u) = ([0u32; 2], [9.0f32; 4]);
    /// plan.encode_normalized(Backend::Cpu, View::new(&z, &[1, 4])?,
    ///     ViewMut::new(&mut ids, &[1, 2])?, ViewMut::new(&mut u, &[1, 4])?)?;
    /// assert_eq!(ids, [0b01, 0b00]);
    /// assert_eq!(u, [0.6, -0.8, 0.0, -0.0]); // the zero group stays zero
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn encode_normalized<T: Float, O: Float>(
        &self,
        backend: Backend,
        z: View<'_, T>,
        mut ids: ViewMut<'_, u32>,
        mut normalized: ViewMut<'_, O>,
    ) -> Result<()> {
        self.check("z", z.dims(), self.channels, "ids", ids.dims(), self.config.groups)?;
        self.check("z", z.dims(), self.channels, "normalized", normalized.dims(), self.channels)?;
        let (z, ids, u) = (z.data(), ids.data_mut(), normalized.data_mut());
        match backend {
            Backend::Reference => crate::reference::lfq::encode_normalized(self, z, ids, u),
            Backend::Cpu => crate::cpu::lfq::encode_normalized(self, crate::cpu::Isa::detect(), z, ids, u),
            Backend::CpuIsa(isa) => crate::cpu::lfq::encode_normalized(self, isa.check()?, z, ids, u),
        }
    }

    /// ids → codes `±v` ([`code_value`](Self::code_value)). `ids` must be `[N, G]`, `codes`
    /// `[N, G·d]`. Errors: other dims, an id `≥ 2^d` (naming the first), or a forced
    /// [`Backend::CpuIsa`] level this CPU lacks.
    ///
    /// ```
    /// use vistok::{Backend, BitOrder, Lfq, LfqConfig, View, ViewMut};
    /// let plan = Lfq::new(&LfqConfig::new(1, 3, BitOrder::MsbFirst).scale(2.0))?;
    /// let mut codes = [0.0f32; 3];
    /// plan.decode(Backend::Cpu, View::new(&[0b110u32], &[1, 1])?, ViewMut::new(&mut codes, &[1, 3])?)?;
    /// assert_eq!(codes, [2.0, 2.0, -2.0]);
    /// assert!(plan.decode(Backend::Cpu, View::new(&[8u32], &[1, 1])?, ViewMut::new(&mut codes, &[1, 3])?).is_err());
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn decode<O: Float>(&self, backend: Backend, ids: View<'_, u32>, mut codes: ViewMut<'_, O>) -> Result<()> {
        self.check("ids", ids.dims(), self.config.groups, "codes", codes.dims(), self.channels)?;
        match backend {
            Backend::Reference => crate::reference::lfq::decode(self, ids.data(), codes.data_mut()),
            Backend::Cpu => crate::cpu::lfq::decode(self, crate::cpu::Isa::detect(), ids.data(), codes.data_mut()),
            Backend::CpuIsa(isa) => crate::cpu::lfq::decode(self, isa.check()?, ids.data(), codes.data_mut()),
        }
    }

    /// Usage statistics of ids `[N, G]`: ones per channel and, for `d ≤ 20`, the histogram of
    /// ids. Integer counts, so the result is the same on every backend and thread count.
    /// Errors: `ids` not `[N, G]`, an id `≥ 2^d` (naming the first), or a forced
    /// [`Backend::CpuIsa`] level this CPU lacks.
    ///
    /// ```
    /// use vistok::{Backend, BitOrder, Lfq, LfqConfig, View};
    /// let plan = Lfq::new(&LfqConfig::new(2, 2, BitOrder::MsbFirst))?;
    /// let s = plan.statistics(Backend::Cpu, View::new(&[0b10u32, 0b11, 0b10, 0b00], &[2, 2])?)?;
    /// assert_eq!(s.tokens, 2);
    /// assert_eq!(s.ones, [2, 0, 1, 1]); // group 0's channel 0 (its MSB) is set in both tokens
    /// assert_eq!(s.bit_frequency(), [1.0, 0.0, 0.5, 0.5]);
    /// assert_eq!(s.histogram, Some(vec![1, 0, 2, 1]));
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn statistics(&self, backend: Backend, ids: View<'_, u32>) -> Result<LfqStats> {
        let dims = ids.dims();
        if dims.len() != 2 || dims[1] != self.config.groups {
            let msg = format!("ids dims {dims:?}, expected [N, {}]", self.config.groups);
            return Err(Error::Shape { family: Family::Lfq, msg });
        }
        match backend {
            Backend::Reference => crate::reference::lfq::statistics(self, ids.data()),
            Backend::Cpu => crate::cpu::lfq::statistics(self, crate::cpu::Isa::detect(), ids.data()),
            Backend::CpuIsa(isa) => crate::cpu::lfq::statistics(self, isa.check()?, ids.data()),
        }
    }

    /// The entropy terms of the soft code assignment `p(c) ∝ exp(−τ‖z − c‖²)` of every group of
    /// `z` `[N, G·d]` (see [Entropy](self#entropy) for the definitions): the mean per-token
    /// entropy, the exact codebook entropy (for `d ≤` [`EXACT_ENTROPY_MAX_BITS`]; `None` above),
    /// the factorized codebook entropy and the averaged bit probabilities, per group, in nats.
    ///
    /// - Reference: f64 throughout, the codebook entropy by enumerating the `2^d` codes of every
    ///   token. Cpu: the per-element terms in f32 (range reduction and polynomials, with the
    ///   logit `4τv·|z|` carried as two f32s; exact f32 widening of f16/bf16), sums in f32 over
    ///   at most 64 rows then f64, the codebook entropy's products and sums in f64.
    ///   Cpu results are **bit-identical for every thread count** (every reduction runs over
    ///   fixed chunks, combined in chunk order) and across ISA levels; they match the reference
    ///   within `1e−5·|x| + 1e−7·d` (asserted by the tests; observed errors are far smaller).
    ///   Logits beyond `|a| = 87` are treated as 87 on cpu (an absolute error below `1e−35`).
    /// - Cost: `O(N·G·d)` plus, for the exact codebook entropy, `O(N·G·2^d)`
    ///   ([`entropy_factorized`](Self::entropy_factorized) skips it).
    ///
    /// Errors: `z` not `[N, G·d]`, `N = 0` (the entropies of an empty batch are undefined),
    /// `tau` not finite and positive, a logit scale `4·τ·v` that is not a normal positive f32,
    /// NaN in `z` ([`Error::NonFinite`] naming the first; `±∞` are allowed: certain bits), or a
    /// forced [`Backend::CpuIsa`] level this CPU lacks.
    ///
    /// ```
    /// use vistok::{Backend, BitOrder, Error, Lfq, LfqConfig, View};
    /// let plan = Lfq::new(&LfqConfig::new(2, 3, BitOrder::LsbFirst))?;
    /// let z = [0.1f32, -0.4, 0.0, 2.0, -1.0, 0.3, /* token 1 */ -0.2, 0.5, 0.7, 1.0, 1.0, -3.0];
    /// let e = plan.entropy(Backend::Cpu, View::new(&z, &[2, 6])?, 2.0)?;
    /// let r = plan.entropy(Backend::Reference, View::new(&z, &[2, 6])?, 2.0)?;
    /// assert_eq!((e.per_token.len(), e.bit_probability.len()), (2, 6));
    /// for (c, r) in e.per_token.iter().zip(&r.per_token) {
    ///     assert!((c - r).abs() <= 1e-5 * r + 3e-7);
    /// }
    /// assert!(e.per_token.iter().all(|&h| (0.0..=3.0 * std::f64::consts::LN_2).contains(&h)));
    /// let bad = plan.entropy(Backend::Cpu, View::new(&z, &[2, 6])?, f32::INFINITY);
    /// assert!(matches!(bad, Err(Error::Invalid { .. })));
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn entropy<T: Float>(&self, backend: Backend, z: View<'_, T>, tau: f32) -> Result<LfqEntropy> {
        self.entropy_terms(backend, z, tau, true)
    }

    /// [`entropy`](Self::entropy) without the exact codebook entropy (`codebook` is `None`):
    /// `O(N·G·d)` for any `d`. The other fields are the same, bit for bit.
    ///
    /// ```
    /// use vistok::{Backend, BitOrder, Lfq, LfqConfig, View};
    /// let plan = Lfq::new(&LfqConfig::new(1, 24, BitOrder::MsbFirst))?;
    /// let z: Vec<f32> = (0..24 * 3).map(|i| (i as f32 * 0.37).sin()).collect();
    /// let e = plan.entropy_factorized(Backend::Cpu, View::new(&z, &[3, 24])?, 1.0)?;
    /// assert!(e.codebook.is_none());
    /// assert!(e.codebook_factorized_mean() <= 24.0 * std::f64::consts::LN_2);
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn entropy_factorized<T: Float>(&self, backend: Backend, z: View<'_, T>, tau: f32) -> Result<LfqEntropy> {
        self.entropy_terms(backend, z, tau, false)
    }

    /// The logit scale `4·τ·v` (exact in f64) of [`entropy`](Self::entropy): bit `k` is 1 with
    /// probability `σ(4τv·z_k)`.
    ///
    /// ```
    /// use vistok::{BitOrder, Lfq, LfqConfig};
    /// let bsq = Lfq::new(&LfqConfig::new(1, 16, BitOrder::MsbFirst).spherical(true))?;
    /// assert_eq!(bsq.logit_scale(10.0), 10.0); // 4 · 10 · 1/√16
    /// # Ok::<(), vistok::Error>(())
    /// ```
    pub fn logit_scale(&self, tau: f32) -> f64 {
        4.0 * tau as f64 * self.value as f64
    }

    fn entropy_terms<T: Float>(&self, backend: Backend, z: View<'_, T>, tau: f32, exact: bool) -> Result<LfqEntropy> {
        let dims = z.dims();
        if dims.len() != 2 || dims[1] != self.channels {
            return Err(Error::Shape {
                family: Family::Lfq,
                msg: format!("z dims {dims:?}, expected [N, {}]", self.channels),
            });
        }
        if dims[0] == 0 {
            return Err(Error::Shape {
                family: Family::Lfq,
                msg: "z has no tokens (N = 0): the entropies of an empty batch are undefined".into(),
            });
        }
        if !(tau.is_finite() && tau > 0.0) {
            return Err(invalid(format!("temperature τ = {tau} must be finite and positive")));
        }
        let scale = self.logit_scale(tau);
        if !(scale >= f32::MIN_POSITIVE as f64 && scale <= f32::MAX as f64) {
            return Err(invalid(format!(
                "logit scale 4·τ·v = {scale:e} (τ = {tau}, v = {}) is not a normal f32",
                self.value
            )));
        }
        match backend {
            Backend::Reference => crate::reference::lfq::entropy(self, z.data(), tau, exact),
            Backend::Cpu => crate::cpu::lfq::entropy(self, crate::cpu::Isa::detect(), z.data(), scale, exact),
            Backend::CpuIsa(isa) => crate::cpu::lfq::entropy(self, isa.check()?, z.data(), scale, exact),
        }
    }
}

/// The largest `d` for which [`Lfq::statistics`] builds the id histogram (`2^20` bins).
pub const HISTOGRAM_MAX_BITS: u32 = 20;

/// Codebook usage of a batch of ids, from [`Lfq::statistics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LfqStats {
    /// Tokens counted, N.
    pub tokens: usize,
    /// `[G·d]`, in channel order (group-major, then channel within the group, whatever the bit
    /// order): how many tokens have that channel's bit set (code `+v`).
    pub ones: Vec<u64>,
    /// `[2^d]` when `d ≤` [`HISTOGRAM_MAX_BITS`]: how many ids (of all `N·G`, all groups pooled)
    /// have each value; `None` for larger `d`.
    pub histogram: Option<Vec<u64>>,
}

impl LfqStats {
    /// `ones / N` per channel: the frequency of ones (all 0 when `N = 0`).
    pub fn bit_frequency(&self) -> Vec<f64> {
        let n = self.tokens.max(1) as f64;
        self.ones.iter().map(|&c| c as f64 / n).collect()
    }
}

/// The largest `d` for which [`Lfq::entropy`] computes the exact codebook entropy (`2^16` codes
/// per group).
pub const EXACT_ENTROPY_MAX_BITS: u32 = 16;

/// The entropy terms of a batch, from [`Lfq::entropy`] (nats; see [Entropy](self#entropy)).
///
/// ```
/// use vistok::{Backend, BitOrder, Lfq, LfqConfig, View};
/// // Two groups of one bit: group 0 always uncertain, group 1 certain but split across tokens.
/// let plan = Lfq::new(&LfqConfig::new(2, 1, BitOrder::MsbFirst))?;
/// let e = plan.entropy(Backend::Reference, View::new(&[0.0f32, 9.0, 0.0, -9.0], &[2, 2])?, 10.0)?;
/// let ln2 = std::f64::consts::LN_2;
/// assert!((e.per_token[0] - ln2).abs() < 1e-12 && e.per_token[1] < 1e-12);
/// assert!((e.per_token_mean() - ln2 / 2.0).abs() < 1e-12);
/// assert!((e.codebook_mean().unwrap() - ln2).abs() < 1e-12); // both groups: p̄ = (1/2, 1/2)
/// assert_eq!(e.codebook_factorized, e.codebook.clone().unwrap()); // d = 1: no difference
/// # Ok::<(), vistok::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LfqEntropy {
    /// Tokens, N (≥ 1).
    pub tokens: usize,
    /// `[G]`: the mean over tokens of the per-token entropy of each group,
    /// `(1/N) Σ_n Σ_k h(a_{n,k})`, in `[0, d·ln 2]`.
    pub per_token: Vec<f64>,
    /// `[G]`: the exact entropy of each group's average distribution over its `2^d` codes, for
    /// `d ≤` [`EXACT_ENTROPY_MAX_BITS`] (and not from [`Lfq::entropy_factorized`]); else `None`.
    pub codebook: Option<Vec<f64>>,
    /// `[G]`: `Σ_k H_b(P̄_k)` over each group's bits: the factorized codebook entropy, an upper
    /// bound of the exact one.
    pub codebook_factorized: Vec<f64>,
    /// `[G·d]`, in channel order: `P̄_k = (1/N) Σ_n σ(a_{n,k})`, the average probability that
    /// bit `k` is 1 (code `+v`).
    pub bit_probability: Vec<f64>,
}

impl LfqEntropy {
    /// The per-token entropy averaged over groups too (vector-quantize-pytorch's
    /// `per_sample_entropy`).
    pub fn per_token_mean(&self) -> f64 {
        self.per_token.iter().sum::<f64>() / self.per_token.len() as f64
    }

    /// The exact codebook entropy averaged over groups (vector-quantize-pytorch's
    /// `codebook_entropy`), when computed.
    pub fn codebook_mean(&self) -> Option<f64> {
        self.codebook.as_ref().map(|c| c.iter().sum::<f64>() / c.len() as f64)
    }

    /// The factorized codebook entropy averaged over groups.
    pub fn codebook_factorized_mean(&self) -> f64 {
        self.codebook_factorized.iter().sum::<f64>() / self.codebook_factorized.len() as f64
    }
}
