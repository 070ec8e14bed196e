//! LFQ / group-wise LFQ / BSQ: every CPU ISA level against the reference on random shapes,
//! dtypes and bit orders with planted zeros, −0.0, subnormals, huge values and infinities;
//! exhaustive round trips for small codebooks; hand-computed ids; NaN and other bad input.

mod common;

use common::{assert_bits_eq, poison, Rng};
use proptest::prelude::*;
use vistok::{bf16, f16, Backend, BitOrder, Error, Family, Float, Isa, Lfq, LfqConfig, LfqStats, View, ViewMut};

const ID_POISON: u32 = 0xDEAD_BEEF;

fn cpu_backends() -> Vec<Backend> {
    Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa).chain([Backend::Cpu]).collect()
}

fn all_backends() -> Vec<Backend> {
    [Backend::Reference].into_iter().chain(cpu_backends()).collect()
}

fn encode<T: Float>(plan: &Lfq, backend: Backend, z: &[T]) -> Result<Vec<u32>, Error> {
    let n = z.len() / plan.channels();
    let mut ids = vec![ID_POISON; n * plan.groups()];
    plan.encode(backend, View::new(z, &plan.codes_dims(n))?, ViewMut::new(&mut ids, &plan.ids_dims(n))?)?;
    Ok(ids)
}

fn encode_normalized<T: Float, O: Float>(plan: &Lfq, backend: Backend, z: &[T]) -> (Vec<u32>, Vec<O>) {
    let n = z.len() / plan.channels();
    let mut ids = vec![ID_POISON; n * plan.groups()];
    let mut u = vec![poison::<O>(); z.len()];
    plan.encode_normalized(
        backend,
        View::new(z, &plan.codes_dims(n)).unwrap(),
        ViewMut::new(&mut ids, &plan.ids_dims(n)).unwrap(),
        ViewMut::new(&mut u, &plan.codes_dims(n)).unwrap(),
    )
    .unwrap();
    (ids, u)
}

fn decode<O: Float>(plan: &Lfq, backend: Backend, ids: &[u32]) -> Result<Vec<O>, Error> {
    let n = ids.len() / plan.groups();
    let mut codes = vec![poison::<O>(); n * plan.channels()];
    plan.decode(backend, View::new(ids, &plan.ids_dims(n))?, ViewMut::new(&mut codes, &plan.codes_dims(n))?)?;
    Ok(codes)
}

/// Values that stress the sign test: ordinary values of both signs, exact ±0.0, subnormals of
/// both signs, huge magnitudes and infinities.
fn planted<T: Float>(n: usize, seed: u64) -> Vec<T> {
    let mut r = Rng(seed);
    (0..n)
        .map(|_| {
            let v = match r.next_u64() % 12 {
                0 => 0.0,
                1 => -0.0,
                2 => 1e-40,
                3 => -1e-40,
                4 => 6e-8, // an f16 subnormal
                5 => -6e-8,
                6 => 3e38,
                7 => -3e38,
                8 => f32::INFINITY,
                9 => f32::NEG_INFINITY,
                _ => r.uniform(-2.0, 2.0),
            };
            T::from_f32(v)
        })
        .collect()
}

/// Random valid ids for `plan`.
fn random_ids(plan: &Lfq, n: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng(seed);
    (0..n * plan.groups()).map(|_| (r.next_u64() % plan.codebook_size()) as u32).collect()
}

fn is_error(e: &Error, needle: &str) -> bool {
    matches!(e, Error::Invalid { family: Family::Lfq, msg } if msg.contains(needle))
}

/// A NaN in `z` is `Error::NonFinite` naming the element as `z[row, col]`.
fn is_nan_at(e: &Error, at: &str) -> bool {
    matches!(e, Error::NonFinite { family: Family::Lfq, what } if what == at)
}

/// Every backend against the reference for one dtype: ids, normalised z, codes and round trips.
fn check_dtype<T: Float>(plan: &Lfq, n: usize, seed: u64) {
    check_z(plan, &planted::<T>(n * plan.channels(), seed), seed);
}

