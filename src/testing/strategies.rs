//! proptest strategies for the inputs that break quantizers and kernels.
//!
//! Scalars and shapes are plain proptest strategies (they shrink). The structured cases
//! (codebooks with planted near-ties, attention problems) draw their shape with proptest and
//! fill the data from a drawn seed, so a failure shrinks to a small shape and reproduces from
//! its seed.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use crate::argmin::Metric;
use crate::attention::{Attention, Bias, Mask, QkvLayout};
use crate::fsq::EPS;
use crate::lfq::{BitOrder, LfqConfig};

/// Lengths that trip SIMD heads and tails: 1, small primes, one either side of the f32 lane
/// counts (4, 8, 16), of bf16's 32 and of the 64-code / 256 tiles.
static AWKWARD_LENS: [usize; 20] = [1, 2, 3, 5, 7, 9, 13, 15, 17, 31, 33, 37, 61, 63, 65, 127, 129, 255, 257, 263];

/// Dimensions (the contiguous axis: channels, head dim, codebook dim) with the same edges, up
/// to 65.
static AWKWARD_DIMS: [usize; 17] = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65];

/// A small deterministic generator (splitmix64) for the seed-filled cases.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n ≥ 1`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[lo, hi)`.
    pub(crate) fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    fn sign(&mut self) -> f32 {
        if self.below(2) == 0 {
            1.0
        } else {
            -1.0
        }
    }

    /// A value of moderate size with the awkward ones mixed in: ±0.0, subnormals, tiny values,
    /// values an ulp from ±1; never large enough for a square or a dot product to leave the
    /// f32 range.
    pub(crate) fn moderate(&mut self) -> f32 {
        match self.below(24) {
            0 => 0.0,
            1 => -0.0,
            2 => self.sign() * f32::from_bits(1 + self.below(0x7f_ffff) as u32),
            3 => self.sign() * self.uniform(1e-30, 1e-20),
            4 => ulps(self.sign(), self.below(5) as i32 - 2),
            _ => self.uniform(-2.0, 2.0),
        }
    }
}

/// `x` moved by `n` ulps (through zero if needed: the f32 values in order).
fn ulps(x: f32, n: i32) -> f32 {
    // The f32 values as an ordered integer line: negative values below the positive ones.
    let key = |v: f32| -> i64 {
        let b = v.to_bits() as i64;
        if v.is_sign_negative() {
            -(b & 0x7fff_ffff)
        } else {
            b
        }
    };
    let k = key(x) + n as i64;
    if k < 0 {
        -f32::from_bits((-k) as u32)
    } else {
        f32::from_bits(k as u32)
    }
}

/// A length ≥ 1 that trips SIMD heads and tails and thread chunking: 1, primes, one either
/// side of a SIMD width (4, 8, 16, 32 lanes) and of a tile (64, 256), and uniform in `1..300`.
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let n = vistok::testing::odd_len().new_tree(&mut runner).unwrap().current();
/// assert!((1..300).contains(&n));
/// ```
pub fn odd_len() -> impl Strategy<Value = usize> {
    prop_oneof![3 => select(&AWKWARD_LENS[..]), 1 => 1usize..300]
}

/// A length for a token count, including `0` (empty input must write nothing): `0`, or
/// [`odd_len`] capped at `max` (≥ 1).
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let n = vistok::testing::token_count(40).new_tree(&mut runner).unwrap().current();
/// assert!(n <= 40);
/// ```
pub fn token_count(max: usize) -> impl Strategy<Value = usize> {
    let max = max.max(1);
    prop_oneof![1 => Just(0usize), 6 => odd_len().prop_map(move |n| n.min(max))]
}

/// A contiguous dimension (channels, head dim, codebook dim) in `1..=65` that trips SIMD
/// kernels: 1, 2, 3, lane counts ± 1 (4, 8, 16, 32, 64), odd values.
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let d = vistok::testing::awkward_dim().new_tree(&mut runner).unwrap().current();
/// assert!((1..=65).contains(&d));
/// ```
pub fn awkward_dim() -> impl Strategy<Value = usize> {
    prop_oneof![3 => select(&AWKWARD_DIMS[..]), 1 => 1usize..=48]
}

