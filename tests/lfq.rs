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

/// Every backend against the reference for one dtype: ids, normalised z, codes and round trips.
fn check_dtype<T: Float>(plan: &Lfq, n: usize, seed: u64) {
    let ctx = format!("{:?} {plan:?} n={n}", T::DTYPE);
    let z = planted::<T>(n * plan.channels(), seed);
    let want = encode(plan, Backend::Reference, &z).unwrap();
    if plan.bits() < 32 {
        assert!(want.iter().all(|&id| id != ID_POISON), "{ctx}: reference left ids unwritten");
    }
    let (want_ids_n, want_u) = encode_normalized::<T, T>(plan, Backend::Reference, &z);
    assert_eq!(want_ids_n, want, "{ctx}: encode_normalized ids");
    let ids = random_ids(plan, n, seed ^ 0xABCD);
    let want_codes: Vec<T> = decode(plan, Backend::Reference, &ids).unwrap();
    for be in cpu_backends() {
        assert_eq!(encode(plan, be, &z).unwrap(), want, "{ctx} {be:?}: encode");
        let (got_ids, got_u) = encode_normalized::<T, T>(plan, be, &z);
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
        assert!(is_error(&e, "z[31000, 0] (element 31000) is NaN"), "{be:?}: {e}");
    }
    z[5] = -f32::NAN;
    let z16: Vec<f16> = z.iter().map(|&x| f16::from_f32(x)).collect();
    for be in all_backends() {
        assert!(is_error(&encode(&plan, be, &z).unwrap_err(), "(element 5) is NaN"), "{be:?}");
        assert!(is_error(&encode(&plan, be, &z16).unwrap_err(), "(element 5) is NaN"), "{be:?}");
    }
    let g = Lfq::new(&LfqConfig::new(3, 7, BitOrder::MsbFirst)).unwrap();
    let mut z = planted::<bf16>(21 * 5, 9);
    z[2 * 21 + 9] = bf16::NAN;
    z[4 * 21] = bf16::NAN;
    for be in all_backends() {
        let e = encode(&g, be, &z).unwrap_err();
        assert!(is_error(&e, "z[2, 9] (element 51) is NaN"), "{be:?}: {e}");
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
                assert!(is_error(&e, "(element 400000) is NaN"), "{threads} threads {be:?}: {e}");
            }
        });
    }
}
