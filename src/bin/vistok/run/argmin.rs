//! `vistok run argmin`: vectors .npy → nearest codebook entry ids .npy (optionally the
//! distances), or with `--lookup` ids → codebook entries.

use std::ffi::OsString;

use lexopt::Parser;
use vistok::argmin::{Codebook, Metric};
use vistok::{Float, View, ViewMut};

use super::args::{distinct_outputs, next, value, Next, QuantFlags};
use super::buf::{self, zeroed, Buf};
use super::exec::{lib_err, Where};
use super::gpu::{self, Dev};
use super::lfq::zeroed_ids;
use super::npy;
use super::output::Pending;

pub const HELP: &str = "\
vistok run argmin: nearest codebook entry of every vector, or ids -> entries

usage: vistok run argmin --codebook E.npy [--metric l2|cosine] [--dist DIST.npy]
                         [--backend reference|cpu|cuda [--tensor-cores]] [--dtype f32|f16|bf16]
                         [--ids-dtype u4|i4|i8] X.npy OUT_IDS.npy
       vistok run argmin --lookup --codebook E.npy [--dtype f32|f16|bf16] IDS.npy OUT.npy

X     vectors [..., D] (<f4 or <f2). NaN or +-inf is an error naming the first (x[n, i]).
E     codebook [K, D] (<f4 or <f2), converted to the dtype of X (or --dtype).
IDS   [...]: index of the nearest entry per vector. l2: least ||x - e||^2; cosine: greatest
      x.e / (|x| |e|) (a zero-norm vector has cosine 0 with everything). Ties go to the lowest
      index. The cpu backend computes in f32 with a fixed FMA order (see vistok::argmin); the
      reference in f64: they may differ only at near-ties.
