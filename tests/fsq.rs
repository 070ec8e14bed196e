//! FSQ: the shared f32 tanh against f64, every CPU ISA level and thread count bit-identical,
//! the f64 reference matched except within a few ulps of a rounding boundary (checked and
//! counted), planted boundary / saturation / zero / subnormal values, round trips, bad input
//! and a hand-checked example.

mod common;

use common::Rng;
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use vistok::fsq::tanh;
use vistok::reference::fsq::bound;
use vistok::{bf16, f16, Backend, DType, Error, Family, Float, Fsq, Isa, View, ViewMut};

fn cpu_backends() -> Vec<Backend> {
    Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa).chain([Backend::Cpu]).collect()
}

fn encode<T: Float>(fsq: &Fsq, backend: Backend, z: &[T]) -> Result<Vec<u32>, Error> {
    let n = z.len() / fsq.dim();
    let mut ids = vec![0xdead_beef; n];
    fsq.encode(backend, View::new(z, &[n, fsq.dim()])?, ViewMut::new(&mut ids, &[n])?)?;
    Ok(ids)
}

fn decode<O: Float>(fsq: &Fsq, backend: Backend, ids: &[u32]) -> Result<Vec<O>, Error> {
    let n = ids.len();
    let mut codes = vec![common::poison::<O>(); n * fsq.dim()];
    fsq.decode(backend, View::new(ids, &[n])?, ViewMut::new(&mut codes, &[n, fsq.dim()])?)?;
    Ok(codes)
}

/// The f32 ulp of `x` (as f64).
fn ulp(x: f64) -> f64 {
    let f = (x.abs() as f32).max(f32::MIN_POSITIVE);
    (f32::from_bits(f.to_bits() + 1) - f) as f64
}

/// How far the f32 pipeline may be from the f64 pre-rounding value `b` of `z` (levels `l`):
/// the rounding of `z + shift` (times `tanh' ≤ 1` times `half_l`), the tanh error times
/// `half_l`, and a couple of roundings of the result.
fn tolerance(l: u32, z: f64) -> f64 {
    let half_l = (l - 1) as f64 * 1.001 / 2.0;
    let shift = if l.is_multiple_of(2) { (0.5 / half_l).atanh() } else { 0.0 };
    half_l * (3e-7 + ulp(z + shift)) + 2.0 * ulp(bound(l, z))
}

/// Distance of `b` from the nearest `k + 0.5`.
fn to_boundary(b: f64) -> f64 {
    (b - (b - 0.5).round() - 0.5).abs()
}

/// Every CPU backend equals every other bit for bit; against the reference, a level may differ
/// only where the f64 pre-rounding value is within [`tolerance`] of a `.5` boundary, and then
/// only by one. Returns how many levels differed.
/// The largest distance from a boundary (in f32 ulps of the value, as f64 bits; positive f64
/// bits order like the values) at which a level differed.
static WORST_ULPS: AtomicU64 = AtomicU64::new(0);

fn check<T: Float>(fsq: &Fsq, z: &[T]) -> usize {
    let want = encode(fsq, Backend::Reference, z).unwrap();
    let backends = cpu_backends();
    let first = encode(fsq, backends[0], z).unwrap();
    for be in &backends[1..] {
        assert_eq!(encode(fsq, *be, z).unwrap(), first, "{be:?} vs {:?} on {:?}", backends[0], fsq.levels());
    }
    let d = fsq.dim();
    let mut near = 0;
    for (n, (&got, &want)) in first.iter().zip(&want).enumerate() {
        assert!((got as u64) < fsq.codebook_size(), "id {got} out of range");
        if got == want {
            continue;
        }
        for (i, k) in fsq.dims().iter().enumerate() {
            let (g, w) = ((got / k.basis) % k.levels, (want / k.basis) % k.levels);
            if g == w {
                continue;
            }
            let x = z[n * d + i].to_f32() as f64;
            let b = bound(k.levels, x);
            assert!(
                g.abs_diff(w) == 1 && to_boundary(b) <= tolerance(k.levels, x),
                "z[{n}, {i}] = {x:e} (L = {}): cpu level {g}, reference {w}, pre-rounding value {b} is {:e} from a boundary",
                k.levels,
                to_boundary(b)
            );
            near += 1;
            let ulps = to_boundary(b) / ulp(b);
            WORST_ULPS.fetch_max(ulps.to_bits(), Ordering::Relaxed);
        }
    }
    near
}

/// `z` whose f64 pre-rounding value is exactly `k + 0.5` for levels `l`, or `None` outside the
/// range of the bound.
fn boundary_z(l: u32, k: f64) -> Option<f64> {
    let half_l = (l - 1) as f64 * 1.001 / 2.0;
    let offset = if l.is_multiple_of(2) { 0.5 } else { 0.0 };
    let y = (k + 0.5 + offset) / half_l;
    (y.abs() < 1.0).then(|| y.atanh() - (offset / half_l).atanh())
}

