//! The CUDA attention backend against the f64 reference, judged as tests/attention.rs judges
//! the cpu backend (FlashAttention's rule: the kernel's error against the oracle at most twice
//! the error of the naive computation in the same dtype, plus a small absolute term).
//!
//! Without a GPU (always): the committed `kernels/attention.ptx` is what
//! `kernels/gen_attention.py` writes, every launched entry exists with one parameter block of
//! the size Rust passes, and (with the `cuda` feature) the Rust constants and field offsets agree
//! with the PTX `// abi` lines. With a GPU (skipped with a `skipped:` line when there is none,
//! failing when `VISTOK_REQUIRE_GPU=1`): random shapes (Nq ≠ Nk, 1, odd, several tiles), every
//! mask, both biases, GQA, both layouts, every dtype and supported D; fully masked rows; extreme
//! logits; bad input. Outputs are poisoned before each launch and every element is checked.

mod common;

use std::collections::BTreeMap;

const PTX: &str = include_str!("../kernels/attention.ptx");
const PARAM_BYTES: usize = 192;
/// `(entry, threads)` in file order.
const ENTRIES: [(&str, usize); 7] = [
    ("attention_bf16_d32", 128),
    ("attention_bf16_d64", 128),
    ("attention_bf16_d128", 256),
    ("attention_f16_d32", 128),
    ("attention_f16_d64", 128),
    ("attention_f16_d128", 256),
    ("attention_f32", 128),
];

/// Says a test was skipped where a person sees it (stderr is not captured by the harness).
fn say_skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

/// `(name, parameter lines, .maxntid)` of every entry.
fn entries(ptx: &str) -> Vec<(String, Vec<String>, Option<String>)> {
    let lines: Vec<&str> = ptx.lines().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < lines.len() {
        if let Some(rest) = lines[i].trim().strip_prefix(".visible .entry ") {
            let name = rest.trim_end_matches('(').trim().to_string();
            let mut params = vec![];
            i += 1;
            while lines[i].trim() != ")" {
                params.push(lines[i].trim().trim_end_matches(',').to_string());
                i += 1;
            }
            let mut maxntid = None;
            while lines[i].trim() != "{" {
                if let Some(v) = lines[i].trim().strip_prefix(".maxntid ") {
                    maxntid = Some(v.to_string());
                }
                i += 1;
            }
            out.push((name, params, maxntid));
        }
        i += 1;
    }
    out
}

