//! `vistok run fsq`: tokens .npy → FSQ ids .npy (optionally the codes), or with `--decode`
//! ids → codes.

use std::ffi::OsString;

use lexopt::Parser;
use vistok::{Float, Fsq, View, ViewMut};

use super::args::{distinct_outputs, next, parse_u32_list, value, FloatType, Next, QuantFlags};
use super::buf::{self, zeroed, Buf};
use super::exec::{lib_err, Where};
use super::gpu::{self, Dev};
use super::lfq::zeroed_ids;
use super::npy;
use super::output::Pending;

pub const HELP: &str = "\
vistok run fsq: tokens .npy -> FSQ ids .npy, or ids -> codes

usage: vistok run fsq --levels L0,L1,... [--codes Q.npy] [--backend reference|cpu|cuda]
                      [--dtype f32|f16|bf16] [--ids-dtype u4|i4|i8] Z.npy OUT_IDS.npy
       vistok run fsq --decode --levels L0,L1,... [--backend ..] [--dtype f32|f16|bf16]
                      IDS.npy OUT_CODES.npy

Z     tokens [..., D], dimensions last (dtype <f4 or <f2), D = the number of levels. NaN is
      an error naming the first (as z[n, i] of z seen as [N, D]); +-inf saturate.
IDS   [...] ids, one per token (<u4 by default; see --ids-dtype). vector-quantize-pytorch's
      FSQ: per dimension, with h = (L-1)(1+1e-3)/2 and o = 0.5 for even L (else 0),
      level = round_half_even(tanh(z + atanh(o/h)) h - o) + floor(L/2), and
      id = sum level_i basis_i, basis_i = L_0 ... L_(i-1) (dimension 0 least significant).
      The cpu backend evaluates tanh in f32 (vistok::fsq::tanh); the reference in f64: an
      id may differ between them only where a value is within a few ulps of a .5 boundary.
OUT_CODES [..., D]: (level - floor(L/2)) / floor(L/2) per dimension.

  --levels L0,L1,...   levels per dimension, each >= 2, product <= 2^32 (required)
  --codes Q.npy        encode: also write the codes of the ids ([..., D])
  --decode             read ids, write codes; ids may be <u4, <i4 or <i8 and must be below
                       the product of the levels
  --backend B          reference | cpu | cuda (default cpu; cuda: GPU 0, needs a vistok
                       built with --features cuda; ids identical to the cpu's)
  --dtype D            encode: round z to f32 | f16 | bf16 first (default: the file's own)
                       and write codes in it; decode: the codes' dtype (default f32). f16 is
                       written as <f2, f32 and bf16 as <f4 (bf16 values exactly)
  --ids-dtype T        u4 | i4 | i8: how ids are written (default u4, the library's u32;
                       i8 is what torch indexes with; i4 needs a product of levels <= 2^31)
  -h, --help           this help

Outputs are written under temporary names in their directories and renamed when complete: a
failed run leaves none of them (and existing files untouched).
";

pub fn main(args: Vec<OsString>) -> Result<(), String> {
    run(args).map_err(|e| format!("run fsq: {e}"))
}

fn run(args: Vec<OsString>) -> Result<(), String> {
    let mut p = Parser::from_args(args);
    let mut q = QuantFlags::new();
    let mut levels = None;
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
            "levels" => levels = Some(parse_u32_list(&name, &value(&mut p, &name)?)?),
            _ => return Err(format!("unknown flag --{name} (see --help)")),
        }
    }
    let (input, output) = q.in_out(false)?;
    let levels = levels.ok_or("--levels L0,L1,... is required (e.g. --levels 8,8,8,5,5,5)")?;
    if q.decode && q.codes.is_some() {
        return Err("--codes is for encoding, not with --decode".into());
    }
    distinct_outputs(&[("OUT", output.as_ref()), ("--codes", q.codes.as_ref())])?;
    let backend = Where::of(q.backend);
    let plan = Fsq::new(&levels).map_err(lib_err)?;
    if plan.codebook_size() > q.ids_dtype.max_codebook() {
        return Err(format!(
            "ids of a codebook of {} do not all fit --ids-dtype i4 (use u4 or i8)",
            plan.codebook_size()
        ));
    }
    let array = npy::read(&input)?;
    let d = plan.dim();
    // Encode: z [..., D] → ids [...]. Decode: ids [...] → codes [..., D].
    let (ids_shape, codes_shape) = if q.decode {
        let mut codes = array.shape.clone();
        codes.push(d);
        (array.shape.clone(), codes)
    } else {
        match array.shape.split_last() {
            Some((&last, lead)) if last == d => (lead.to_vec(), array.shape.clone()),
            _ => {
                return Err(format!(
                    "{}: z has shape {:?}; expected [..., {d}] ({d} levels given)",
                    input.display(),
                    array.shape
                ))
            }
        }
    };
    let n: usize = ids_shape.iter().product();

    let out = output.as_deref().map(Pending::create).transpose()?;
    let codes_out = q.codes.as_deref().map(Pending::create).transpose()?;
    if q.decode {
        let ids = buf::ids(array.data).map_err(|e| format!("{}: {e}", input.display()))?;
        let codes = decode(backend, &plan, &ids, q.dtype.unwrap_or(FloatType::F32))?;
        if let Some(o) = out {
            o.commit(|w| codes.write_npy(w, &codes_shape))?;
        }
        return Ok(());
    }
    let z = Buf::tokens(array.data, q.dtype)?;
    let ids = encode(backend, &plan, &z, n)?;
    let codes = match codes_out {
        Some(_) => Some(decode(backend, &plan, &ids, z.float_type())?),
        None => None,
    };
    if let Some(o) = out {
        o.commit(|w| buf::write_ids(w, &ids_shape, &ids, q.ids_dtype))?;
    }
    if let (Some(o), Some(codes)) = (codes_out, &codes) {
        o.commit(|w| codes.write_npy(w, &codes_shape))?;
    }
    Ok(())
}