/// Finite f32 values that break sign tests, roundings and SIMD reductions: `+0.0` and `−0.0`,
/// subnormals of both signs (down to the smallest, one ulp from zero), `±f32::MIN_POSITIVE`,
/// tiny values, huge finite values (`±f32::MAX`, `±1e30`), values within 2 ulps of the
/// rounding boundaries `±0.5`, `±1.5`, `±2.5` and of `±1`, `±2`, and ordinary values in
/// `[−4, 4]`. Never NaN or `±∞` (see [`hard_f32_or_inf`]).
///
/// Huge values are meant for sign- and rounding-based kernels (LFQ, FSQ); distance and
/// attention kernels document an f32 range (their squares must not overflow), so
/// [`argmin_case`] and [`attention_case`] use a moderate mix instead.
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// for _ in 0..100 {
///     assert!(vistok::testing::hard_f32().new_tree(&mut runner).unwrap().current().is_finite());
/// }
/// ```
pub fn hard_f32() -> impl Strategy<Value = f32> {
    let sign = prop_oneof![Just(1.0f32), Just(-1.0f32)];
    let subnormal = (1u32..0x80_0000, sign.clone()).prop_map(|(b, s)| s * f32::from_bits(b));
    let special = select(vec![
        f32::from_bits(1),
        -f32::from_bits(1),
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::MAX,
        -f32::MAX,
        1e30,
        -1e30,
        f32::EPSILON,
        -f32::EPSILON,
    ]);
    let near = (select(vec![0.5f32, 1.0, 1.5, 2.0, 2.5]), -2i32..=2, sign.clone()).prop_map(|(x, n, s)| ulps(s * x, n));
    let tiny = (1e-30f32..1e-20, sign).prop_map(|(x, s)| s * x);
    prop_oneof![
        2 => Just(0.0f32),
        2 => Just(-0.0f32),
        2 => subnormal,
        1 => special,
        2 => near,
        1 => tiny,
        6 => -4.0f32..4.0,
    ]
}

/// [`hard_f32`] with `+∞` and `−∞` mixed in (LFQ and FSQ accept infinities: they follow their
/// sign, or saturate).
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// assert!(!vistok::testing::hard_f32_or_inf().new_tree(&mut runner).unwrap().current().is_nan());
/// ```
pub fn hard_f32_or_inf() -> impl Strategy<Value = f32> {
    prop_oneof![1 => Just(f32::INFINITY), 1 => Just(f32::NEG_INFINITY), 14 => hard_f32()]
}

/// The rounding boundaries of one FSQ dimension with `levels` levels: the `z` whose f64
/// pre-rounding value [`bound`](crate::reference::fsq::bound)`(levels, z)` is exactly `k + 0.5`
/// (`z = atanh((k + 0.5 + offset)/half_l) − shift`, every `k` inside the range of the bound),
/// rounded to the nearest f32 and then moved by up to 3 ulps either way. These are the inputs
/// where an f32 implementation may round to the neighbouring level; see
/// [`check_fsq`](super::check_fsq) for what is tolerated.
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// use vistok::reference::fsq::bound;
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let z = vistok::testing::fsq_boundary_values(5).new_tree(&mut runner).unwrap().current();
/// let b = bound(5, z as f64);
/// assert!((b - b.floor() - 0.5).abs() < 1e-5); // within a few ulps of k + 0.5
/// ```
pub fn fsq_boundary_values(levels: u32) -> impl Strategy<Value = f32> {
    let l = levels.max(2);
    let half_l = (l - 1) as f64 * (1.0 + EPS) / 2.0;
    let offset = if l.is_multiple_of(2) { 0.5 } else { 0.0 };
    // k + 0.5 + offset strictly inside (−half_l, half_l).
    let kmin = (-half_l - 0.5 - offset).floor() as i64 + 1;
    let kmax = (half_l - 0.5 - offset).ceil() as i64 - 1;
    (kmin..=kmax, -3i32..=3).prop_map(move |(k, n)| {
        let y = (k as f64 + 0.5 + offset) / half_l;
        let z = y.atanh() - (offset / half_l).atanh();
        ulps(z as f32, n)
    })
}

