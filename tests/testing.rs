//! `vistok::testing` used on vistok itself: the exported strategies drive every CPU backend
//! (each available ISA) through the differential harness, near-ties counted; a downstream-style
//! f32 FSQ passes; deliberately wrong engines are caught (the harness can fail).
#![cfg(feature = "testing")]

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestError, TestRunner};
use vistok::argmin::{Codebook, Metric};
use vistok::testing::{
    argmin_case, attention_case, check_argmin, check_fsq, check_fsq_decode, check_lfq, check_lfq_decode, fsq_case,
    hard_f32, lfq_case, near_tie_codebook, AttentionCase, Mismatch, Report,
};
use vistok::{bf16, f16, reference, Backend, BitOrder, Float, Fsq, Isa, Lfq, LfqConfig, View, ViewMut};

fn cpu_backends() -> Vec<Backend> {
    Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa).chain([Backend::Cpu]).collect()
}

fn widen<T: Float>(z: &[f32]) -> Vec<T> {
    z.iter().map(|&v| T::from_f32(v)).collect()
}

fn lfq_ids<T: Float>(plan: &Lfq, be: Backend, z: &[T]) -> Vec<u32> {
    let n = z.len() / plan.channels();
    let mut ids = vec![0xDEAD_BEEF; n * plan.groups()];
    plan.encode(be, View::new(z, &plan.codes_dims(n)).unwrap(), ViewMut::new(&mut ids, &plan.ids_dims(n)).unwrap())
        .unwrap();
    ids
}

fn fsq_ids<T: Float>(fsq: &Fsq, be: Backend, z: &[T]) -> Vec<u32> {
    let n = z.len() / fsq.dim();
    let mut ids = vec![0xDEAD_BEEF; n];
    fsq.encode(be, View::new(z, &[n, fsq.dim()]).unwrap(), ViewMut::new(&mut ids, &[n]).unwrap()).unwrap();
    ids
}

fn search<T: Float>(cb: &Codebook<T>, be: Backend, x: &[T]) -> (Vec<u32>, Vec<f32>) {
    let n = x.len() / cb.dim();
    let (mut idx, mut dist) = (vec![0xDEAD_BEEF; n], vec![f32::NAN; n]);
    cb.argmin(
        be,
        View::new(x, &[n, cb.dim()]).unwrap(),
        ViewMut::new(&mut idx, &[n]).unwrap(),
        Some(ViewMut::new(&mut dist, &[n]).unwrap()),
    )
    .unwrap();
    (idx, dist)
}

/// Near-ties accepted so far, per family, and outputs compared.
static FSQ_NEAR: AtomicUsize = AtomicUsize::new(0);
static FSQ_LEVELS: AtomicUsize = AtomicUsize::new(0);
static ARGMIN_NEAR: AtomicUsize = AtomicUsize::new(0);
static ARGMIN_EXACT: AtomicUsize = AtomicUsize::new(0);
static ARGMIN_ROWS: AtomicUsize = AtomicUsize::new(0);

fn tally(report: Report, near: &AtomicUsize, total: &AtomicUsize) {
    near.fetch_add(report.near_ties, Relaxed);
    total.fetch_add(report.compared, Relaxed);
}

