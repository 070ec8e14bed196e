//! `vistok run <family> ...`: runs a kernel family on .npy files, so that scripts in other
//! languages (Python above all) can check and use vistok without writing Rust.
//!
//! One file per job: `args` (shared flags), `npy` (the file format), `buf` (typed buffers and
//! their .npy mapping), `exec` (backend and dtype dispatch), `gpu` (the CUDA path),
//! `output` (write-then-rename), and one file per subcommand.

mod argmin;
mod args;
mod attention;
mod buf;
mod exec;
mod fsq;
mod gpu;
mod lfq;
mod merge;
mod npy;
mod output;
mod patchify;
mod unpatchify;

use std::ffi::OsString;

/// Families that can run now.
const FAMILIES: &[&str] = &["patchify", "unpatchify", "lfq", "fsq", "argmin", "attention", "merge"];

const HELP: &str = "\
vistok run: run a kernel family on .npy files

usage: vistok run <family> [options] IN.npy OUT.npy      (vistok run <family> --help for more)

families:
  patchify     image / video -> patch tokens [B, L, P]
  unpatchify   patch tokens -> image / video
  lfq          tokens [..., G*D] -> LFQ / group-wise LFQ / BSQ ids [..., G] (--decode: back)
  fsq          tokens [..., D] -> FSQ ids [...] (--decode: ids -> codes)
  argmin       vectors [..., D] -> nearest codebook entry ids [...] (--lookup: ids -> entries)
  attention    Q, K, V -> softmax(Q K^T scale + bias) V, with causal / window / segment masks
  merge        ToMe bipartite matching + merge of [B, N, C] tokens (one layer)

Common flags: --backend reference|cpu|cuda (default cpu), --dtype f32|f16|bf16.
.npy files: format 1.0 / 2.0 / 3.0, little-endian, C order; dtypes |u1, <f2, <f4 (and <i4,
<i8, <u4 where a family takes indices; lfq and fsq write ids as <u4, or as --ids-dtype says).
numpy has no bf16: bf16 results are written as <f4 holding the bf16 values exactly.
Errors: a non-zero exit, one line on stderr, no output file.
";

pub fn main(args: Vec<OsString>) -> Result<(), String> {
    let mut args = args.into_iter();
    let Some(family) = args.next() else {
        return Err(format!("run: which family? one of {} (see vistok run --help)", FAMILIES.join(", ")));
    };
    let rest: Vec<OsString> = args.collect();
    match family.to_str() {
        Some("patchify") => patchify::main(rest),
        Some("unpatchify") => unpatchify::main(rest),
        Some("lfq") => lfq::main(rest),
        Some("fsq") => fsq::main(rest),
        Some("argmin") => argmin::main(rest),
        Some("attention") => attention::main(rest),
        Some("merge") => merge::main(rest),
        Some("-h" | "--help" | "help") => {
            print!("{HELP}");
            Ok(())
        }
        _ => Err(format!("run: unknown family {family:?}; available: {}", FAMILIES.join(", "))),
    }
}