/// [`check_dtype`] on given `z` `[N, G·d]`.
fn check_z<T: Float>(plan: &Lfq, z: &[T], seed: u64) {
    let n = z.len() / plan.channels();
    let ctx = format!("{:?} {plan:?} n={n}", T::DTYPE);
    let want = encode(plan, Backend::Reference, z).unwrap();
    if plan.bits() < 32 {
        assert!(want.iter().all(|&id| id != ID_POISON), "{ctx}: reference left ids unwritten");
    }
    let (want_ids_n, want_u) = encode_normalized::<T, T>(plan, Backend::Reference, z);
    assert_eq!(want_ids_n, want, "{ctx}: encode_normalized ids");
    let ids = random_ids(plan, n, seed ^ 0xABCD);
    let want_codes: Vec<T> = decode(plan, Backend::Reference, &ids).unwrap();
    for be in cpu_backends() {
        assert_eq!(encode(plan, be, z).unwrap(), want, "{ctx} {be:?}: encode");
        let (got_ids, got_u) = encode_normalized::<T, T>(plan, be, z);
        assert_eq!(got_ids, want, "{ctx} {be:?}: encode_normalized ids");
        assert_bits_eq(&got_u, &want_u, &format!("{ctx} {be:?}: normalized"));
        let codes: Vec<T> = decode(plan, be, &ids).unwrap();
        assert_bits_eq(&codes, &want_codes, &format!("{ctx} {be:?}: decode"));
    }
    for be in all_backends() {
        // encode(decode(ids)) == ids, decode(encode(codes)) == codes.
        assert_eq!(encode(plan, be, &want_codes).unwrap(), ids, "{ctx} {be:?}: encode ∘ decode");
        let back: Vec<T> = decode(plan, be, &encode(plan, be, &want_codes).unwrap()).unwrap();
        assert_bits_eq(&back, &want_codes, &format!("{ctx} {be:?}: decode ∘ encode"));
    }
}

fn order_strategy() -> impl Strategy<Value = BitOrder> {
    prop_oneof![Just(BitOrder::MsbFirst), Just(BitOrder::LsbFirst)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn cpu_matches_reference(
        n in prop_oneof![0usize..4, 1usize..200, 60usize..70],
        groups in 1usize..5,
        bits in 1u32..=32,
        order in order_strategy(),
        spherical in any::<bool>(),
        scale in prop_oneof![Just(1.0f32), 0.01f32..100.0],
        seed in any::<u64>(),
    ) {
        let plan = Lfq::new(&LfqConfig::new(groups, bits, order).scale(scale).spherical(spherical)).unwrap();
        check_dtype::<f32>(&plan, n, seed);
        check_dtype::<f16>(&plan, n, seed + 1);
        check_dtype::<bf16>(&plan, n, seed + 2);
    }
}

#[cfg(feature = "testing")]
proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The exported configurations and inputs (±0.0, subnormals, ±∞, huge, values an ulp from
    /// the rounding points, awkward token counts) through the same checks, in every dtype.
    #[test]
    fn exported_cases_match_reference((config, z) in vistok::testing::lfq_case(), seed in any::<u64>()) {
        let plan = Lfq::new(&config).unwrap();
        check_z(&plan, &z, seed);
        check_z(&plan, &z.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(), seed ^ 1);
        check_z(&plan, &z.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), seed ^ 2);
    }
}

/// Enough ids for several thread chunks, so results must not depend on how they are split.
#[test]
fn many_chunks_match_reference() {
    for (groups, bits) in [(1, 1), (1, 18), (4, 8), (3, 32)] {
        for order in [BitOrder::MsbFirst, BitOrder::LsbFirst] {
            let plan = Lfq::new(&LfqConfig::new(groups, bits, order)).unwrap();
            check_dtype::<f32>(&plan, 40_000 / bits as usize + 17, bits as u64);
            check_dtype::<bf16>(&plan, 40_000 / bits as usize + 3, bits as u64 + 1);
        }
    }
}

#[test]
fn hand_computed_ids() {
    // [1, −1, −1, −1]: only channel 0 is positive.
    let z = [1.0f32, -1.0, -1.0, -1.0, 0.5, -1.0, 0.0, 2.0, -0.0, 1e-40, -1e-40, f32::INFINITY];
    let msb = Lfq::new(&LfqConfig::new(1, 4, BitOrder::MsbFirst)).unwrap();
    let lsb = Lfq::new(&LfqConfig::new(1, 4, BitOrder::LsbFirst)).unwrap();
    for be in all_backends() {
        assert_eq!(encode(&msb, be, &z).unwrap(), [8, 0b1001, 0b0101], "{be:?}");
        assert_eq!(encode(&lsb, be, &z).unwrap(), [1, 0b1001, 0b1010], "{be:?}");
    }
    // Group-wise: the same 12 channels as 3 groups of 4 bits of one token.
    let g3 = Lfq::new(&LfqConfig::new(3, 4, BitOrder::LsbFirst)).unwrap();
    for be in all_backends() {
        assert_eq!(encode(&g3, be, &z).unwrap(), [1, 0b1001, 0b1010], "{be:?}");
        let codes: Vec<f32> = decode(&g3, be, &[1, 0b1001, 0b1010]).unwrap();
        let want = [1., -1., -1., -1., 1., -1., -1., 1., -1., 1., -1., 1.];
        assert_eq!(codes, want, "{be:?}");
    }
    // BSQ codes are ±s/√d.
    let bsq = Lfq::new(&LfqConfig::new(1, 4, BitOrder::MsbFirst).scale(3.0).spherical(true)).unwrap();
    for be in all_backends() {
        assert_eq!(decode::<f32>(&bsq, be, &[8]).unwrap(), [1.5, -1.5, -1.5, -1.5], "{be:?}");
    }
}

