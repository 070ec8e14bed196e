//! `vistok run unpatchify`: a patch-token .npy → an image or video .npy, the exact inverse of
//! `vistok run patchify` with the same flags.

use std::ffi::OsString;

use lexopt::Parser;
use vistok::{DType, Layout, Patchify};

use super::args::{parse_float_type, positive, value, FloatType, Parsed, PatchFlags};
use super::buf::Buf;
use super::exec::{self, lib_err};
use super::npy;
use super::output::Pending;

pub const HELP: &str = "\
vistok run unpatchify: patch tokens .npy -> image or video .npy (the inverse of patchify)

usage: vistok run unpatchify --patch P --height H --width W [--frames F --tubelet T]
                             [--layout nchw|nhwc] [--order cpq|pqc]
                             [--scale S] [--mean a,b,c --std a,b,c] [--pad]
                             [--backend reference|cpu|cuda] [--dtype f32|f16|bf16]
                             [--out-dtype u8|f32|f16|bf16] IN.npy OUT.npy

IN   tokens [B, L, P], dtype <f4 (f32) or <f2 (f16), as patchify writes them.
OUT  image [B,C,H,W] (nchw) or [B,H,W,C] (nhwc); with --frames a video [B,C,T,H,W] /
     [B,T,H,W,C]. C = P / (tubelet*PH*PW); L must match the sizes given.

  --patch P|PHxPW      patch size, square or PH x PW (required)
  --height H           image height (required)
  --width W            image width (required)
  --frames F           frames: makes the output a video (default: an image)
  --tubelet T          frames per token (default 1; needs --frames)
  --layout nchw|nhwc   channel position of the output (default nchw)
  --order cpq|pqc      order within a token, as given to patchify (default cpq)
  --scale S, --mean a,b,c, --std a,b,c
                       the normalisation patchify applied, undone here:
                       x = fma(y, std[c]/S, mean[c]/S), then rounded to the output dtype
  --pad                the tokens were padded (H, W or F not multiples of the patch);
                       padded positions are dropped
  --backend B          reference | cpu | cuda (default cpu; cuda needs `--features cuda`)
  --dtype D            token dtype the kernel reads: f32 | f16 | bf16 (default: the file's
                       own, f32 for <f4 and f16 for <f2); other types are rounded to it
                       (nearest, ties to even) before the kernel runs
  --out-dtype D        output dtype: u8 | f32 | f16 | bf16 (default f32). u8 rounds to
                       nearest (ties to even) and clamps to [0, 255], NaN -> 0; written as
                       |u1. f16 is written as <f2, bf16 as <f4 holding the bf16 values exactly
  -h, --help           this help

OUT is written under a temporary name in its directory and renamed when complete: a failed
run leaves no OUT (and an existing OUT untouched).
";

pub fn main(args: Vec<OsString>) -> Result<(), String> {
    run(args).map_err(|e| format!("run unpatchify: {e}"))
}

/// The flags only unpatchify has.
#[derive(Default)]
struct Sizes {
    height: Option<usize>,
    width: Option<usize>,
    frames: Option<usize>,
    out_dtype: Option<DType>,
}

fn run(args: Vec<OsString>) -> Result<(), String> {
    let mut p = Parser::from_args(args);
    let mut f = PatchFlags::new();
    let mut s = Sizes::default();
    while let Some(arg) = f.next(&mut p)? {
        match arg {
            Parsed::Taken => {}
            Parsed::Help => {
                print!("{HELP}");
                return Ok(());
            }
            Parsed::Other(name) => match name.as_str() {
                "height" => s.height = Some(positive(&name, &value(&mut p, &name)?)?),
                "width" => s.width = Some(positive(&name, &value(&mut p, &name)?)?),
                "frames" => s.frames = Some(positive(&name, &value(&mut p, &name)?)?),
                "out-dtype" => s.out_dtype = Some(parse_out_dtype(&value(&mut p, &name)?)?),
                _ => return Err(format!("unknown flag --{name} (see --help)")),
            },
        }
    }
    let (input, output) = f.in_out()?;
    let config = f.config()?;
    let height = s.height.ok_or("--height is required (see --help)")?;
    let width = s.width.ok_or("--width is required (see --help)")?;
    if f.tubelet.is_some() && s.frames.is_none() {
        return Err("--tubelet needs --frames (the output is a video)".into());
    }
    let tokens = npy::read(&input)?;
    let &[batch, _, patch_len] = &tokens.shape[..] else {
        return Err(format!("tokens must have rank 3 [B, L, P], got shape {:?}", tokens.shape));
    };
    let tokens_buf = Buf::tokens(tokens.data, f.dtype)?;

    let [pt, ph, pw] = config.patch;
    // The library bounds patch sizes only against the image, which is not known yet.
    let per_channel = pt.checked_mul(ph).and_then(|n| n.checked_mul(pw)).ok_or("patch size overflows")?;
    if patch_len % per_channel != 0 {
        return Err(format!(
            "P = {patch_len} values per token is not a multiple of tubelet*PH*PW = {pt}*{ph}*{pw}, \
             so the channel count is not whole"
        ));
    }
    let channels = patch_len / per_channel;
    let dims = match (s.frames, config.layout) {
        (None, Layout::ChannelsFirst) => vec![batch, channels, height, width],
        (None, Layout::ChannelsLast) => vec![batch, height, width, channels],
        (Some(t), Layout::ChannelsFirst) => vec![batch, channels, t, height, width],
        (Some(t), Layout::ChannelsLast) => vec![batch, t, height, width, channels],
    };
    let config = match f.normalize(channels)? {
        Some(n) => config.normalize(n),
        None => config,
    };
    let plan = Patchify::new(&config, &dims).map_err(lib_err)?;
    if plan.tokens_dims()[..] != tokens.shape[..] {
        return Err(format!(
            "tokens shape {:?} does not match the {:?} that an image of dims {dims:?} gives",
            tokens.shape,
            plan.tokens_dims()
        ));
    }
    let pending = Pending::create(&output)?;
    let image = exec::inverse(f.backend, &plan, &tokens_buf, s.out_dtype.unwrap_or(DType::F32))?;
    pending.commit(|w| image.write_npy(w, &dims))
}

fn parse_out_dtype(s: &str) -> Result<DType, String> {
    match s {
        "u8" => Ok(DType::U8),
        _ => Ok(
            match parse_float_type("out-dtype", s)
                .map_err(|_| format!("--out-dtype: expected u8, f32, f16 or bf16, got '{s}'"))?
            {
                FloatType::F32 => DType::F32,
                FloatType::F16 => DType::F16,
                FloatType::BF16 => DType::BF16,
            },
        ),
    }
}