/// A mix of values for dimension `l`: ordinary, planted at boundaries (±1 ulp), saturating,
/// ±0, subnormal.
fn value(r: &mut Rng, l: u32) -> f32 {
    match r.next_u64() % 12 {
        0 => 0.0,
        1 => -0.0,
        2 => {
            f32::from_bits((r.next_u64() % 0x7f_ffff) as u32 + 1)
                * if r.next_u64().is_multiple_of(2) { 1.0 } else { -1.0 }
        }
        3 => [1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 20.0, -20.0][(r.next_u64() % 7) as usize],
        4..=6 => {
            let k = (r.next_u64() % l as u64) as f64 - (l / 2) as f64 - 1.0;
            match boundary_z(l, k) {
                Some(z) => {
                    let f = z as f32;
                    let nudge = (r.next_u64() % 3) as i32 - 1;
                    if f == 0.0 {
                        f
                    } else {
                        f32::from_bits((f.to_bits() as i32 + nudge) as u32)
                    }
                }
                None => r.uniform(-3.0, 3.0),
            }
        }
        _ => r.uniform(-4.0, 4.0),
    }
}

fn random_z<T: Float>(levels: &[u32], n: usize, seed: u64) -> Vec<T> {
    let mut r = Rng(seed);
    (0..n).flat_map(|_| levels.iter().copied()).map(|l| T::from_f32(value(&mut r, l))).collect()
}

#[test]
fn tanh_accuracy() {
    // A dense sweep of non-negative f32 inputs up to 9 (tanh is odd, checked separately).
    let (mut max_abs, mut max_ulps, mut worst) = (0.0f64, 0.0f64, 0.0f32);
    let top = 9.0f32.to_bits();
    for bits in (0..top).step_by(97).chain([top, 1, 0x0080_0000]) {
        let x = f32::from_bits(bits);
        let exact = (x as f64).tanh();
        let err = (tanh(x) as f64 - exact).abs();
        // Relative accuracy is lost only where x·α1 is subnormal (|x| < 3e−36): there the error
        // is below 1e−44 in absolute terms.
        let ulps = if x >= 1e-35 { err / ulp(exact) } else { 0.0 };
        max_abs = max_abs.max(err);
        if ulps > max_ulps {
            (max_ulps, worst) = (ulps, x);
        }
        assert_eq!(tanh(-x).to_bits(), (-tanh(x)).to_bits(), "odd at {x}");
        assert!(tanh(x).abs() <= 1.0);
    }
    println!("tanh: max abs error {max_abs:e}, max {max_ulps:.2} ulps (at x = {worst:e})");
    assert!(max_abs < 3e-7, "max abs error {max_abs:e}");
    assert!(max_ulps < 5.0, "max ulps {max_ulps} at {worst:e}");
    assert_eq!(tanh(f32::INFINITY), tanh(100.0));
    assert!(tanh(f32::NAN).is_nan());
}

#[test]
#[ignore = "exhaustive (a billion inputs, about a minute): cargo test --release --test fsq -- --ignored tanh_bound"]
fn tanh_bound_exhaustive() {
    // |tanh(x)| ≤ 1 − 2^−24 for every f32 (the SIMD kernels rely on |tanh| ≤ 1): every input
    // up to the clamp (beyond it the result is the clamp's; tanh is exactly odd).
    let top = vistok::fsq::tanh_coef::CLAMP.to_bits();
    let worst = (0..=top).map(|b| tanh(f32::from_bits(b))).fold(0.0f32, f32::max);
    assert_eq!(worst, 1.0 - f32::EPSILON / 2.0, "max tanh {worst:e}");
}

