//! `vistok run`, end to end: files written here by an independent little .npy writer, the
//! binary run as a process, its output read by an independent little reader and compared bit
//! for bit with the library API. Bad inputs: exit code, one-line message, and no output file.
#![cfg(feature = "cli")]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::cli::{le, p, read_npy, write_npy_version as write_npy_raw, Dir};
use common::random_data;
use vistok::{bf16, f16, Backend, Element, Float, Layout, Normalize, PatchConfig, PatchOrder, Patchify, View, ViewMut};

// ---------------------------------------------------------------------------------------------
// Harness: a scratch directory, an independent .npy writer / reader, running the binary.

fn descr_of<T: Element>() -> &'static str {
    match T::DTYPE {
        vistok::DType::U8 => "|u1",
        vistok::DType::F16 => "<f2",
        vistok::DType::F32 => "<f4",
        vistok::DType::BF16 => panic!("numpy has no bf16"),
    }
}

fn write_npy<T: Element>(path: &Path, shape: &[usize], data: &[T]) {
    write_npy_raw(path, 1, descr_of::<T>(), shape, &le(data));
}

/// Runs `vistok run args...`.
fn vistok(args: &[&str]) -> Output {
    let mut all = vec!["run"];
    all.extend(args);
    common::cli::vistok(&all)
}

/// Runs `vistok run args...`, expects success, returns the output file's (descr, shape, bytes).
fn run_ok(args: &[&str], out: &Path) -> (String, Vec<usize>, Vec<u8>) {
    common::cli::run_ok(args);
    read_npy(out)
}

/// Runs `vistok run args...`, expects a clean failure: exit code 1 (not a panic's 101), one line
/// on stderr that starts with `vistok run <cmd>: ` and contains `want`, and no output file or
/// temporary file left in `dir` (only the `inputs`).
fn run_err(dir: &Dir, args: &[&str], cmd: &str, want: &str, inputs: &[&str]) {
    assert_eq!(args[0], cmd, "the command is the first argument");
    common::cli::run_err(dir, args, want, inputs);
}

// ---------------------------------------------------------------------------------------------
// Library expectations.

fn lib_forward<I: Element, O: Float>(config: &PatchConfig, dims: &[usize], image: &[I], backend: Backend) -> Vec<O> {
    let plan = Patchify::new(config, dims).unwrap();
    let td = plan.tokens_dims();
    let mut t = vec![O::from_f32(0.0); td.iter().product()];
    plan.forward(backend, View::new(image, dims).unwrap(), ViewMut::new(&mut t, &td).unwrap()).unwrap();
    t
}

fn lib_inverse<I: Float, O: Element>(config: &PatchConfig, dims: &[usize], tokens: &[I], backend: Backend) -> Vec<O> {
    let plan = Patchify::new(config, dims).unwrap();
    let mut x = vec![O::from_f32(0.0); dims.iter().product()];
    plan.inverse(backend, View::new(tokens, &plan.tokens_dims()).unwrap(), ViewMut::new(&mut x, dims).unwrap())
        .unwrap();
    x
}

/// The bytes vistok writes for bf16 values: `<f4` holding them exactly.
fn bf16_as_f32_bytes(v: &[bf16]) -> Vec<u8> {
    le(&v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>())
}

/// Checks a vistok output file against the library with both host backends.
fn check_forward<I: Element, O: Float>(
    dir: &Dir,
    config: &PatchConfig,
    dims: &[usize],
    image: &[I],
    flags: &[&str],
    descr: &str,
    bytes: impl Fn(&[O]) -> Vec<u8>,
) {
    write_npy(&dir.path("in.npy"), dims, image);
    let td = Patchify::new(config, dims).unwrap().tokens_dims();
    for (backend, name) in [(Backend::Reference, "reference"), (Backend::Cpu, "cpu")] {
        let out = dir.path(&format!("out-{name}.npy"));
        let mut args = vec!["patchify", "--backend", name];
        args.extend(flags);
        let input = dir.path("in.npy");
        args.extend([p(&input), p(&out)]);
        let (d, shape, data) = run_ok(&args, &out);
        assert_eq!((d.as_str(), &shape[..]), (descr, &td[..]), "{args:?}");
        let want = bytes(&lib_forward::<I, O>(config, dims, image, backend));
        assert!(data == want, "{args:?}: output differs from the library's {name} backend");
    }
}

// ---------------------------------------------------------------------------------------------
// patchify

