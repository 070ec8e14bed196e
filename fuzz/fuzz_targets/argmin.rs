//! Fuzz target `argmin`: arbitrary shapes, metrics, dtypes and values (NaN, ±∞, huge, subnormal,
//! raw bits), sometimes wrong view dims or out-of-range lookup indices.
//!
//! Invariants (any violation panics, which libFuzzer reports as a crash):
//! 1. No call panics; errors are fine.
//! 2. `Codebook::new` fails exactly when K or D is 0 or the codebook holds a NaN / ±∞ (or a
//!    squared norm that overflows f32); then `argmin` fails on every backend alike (with a
//!    NaN / ±∞ in x, or wrong dims) or succeeds on all.
//! 3. On success every index is `< K`; every CPU backend (detected and each pinned ISA) returns
//!    the same indices and distances, bit for bit; and when no value can make the f32 scores
//!    overflow or underflow (every |v| is 0 or in [1e-15, 1e15], or a bf16 subnormal), each
//!    index equals the f64 reference's or is a near-tie within the documented bound (plus the
//!    bf16 flushes' error).
//! 4. `lookup` of those indices returns the entries exactly; an index ≥ K is an error.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vistok::argmin::{Codebook, Metric};
use vistok::{bf16, f16, Backend, DType, Error, Float, Isa, View, ViewMut};

/// The CPU backends: detected, then each level this machine has, pinned.
fn cpu_backends() -> &'static [Backend] {
    static BACKENDS: OnceLock<Vec<Backend>> = OnceLock::new();
    BACKENDS.get_or_init(|| {
        let pinned = Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa);
        [Backend::Cpu].into_iter().chain(pinned).collect()
    })
}

const SPECIAL: [f32; 14] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MAX,
    f32::MIN_POSITIVE,
    1e-45,
    1e-39,
    1e20,
    3.0e15,
];

#[derive(Debug)]
struct Case {
    n: usize,
    k: usize,
    d: usize,
    metric: Metric,
    dtype: DType,
    x: Vec<f32>,
    e: Vec<f32>,
    /// Give the indices one element too many (a shape error on every backend).
    bad_dims: bool,
    /// An index to look up (may be out of range).
    probe: u32,
}

fn value(u: &mut Unstructured<'_>) -> Result<f32> {
    Ok(match u.int_in_range(0..=9)? {
        0 => SPECIAL[u.choose_index(SPECIAL.len())?],
        1 => f32::from_bits(u.arbitrary()?),
        2 => u.int_in_range(-3i8..=3)? as f32,
        _ => u.int_in_range(-1000i16..=1000)? as f32 / 997.0,
    })
}

impl<'a> Arbitrary<'a> for Case {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let n = u.int_in_range(0..=40)?;
        let k = u.int_in_range(0..=70)?;
        let d = u.int_in_range(0..=20)?;
        let metric = if u.arbitrary()? { Metric::L2 } else { Metric::Cosine };
        let dtype = [DType::F32, DType::F16, DType::BF16][u.choose_index(3)?];
        // Mostly finite, ordinary values: so that the reference comparison runs.
        let clean = u.ratio(3, 4)?;
        let mut gen = |len: usize| -> Result<Vec<f32>> {
            (0..len)
                .map(|_| if clean { Ok(u.int_in_range(-1000i16..=1000)? as f32 / 997.0) } else { value(u) })
                .collect()
        };
        let (x, e) = (gen(n * d)?, gen(k * d)?);
        Ok(Case { n, k, d, metric, dtype, x, e, bad_dims: u.ratio(1, 16)?, probe: u.int_in_range(0..=80)? })
    }
}

fuzz_target!(|c: Case| match c.dtype {
    DType::F32 => run::<f32>(&c),
    DType::F16 => run::<f16>(&c),
    _ => run::<bf16>(&c),
});

fn norm2(v: &[f64]) -> f64 {
    v.iter().map(|a| a * a).sum()
}