#[test]
fn hand_checked_example() {
    // Levels [8, 5, 5, 5], computed by hand (h = 3.5035 / 2.002, shift = atanh(0.5 / 3.5035)):
    // z = 0.9: tanh(0.9 + 0.14370) = 0.77901 → 0.77935·3.5035 − 0.5 = 2.2304 → 2 → level 6;
    // z = −0.4 (L = 5): tanh(−0.4)·2.002 = −0.76097 → −1 → level 1;
    // z = 0.25: 0.24492·2.002 = 0.49033 → 0 → level 2; z = 1.2: 0.83365·2.002 = 1.6690 → 2 → 4.
    let fsq = Fsq::new(&[8, 5, 5, 5]).unwrap();
    let z = [0.9f32, -0.4, 0.25, 1.2, -0.9, 0.4, -0.25, -1.2];
    // Second token: tanh(−0.9 + 0.14370) = −0.63876 → −2.7379 → −3 → level 1; then 3, 2, 0.
    let want = [6 + 8 + 2 * 40 + 4 * 200, 1 + 3 * 8 + 2 * 40];
    for be in cpu_backends().into_iter().chain([Backend::Reference]) {
        assert_eq!(encode(&fsq, be, &z).unwrap(), want, "{be:?}");
        let codes: Vec<f32> = decode(&fsq, be, &want).unwrap();
        assert_eq!(codes, [0.5, -0.5, 0.0, 1.0, -0.75, 0.5, 0.0, -1.0], "{be:?}");
    }
    // L = 2: shift = atanh(0.5 / 0.5005) = 3.8002, so the one boundary sits at z = −3.8002;
    // z = −1: tanh(2.8002)·0.5005 − 0.5 = −0.0032 → level 1; z = −5: −0.917 → level 0.
    let two = Fsq::new(&[2]).unwrap();
    for be in cpu_backends().into_iter().chain([Backend::Reference]) {
        assert_eq!(encode(&two, be, &[-5.0f32, -1.0, 1.0]).unwrap(), [0, 1, 1]);
    }
}

#[test]
fn planted_boundaries_every_level() {
    // Every boundary of every level count 2..=16, at the f32 nearest the exact solution and its
    // neighbours: cpu must agree with the reference except within the tolerance.
    let (mut near, mut total) = (0, 0);
    for l in 2..=16u32 {
        let fsq = Fsq::new(&[l]).unwrap();
        let mut z = vec![];
        for k in -(l as i64)..=(l as i64) {
            if let Some(x) = boundary_z(l, k as f64) {
                let f = x as f32;
                for d in -3i32..=3 {
                    z.push(if f == 0.0 {
                        f32::from_bits(d.unsigned_abs())
                    } else {
                        f32::from_bits((f.to_bits() as i32 + d) as u32)
                    });
                }
            }
        }
        near += check(&fsq, &z);
        total += z.len();
    }
    println!("planted (every boundary, ±3 ulps): {near} of {total} levels differ from the f64 reference, all within tolerance");
}

#[test]
fn saturation_zeros_subnormals() {
    let fsq = Fsq::new(&[8, 5, 2, 16, 3]).unwrap();
    let z = [
        1e30f32,
        -1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX, // all saturate
        0.0,
        -0.0,
        0.0,
        -0.0,
        0.0, // zeros
        1e-45,
        -1e-45,
        1e-40,
        -1e-40,
        f32::MIN_POSITIVE, // subnormals
    ];
    let ids = encode(&fsq, Backend::Reference, &z).unwrap();
    let levels = |id: u32| -> Vec<u32> { fsq.dims().iter().map(|k| (id / k.basis) % k.levels).collect() };
    assert_eq!(levels(ids[0]), [7, 0, 1, 0, 2]);
    // z = 0: even L lands on the upper middle level (⌊L/2⌋), odd L on the middle.
    assert_eq!(levels(ids[1]), [4, 2, 1, 8, 1]);
    assert_eq!(levels(ids[2]), [4, 2, 1, 8, 1]);
    for be in cpu_backends() {
        assert_eq!(encode(&fsq, be, &z).unwrap(), ids, "{be:?}");
    }
}

#[test]
fn large_levels_where_the_clamp_acts() {
    // Above 1000 levels the 1e−3 margin lets the formula reach L (even L > 1000): the clamp to
    // L − 1 acts, and the SIMD kernels clamp in integers there. Saturating inputs hit it.
    for levels in [vec![1002, 1001], vec![4096, 3, 4097], vec![1 << 16, 1 << 15], vec![65536, 5, 6, 7]] {
        let fsq = Fsq::new(&levels).unwrap();
        let mut z: Vec<f32> = random_z(&levels, 3000, levels[0] as u64);
        z.extend(levels.iter().flat_map(|_| [f32::INFINITY]).chain(levels.iter().map(|_| 30.0f32)));
        z.extend(levels.iter().map(|_| f32::NEG_INFINITY));
        let near = check(&fsq, &z);
        let ids = encode(&fsq, Backend::Cpu, &z).unwrap();
        let top: u32 = fsq.dims().iter().map(|k| (k.levels - 1) * k.basis).sum();
        let n = z.len() / levels.len();
        assert_eq!(&ids[n - 3..], [top, top, 0], "{levels:?}: saturated tokens are the extreme ids");
        println!("levels {levels:?}: {near} levels differ from the f64 reference at a boundary");
    }
    // 2^24 levels: the f32 definition has ulp-sized steps there (several levels apart from the
    // f64 reference), but every cpu path is still the same definition, bit for bit.
    let fsq = Fsq::new(&[1 << 24]).unwrap();
    let mut z: Vec<f32> = random_z(fsq.levels(), 5000, 7);
    z.extend([f32::INFINITY, -30.0]);
    let backends = cpu_backends();
    let want = encode(&fsq, backends[0], &z).unwrap();
    for be in &backends[1..] {
        assert_eq!(encode(&fsq, *be, &z).unwrap(), want, "{be:?}");
    }
    assert_eq!(&want[5000..], [(1 << 24) - 1, 0]);
}

