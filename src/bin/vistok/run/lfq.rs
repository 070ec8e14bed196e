//! `vistok run lfq`: tokens .npy → LFQ / group-wise LFQ / BSQ ids .npy (optionally codes, the
//! normalised input and usage statistics), or with `--decode` ids → codes.

use std::ffi::OsString;
use std::path::PathBuf;

use lexopt::Parser;
use vistok::{BitOrder, Float, Lfq, LfqConfig, LfqStats, View, ViewMut};

use super::args::{distinct_outputs, next, number, positive, value, FloatType, Next, QuantFlags};
use super::buf::{self, zeroed, Buf};
use super::exec::{lib_err, Where};
use super::gpu::{self, Dev};
use super::npy;
use super::output::Pending;

pub const HELP: &str = "\
vistok run lfq: tokens .npy -> LFQ / group-wise LFQ / BSQ ids .npy, or ids -> codes

usage: vistok run lfq --order msb|lsb [--groups G] [--bits D] [--scale S] [--spherical]
                      [--codes Q.npy] [--normalized U.npy] [--stats] [--histogram H.npy]
                      [--backend reference|cpu|cuda] [--dtype f32|f16|bf16] [--ids-dtype u4|i4|i8]
                      Z.npy OUT_IDS.npy
       vistok run lfq --decode --order msb|lsb --bits D [--groups G] [--scale S] [--spherical]
                      [--stats] [--histogram H.npy] [--backend ..] [--dtype f32|f16|bf16]
                      IDS.npy OUT_CODES.npy

Z     tokens [..., C], channels last (dtype <f4 or <f2); C = G*D channels, group g being
      channels [g*D, (g+1)*D). NaN is an error naming the first (as z[n, c] of z seen as
      [N, C], N the product of the leading dims).
