//! `vistok run merge`: ToMe bipartite soft matching on a metric .npy, then the merge of the
//! tokens (the metric itself, or `--x`), optionally the assignment map and merged sizes.

use std::ffi::OsString;
use std::path::PathBuf;

use lexopt::Parser;
use vistok::merge::{MatchConfig, MergeMode, MergePlan};
use vistok::{Float, View, ViewMut};

use super::args::{distinct_outputs, next, parse_backend, parse_float_type, value, BackendChoice, FloatType, Next};
use super::buf::{zeroed, Buf};
use super::exec::{lib_err, Where};
use super::gpu::{self, Dev};
use super::npy;
use super::output::Pending;

pub const HELP: &str = "\
vistok run merge: ToMe token merging (bipartite soft matching), one layer

usage: vistok run merge --r R [--class-token] [--distill-token] [--keep-order]
                        [--mode mean|sum|wavg] [--x X.npy] [--sizes S.npy]
                        [--out-sizes S_OUT.npy] [--slots SLOTS.npy]
                        [--backend reference|cpu|cuda [--tensor-cores]] [--dtype f32|f16|bf16]
                        METRIC.npy OUT.npy

METRIC  [B, N, Cm] (<f4 or <f2): what tokens are matched on (ToMe: the keys averaged over
        heads). Cosine similarity of even (A) against odd (B) tokens; the r most similar A
        tokens merge into their best B token. Ties: lowest B index, then lowest A index.