#[test]
fn round_trips_every_id() {
    // Every id of: all single dimensions and pairs of 2..=16 levels, and larger codebooks up to
    // 2^16 ids (16 dimensions of 2 included).
    let small = (2..=16u32).flat_map(|a| std::iter::once(vec![a]).chain((2..=16).map(move |b| vec![a, b])));
    let large = [
        vec![8, 5, 5, 5],
        vec![16, 16, 16, 16],
        vec![3, 7, 2, 9, 5],
        vec![15, 4, 6],
        vec![2; 16],
        vec![8, 8, 8, 5, 5, 5],
    ];
    for levels in small.chain(large) {
        let fsq = Fsq::new(&levels).unwrap();
        let ids: Vec<u32> = (0..fsq.codebook_size() as u32).collect();
        let codes: Vec<f32> = decode(&fsq, Backend::Reference, &ids).unwrap();
        for be in cpu_backends() {
            let got: Vec<f32> = decode(&fsq, be, &ids).unwrap();
            common::assert_bits_eq(&got, &codes, &format!("decode {be:?} {levels:?}"));
            let got16: Vec<bf16> = decode(&fsq, be, &ids).unwrap();
            let want16: Vec<bf16> = decode(&fsq, Backend::Reference, &ids).unwrap();
            common::assert_bits_eq(&got16, &want16, &format!("decode bf16 {be:?} {levels:?}"));
        }
        // codes → ids is exact (vector-quantize-pytorch's codes_to_indices).
        for (id, row) in ids.iter().zip(codes.chunks_exact(levels.len())) {
            let back: u32 =
                row.iter().zip(fsq.dims()).map(|(&c, k)| (c * k.half_width + k.half_width) as u32 * k.basis).sum();
            assert_eq!(back, *id);
            assert!(row.iter().all(|c| (-1.0..=1.0).contains(c)));
        }
        // encode ∘ bound⁻¹ ∘ decode = id: the z whose pre-rounding value is the code's integer
        // (the middle of its rounding cell) encodes back to the id, on every backend.
        let z: Vec<f32> = codes
            .chunks_exact(levels.len())
            .flat_map(|row| {
                row.iter().zip(fsq.dims()).map(|(&c, k)| {
                    let q = (c * k.half_width) as f64;
                    boundary_z(k.levels, q - 0.5).unwrap() as f32
                })
            })
            .collect();
        let z16: Vec<f16> = z.iter().map(|&x| f16::from_f32(x)).collect();
        let zb16: Vec<bf16> = z.iter().map(|&x| bf16::from_f32(x)).collect();
        for be in cpu_backends().into_iter().chain([Backend::Reference]) {
            assert_eq!(encode(&fsq, be, &z).unwrap(), ids, "encode(decode) {be:?} {levels:?}");
            assert_eq!(encode(&fsq, be, &z16).unwrap(), ids, "encode(decode) f16 {be:?} {levels:?}");
            assert_eq!(encode(&fsq, be, &zb16).unwrap(), ids, "encode(decode) bf16 {be:?} {levels:?}");
        }
    }
    // The literal encode(decode(id)) is not the id in general: codes are outputs, and encode
    // bounds its input first. L = 8: the code of level 7 is 0.75, which encodes to level 6.
    let fsq = Fsq::new(&[8]).unwrap();
    let code: Vec<f32> = decode(&fsq, Backend::Reference, &[7]).unwrap();
    assert_eq!(code, [0.75]);
    for be in cpu_backends().into_iter().chain([Backend::Reference]) {
        assert_eq!(encode(&fsq, be, &code).unwrap(), [6], "{be:?}");
    }
}

fn statistics(fsq: &Fsq, be: Backend, ids: &[u32]) -> Result<vistok::fsq::FsqStats, Error> {
    fsq.statistics(be, View::new(ids, &[ids.len()])?)
}