#[test]
fn exhaustive_round_trips_small_codebooks() {
    for bits in 1..=12u32 {
        for order in [BitOrder::MsbFirst, BitOrder::LsbFirst] {
            let plan = Lfq::new(&LfqConfig::new(1, bits, order)).unwrap();
            let ids: Vec<u32> = (0..1u32 << bits).collect();
            let want: Vec<f32> = decode(&plan, Backend::Reference, &ids).unwrap();
            for be in all_backends() {
                let codes: Vec<f32> = decode(&plan, be, &ids).unwrap();
                assert_bits_eq(&codes, &want, &format!("d={bits} {order:?} {be:?}"));
                assert_eq!(encode(&plan, be, &codes).unwrap(), ids, "d={bits} {order:?} {be:?}");
                let h: Vec<f16> = decode(&plan, be, &ids).unwrap();
                assert_eq!(encode(&plan, be, &h).unwrap(), ids, "f16 d={bits} {order:?} {be:?}");
            }
        }
    }
}

#[test]
fn normalized_groups() {
    let plan = Lfq::new(&LfqConfig::new(3, 2, BitOrder::LsbFirst).spherical(true)).unwrap();
    let z = [3.0f32, -4.0, 0.0, -0.0, 3e38, 3e38];
    for be in all_backends() {
        let (ids, u) = encode_normalized::<f32, f32>(&plan, be, &z);
        assert_eq!(ids, [0b01, 0b00, 0b11], "{be:?}");
        let s = std::f32::consts::FRAC_1_SQRT_2;
        assert_bits_eq(&u, &[0.6, -0.8, 0.0, -0.0, s, s], &format!("{be:?}"));
    }
}

#[test]
fn empty_input_writes_nothing() {
    let plan = Lfq::new(&LfqConfig::new(2, 5, BitOrder::MsbFirst)).unwrap();
    for be in all_backends() {
        assert_eq!(encode::<f32>(&plan, be, &[]).unwrap(), Vec::<u32>::new());
        assert_eq!(decode::<bf16>(&plan, be, &[]).unwrap(), Vec::<bf16>::new());
    }
}

#[test]
fn nan_reports_the_first_index() {
    let plan = Lfq::new(&LfqConfig::new(1, 1, BitOrder::LsbFirst)).unwrap();
    // Several thread chunks, NaNs in later chunks too: the lowest index must win.
    let mut z = planted::<f32>(100_000, 7);
    for i in [31_000, 90_000, 99_999] {
        z[i] = f32::NAN;
    }
    for be in all_backends() {
        let e = encode(&plan, be, &z).unwrap_err();
        assert!(is_nan_at(&e, "z[31000, 0]"), "{be:?}: {e}");
        assert_eq!(e.to_string(), "lfq: z[31000, 0] is not finite");
    }
    z[5] = -f32::NAN;
    let z16: Vec<f16> = z.iter().map(|&x| f16::from_f32(x)).collect();
    for be in all_backends() {
        assert!(is_nan_at(&encode(&plan, be, &z).unwrap_err(), "z[5, 0]"), "{be:?}");
        assert!(is_nan_at(&encode(&plan, be, &z16).unwrap_err(), "z[5, 0]"), "{be:?}");
    }
    let g = Lfq::new(&LfqConfig::new(3, 7, BitOrder::MsbFirst)).unwrap();
    let mut z = planted::<bf16>(21 * 5, 9);
    z[2 * 21 + 9] = bf16::NAN;
    z[4 * 21] = bf16::NAN;
    for be in all_backends() {
        let e = encode(&g, be, &z).unwrap_err();
        assert!(is_nan_at(&e, "z[2, 9]"), "{be:?}: {e}");
    }
}

#[test]
fn ids_out_of_range_are_errors() {
    let plan = Lfq::new(&LfqConfig::new(2, 5, BitOrder::MsbFirst)).unwrap();
    let mut ids = random_ids(&plan, 50_000, 3);
    ids[70_001] = 32;
    ids[90_000] = u32::MAX;
    for be in all_backends() {
        let e = decode::<f32>(&plan, be, &ids).unwrap_err();
        assert!(is_error(&e, "ids[35000, 1] (element 70001) = 32"), "{be:?}: {e}");
    }
    let full = Lfq::new(&LfqConfig::new(1, 32, BitOrder::LsbFirst)).unwrap();
    for be in all_backends() {
        assert_eq!(decode::<f32>(&full, be, &[u32::MAX]).unwrap(), [1.0; 32]);
    }
}