fn run<T: Float>(c: &Case) {
    let (n, k, d) = (c.n, c.k, c.d);
    let x: Vec<T> = c.x.iter().map(|&v| T::from_f32(v)).collect();
    let e: Vec<T> = c.e.iter().map(|&v| T::from_f32(v)).collect();
    let ew: Vec<f32> = e.iter().map(|v| v.to_f32()).collect();
    let cb = Codebook::new(View::new(&e, &[k, d]).unwrap(), c.metric);
    let finite = ew.iter().all(|v| v.is_finite());
    let norms_ok = ew.chunks(d.max(1)).all(|r| r.iter().fold(0.0f32, |s, &v| v.mul_add(v, s)).is_finite());
    assert_eq!(cb.is_ok(), k > 0 && d > 0 && finite && norms_ok, "{c:?}: Codebook::new → {:?}", cb.as_ref().err());
    let Ok(cb) = cb else { return };

    let call = |be: Backend| -> std::result::Result<(Vec<u32>, Vec<f32>), Error> {
        let m = if c.bad_dims { n + 1 } else { n };
        let (mut idx, mut dist) = (vec![u32::MAX; m], vec![f32::NAN; n]);
        let out = ViewMut::new(&mut idx, &[m])?;
        cb.argmin(be, View::new(&x, &[n, d])?, out, Some(ViewMut::new(&mut dist, &[n])?))?;
        Ok((idx, dist))
    };
    let want = call(Backend::Reference);
    let expect_ok = !c.bad_dims && x.iter().all(|v| v.to_f32().is_finite());
    assert_eq!(want.is_ok(), expect_ok, "{c:?}: reference → {:?}", want.as_ref().err());
    let first = call(cpu_backends()[0]);
    for &be in cpu_backends() {
        let got = call(be);
        assert_eq!(got.is_ok(), want.is_ok(), "{c:?} {be:?}: {:?} vs reference {:?}", got.as_ref().err(), want.as_ref().err());
        match (&got, &first) {
            (Ok((gi, gd)), Ok((fi, fd))) => {
                assert_eq!(gi, fi, "{c:?} {be:?}: indices differ between CPU backends");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(gd), bits(fd), "{c:?} {be:?}: distances differ between CPU backends");
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "{c:?} {be:?}"),
            _ => panic!("{c:?} {be:?}: CPU backends disagree on success"),
        }
    }
    let (Ok((got, _)), Ok((best, _))) = (&first, &want) else { return };
    assert!(got.iter().all(|&i| (i as usize) < k), "{c:?}: index out of range");

    // Near-ties only, while the f32 arithmetic can neither overflow nor underflow (the bound
    // is for normal numbers; bf16 subnormals, read as zero, are accounted for below).
    let bf16_sub = |v: f32| T::DTYPE == DType::BF16 && v.abs() < f32::MIN_POSITIVE;
    let tame = x.iter().chain(&e).map(|v| v.to_f32()).all(|v| v == 0.0 || bf16_sub(v) || (1e-15..=1e15).contains(&v.abs()));
    if tame {
        let xs: Vec<f64> = x.iter().map(|v| v.to_f32() as f64).collect();
        let row = |i: u32| -> Vec<f64> { ew[i as usize * d..][..d].iter().map(|&v| v as f64).collect() };
        for (r, (&g, &w)) in got.iter().zip(best).enumerate().filter(|(_, (g, w))| g != w) {
            let xr = &xs[r * d..][..d];
            let (eg, eb) = (row(g), row(w));
            // What the bf16 rule's flushes may lose: terms with a subnormal factor, and 2⁻¹²⁶
            // per partial sum.
            let flush = |e: &[f64]| -> f64 {
                if T::DTYPE != DType::BF16 {
                    return 0.0;
                }
                let tiny = |v: f64| v != 0.0 && v.abs() < f32::MIN_POSITIVE as f64;
                xr.iter().zip(e).filter(|(a, b)| tiny(**a) || tiny(**b)).map(|(a, b)| (a * b).abs()).sum::<f64>()
                    + d as f64 * 2f64.powi(-126)
            };
            let u = 2f64.powi(-24);
            let (worse, tol) = match c.metric {
                Metric::L2 => {
                    let dist = |e: &[f64]| xr.iter().zip(e).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
                    let tol = 2.0 * (d as f64 + 2.0) * u * (norm2(xr) + norm2(&eg) + norm2(&eb));
                    (dist(&eg) - dist(&eb), tol + 2.0 * (flush(&eg) + flush(&eb)))
                }
                Metric::Cosine => {
                    let cos = |e: &[f64]| {
                        let (xx, ee) = (norm2(xr), norm2(e));
                        if xx == 0.0 || ee == 0.0 {
                            0.0
                        } else {
                            xr.iter().zip(e).map(|(a, b)| a * b).sum::<f64>() / (xx.sqrt() * ee.sqrt())
                        }
                    };
                    let rel = |e: &[f64]| {
                        let f = flush(e);
                        if f == 0.0 {
                            0.0
                        } else {
                            f / (norm2(xr) * norm2(e)).sqrt()
                        }
                    };
                    (cos(&eb) - cos(&eg), (3.0 * d as f64 + 8.0) * u + rel(&eg) + rel(&eb))
                }
            };
            assert!(worse <= tol, "{c:?}: row {r}: got {g}, reference {w}: {worse:e} worse, bound {tol:e}");
        }
    }

    // Lookup: exact entries; an index ≥ K is an error.
    let mut out = vec![T::from_f32(0.0); n * d];
    cb.lookup(Backend::Cpu, View::new(got, &[n]).unwrap(), ViewMut::new(&mut out, &[n, d]).unwrap()).unwrap();
    for (i, &g) in got.iter().enumerate() {
        let want: Vec<f32> = ew[g as usize * d..][..d].to_vec();
        let have: Vec<f32> = out[i * d..][..d].iter().map(|v| v.to_f32()).collect();
        assert_eq!(have, want, "{c:?}: lookup row {i}");
    }
    let mut one = vec![T::from_f32(0.0); d];
    for be in [Backend::Reference, Backend::Cpu] {
        let r = cb.lookup(be, View::new(&[c.probe], &[1]).unwrap(), ViewMut::new(&mut one, &[1, d]).unwrap());
        assert_eq!(r.is_ok(), (c.probe as usize) < k, "{c:?} {be:?}: lookup of {}", c.probe);
    }
}