#[test]
fn statistics_match_reference_and_decode() {
    for (levels, n) in [(vec![8, 8, 8, 5, 5, 5], 600_001), (vec![3, 2], 17), (vec![16; 5], 1000), (vec![2], 0)] {
        let fsq = Fsq::new(&levels).unwrap();
        let z: Vec<f32> = random_z(&levels, n, 3);
        let ids = encode(&fsq, Backend::Cpu, &z).unwrap();
        let want = statistics(&fsq, Backend::Reference, &ids).unwrap();
        assert_eq!(want.tokens, n);
        // Level counts from the decoded codes, independently of both implementations.
        let codes: Vec<f32> = decode(&fsq, Backend::Reference, &ids).unwrap();
        if let Some(counts) = &want.levels {
            let mut from_codes: Vec<Vec<u64>> = levels.iter().map(|&l| vec![0; l as usize]).collect();
            for row in codes.chunks_exact(levels.len()) {
                for ((c, k), f) in row.iter().zip(fsq.dims()).zip(from_codes.iter_mut()) {
                    f[(c * k.half_width + k.half_width) as usize] += 1;
                }
            }
            assert_eq!(counts, &from_codes, "{levels:?}");
        }
        assert_eq!(want.levels.is_some(), levels.iter().sum::<u32>() <= 1 << 20);
        assert_eq!(want.histogram.is_some(), fsq.codebook_size() <= 1 << 20, "{levels:?}");
        if let Some(h) = &want.histogram {
            assert_eq!(h.iter().sum::<u64>(), n as u64);
            for &id in ids.iter().take(100) {
                assert!(h[id as usize] > 0);
            }
        }
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for be in cpu_backends() {
                assert_eq!(pool.install(|| statistics(&fsq, be, &ids).unwrap()), want, "{levels:?} {threads} {be:?}");
            }
        }
    }
    // No histogram above 2^20 ids; no level counts above 2^20 levels in all.
    let big = Fsq::new(&[1 << 11, 1 << 11]).unwrap();
    let s = statistics(&big, Backend::Cpu, &[0, 1, (1 << 22) - 1]).unwrap();
    assert!(s.histogram.is_none());
    assert_eq!(s.levels.as_ref().unwrap()[1][(1 << 11) - 1], 1);
    let huge = Fsq::new(&[1 << 21, 2]).unwrap();
    for be in cpu_backends().into_iter().chain([Backend::Reference]) {
        let s = statistics(&huge, be, &[5, 7]).unwrap();
        assert!(s.levels.is_none() && s.histogram.is_none() && s.tokens == 2 && s.level_frequency().is_none());
    }
}

#[test]
fn statistics_bad_input() {
    let fsq = Fsq::new(&[8, 5, 3]).unwrap();
    let mut ids: Vec<u32> = (0..300_000u32).map(|i| i % 120).collect();
    ids[290_000] = 120;
    ids[299_999] = u32::MAX;
    for be in cpu_backends().into_iter().chain([Backend::Reference]) {
        let e = statistics(&fsq, be, &ids).unwrap_err();
        assert_eq!(e.to_string(), "fsq: ids[290000] = 120 is not below the codebook size 120", "{be:?}");
        let e = fsq.statistics(be, View::new(&ids, &[1000, 300]).unwrap()).unwrap_err();
        assert!(matches!(e, Error::Shape { family: Family::Fsq, .. }), "{be:?}");
    }
}

/// Many ids (the cpu decode then tabulates groups of dimensions whose levels multiply to at
/// most 512, one division per group; a lone dimension up to 4096 levels has a table, above
/// that none): every grouping shape — groups that fill the limit exactly, lone dimensions with
/// and without a table first, in the middle and last, 32 dimensions of 2, the largest levels —
/// bit for bit equal to the reference, f32 and bf16.
#[test]
fn decode_many_ids_every_grouping() {
    let lists: [&[u32]; 12] = [
        // Groups of 3 copy 4-wide into the next group's or the next row's first slot.
        &[8, 8, 8, 5, 5, 5],
        &[4, 6, 5],
        &[8, 64, 3, 600],
        &[2, 2, 128, 513, 5],
        &[4096, 3],
        &[3, 4096, 2],
        &[5000, 3, 7],
        &[3, 70_000, 2, 9],
        &[7, 11, 4099],
        &[2; 32],
        &[65_536, 65_536],
        &[1 << 24, 255],
    ];
    let mut r = Rng(0xF50D_EC0D_E017);
    for levels in lists {
        let fsq = Fsq::new(levels).unwrap();
        let size = fsq.codebook_size();
        let n = 70_001;
        let mut ids: Vec<u32> = (0..n).map(|_| (r.next_u64() % size) as u32).collect();
        // The extremes, and a run of consecutive ids (every low-group row).
        ids[0] = 0;
        ids[1] = (size - 1) as u32;
        for (i, id) in ids[2..5000].iter_mut().enumerate() {
            *id = (i as u64 % size) as u32;
        }
        let want: Vec<f32> = decode(&fsq, Backend::Reference, &ids).unwrap();
        let want16: Vec<bf16> = decode(&fsq, Backend::Reference, &ids).unwrap();
        for be in cpu_backends() {
            common::assert_bits_eq(&decode::<f32>(&fsq, be, &ids).unwrap(), &want, &format!("{be:?} {levels:?}"));
            common::assert_bits_eq(
                &decode::<bf16>(&fsq, be, &ids).unwrap(),
                &want16,
                &format!("bf16 {be:?} {levels:?}"),
            );
        }
    }
}

