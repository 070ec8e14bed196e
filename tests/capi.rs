//! The C ABI (feature `capi`): the committed header is current, a C program linked against
//! `libvistok.a` computes what the Rust API computes (bit for bit where the same backend runs)
//! and gets the documented error statuses, and the Python `ctypes` example runs against
//! `libvistok.so` (when numpy is available).
//!
//! Environment: `VISTOK_BLESS=1` rewrites `include/vistok.h`; `CC` picks the C compiler
//! (default `cc`); `VISTOK_REQUIRE_CC=1` / `VISTOK_REQUIRE_NUMPY=1` turn the skips into
//! failures; `VISTOK_PYTHON` picks the interpreter (default `python3`).
#![cfg(feature = "capi")]

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use vistok::argmin::{Codebook, Metric};
use vistok::attention::{Attention, Mask};
use vistok::capi::argmin::*;
use vistok::capi::quant::*;
use vistok::capi::*;
use vistok::merge::{MatchConfig, MergeMode, MergePlan, Selection, SourceMap};
use vistok::{
    bf16, Backend, BitOrder, Fsq, Layout, Lfq, LfqConfig, Normalize, PatchConfig, PatchOrder, Patchify, View, ViewMut,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == value)
}

#[test]
fn header_is_current() {
    let config = cbindgen::Config::from_file(Path::new(ROOT).join("cbindgen.toml")).expect("cbindgen.toml");
    // Only the C ABI's module tree is parsed: `with_crate` would also export every other
    // `pub const` of the crate (tile sizes, limits) into the header.
    let bindings = cbindgen::Builder::new()
        .with_src(Path::new(ROOT).join("src/capi/mod.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen failed");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = Path::new(ROOT).join("include/vistok.h");
    if env_is("VISTOK_BLESS", "1") {
        std::fs::write(&path, &fresh).expect("writing include/vistok.h");
        eprintln!("blessed: wrote {}", path.display());
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/vistok.h is stale (the C ABI changed): regenerate it with \
         `VISTOK_BLESS=1 cargo test --release --all-features --test capi header_is_current` and commit it"
    );
}

/// `target/<profile>/deps`: the test binary is `target/<profile>/deps/capi-<hash>`, and it links
/// `deps/libvistok.rlib`, which rustc wrote in the same invocation as `deps/libvistok.a` and
/// `deps/libvistok.so` (the lib's crate types include staticlib and cdylib, so cargo gives its
/// files no hash suffix). The copies in `target/<profile>/` are only refreshed by `cargo build`,
/// so they may come from another feature set or an older source.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("target/<profile>/deps").to_path_buf();
    for f in ["libvistok.a", "libvistok.so"] {
        assert!(dir.join(f).is_file(), "{} missing: build through `cargo test --features capi`", dir.join(f).display());
    }
    dir
}

/// The C compiler, or `None` (with the skip message) when there is none.
fn c_compiler() -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    match Command::new(&cc).arg("--version").output() {
        Ok(o) if o.status.success() => Some(cc),
        _ if env_is("VISTOK_REQUIRE_CC", "1") => panic!("no C compiler `{cc}` and VISTOK_REQUIRE_CC=1"),
        _ => {
            eprintln!("skipped: no C compiler (`{cc} --version` failed; set CC)");
            None
        }
    }
}

/// The LCG of tests/c/capi_test.c, draw for draw.
struct Lcg(u64);

impl Lcg {
    fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// `k/16` with `|k| ≤ 255`, exact in bf16.
    fn val(&mut self) -> f32 {
        ((self.next_u32() % 511) as i32 - 255) as f32 / 16.0
    }

    fn vals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.val() * scale).collect()
    }
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bf16_bits(v: &[bf16]) -> Vec<u32> {
    v.iter().map(|x| (x.to_bits() as u32) << 16).collect()
}