fn argmin_all<T: Float>(metric: Metric, k: usize, d: usize, e: &[f32], x: &[f32]) -> Result<Report, Mismatch> {
    let (e, x): (Vec<T>, Vec<T>) = (widen(e), widen(x));
    let cb = Codebook::new(View::new(&e, &[k, d]).unwrap(), metric).unwrap();
    let mut total = Report::default();
    for be in cpu_backends() {
        let (idx, dist) = search(&cb, be, &x);
        total += check_argmin(&cb, &x, &idx, Some(&dist))?;
    }
    Ok(total)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// LFQ is exact: every backend, f32 / f16 / bf16, encode and decode.
    #[test]
    fn lfq_every_backend_passes_the_harness((config, z) in lfq_case(), seed in any::<u64>()) {
        let plan = Lfq::new(&config).unwrap();
        let n = z.len() / plan.channels();
        let ids: Vec<u32> = (0..n * plan.groups()).map(|i| {
            ((seed ^ i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32 & (plan.codebook_size() - 1) as u32
        }).collect();
        for be in cpu_backends() {
            check_lfq(&plan, &z, &lfq_ids(&plan, be, &z))?;
            let zb: Vec<bf16> = widen(&z);
            check_lfq(&plan, &zb, &lfq_ids(&plan, be, &zb))?;
            let zh: Vec<f16> = widen(&z);
            check_lfq(&plan, &zh, &lfq_ids(&plan, be, &zh))?;
            let mut codes = vec![bf16::NAN; n * plan.channels()];
            plan.decode(be, View::new(&ids, &plan.ids_dims(n)).unwrap(),
                        ViewMut::new(&mut codes, &plan.codes_dims(n)).unwrap()).unwrap();
            check_lfq_decode(&plan, &ids, &codes)?;
        }
    }

    /// FSQ: every backend within the boundary band of the f64 reference (counted), decode exact.
    #[test]
    fn fsq_every_backend_passes_the_harness((levels, z) in fsq_case()) {
        let fsq = Fsq::new(&levels).unwrap();
        for be in cpu_backends() {
            let ids = fsq_ids(&fsq, be, &z);
            tally(check_fsq(&fsq, &z, &ids)?, &FSQ_NEAR, &FSQ_LEVELS);
            let zb: Vec<bf16> = widen(&z);
            tally(check_fsq(&fsq, &zb, &fsq_ids(&fsq, be, &zb))?, &FSQ_NEAR, &FSQ_LEVELS);
            let mut codes = vec![f32::NAN; z.len()];
            fsq.decode(be, View::new(&ids, &[ids.len()]).unwrap(),
                       ViewMut::new(&mut codes, &[ids.len(), fsq.dim()]).unwrap()).unwrap();
            check_fsq_decode(&fsq, &ids, &codes)?;
        }
    }

    /// Argmin: every backend and dtype, planted near-ties and duplicates, indices and distances.
    #[test]
    fn argmin_every_backend_passes_the_harness(c in argmin_case()) {
        for r in [
            argmin_all::<f32>(c.metric, c.k, c.d, &c.codebook, &c.x)?,
            argmin_all::<f16>(c.metric, c.k, c.d, &c.codebook, &c.x)?,
            argmin_all::<bf16>(c.metric, c.k, c.d, &c.codebook, &c.x)?,
        ] {
            ARGMIN_NEAR.fetch_add(r.near_ties, Relaxed);
            ARGMIN_EXACT.fetch_add(r.exact_ties, Relaxed);
            ARGMIN_ROWS.fetch_add(r.compared, Relaxed);
        }
    }

    /// The planted tie group is what the reference picks from (for L2, when the query is
    /// itself one of the planted rows), and every backend passes on it in both metrics.
    #[test]
    fn near_tie_codebooks(t in (1usize..80, 1usize..40).prop_flat_map(|(k, d)| (Just((k, d)), near_tie_codebook(k, d)))) {
        let ((k, d), t) = t;
        let cb = Codebook::new(View::new(&t.codebook, &[k, d]).unwrap(), Metric::L2).unwrap();
        let mut idx = [0u32];
        reference::argmin(&cb, View::new(&t.query, &[1, d]).unwrap(), ViewMut::new(&mut idx, &[1]).unwrap(), None)
            .unwrap();
        prop_assert!(t.ties.contains(&idx[0]), "reference chose {} outside the tie group {:?}", idx[0], t.ties);
        for metric in [Metric::L2, Metric::Cosine] {
            argmin_all::<f32>(metric, k, d, &t.codebook, &t.query)?;
        }
    }

    /// Attention: fully masked rows give zeros and −∞ on every backend; the rest is close to
    /// the f64 reference.
    #[test]
    fn attention_cases_fully_masked_rows(c in attention_case()) {
        check_attention(&c)?;
    }
}

fn check_attention(c: &AttentionCase) -> Result<(), TestCaseError> {
    let a = c.attention();
    let (qd, kd, ld) = (c.q_dims(), c.kv_dims(), c.lse_dims());
    let run = |be: Backend| {
        let mut o = vec![f32::NAN; c.q.len()];
        let mut lse = vec![f32::NAN; ld.iter().product()];
        a.forward_lse(
            be,
            View::new(&c.q, &qd).unwrap(),
            View::new(&c.k, &kd).unwrap(),
            View::new(&c.v, &kd).unwrap(),
            ViewMut::new(&mut o, &qd).unwrap(),
            ViewMut::new(&mut lse, &ld).unwrap(),
        )
        .unwrap();
        (o, lse)
    };
    let (want, want_lse) = run(Backend::Reference);
    for be in [Backend::Reference].into_iter().chain(cpu_backends()) {
        let (o, lse) = run(be);
        for b in 0..c.b {
            for h in 0..c.h {
                for i in 0..c.nq {
                    let at = match c.layout {
                        vistok::QkvLayout::Bhnd => ((b * c.h + h) * c.nq + i) * c.d,
                        vistok::QkvLayout::Bnhd => ((b * c.nq + i) * c.h + h) * c.d,
                    };
                    let li = (b * c.h + h) * c.nq + i;
                    let row = &o[at..][..c.d];
                    if c.fully_masked(b, i) {
                        prop_assert!(row.iter().all(|&v| v == 0.0), "{be:?} row ({b}, {h}, {i}) masked: {row:?}");
                        prop_assert_eq!(lse[li], f32::NEG_INFINITY, "{:?} lse ({}, {}, {})", be, b, h, i);
                    } else {
                        for (g, w) in row.iter().zip(&want[at..][..c.d]) {
                            prop_assert!((g - w).abs() <= 1e-5, "{be:?} ({b}, {h}, {i}): {g} vs {w}");
                        }
                        let tol = 1e-5 * want_lse[li].abs().max(1.0);
                        prop_assert!(
                            (lse[li] - want_lse[li]).abs() <= tol,
                            "{be:?} lse {} vs {}",
                            lse[li],
                            want_lse[li]
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Prints the near-tie counts of the property tests above (run after them or alone).
#[test]
fn zz_near_tie_counts() {
    println!(
        "fsq: {} of {} levels differed from the f64 reference at a boundary (accepted); argmin: {} near-ties \
         and {} exact ties in {} rows (accepted)",
        FSQ_NEAR.load(Relaxed),
        FSQ_LEVELS.load(Relaxed),
        ARGMIN_NEAR.load(Relaxed),
        ARGMIN_EXACT.load(Relaxed),
        ARGMIN_ROWS.load(Relaxed),
    );
}

// ---- A downstream-style engine passes; wrong engines are caught ---------------------------

/// FSQ as a downstream engine might write it: vector-quantize-pytorch's formula in plain f32
/// with the standard library's `tanh` (its constants computed in f64, as vistok's are).
fn std_f32_fsq(levels: &[u32], z: &[f32]) -> Vec<u32> {
    z.chunks(levels.len())
        .map(|row| {
            let mut basis = 1u32;
            let mut id = 0u32;
            for (&x, &l) in row.iter().zip(levels) {
                // The constants in f64, rounded once (atanh near 1 is ill-conditioned in f32).
                let half_l = (l - 1) as f64 * 1.001 / 2.0;
                let offset = if l % 2 == 0 { 0.5 } else { 0.0 };
                let shift = (offset / half_l).atanh() as f32;
                let (half_l, offset) = (half_l as f32, offset as f32);
                let v = (x + shift).tanh() * half_l - offset;
                let level = (v.round_ties_even() + (l / 2) as f32).clamp(0.0, (l - 1) as f32) as u32;
                id += level * basis;
                basis *= l;
            }
            id
        })
        .collect()
}

#[test]
fn a_plain_f32_fsq_passes_with_counted_near_ties() {
    let mut runner = TestRunner::new(Config { cases: 128, failure_persistence: None, ..Config::default() });
    let near = AtomicUsize::new(0);
    let levels = AtomicUsize::new(0);
    runner
        .run(&fsq_case().prop_filter("f32 resolves the levels", |(l, _)| l.iter().all(|&l| l <= 1002)), |(l, z)| {
            let fsq = Fsq::new(&l).unwrap();
            let r = check_fsq(&fsq, &z, &std_f32_fsq(&l, &z))?;
            near.fetch_add(r.near_ties, Relaxed);
            levels.fetch_add(r.compared, Relaxed);
            Ok(())
        })
        .unwrap();
    println!("std-tanh f32 FSQ: {} of {} levels were near-ties (accepted)", near.load(Relaxed), levels.load(Relaxed));
}

/// Runs `test` over `strategy` and returns the failure proptest found (and shrank).
fn expect_failure<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) -> String {
    let mut runner = TestRunner::new(Config { cases: 256, failure_persistence: None, ..Config::default() });
    match runner.run(&strategy, test) {
        Err(TestError::Fail(why, value)) => format!("{why} (minimal input: {value:?})"),
        other => panic!("the harness accepted a wrong engine: {other:?}"),
    }
}

#[test]
fn harness_catches_wrong_engines() {
    // LFQ whose sign test is `x >= 0` (−0.0 and +0.0 give bit 1): the strategies plant zeros.
    let why = expect_failure(lfq_case(), |(config, z)| {
        let plan = Lfq::new(&config).unwrap();
        let mut ids = lfq_ids(&plan, Backend::Cpu, &z);
        let d = plan.bits() as usize;
        for (id, g) in ids.iter_mut().zip(z.chunks(d)) {
            for (k, &x) in g.iter().enumerate() {
                if x == 0.0 {
                    let w = match plan.order() {
                        BitOrder::MsbFirst => d - 1 - k,
                        BitOrder::LsbFirst => k,
                    };
                    *id |= 1 << w;
                }
            }
        }
        check_lfq(&plan, &z, &ids)?;
        Ok(())
    });
    assert!(why.contains("lfq: ids["), "{why}");

    // LFQ with the bit order reversed.
    let plan = Lfq::new(&LfqConfig::new(1, 3, BitOrder::MsbFirst)).unwrap();
    let lsb = Lfq::new(&LfqConfig::new(1, 3, BitOrder::LsbFirst)).unwrap();
    let z = [1.0f32, 0.0, 0.0];
    let m = check_lfq(&plan, &z, &lfq_ids(&lsb, Backend::Cpu, &z)).unwrap_err();
    assert_eq!(m.index, Some(0), "{m}");

    // FSQ that forgets the shift of even level counts: off by one level far from any boundary.
    let why = expect_failure(fsq_case(), |(l, z)| {
        let fsq = Fsq::new(&l).unwrap();
        let unshifted: Vec<u32> = l.iter().map(|&l| if l % 2 == 0 { l + 1 } else { l }).collect();
        let wrong = std_f32_fsq(&unshifted, &z);
        // Back to ids of `l`, clamping the extra level.
        let ids: Vec<u32> = wrong
            .iter()
            .map(|&id| {
                let (mut rest, mut basis, mut out) = (id, 1u32, 0u32);
                for (&lw, &lt) in unshifted.iter().zip(&l) {
                    out += (rest % lw).min(lt - 1) * basis;
                    rest /= lw;
                    basis *= lt;
                }
                out
            })
            .collect();
        check_fsq(&fsq, &z, &ids)?;
        Ok(())
    });
    assert!(why.contains("fsq: "), "{why}");

    // FSQ ids out of range, and a wrong decode.
    let fsq = Fsq::new(&[5, 4]).unwrap();
    assert!(check_fsq(&fsq, &[0.0f32, 0.0], &[20]).is_err());
    assert!(check_fsq_decode(&fsq, &[3], &[0.5f32, -1.0]).is_ok());
    assert!(check_fsq_decode(&fsq, &[3], &[0.5f32, -0.5]).is_err());

    // Argmin whose scan takes `<=` (ties go to the highest index): planted duplicates catch it.
    let why = expect_failure(argmin_case(), |c| {
        let cb = Codebook::new(View::new(&c.codebook, &[c.k, c.d]).unwrap(), c.metric).unwrap();
        let (mut idx, _) = search(&cb, Backend::Cpu, &c.x);
        for (r, id) in idx.iter_mut().enumerate() {
            let mine = &c.codebook[*id as usize * c.d..][..c.d];
            // The last entry identical to the chosen one.
            if let Some(last) = (0..c.k).rev().find(|&j| &c.codebook[j * c.d..][..c.d] == mine) {
                let _ = r;
                *id = last as u32;
            }
        }
        check_argmin(&cb, &c.x, &idx, None)?;
        Ok(())
    });
    assert!(why.contains("ties go to the lowest index"), "{why}");

    // Argmin that returns the second-nearest entry.
    let why = expect_failure(argmin_case(), |c| {
        prop_assume!(c.k >= 2);
        let cb = Codebook::new(View::new(&c.codebook, &[c.k, c.d]).unwrap(), c.metric).unwrap();
        let x64: Vec<Vec<f64>> = c.x.chunks(c.d).map(|r| r.iter().map(|&v| v as f64).collect()).collect();
        let idx: Vec<u32> = x64
            .iter()
            .map(|x| {
                let mut dist: Vec<(f64, u32)> = c
                    .codebook
                    .chunks(c.d)
                    .enumerate()
                    .map(|(k, e)| (reference::argmin::distance(c.metric, x, e), k as u32))
                    .collect();
                dist.sort_by(|a, b| a.partial_cmp(b).unwrap());
                dist[1].1
            })
            .collect();
        check_argmin(&cb, &c.x, &idx, None)?;
        Ok(())
    });
    assert!(why.contains("argmin: indices["), "{why}");

    // Distances off by a relative 1e-4.
    let why = expect_failure(argmin_case(), |c| {
        let cb = Codebook::new(View::new(&c.codebook, &[c.k, c.d]).unwrap(), c.metric).unwrap();
        let (idx, dist) = search(&cb, Backend::Cpu, &c.x);
        let off: Vec<f32> = dist.iter().map(|&v| v * 1.0001 + 1e-4).collect();
        check_argmin(&cb, &c.x, &idx, Some(&off))?;
        Ok(())
    });
    assert!(why.contains("distances["), "{why}");

    // Inputs the reference rejects, and lengths that don't fit, are mismatches too.
    let plan = Lfq::new(&LfqConfig::new(1, 2, BitOrder::MsbFirst)).unwrap();
    assert_eq!(check_lfq(&plan, &[f32::NAN, 1.0], &[1]).unwrap_err().index, None);
    assert_eq!(check_lfq(&plan, &[1.0f32, 1.0], &[3, 3]).unwrap_err().index, None);
}

#[test]
fn hard_f32_reaches_every_kind() {
    // The strategy really produces the values it promises (over a few thousand draws).
    let mut runner = TestRunner::deterministic();
    let s = hard_f32();
    let draws: Vec<f32> = (0..4000).map(|_| s.new_tree(&mut runner).unwrap().current()).collect();
    assert!(draws.iter().any(|v| v.to_bits() == 0));
    assert!(draws.iter().any(|v| v.to_bits() == 0x8000_0000));
    assert!(draws.iter().any(|v| v.is_subnormal() && *v > 0.0));
    assert!(draws.iter().any(|v| v.is_subnormal() && *v < 0.0));
    assert!(draws.iter().any(|v| v.abs() > 1e29));
    assert!(draws.iter().any(|v| *v != 0.5 && (v - 0.5).abs() < 1e-6));
    assert!(draws.iter().all(|v| v.is_finite()));
}