#[test]
fn bad_configs_and_shapes() {
    let cfg = |g, d| LfqConfig::new(g, d, BitOrder::MsbFirst);
    assert!(matches!(Lfq::new(&cfg(1, 0)), Err(Error::Invalid { family: Family::Lfq, .. })));
    assert!(matches!(Lfq::new(&cfg(1, 33)), Err(Error::Invalid { family: Family::Lfq, .. })));
    assert!(matches!(Lfq::new(&cfg(0, 8)), Err(Error::Shape { family: Family::Lfq, .. })));
    assert!(matches!(Lfq::new(&cfg(usize::MAX, 2)), Err(Error::Overflow { family: Family::Lfq, .. })));
    for s in [0.0, -1.0, f32::INFINITY, f32::NAN] {
        assert!(Lfq::new(&cfg(1, 8).scale(s)).is_err(), "scale {s}");
    }
    assert!(Lfq::new(&cfg(1, 32).scale(1e-45).spherical(true)).is_err(), "s/√d underflows");

    let plan = Lfq::new(&cfg(2, 3)).unwrap();
    let z = vec![1.0f32; 4 * 6];
    let mut ids = vec![0u32; 4 * 2];
    let mut codes = vec![0.0f32; 4 * 6];
    let shape_err = |r: Result<(), Error>| matches!(r, Err(Error::Shape { family: Family::Lfq, .. }));
    for be in all_backends() {
        // Channel count ≠ G·d.
        let r = plan.encode(be, View::new(&z, &[6, 4]).unwrap(), ViewMut::new(&mut ids, &[4, 2]).unwrap());
        assert!(shape_err(r));
        // ids with the wrong N or G.
        let r = plan.encode(be, View::new(&z, &[4, 6]).unwrap(), ViewMut::new(&mut ids, &[2, 4]).unwrap());
        assert!(shape_err(r));
        // Rank 3 z.
        let r = plan.encode(be, View::new(&z, &[2, 2, 6]).unwrap(), ViewMut::new(&mut ids, &[4, 2]).unwrap());
        assert!(shape_err(r));
        let r = plan.decode(be, View::new(&ids, &[8, 1]).unwrap(), ViewMut::new(&mut codes, &[4, 6]).unwrap());
        assert!(shape_err(r));
        let mut u = vec![0.0f32; 4 * 5];
        let r = plan.encode_normalized(
            be,
            View::new(&z, &[4, 6]).unwrap(),
            ViewMut::new(&mut ids, &[4, 2]).unwrap(),
            ViewMut::new(&mut u, &[4, 5]).unwrap(),
        );
        assert!(shape_err(r));
    }
    // Wrong lengths are caught by the views themselves.
    assert!(View::new(&z, &[4, 5]).is_err());
}

#[test]
fn unavailable_isa_is_an_error() {
    let plan = Lfq::new(&LfqConfig::new(1, 4, BitOrder::MsbFirst)).unwrap();
    for isa in Isa::ALL.into_iter().filter(|i| !i.is_available()) {
        assert!(encode::<f32>(&plan, Backend::CpuIsa(isa), &[1.0; 4]).is_err());
    }
}

fn statistics(plan: &Lfq, backend: Backend, ids: &[u32]) -> Result<LfqStats, Error> {
    plan.statistics(backend, View::new(ids, &plan.ids_dims(ids.len() / plan.groups()))?)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn statistics_match_reference(
        n in 0usize..300,
        groups in 1usize..5,
        bits in 1u32..=32,
        order in order_strategy(),
        seed in any::<u64>(),
    ) {
        let plan = Lfq::new(&LfqConfig::new(groups, bits, order)).unwrap();
        let ids = random_ids(&plan, n, seed);
        let want = statistics(&plan, Backend::Reference, &ids).unwrap();
        prop_assert_eq!(want.tokens, n);
        prop_assert_eq!(want.histogram.is_some(), bits <= 20);
        if let Some(h) = &want.histogram {
            prop_assert_eq!(h.iter().sum::<u64>(), (n * groups) as u64);
        }
        for be in cpu_backends() {
            prop_assert_eq!(&statistics(&plan, be, &ids).unwrap(), &want, "{:?}", be);
        }
    }
}

#[test]
fn statistics_many_chunks_and_bad_ids() {
    // 3 groups, so chunk boundaries fall mid-token.
    let plan = Lfq::new(&LfqConfig::new(3, 18, BitOrder::LsbFirst)).unwrap();
    let mut ids = random_ids(&plan, 300_001, 11);
    let want = statistics(&plan, Backend::Reference, &ids).unwrap();
    // Ones per channel from the codes, independently of both implementations.
    let codes: Vec<f32> = decode(&plan, Backend::Reference, &ids).unwrap();
    let mut ones = vec![0u64; plan.channels()];
    for row in codes.chunks(plan.channels()) {
        for (o, &c) in ones.iter_mut().zip(row) {
            *o += (c > 0.0) as u64;
        }
    }
    assert_eq!(want.ones, ones);
    for be in cpu_backends() {
        assert_eq!(statistics(&plan, be, &ids).unwrap(), want, "{be:?}");
    }
    ids[800_000] = 1 << 18;
    ids[900_000] = u32::MAX;
    for be in all_backends() {
        let e = statistics(&plan, be, &ids).unwrap_err();
        assert!(is_error(&e, "(element 800000) = 262144"), "{be:?}: {e}");
    }
}

