//! Fuzz target `fsq`: arbitrary levels, token counts, input dtypes, values and view dims for
//! FSQ.
//!
//! The fast backends are *not* bit-identical to the reference by construction: the reference
//! evaluates vector-quantize-pytorch's formula in f64 with `f64::tanh`, while every CPU level
//! (and CUDA) evaluates the f32 definition of `src/fsq.rs` with vistok's shared rational
//! `fsq::tanh` ([`FsqDim::level`]). So:
//!
//! 1. No call panics; errors are fine.
//! 2. Once `Fsq::new` accepts the levels, `Backend::Reference`, `Backend::Cpu` and
//!    `Backend::CpuIsa(isa)` for every level this machine has return the same result for
//!    `encode` and `decode`: all succeed, or all fail with the same message (the first NaN or
//!    bad id by index). A view whose dims are not the plan's makes all fail.
//! 3. Every CPU backend's ids equal, bit for bit, `Σ FsqDim::level(z_i)·basis_i` computed here
//!    from the public f32 definition (so all CPU levels agree with each other and with it).
//! 4. Against the reference, an id may differ only where, in every dimension whose level
//!    differs, the reference's f64 pre-rounding value (`reference::fsq::bound`) lies within
//!    [`tolerance`] of the rounding cell of the CPU's level: within a few f32 ulps of a
//!    `.5` boundary (the same rule as `tests/fsq.rs`). Such near-ties are counted (for
//!    `L ≤ 1024` and above separately) and the counts printed to stderr at each power of two.
//! 5. Decode is bit-identical on every backend; for f32 codes each code is exactly
//!    `(level − ⌊L/2⌋) / ⌊L/2⌋` (f32) of the id's levels; ids ≥ `Π L` are errors on every
//!    backend.
//!
//! Sizes stay small (≤ 4096 values).
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vistok::reference::fsq::bound;
use vistok::{bf16, f16, Backend, Float, Fsq, Isa, View, ViewMut};

const MAX_ELEMS: usize = 4096;

/// Reference first, then the detected CPU level, then each level this machine has, pinned.
fn backends() -> &'static [Backend] {
    static BACKENDS: OnceLock<Vec<Backend>> = OnceLock::new();
    BACKENDS.get_or_init(|| {
        let pinned = Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa);
        [Backend::Reference, Backend::Cpu].into_iter().chain(pinned).collect()
    })
}

const SPECIAL_F32: [f32; 20] = [
    0.0,
    -0.0,
    0.5,
    -0.5,
    1.0,
    -1.0,
    f32::NAN,
    -f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MAX,
    f32::MIN,
    f32::MIN_POSITIVE,
    1e-45,
    -1e-45,
    1e-40,
    7.905_311, // tanh's clamp
    -7.905_311,
    20.0,
    1e30,
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    F32,
    F16,
    BF16,
}

/// One fuzz case. Its `Debug` is what `cargo fuzz fmt fsq <artifact>` prints.
#[derive(Debug)]
struct Case {
    levels: Vec<u32>,
    tokens: usize,
    input: Dtype,
    /// Codes type: f32 (checked against the formula), f16 or bf16.
    output: Dtype,
    /// Bumps the ids view's length (or not): mostly not.
    bump_ids: bool,
    /// Decode input: `None` decodes the reference's ids; `Some` cycles these (some ≥ Π L).
    id_pool: Option<Vec<u32>>,
    /// `z` as f32 (rounded to `input` first). Last, so `Debug` shows the shape first.
    values: Vec<f32>,
}

/// A `z` whose f64 pre-rounding value is (near) `k + 0.5` for `l` levels: the planted
/// boundary values where near-ties happen.
fn boundary_z(l: u32, k: f64) -> Option<f32> {
    let half_l = (l - 1) as f64 * (1.0 + vistok::fsq::EPS) / 2.0;
    let offset = if l.is_multiple_of(2) { 0.5 } else { 0.0 };
    let y = (k + 0.5 + offset) / half_l;
    (y.abs() < 1.0).then(|| (y.atanh() - (offset / half_l).atanh()) as f32)
}