/// What the C program should print, computed with the Rust API on the same data.
fn expected() -> vistok::Result<BTreeMap<&'static str, Vec<u32>>> {
    let mut e = BTreeMap::new();
    let cpu = Backend::Cpu;
    let ver = |s: &str| s.parse::<u32>().unwrap();
    e.insert(
        "version",
        vec![
            ver(env!("CARGO_PKG_VERSION_MAJOR")),
            ver(env!("CARGO_PKG_VERSION_MINOR")),
            ver(env!("CARGO_PKG_VERSION_PATCH")),
        ],
    );

    // Patchify.
    let mut g = Lcg(1);
    let image: Vec<u8> = (0..2 * 3 * 8 * 12).map(|_| (g.next_u32() % 256) as u8).collect();
    let norm = Normalize::new(1.0 / 255.0, vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225]);
    let plan = Patchify::new(&PatchConfig::image(Layout::ChannelsFirst, 4, 4).normalize(norm), &[2, 3, 8, 12])?;
    let mut tokens = vec![0.0f32; 2 * 6 * 48];
    plan.forward(cpu, View::new(&image, &[2, 3, 8, 12])?, ViewMut::new(&mut tokens, &plan.tokens_dims())?)?;
    e.insert("patchify.tokens", f32_bits(&tokens));
    let image2 = g.vals(5 * 7 * 2, 1.0);
    let cfg = PatchConfig::image(Layout::ChannelsLast, 2, 2).order(PatchOrder::Pqc).pad(true);
    let plan = Patchify::new(&cfg, &[1, 5, 7, 2])?;
    let mut tokens2 = vec![bf16::ZERO; 3 * 4 * 8];
    plan.forward(cpu, View::new(&image2, &[1, 5, 7, 2])?, ViewMut::new(&mut tokens2, &plan.tokens_dims())?)?;
    e.insert("patchify.pad.tokens", bf16_bits(&tokens2));

    // LFQ and BSQ.
    let mut g = Lcg(2);
    let (n, groups, bits) = (37, 2, 5);
    let ch = groups * bits as usize;
    let z = g.vals(n * ch, 1.0);
    let zv = View::new(&z, &[n, ch])?;
    let lfq = Lfq::new(&LfqConfig::new(groups, bits, BitOrder::MsbFirst))?;
    let mut ids = vec![0u32; n * groups];
    lfq.encode(cpu, zv, ViewMut::new(&mut ids, &[n, groups])?)?;
    let mut codes = vec![0.0f32; n * ch];
    lfq.decode(cpu, View::new(&ids, &[n, groups])?, ViewMut::new(&mut codes, &[n, ch])?)?;
    e.insert("lfq.ids", ids.clone());
    e.insert("lfq.codes", f32_bits(&codes));
    let st = lfq.statistics(cpu, View::new(&ids, &[n, groups])?)?;
    e.insert("lfq.stats.ones", st.ones.iter().map(|&c| c as u32).collect());
    e.insert("lfq.stats.histogram", st.histogram.unwrap().iter().map(|&c| c as u32).collect());
    let bsq = Lfq::new(&LfqConfig::new(groups, bits, BitOrder::LsbFirst).scale(2.0).spherical(true))?;
    let mut u = vec![0.0f32; n * ch];
    bsq.encode_normalized(cpu, zv, ViewMut::new(&mut ids, &[n, groups])?, ViewMut::new(&mut u, &[n, ch])?)?;
    bsq.decode(cpu, View::new(&ids, &[n, groups])?, ViewMut::new(&mut codes, &[n, ch])?)?;
    e.insert("bsq.ids", ids);
    e.insert("bsq.u", f32_bits(&u));
    e.insert("bsq.codes", f32_bits(&codes));

    // FSQ.
    let mut g = Lcg(3);
    let fsq = Fsq::new(&[8, 5, 5, 5])?;
    let z = g.vals(41 * 4, 0.25);
    let mut ids = vec![0u32; 41];
    fsq.encode(cpu, View::new(&z, &[41, 4])?, ViewMut::new(&mut ids, &[41])?)?;
    let mut codes = vec![0.0f32; 41 * 4];
    fsq.decode(cpu, View::new(&ids, &[41])?, ViewMut::new(&mut codes, &[41, 4])?)?;
    let st = fsq.statistics(cpu, View::new(&ids, &[41])?)?;
    e.insert("fsq.stats.levels", st.levels.unwrap().concat().iter().map(|&c| c as u32).collect());
    e.insert("fsq.stats.histogram", st.histogram.unwrap().iter().map(|&c| c as u32).collect());
    e.insert("fsq.ids", ids);
    e.insert("fsq.codes", f32_bits(&codes));

    // Codebook argmin, f32 L2 and bf16 cosine.
    let mut g = Lcg(4);
    let (k, d) = (50, 12);
    let entries = g.vals(k * d, 1.0);
    let x = g.vals(21 * d, 1.0);
    let (mut idx, mut dist) = (vec![0u32; 21], vec![0.0f32; 21]);
    let cb = Codebook::new(View::new(&entries, &[k, d])?, Metric::L2)?;
    cb.argmin(
        cpu,
        View::new(&x, &[3, 7, d])?,
        ViewMut::new(&mut idx, &[3, 7])?,
        Some(ViewMut::new(&mut dist, &[3, 7])?),
    )?;
    e.insert("argmin.f32.idx", idx.clone());
    e.insert("argmin.f32.dist", f32_bits(&dist));
    let eb: Vec<bf16> = entries.iter().map(|&v| bf16::from_f32(v)).collect();
    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let cb = Codebook::new(View::new(&eb, &[k, d])?, Metric::Cosine)?;
    cb.argmin(
        cpu,
        View::new(&xb, &[3, 7, d])?,
        ViewMut::new(&mut idx, &[3, 7])?,
        Some(ViewMut::new(&mut dist, &[3, 7])?),
    )?;
    e.insert("argmin.bf16.idx", idx);
    e.insert("argmin.bf16.dist", f32_bits(&dist));

    // Attention, f32, causal, grouped-query (2 heads, 1 key/value head).
    let mut g = Lcg(5);
    let (nh, n, d) = (2, 19, 16);
    let q = g.vals(nh * n * d, 0.25);
    let k = g.vals(n * d, 0.25);
    let v = g.vals(n * d, 1.0);
    let (mut o, mut lse) = (vec![0.0f32; nh * n * d], vec![0.0f32; nh * n]);
    let kd = [1, 1, n, d];
    Attention::new().mask(Mask::Causal).forward_lse(
        cpu,
        View::new(&q, &[1, nh, n, d])?,
        View::new(&k, &kd)?,
        View::new(&v, &kd)?,
        ViewMut::new(&mut o, &[1, nh, n, d])?,
        ViewMut::new(&mut lse, &[1, nh, n])?,
    )?;
    e.insert("attn.o", f32_bits(&o));
    e.insert("attn.lse", f32_bits(&lse));

    // Merge: plan, mean, unmerge, weighted.
    let mut g = Lcg(6);
    let (b, n, cm, c, r) = (2, 16, 8, 6, 5);
    let o = n - r;
    let metric = g.vals(b * n * cm, 1.0);
    let x = g.vals(b * n * c, 1.0);
    let sizes: Vec<f32> = (0..b * n).map(|_| (1 + g.next_u32() % 4) as f32).collect();
    let plan = MergePlan::bipartite(cpu, View::new(&metric, &[b, n, cm])?, &MatchConfig::new(r).class_token(true))?;
    e.insert("merge.slots", plan.slots().to_vec());
    let mut y = vec![0.0f32; b * o * c];
    plan.merge(cpu, View::new(&x, &[b, n, c])?, MergeMode::Mean, ViewMut::new(&mut y, &[b, o, c])?)?;
    let mut back = vec![0.0f32; b * n * c];
    plan.unmerge(cpu, View::new(&y, &[b, o, c])?, ViewMut::new(&mut back, &[b, n, c])?)?;
    e.insert("merge.mean", f32_bits(&y));
    e.insert("merge.unmerge", f32_bits(&back));
    let mut sw = vec![0.0f32; b * o];
    plan.merge_weighted(
        cpu,
        View::new(&x, &[b, n, c])?,
        Some(View::new(&sizes, &[b, n])?),
        ViewMut::new(&mut y, &[b, o, c])?,
        ViewMut::new(&mut sw, &[b, o])?,
    )?;
    e.insert("merge.wavg", f32_bits(&y));
    e.insert("merge.wavg.sizes", f32_bits(&sw));

    // A source map across two layers, its unmerge and size bias.
    let (r2, o2) = (3, o - 3);
    let mut y1 = vec![0.0f32; b * o * c];
    plan.merge(cpu, View::new(&x, &[b, n, c])?, MergeMode::Mean, ViewMut::new(&mut y1, &[b, o, c])?)?;
    let plan2 = MergePlan::bipartite(cpu, View::new(&y1, &[b, o, c])?, &MatchConfig::new(r2))?;
    let mut map = SourceMap::identity(b, n)?;
    map.apply(&plan)?;
    map.apply(&plan2)?;
    e.insert("merge.map.slots", map.slots().to_vec());
    e.insert("merge.map.sizes", f32_bits(&map.sizes()));
    let mut y2 = vec![0.0f32; b * o2 * c];
    plan2.merge(cpu, View::new(&y1, &[b, o, c])?, MergeMode::Mean, ViewMut::new(&mut y2, &[b, o2, c])?)?;
    let mut back2 = vec![0.0f32; b * n * c];
    map.unmerge(cpu, View::new(&y2, &[b, o2, c])?, ViewMut::new(&mut back2, &[b, n, c])?)?;
    e.insert("merge.map.unmerge", f32_bits(&back2));
    let mut bias = vec![0.0f32; b * o2];
    vistok::merge::size_bias(View::new(&map.sizes(), &[b, o2])?, ViewMut::new(&mut bias, &[b, o2])?)?;
    e.insert("merge.size_bias", f32_bits(&bias));

    // Pruning: top-k with a class token and the fused token; DivPrune and a gather.
    let (k, kd) = (4, 5);
    let score: Vec<f32> = (0..b * n).map(|_| (g.next_u32() % 64) as f32 / 64.0).collect();
    let sel = Selection::top_k(cpu, View::new(&score, &[b, n])?, k, true)?;
    e.insert("prune.topk.kept", (0..b).flat_map(|i| sel.kept(i).to_vec()).collect());
    let mut top = vec![0.0f32; b * (k + 2) * c];
    sel.gather_fused(
        cpu,
        View::new(&x, &[b, n, c])?,
        View::new(&score, &[b, n])?,
        ViewMut::new(&mut top, &[b, k + 2, c])?,
    )?;
    e.insert("prune.topk.fused", f32_bits(&top));
    let sel = Selection::div_prune(cpu, View::new(&metric, &[b, n, cm])?, kd, false)?;
    e.insert("prune.div.kept", (0..b).flat_map(|i| sel.kept(i).to_vec()).collect());
    let mut div = vec![0.0f32; b * kd * c];
    sel.gather(cpu, View::new(&x, &[b, n, c])?, ViewMut::new(&mut div, &[b, kd, c])?)?;
    e.insert("prune.div.gather", f32_bits(&div));

    // Residual quantization: three stages (K = 9, 7, 5; D = 6), f32 and bf16 (the bf16 stages
    // quantized from the f32 ones, recon in f32).
    let mut g = Lcg(8);
    let d = 6;
    let ks = [9, 7, 5];
    let scales = [1.0, 0.25, 0.0625];
    let stages: Vec<Vec<f32>> = ks.iter().zip(scales).map(|(&k, sc)| g.vals(k * d, sc)).collect();
    let x = g.vals(4 * 3 * d, 1.0);
    /// Indices `[4, 3, 3]` and the f32 reconstruction `[4, 3, d]` through the three stages.
    fn residual<T: vistok::Float>(stages: &[Vec<T>], ks: [usize; 3], x: &[T]) -> vistok::Result<(Vec<u32>, Vec<f32>)> {
        let d = x.len() / 12;
        let rq = vistok::ResidualCodebooks::new(
            stages
                .iter()
                .zip(ks)
                .map(|(e, k)| Codebook::new(View::new(e, &[k, d])?, Metric::L2))
                .collect::<Result<_, _>>()?,
        )?;
        let (mut idx, mut recon) = (vec![0u32; 4 * 3 * 3], vec![0.0f32; 4 * 3 * d]);
        rq.quantize(
            Backend::Cpu,
            View::new(x, &[4, 3, d])?,
            ViewMut::new(&mut idx, &[4, 3, 3])?,
            Some(ViewMut::new(&mut recon, &[4, 3, d])?),
        )?;
        Ok((idx, recon))
    }
    let (idx, recon) = residual(&stages, ks, &x)?;
    e.insert("residual.f32.idx", idx);
    e.insert("residual.f32.recon", f32_bits(&recon));
    let to_bf16 = |v: &[f32]| v.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<bf16>>();
    let stages_b: Vec<Vec<bf16>> = stages.iter().map(|e| to_bf16(e)).collect();
    let (idx, recon) = residual(&stages_b, ks, &to_bf16(&x))?;
    e.insert("residual.bf16.idx", idx);
    e.insert("residual.bf16.recon", f32_bits(&recon));
    Ok(e)
}