#[test]
fn any_thread_count_gives_the_same_results() {
    let plan = Lfq::new(&LfqConfig::new(3, 11, BitOrder::MsbFirst).spherical(true)).unwrap();
    let mut z = planted::<f16>(plan.channels() * 20_000, 5);
    let want = encode(&plan, Backend::Reference, &z).unwrap();
    let (_, want_u) = encode_normalized::<f16, f32>(&plan, Backend::Reference, &z);
    let want_codes: Vec<bf16> = decode(&plan, Backend::Reference, &want).unwrap();
    let want_stats = statistics(&plan, Backend::Reference, &want).unwrap();
    for threads in [1, 2, 3, 7] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            for be in cpu_backends() {
                let ctx = format!("{threads} threads {be:?}");
                assert_eq!(encode(&plan, be, &z).unwrap(), want, "{ctx}");
                let (_, u) = encode_normalized::<f16, f32>(&plan, be, &z);
                assert_bits_eq(&u, &want_u, &ctx);
                let codes: Vec<bf16> = decode(&plan, be, &want).unwrap();
                assert_bits_eq(&codes, &want_codes, &ctx);
                assert_eq!(statistics(&plan, be, &want).unwrap(), want_stats, "{ctx}");
            }
        });
    }
    z[400_000] = f16::NAN;
    z[600_000] = f16::NAN;
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            for be in all_backends() {
                let e = encode(&plan, be, &z).unwrap_err();
                assert!(is_nan_at(&e, "z[12121, 7]"), "{threads} threads {be:?}: {e}");
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Entropy terms.
// ---------------------------------------------------------------------------------------------

/// Brute force in f64, straight from the definition: for every token and group, the softmax of
/// `−τ‖z − c‖²` over all `2^d` codes `c ∈ {±v}^d` (log-sum-exp), its entropy, and the entropy
/// of the batch average; the bit marginals and the factorized entropy from that average.
struct BruteForce {
    per_token: Vec<f64>,
    codebook: Vec<f64>,
    codebook_factorized: Vec<f64>,
    bit_probability: Vec<f64>,
    /// The largest `|−τ‖z − c‖²|` seen: the brute force itself is accurate to about `ε` times it.
    max_logit: f64,
}

fn brute_force(plan: &Lfq, z: &[f32], tau: f32) -> BruteForce {
    let (g, d, c) = (plan.groups(), plan.bits() as usize, plan.channels());
    let n = z.len() / c;
    let (tau, v) = (tau as f64, plan.code_value() as f64);
    let mut per_token = vec![0.0; g];
    let mut avg = vec![vec![0.0; 1 << d]; g];
    let mut max_logit = 0.0f64;
    for row in z.chunks(c) {
        for gi in 0..g {
            let zg = &row[gi * d..(gi + 1) * d];
            let logits: Vec<f64> = (0..1usize << d)
                .map(|code| {
                    -tau * zg
                        .iter()
                        .enumerate()
                        .map(|(k, &x)| {
                            let ck = if (code >> k) & 1 == 1 { v } else { -v };
                            (x as f64 - ck).powi(2)
                        })
                        .sum::<f64>()
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            max_logit = logits.iter().fold(max_logit, |m, l| m.max(l.abs()));
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            for (code, &l) in logits.iter().enumerate() {
                let logp = l - lse;
                let p = logp.exp();
                per_token[gi] -= p * logp;
                avg[gi][code] += p / n as f64;
            }
        }
    }
    let plogp = |p: f64| if p > 0.0 { -p * p.ln() } else { 0.0 };
    let mut bit_probability = vec![0.0; c];
    for gi in 0..g {
        for (code, &p) in avg[gi].iter().enumerate() {
            for k in 0..d {
                if (code >> k) & 1 == 1 {
                    bit_probability[gi * d + k] += p;
                }
            }
        }
    }
    BruteForce {
        per_token: per_token.iter().map(|h| h / n as f64).collect(),
        codebook: avg.iter().map(|a| a.iter().map(|&p| plogp(p)).sum()).collect(),
        codebook_factorized: (0..g)
            .map(|gi| bit_probability[gi * d..(gi + 1) * d].iter().map(|&p| plogp(p) + plogp(1.0 - p)).sum())
            .collect(),
        bit_probability,
        max_logit,
    }
}

/// Entropy inputs: mostly ordinary values at the scale where the temperature matters, plus
/// exact ±0, tiny and large magnitudes.
fn entropy_z(n: usize, spread: f32, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n)
        .map(|_| match r.next_u64() % 10 {
            0 => 0.0,
            1 => -0.0,
            2 => 1e-30 * r.uniform(-1.0, 1.0),
            3 => r.uniform(-60.0, 60.0),
            _ => r.uniform(-spread, spread),
        })
        .collect()
}

/// `|got − want| ≤ rel·|want| + abs` for every element.
fn assert_close(got: &[f64], want: &[f64], rel: f64, abs: f64, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * w.abs() + abs, "{ctx}[{i}]: got {g:e}, want {w:e} (diff {:e})", (g - w).abs());
    }
}