IDS   [..., G] ids (<u4 by default; see --ids-dtype): bit k of a group is z_k > 0, so 0.0 and
      -0.0 give 0. OUT_CODES [..., G*D]: each bit as +v (1) or -v (0), v = S, or S/sqrt(D)
      with --spherical (BSQ).

  --order msb|lsb      the bit order, required (never a default): msb = channel 0 of a group
                       is the most significant bit, id = sum bit_k 2^(D-1-k)
                       (vector-quantize-pytorch's LFQ); lsb = id = sum bit_k 2^k
                       (Open-MAGVIT2, WeTok). --bit-order is the same flag
  --groups G           groups per token (default C / D, or 1 without --bits)
  --bits D             bits per group, 1..=32 (default C / G; required with --decode).
                       Token factorization (Open-MAGVIT2's factorized_bits, e.g. 18 bits as
                       [9, 9]) is --groups 2 --bits 9
  --scale S            codebook scale of the codes, finite and > 0 (default 1)
  --spherical          BSQ: codes are +-S/sqrt(D) (the ids are the same as LFQ's)
  --codes Q.npy        encode: also write the codes of the ids, like Z ([..., C])
  --normalized U.npy   encode: also write z / ||z|| per group ([..., C]; BSQ's input; an
                       all-zero group stays zero)
  --stats              print usage statistics of the ids as JSON on stdout: ones and the
                       frequency of ones per channel and, for D <= 20, a summary of the id
                       histogram (ids used, largest count, entropy in bits, perplexity).
                       With --stats, OUT may be omitted (nothing is written)
  --histogram H.npy    write the id histogram [2^D] (<i8 counts, all groups pooled; D <= 20);
                       OUT may then be omitted too
  --decode             read ids, write codes (IDS.npy OUT_CODES.npy); ids may be <u4, <i4 or
                       <i8 and must be below 2^D
  --backend B          reference | cpu | cuda (default cpu; cuda: GPU 0, needs a vistok
                       built with --features cuda; ids and codes identical to the cpu's;
                       --stats / --histogram are then computed on the cpu from the GPU's
                       ids; --normalized is not on the GPU yet)
  --dtype D            encode: round z to f32 | f16 | bf16 first (default: the file's own)
                       and write codes / normalized in it; decode: the codes' dtype (default
                       f32). f16 is written as <f2, f32 and bf16 as <f4 (bf16 values exactly)
  --ids-dtype T        u4 | i4 | i8: how ids are written (default u4, the library's u32;
                       i8 is what torch indexes with; i4 needs D <= 31)
  -h, --help           this help

Outputs are written under temporary names in their directories and renamed when complete: a
failed run leaves none of them (and existing files untouched).
";

pub fn main(args: Vec<OsString>) -> Result<(), String> {
    run(args).map_err(|e| format!("run lfq: {e}"))
}

/// The flags only lfq has.
#[derive(Default)]
struct Flags {
    groups: Option<usize>,
    bits: Option<u32>,
    order: Option<BitOrder>,
    scale: Option<f32>,
    spherical: bool,
    normalized: Option<PathBuf>,
    stats: bool,
    histogram: Option<PathBuf>,
}

fn run(args: Vec<OsString>) -> Result<(), String> {
    let mut p = Parser::from_args(args);
    let mut q = QuantFlags::new();
    let mut f = Flags::default();
    while let Some(arg) = next(&mut p)? {
        let name = match arg {
            Next::Help => {
                print!("{HELP}");
                return Ok(());
            }
            Next::Path(path) => {
                q.paths.push(path);
                continue;
            }
            Next::Flag(name) => name,
        };
        if q.take(&mut p, &name)? {
            continue;
        }
        match name.as_str() {
            "groups" => f.groups = Some(positive(&name, &value(&mut p, &name)?)?),
            "bits" => f.bits = Some(bits(&value(&mut p, &name)?)?),
            "order" | "bit-order" => f.order = Some(order(&name, &value(&mut p, &name)?)?),
            "scale" => f.scale = Some(number(&name, &value(&mut p, &name)?)?),
            "spherical" => f.spherical = true,
            "normalized" => f.normalized = Some(PathBuf::from(value(&mut p, &name)?)),
            "stats" => f.stats = true,
            "histogram" => f.histogram = Some(PathBuf::from(value(&mut p, &name)?)),
            _ => return Err(format!("unknown flag --{name} (see --help)")),
        }
    }
    let (input, output) = q.in_out(f.stats || f.histogram.is_some())?;
    let order =
        f.order.ok_or("--order msb|lsb is required (msb: vector-quantize-pytorch's LFQ; lsb: Open-MAGVIT2, WeTok)")?;
    if q.decode {
        for (flag, given) in [("--codes", q.codes.is_some()), ("--normalized", f.normalized.is_some())] {
            if given {
                return Err(format!("{flag} is for encoding, not with --decode"));
            }
        }
    }
    distinct_outputs(&[
        ("OUT", output.as_ref()),
        ("--codes", q.codes.as_ref()),
        ("--normalized", f.normalized.as_ref()),
        ("--histogram", f.histogram.as_ref()),
    ])?;
    let backend = Where::of(q.backend);
    if backend == Where::Gpu && f.normalized.is_some() {
        return Err("--normalized is not computed on the GPU yet (use --backend cpu)".into());
    }
    let array = npy::read(&input)?;
    // [..., last]: N tokens of `last` values (C channels, or G ids).
    let Some((&last, lead)) = array.shape.split_last() else {
        return Err(format!("{}: a 0-d array; expected [..., {}]", input.display(), if q.decode { "G" } else { "C" }));
    };
    let n: usize = lead.iter().product();
    let (groups, bits) = if q.decode {
        let bits = f.bits.ok_or("--decode needs --bits (the ids do not say how many bits they hold)")?;
        match f.groups {
            Some(g) if g != last => {
                return Err(format!("--groups {g} but the ids have {last} per token (shape {:?})", array.shape))
            }
            _ => (last, bits),
        }
    } else {
        groups_bits(f.groups, f.bits, last)?
    };
    let scale = f.scale.unwrap_or(1.0);
    let plan = Lfq::new(&LfqConfig::new(groups, bits, order).scale(scale).spherical(f.spherical)).map_err(lib_err)?;
    if plan.codebook_size() > q.ids_dtype.max_codebook() {
        return Err(format!("ids of D = {bits} bits do not all fit --ids-dtype i4 (use u4 or i8)"));
    }
    if f.histogram.is_some() && bits > vistok::lfq::HISTOGRAM_MAX_BITS {
        return Err(format!("--histogram needs D <= {} (D = {bits})", vistok::lfq::HISTOGRAM_MAX_BITS));
    }
    let mut ids_shape = lead.to_vec();
    ids_shape.push(groups);
    let mut codes_shape = lead.to_vec();
    codes_shape.push(plan.channels());

    let pending = |p: &Option<PathBuf>| p.as_deref().map(Pending::create).transpose();
    let (out, codes_out, norm_out, hist_out) =
        (pending(&output)?, pending(&q.codes)?, pending(&f.normalized)?, pending(&f.histogram)?);

    let (ids, codes, normalized) = if q.decode {
        let ids = buf::ids(array.data).map_err(|e| format!("{}: {e}", input.display()))?;
        let codes = decode(backend, &plan, &ids, n, q.dtype.unwrap_or(FloatType::F32))?;
        (ids, Some(codes), None)
    } else {
        let z = Buf::tokens(array.data, q.dtype)?;
        let (ids, normalized) = encode(backend, &plan, &z, n, f.normalized.is_some())?;
        let codes = match q.codes {
            Some(_) => Some(decode(backend, &plan, &ids, n, z.float_type())?),
            None => None,
        };
        (ids, codes, normalized)
    };
    let stats = if f.stats || f.histogram.is_some() {
        let view = View::new(&ids, &plan.ids_dims(n)).map_err(lib_err)?;
        Some(plan.statistics(backend.host(), view).map_err(lib_err)?)
    } else {
        None
    };

    if let Some(o) = out {
        if q.decode {
            let codes = codes.as_ref().ok_or("internal: no codes")?;
            o.commit(|w| codes.write_npy(w, &codes_shape))?;
        } else {
            o.commit(|w| buf::write_ids(w, &ids_shape, &ids, q.ids_dtype))?;
        }
    }
    if let (Some(o), Some(codes)) = (codes_out, &codes) {
        o.commit(|w| codes.write_npy(w, &codes_shape))?;
    }
    if let (Some(o), Some(u)) = (norm_out, &normalized) {
        o.commit(|w| u.write_npy(w, &codes_shape))?;
    }
    if let (Some(o), Some(h)) = (hist_out, stats.as_ref().and_then(|s| s.histogram.as_ref())) {
        let h: Vec<i64> = h.iter().map(|&c| c as i64).collect();
        o.commit(|w| npy::write(w, &[h.len()], &h))?;
    }
    if let (true, Some(s)) = (f.stats, &stats) {
        println!("{}", stats_json(&plan, s));
    }
    Ok(())
}

fn bits(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(d) if (1..=32).contains(&d) => Ok(d),
        _ => Err(format!("--bits: expected an integer in 1..=32, got '{s}'")),
    }
}

fn order(name: &str, s: &str) -> Result<BitOrder, String> {
    match s {
        "msb" => Ok(BitOrder::MsbFirst),
        "lsb" => Ok(BitOrder::LsbFirst),
        _ => Err(format!("--{name}: expected msb or lsb, got '{s}'")),
    }
}

/// G and D from the flags and the channel count C.
fn groups_bits(groups: Option<usize>, bits: Option<u32>, c: usize) -> Result<(usize, u32), String> {
    let d = |d: usize| {
        u32::try_from(d)
            .ok()
            .filter(|d| (1..=32).contains(d))
            .ok_or_else(|| format!("D = {d} bits per group is not in 1..=32 (use --groups / --bits)"))
    };
    match (groups, bits) {
        (Some(g), Some(b)) if g.checked_mul(b as usize) != Some(c) => {
            Err(format!("--groups {g} x --bits {b} is not the {c} channels of z (its last dimension)"))
        }
        (Some(g), Some(b)) => Ok((g, b)),
        (Some(g), None) if c.is_multiple_of(g) => Ok((g, d(c / g)?)),
        (Some(g), None) => Err(format!("--groups {g} does not divide the {c} channels of z")),
        (None, Some(b)) if c.is_multiple_of(b as usize) && c > 0 => Ok((c / b as usize, b)),
        (None, Some(b)) => Err(format!("--bits {b} does not divide the {c} channels of z")),
        (None, None) => Ok((1, d(c)?)),
    }
}

/// z → ids (and z / ‖z‖ per group, in z's type, when `normalized`).
fn encode(backend: Where, plan: &Lfq, z: &Buf, n: usize, normalized: bool) -> Result<(Vec<u32>, Option<Buf>), String> {
    Ok(match z {
        Buf::F32(v) => encode_as(backend, plan, v, n, normalized).map(|(i, u)| (i, u.map(Buf::F32)))?,
        Buf::F16(v) => encode_as(backend, plan, v, n, normalized).map(|(i, u)| (i, u.map(Buf::F16)))?,
        Buf::BF16(v) => encode_as(backend, plan, v, n, normalized).map(|(i, u)| (i, u.map(Buf::BF16)))?,
        Buf::U8(_) => return Err("z must be floats, not u8".into()),
    })
}

fn encode_as<T: Float + Dev>(
    backend: Where,
    plan: &Lfq,
    z: &[T],
    n: usize,
    normalized: bool,
) -> Result<(Vec<u32>, Option<Vec<T>>), String> {
    let backend = match backend {
        Where::Host(b) => b,
        // The caller rejected --normalized for the GPU.
        Where::Gpu => return Ok((gpu::lfq_encode(plan, z)?, None)),
    };
    let mut ids = zeroed_ids(n * plan.groups())?;
    let zv = View::new(z, &plan.codes_dims(n)).map_err(lib_err)?;
    let iv = ViewMut::new(&mut ids, &plan.ids_dims(n)).map_err(lib_err)?;
    if !normalized {
        plan.encode(backend, zv, iv).map_err(lib_err)?;
        return Ok((ids, None));
    }
    let mut u = zeroed::<T>(z.len())?;
    let uv = ViewMut::new(&mut u, &plan.codes_dims(n)).map_err(lib_err)?;
    plan.encode_normalized(backend, zv, iv, uv).map_err(lib_err)?;
    Ok((ids, Some(u)))
}

/// ids → codes of type `out`.
fn decode(backend: Where, plan: &Lfq, ids: &[u32], n: usize, out: FloatType) -> Result<Buf, String> {
    fn codes<O: Float + Dev>(backend: Where, plan: &Lfq, ids: &[u32], n: usize) -> Result<Vec<O>, String> {
        let backend = match backend {
            Where::Host(b) => b,
            Where::Gpu => return gpu::lfq_decode(plan, ids),
        };
        let mut codes = zeroed::<O>(n * plan.channels())?;
        let iv = View::new(ids, &plan.ids_dims(n)).map_err(lib_err)?;
        plan.decode(backend, iv, ViewMut::new(&mut codes, &plan.codes_dims(n)).map_err(lib_err)?).map_err(lib_err)?;
        Ok(codes)
    }
    Ok(match out {
        FloatType::F32 => Buf::F32(codes(backend, plan, ids, n)?),
        FloatType::F16 => Buf::F16(codes(backend, plan, ids, n)?),
        FloatType::BF16 => Buf::BF16(codes(backend, plan, ids, n)?),
    })
}

/// A zero-filled id vector, or an error instead of an abort when memory is short.
pub fn zeroed_ids(n: usize) -> Result<Vec<u32>, String> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| format!("out of memory allocating {n} ids"))?;
    v.resize(n, 0);
    Ok(v)
}

/// The `--stats` report.
fn stats_json(plan: &Lfq, s: &LfqStats) -> serde_json::Value {
    let histogram = s.histogram.as_ref().map(|h| {
        let total: u64 = h.iter().sum();
        let used = h.iter().filter(|&&c| c > 0).count();
        // Entropy of the empirical id distribution, in bits; its perplexity is 2^H.
        let entropy: f64 = h
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / total as f64;
                -p * p.log2()
            })
            .sum();
        serde_json::json!({
            "size": h.len(),
            "ids": total,
            "used": used,
            "utilization": used as f64 / h.len() as f64,
            "max_count": h.iter().max().copied().unwrap_or(0),
            "entropy_bits": entropy,
            "perplexity": entropy.exp2(),
        })
    });
    serde_json::json!({
        "tokens": s.tokens,
        "groups": plan.groups(),
        "bits": plan.bits(),
        "order": match plan.order() { BitOrder::MsbFirst => "msb", BitOrder::LsbFirst => "lsb" },
        "ones": s.ones,
        "bit_frequency": s.bit_frequency(),
        "histogram": histogram,
    })
}