fn any_f32(u: &mut Unstructured<'_>, i: usize, l: u32) -> Result<f32> {
    if u.is_empty() {
        return Ok(((i * 37 + 11) % 17) as f32 / 2.0 - 4.0);
    }
    Ok(match u.int_in_range(0u8..=15)? {
        0 => f32::from_bits(u.arbitrary()?),
        1..=2 => *u.choose(&SPECIAL_F32)?,
        3..=6 => {
            // Within a few ulps of a rounding boundary of this dimension.
            let k = u.int_in_range(0..=l.min(64))? as f64 - (l / 2) as f64 - 1.0;
            match boundary_z(l, k) {
                Some(z) if z != 0.0 => f32::from_bits((z.to_bits() as i32 + u.int_in_range(-3..=3)?) as u32),
                _ => f32::from(u.arbitrary::<i8>()?) / 32.0,
            }
        }
        _ => f32::from(u.arbitrary::<i16>()?) / 4096.0,
    })
}

impl<'a> Arbitrary<'a> for Case {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let dims = if u.ratio(1, 64)? { 0 } else { u.int_in_range(1..=8)? };
        let levels = (0..dims)
            .map(|_| {
                Ok(match u.int_in_range(0u8..=31)? {
                    0 => u.arbitrary()?,
                    1 => *u.choose(&[0, 1, 1000, 1001, 1 << 16, 1 << 24, (1 << 24) + 1])?,
                    _ => u.int_in_range(2..=16)?,
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        let d = levels.len().max(1);
        let tokens = if u.ratio(1, 32)? { 0 } else { u.int_in_range(1..=256)?.min(MAX_ELEMS / d) };
        let input = *u.choose(&[Dtype::F32, Dtype::F16, Dtype::BF16])?;
        let output = *u.choose(&[Dtype::F32, Dtype::F32, Dtype::F16, Dtype::BF16])?;
        let bump_ids = u.ratio(1, 16)?;
        let id_pool = if u.ratio(1, 4)? {
            let n = u.int_in_range(1..=16)?;
            Some((0..n).map(|_| u.arbitrary()).collect::<Result<_>>()?)
        } else {
            None
        };
        let mut values = Vec::with_capacity(tokens * levels.len());
        for i in 0..tokens * levels.len() {
            values.push(any_f32(u, i, levels[i % levels.len()].clamp(2, 1 << 24))?);
        }
        Ok(Case { levels, tokens, input, output, bump_ids, id_pool, values })
    }
}

/// The f32 ulp of `x` (as f64).
fn ulp(x: f64) -> f64 {
    let f = (x.abs() as f32).max(f32::MIN_POSITIVE);
    (f32::from_bits(f.to_bits() + 1) - f) as f64
}

/// How far the f32 pipeline may be from the f64 pre-rounding value of `z` (levels `l`): the
/// rounding of `z + shift` (times `tanh' ≤ 1`, times `half_l`), the shared tanh's error
/// (≤ 3e−7, asserted by `tests/fsq.rs`) times `half_l`, and two roundings of the result.
fn tolerance(l: u32, z: f64) -> f64 {
    // ±∞ saturate like any huge value (and keep the ulps finite).
    let z = z.clamp(-1e30, 1e30);
    let half_l = (l - 1) as f64 * (1.0 + vistok::fsq::EPS) / 2.0;
    let shift = if l.is_multiple_of(2) { (0.5 / half_l).atanh() } else { 0.0 };
    half_l * (3e-7 + ulp(z + shift)) + 2.0 * ulp(bound(l, z))
}

/// Distance from the f64 value `b` to the rounding cell of `level` (`[t − ½, t + ½]` with
/// `t = level − ⌊L/2⌋`, open-ended at the clamped ends `0` and `L − 1`).
fn cell_distance(l: u32, level: u32, b: f64) -> f64 {
    let t = level as f64 - (l / 2) as f64;
    let lo = if level == 0 { f64::NEG_INFINITY } else { t - 0.5 };
    let hi = if level == l - 1 { f64::INFINITY } else { t + 0.5 };
    if b < lo {
        lo - b
    } else if b > hi {
        b - hi
    } else {
        0.0
    }
}

/// Near-ties and levels compared, for `L ≤` [`SMALL_L`] and above: past ~2^20 levels the f32
/// value itself is too coarse (its ulp nears ½), so near-ties there are routine, not rare.
static NEAR_TIES: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static LEVELS_COMPARED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
const SMALL_L: u32 = 1024;

trait Bits: Copy + std::fmt::Debug {
    fn bits(self) -> u32;
    fn poison(backend: usize) -> Self;
}

impl Bits for u32 {
    fn bits(self) -> u32 {
        self
    }
    fn poison(backend: usize) -> Self {
        0xdead_0000 + backend as u32
    }
}

impl Bits for f32 {
    fn bits(self) -> u32 {
        self.to_bits()
    }
    fn poison(backend: usize) -> Self {
        f32::from_bits(0x7fa0_dead + backend as u32)
    }
}

impl Bits for f16 {
    fn bits(self) -> u32 {
        u32::from(self.to_bits())
    }
    fn poison(backend: usize) -> Self {
        f16::from_bits(0x7e01 + backend as u16)
    }
}

impl Bits for bf16 {
    fn bits(self) -> u32 {
        u32::from(self.to_bits())
    }
    fn poison(backend: usize) -> Self {
        bf16::from_bits(0x7fd1 + backend as u16)
    }
}

/// Invariant 2: the same result on every backend (and failure for bad dims). Returns whether
/// it succeeded.
fn same_result(what: &str, dims_ok: bool, results: &[vistok::Result<()>], case: &Case) -> bool {
    let reference = &results[0];
    for (k, r) in results.iter().enumerate().skip(1) {
        let same = match (reference, r) {
            (Ok(()), Ok(())) => true,
            (Err(a), Err(b)) => a.to_string() == b.to_string(),
            _ => false,
        };
        assert!(same, "{what}: reference returned {reference:?} but {:?} returned {r:?}\n{case:?}", backends()[k]);
    }
    if !dims_ok {
        assert!(reference.is_err(), "{what}: accepted views whose dims are not the plan's\n{case:?}");
    }
    reference.is_ok()
}

fn run<T: Float, O: Float + Bits>(case: &Case, fsq: &Fsq) {
    let z: Vec<T> = case.values.iter().map(|&v| T::from_f32(v)).collect();
    let (n, d) = (case.tokens, fsq.dim());
    let Ok(zv) = View::new(&z, &[n, d]) else { return };
    let ids_len = n + usize::from(case.bump_ids);

    // Encode on every backend.
    let mut ids: Vec<Vec<u32>> = (0..backends().len()).map(|k| vec![u32::poison(k); ids_len]).collect();
    let results: Vec<_> = backends()
        .iter()
        .zip(&mut ids)
        .map(|(b, out)| fsq.encode(*b, zv, ViewMut::new(out, &[ids_len]).unwrap()))
        .collect();
    if !same_result("encode", !case.bump_ids, &results, case) {
        return;
    }

    // Invariant 3: every CPU backend computes the f32 definition exactly.
    let want: Vec<u32> = (0..n)
        .map(|t| fsq.dims().iter().enumerate().map(|(i, k)| k.level(z[t * d + i].to_f32()) * k.basis).sum())
        .collect();
    for (k, got) in ids.iter().enumerate().skip(1) {
        if let Some(t) = (0..n).find(|&t| got[t] != want[t]) {
            panic!("encode: {:?} id {t} = {}, the f32 definition gives {}\n{case:?}", backends()[k], got[t], want[t]);
        }
    }

    // Invariant 4: the reference differs only at near-ties.
    let reference = &ids[0];
    for t in 0..n {
        for k in fsq.dims() {
            LEVELS_COMPARED[usize::from(k.levels > SMALL_L)].fetch_add(1, Ordering::Relaxed);
        }
        assert!((reference[t] as u64) < fsq.codebook_size(), "reference id out of range\n{case:?}");
        if reference[t] == want[t] {
            continue;
        }
        for (i, k) in fsq.dims().iter().enumerate() {
            let (g, w) = ((want[t] / k.basis) % k.levels, (reference[t] / k.basis) % k.levels);
            if g == w {
                continue;
            }
            let x = z[t * d + i].to_f32() as f64;
            let b = bound(k.levels, x);
            let (dist, tol) = (cell_distance(k.levels, g, b), tolerance(k.levels, x));
            assert!(
                dist <= tol,
                "z[{t}, {i}] = {x:e} (L = {}): cpu level {g}, reference {w}; the reference's pre-rounding value {b} \
                 is {dist:e} from the cpu level's cell (tolerance {tol:e})\n{case:?}",
                k.levels
            );
            let big = usize::from(k.levels > SMALL_L);
            let count = NEAR_TIES[big].fetch_add(1, Ordering::Relaxed) + 1;
            if count.is_power_of_two() {
                eprintln!(
                    "fsq near-ties so far with L {} {SMALL_L}: {count} of {} levels compared (latest: z = {x:e}, L = {}, {:.2} ulps from a boundary)",
                    if big == 1 { ">" } else { "<=" },
                    LEVELS_COMPARED[big].load(Ordering::Relaxed),
                    k.levels,
                    ((b - (b - 0.5).round() - 0.5).abs()) / ulp(b),
                );
            }
        }
    }

    // Decode the reference's ids (or the pool) on every backend.
    let pool: Vec<u32>;
    let dec: &[u32] = match &case.id_pool {
        None => &reference[..n],
        Some(p) => {
            pool = (0..n).map(|i| p[i % p.len()]).collect();
            &pool
        }
    };
    let iv = View::new(dec, &[n]).unwrap();
    let mut codes: Vec<Vec<O>> = (0..backends().len()).map(|k| vec![O::poison(k); n * d]).collect();
    let results: Vec<_> = backends()
        .iter()
        .zip(&mut codes)
        .map(|(b, out)| fsq.decode(*b, iv, ViewMut::new(out, &[n, d]).unwrap()))
        .collect();
    let valid = dec.iter().all(|&id| (id as u64) < fsq.codebook_size());
    assert_eq!(same_result("decode", true, &results, case), valid, "decode: {:?}\n{case:?}", results[0]);
    if !valid {
        return;
    }
    for (k, got) in codes.iter().enumerate().skip(1) {
        if let Some(i) = (0..n * d).find(|&i| got[i].bits() != codes[0][i].bits()) {
            panic!("decode: {:?} differs at {i}: {:?} vs reference {:?}\n{case:?}", backends()[k], got[i], codes[0][i]);
        }
    }
    if O::DTYPE == vistok::DType::F32 {
        for (t, &id) in dec.iter().enumerate() {
            for (i, k) in fsq.dims().iter().enumerate() {
                let level = (id / k.basis) % k.levels;
                let want = (level as f32 - k.half_width) / k.half_width;
                let got = codes[0][t * d + i].to_f32();
                assert_eq!(got.to_bits(), want.to_bits(), "code of id {id} dim {i}: {got} vs {want}\n{case:?}");
            }
        }
    }
}

fn with_output<T: Float>(case: &Case, fsq: &Fsq) {
    match case.output {
        Dtype::F32 => run::<T, f32>(case, fsq),
        Dtype::F16 => run::<T, f16>(case, fsq),
        Dtype::BF16 => run::<T, bf16>(case, fsq),
    }
}

fuzz_target!(|case: Case| {
    let Ok(fsq) = Fsq::new(&case.levels) else { return };
    match case.input {
        Dtype::F32 => with_output::<f32>(&case, &fsq),
        Dtype::F16 => with_output::<f16>(&case, &fsq),
        Dtype::BF16 => with_output::<bf16>(&case, &fsq),
    }
});