DIST  [...] f32: the distance of the chosen entry (||x - e||^2, or 1 - cos).

  --codebook E.npy     the codebook (required)
  --metric M           l2 (default) | cosine
  --dist DIST.npy      also write the distances
  --lookup             read ids (<u4, <i4 or <i8; each below K), write the entries [..., D]
  --backend B          reference | cpu | cuda (default cpu; cuda: GPU 0, needs a vistok
                       built with --features cuda; the exact f32 path: ids and distances
                       equal the cpu's)
  --tensor-cores       cuda, f16 / bf16: search on tensor cores (mma.sync; wgmma on an H100 /
                       H200 for 64 <= D <= 256); ids equal the reference's up to near-ties,
                       distances are the cpu formula's for the chosen entry
  --dtype D            the dtype X and E are rounded to first (default: X's own); with
                       --lookup, the dtype of the entries written (default: E's own)
  --ids-dtype T        u4 | i4 | i8: how ids are written (default u4)
  -h, --help           this help

bf16 is written as <f4 holding the bf16 values exactly. Outputs are written under temporary
names and renamed when complete: a failed run leaves none of them.
";

pub fn main(args: Vec<OsString>) -> Result<(), String> {
    run(args).map_err(|e| format!("run argmin: {e}"))
}

fn run(args: Vec<OsString>) -> Result<(), String> {
    let mut p = Parser::from_args(args);
    let mut q = QuantFlags::new();
    let (mut codebook, mut metric, mut dist, mut lookup, mut tc) = (None, Metric::L2, None, false, false);
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
        // --decode and --codes belong to the quantizers, not here.
        if !matches!(name.as_str(), "decode" | "codes") && q.take(&mut p, &name)? {
            continue;
        }
        match name.as_str() {
            "codebook" => codebook = Some(std::path::PathBuf::from(value(&mut p, &name)?)),
            "metric" => {
                metric = match value(&mut p, &name)?.as_str() {
                    "l2" | "L2" => Metric::L2,
                    "cosine" | "cos" => Metric::Cosine,
                    s => return Err(format!("--metric: expected l2 or cosine, got '{s}'")),
                }
            }
            "dist" => dist = Some(std::path::PathBuf::from(value(&mut p, &name)?)),
            "lookup" => lookup = true,
            "tensor-cores" => tc = true,
            _ => return Err(format!("unknown flag --{name} (see --help)")),
        }
    }
    let (input, output) = q.in_out(false)?;
    let output = output.expect("in_out(false) gives two paths");
    let codebook = codebook.ok_or("--codebook E.npy is required")?;
    if lookup && dist.is_some() {
        return Err("--dist is for the search, not with --lookup".into());
    }
    distinct_outputs(&[("OUT", Some(&output)), ("--dist", dist.as_ref())])?;
    let backend = Where::of(q.backend);
    if tc && (lookup || backend != Where::Gpu) {
        return Err("--tensor-cores is for the search with --backend cuda".into());
    }

    let e = npy::read(&codebook)?;
    let [k, d] = e.shape[..] else {
        return Err(format!("{}: codebook has shape {:?}; expected [K, D]", codebook.display(), e.shape));
    };
    let array = npy::read(&input)?;
    let out = Pending::create(&output)?;
    let dist_out = dist.as_deref().map(Pending::create).transpose()?;

    if lookup {
        let ids = buf::ids(array.data).map_err(|e| format!("{}: {e}", input.display()))?;
        let e = Buf::tokens(e.data, q.dtype)?;
        let mut shape = array.shape.clone();
        shape.push(d);
        let entries = match &e {
            Buf::F32(v) => Buf::F32(lookup_as(backend, v, [k, d], metric, &ids, &array.shape)?),
            Buf::F16(v) => Buf::F16(lookup_as(backend, v, [k, d], metric, &ids, &array.shape)?),
            Buf::BF16(v) => Buf::BF16(lookup_as(backend, v, [k, d], metric, &ids, &array.shape)?),
            Buf::U8(_) => unreachable!("Buf::tokens gives floats"),
        };
        return out.commit(|w| entries.write_npy(w, &shape));
    }

    if k as u64 > q.ids_dtype.max_codebook() {
        return Err(format!("ids of a codebook of {k} entries do not all fit --ids-dtype i4 (use u4 or i8)"));
    }
    let x = Buf::tokens(array.data, q.dtype)?;
    // The codebook in the same element type as x.
    let e = Buf::tokens(e.data, Some(x.float_type()))?;
    let want_dist = dist_out.is_some();
    let (ids, distances) = match (&x, &e) {
        (Buf::F32(x), Buf::F32(e)) => search(backend, e, [k, d], metric, x, &array.shape, want_dist, tc)?,
        (Buf::F16(x), Buf::F16(e)) => search(backend, e, [k, d], metric, x, &array.shape, want_dist, tc)?,
        (Buf::BF16(x), Buf::BF16(e)) => search(backend, e, [k, d], metric, x, &array.shape, want_dist, tc)?,
        _ => unreachable!("x and the codebook were converted to one float type"),
    };
    let lead = &array.shape[..array.shape.len() - 1];
    out.commit(|w| buf::write_ids(w, lead, &ids, q.ids_dtype))?;
    if let (Some(o), Some(dist)) = (dist_out, distances) {
        o.commit(|w| npy::write(w, lead, &dist))?;
    }
    Ok(())
}

fn prepare<T: Float>(e: &[T], [k, d]: [usize; 2], metric: Metric) -> Result<Codebook<T>, String> {
    Codebook::new(View::new(e, &[k, d]).map_err(lib_err)?, metric).map_err(lib_err)
}

/// x `[..., D]` → (ids `[...]`, distances `[...]` if asked for); `tc`: on tensor cores (cuda).
#[allow(clippy::too_many_arguments)]
fn search<T: Float + Dev>(
    backend: Where,
    e: &[T],
    kd: [usize; 2],
    metric: Metric,
    x: &[T],
    shape: &[usize],
    want_dist: bool,
    tc: bool,
) -> Result<(Vec<u32>, Option<Vec<f32>>), String> {
    let cb = prepare(e, kd, metric)?;
    if shape.len() < 2 || shape[shape.len() - 1] != kd[1] {
        return Err(format!("x has shape {shape:?}; expected [..., {}] (the codebook's D)", kd[1]));
    }
    let lead = &shape[..shape.len() - 1];
    let backend = match backend {
        Where::Host(b) => b,
        Where::Gpu => return gpu::argmin(&cb, x, want_dist, tc),
    };
    let n: usize = lead.iter().product();
    let mut ids = zeroed_ids(n)?;
    let mut dist = if want_dist { Some(zeroed::<f32>(n)?) } else { None };
    let dv = match dist.as_mut() {
        Some(v) => Some(ViewMut::new(v, lead).map_err(lib_err)?),
        None => None,
    };
    let xv = View::new(x, shape).map_err(lib_err)?;
    cb.argmin(backend, xv, ViewMut::new(&mut ids, lead).map_err(lib_err)?, dv).map_err(lib_err)?;
    Ok((ids, dist))
}

/// ids `[...]` → entries `[..., D]`, in the codebook's element type.
fn lookup_as<T: Float + Dev>(
    backend: Where,
    e: &[T],
    kd: [usize; 2],
    metric: Metric,
    ids: &[u32],
    shape: &[usize],
) -> Result<Vec<T>, String> {
    let cb = prepare(e, kd, metric)?;
    let backend = match backend {
        Where::Host(b) => b,
        Where::Gpu => return gpu::lookup(&cb, ids),
    };
    let mut out_shape = shape.to_vec();
    out_shape.push(kd[1]);
    let mut out = zeroed::<T>(ids.len() * kd[1])?;
    let iv = View::new(ids, shape).map_err(lib_err)?;
    cb.lookup(backend, iv, ViewMut::new(&mut out, &out_shape).map_err(lib_err)?).map_err(lib_err)?;
    Ok(out)
}