#[test]
fn patchify_nchw_u8_default_f32() {
    let dir = Dir::new("nchw-u8");
    let dims = [2, 3, 8, 12];
    let image: Vec<u8> = random_data(dims.iter().product(), 1);
    let config = PatchConfig::image(Layout::ChannelsFirst, 4, 4);
    check_forward::<u8, f32>(&dir, &config, &dims, &image, &["--patch", "4"], "<f4", le);
}

#[test]
fn patchify_nhwc_pqc_rectangular_f32_to_f16_from_a_v2_header() {
    let dir = Dir::new("nhwc-pqc");
    let dims = [2, 8, 6, 3];
    let image: Vec<f32> = random_data(dims.iter().product(), 2);
    let config = PatchConfig::image(Layout::ChannelsLast, 4, 2).order(PatchOrder::Pqc);
    let flags = ["--layout", "nhwc", "--order", "pqc", "--patch", "4x2", "--dtype", "f16"];
    check_forward::<f32, f16>(&dir, &config, &dims, &image, &flags, "<f2", le);
    // The same input behind a version 2.0 header gives the same output.
    write_npy_raw(&dir.path("in2.npy"), 2, "<f4", &dims, &le(&image));
    let (input, out) = (dir.path("in2.npy"), dir.path("out2.npy"));
    let mut args = vec!["patchify"];
    args.extend(flags);
    args.extend([p(&input), p(&out)]);
    assert_eq!(run_ok(&args, &out), read_npy(&dir.path("out-cpu.npy")));
}

#[test]
fn patchify_video_tubelet_f16_input_bf16_tokens() {
    let dir = Dir::new("video");
    let dims = [1, 2, 4, 8, 8];
    let image: Vec<f16> = random_data(dims.iter().product(), 3);
    let config = PatchConfig::video(Layout::ChannelsFirst, 2, 4, 4);
    let flags = ["--tubelet", "2", "--patch", "4", "--dtype", "bf16"];
    check_forward::<f16, bf16>(&dir, &config, &dims, &image, &flags, "<f4", bf16_as_f32_bytes);
}

#[test]
fn patchify_video_nthwc_pqc() {
    let dir = Dir::new("video-nhwc");
    let dims = [2, 4, 4, 6, 2];
    let image: Vec<u8> = random_data(dims.iter().product(), 4);
    let config = PatchConfig::video(Layout::ChannelsLast, 2, 2, 3).order(PatchOrder::Pqc);
    let flags = ["--layout", "nhwc", "--order", "pqc", "--tubelet", "2", "--patch", "2x3"];
    check_forward::<u8, f32>(&dir, &config, &dims, &image, &flags, "<f4", le);
}

