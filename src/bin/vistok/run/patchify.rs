//! `vistok run patchify`: an image or video .npy → a patch-token .npy.

use std::ffi::OsString;

use lexopt::Parser;
use vistok::Patchify;

use super::args::{FloatType, Parsed, PatchFlags};
use super::buf::Buf;
use super::exec::{self, lib_err};
use super::npy;
use super::output::Pending;

pub const HELP: &str = "\
vistok run patchify: image or video .npy -> patch tokens .npy

usage: vistok run patchify --patch P [--tubelet T] [--layout nchw|nhwc] [--order cpq|pqc]
                           [--scale S] [--mean a,b,c --std a,b,c] [--pad]
                           [--backend reference|cpu|cuda] [--dtype f32|f16|bf16] IN.npy OUT.npy

IN   image [B,C,H,W] (nchw) or [B,H,W,C] (nhwc); video [B,C,T,H,W] / [B,T,H,W,C].
     dtype |u1 (u8), <f2 (f16) or <f4 (f32), little-endian, C order; read as is.
OUT  tokens [B, L, P]: L = (T/tubelet)(H/PH)(W/PW) tokens in (t, h, w) raster order,
     P = C*tubelet*PH*PW values per token.

  --patch P|PHxPW      patch size, square or PH x PW (required)
  --tubelet T          frames per token, for videos (default 1)
  --layout nchw|nhwc   channel position (default nchw; ncthw / nthwc are accepted for videos)
  --order cpq|pqc      order within a token: cpq = (c, t, h, w), timm's PatchEmbed;
                       pqc = (t, h, w, c), MAE's patchify (default cpq)
  --scale S            multiply the pixels by S first (default 1; a fraction such as 1/255 works)
  --mean a,b,c         per-channel means, subtracted after scaling (needs --std)
  --std a,b,c          per-channel standard deviations, divided by last (needs --mean);
                       a single value applies to every channel. The library's definition:
                       y = fma(x, S/std[c], -(mean[c]/std[c])), rounded once to the token dtype
  --pad                zero-pad sizes the patch does not divide (bottom, right, last frames);
                       without it such sizes are an error
  --backend B          reference | cpu | cuda (default cpu). cuda needs a build with
                       `--features cuda` and a GPU; it uses GPU 0
  --dtype D            token dtype: f32 | f16 | bf16 (default f32). f32 is written as <f4,
                       f16 as <f2, bf16 as <f4 holding the bf16 values exactly (numpy has no
                       bf16; `torch.from_numpy(a).bfloat16()` recovers them bit for bit)
  -h, --help           this help

OUT is written under a temporary name in its directory and renamed when complete: a failed
run leaves no OUT (and an existing OUT untouched).
";

pub fn main(args: Vec<OsString>) -> Result<(), String> {
    run(args).map_err(|e| format!("run patchify: {e}"))
}

fn run(args: Vec<OsString>) -> Result<(), String> {
    let mut p = Parser::from_args(args);
    let mut f = PatchFlags::new();
    while let Some(arg) = f.next(&mut p)? {
        match arg {
            Parsed::Taken => {}
            Parsed::Help => {
                print!("{HELP}");
                return Ok(());
            }
            Parsed::Other(name) => return Err(format!("unknown flag --{name} (see --help)")),
        }
    }
    let (input, output) = f.in_out()?;
    let config = f.config()?;
    let image = npy::read(&input)?;
    let pixels = Buf::pixels(image.data)?;
    // The geometry first, to learn the channel count the normalisation must match.
    let channels = Patchify::new(&config, &image.shape).map_err(lib_err)?.geometry().channels;
    let config = match f.normalize(channels)? {
        Some(n) => config.normalize(n),
        None => config,
    };
    let plan = Patchify::new(&config, &image.shape).map_err(lib_err)?;
    let pending = Pending::create(&output)?;
    let tokens = exec::forward(f.backend, &plan, &pixels, f.dtype.unwrap_or(FloatType::F32))?;
    pending.commit(|w| tokens.write_npy(w, &plan.tokens_dims()))
}