#[test]
fn any_thread_count() {
    let fsq = Fsq::new(&[8, 8, 8, 5, 5, 5]).unwrap();
    let z: Vec<f32> = random_z(fsq.levels(), 40_000 + 7, 11);
    let want = encode(&fsq, Backend::Cpu, &z).unwrap();
    for threads in [1, 2, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for be in cpu_backends() {
            assert_eq!(pool.install(|| encode(&fsq, be, &z).unwrap()), want, "{threads} threads, {be:?}");
        }
    }
    check(&fsq, &z);
}

#[test]
fn bad_input() {
    let inv = |r: Result<Fsq, Error>| matches!(r, Err(Error::Invalid { family: Family::Fsq, .. }));
    assert!(inv(Fsq::new(&[])));
    assert!(inv(Fsq::new(&[8, 1, 5])));
    assert!(inv(Fsq::new(&[0])));
    assert!(inv(Fsq::new(&[(1 << 24) + 1])));
    assert!(matches!(Fsq::new(&[1 << 16, 1 << 16, 2]), Err(Error::Overflow { family: Family::Fsq, .. })));
    assert!(matches!(Fsq::new(&[u32::MAX >> 8; 8]), Err(Error::Overflow { .. }) | Err(Error::Invalid { .. })));
    assert_eq!(Fsq::new(&[1 << 16, 1 << 16]).unwrap().codebook_size(), 1 << 32);

    let fsq = Fsq::new(&[8, 5, 3]).unwrap();
    let mut z = vec![0.5f32; 3 * 40];
    z[2 * 3 + 1] = f32::NAN;
    z[30 * 3 + 2] = f32::NAN;
    for be in cpu_backends().into_iter().chain([Backend::Reference]) {
        let e = encode(&fsq, be, &z).unwrap_err();
        assert_eq!(e.to_string(), "fsq: z[2, 1] is not finite", "{be:?}");
        let h: Vec<f16> = z.iter().map(|&x| f16::from_f32(x)).collect();
        assert_eq!(encode(&fsq, be, &h).unwrap_err().to_string(), "fsq: z[2, 1] is not finite", "{be:?}");
        let e = decode::<f32>(&fsq, be, &[0, 119, 120, 5]).unwrap_err();
        assert_eq!(e.to_string(), "fsq: ids[2] = 120 is not below the codebook size 120", "{be:?}");
    }
    // Wrong shapes.
    let mut ids = vec![0u32; 40];
    let shape = |r: Result<(), Error>| matches!(r, Err(Error::Shape { family: Family::Fsq, .. }));
    assert!(shape(fsq.encode(Backend::Cpu, View::new(&z, &[30, 4]).unwrap(), ViewMut::new(&mut ids, &[40]).unwrap())));
    assert!(shape(fsq.encode(
        Backend::Cpu,
        View::new(&z, &[40, 3]).unwrap(),
        ViewMut::new(&mut ids[..39], &[39]).unwrap()
    )));
    assert!(shape(fsq.encode(Backend::Cpu, View::new(&z, &[120]).unwrap(), ViewMut::new(&mut ids, &[40]).unwrap())));
    let mut codes = vec![0.0f32; 120];
    assert!(shape(fsq.decode(
        Backend::Cpu,
        View::new(&ids, &[40]).unwrap(),
        ViewMut::new(&mut codes, &[60, 2]).unwrap()
    )));
    assert!(shape(fsq.decode(
        Backend::Cpu,
        View::new(&ids[..39], &[39]).unwrap(),
        ViewMut::new(&mut codes, &[40, 3]).unwrap()
    )));
    // Empty input is fine.
    assert_eq!(encode::<f32>(&fsq, Backend::Cpu, &[]).unwrap(), Vec::<u32>::new());
}

#[derive(Debug, Clone)]
struct Case {
    levels: Vec<u32>,
    n: usize,
    dtype: DType,
    seed: u64,
}