OUT     [B, N - r, C]: the merged tokens (X, or METRIC when --x is not given), in ToMe's
        order (kept A tokens, then B tokens), or the original order with --keep-order.

  --r R             tokens to remove (clamped to (N - protected) / 2)
  --class-token     token 0 is never merged
  --distill-token   token 1 is never a merge target (DeiT)
  --keep-order      output tokens in their original order
  --mode M          mean (default, ToMe's) | sum | wavg (size-weighted average, ToMe's
                    merge_wavg, with --sizes [B, N] f32, default 1)
  --x X.npy         the tokens to merge [B, N, C] (default: METRIC itself)
  --sizes S.npy     wavg: token sizes [B, N] (<f4, positive)
  --out-sizes S.npy wavg: write the merged sizes [B, N - r] (f32)
  --slots S.npy     write the assignment map [B, N] (<u4): the output slot of every token
  --backend B       reference | cpu | cuda (default cpu; cuda: GPU 0, needs a vistok built
                    with --features cuda; the same plan and values as the cpu)
  --tensor-cores    cuda, f16 / bf16 METRIC: the similarity on tensor cores (mma.sync); the
                    plan equals the reference's up to near-ties
  --dtype D         round METRIC and X to f32 | f16 | bf16 first (default: each file's own)
  -h, --help        this help

bf16 is written as <f4 holding the bf16 values exactly. Outputs are written under temporary
names and renamed when complete: a failed run leaves none of them.
";

pub fn main(args: Vec<OsString>) -> Result<(), String> {
    run(args).map_err(|e| format!("run merge: {e}"))
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Mean,
    Sum,
    Wavg,
}

fn run(args: Vec<OsString>) -> Result<(), String> {
    let mut p = Parser::from_args(args);
    let (mut backend, mut dtype, mut paths) = (BackendChoice::Cpu, None::<FloatType>, vec![]);
    let (mut r, mut config, mut tc) = (None, MatchConfig::new(0), false);
    let (mut mode, mut x_path, mut sizes_path, mut out_sizes, mut slots) = (Mode::Mean, None, None, None, None);
    while let Some(arg) = next(&mut p)? {
        let name = match arg {
            Next::Help => {
                print!("{HELP}");
                return Ok(());
            }
            Next::Path(path) => {
                paths.push(path);
                continue;
            }
            Next::Flag(name) => name,
        };
        let path = |p: &mut Parser| value(p, &name).map(PathBuf::from);
        match name.as_str() {
            "backend" => backend = parse_backend(&value(&mut p, &name)?)?,
            "dtype" => dtype = Some(parse_float_type(&name, &value(&mut p, &name)?)?),
            "r" => {
                let v = value(&mut p, &name)?;
                r = Some(v.trim().parse::<usize>().map_err(|_| format!("--r: expected a count, got '{v}'"))?);
            }
            "class-token" => config = config.class_token(true),
            "distill-token" => config = config.distill_token(true),
            "keep-order" => config = config.keep_original_order(true),
            "mode" => {
                mode = match value(&mut p, &name)?.as_str() {
                    "mean" => Mode::Mean,
                    "sum" => Mode::Sum,
                    "wavg" => Mode::Wavg,
                    s => return Err(format!("--mode: expected mean, sum or wavg, got '{s}'")),
                }
            }
            "x" => x_path = Some(path(&mut p)?),
            "sizes" => sizes_path = Some(path(&mut p)?),
            "out-sizes" => out_sizes = Some(path(&mut p)?),
            "slots" => slots = Some(path(&mut p)?),
            "tensor-cores" => tc = true,
            _ => return Err(format!("unknown flag --{name} (see --help)")),
        }
    }
    let [metric_path, out_path] = &paths[..] else {
        return Err(format!("expected two paths, METRIC.npy OUT.npy, got {} (see --help)", paths.len()));
    };
    config.r = r.ok_or("--r R is required")?;
    if mode != Mode::Wavg && (sizes_path.is_some() || out_sizes.is_some()) {
        return Err("--sizes and --out-sizes go with --mode wavg".into());
    }
    distinct_outputs(&[("OUT", Some(out_path)), ("--out-sizes", out_sizes.as_ref()), ("--slots", slots.as_ref())])?;
    let backend = Where::of(backend);
    if tc && backend != Where::Gpu {
        return Err("--tensor-cores is for --backend cuda".into());
    }

    let metric = npy::read(metric_path)?;
    let mshape = metric.shape.clone();
    let metric = Buf::tokens(metric.data, dtype)?;
    let x = match &x_path {
        Some(xp) => {
            let a = npy::read(xp)?;
            Some((Buf::tokens(a.data, dtype)?, a.shape))
        }
        None => None,
    };
    let sizes = match &sizes_path {
        Some(sp) => {
            let a = npy::read(sp)?;
            match a.data {
                npy::NpyData::F32(d) => Some((d, a.shape)),
                d => return Err(format!("{}: sizes dtype {} (expected <f4)", sp.display(), d.descr())),
            }
        }
        None => None,
    };
    let out = Pending::create(out_path)?;
    let sizes_out = out_sizes.as_deref().map(Pending::create).transpose()?;
    let slots_out = slots.as_deref().map(Pending::create).transpose()?;

    let plan = match &metric {
        Buf::F32(m) => plan_of(backend, m, &mshape, &config, tc)?,
        Buf::F16(m) => plan_of(backend, m, &mshape, &config, tc)?,
        Buf::BF16(m) => plan_of(backend, m, &mshape, &config, tc)?,
        Buf::U8(_) => unreachable!("Buf::tokens gives floats"),
    };
    let (xb, xs) = match &x {
        Some((b, s)) => (b, &s[..]),
        None => (&metric, &mshape[..]),
    };
    let sizes = sizes.as_ref().map(|(d, s)| (&d[..], &s[..]));
    let (merged, oshape, new_sizes) = match xb {
        Buf::F32(v) => apply(backend, &plan, v, xs, mode, sizes).map(|(o, s, z)| (Buf::F32(o), s, z))?,
        Buf::F16(v) => apply(backend, &plan, v, xs, mode, sizes).map(|(o, s, z)| (Buf::F16(o), s, z))?,
        Buf::BF16(v) => apply(backend, &plan, v, xs, mode, sizes).map(|(o, s, z)| (Buf::BF16(o), s, z))?,
        Buf::U8(_) => unreachable!("Buf::tokens gives floats"),
    };
    out.commit(|w| merged.write_npy(w, &oshape))?;
    if let (Some(w), Some(s)) = (sizes_out, new_sizes) {
        w.commit(|f| npy::write(f, &[plan.batch(), plan.out_tokens()], &s))?;
    }
    if let Some(w) = slots_out {
        w.commit(|f| npy::write(f, &[plan.batch(), plan.tokens()], plan.slots()))?;
    }
    Ok(())
}

fn plan_of<T: Float + Dev>(
    backend: Where,
    m: &[T],
    shape: &[usize],
    config: &MatchConfig,
    tc: bool,
) -> Result<MergePlan, String> {
    let view = View::new(m, shape).map_err(lib_err)?;
    match backend {
        Where::Host(b) => MergePlan::bipartite(b, view, config).map_err(lib_err),
        Where::Gpu => gpu::merge_plan(view, config, tc),
    }
}

type Merged<T> = (Vec<T>, Vec<usize>, Option<Vec<f32>>);

fn apply<T: Float + Dev>(
    backend: Where,
    plan: &MergePlan,
    x: &[T],
    shape: &[usize],
    mode: Mode,
    sizes: Option<(&[f32], &[usize])>,
) -> Result<Merged<T>, String> {
    let [b, n, c] = shape[..] else {
        return Err(format!("x has shape {shape:?}; expected [B, N, C]"));
    };
    if (b, n) != (plan.batch(), plan.tokens()) {
        return Err(format!(
            "x has shape {shape:?}; expected [{}, {}, C] like the metric",
            plan.batch(),
            plan.tokens()
        ));
    }
    let oshape = vec![b, plan.out_tokens(), c];
    let backend = match backend {
        Where::Host(b) => b,
        Where::Gpu => {
            let xv = View::new(x, shape).map_err(lib_err)?;
            let sv = match sizes {
                Some((d, dims)) => Some(View::new(d, dims).map_err(lib_err)?),
                None => None,
            };
            let m = match mode {
                Mode::Mean => Some(MergeMode::Mean),
                Mode::Sum => Some(MergeMode::Sum),
                Mode::Wavg => None,
            };
            let (y, s) = gpu::merge_apply(plan, xv, m, sv)?;
            return Ok((y, oshape, s));
        }
    };
    let mut out = zeroed::<T>(b * plan.out_tokens() * c)?;
    let xv = View::new(x, shape).map_err(lib_err)?;
    let ov = ViewMut::new(&mut out, &oshape).map_err(lib_err)?;
    let new_sizes = match mode {
        Mode::Mean | Mode::Sum => {
            let m = if mode == Mode::Sum { MergeMode::Sum } else { MergeMode::Mean };
            plan.merge(backend, xv, m, ov).map_err(lib_err)?;
            None
        }
        Mode::Wavg => {
            let mut s = zeroed::<f32>(b * plan.out_tokens())?;
            let sv = match sizes {
                Some((d, dims)) => Some(View::new(d, dims).map_err(lib_err)?),
                None => None,
            };
            let so = ViewMut::new(&mut s, &[b, plan.out_tokens()]).map_err(lib_err)?;
            plan.merge_weighted(backend, xv, sv, ov, so).map_err(lib_err)?;
            Some(s)
        }
    };
    Ok((out, oshape, new_sizes))
}