/// z `[N, D]` → ids `[N]`.
fn encode(backend: Where, plan: &Fsq, z: &Buf, n: usize) -> Result<Vec<u32>, String> {
    fn ids<T: Float + Dev>(backend: Where, plan: &Fsq, z: &[T], n: usize) -> Result<Vec<u32>, String> {
        let backend = match backend {
            Where::Host(b) => b,
            Where::Gpu => return gpu::fsq_encode(plan, z),
        };
        let mut ids = zeroed_ids(n)?;
        let zv = View::new(z, &[n, plan.dim()]).map_err(lib_err)?;
        plan.encode(backend, zv, ViewMut::new(&mut ids, &[n]).map_err(lib_err)?).map_err(lib_err)?;
        Ok(ids)
    }
    match z {
        Buf::F32(v) => ids(backend, plan, v, n),
        Buf::F16(v) => ids(backend, plan, v, n),
        Buf::BF16(v) => ids(backend, plan, v, n),
        Buf::U8(_) => Err("z must be floats, not u8".into()),
    }
}

/// ids `[N]` → codes `[N, D]` of type `out`.
fn decode(backend: Where, plan: &Fsq, ids: &[u32], out: FloatType) -> Result<Buf, String> {
    fn codes<O: Float + Dev>(backend: Where, plan: &Fsq, ids: &[u32]) -> Result<Vec<O>, String> {
        let backend = match backend {
            Where::Host(b) => b,
            Where::Gpu => return gpu::fsq_decode(plan, ids),
        };
        let n = ids.len();
        let mut codes = zeroed::<O>(n * plan.dim())?;
        let iv = View::new(ids, &[n]).map_err(lib_err)?;
        plan.decode(backend, iv, ViewMut::new(&mut codes, &[n, plan.dim()]).map_err(lib_err)?).map_err(lib_err)?;
        Ok(codes)
    }
    Ok(match out {
        FloatType::F32 => Buf::F32(codes(backend, plan, ids)?),
        FloatType::F16 => Buf::F16(codes(backend, plan, ids)?),
        FloatType::BF16 => Buf::BF16(codes(backend, plan, ids)?),
    })
}