/// FSQ level lists: the published ones (`[8, 5, 5, 5]`, `[8, 8, 8, 5, 5, 5]`, `[7, 5, 5, 5, 5]`,
/// sixteen 2s), random lists of 1 to 6 levels in `2..=16`, and large levels around 1000 (where
/// the clamp acts) and 4096. Every product is below `2^32`.
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let levels = vistok::testing::fsq_levels().new_tree(&mut runner).unwrap().current();
/// assert!(vistok::Fsq::new(&levels).is_ok());
/// ```
pub fn fsq_levels() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        1 => Just(vec![8, 5, 5, 5]),
        1 => Just(vec![8, 8, 8, 5, 5, 5]),
        1 => Just(vec![7, 5, 5, 5, 5]),
        1 => Just(vec![2; 16]),
        4 => vec(2u32..=16, 1..=6),
        1 => vec(select(vec![2u32, 3, 999, 1000, 1001, 1002, 4096]), 1..=2),
    ]
}

/// `z` `[N, D]` (row-major, `N` from [`token_count`]) for FSQ with these levels: every
/// element is, with equal odds, at a rounding boundary of its dimension
/// ([`fsq_boundary_values`]) or from [`hard_f32_or_inf`]. `N·D` stays below about 4000.
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let z = vistok::testing::fsq_input(vec![8, 5, 5]).new_tree(&mut runner).unwrap().current();
/// assert_eq!(z.len() % 3, 0);
/// ```
pub fn fsq_input(levels: Vec<u32>) -> impl Strategy<Value = Vec<f32>> {
    let row: Vec<BoxedStrategy<f32>> =
        levels.iter().map(|&l| prop_oneof![fsq_boundary_values(l), hard_f32_or_inf()].boxed()).collect();
    let max_n = (4000 / levels.len().max(1)).max(1);
    token_count(max_n).prop_flat_map(move |n| vec(row.clone(), n)).prop_map(|rows| rows.concat())
}

/// An FSQ case: levels from [`fsq_levels`] and `z` from [`fsq_input`].
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let (levels, z) = vistok::testing::fsq_case().new_tree(&mut runner).unwrap().current();
/// assert_eq!(z.len() % levels.len(), 0);
/// ```
pub fn fsq_case() -> impl Strategy<Value = (Vec<u32>, Vec<f32>)> {
    fsq_levels().prop_flat_map(|levels| (Just(levels.clone()), fsq_input(levels)))
}

/// LFQ / BSQ configurations: 1 to 4 groups of `d` bits (`d` = 1, 8, 16, 31, 32 or anything in
/// `1..=32`), either bit order, scale 1 or in `[0.01, 100)`, spherical or not.
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let c = vistok::testing::lfq_config().new_tree(&mut runner).unwrap().current();
/// assert!(vistok::Lfq::new(&c).is_ok());
/// ```
pub fn lfq_config() -> impl Strategy<Value = LfqConfig> {
    let bits = prop_oneof![select(vec![1u32, 8, 16, 31, 32]), 1u32..=32];
    let order = prop_oneof![Just(BitOrder::MsbFirst), Just(BitOrder::LsbFirst)];
    let scale = prop_oneof![Just(1.0f32), 0.01f32..100.0];
    (1usize..=4, bits, order, scale, any::<bool>())
        .prop_map(|(g, d, order, s, spherical)| LfqConfig::new(g, d, order).scale(s).spherical(spherical))
}

/// `z` `[N, G·d]` (row-major, `N` from [`token_count`]) for LFQ with this configuration, every
/// element from [`hard_f32_or_inf`]: the sign test meets `±0.0`, subnormals and infinities.
/// `N·G·d` stays below about 4000.
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// use vistok::{BitOrder, LfqConfig};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let z = vistok::testing::lfq_input(&LfqConfig::new(2, 5, BitOrder::MsbFirst))
///     .new_tree(&mut runner).unwrap().current();
/// assert_eq!(z.len() % 10, 0);
/// ```
pub fn lfq_input(config: &LfqConfig) -> impl Strategy<Value = Vec<f32>> {
    let c = config.groups.saturating_mul(config.bits as usize).max(1);
    token_count((4000 / c).max(1)).prop_flat_map(move |n| vec(hard_f32_or_inf(), n * c))
}