#[test]
fn patchify_pad_and_normalise() {
    let dir = Dir::new("pad-norm");
    let dims = [2, 3, 10, 9];
    let image: Vec<u8> = random_data(dims.iter().product(), 5);
    let config = PatchConfig::image(Layout::ChannelsFirst, 4, 4).pad(true).normalize(Normalize::imagenet_u8());
    let flags =
        ["--patch", "4", "--pad", "--scale", "1/255", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"];
    check_forward::<u8, f32>(&dir, &config, &dims, &image, &flags, "<f4", le);
    // --scale alone, and a single mean/std for every channel.
    let config =
        PatchConfig::image(Layout::ChannelsFirst, 5, 3).normalize(Normalize::new(0.5, vec![0.0; 3], vec![1.0; 3]));
    check_forward::<u8, f16>(
        &dir,
        &config,
        &dims,
        &image,
        &["--patch", "5x3", "--scale", "0.5", "--dtype", "f16"],
        "<f2",
        le,
    );
    let config =
        PatchConfig::image(Layout::ChannelsFirst, 2, 3).normalize(Normalize::new(1.0, vec![0.5; 3], vec![0.25; 3]));
    check_forward::<u8, f32>(
        &dir,
        &config,
        &dims,
        &image,
        &["--patch", "2x3", "--mean", "0.5", "--std", "0.25"],
        "<f4",
        le,
    );
}

// ---------------------------------------------------------------------------------------------
// unpatchify

#[test]
fn unpatchify_matches_library_in_every_output_dtype() {
    let dir = Dir::new("unpatchify");
    let dims = [2, 3, 8, 12];
    let config =
        PatchConfig::image(Layout::ChannelsFirst, 4, 4).normalize(Normalize::new(2.0, vec![0.5; 3], vec![3.0; 3]));
    let td = Patchify::new(&config, &dims).unwrap().tokens_dims();
    let tokens: Vec<f32> = random_data(td.iter().product(), 6);
    write_npy(&dir.path("tok.npy"), &td, &tokens);
    let norm = ["--scale", "2", "--mean", "0.5", "--std", "3"];
    let input = dir.path("tok.npy");
    for (backend, name) in [(Backend::Reference, "reference"), (Backend::Cpu, "cpu")] {
        let out = dir.path("img.npy");
        let run = |extra: &[&str]| {
            let mut args = vec!["unpatchify", "--backend", name, "--patch", "4", "--height", "8", "--width", "12"];
            args.extend(norm);
            args.extend(extra);
            args.extend([p(&input), p(&out)]);
            let (d, shape, data) = run_ok(&args, &out);
            assert_eq!(shape, dims, "{args:?}");
            (d, data)
        };
        assert_eq!(run(&[]), ("<f4".into(), le(&lib_inverse::<f32, f32>(&config, &dims, &tokens, backend))));
        let want: Vec<u8> = lib_inverse(&config, &dims, &tokens, backend);
        assert_eq!(run(&["--out-dtype", "u8"]), ("|u1".into(), want));
        let want = le(&lib_inverse::<f32, f16>(&config, &dims, &tokens, backend));
        assert_eq!(run(&["--out-dtype", "f16"]), ("<f2".into(), want));
        let want = bf16_as_f32_bytes(&lib_inverse::<f32, bf16>(&config, &dims, &tokens, backend));
        assert_eq!(run(&["--out-dtype", "bf16"]), ("<f4".into(), want));
        // --dtype bf16: the f32 tokens are rounded to bf16 before the kernel.
        let t16: Vec<bf16> = tokens.iter().map(|&x| bf16::from_f32(x)).collect();
        let want = le(&lib_inverse::<bf16, f16>(&config, &dims, &t16, backend));
        assert_eq!(run(&["--dtype", "bf16", "--out-dtype", "f16"]), ("<f2".into(), want));
    }
}

#[test]
fn unpatchify_video_nhwc_pqc_padded_from_f16_tokens() {
    let dir = Dir::new("unpatchify-video");
    let dims = [1, 5, 6, 7, 2];
    let config = PatchConfig::video(Layout::ChannelsLast, 2, 4, 4).order(PatchOrder::Pqc).pad(true);
    let td = Patchify::new(&config, &dims).unwrap().tokens_dims();
    let tokens: Vec<f16> = random_data(td.iter().product(), 7);
    write_npy(&dir.path("tok.npy"), &td, &tokens);
    let (input, out) = (dir.path("tok.npy"), dir.path("vid.npy"));
    let args = [
        "unpatchify",
        "--layout",
        "nhwc",
        "--order",
        "pqc",
        "--pad",
        "--frames",
        "5",
        "--tubelet",
        "2",
        "--patch",
        "4",
        "--height",
        "6",
        "--width",
        "7",
        p(&input),
        p(&out),
    ];
    let (d, shape, data) = run_ok(&args, &out);
    assert_eq!((d.as_str(), shape), ("<f4", dims.to_vec()));
    assert!(data == le(&lib_inverse::<f16, f32>(&config, &dims, &tokens, Backend::Reference)));
}

#[test]
fn u8_round_trip_through_normalised_tokens() {
    let dir = Dir::new("round-trip");
    let dims = [3, 16, 16, 3];
    let image: Vec<u8> = random_data(dims.iter().product(), 8);
    write_npy(&dir.path("img.npy"), &dims, &image);
    let shared = [
        "--layout",
        "nhwc",
        "--patch",
        "8",
        "--scale",
        "1/255",
        "--mean",
        "0.485,0.456,0.406",
        "--std",
        "0.229,0.224,0.225",
    ];
    let mut a = vec!["patchify"];
    a.extend(shared);
    let (img, tok, back) = (dir.path("img.npy"), dir.path("tok.npy"), dir.path("back.npy"));
    a.extend([p(&img), p(&tok)]);
    run_ok(&a, &tok);
    let mut b = vec!["unpatchify", "--height", "16", "--width", "16", "--out-dtype", "u8"];
    b.extend(shared);
    b.extend([p(&tok), p(&back)]);
    let (d, shape, data) = run_ok(&b, &back);
    assert_eq!((d.as_str(), shape, data), ("|u1", dims.to_vec(), image));
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[test]
fn bad_inputs_fail_cleanly_and_leave_no_output() {
    let dir = Dir::new("bad");
    let img = dir.path("img.npy");
    write_npy(&img, &[1, 3, 8, 8], &random_data::<u8>(3 * 64, 9));
    let tok = dir.path("tok.npy");
    write_npy(&tok, &[1, 4, 48], &random_data::<f32>(4 * 48, 10));
    let inputs = ["img.npy", "tok.npy"];
    let out = dir.path("out.npy");
    let (img, tok, out) = (p(&img), p(&tok), p(&out));
    let cases: &[(&[&str], &str, &str)] = &[
        (&["patchify", "--patch", "4", "--bogus", img, out], "patchify", "unknown flag --bogus"),
        (&["patchify", "--patch", "4", "-x", img, out], "patchify", "unknown flag -x"),
        (&["patchify", img, out], "patchify", "--patch is required"),
        (&["patchify", "--patch", "4", img], "patchify", "expected two paths"),
        (&["patchify", "--patch", "0", img, out], "patchify", "positive integer"),
        (&["patchify", "--patch", "4", "--layout", "nchwx", img, out], "patchify", "--layout"),
        (&["patchify", "--patch", "4", "--dtype", "f64", img, out], "patchify", "--dtype"),
        (&["patchify", "--patch", "4", "--backend", "gpu", img, out], "patchify", "--backend"),
        (&["patchify", "--patch", "4", "--pad=yes", img, out], "patchify", "pad"),
        (&["patchify", "--patch", "4", "--scale", "abc", img, out], "patchify", "--scale: expected a number"),
        (&["patchify", "--patch", "3", img, out], "patchify", "not a multiple of patch"),
        (&["patchify", "--patch", "16", "--pad", img, out], "patchify", "patch"),
        (&["patchify", "--patch", "4", "--tubelet", "2", img, out], "patchify", "rank-5"),
        (&["patchify", "--patch", "4", "--mean", "0.5,0.5,0.5", img, out], "patchify", "--mean needs --std"),
        (
            &["patchify", "--patch", "4", "--mean", "1,2,3", "--std", "1,2", img, out],
            "patchify",
            "--mean has 3 values but --std has 2",
        ),
        (&["patchify", "--patch", "4", "--mean", "1,2", "--std", "1,2", img, out], "patchify", "3 channels"),
        (&["patchify", "--patch", "4", "--mean", "1,2,3", "--std", "1,0,3", img, out], "patchify", "std"),
        (&["patchify", "--patch", "4", "--scale", "nan", img, out], "patchify", "scale"),
        (&["patchify", "--patch", "4", tok, out], "patchify", "rank must be 4"),
        (&["patchify", "--patch", "4", "missing.npy", out], "patchify", "cannot open"),
        (&["unpatchify", "--patch", "4", "--width", "8", tok, out], "unpatchify", "--height is required"),
        (&["unpatchify", "--patch", "4", "--height", "8", "--width", "8", img, out], "unpatchify", "rank 3"),
        (&["unpatchify", "--patch", "4", "--height", "8", "--width", "12", tok, out], "unpatchify", "does not match"),
        (
            &["unpatchify", "--patch", "5", "--height", "10", "--width", "10", tok, out],
            "unpatchify",
            "not a multiple of",
        ),
        (
            &["unpatchify", "--patch", "4", "--height", "8", "--width", "8", "--tubelet", "2", tok, out],
            "unpatchify",
            "--tubelet needs --frames",
        ),
        (
            &["unpatchify", "--patch", "4", "--height", "8", "--width", "8", "--out-dtype", "i8", tok, out],
            "unpatchify",
            "--out-dtype",
        ),
        (
            &["unpatchify", "--patch", "4", "--height", "8", "--width", "8", "--std", "1", tok, out],
            "unpatchify",
            "--std needs --mean",
        ),
    ];
    for (args, cmd, want) in cases {
        run_err(&dir, args, cmd, want, &inputs);
    }
    // Output into a directory that does not exist / onto a directory.
    let nodir = dir.path("no-such-dir/out.npy");
    run_err(&dir, &["patchify", "--patch", "4", img, p(&nodir)], "patchify", "cannot create", &inputs);
    // u8 tokens are not tokens.
    run_err(
        &dir,
        &["unpatchify", "--patch", "4", "--height", "8", "--width", "8", img, out],
        "unpatchify",
        "rank 3",
        &inputs,
    );
}

#[test]
fn bad_files_are_one_line_errors_never_panics() {
    let dir = Dir::new("bad-files");
    let out = dir.path("out.npy");
    let bad = dir.path("bad.npy");
    let run =
        |want: &str| run_err(&dir, &["patchify", "--patch", "2", p(&bad), p(&out)], "patchify", want, &["bad.npy"]);
    let data = le(&random_data::<f32>(2 * 4 * 4, 11));
    let header = |descr: &str, fortran: &str| {
        format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': (1, 2, 4, 4), }}")
    };
    let with_header = |h: &str, body: &[u8]| {
        let mut h = h.to_string();
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((h.len() as u16).to_le_bytes());
        b.extend(h.as_bytes());
        b.extend(body);
        std::fs::write(&bad, b).unwrap();
    };
    with_header(&header("<f4", "True"), &data);
    run("Fortran");
    with_header(&header(">f4", "False"), &data);
    run("big-endian");
    with_header(&header("<c8", "False"), &data);
    run("dtype '<c8' is not supported");
    with_header(&header("<i4", "False"), &data);
    run("not an image dtype");
    with_header(&header("<f4", "False"), &data[..data.len() - 1]);
    run("the header promises 128 bytes of data");
    with_header(&header("<f4", "False"), &[&data[..], &[0]].concat());
    run("the file holds 129");
    with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }", &data);
    run("overflows");
    with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 4, 4), 'extra': 1}", &data);
    run("unexpected key");
    std::fs::write(&bad, b"PK\x03\x04 not numpy").unwrap();
    run("not a .npy file");
    std::fs::write(&bad, b"\x93NUMPY\x09\x00").unwrap();
    run("version 9.0");
    std::fs::write(&bad, b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{").unwrap();
    run("exceeds the limit");

    // Every truncation of a valid file, and every single-byte corruption of its header.
    write_npy_raw(&bad, 1, "<f4", &[1, 2, 4, 4], &data);
    let good = std::fs::read(&bad).unwrap();
    let header_len = good.len() - data.len();
    let mut variants: Vec<Vec<u8>> = (0..header_len + 8).map(|n| good[..n].to_vec()).collect();
    for i in 0..header_len {
        let mut v = good.clone();
        v[i] ^= 0x5a;
        variants.push(v);
    }
    for v in variants {
        std::fs::write(&bad, &v).unwrap();
        let o = vistok(&["patchify", "--patch", "2", p(&bad), p(&out)]);
        let err = String::from_utf8_lossy(&o.stderr);
        // A flipped byte inside padding or a digit may still be a valid file; anything else
        // must be a clean error.
        if o.status.success() {
            std::fs::remove_file(&out).unwrap();
            continue;
        }
        assert_eq!(o.status.code(), Some(1), "{v:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{v:?}: {err}");
        assert!(!out.exists());
    }
}

#[test]
fn a_failed_run_leaves_an_existing_output_untouched() {
    let dir = Dir::new("existing");
    write_npy(&dir.path("img.npy"), &[1, 1, 6, 6], &random_data::<u8>(36, 12));
    std::fs::write(dir.path("out.npy"), b"precious").unwrap();
    let (img, out) = (dir.path("img.npy"), dir.path("out.npy"));
    let args = ["patchify", "--patch", "4", p(&img), p(&out)];
    run_err(&dir, &args, "patchify", "not a multiple", &["img.npy", "out.npy"]);
    assert_eq!(std::fs::read(dir.path("out.npy")).unwrap(), b"precious");
}

#[test]
fn unknown_families() {
    let o = vistok(&["nosuch"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("unknown family") && err.contains("patchify, unpatchify") && err.contains("merge"), "{err}");
    assert_eq!(vistok(&[]).status.code(), Some(1));
}

#[test]
fn help_for_run_and_each_subcommand() {
    for (args, want) in [
        (&["--help"][..], "families:"),
        (&["patchify", "--help"][..], "--patch P|PHxPW"),
        (&["patchify", "-h"][..], "bf16 as <f4"),
        (&["unpatchify", "--help"][..], "--out-dtype D"),
        (&["--help"][..], "argmin       vectors"),
        (&["--help"][..], "merge        ToMe"),
        (&["argmin", "--help"][..], "--lookup"),
        (&["attention", "--help"][..], "--segments SQ,SK"),
        (&["merge", "--help"][..], "--keep-order"),
    ] {
        let o = vistok(args);
        assert!(o.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&o.stdout).contains(want), "{args:?}");
    }
}

#[test]
fn cuda_backend_is_exact_or_a_clear_error() {
    let dir = Dir::new("cuda");
    let dims = [2, 3, 8, 8];
    let image: Vec<u8> = random_data(dims.iter().product(), 13);
    write_npy(&dir.path("img.npy"), &dims, &image);
    let (img, out) = (dir.path("img.npy"), dir.path("out.npy"));
    let args = ["patchify", "--backend", "cuda", "--patch", "4", "--dtype", "f16", p(&img), p(&out)];
    if !cfg!(feature = "cuda") {
        run_err(&dir, &args, "patchify", "built without CUDA", &["img.npy"]);
        return;
    }
    let o = vistok(&args);
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        common::say_skipped(&format!("no GPU: {err}"));
        assert!(err.contains("no usable GPU"), "{err}");
        assert!(!out.exists());
        return;
    }
    let config = PatchConfig::image(Layout::ChannelsFirst, 4, 4);
    assert_eq!(read_npy(&out).2, le(&lib_forward::<u8, f16>(&config, &dims, &image, Backend::Reference)));
    let back = dir.path("back.npy");
    let args =
        ["unpatchify", "--backend", "cuda", "--patch", "4", "--height", "8", "--width", "8", "--out-dtype", "u8"];
    let mut args = args.to_vec();
    args.extend([p(&out), p(&back)]);
    assert_eq!(run_ok(&args, &back).2, image);
}

