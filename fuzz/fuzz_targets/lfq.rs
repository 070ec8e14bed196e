//! Fuzz target `lfq`: arbitrary configs (groups, bits, order, scale, BSQ), token counts, input
//! dtypes, values and view dims for LFQ / group-wise LFQ / BSQ.
//!
//! Invariants (any violation panics, which libFuzzer reports as a crash):
//! 1. No call panics; errors are fine.
//! 2. Once `Lfq::new` accepts a config, `Backend::Reference`, `Backend::Cpu` and
//!    `Backend::CpuIsa(isa)` for every level this machine has return the same result for
//!    `encode`, `encode_normalized`, `decode` and `statistics`: all succeed, or all fail with
//!    the same message (a NaN or a bad id is named by its lowest index on every backend). A view
//!    whose dims are not the plan's makes all fail.
//! 3. When they succeed, every output equals the reference's bit for bit (LFQ's contract: no
//!    near-ties, ids come from signs). Each backend's outputs are poisoned with a different
//!    value first, so an element one backend forgets to write is a mismatch.
//! 4. Ids are below `2^d`; `bit_k = z_k > 0` read back from each id in the config's bit order
//!    matches the input (NaN-free inputs); statistics count exactly those bits.
//! 5. Round trip: f32 codes decoded from the ids encode back to the same ids.
//!
//! Sizes stay small (≤ 4096 values) so that one run is fast and libFuzzer explores configs and
//! special values rather than big buffers.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vistok::{bf16, f16, Backend, BitOrder, Float, Isa, Lfq, LfqConfig, View, ViewMut};

/// Upper bound on the number of values in `z`.
const MAX_ELEMS: usize = 4096;

/// Reference first (what the others are compared with), then the detected CPU level, then each
/// level this machine has, pinned.
fn backends() -> &'static [Backend] {
    static BACKENDS: OnceLock<Vec<Backend>> = OnceLock::new();
    BACKENDS.get_or_init(|| {
        let pinned = Isa::ALL.into_iter().filter(|i| i.is_available()).map(Backend::CpuIsa);
        [Backend::Reference, Backend::Cpu].into_iter().chain(pinned).collect()
    })
}

/// Values that tend to break sign and norm code: signed zeros, NaNs (quiet, signalling,
/// negative), infinities, extremes, subnormals (which f16 / bf16 may flush to ±0 when rounding).
const SPECIAL_F32: [f32; 18] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    f32::NAN,
    -f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MAX,
    f32::MIN,
    f32::MIN_POSITIVE,
    -f32::MIN_POSITIVE,
    1e-45, // smallest subnormal
    -1e-45,
    1e-40,
    1e30,
    -1e-30,
    65504.0,
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    F32,
    F16,
    BF16,
}

/// One fuzz case. Its `Debug` is what `cargo fuzz fmt lfq <artifact>` prints.
#[derive(Debug)]
struct Case {
    config: LfqConfig,
    tokens: usize,
    input: Dtype,
    /// Codes / normalised output type: f32 or bf16.
    output_bf16: bool,
    /// Bumps one of the ids view's dims (or none): mostly not.
    bump_ids: Option<usize>,
    /// Decode input: `None` decodes the reference's ids; `Some` cycles these (some ≥ 2^d).
    id_pool: Option<Vec<u32>>,
    /// `z` as f32 (rounded to `input` first). Last, so `Debug` shows the shape first.
    values: Vec<f32>,
}

fn any_f32(u: &mut Unstructured<'_>, i: usize) -> Result<f32> {
    if u.is_empty() {
        // Never fall back to all zeros once the bytes run out: mixed signs.
        return Ok(((i * 37 + 11) % 29) as f32 - 14.0);
    }
    Ok(match u.int_in_range(0u8..=15)? {
        0 => f32::from_bits(u.arbitrary()?),
        1..=2 => *u.choose(&SPECIAL_F32)?,
        3..=5 => f32::from(u.arbitrary::<i8>()?) / 64.0,
        6 => f32::from(u.arbitrary::<i8>()?) * 1e-39,
        _ => f32::from(u.arbitrary::<i16>()?) / 256.0,
    })
}