/// An LFQ case: a configuration from [`lfq_config`] and `z` from [`lfq_input`].
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let (c, z) = vistok::testing::lfq_case().new_tree(&mut runner).unwrap().current();
/// assert_eq!(z.len() % (c.groups * c.bits as usize), 0);
/// ```
pub fn lfq_case() -> impl Strategy<Value = (LfqConfig, Vec<f32>)> {
    lfq_config().prop_flat_map(|c| (Just(c), lfq_input(&c)))
}

/// A codebook with planted near-ties around one query: see [`near_tie_codebook`].
#[derive(Debug, Clone, PartialEq)]
pub struct NearTie {
    /// Entries `[K, D]`, row-major.
    pub codebook: Vec<f32>,
    /// The query `[D]`.
    pub query: Vec<f32>,
    /// Indices of the planted tie group (the entries nearly as close to the query as the
    /// nearest, in L2 or in cosine), ascending.
    pub ties: Vec<u32>,
}

/// A codebook `[k, d]` (`k, d ≥ 1`) and one query whose nearest entries are nearly tied: with
/// `δ` a random offset, the tie group holds `x + Pδ` for sign flips and cyclic shifts `P`
/// (equal L2 distance in exact arithmetic; f32 rounding of the sum moves them by a few ulps),
/// positive multiples `s·(x + δ)` (equal cosine), exact duplicates, and copies nudged by one
/// ulp. The other entries are farther away. Entries sit at random positions, so duplicates
/// straddle SIMD groups and tiles.
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let t = vistok::testing::near_tie_codebook(20, 5).new_tree(&mut runner).unwrap().current();
/// assert_eq!((t.codebook.len(), t.query.len()), (100, 5));
/// assert!(t.ties.len() >= 2);
/// ```
pub fn near_tie_codebook(k: usize, d: usize) -> impl Strategy<Value = NearTie> {
    let (k, d) = (k.max(1), d.max(1));
    any::<u64>().prop_map(move |seed| planted_ties(&mut Rng::new(seed), k, d))
}

fn planted_ties(r: &mut Rng, k: usize, d: usize) -> NearTie {
    let query: Vec<f32> = (0..d).map(|_| r.moderate()).collect();
    let delta: Vec<f32> = (0..d).map(|_| r.sign() * r.uniform(0.05, 0.5)).collect();
    let base: Vec<f32> = query.iter().zip(&delta).map(|(x, e)| x + e).collect();
    let group = k.min(2 + r.below(5) as usize);
    let mut entries: Vec<Vec<f32>> = vec![base.clone()];
    while entries.len() < group {
        let e: Vec<f32> = match r.below(4) {
            0 => {
                // x + Pδ: a cyclic shift and sign flips keep ‖δ‖.
                let shift = r.below(d as u64) as usize;
                (0..d).map(|j| query[j] + r.sign() * delta[(j + shift) % d]).collect()
            }
            1 => {
                let s = [0.5f32, 2.0, 3.0, 0.25, 7.0][r.below(5) as usize];
                base.iter().map(|v| s * v).collect()
            }
            2 => base.clone(),
            _ => {
                let mut e = base.clone();
                let j = r.below(d as u64) as usize;
                e[j] = ulps(e[j], if r.below(2) == 0 { 1 } else { -1 });
                e
            }
        };
        entries.push(e);
    }
    // Fillers: farther in L2 (|offset| ≥ 1 in every coordinate) and in direction.
    while entries.len() < k {
        let e: Vec<f32> = query.iter().map(|x| x + r.sign() * r.uniform(1.0, 3.0)).collect();
        entries.push(e);
    }
    // Shuffle (Fisher–Yates), remembering where the tie group went.
    let mut order: Vec<usize> = (0..k).collect();
    for i in (1..k).rev() {
        order.swap(i, r.below(i as u64 + 1) as usize);
    }
    let mut codebook = vec![0.0f32; k * d];
    let mut ties = vec![];
    for (slot, &src) in order.iter().enumerate() {
        codebook[slot * d..][..d].copy_from_slice(&entries[src]);
        if src < group {
            ties.push(slot as u32);
        }
    }
    NearTie { codebook, query, ties }
}