// ---------------------------------------------------------------------------------------------
// numpy interop

#[test]
fn numpy_reads_and_writes_what_vistok_does() {
    if !Command::new("python3").args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success()) {
        common::say_skipped("python3 with numpy is not available");
        return;
    }
    let dir = Dir::new("numpy");
    let script = r#"
import subprocess, sys
import numpy as np
exe, d = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
x = rng.integers(0, 256, size=(2, 3, 8, 12), dtype=np.uint8)
np.save(f"{d}/x.npy", x)
def run(*a):
    subprocess.run([exe, "run", *a], check=True)
# timm's order (c, ph, pw), f32 and f16.
run("patchify", "--patch", "4", f"{d}/x.npy", f"{d}/t.npy")
t = np.load(f"{d}/t.npy")
want = x.reshape(2, 3, 2, 4, 3, 4).transpose(0, 2, 4, 1, 3, 5).reshape(2, 6, 48).astype(np.float32)
assert t.dtype == np.float32 and t.shape == (2, 6, 48) and np.array_equal(t, want), "f32"
run("patchify", "--patch", "4", "--dtype", "f16", f"{d}/x.npy", f"{d}/t16.npy")
t16 = np.load(f"{d}/t16.npy")
assert t16.dtype == np.float16 and np.array_equal(t16, want.astype(np.float16)), "f16"
# MAE's patchify on NHWC f32 with normalisation, within an ulp or two of numpy's own.
y = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
np.save(f"{d}/y.npy", y)
run("patchify", "--layout", "nhwc", "--order", "pqc", "--patch", "4", "--mean", "0.5,0,-1", "--std", "2,1,4", f"{d}/y.npy", f"{d}/u.npy")
u = np.load(f"{d}/u.npy")
m, s = np.array([0.5, 0, -1], np.float32), np.array([2, 1, 4], np.float32)
want = ((y - m) / s).reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
assert np.allclose(u, want, rtol=1e-6, atol=1e-6), "pqc"
# And back to u8 exactly; a Fortran-order file is refused.
run("unpatchify", "--patch", "4", "--height", "8", "--width", "12", "--out-dtype", "u8", f"{d}/t.npy", f"{d}/b.npy")
assert np.array_equal(np.load(f"{d}/b.npy"), x), "round trip"
np.save(f"{d}/f.npy", np.asfortranarray(x))
r = subprocess.run([exe, "run", "patchify", "--patch", "4", f"{d}/f.npy", f"{d}/no.npy"], capture_output=True, text=True)
assert r.returncode == 1 and "Fortran" in r.stderr, r.stderr
print("numpy interop ok")
"#;
    let o = Command::new("python3")
        .args(["-c".as_ref(), script.as_ref(), common::cli::vistok_bin().as_os_str(), p(&dir.0).as_ref()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    print!("{}", String::from_utf8_lossy(&o.stdout));
}
