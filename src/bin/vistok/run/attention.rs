//! `vistok run attention`: Q, K, V .npy → O .npy (optionally the log-sum-exp), with the
//! library's masks and biases.

use std::ffi::OsString;
use std::path::PathBuf;

use lexopt::Parser;
use vistok::attention::{Attention, Bias, Mask, QkvLayout};
use vistok::{Float, View, ViewMut};

use super::args::{distinct_outputs, next, number, parse_backend, parse_float_type, value, FloatType, Next};
use super::buf::{self, zeroed, Buf};
use super::exec::{lib_err, Where};
use super::gpu::{self, Dev};
use super::npy;
use super::output::Pending;

pub const HELP: &str = "\
vistok run attention: O = softmax(Q K^T scale + bias) V, flash-style (no score matrix)

usage: vistok run attention [--layout bhnd|bnhd] [--scale S]
                            [--causal | --window L,R | --segments SQ.npy,SK.npy]
                            [--key-bias KB.npy | --bias B.npy] [--lse LSE.npy]
                            [--backend reference|cpu|cuda] [--dtype f32|f16|bf16]
                            Q.npy K.npy V.npy OUT.npy

Q     [B, H, Nq, D] (bhnd, PyTorch's SDPA layout, the default) or [B, Nq, H, D] (bnhd,
      flash_attn_func's); K and V [B, Hkv, Nk, D] (or [B, Nk, Hkv, D]) with H a multiple of
      Hkv (grouped-query attention). <f4 or <f2. OUT has Q's shape and dtype.
Masks (query i, key j, aligned bottom-right when Nq != Nk):
  --causal             i sees j <= i + Nk - Nq
  --window L,R         i sees i + Nk - Nq - L <= j <= i + Nk - Nq + R ('inf' for unbounded)
  --segments SQ,SK     block-causal: i sees j iff SK[j] <= SQ[i] (ids .npy, Nq and Nk of them)
A fully masked query row gives zeros and a log-sum-exp of -inf.
Biases (f32, added to the scaled scores; -inf masks):
  --key-bias KB.npy    [B or 1, Nk] (ToMe's log(size))
  --bias B.npy         [B or 1, H or 1, Nq, Nk]
  --lse LSE.npy        also write the log-sum-exp [B, H, Nq] (f32, natural log)
  --scale S            score scale (default 1/sqrt(D)); a fraction like 1/8 is fine
  --backend B          reference | cpu | cuda (default cpu; cuda: GPU 0, needs a vistok
                       built with --features cuda; bf16 / f16 with D = 32, 64, 128 on tensor
                       cores, f32 any D <= 256; within the same tolerance as the cpu)
  --dtype D            round Q, K, V to f32 | f16 | bf16 first (default: Q's own); the cpu
                       computes scores and softmax in f32 whatever the dtype
  -h, --help           this help

bf16 is written as <f4 holding the bf16 values exactly. Outputs are written under temporary
names and renamed when complete: a failed run leaves none of them.
";

pub fn main(args: Vec<OsString>) -> Result<(), String> {
    run(args).map_err(|e| format!("run attention: {e}"))
}

/// The parsed mask flag (the segment ids are read after parsing).
enum MaskFlag {
    None,
    Causal,
    Window(usize, usize),
    Segments(PathBuf, PathBuf),
}

enum BiasFlag {
    None,
    Key(PathBuf),
    Full(PathBuf),
}

fn run(args: Vec<OsString>) -> Result<(), String> {
    let mut p = Parser::from_args(args);
    let mut attn = Attention::new();
    let (mut backend, mut dtype, mut lse, mut paths) = (super::args::BackendChoice::Cpu, None, None, vec![]);
    let (mut mask, mut bias) = (MaskFlag::None, BiasFlag::None);
    let set_mask = |m: &mut MaskFlag, new: MaskFlag| {
        if !matches!(m, MaskFlag::None) {
            return Err("only one of --causal, --window, --segments".to_string());
        }
        *m = new;
        Ok(())
    };
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
        match name.as_str() {
            "backend" => backend = parse_backend(&value(&mut p, &name)?)?,
            "dtype" => dtype = Some(parse_float_type(&name, &value(&mut p, &name)?)?),
            "layout" => {
                attn = attn.layout(match value(&mut p, &name)?.as_str() {
                    "bhnd" => QkvLayout::Bhnd,
                    "bnhd" => QkvLayout::Bnhd,
                    s => return Err(format!("--layout: expected bhnd or bnhd, got '{s}'")),
                })
            }
            "scale" => attn = attn.scale(number(&name, &value(&mut p, &name)?)?),
            "causal" => set_mask(&mut mask, MaskFlag::Causal)?,
            "window" => {
                let v = value(&mut p, &name)?;
                let side = |t: &str| match t.trim() {
                    "inf" | "none" => Ok(usize::MAX),
                    t => t.parse::<usize>().map_err(|_| format!("--window: expected L,R (integers or inf), got '{v}'")),
                };
                let (l, r) = v.split_once(',').ok_or(format!("--window: expected L,R, got '{v}'"))?;
                set_mask(&mut mask, MaskFlag::Window(side(l)?, side(r)?))?;
            }
            "segments" => {
                let v = value(&mut p, &name)?;
                let (a, b) = v.split_once(',').ok_or(format!("--segments: expected SQ.npy,SK.npy, got '{v}'"))?;
                set_mask(&mut mask, MaskFlag::Segments(a.into(), b.into()))?;
            }
            "key-bias" | "bias" => {
                if !matches!(bias, BiasFlag::None) {
                    return Err("only one of --key-bias, --bias".into());
                }
                let path = PathBuf::from(value(&mut p, &name)?);
                bias = if name == "bias" { BiasFlag::Full(path) } else { BiasFlag::Key(path) };
            }
            "lse" => lse = Some(PathBuf::from(value(&mut p, &name)?)),
            _ => return Err(format!("unknown flag --{name} (see --help)")),
        }
    }
    let [qp, kp, vp, op] = &paths[..] else {
        return Err(format!("expected four paths, Q.npy K.npy V.npy OUT.npy, got {} (see --help)", paths.len()));
    };
    distinct_outputs(&[("OUT", Some(op)), ("--lse", lse.as_ref())])?;
    let backend = Where::of(backend);

    let q = npy::read(qp)?;
    let k = npy::read(kp)?;
    let v = npy::read(vp)?;
    let out = Pending::create(op)?;
    let lse_out = lse.as_deref().map(Pending::create).transpose()?;

    let segments;
    match &mask {
        MaskFlag::None => {}
        MaskFlag::Causal => attn = attn.mask(Mask::Causal),
        MaskFlag::Window(l, r) => attn = attn.mask(Mask::Window { left: *l, right: *r }),
        MaskFlag::Segments(a, b) => {
            let read_ids =
                |path: &PathBuf| buf::ids(npy::read(path)?.data).map_err(|e| format!("{}: {e}", path.display()));
            segments = (read_ids(a)?, read_ids(b)?);
            attn = attn.mask(Mask::Segments { q: &segments.0, k: &segments.1 });
        }
    }
    let bias_data;
    match &bias {
        BiasFlag::None => {}
        BiasFlag::Key(path) | BiasFlag::Full(path) => {
            let a = npy::read(path)?;
            let data = match a.data {
                npy::NpyData::F32(d) => d,
                d => return Err(format!("{}: bias dtype {} (expected <f4)", path.display(), d.descr())),
            };
            bias_data = (data, a.shape);
            let view = View::new(&bias_data.0, &bias_data.1).map_err(lib_err)?;
            attn = attn.bias(if matches!(bias, BiasFlag::Key(_)) { Bias::Key(view) } else { Bias::Full(view) });
        }
    }

    let dtype = dtype.unwrap_or(match q.data {
        npy::NpyData::F16(_) => FloatType::F16,
        _ => FloatType::F32,
    });
    let conv = |a: npy::NpyArray| Buf::tokens(a.data, Some(dtype));
    let (qs, ks, vs) = (q.shape.clone(), k.shape.clone(), v.shape.clone());
    let (qb, kb, vb) = (conv(q)?, conv(k)?, conv(v)?);
    let want_lse = lse_out.is_some();
    let shapes = [&qs[..], &ks[..], &vs[..]];
    let (o, l) = match (&qb, &kb, &vb) {
        (Buf::F32(q), Buf::F32(k), Buf::F32(v)) => {
            let (o, l) = forward(backend, &attn, [q, k, v], shapes, want_lse)?;
            (Buf::F32(o), l)
        }
        (Buf::F16(q), Buf::F16(k), Buf::F16(v)) => {
            let (o, l) = forward(backend, &attn, [q, k, v], shapes, want_lse)?;
            (Buf::F16(o), l)
        }
        (Buf::BF16(q), Buf::BF16(k), Buf::BF16(v)) => {
            let (o, l) = forward(backend, &attn, [q, k, v], shapes, want_lse)?;
            (Buf::BF16(o), l)
        }
        _ => unreachable!("Q, K and V were converted to one float type"),
    };
    out.commit(|w| o.write_npy(w, &qs))?;
    if let (Some(w), Some((lse, shape))) = (lse_out, l) {
        w.commit(|f| npy::write(f, &shape, &lse))?;
    }
    Ok(())
}

type Lse = Option<(Vec<f32>, Vec<usize>)>;

fn forward<T: Float + Dev>(
    backend: Where,
    attn: &Attention<'_>,
    [q, k, v]: [&[T]; 3],
    [qs, ks, vs]: [&[usize]; 3],
    want_lse: bool,
) -> Result<(Vec<T>, Lse), String> {
    // [B, H, Nq] whichever the layout.
    let lse_shape = match (qs, attn.layout) {
        (&[b, h, n, _], QkvLayout::Bhnd) | (&[b, n, h, _], QkvLayout::Bnhd) => vec![b, h, n],
        _ => return Err(format!("Q has shape {qs:?}; expected rank 4")),
    };
    let backend = match backend {
        Where::Host(b) => b,
        Where::Gpu => {
            if vs != ks {
                return Err(format!("V has shape {vs:?}; expected K's {ks:?}"));
            }
            let (o, l) = gpu::attention(attn, [q, k, v], [qs, ks], want_lse)?;
            return Ok((o, l.map(|l| (l, lse_shape))));
        }
    };
    let mut o = zeroed::<T>(q.len())?;
    let (qv, kv, vv) =
        (View::new(q, qs).map_err(lib_err)?, View::new(k, ks).map_err(lib_err)?, View::new(v, vs).map_err(lib_err)?);
    let ov = ViewMut::new(&mut o, qs).map_err(lib_err)?;
    if !want_lse {
        attn.forward(backend, qv, kv, vv, ov).map_err(lib_err)?;
        return Ok((o, None));
    }
    let mut lse = zeroed::<f32>(lse_shape.iter().product())?;
    let lv = ViewMut::new(&mut lse, &lse_shape).map_err(lib_err)?;
    attn.forward_lse(backend, qv, kv, vv, ov, lv).map_err(lib_err)?;
    Ok((o, Some((lse, lse_shape))))
}