fn entropy_of<T: Float>(plan: &Lfq, be: Backend, z: &[T], tau: f32) -> Result<vistok::lfq::LfqEntropy, Error> {
    plan.entropy(be, View::new(z, &plan.codes_dims(z.len() / plan.channels()))?, tau)
}

/// The documented cpu tolerance: `1e−5·|x| + 1e−7·d`.
fn cpu_close(got: &vistok::lfq::LfqEntropy, want: &vistok::lfq::LfqEntropy, d: u32, ctx: &str) {
    let abs = 1e-7 * d as f64;
    assert_eq!(got.tokens, want.tokens);
    assert_close(&got.per_token, &want.per_token, 1e-5, abs, &format!("{ctx} per_token"));
    assert_close(&got.codebook_factorized, &want.codebook_factorized, 1e-5, abs, &format!("{ctx} factorized"));
    assert_close(&got.bit_probability, &want.bit_probability, 1e-5, 1e-7, &format!("{ctx} bit_probability"));
    assert_eq!(got.codebook.is_some(), want.codebook.is_some(), "{ctx}");
    if let (Some(g), Some(w)) = (&got.codebook, &want.codebook) {
        assert_close(g, w, 1e-5, abs, &format!("{ctx} codebook"));
    }
}

#[test]
fn entropy_matches_brute_force() {
    let mut seed = 1;
    for bits in 1..=8u32 {
        for (groups, order, spherical, scale) in [
            (1, BitOrder::MsbFirst, false, 1.0f32),
            (2, BitOrder::LsbFirst, true, 1.0),
            (3, BitOrder::MsbFirst, false, 0.3),
        ] {
            let plan = Lfq::new(&LfqConfig::new(groups, bits, order).scale(scale).spherical(spherical)).unwrap();
            for tau in [0.01f32, 1.0, 25.0, 1e4] {
                seed += 1;
                let n = 1 + (seed as usize * 7) % 23;
                let z = entropy_z(n * plan.channels(), 1.0 / tau.sqrt(), seed);
                let bf = brute_force(&plan, &z, tau);
                let ctx = format!("d={bits} G={groups} τ={tau} n={n}");
                let r = entropy_of(&plan, Backend::Reference, &z, tau).unwrap();
                let (tight, abs) = (1e-9, 1e-12 + 1e-15 * bf.max_logit);
                assert_close(&r.per_token, &bf.per_token, tight, abs, &format!("{ctx} reference per_token"));
                assert_close(
                    r.codebook.as_ref().unwrap(),
                    &bf.codebook,
                    tight,
                    abs,
                    &format!("{ctx} reference codebook"),
                );
                assert_close(
                    &r.codebook_factorized,
                    &bf.codebook_factorized,
                    tight,
                    abs,
                    &format!("{ctx} reference factorized"),
                );
                assert_close(&r.bit_probability, &bf.bit_probability, tight, abs, &format!("{ctx} reference bits"));
                for be in cpu_backends() {
                    let got = entropy_of(&plan, be, &z, tau).unwrap();
                    cpu_close(&got, &r, bits, &format!("{ctx} {be:?}"));
                }
                // Jensen and sub-additivity: mean per-token ≤ codebook ≤ factorized.
                for gi in 0..groups {
                    let (p, cb, f) = (r.per_token[gi], r.codebook.as_ref().unwrap()[gi], r.codebook_factorized[gi]);
                    assert!(p <= cb + 1e-12 && cb <= f + 1e-12, "{ctx}: {p} ≤ {cb} ≤ {f}");
                }
            }
        }
    }
}

/// The largest relative error of cpu against the reference seen by the tests (f64 bits).
static WORST_ENTROPY_REL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn record_rel(got: &vistok::lfq::LfqEntropy, want: &vistok::lfq::LfqEntropy) {
    let pairs = got
        .per_token
        .iter()
        .zip(&want.per_token)
        .chain(got.codebook_factorized.iter().zip(&want.codebook_factorized))
        .chain(got.codebook.iter().flatten().zip(want.codebook.iter().flatten()));
    for (g, w) in pairs {
        if *w > 1e-3 {
            let rel = (g - w).abs() / w;
            WORST_ENTROPY_REL.fetch_max(rel.to_bits(), std::sync::atomic::Ordering::Relaxed);
        }
    }
}