/// Level lists: random ones of 1 to 8 levels in `2..=16`, and (with the `testing` feature, as
/// CI runs) the exported [`vistok::testing::fsq_levels`] as well, up to 16 levels per
/// dimension (the f32 codes → ids check below is exact only for small levels; large ones are
/// covered by `exported_inputs_match_reference`).
fn levels_strategy() -> BoxedStrategy<Vec<u32>> {
    let random = prop::collection::vec(2u32..=16, 1..=8);
    #[cfg(feature = "testing")]
    return prop_oneof![
        random,
        vistok::testing::fsq_levels().prop_filter("small levels", |l| l.iter().all(|&l| l <= 16))
    ]
    .boxed();
    #[cfg(not(feature = "testing"))]
    random.boxed()
}

fn case() -> impl Strategy<Value = Case> {
    (levels_strategy(), 0usize..100, 0usize..3, any::<u64>()).prop_map(|(levels, n, t, seed)| Case {
        levels,
        n,
        dtype: [DType::F32, DType::F16, DType::BF16][t],
        seed,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn cpu_matches_reference(c in case()) {
        let fsq = Fsq::new(&c.levels).unwrap();
        match c.dtype {
            DType::F32 => { check(&fsq, &random_z::<f32>(&c.levels, c.n, c.seed)); }
            DType::F16 => { check(&fsq, &random_z::<f16>(&c.levels, c.n, c.seed)); }
            _ => { check(&fsq, &random_z::<bf16>(&c.levels, c.n, c.seed)); }
        }
        // Decoded ids give valid codes, identical on every backend.
        let ids = encode(&fsq, Backend::Cpu, &random_z::<f32>(&c.levels, c.n, c.seed ^ 1)).unwrap();
        let want: Vec<f32> = decode(&fsq, Backend::Reference, &ids).unwrap();
        for be in cpu_backends() {
            common::assert_bits_eq(&decode::<f32>(&fsq, be, &ids).unwrap(), &want, "decode");
        }
        for (row, &id) in want.chunks_exact(c.levels.len()).zip(&ids) {
            let mut back = 0;
            for (&code, k) in row.iter().zip(fsq.dims()) {
                let level = code * k.half_width + k.half_width;
                prop_assert!(level.fract() == 0.0 && (0.0..k.levels as f32).contains(&level));
                back += level as u32 * k.basis;
            }
            prop_assert_eq!(back, id);
        }
    }
}

#[cfg(feature = "testing")]
proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// The exported FSQ inputs (boundary values ± ulps, ±0, subnormals, ±∞) through this file's
    /// own check, and the exported harness agreeing with it on the near-tie count.
    #[test]
    fn exported_inputs_match_reference((levels, z) in vistok::testing::fsq_case()) {
        let fsq = Fsq::new(&levels).unwrap();
        let near = check(&fsq, &z);
        let ids = encode(&fsq, cpu_backends()[0], &z).unwrap();
        let report = vistok::testing::check_fsq(&fsq, &z, &ids)?;
        prop_assert_eq!(report.near_ties, near);
        let zb: Vec<bf16> = z.iter().map(|&v| bf16::from_f32(v)).collect();
        check(&fsq, &zb);
    }
}

#[test]
fn near_boundary_count() {
    // How often cpu and reference differ (always at a boundary): on ordinary values uniform in
    // [−4, 4], and on the mix with planted boundary values (a quarter of them ±1 ulp from one).
    for (i, levels) in [vec![8, 8, 8, 5, 5, 5], vec![16, 15, 2, 3], vec![7; 8]].into_iter().enumerate() {
        let fsq = Fsq::new(&levels).unwrap();
        let mut r = Rng(200 + i as u64);
        let uniform: Vec<f32> = (0..levels.len() * 100_000).map(|_| r.uniform(-4.0, 4.0)).collect();
        let near = check(&fsq, &uniform);
        let mixed: Vec<f32> = random_z(&levels, 20_000, 100 + i as u64);
        let near_mixed = check(&fsq, &mixed);
        println!(
            "levels {levels:?}: uniform {near} of {} levels differ from the f64 reference; with planted boundaries {near_mixed} of {}",
            uniform.len(),
            mixed.len()
        );
    }
    println!(
        "largest distance from a boundary where a level differed, so far: {:.2} ulps of the value",
        f64::from_bits(WORST_ULPS.load(Ordering::Relaxed))
    );
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut t = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `t` is a valid, writable timespec (two 64-bit fields on x86-64 Linux) and the
    // clock id is a valid constant; clock_gettime writes only `t`.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0);
    t.sec as f64 + t.nsec as f64 * 1e-9
}

/// `(wall, cpu)` GB/s of `f` moving `bytes`: the best wall-clock time of `reps` runs on the
/// current pool, and the CPU time per run on a one-thread pool (which is what the shared,
/// oversubscribed machine cannot inflate: `2 × cpu` is what two idle cores would give, up to
/// memory bandwidth).
fn gbps(bytes: usize, reps: usize, mut f: impl FnMut() + Send) -> (f64, f64) {
    f();
    let best = (0..reps)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let cpu = one.install(|| {
        let t = thread_cpu_seconds();
        for _ in 0..reps {
            f();
        }
        (thread_cpu_seconds() - t) / reps as f64
    });
    (bytes as f64 / best / 1e9, bytes as f64 / cpu / 1e9)
}

#[test]
#[ignore = "timing, not a check: cargo test --release --test fsq -- --ignored --nocapture"]
fn throughput() {
    // FSQ 1048576×6 levels [8,8,8,5,5,5] on every backend, and LFQ 1048576×18 (d = 18) in the
    // same run for scale. GB/s of input read + ids written.
    let fsq = Fsq::new(&[8, 8, 8, 5, 5, 5]).unwrap();
    let n = 1 << 20;
    // Activation-like values (uniform in ±3); the planted test mix (1 in 12 subnormal) is
    // measured once below: subnormal operands are slower on some cores.
    let mut r = Rng(5);
    let z: Vec<f32> = (0..n * 6).map(|_| r.uniform(-3.0, 3.0)).collect();
    let mut ids = vec![0u32; n];
    let bytes = z.len() * 4 + n * 4;
    for be in [Backend::Reference].into_iter().chain(cpu_backends()) {
        let reps = if be == Backend::Reference || be == Backend::CpuIsa(Isa::Scalar) { 1 } else { 20 };
        let (wall, cpu) = gbps(bytes, reps, || {
            fsq.encode(be, View::new(&z, &[n, 6]).unwrap(), ViewMut::new(&mut ids, &[n]).unwrap()).unwrap()
        });
        println!("fsq/{be:?}/f32/1048576x6: {wall:.2} GB/s wall, {cpu:.2} GB/s per CPU-second");
    }
    let planted: Vec<f32> = random_z(fsq.levels(), n, 5);
    let (wall, cpu) = gbps(bytes, 20, || {
        fsq.encode(Backend::Cpu, View::new(&planted, &[n, 6]).unwrap(), ViewMut::new(&mut ids, &[n]).unwrap()).unwrap()
    });
    println!("fsq/Cpu/f32/1048576x6 (planted test mix): {wall:.2} GB/s wall, {cpu:.2} GB/s per CPU-second");
    // In cache: 16384 tokens (450 KiB), the kernel's own speed.
    let m = 1 << 14;
    for be in cpu_backends().into_iter().filter(|&b| b != Backend::CpuIsa(Isa::Scalar)) {
        let (wall, cpu) = gbps(m * 28, 400, || {
            fsq.encode(be, View::new(&z[..m * 6], &[m, 6]).unwrap(), ViewMut::new(&mut ids[..m], &[m]).unwrap())
                .unwrap()
        });
        println!("fsq/{be:?}/f32/16384x6: {wall:.2} GB/s wall, {cpu:.2} GB/s per CPU-second");
    }
    let lfq = vistok::Lfq::new(&vistok::LfqConfig::new(1, 18, vistok::BitOrder::MsbFirst)).unwrap();
    let zl: Vec<f32> = (0..n * 18).map(|i| z[i % z.len()]).collect();
    let (wall, cpu) = gbps(zl.len() * 4 + n * 4, 20, || {
        lfq.encode(Backend::Cpu, View::new(&zl, &[n, 18]).unwrap(), ViewMut::new(&mut ids, &[n, 1]).unwrap()).unwrap()
    });
    println!("lfq/Cpu/f32/1048576x18: {wall:.2} GB/s wall, {cpu:.2} GB/s per CPU-second");
}

/// Decode with dimensions of many levels (above the cpu's table limit, 4096) and small ones
/// mixed: bitwise equal to the reference, f32 and bf16, ids spread over the whole codebook.
#[test]
fn decode_large_levels_matches_reference() {
    let fsq = Fsq::new(&[5000, 3, 70_000, 2]).unwrap();
    let size = fsq.codebook_size();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut ids: Vec<u32> = (0..4099)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % size) as u32
        })
        .collect();
    ids.extend([0, (size - 1) as u32, 4999, 5000, 14_999, 15_000]);
    for be in [Backend::Cpu, Backend::CpuIsa(vistok::Isa::Scalar)] {
        let got: Vec<f32> = decode(&fsq, be, &ids).unwrap();
        common::assert_bits_eq(&got, &decode::<f32>(&fsq, Backend::Reference, &ids).unwrap(), "decode f32");
        let got: Vec<bf16> = decode(&fsq, be, &ids).unwrap();
        common::assert_bits_eq(&got, &decode::<bf16>(&fsq, Backend::Reference, &ids).unwrap(), "decode bf16");
    }
}