/// A codebook search problem: see [`argmin_case`].
#[derive(Debug, Clone, PartialEq)]
pub struct ArgminCase {
    /// The metric.
    pub metric: Metric,
    /// Entries K.
    pub k: usize,
    /// Dimension D.
    pub d: usize,
    /// Entries `[K, D]`, row-major.
    pub codebook: Vec<f32>,
    /// Queries `[N, D]`, row-major (`N = x.len() / d`, possibly 0).
    pub x: Vec<f32>,
}

impl ArgminCase {
    /// The number of queries N.
    ///
    /// ```
    /// let c = vistok::testing::ArgminCase {
    ///     metric: vistok::Metric::L2, k: 1, d: 2, codebook: vec![0.0; 2], x: vec![1.0; 6],
    /// };
    /// assert_eq!(c.n(), 3);
    /// ```
    pub fn n(&self) -> usize {
        self.x.len() / self.d
    }
}

/// A codebook search problem that breaks argmin kernels: `K` around the 16-code groups and
/// 64-code padding (1, 2, 3, 15–17, 63–65, or up to 200), `D` from [`awkward_dim`], L2 or
/// cosine; the codebook from [`near_tie_codebook`] (planted near-ties, duplicated entries)
/// with a few more duplicates and a zero entry now and then; queries that are the planted
/// query (and copies a few ulps away), exact copies of entries (distance 0; duplicates must
/// resolve to the lowest index), zero vectors, and random vectors with `±0.0`, subnormal and
/// tiny coordinates. Values stay within `±20`, so no square leaves the f32 range.
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let c = vistok::testing::argmin_case().new_tree(&mut runner).unwrap().current();
/// assert_eq!(c.codebook.len(), c.k * c.d);
/// assert_eq!(c.x.len(), c.n() * c.d);
/// ```
pub fn argmin_case() -> impl Strategy<Value = ArgminCase> {
    let k = prop_oneof![select(vec![1usize, 2, 3, 15, 16, 17, 63, 64, 65]), 1usize..200];
    let metric = prop_oneof![Just(Metric::L2), Just(Metric::Cosine)];
    (k, awkward_dim(), metric, token_count(40), any::<u64>()).prop_map(|(k, d, metric, n, seed)| {
        let mut r = Rng::new(seed);
        let t = planted_ties(&mut r, k, d);
        let mut codebook = t.codebook;
        // More duplicates (later copies of earlier entries), and sometimes a zero entry.
        for _ in 0..r.below(3) {
            let (a, b) = (r.below(k as u64) as usize, r.below(k as u64) as usize);
            let (lo, hi) = (a.min(b), a.max(b));
            if lo != hi {
                let row = codebook[lo * d..][..d].to_vec();
                codebook[hi * d..][..d].copy_from_slice(&row);
            }
        }
        if r.below(4) == 0 {
            let z = r.below(k as u64) as usize;
            codebook[z * d..][..d].fill(0.0);
        }
        let mut x = Vec::with_capacity(n * d);
        for _ in 0..n {
            match r.below(6) {
                0 => x.extend_from_slice(&t.query),
                1 => x.extend(t.query.iter().map(|&v| ulps(v, r.below(5) as i32 - 2))),
                2 => {
                    let e = r.below(k as u64) as usize;
                    x.extend_from_slice(&codebook[e * d..][..d]);
                }
                3 if r.below(3) == 0 => x.extend((0..d).map(|_| if r.below(2) == 0 { 0.0 } else { -0.0 })),
                _ => x.extend((0..d).map(|_| r.moderate() * 4.0)),
            }
        }
        ArgminCase { metric, k, d, codebook, x }
    })
}