fn abi() -> BTreeMap<String, usize> {
    PTX.lines()
        .filter_map(|l| l.strip_prefix("// abi "))
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_string(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn committed_ptx_is_what_the_generator_writes() {
    let roots = [std::env::var_os("CARGO_MANIFEST_DIR").map(std::path::PathBuf::from), std::env::current_dir().ok()];
    let Some(gen) = roots.into_iter().flatten().map(|r| r.join("kernels/gen_attention.py")).find(|p| p.is_file())
    else {
        say_skipped("kernels/gen_attention.py not found (run from the crate root)");
        return;
    };
    match std::process::Command::new("python3").arg(&gen).arg("--stdout").output() {
        Ok(out) if out.status.success() => {
            assert!(
                out.stdout == PTX.as_bytes(),
                "kernels/attention.ptx is stale: run python3 kernels/gen_attention.py"
            )
        }
        Ok(out) => panic!("{}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => say_skipped(&format!("python3 not available ({e})")),
    }
}

#[test]
fn every_entry_exists_with_one_param_block_of_the_right_size() {
    let found = entries(PTX);
    let names: Vec<&str> = found.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, ENTRIES.iter().map(|e| e.0).collect::<Vec<_>>(), "entries and their order");
    for ((name, params, maxntid), (_, threads)) in found.iter().zip(ENTRIES) {
        assert_eq!(params, &[format!(".param .align 8 .b8 p[{PARAM_BYTES}]")], "{name}: parameter list");
        assert_eq!(maxntid.as_deref(), Some(format!("{threads}, 1, 1").as_str()), "{name}: .maxntid");
    }
    let abi = abi();
    assert_eq!(abi["attention size"], PARAM_BYTES);
    let directive = |d: &str| PTX.lines().find_map(|l| l.strip_prefix(d)).map(str::trim);
    assert_eq!(directive(".version "), Some("8.0"));
    assert_eq!(directive(".target "), Some("sm_80"));
    assert!(PTX.lines().any(|l| l.starts_with("// vistok: max-regs ")));
}

#[cfg(feature = "cuda")]
#[test]
fn launcher_agrees_with_the_ptx() {
    use vistok::cuda::attention as ca;
    assert_eq!(ca::KERNEL_NAMES.to_vec(), ENTRIES.iter().map(|e| e.0).collect::<Vec<_>>());
    assert_eq!(ca::PARAM_BYTES, PARAM_BYTES);
    assert_eq!(ca::PTX, PTX);
    let abi = abi();
    let mut in_ptx: Vec<(String, usize)> = abi
        .iter()
        .filter_map(|(k, &v)| k.strip_prefix("attention ").filter(|f| *f != "size").map(|f| (f.to_string(), v)))
        .collect();
    in_ptx.sort();
    let mut in_rust: Vec<(String, usize)> = ca::param_offsets().into_iter().map(|(f, o)| (f.to_string(), o)).collect();
    in_rust.sort();
    assert_eq!(in_rust, in_ptx, "field offsets, Rust vs PTX");
    assert_eq!(
        (abi["flag lse"], abi["flag bias"], abi["flag seg"]),
        (ca::FLAG_LSE as usize, ca::FLAG_BIAS as usize, ca::FLAG_SEG as usize)
    );
    assert_eq!(
        (abi["bn"], abi["f32 bm"], abi["f32 bn"], abi["f32 dmax"]),
        (ca::BN, ca::F32_BM, ca::F32_BN, ca::F32_DMAX)
    );
    // Threads per entry: 32 per warp of TC_HEAD_DIMS, F32_THREADS for f32.
    for (name, threads) in ENTRIES {
        let want = if name == "attention_f32" {
            ca::F32_THREADS as usize
        } else {
            let d: usize = name.rsplit_once("_d").unwrap().1.parse().unwrap();
            32 * ca::TC_HEAD_DIMS.iter().find(|x| x.0 == d).unwrap().1 as usize
        };
        assert_eq!(threads, want, "{name}");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_tests_skipped_without_cuda_feature() {
    if std::env::var("VISTOK_REQUIRE_GPU").as_deref() == Ok("1") {
        panic!("VISTOK_REQUIRE_GPU=1 but this test binary was built without the cuda feature");
    }
    say_skipped("built without the cuda feature");
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::OnceLock;

    use super::common::{poison, Rng};
    use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use vistok::attention::{Attention, Bias, Mask, QkvLayout};
    use vistok::cuda::attention::AttentionKernel;
    use vistok::cuda::Gpu;
    use vistok::{bf16, f16, Backend, DType, Error, Float, View, ViewMut};

    fn gpu() -> Option<&'static Gpu> {
        static GPU: OnceLock<Result<Gpu, Error>> = OnceLock::new();
        match GPU.get_or_init(|| Gpu::new(0)) {
            Ok(g) => Some(g),
            Err(e) => {
                assert!(
                    std::env::var("VISTOK_REQUIRE_GPU").as_deref() != Ok("1"),
                    "VISTOK_REQUIRE_GPU=1 but no usable CUDA device: {e}"
                );
                super::say_skipped(&format!("no CUDA device ({e})"));
                None
            }
        }
    }

    // ------------------------------------------------------------ problems (as tests/attention.rs)

    #[derive(Debug, Clone, Copy)]
    struct Dims {
        b: usize,
        h: usize,
        hkv: usize,
        nq: usize,
        nk: usize,
        d: usize,
        layout: QkvLayout,
    }

    impl Dims {
        fn q(&self) -> [usize; 4] {
            match self.layout {
                QkvLayout::Bhnd => [self.b, self.h, self.nq, self.d],
                QkvLayout::Bnhd => [self.b, self.nq, self.h, self.d],
            }
        }
        fn kv(&self) -> [usize; 4] {
            match self.layout {
                QkvLayout::Bhnd => [self.b, self.hkv, self.nk, self.d],
                QkvLayout::Bnhd => [self.b, self.nk, self.hkv, self.d],
            }
        }
        fn lse(&self) -> [usize; 3] {
            [self.b, self.h, self.nq]
        }
        fn at(&self, heads: usize, n: usize, b: usize, head: usize, t: usize) -> usize {
            match self.layout {
                QkvLayout::Bhnd => ((b * heads + head) * n + t) * self.d,
                QkvLayout::Bnhd => ((b * n + t) * heads + head) * self.d,
            }
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum MaskKind {
        None,
        Causal,
        Window(usize, usize),
        Segments,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum BiasKind {
        None,
        Key(bool),
        Full(bool, bool),
    }

    #[derive(Debug, Clone, Copy)]
    struct Opts {
        mask: MaskKind,
        bias: BiasKind,
        scale: Option<f32>,
        amp: f32,
    }

    struct Data<T> {
        q: Vec<T>,
        k: Vec<T>,
        v: Vec<T>,
        bias: Vec<f32>,
        bias_dims: Vec<usize>,
        qseg: Vec<u32>,
        kseg: Vec<u32>,
    }

    fn make<T: Float>(dm: &Dims, o: &Opts, seed: u64) -> Data<T> {
        let mut r = Rng(seed);
        let mut vals = |n: usize, amp: f32| -> Vec<T> { (0..n).map(|_| T::from_f32(r.uniform(-amp, amp))).collect() };
        let q = vals(dm.q().iter().product(), o.amp);
        let k = vals(dm.kv().iter().product(), o.amp);
        let v = vals(dm.kv().iter().product(), 1.0);
        let mut r = Rng(seed ^ 0x5eed);
        let bias_dims = match o.bias {
            BiasKind::None => vec![],
            BiasKind::Key(one) => vec![if one { 1 } else { dm.b }, dm.nk],
            BiasKind::Full(b1, h1) => vec![if b1 { 1 } else { dm.b }, if h1 { 1 } else { dm.h }, dm.nq, dm.nk],
        };
        let bias = (0..bias_dims.iter().product::<usize>())
            .map(|_| if r.next_u64().is_multiple_of(13) { f32::NEG_INFINITY } else { r.uniform(-2.0, 2.0) })
            .collect();
        let mut seg = |n: usize| -> Vec<u32> {
            let mut s = 0u32;
            let sorted = !r.next_u64().is_multiple_of(4);
            (0..n)
                .map(|_| {
                    if sorted {
                        s += r.next_u64().is_multiple_of(9) as u32;
                        s
                    } else {
                        (r.next_u64() % 4) as u32
                    }
                })
                .collect()
        };
        let qseg = seg(dm.nq);
        let kseg = seg(dm.nk);
        Data { q, k, v, bias, bias_dims, qseg, kseg }
    }

    fn attention<'a, T: Float>(o: &Opts, dm: &Dims, data: &'a Data<T>) -> Attention<'a> {
        let mut a = Attention::new().layout(dm.layout);
        if let Some(s) = o.scale {
            a = a.scale(s);
        }
        a.mask(match o.mask {
            MaskKind::None => Mask::None,
            MaskKind::Causal => Mask::Causal,
            MaskKind::Window(left, right) => Mask::Window { left, right },
            MaskKind::Segments => Mask::Segments { q: &data.qseg, k: &data.kseg },
        })
        .bias(match o.bias {
            BiasKind::None => Bias::None,
            BiasKind::Key(_) => Bias::Key(View::new(&data.bias, &data.bias_dims).unwrap()),
            BiasKind::Full(..) => Bias::Full(View::new(&data.bias, &data.bias_dims).unwrap()),
        })
    }

    /// The f64 reference on the inputs widened to f32, rounded once to f32.
    fn oracle<T: Float>(a: &Attention<'_>, dm: &Dims, data: &Data<T>) -> (Vec<f32>, Vec<f32>) {
        let wide = |x: &[T]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let (q, k, v) = (wide(&data.q), wide(&data.k), wide(&data.v));
        let mut out = vec![f32::NAN; dm.q().iter().product()];
        let mut lse = vec![f32::NAN; dm.lse().iter().product()];
        a.forward_lse(
            Backend::Reference,
            View::new(&q, &dm.q()).unwrap(),
            View::new(&k, &dm.kv()).unwrap(),
            View::new(&v, &dm.kv()).unwrap(),
            ViewMut::new(&mut out, &dm.q()).unwrap(),
            ViewMut::new(&mut lse, &dm.lse()).unwrap(),
        )
        .unwrap();
        (out, lse)
    }

    fn visible(o: &Opts, dm: &Dims, data: &Data<impl Float>, i: usize, j: usize) -> bool {
        let diag = i as i64 + dm.nk as i64 - dm.nq as i64;
        let j64 = j as i64;
        match o.mask {
            MaskKind::None => true,
            MaskKind::Causal => j64 <= diag,
            MaskKind::Window(l, r) => diag - (l.min(1 << 40) as i64) <= j64 && j64 <= diag + r.min(1 << 40) as i64,
            MaskKind::Segments => data.kseg[j] <= data.qseg[i],
        }
    }

    /// The naive computation in the element type (FlashAttention's `attention_ref` without
    /// upcasting), exactly as tests/attention.rs writes it.
    fn naive<T: Float>(o: &Opts, dm: &Dims, data: &Data<T>) -> (Vec<f32>, Vec<f32>) {
        let rt = |x: f32| T::from_f32(x).to_f32();
        let scale = o.scale.unwrap_or((1.0 / (dm.d as f64).sqrt()) as f32);
        let mut out = vec![0.0f32; dm.q().iter().product()];
        let mut lse = vec![0.0f32; dm.lse().iter().product()];
        let group = dm.h / dm.hkv;
        let mut s = vec![0.0f32; dm.nk];
        for b in 0..dm.b {
            for h in 0..dm.h {
                for i in 0..dm.nq {
                    let qi = dm.at(dm.h, dm.nq, b, h, i);
                    let qs: Vec<f32> = data.q[qi..][..dm.d].iter().map(|x| rt(x.to_f32() * scale)).collect();
                    for (j, sj) in s.iter_mut().enumerate() {
                        let kj = dm.at(dm.hkv, dm.nk, b, h / group, j);
                        let dot = qs.iter().zip(&data.k[kj..][..dm.d]).fold(0.0f32, |acc, (x, y)| acc + x * y.to_f32());
                        let mut v = rt(dot);
                        v = match o.bias {
                            BiasKind::None => v,
                            BiasKind::Key(one) => rt(v + data.bias[if one { 0 } else { b * dm.nk } + j]),
                            BiasKind::Full(b1, h1) => {
                                let bb = if b1 { 0 } else { b };
                                let hh = if h1 { 0 } else { h };
                                let heads = if h1 { 1 } else { dm.h };
                                rt(v + data.bias[((bb * heads + hh) * dm.nq + i) * dm.nk + j])
                            }
                        };
                        *sj = if visible(o, dm, data, i, j) { v } else { f32::NEG_INFINITY };
                    }
                    let m = s.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                    let oi = dm.at(dm.h, dm.nq, b, h, i);
                    let li = (b * dm.h + h) * dm.nq + i;
                    if m == f32::NEG_INFINITY {
                        out[oi..][..dm.d].fill(0.0);
                        lse[li] = f32::NEG_INFINITY;
                        continue;
                    }
                    let e: Vec<f32> = s.iter().map(|&x| (x - m).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    let mut acc = vec![0.0f32; dm.d];
                    for (j, ej) in e.iter().enumerate() {
                        let p = rt(ej / sum);
                        let vj = dm.at(dm.hkv, dm.nk, b, h / group, j);
                        for (a, v) in acc.iter_mut().zip(&data.v[vj..][..dm.d]) {
                            *a += p * v.to_f32();
                        }
                    }
                    for (o, a) in out[oi..][..dm.d].iter_mut().zip(&acc) {
                        *o = rt(*a);
                    }
                    lse[li] = m + sum.ln();
                }
            }
        }
        (out, lse)
    }

    /// Largest |got − want| over finite pairs; infinities must match exactly, NaN fails.
    fn max_err(got: impl Iterator<Item = f32>, want: &[f32], what: &str) -> f64 {
        let mut worst = 0.0f64;
        for (n, (g, &w)) in got.zip(want).enumerate() {
            assert!(!g.is_nan(), "{what}[{n}] is NaN (want {w})");
            if w.is_infinite() || g.is_infinite() {
                assert_eq!(g, w, "{what}[{n}]");
                continue;
            }
            worst = worst.max((g as f64 - w as f64).abs());
        }
        worst
    }

    /// As tests/attention.rs: a few f32 ulps of the largest score; half an ulp of 1 for 16-bit
    /// outputs; FlashAttention's 1e−5 (relative) for the lse.
    fn atol<T: Float>(magnitude: f32, lse: bool) -> f64 {
        let f32_term = 8.0 * f32::EPSILON as f64 * magnitude.max(1.0) as f64;
        match T::DTYPE {
            DType::F32 => f32_term,
            _ if lse => 1e-5 * magnitude.max(1.0) as f64,
            DType::BF16 => 2f64.powi(-9),
            _ => 2f64.powi(-12),
        }
    }

    /// Runs the GPU kernel through the device API with poisoned outputs.
    fn run_gpu<T: Float + DeviceRepr + ValidAsZeroBits>(
        gpu: &Gpu,
        a: &Attention<'_>,
        dm: &Dims,
        data: &Data<T>,
    ) -> Result<(Vec<T>, Vec<f32>), Error> {
        let kernel = AttentionKernel::new(gpu, a, T::DTYPE, &dm.q(), &dm.kv())?;
        let s = gpu.stream();
        let one = [poison::<T>()];
        let up = |x: &[T]| s.clone_htod(if x.is_empty() { &one[..] } else { x }).unwrap();
        let (q, k, v) = (up(&data.q), up(&data.k), up(&data.v));
        let (nq_len, _, l_len) = kernel.lens();
        let mut o = s.clone_htod(&vec![poison::<T>(); nq_len.max(1)]).unwrap();
        let mut l = s.clone_htod(&vec![poison::<f32>(); l_len.max(1)]).unwrap();
        let nk_len = data.k.len();
        let (k, v) = (k.slice(0..nk_len), v.slice(0..nk_len));
        {
            let mut ov = o.slice_mut(0..nq_len);
            let mut lv = l.slice_mut(0..l_len);
            kernel.forward_lse(s, &q.slice(0..data.q.len()), &k, &v, &mut ov, &mut lv)?;
        }
        let out = s.clone_dtoh(&o).unwrap();
        let lse = s.clone_dtoh(&l).unwrap();
        gpu.synchronize()?;
        Ok((out[..nq_len].to_vec(), lse[..l_len].to_vec()))
    }

    /// The FlashAttention criterion for one problem; returns (kernel error / naive error).
    fn check<T: Float + DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, dm: &Dims, o: &Opts, seed: u64) -> f64 {
        let data = make::<T>(dm, o, seed);
        let a = attention(o, dm, &data);
        let (want_o, want_l) = oracle(&a, dm, &data);
        let (naive_o, naive_l) = naive(o, dm, &data);
        let en_o = max_err(naive_o.iter().copied(), &want_o, "naive out");
        let en_l = max_err(naive_l.iter().copied(), &want_l, "naive lse");
        let lmax = want_l.iter().filter(|x| x.is_finite()).fold(0.0f32, |a, x| a.max(x.abs()));
        let (got_o, got_l) = run_gpu(gpu, &a, dm, &data).unwrap_or_else(|e| panic!("{dm:?} {o:?}: {e}"));
        let ek_o = max_err(got_o.iter().map(|x| x.to_f32()), &want_o, "out");
        let ek_l = max_err(got_l.iter().copied(), &want_l, "lse");
        let (tol_o, tol_l) = (2.0 * en_o + atol::<T>(lmax, false), 2.0 * en_l + atol::<T>(lmax, true));
        assert!(
            ek_o <= tol_o && ek_l <= tol_l,
            "cuda {:?} {dm:?} {o:?} seed {seed}: out error {ek_o:e} (naive {en_o:e}, tol {tol_o:e}), lse error {ek_l:e} \
             (naive {en_l:e}, tol {tol_l:e})",
            T::DTYPE
        );
        ek_o / en_o.max(1e-30)
    }

    fn random_dims(r: &mut Rng, dtype: DType) -> Dims {
        let pick = |r: &mut Rng, xs: &[usize]| xs[(r.next_u64() % xs.len() as u64) as usize];
        let small = |r: &mut Rng, hi: u64| 1 + (r.next_u64() % hi) as usize;
        let hkv = small(r, 3);
        let g = small(r, 3);
        let nq = if r.next_u64().is_multiple_of(4) { small(r, 3) } else { small(r, 150) };
        let nk = if r.next_u64().is_multiple_of(4) { small(r, 3) } else { (r.next_u64() % 200) as usize };
        let d = match dtype {
            DType::F32 => pick(r, &[1, 3, 8, 17, 32, 33, 64, 80, 128, 200, 256]),
            _ => pick(r, &[32, 64, 128]),
        };
        let layout = if r.next_u64().is_multiple_of(2) { QkvLayout::Bnhd } else { QkvLayout::Bhnd };
        Dims { b: small(r, 2), h: hkv * g, hkv, nq, nk, d, layout }
    }

    fn random_opts(r: &mut Rng) -> Opts {
        let mask = match r.next_u64() % 6 {
            0 => MaskKind::None,
            1 => MaskKind::Causal,
            2 => MaskKind::Window((r.next_u64() % 80) as usize, (r.next_u64() % 80) as usize),
            3 => MaskKind::Window((r.next_u64() % 40) as usize, usize::MAX),
            4 => MaskKind::Window(usize::MAX, (r.next_u64() % 10) as usize),
            _ => MaskKind::Segments,
        };
        let bias = match r.next_u64() % 4 {
            0 => BiasKind::Key(r.next_u64().is_multiple_of(2)),
            1 => BiasKind::Full(r.next_u64().is_multiple_of(2), r.next_u64().is_multiple_of(2)),
            _ => BiasKind::None,
        };
        let scale = match r.next_u64() % 5 {
            0 => Some(r.uniform(0.01, 3.0)),
            1 => Some(-0.7),
            _ => None,
        };
        let amp = [0.5f32, 1.0, 3.0][(r.next_u64() % 3) as usize];
        Opts { mask, bias, scale, amp }
    }

    fn random_family<T: Float + DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, cases: usize, seed: u64) {
        let mut r = Rng(seed);
        let mut worst = 0.0f64;
        let mut elements = 0usize;
        for c in 0..cases {
            let dm = random_dims(&mut r, T::DTYPE);
            let o = random_opts(&mut r);
            worst = worst.max(check::<T>(gpu, &dm, &o, seed.wrapping_add(c as u64)));
            elements += dm.q().iter().product::<usize>();
        }
        println!(
            "cuda {}: {cases} random problems, {elements} output elements, worst error / naive error {worst:.2}",
            T::DTYPE.name()
        );
    }

    #[test]
    fn random_problems_match_the_reference() {
        let Some(gpu) = gpu() else { return };
        random_family::<f32>(gpu, 80, 1);
        random_family::<f16>(gpu, 80, 2);
        random_family::<bf16>(gpu, 80, 3);
    }

    /// Several tiles in both directions, every mask, at every tensor-core D (and f32).
    #[test]
    fn multi_tile_problems_match_the_reference() {
        let Some(gpu) = gpu() else { return };
        let masks = [MaskKind::None, MaskKind::Causal, MaskKind::Window(70, 3), MaskKind::Segments];
        let mut n = 0;
        for (i, mask) in masks.into_iter().enumerate() {
            for (nq, nk) in [(300usize, 300usize), (129, 333), (333, 129)] {
                let o = Opts { mask, bias: BiasKind::None, scale: None, amp: 2.0 };
                for d in [32, 64, 128] {
                    let dm = Dims { b: 1, h: 2, hkv: 1, nq, nk, d, layout: QkvLayout::Bhnd };
                    check::<bf16>(gpu, &dm, &o, 100 + i as u64);
                    check::<f16>(gpu, &dm, &o, 200 + i as u64);
                    n += 2;
                }
                let dm = Dims { b: 1, h: 2, hkv: 2, nq, nk, d: 48, layout: QkvLayout::Bnhd };
                check::<f32>(gpu, &dm, &o, 300 + i as u64);
                n += 1;
            }
        }
        // The FlashAttention rule without the absolute term, where the maximum error is stable.
        let dm = Dims { b: 1, h: 2, hkv: 1, nq: 200, nk: 300, d: 64, layout: QkvLayout::Bhnd };
        let o = Opts { mask: MaskKind::Causal, bias: BiasKind::Key(true), scale: None, amp: 2.0 };
        let (rb, rh) = (check::<bf16>(gpu, &dm, &o, 53), check::<f16>(gpu, &dm, &o, 52));
        println!("cuda: {n} multi-tile problems; 200x300 causal + key bias: error / naive bf16 {rb:.2}, f16 {rh:.2}");
        assert!(rb <= 2.0 && rh <= 2.0, "bf16 {rb}, f16 {rh}");
    }

    /// Rows with no visible key: exactly 0 and lse −∞ (never NaN), all dtypes.
    #[test]
    fn fully_masked_rows() {
        let Some(gpu) = gpu() else { return };
        fn one<T: Float + DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, dm: &Dims, o: &Opts, data: &Data<T>) -> usize {
            let a = attention(o, dm, data);
            let (out, lse) = run_gpu(gpu, &a, dm, data).unwrap();
            let masked: Vec<usize> = (0..dm.nq).filter(|&i| (0..dm.nk).all(|j| !visible(o, dm, data, i, j))).collect();
            assert!(!masked.is_empty(), "{dm:?} {o:?} has no fully masked row");
            for b in 0..dm.b {
                for h in 0..dm.h {
                    for &i in &masked {
                        assert_eq!(lse[(b * dm.h + h) * dm.nq + i], f32::NEG_INFINITY, "{dm:?} {o:?} row {i}");
                        let oi = dm.at(dm.h, dm.nq, b, h, i);
                        assert!(out[oi..][..dm.d].iter().all(|x| x.to_f32().to_bits() == 0), "{dm:?} {o:?} row {i}");
                    }
                }
            }
            masked.len()
        }
        let mut rows = 0;
        for d in [32usize, 64, 128] {
            let cases = [
                (Dims { b: 1, h: 2, hkv: 1, nq: 150, nk: 20, d, layout: QkvLayout::Bhnd }, MaskKind::Causal),
                (Dims { b: 2, h: 1, hkv: 1, nq: 90, nk: 10, d, layout: QkvLayout::Bnhd }, MaskKind::Window(0, 0)),
                (Dims { b: 1, h: 3, hkv: 3, nq: 5, nk: 0, d, layout: QkvLayout::Bhnd }, MaskKind::None),
            ];
            for (dm, mask) in cases {
                let o = Opts { mask, bias: BiasKind::None, scale: None, amp: 1.0 };
                rows += one(gpu, &dm, &o, &make::<bf16>(&dm, &o, 7));
                rows += one(gpu, &dm, &o, &make::<f16>(&dm, &o, 8));
                rows += one(gpu, &dm, &o, &make::<f32>(&dm, &o, 9));
                check::<bf16>(gpu, &dm, &o, 10);
                check::<f32>(gpu, &dm, &o, 11);
            }
            // Segments: queries of segment 0 see nothing.
            let dm = Dims { b: 1, h: 2, hkv: 2, nq: 133, nk: 140, d, layout: QkvLayout::Bhnd };
            let o = Opts { mask: MaskKind::Segments, bias: BiasKind::None, scale: None, amp: 1.0 };
            let mut data = make::<bf16>(&dm, &o, 3);
            data.kseg.iter_mut().for_each(|s| *s = 1 + *s % 3);
            data.qseg = (0..133).map(|i| (i % 4) as u32).collect();
            rows += one(gpu, &dm, &o, &data);
            // A full bias of −∞ on whole rows.
            let dm = Dims { b: 1, h: 1, hkv: 1, nq: 70, nk: 90, d, layout: QkvLayout::Bhnd };
            let o = Opts { mask: MaskKind::None, bias: BiasKind::Full(false, false), scale: None, amp: 1.0 };
            let mut data = make::<f16>(&dm, &o, 4);
            for i in [0, 5, 64, 69] {
                data.bias[i * 90..][..90].fill(f32::NEG_INFINITY);
            }
            let a = attention(&o, &dm, &data);
            let (out, lse) = run_gpu(gpu, &a, &dm, &data).unwrap();
            for i in [0, 5, 64, 69] {
                assert_eq!(lse[i], f32::NEG_INFINITY);
                assert!(out[i * d..][..d].iter().all(|x| x.to_f32().to_bits() == 0));
                rows += 1;
            }
            assert!(lse.iter().all(|x| !x.is_nan()) && out.iter().all(|x| x.to_f32().is_finite()));
        }
        println!("cuda: {rows} fully masked rows, all zeros with lse -inf");
    }

    /// Large scale and ±1e4 values: no overflow, no NaN, within tolerance.
    #[test]
    fn extreme_logits() {
        let Some(gpu) = gpu() else { return };
        for (amp, scale) in [(1e4f32, 10.0f32), (1.0, 1e4), (1e4, 1.0), (100.0, 1e3)] {
            for mask in [MaskKind::None, MaskKind::Causal] {
                let o = Opts { mask, bias: BiasKind::None, scale: Some(scale), amp };
                let dm = Dims { b: 1, h: 2, hkv: 1, nq: 77, nk: 85, d: 64, layout: QkvLayout::Bnhd };
                check::<bf16>(gpu, &dm, &o, 12);
                check::<f16>(gpu, &dm, &o, 13);
                let dm = Dims { d: 24, ..dm };
                check::<f32>(gpu, &dm, &o, 11);
                let data = make::<f32>(&dm, &o, 14);
                let a = attention(&o, &dm, &data);
                let (out, lse) = run_gpu(gpu, &a, &dm, &data).unwrap();
                assert!(out.iter().all(|x| x.is_finite() && x.abs() <= 1.0), "amp {amp} scale {scale}");
                assert!(lse.iter().all(|x| x.is_finite()), "amp {amp} scale {scale}");
            }
        }
    }

    /// The host helpers agree with the device API and scan for non-finite values.
    #[test]
    fn host_helpers() {
        let Some(gpu) = gpu() else { return };
        let dm = Dims { b: 2, h: 4, hkv: 2, nq: 65, nk: 31, d: 64, layout: QkvLayout::Bhnd };
        let o = Opts { mask: MaskKind::Causal, bias: BiasKind::None, scale: None, amp: 1.0 };
        let mut data = make::<bf16>(&dm, &o, 21);
        let a = attention(&o, &dm, &data);
        let kernel = AttentionKernel::new(gpu, &a, DType::BF16, &dm.q(), &dm.kv()).unwrap();
        let (o1, l1) = kernel.forward_lse_host(&data.q, &data.k, &data.v).unwrap();
        let o2 = kernel.forward_host(&data.q, &data.k, &data.v).unwrap();
        let (o3, l3) = run_gpu(gpu, &a, &dm, &data).unwrap();
        assert!(o1.iter().zip(&o2).chain(o1.iter().zip(&o3)).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(l1.iter().zip(&l3).all(|(x, y)| x.to_bits() == y.to_bits()));
        data.v[100] = bf16::from_f32(f32::NAN);
        let e = kernel.forward_host(&data.q, &data.k, &data.v).unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }) && e.to_string().contains("v["), "{e}");
    }

    /// Bad input: typed errors, never a panic, nothing launched.
    #[test]
    fn bad_input_is_a_typed_error() {
        let Some(gpu) = gpu() else { return };
        let a = Attention::new();
        let unsupported = |e: Error| assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        unsupported(AttentionKernel::new(gpu, &a, DType::BF16, &[1, 2, 8, 48], &[1, 2, 8, 48]).unwrap_err());
        unsupported(AttentionKernel::new(gpu, &a, DType::F32, &[1, 2, 8, 300], &[1, 2, 8, 300]).unwrap_err());
        unsupported(AttentionKernel::new(gpu, &a, DType::U8, &[1, 2, 8, 64], &[1, 2, 8, 64]).unwrap_err());
        let shape = |e: Error| assert!(matches!(e, Error::Shape { .. }), "{e}");
        shape(AttentionKernel::new(gpu, &a, DType::F16, &[1, 2, 8, 64], &[1, 2, 8, 32]).unwrap_err());
        shape(AttentionKernel::new(gpu, &a, DType::F16, &[1, 3, 8, 64], &[1, 2, 8, 64]).unwrap_err());
        shape(AttentionKernel::new(gpu, &a, DType::F16, &[1, 2, 8], &[1, 2, 8, 64]).unwrap_err());
        let kb = [0.0f32; 7];
        let b = Attention::new().bias(Bias::Key(View::new(&kb, &[1, 7]).unwrap()));
        shape(AttentionKernel::new(gpu, &b, DType::F16, &[1, 2, 8, 64], &[1, 2, 8, 64]).unwrap_err());
        let nan = [f32::NAN; 8];
        let b = Attention::new().bias(Bias::Key(View::new(&nan, &[1, 8]).unwrap()));
        let e = AttentionKernel::new(gpu, &b, DType::F16, &[1, 2, 8, 64], &[1, 2, 8, 64]).unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }), "{e}");
        let s = Attention::new().scale(f32::INFINITY);
        let e = AttentionKernel::new(gpu, &s, DType::F16, &[1, 2, 8, 64], &[1, 2, 8, 64]).unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }), "{e}");
        // Buffers: wrong length, wrong dtype, misaligned view.
        let kernel = AttentionKernel::new(gpu, &a, DType::BF16, &[1, 2, 8, 64], &[1, 2, 8, 64]).unwrap();
        let st = gpu.stream();
        let x = st.alloc_zeros::<bf16>(1024 + 8).unwrap();
        let mut o = st.alloc_zeros::<bf16>(1024).unwrap();
        let e = kernel.forward(st, &x, &x.slice(0..1024), &x.slice(0..1024), &mut o).unwrap_err();
        assert!(matches!(e, Error::Length { what: "q", .. }), "{e}");
        let e = kernel.forward(st, &x.slice(1..1025), &x.slice(0..1024), &x.slice(0..1024), &mut o).unwrap_err();
        assert!(matches!(e, Error::Alignment { what: "q", .. }), "{e}");
        let xf = st.alloc_zeros::<f32>(1024).unwrap();
        let mut of = st.alloc_zeros::<f32>(1024).unwrap();
        let e = kernel.forward(st, &xf, &xf, &xf, &mut of).unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e}");
        let mut lse = st.alloc_zeros::<f32>(15).unwrap();
        let (q, kv) = (x.slice(0..1024), x.slice(8..1032));
        let e = kernel.forward_lse(st, &q, &kv, &kv, &mut o, &mut lse).unwrap_err();
        assert!(matches!(e, Error::Length { what: "lse", .. }), "{e}");
    }
}
