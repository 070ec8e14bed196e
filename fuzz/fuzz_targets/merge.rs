//! Fuzz target `merge`: arbitrary batch / token / channel counts, r, class and distillation
//! flags, output order, and metric and token values from raw bits (NaN, ±∞, huge, subnormal).
//!
//! Invariants (any violation panics, which libFuzzer reports as a crash):
//! 1. No call panics; errors are fine.
//! 2. `MergePlan::bipartite` succeeds or fails alike on the reference and every cpu backend
//!    (detected and each available pinned ISA).
//! 3. On success: every plan has the same `r`, `N − r` output tokens and slots `< N − r` (the
//!    choices themselves may differ from the f64 reference at near-ties, which the property
//!    tests count); every cpu backend returns the SAME plan (deterministic); `merge` (sum and
//!    mean) and `unmerge` agree across cpu backends bit for bit (any NaN equal to any NaN), and `unmerge` gives every
//!    token the value of its slot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vistok::merge::{MatchConfig, MergeMode, MergePlan};
use vistok::{Backend, Isa, View, ViewMut};

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let (head, rest) = data.split_at(6);
    let b = 1 + usize::from(head[0] % 3);
    let n = usize::from(head[1] % 40);
    let c = usize::from(head[2] % 12);
    let r = usize::from(head[3] % 24);
    let flags = head[4];
    let config = MatchConfig::new(r)
        .class_token(flags & 1 != 0)
        .distill_token(flags & 2 != 0)
        .keep_original_order(flags & 4 != 0);
    let raw = |i: usize| -> f32 {
        let k = 4 * i;
        if rest.len() < 4 {
            return (i as f32 * 0.37).sin();
        }
        let k = k % (rest.len() - 3);
        let bits = u32::from_le_bytes([rest[k], rest[k + 1], rest[k + 2], rest[k + 3]]);
        if head[5] & 1 == 0 {
            // Mostly tame values: small integers and fractions (many exact ties).
            ((bits % 17) as f32 - 8.0) / (1 + bits % 3) as f32
        } else {
            f32::from_bits(bits)
        }
    };
    let metric: Vec<f32> = (0..b * n * c).map(raw).collect();
    let x: Vec<f32> = (0..b * n * c).map(|i| raw(i + 7)).collect();
    let Ok(mv) = View::new(&metric, &[b, n, c]) else { return };

    let reference = MergePlan::bipartite(Backend::Reference, mv, &config);
    let mut backends = vec![Backend::Cpu];
    backends.extend(Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa));
    let plans: Vec<_> = backends.iter().map(|&be| MergePlan::bipartite(be, mv, &config)).collect();
    for (be, p) in backends.iter().zip(&plans) {
        assert_eq!(
            p.is_ok(),
            reference.is_ok(),
            "{be:?}: {:?} vs reference {:?}",
            p.as_ref().err(),
            reference.as_ref().err()
        );
    }
    let Ok(reference) = reference else { return };
    let plans: Vec<MergePlan> = plans.into_iter().map(Result::unwrap).collect();
    let first = &plans[0];
    for (be, p) in backends.iter().zip(&plans) {
        assert_eq!(p, first, "{be:?}: cpu backends disagree on the plan");
    }
    assert_eq!(first.r(), reference.r());
    assert_eq!(first.out_tokens(), n - first.r());
    assert!(first.slots().iter().all(|&s| (s as usize) < first.out_tokens()));

    let out_n = first.out_tokens();
    let Ok(xv) = View::new(&x, &[b, n, c]) else { return };
    for mode in [MergeMode::Sum, MergeMode::Mean] {
        let mut outs = vec![];
        for &be in &backends {
            let mut y = vec![f32::NAN; b * out_n * c];
            let res = first.merge(be, xv, mode, ViewMut::new(&mut y, &[b, out_n, c]).unwrap());
            outs.push(res.map(|()| y));
        }
        for (be, o) in backends.iter().zip(&outs) {
            let same = match (o, &outs[0]) {
                // Bit for bit, except that any NaN equals any NaN (payloads are not specified).
                (Ok(a), Ok(z)) => {
                    a.iter().zip(z).all(|(p, q)| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()))
                }
                (Err(_), Err(_)) => true,
                _ => false,
            };
            assert!(same, "{be:?}: merge {mode:?} differs across cpu backends");
        }
    }
    let y: Vec<f32> = (0..b * out_n * c).map(|i| raw(i + 3)).collect();
    let mut back = vec![f32::NAN; b * n * c];
    if first
        .unmerge(Backend::Cpu, View::new(&y, &[b, out_n, c]).unwrap(), ViewMut::new(&mut back, &[b, n, c]).unwrap())
        .is_ok()
    {
        for bi in 0..b {
            for t in 0..n {
                let s = first.slots()[bi * n + t] as usize;
                for k in 0..c {
                    let (got, want) = (back[(bi * n + t) * c + k], y[(bi * out_n + s) * c + k]);
                    assert_eq!(got.to_bits(), want.to_bits(), "unmerge: batch {bi} token {t} slot {s}");
                }
            }
        }
    }
});