/// Which keys a query of an [`AttentionCase`] sees (the owned form of [`Mask`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskCase {
    /// Every key.
    None,
    /// `j ≤ i + Nk − Nq`.
    Causal,
    /// `i + Nk − Nq − left ≤ j ≤ i + Nk − Nq + right`.
    Window {
        /// Keys before the diagonal.
        left: usize,
        /// Keys after the diagonal.
        right: usize,
    },
    /// Block-causal: `k[j] ≤ q[i]`.
    Segments {
        /// `[Nq]` query segment ids.
        q: Vec<u32>,
        /// `[Nk]` key segment ids.
        k: Vec<u32>,
    },
}

/// An attention problem: see [`attention_case`].
///
/// ```
/// use vistok::testing::{AttentionCase, MaskCase};
/// use vistok::{reference, QkvLayout, View, ViewMut};
/// // Two queries, one key; causal with Nq > Nk: query 0 sees no key.
/// let c = AttentionCase {
///     b: 1, h: 1, hkv: 1, nq: 2, nk: 1, d: 2, layout: QkvLayout::Bhnd, scale: None,
///     mask: MaskCase::Causal, key_bias: None,
///     q: vec![1.0, 0.0, 0.0, 1.0], k: vec![1.0, 1.0], v: vec![0.5, -0.5],
/// };
/// assert!(c.fully_masked(0, 0) && !c.fully_masked(0, 1));
/// let (mut o, mut lse) = (vec![9.0f32; 4], vec![0.0f32; 2]);
/// reference::attention_forward(&c.attention(), View::new(&c.q, &c.q_dims())?, View::new(&c.k, &c.kv_dims())?,
///     View::new(&c.v, &c.kv_dims())?, ViewMut::new(&mut o, &c.q_dims())?, ViewMut::new(&mut lse, &c.lse_dims())?)?;
/// assert_eq!((o, lse[0]), (vec![0.0, 0.0, 0.5, -0.5], f32::NEG_INFINITY));
/// # Ok::<(), vistok::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionCase {
    /// Batch B.
    pub b: usize,
    /// Query heads H (a multiple of `hkv`).
    pub h: usize,
    /// Key / value heads.
    pub hkv: usize,
    /// Queries per head.
    pub nq: usize,
    /// Keys per head.
    pub nk: usize,
    /// Head dimension D.
    pub d: usize,
    /// Memory layout.
    pub layout: QkvLayout,
    /// Score scale (`None`: `1/√D`).
    pub scale: Option<f32>,
    /// The mask.
    pub mask: MaskCase,
    /// A per-key bias `[B, Nk]` (`−∞` masks a key), if any.
    pub key_bias: Option<Vec<f32>>,
    /// Q, in `layout`.
    pub q: Vec<f32>,
    /// K, in `layout`.
    pub k: Vec<f32>,
    /// V, in `layout`.
    pub v: Vec<f32>,
}

impl AttentionCase {
    /// The options, borrowing the mask's ids and the bias from `self`.
    pub fn attention(&self) -> Attention<'_> {
        let mut a = Attention::new().layout(self.layout).mask(match &self.mask {
            MaskCase::None => Mask::None,
            MaskCase::Causal => Mask::Causal,
            MaskCase::Window { left, right } => Mask::Window { left: *left, right: *right },
            MaskCase::Segments { q, k } => Mask::Segments { q, k },
        });
        if let Some(s) = self.scale {
            a = a.scale(s);
        }
        if let Some(bias) = &self.key_bias {
            // The dims match the data by construction.
            if let Ok(v) = crate::View::new(bias, &[self.b, self.nk]) {
                a = a.bias(Bias::Key(v));
            }
        }
        a
    }

    /// Dims of Q and O.
    pub fn q_dims(&self) -> [usize; 4] {
        match self.layout {
            QkvLayout::Bhnd => [self.b, self.h, self.nq, self.d],
            QkvLayout::Bnhd => [self.b, self.nq, self.h, self.d],
        }
    }

    /// Dims of K and V.
    pub fn kv_dims(&self) -> [usize; 4] {
        match self.layout {
            QkvLayout::Bhnd => [self.b, self.hkv, self.nk, self.d],
            QkvLayout::Bnhd => [self.b, self.nk, self.hkv, self.d],
        }
    }

    /// Dims of the log-sum-exp, `[B, H, Nq]`.
    pub fn lse_dims(&self) -> [usize; 3] {
        [self.b, self.h, self.nq]
    }

    /// Whether row `(b, ·, i)` sees no key at all (the same for every head), from the
    /// contract's definitions: the mask, `−∞` key biases, `Nk = 0`.
    pub fn fully_masked(&self, b: usize, i: usize) -> bool {
        let diag = i as i128 + self.nk as i128 - self.nq as i128;
        !(0..self.nk).any(|j| {
            let jj = j as i128;
            let seen = match &self.mask {
                MaskCase::None => true,
                MaskCase::Causal => jj <= diag,
                MaskCase::Window { left, right } => diag - *left as i128 <= jj && jj <= diag + *right as i128,
                MaskCase::Segments { q, k } => k[j] <= q[i],
            };
            let biased_out = self.key_bias.as_ref().is_some_and(|bias| bias[b * self.nk + j] == f32::NEG_INFINITY);
            seen && !biased_out
        })
    }
}