/// Parses the C program's `name: hex hex …` lines.
fn parse(stdout: &str) -> BTreeMap<String, Vec<u32>> {
    stdout
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, vals) = l.split_once(':').unwrap_or_else(|| panic!("bad line from the C program: {l}"));
            let vals = vals.split_whitespace().map(|v| u32::from_str_radix(v, 16).expect("hex value")).collect();
            (name.to_string(), vals)
        })
        .collect()
}

#[test]
fn c_program_matches_the_rust_api() {
    let Some(cc) = c_compiler() else { return };
    let lib = lib_dir();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vistok_capi_test");
    let out = Command::new(&cc)
        .args(["-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(Path::new(ROOT).join("include"))
        .arg(Path::new(ROOT).join("tests/c/capi_test.c"))
        .arg(lib.join("libvistok.a"))
        .args(["-lm", "-lpthread", "-ldl", "-o"])
        .arg(&exe)
        .output()
        .expect("running the C compiler");
    assert!(out.status.success(), "compiling tests/c/capi_test.c failed:\n{}", String::from_utf8_lossy(&out.stderr));

    let run = Command::new(&exe).output().expect("running the C program");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "the C program's own checks failed:\n{stderr}\n{stdout}");
    let summary = stdout.lines().find(|l| l.starts_with("# checks:")).expect("summary line");
    eprintln!("C program: {summary}");
    if let Some(cuda) = stdout.lines().find(|l| l.starts_with("# cuda:")) {
        eprintln!("C program: {}", cuda.trim_start_matches("# "));
    }

    let got = parse(&stdout);
    let want = expected().expect("the Rust side failed");
    let got_names: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(got_names, want.keys().copied().collect::<Vec<_>>(), "result arrays");
    for (name, w) in &want {
        let g = &got[*name];
        assert_eq!(g.len(), w.len(), "{name}: length");
        if name.starts_with("attn.") {
            // Attention is judged within a tolerance (the same cpu code runs on both sides, so
            // this is in practice exact too).
            for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
                let (a, b) = (f32::from_bits(a), f32::from_bits(b));
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{name}[{i}]: C {a} vs Rust {b}");
            }
        } else {
            // Discrete outputs, and floats from the same backend: bit for bit.
            if let Some(i) = g.iter().zip(w).position(|(a, b)| a != b) {
                panic!("{name}[{i}]: C {:#010x} vs Rust {:#010x}", g[i], w[i]);
            }
        }
    }
}