impl<'a> Arbitrary<'a> for Case {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let groups = if u.ratio(1, 32)? { 0 } else { u.int_in_range(1..=6)? };
        // Mostly small d: statistics allocate a 2^d histogram per backend (and per chunk on the
        // cpu backend) for d ≤ 20, which would dominate the run time.
        let bits = match u.int_in_range(0u8..=31)? {
            0 => *u.choose(&[0, 33, 64, u32::MAX])?,
            1..=2 => 32,
            3..=5 => u.int_in_range(13..=31)?,
            _ => u.int_in_range(1..=12)?,
        };
        let order = if u.arbitrary()? { BitOrder::MsbFirst } else { BitOrder::LsbFirst };
        let scale = match u.int_in_range(0u8..=15)? {
            0 => f32::from_bits(u.arbitrary()?),
            1 => *u.choose(&[0.0, -1.0, f32::NAN, f32::INFINITY, 1e-45, 1e-38, f32::MAX])?,
            2..=4 => f32::from(u.int_in_range(1u8..=255)?) / 16.0,
            _ => 1.0,
        };
        let config = LfqConfig::new(groups, bits, order).scale(scale).spherical(u.arbitrary()?);
        let channels = groups.saturating_mul(bits as usize).max(1);
        let tokens = if u.ratio(1, 32)? { 0 } else { u.int_in_range(1..=64)?.min(MAX_ELEMS / channels) };
        let input = *u.choose(&[Dtype::F32, Dtype::F16, Dtype::BF16])?;
        let output_bf16 = u.ratio(1, 4)?;
        let bump_ids = if u.ratio(1, 16)? { Some(u.int_in_range(0..=1)?) } else { None };
        let id_pool = if u.ratio(1, 4)? {
            let n = u.int_in_range(1..=16)?;
            Some((0..n).map(|_| u.arbitrary()).collect::<Result<_>>()?)
        } else {
            None
        };
        let n = if channels * tokens <= MAX_ELEMS { channels * tokens } else { 0 };
        let values = (0..n).map(|i| any_f32(u, i)).collect::<Result<_>>()?;
        Ok(Case { config, tokens, input, output_bf16, bump_ids, id_pool, values })
    }
}

/// Bit-level access and per-backend poison for the output element types.
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

impl Bits for bf16 {
    fn bits(self) -> u32 {
        u32::from(self.to_bits())
    }
    fn poison(backend: usize) -> Self {
        bf16::from_bits(0x7fd1 + backend as u16)
    }
}

/// Invariants 2 and 3 for one operation: the same result everywhere, the same outputs when
/// it succeeded. Returns whether it succeeded.
fn agree<T: Bits>(what: &str, dims_ok: bool, results: &[vistok::Result<()>], outputs: &[&[T]], case: &Case) -> bool {
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
    if reference.is_err() {
        return false;
    }
    let want = outputs[0];
    for (k, got) in outputs.iter().enumerate().skip(1) {
        if let Some(i) = (0..want.len()).find(|&i| want[i].bits() != got[i].bits()) {
            panic!(
                "{what}: {:?} differs from the reference at {i} of {}: reference {:?} (bits {:#x}), got {:?} (bits {:#x})\n{case:?}",
                backends()[k],
                want.len(),
                want[i],
                want[i].bits(),
                got[i],
                got[i].bits(),
            );
        }
    }
    true
}

/// Runs `op` on every backend into a fresh, per-backend poisoned output of `len` elements.
fn each<T: Bits>(
    len: usize,
    mut op: impl FnMut(Backend, &mut [T]) -> vistok::Result<()>,
) -> (Vec<vistok::Result<()>>, Vec<Vec<T>>) {
    let mut outputs: Vec<Vec<T>> = (0..backends().len()).map(|k| vec![T::poison(k); len]).collect();
    let results = backends().iter().zip(&mut outputs).map(|(b, out)| op(*b, out)).collect();
    (results, outputs)
}

fn refs<T>(v: &[Vec<T>]) -> Vec<&[T]> {
    v.iter().map(Vec::as_slice).collect()
}