/// Small attention problems that break flash-style kernels: `B` 1–2, grouped-query heads,
/// `Nq` and `Nk` from {0, 1, 2, 3, 5, 16, 17, 33} (`Nk = 0` and `Nq > Nk` under a causal mask
/// leave rows with no key), `D` from [`awkward_dim`], both layouts, every mask kind (segments
/// sometimes unsorted, so that a query's segment can be below every key's), and a per-key bias
/// with `−∞` entries (now and then a whole batch of them: every row of that batch fully
/// masked). Q and K mix `±0.0`, subnormals and tiny values into `[−2, 2]`; V is in `[−1, 1]`.
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// let mut runner = proptest::test_runner::TestRunner::deterministic();
/// let c = vistok::testing::attention_case().new_tree(&mut runner).unwrap().current();
/// assert_eq!(c.q.len(), c.q_dims().iter().product::<usize>());
/// ```
pub fn attention_case() -> impl Strategy<Value = AttentionCase> {
    let tokens = || select(vec![0usize, 1, 2, 3, 5, 16, 17, 33]);
    let layout = prop_oneof![Just(QkvLayout::Bhnd), Just(QkvLayout::Bnhd)];
    let shape = (1usize..=2, 1usize..=2, 1usize..=2, tokens(), tokens(), awkward_dim(), layout);
    (shape, 0u8..4, 0u8..3, any::<bool>(), any::<u64>()).prop_map(
        |((b, hkv, group, nq, nk, d, layout), mask, bias, default_scale, seed)| {
            let mut r = Rng::new(seed);
            let h = hkv * group;
            let seg = |n: usize, sorted: bool, r: &mut Rng| -> Vec<u32> {
                let mut s = 0u32;
                (0..n)
                    .map(|_| {
                        if sorted {
                            s += (r.below(3) == 0) as u32;
                            s
                        } else {
                            r.below(4) as u32
                        }
                    })
                    .collect()
            };
            let mask = match mask {
                0 => MaskCase::None,
                1 => MaskCase::Causal,
                2 => MaskCase::Window { left: r.below(4) as usize, right: r.below(3) as usize },
                _ => {
                    let sorted = r.below(3) != 0;
                    MaskCase::Segments { q: seg(nq, sorted, &mut r), k: seg(nk, sorted, &mut r) }
                }
            };
            let key_bias = (bias > 0).then(|| {
                let all_masked = bias == 2 && r.below(2) == 0;
                (0..b * nk)
                    .map(|i| {
                        if (all_masked && i < nk) || r.below(5) == 0 {
                            f32::NEG_INFINITY
                        } else {
                            r.uniform(-2.0, 2.0)
                        }
                    })
                    .collect()
            });
            let scale = (!default_scale).then(|| r.uniform(0.05, 1.0));
            let q = (0..b * h * nq * d).map(|_| r.moderate()).collect();
            let k = (0..b * hkv * nk * d).map(|_| r.moderate()).collect();
            let v = (0..b * hkv * nk * d).map(|_| r.uniform(-1.0, 1.0)).collect();
            AttentionCase { b, h, hkv, nq, nk, d, layout, scale, mask, key_bias, q, k, v }
        },
    )
}
