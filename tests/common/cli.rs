//! Harness for the `vistok run` end-to-end tests: a scratch directory, an independent little
//! .npy writer and reader (not vistok's), and running the binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory removed at the end of the test.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("vistok-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The names of the files in the directory, sorted.
    pub fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a version 1.0 .npy file, header padded to 16 bytes (not vistok's 64).
pub fn write_npy_raw(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    write_npy_version(path, 1, descr, shape, data);
}

/// Writes a .npy file the simple way: version `major`.0, header padded to 16 bytes (numpy's
/// old alignment, unlike vistok's 64, so the reader sees a layout it did not write itself).
pub fn write_npy_version(path: &Path, major: u8, descr: &str, shape: &[usize], data: &[u8]) {
    let dims: String = shape.iter().map(|d| format!("{d},")).collect();
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    let prefix = if major == 1 { 10 } else { 12 };
    while (prefix + header.len() + 1) % 16 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend([major, 0]);
    if major == 1 {
        out.extend((header.len() as u16).to_le_bytes());
    } else {
        out.extend((header.len() as u32).to_le_bytes());
    }
    out.extend(header.as_bytes());
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// Little-endian bytes of `data`, by casting (so these tests need a little-endian machine).
pub fn le<T: bytemuck::Pod>(data: &[T]) -> Vec<u8> {
    const { assert!(cfg!(target_endian = "little"), "these tests write little-endian files by casting") };
    bytemuck::cast_slice(data).to_vec()
}

/// Reads a .npy file written by vistok: (descr, shape, data bytes), found by plain string
/// search (independent of vistok's reader).
pub fn read_npy(path: &Path) -> (String, Vec<usize>, Vec<u8>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let len = u16::from_le_bytes([b[8], b[9]]) as usize;
    assert_eq!((10 + len) % 64, 0, "data not 64-byte aligned");
    let h = std::str::from_utf8(&b[10..10 + len]).unwrap();
    assert!(h.ends_with('\n') && h.contains("'fortran_order': False"), "{h}");
    let descr = h.split("'descr': '").nth(1).unwrap().split('\'').next().unwrap().to_string();
    let shape_txt = h.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape = shape_txt.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    (descr, shape, b[10 + len..].to_vec())
}

/// Reads a .npy file of `descr` and `shape` written by vistok, as `T`.
pub fn read_as<T: bytemuck::Pod>(path: &Path, descr: &str, shape: &[usize]) -> Vec<T> {
    let (d, s, bytes) = read_npy(path);
    assert_eq!((d.as_str(), &s[..]), (descr, shape), "{}", path.display());
    bytes.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect()
}

/// The vistok binary under test: `$VISTOK_BIN` if set (scripts/gpu-check.sh runs these tests on
/// a machine where the build path does not exist), else the one cargo built.
pub fn vistok_bin() -> std::ffi::OsString {
    std::env::var_os("VISTOK_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_vistok").into())
}

pub fn vistok(args: &[&str]) -> Output {
    Command::new(vistok_bin()).args(args).output().expect("cannot start vistok")
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `vistok run args...` and expects success; returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let mut all = vec!["run"];
    all.extend(args);
    let o = vistok(&all);
    assert!(o.status.success(), "vistok run {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `vistok run args...` and expects a clean failure: exit code 1 (not a panic's 101), one
/// line on stderr starting `vistok run <cmd>: ` and containing `want`, and only the `inputs`
/// left in `dir` (no output, no temporary file).
pub fn run_err(dir: &Dir, args: &[&str], want: &str, inputs: &[&str]) {
    let mut all = vec!["run"];
    all.extend(args);
    let o = vistok(&all);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "vistok run {args:?}: status {:?}, stderr {err}", o.status);
    assert_eq!(err.trim_end().lines().count(), 1, "vistok run {args:?}: not one line: {err}");
    assert!(err.starts_with(&format!("vistok run {}: ", args[0])), "vistok run {args:?}: prefix: {err}");
    assert!(err.contains(want), "vistok run {args:?}: expected {want:?} in: {err}");
    let mut expected: Vec<String> = inputs.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(dir.files(), expected, "vistok run {args:?} left files behind");
}

/// Runs `vistok run args...` (a `--backend cuda` command) for a test that is exact on a GPU or a
/// clear error without one: `true` when it succeeded (the caller then checks the outputs).
/// Otherwise `false`, after checking the error: without the `cuda` feature a clean one-line
/// "built without CUDA" (only the `inputs` left in `dir`); with it, "no usable GPU", which
/// fails under `VISTOK_REQUIRE_GPU=1` and prints a `skipped:` line otherwise.
pub fn run_cuda(dir: &Dir, args: &[&str], inputs: &[&str]) -> bool {
    if !cfg!(feature = "cuda") {
        run_err(dir, args, "built without CUDA", inputs);
        return false;
    }
    let mut all = vec!["run"];
    all.extend(args);
    let o = vistok(&all);
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("no usable GPU"), "{err}");
        assert!(!super::require_gpu(), "VISTOK_REQUIRE_GPU=1 but: {err}");
        super::say_skipped(&format!("no GPU: {err}"));
        return false;
    }
    true
}