/// Encode, normalised encode, statistics, decode and the round trip, for input type `T` and
/// codes type `O`.
fn run<T: Float, O: Float + Bits>(case: &Case, plan: &Lfq) {
    let z: Vec<T> = case.values.iter().map(|&v| T::from_f32(v)).collect();
    let n = case.tokens;
    let (c, g) = (plan.channels(), plan.groups());
    let Ok(zv) = View::new(&z, &[n, c]) else {
        // Only when the values were dropped for size (or n·C overflowed).
        return;
    };
    let mut ids_dims = plan.ids_dims(n).to_vec();
    if let Some(i) = case.bump_ids {
        ids_dims[i] += 1;
    }
    let ids_len = ids_dims.iter().product::<usize>();
    let dims_ok = case.bump_ids.is_none();

    // Encode.
    let (results, ids) =
        each::<u32>(ids_len, |b, out| plan.encode(b, zv, ViewMut::new(out, &ids_dims).expect("ids view")));
    let encoded = agree("encode", dims_ok, &results, &refs(&ids), case);

    // Encode with the normalised output.
    let mut normalized: Vec<Vec<O>> = (0..backends().len()).map(|k| vec![O::poison(k); n * c]).collect();
    let mut nids: Vec<Vec<u32>> = (0..backends().len()).map(|k| vec![u32::poison(k); ids_len]).collect();
    let results: Vec<_> = backends()
        .iter()
        .zip(normalized.iter_mut().zip(&mut nids))
        .map(|(b, (u, i))| {
            plan.encode_normalized(
                *b,
                zv,
                ViewMut::new(i, &ids_dims).expect("ids view"),
                ViewMut::new(u, &[n, c]).expect("u view"),
            )
        })
        .collect();
    if agree("encode_normalized ids", dims_ok, &results, &refs(&nids), case) {
        agree("encode_normalized u", dims_ok, &results, &refs(&normalized), case);
        assert!(encoded, "encode failed where encode_normalized succeeded\n{case:?}");
        assert_eq!(nids[0], ids[0], "encode_normalized ids differ from encode's\n{case:?}");
    }
    if !encoded {
        return;
    }
    let ids = &ids[0];

    // Invariant 4: the ids hold the signs.
    let d = plan.bits() as usize;
    let mut ones = vec![0u64; c];
    for (t, &id) in ids.iter().enumerate() {
        let k = t % g;
        assert!((id as u64) < plan.codebook_size(), "id {id} ≥ 2^{d}\n{case:?}");
        for j in 0..d {
            let shift = match plan.order() {
                BitOrder::MsbFirst => d - 1 - j,
                BitOrder::LsbFirst => j,
            };
            let bit = (id >> shift) & 1 == 1;
            let x = z[t * d + j].to_f32();
            assert_eq!(bit, x > 0.0, "id {t} bit of channel {j}: z = {x:e}\n{case:?}");
            ones[k * d + j] += u64::from(bit);
        }
    }

    // Statistics.
    let stats: Vec<_> = backends().iter().map(|b| plan.statistics(*b, View::new(ids, &[n, g]).unwrap())).collect();
    for (k, s) in stats.iter().enumerate() {
        let s = s.as_ref().unwrap_or_else(|e| panic!("statistics on {:?}: {e}\n{case:?}", backends()[k]));
        assert_eq!(s, stats[0].as_ref().unwrap(), "statistics on {:?}\n{case:?}", backends()[k]);
    }
    let s = stats[0].as_ref().unwrap();
    assert_eq!((s.tokens, &s.ones), (n, &ones), "statistics\n{case:?}");
    if let Some(h) = &s.histogram {
        assert_eq!(h.iter().sum::<u64>(), (n * g) as u64, "histogram total\n{case:?}");
    }

    // Decode the ids (or the pool) into O codes on every backend.
    let pool: Vec<u32>;
    let dec_ids: &[u32] = match &case.id_pool {
        None => ids,
        Some(p) => {
            pool = (0..n * g).map(|i| p[i % p.len()]).collect();
            &pool
        }
    };
    let iv = View::new(dec_ids, &[n, g]).unwrap();
    let (results, codes) = each::<O>(n * c, |b, out| plan.decode(b, iv, ViewMut::new(out, &[n, c]).unwrap()));
    let decoded = agree("decode", true, &results, &refs(&codes), case);
    let valid = dec_ids.iter().all(|&id| (id as u64) < plan.codebook_size());
    assert_eq!(decoded, valid, "decode of ids {} 2^{d}: {:?}\n{case:?}", if valid { "<" } else { "≥" }, results[0]);

    // Invariant 5: f32 codes of the ids encode back to the ids.
    let mut codes = vec![f32::NAN; n * c];
    plan.decode(Backend::Cpu, View::new(ids, &[n, g]).unwrap(), ViewMut::new(&mut codes, &[n, c]).unwrap())
        .expect("decode of encoded ids");
    let mut again = vec![u32::MAX; n * g];
    plan.encode(Backend::Cpu, View::new(&codes, &[n, c]).unwrap(), ViewMut::new(&mut again, &[n, g]).unwrap())
        .expect("encode of codes");
    assert_eq!(&again, ids, "encode(decode(ids)) != ids\n{case:?}");
}

fn with_output<T: Float>(case: &Case, plan: &Lfq) {
    if case.output_bf16 {
        run::<T, bf16>(case, plan)
    } else {
        run::<T, f32>(case, plan)
    }
}

fuzz_target!(|case: Case| {
    let Ok(plan) = Lfq::new(&case.config) else { return };
    match case.input {
        Dtype::F32 => with_output::<f32>(&case, &plan),
        Dtype::F16 => with_output::<f16>(&case, &plan),
        Dtype::BF16 => with_output::<bf16>(&case, &plan),
    }
});