fn entropy_check<T: Float>(plan: &Lfq, z: &[f32], tau: f32) {
    let z: Vec<T> = z.iter().map(|&x| T::from_f32(x)).collect();
    let want = entropy_of(plan, Backend::Reference, &z, tau).unwrap();
    let n = z.len() / plan.channels();
    let factorized_only = |be| plan.entropy_factorized(be, View::new(&z, &plan.codes_dims(n)).unwrap(), tau).unwrap();
    for be in cpu_backends() {
        let ctx = format!("{:?} {plan:?} τ={tau} n={n} {be:?}", T::DTYPE);
        let got = entropy_of(plan, be, &z, tau).unwrap();
        cpu_close(&got, &want, plan.bits(), &ctx);
        record_rel(&got, &want);
        // Without the exact part, everything else is the same, bit for bit.
        let f = factorized_only(be);
        assert!(f.codebook.is_none());
        assert_eq!(
            (f.per_token, f.codebook_factorized, f.bit_probability),
            (got.per_token, got.codebook_factorized, got.bit_probability),
            "{ctx}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn entropy_cpu_matches_reference(
        n in prop_oneof![1usize..4, 1usize..40],
        groups in 1usize..4,
        bits in prop_oneof![1u32..=10, 11u32..=20],
        spherical in any::<bool>(),
        tau in prop_oneof![Just(1.0f32), 0.001f32..10.0, 10.0f32..1e5],
        seed in any::<u64>(),
    ) {
        let plan = Lfq::new(&LfqConfig::new(groups, bits, BitOrder::MsbFirst).spherical(spherical)).unwrap();
        // The reference enumerates 2^d codes per token: keep N·2^d modest.
        let n = if bits > 12 { n.min(3) } else { n };
        let z = entropy_z(n * plan.channels(), 2.0 / tau.sqrt(), seed);
        entropy_check::<f32>(&plan, &z, tau);
        entropy_check::<f16>(&plan, &z, tau);
        entropy_check::<bf16>(&plan, &z, tau);
    }
}

#[test]
fn entropy_many_chunks_and_rows() {
    // Many phase-1 chunks and row blocks (C = 18: lcm 144), a channel count that is a multiple
    // of 16 (C = 32), odd ones (C = 7, 3) and wide rows (C ≥ 256: one row per piece).
    for (groups, bits, n) in [(1, 18, 20_000), (4, 8, 3_000), (7, 1, 40_000), (1, 3, 1), (30, 9, 300), (10, 31, 5)] {
        let plan = Lfq::new(&LfqConfig::new(groups, bits, BitOrder::LsbFirst)).unwrap();
        let z = entropy_z(n * plan.channels(), 1.5, bits as u64);
        entropy_check::<f32>(&plan, &z, 0.7);
    }
    println!(
        "largest relative error of cpu entropies against the f64 reference (values > 1e-3): {:e}",
        f64::from_bits(WORST_ENTROPY_REL.load(std::sync::atomic::Ordering::Relaxed))
    );
}

#[test]
fn entropy_any_thread_count_bitwise() {
    // d = 16: phase 2 has 10 chunks of 256 tokens in 2 waves; phase 1 has 2 chunks.
    let plan = Lfq::new(&LfqConfig::new(1, 16, BitOrder::MsbFirst).spherical(true)).unwrap();
    let z: Vec<bf16> = entropy_z(2_500 * plan.channels(), 0.5, 3).iter().map(|&x| bf16::from_f32(x)).collect();
    let want = entropy_of(&plan, Backend::Cpu, &z, 3.0).unwrap();
    assert!(want.codebook.is_some());
    let runs = [1, 3, 7].map(|t| (t, Backend::Cpu)).into_iter().chain(cpu_backends().into_iter().map(|be| (2, be)));
    for (threads, be) in runs {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        {
            // PartialEq on f64 fields: equal values (no NaN here), i.e. the same bits up to ±0.
            let got = pool.install(|| entropy_of(&plan, be, &z, 3.0).unwrap());
            let bits = |e: &vistok::lfq::LfqEntropy| -> Vec<u64> {
                e.per_token
                    .iter()
                    .chain(e.codebook.iter().flatten())
                    .chain(&e.codebook_factorized)
                    .chain(&e.bit_probability)
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(bits(&got), bits(&want), "{threads} threads {be:?}");
        }
    }
}

#[test]
fn entropy_limits() {
    let plan = Lfq::new(&LfqConfig::new(1, 3, BitOrder::MsbFirst)).unwrap();
    let ln2 = std::f64::consts::LN_2;
    for be in all_backends() {
        // Infinite inputs: certain bits, zero entropy; all zero: uniform over the 8 codes.
        let e = entropy_of(&plan, be, &[f32::INFINITY, f32::NEG_INFINITY, f32::INFINITY], 1.0).unwrap();
        assert!(e.per_token[0] < 1e-30 && e.codebook.as_ref().unwrap()[0] < 1e-30, "{be:?} {e:?}");
        assert_close(&e.bit_probability, &[1.0, 0.0, 1.0], 0.0, 1e-30, &format!("{be:?}"));
        let e = entropy_of(&plan, be, &[0.0f32, -0.0, 0.0], 1e30).unwrap();
        for x in [e.per_token[0], e.codebook.as_ref().unwrap()[0], e.codebook_factorized[0]] {
            assert!((x - 3.0 * ln2).abs() < 1e-6, "{be:?}: {x}");
        }
        // Two certain tokens with opposite codes: no per-token entropy, one bit of codebook
        // entropy per... the average is 1/2 on two codes: ln 2.
        let e = entropy_of(&plan, be, &[5.0f32, 5.0, -5.0, -5.0, -5.0, 5.0], 100.0).unwrap();
        assert!(e.per_token[0] < 1e-30, "{be:?}");
        assert!((e.codebook.as_ref().unwrap()[0] - ln2).abs() < 1e-6, "{be:?}");
        assert!((e.codebook_factorized[0] - 3.0 * ln2).abs() < 1e-6, "{be:?}");
        // Huge finite magnitudes times a huge temperature do not overflow.
        let e = entropy_of(&plan, be, &[3e38f32, -3e38, 1e-45], 1e30).unwrap();
        assert!(e.per_token.iter().chain(&e.codebook_factorized).all(|x| x.is_finite()), "{be:?}");
    }
}

#[test]
fn entropy_bad_input() {
    let plan = Lfq::new(&LfqConfig::new(2, 3, BitOrder::MsbFirst)).unwrap();
    let z = entropy_z(6 * 50, 1.0, 9);
    for be in all_backends() {
        for tau in [0.0f32, -1.0, f32::NAN, f32::INFINITY, 1e-45, 1e38] {
            let e = entropy_of(&plan, be, &z, tau).unwrap_err();
            assert!(matches!(e, Error::Invalid { family: Family::Lfq, .. }), "τ = {tau} {be:?}: {e}");
        }
        let e = plan.entropy(be, View::new(&z[..0], &[0, 6]).unwrap(), 1.0).unwrap_err();
        assert!(matches!(e, Error::Shape { family: Family::Lfq, .. }), "{be:?}: {e}");
        let e = plan.entropy(be, View::new(&z, &[60, 5]).unwrap(), 1.0).unwrap_err();
        assert!(matches!(e, Error::Shape { family: Family::Lfq, .. }), "{be:?}: {e}");
        let mut bad = z.clone();
        bad[6 * 31 + 4] = f32::NAN;
        bad[6 * 40] = f32::NAN;
        let e = entropy_of(&plan, be, &bad, 1.0).unwrap_err();
        assert!(is_nan_at(&e, "z[31, 4]"), "{be:?}: {e}");
    }
    // d > 16: no exact codebook entropy (documented), on every backend; the rest is there.
    let wide = Lfq::new(&LfqConfig::new(1, 17, BitOrder::MsbFirst)).unwrap();
    let z = entropy_z(17 * 3, 1.0, 4);
    for be in all_backends() {
        let e = entropy_of(&wide, be, &z, 1.0).unwrap();
        assert!(e.codebook.is_none() && e.codebook_mean().is_none(), "{be:?}");
        assert!(e.codebook_factorized_mean() > 0.0 && e.per_token_mean() > 0.0, "{be:?}");
    }
}

#[test]
#[ignore = "timing, not a check: cargo test --release --test lfq -- --ignored --nocapture"]
fn entropy_throughput() {
    let time = |f: &mut dyn FnMut()| {
        f();
        let t = std::time::Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    let n = 1 << 20;
    let plan = Lfq::new(&LfqConfig::new(1, 18, BitOrder::MsbFirst)).unwrap();
    let z = entropy_z(n * 18, 1.0, 1);
    for be in cpu_backends() {
        let s = time(&mut || {
            plan.entropy_factorized(be, View::new(&z, &[n, 18]).unwrap(), 1.0).unwrap();
        });
        println!("entropy_factorized {be:?} f32 1048576x18: {:.2} GB/s", (z.len() * 4) as f64 / s / 1e9);
    }
    let m = 1 << 14;
    let plan = Lfq::new(&LfqConfig::new(1, 16, BitOrder::MsbFirst)).unwrap();
    for be in cpu_backends() {
        let s = time(&mut || {
            plan.entropy(be, View::new(&z[..m * 16], &[m, 16]).unwrap(), 1.0).unwrap();
        });
        println!("entropy (exact, d = 16) {be:?} 16384 tokens: {:.3} s, {:.2} GMAC/s", s, (m << 16) as f64 / s / 1e9);
    }
}