#[test]
fn python_ctypes_example() {
    let py = std::env::var("VISTOK_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&py).args(["-c", "import numpy"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match &probe {
            Ok(o) => String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("").to_string(),
            Err(e) => e.to_string(),
        };
        assert!(!env_is("VISTOK_REQUIRE_NUMPY", "1"), "numpy not available ({py}: {why}) and VISTOK_REQUIRE_NUMPY=1");
        eprintln!("skipped: numpy not available ({py}: {why})");
        return;
    }
    let so = lib_dir().join("libvistok.so");
    let out = Command::new(&py)
        .arg(Path::new(ROOT).join("examples/python/vistok_ctypes.py"))
        .arg(&so)
        .output()
        .expect("running the Python example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "examples/python/vistok_ctypes.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

fn last_error() -> String {
    // SAFETY: vistok_last_error returns a valid NUL-terminated string owned by this thread.
    unsafe { CStr::from_ptr(vistok_last_error()) }.to_string_lossy().into_owned()
}

/// The ABI called from Rust, so that it is exercised even without a C compiler.
#[test]
fn the_abi_from_rust() {
    let (n, groups, bits) = (9usize, 3usize, 4u32);
    let ch = groups * bits as usize;
    let z = Lcg(7).vals(n * ch, 1.0);
    let cfg = VistokLfqConfig { groups, bits, order: VISTOK_BIT_ORDER_LSB_FIRST, scale: 0.0, spherical: 0 };
    let mut lfq = std::ptr::null_mut();
    // SAFETY: valid pointers to locals throughout; the handle is freed once at the end.
    unsafe {
        assert_eq!(vistok_lfq_new(&cfg, &mut lfq), VistokStatus::Ok);
        let zd = [n, ch];
        let mut ids = vec![u32::MAX; n * groups];
        let s = vistok_lfq_encode(
            lfq,
            VISTOK_BACKEND_CPU,
            VISTOK_DTYPE_F32,
            z.as_ptr().cast(),
            zd.as_ptr(),
            2,
            ids.as_mut_ptr(),
            ids.len(),
        );
        assert_eq!(s, VistokStatus::Ok, "{}", last_error());
        assert_eq!(last_error(), "");
        let mut want = vec![0u32; n * groups];
        let plan = Lfq::new(&LfqConfig::new(groups, bits, BitOrder::LsbFirst)).unwrap();
        plan.encode(Backend::Reference, View::new(&z, &zd).unwrap(), ViewMut::new(&mut want, &[n, groups]).unwrap())
            .unwrap();
        assert_eq!(ids, want);

        let s = vistok_lfq_encode(
            lfq,
            VISTOK_BACKEND_CPU,
            VISTOK_DTYPE_F32,
            z.as_ptr().cast(),
            zd.as_ptr(),
            2,
            ids.as_mut_ptr(),
            ids.len() + 1,
        );
        assert_eq!(s, VistokStatus::Length);
        assert!(last_error().contains("ids"), "{}", last_error());
        let s = vistok_lfq_encode(
            lfq,
            VISTOK_BACKEND_CPU,
            VISTOK_DTYPE_F32,
            std::ptr::null(),
            zd.as_ptr(),
            2,
            ids.as_mut_ptr(),
            ids.len(),
        );
        assert_eq!(s, VistokStatus::NullPointer);
        let s = vistok_lfq_encode(
            lfq,
            VISTOK_BACKEND_CPU,
            VISTOK_DTYPE_F32,
            z.as_ptr().cast(),
            std::ptr::null(),
            7,
            ids.as_mut_ptr(),
            ids.len(),
        );
        assert_eq!(s, VistokStatus::Shape, "{}", last_error());
        vistok_lfq_free(lfq);

        // A codebook whose dtype disagrees with x, and a lookup index out of range.
        let e = [0.0f32, 1.0, 1.0, 0.0];
        let mut cb = std::ptr::null_mut();
        assert_eq!(
            vistok_codebook_new(VISTOK_DTYPE_F32, e.as_ptr().cast(), [2, 2].as_ptr(), 2, VISTOK_METRIC_L2, &mut cb),
            VistokStatus::Ok
        );
        let xb = [bf16::ONE; 2];
        let mut idx = [0u32; 1];
        let s = vistok_codebook_argmin(
            cb,
            VISTOK_BACKEND_CPU,
            VISTOK_DTYPE_BF16,
            xb.as_ptr().cast(),
            [1, 2].as_ptr(),
            2,
            idx.as_mut_ptr(),
            1,
            std::ptr::null_mut(),
            0,
        );
        assert_eq!(s, VistokStatus::Unsupported, "{}", last_error());
        let mut out = [0.0f32; 2];
        let s = vistok_codebook_lookup(
            cb,
            VISTOK_BACKEND_CPU,
            [2u32].as_ptr(),
            [1].as_ptr(),
            1,
            VISTOK_DTYPE_F32,
            out.as_mut_ptr().cast(),
            2,
        );
        assert_eq!(s, VistokStatus::Invalid, "{}", last_error());
        vistok_codebook_free(cb);
        vistok_codebook_free(std::ptr::null_mut());
    }
}

/// f16 through the ABI (the C program covers f32 and bf16): the dtype value must reach the
/// f16 kernels, and a codebook / query dtype mismatch is an error status, not a reinterpretation.
#[test]
fn f16_through_the_abi() {
    let (n, k, d) = (23usize, 37usize, 5usize);
    let to_f16 = |v: Vec<f32>| v.into_iter().map(vistok::f16::from_f32).collect::<Vec<_>>();
    let entries = to_f16(Lcg(11).vals(k * d, 1.0));
    let x = to_f16(Lcg(12).vals(n * d, 1.0));
    let (cd, xd) = ([k, d], [n, d]);
    let mut cb = std::ptr::null_mut();
    let (mut idx, mut dist) = (vec![u32::MAX; n], vec![f32::NAN; n]);
    // SAFETY: valid pointers to locals; the handle is freed once at the end.
    unsafe {
        let s =
            vistok_codebook_new(VISTOK_DTYPE_F16, entries.as_ptr().cast(), cd.as_ptr(), 2, VISTOK_METRIC_L2, &mut cb);
        assert_eq!(s, VistokStatus::Ok, "{}", last_error());
        let s = vistok_codebook_argmin(
            cb,
            VISTOK_BACKEND_CPU,
            VISTOK_DTYPE_F16,
            x.as_ptr().cast(),
            xd.as_ptr(),
            2,
            idx.as_mut_ptr(),
            n,
            dist.as_mut_ptr(),
            n,
        );
        assert_eq!(s, VistokStatus::Ok, "{}", last_error());
        let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(v.to_f32())).collect();
        let s = vistok_codebook_argmin(
            cb,
            VISTOK_BACKEND_CPU,
            VISTOK_DTYPE_BF16,
            xb.as_ptr().cast(),
            xd.as_ptr(),
            2,
            idx.as_mut_ptr(),
            n,
            std::ptr::null_mut(),
            0,
        );
        assert_ne!(s, VistokStatus::Ok, "a bf16 query against an f16 codebook must be refused");
        assert!(!last_error().is_empty());
        vistok_codebook_free(cb);
    }
    let rust = Codebook::new(View::new(&entries, &cd).unwrap(), Metric::L2).unwrap();
    let (mut want_idx, mut want_dist) = (vec![0u32; n], vec![0.0f32; n]);
    rust.argmin(
        Backend::Cpu,
        View::new(&x, &xd).unwrap(),
        ViewMut::new(&mut want_idx, &[n]).unwrap(),
        Some(ViewMut::new(&mut want_dist, &[n]).unwrap()),
    )
    .unwrap();
    // The first call's results (the refused second call must not have changed them).
    assert_eq!(idx, want_idx);
    assert_eq!(
        dist.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want_dist.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );

    // LFQ on f16 input.
    let (groups, bits) = (2usize, 6u32);
    let z = to_f16(Lcg(13).vals(n * groups * bits as usize, 1.0));
    let zd = [n, groups * bits as usize];
    let cfg = VistokLfqConfig { groups, bits, order: VISTOK_BIT_ORDER_MSB_FIRST, scale: 0.0, spherical: 0 };
    let mut lfq = std::ptr::null_mut();
    let mut ids = vec![u32::MAX; n * groups];
    // SAFETY: as above.
    unsafe {
        assert_eq!(vistok_lfq_new(&cfg, &mut lfq), VistokStatus::Ok);
        let s = vistok_lfq_encode(
            lfq,
            VISTOK_BACKEND_CPU,
            VISTOK_DTYPE_F16,
            z.as_ptr().cast(),
            zd.as_ptr(),
            2,
            ids.as_mut_ptr(),
            ids.len(),
        );
        assert_eq!(s, VistokStatus::Ok, "{}", last_error());
        vistok_lfq_free(lfq);
    }
    let mut want = vec![0u32; n * groups];
    Lfq::new(&LfqConfig::new(groups, bits, BitOrder::MsbFirst))
        .unwrap()
        .encode(Backend::Reference, View::new(&z, &zd).unwrap(), ViewMut::new(&mut want, &[n, groups]).unwrap())
        .unwrap();
    assert_eq!(ids, want);
}

/// A failing call writes nothing: every out-pointer is checked before the first is written.
#[test]
fn failing_out_pointer_calls_write_nothing() {
    let (mut major, mut patch) = (99u32, 99u32);
    // SAFETY: valid pointers to locals, and null (an error).
    let s = unsafe { vistok_version(&mut major, std::ptr::null_mut(), &mut patch) };
    assert_eq!(s, VistokStatus::NullPointer);
    assert_eq!((major, patch), (99, 99), "vistok_version wrote before failing");
    // A misaligned `out` for a new handle is refused before anything is allocated.
    let mut raw = [0u8; 16];
    let misaligned = raw.as_mut_ptr().wrapping_add(1).cast::<*mut VistokFsq>();
    let levels = [8u32, 5, 5, 5];
    // SAFETY: `levels` is valid; `misaligned` is within `raw` but misaligned (an error, no write).
    let s = unsafe { vistok_fsq_new(levels.as_ptr(), levels.len(), misaligned) };
    assert_eq!(s, VistokStatus::Alignment, "{}", last_error());
    assert!(raw.iter().all(|&b| b == 0), "a misaligned out was written");
}
