//! The CUDA attention backend against the f64 reference, judged as tests/attention.rs judges
//! the cpu backend (FlashAttention's rule: the kernel's error against the oracle at most twice
//! the error of the naive computation in the same dtype, plus a small absolute term).
//!
//! Without a GPU (always): the committed `kernels/attention.ptx` is what
//! `kernels/gen_attention.py` writes, every launched entry exists with one parameter block of
//! the size Rust passes, the PTX runs on `kernels/ptx_sim.py` as an f64 model says, and (with
//! the `cuda` feature) the Rust constants and field offsets agree with the PTX `// abi` lines.
//! With a GPU (skipped with a `skipped:` line when there is none, failing when
//! `VISTOK_REQUIRE_GPU=1`): random shapes (Nq ≠ Nk, 1, odd, several tiles), every
//! mask, both biases, GQA, both layouts, every dtype and supported D; fully masked rows; extreme
//! logits; bad input. Outputs are poisoned before each launch and every element is checked.

mod common;

use std::collections::BTreeMap;

use common::ptx::{self, EntryDecl};

const PTX: &str = include_str!("../kernels/attention.ptx");
const PTX_SM90: &str = include_str!("../kernels/attention_sm90.ptx");
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

fn abi() -> BTreeMap<String, usize> {
    ptx::abi(PTX)
}
#[test]
fn committed_ptx_is_what_the_generator_writes() {
    ptx::check_generated("gen_attention.py", &["attention"], "attention.ptx", PTX);
    ptx::check_generated("gen_attention.py", &["attention_sm90"], "attention_sm90.ptx", PTX_SM90);
}

/// The Hopper module: sm_90a (wgmma), PTX ISA 8.0, the four wgmma entries with the same
/// parameter block and the same `// abi` lines plus the wgmma tile constants.
#[test]
fn sm90_ptx_declares_the_wgmma_entries() {
    let directive = |d: &str| ptx::directive(PTX_SM90, d);
    assert_eq!(directive(".version "), Some("8.0"));
    assert_eq!(directive(".target "), Some("sm_90a"));
    assert!(PTX_SM90.is_ascii() && PTX_SM90.lines().any(|l| l.starts_with("// vistok: max-regs ")));
    let found = ptx::entries(PTX_SM90);
    let names: Vec<&str> = found.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "attention_wgmma_bf16_d64",
            "attention_wgmma_bf16_d128",
            "attention_wgmma_f16_d64",
            "attention_wgmma_f16_d128"
        ]
    );
    for EntryDecl { name, params, maxntid } in &found {
        assert_eq!(params, &[format!(".param .align 8 .b8 p[{PARAM_BYTES}]")], "{name}: parameters");
        assert_eq!(maxntid.as_deref(), Some("256, 1, 1"), "{name}: .maxntid");
    }
    let abi90 = ptx::abi(PTX_SM90);
    let wg: BTreeMap<String, usize> = abi90.clone().into_iter().filter(|(k, _)| k.starts_with("wgmma ")).collect();
    assert_eq!(abi90, abi().into_iter().chain(wg.clone()).collect::<BTreeMap<_, _>>());
    assert_eq!((wg["wgmma bm"], wg["wgmma bn"], wg["wgmma threads"], wg["wgmma slack"]), (128, 128, 256, 1024));
}

/// The committed PTX run on `kernels/ptx_sim.py` (no GPU) against an f64 model of
/// `softmax(Q·Kᵀ·scale + bias)·V` and its log-sum-exp in `kernels/gen_attention.py --emulate`:
/// bf16 / f16 at D = 32, 64, 128 and the f32 entry, Nq and Nk off the tiles, causal with fully
/// masked rows, key bias (one row all `−∞`), GQA, both layouts, several query tiles; O within
/// twice the naive same-dtype error plus a small absolute term, LSE within 1e-4.
#[test]
fn ptx_runs_on_the_interpreter_as_the_reference_says() {
    ptx::check_generator_run("gen_attention.py", &["--emulate", "quick"], "attention emulation passed");
}

#[test]
fn every_entry_exists_with_one_param_block_of_the_right_size() {
    let found = ptx::entries(PTX);
    let names: Vec<&str> = found.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ENTRIES.iter().map(|e| e.0).collect::<Vec<_>>(), "entries and their order");
    for (EntryDecl { name, params, maxntid }, (_, threads)) in found.iter().zip(ENTRIES) {
        assert_eq!(params, &[format!(".param .align 8 .b8 p[{PARAM_BYTES}]")], "{name}: parameter list");
        assert_eq!(maxntid.as_deref(), Some(format!("{threads}, 1, 1").as_str()), "{name}: .maxntid");
    }
    let abi = abi();
    assert_eq!(abi["attention size"], PARAM_BYTES);
    let directive = |d: &str| ptx::directive(PTX, d);
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
    let in_ptx = ptx::abi_fields(PTX, "attention");
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
    let sm90: Vec<String> = ptx::entries(PTX_SM90).into_iter().map(|e| e.name).collect();
    assert_eq!(ca::WGMMA_KERNEL_NAMES.to_vec(), sm90);
    assert_eq!(ca::PTX_SM90, PTX_SM90);
    let abi90 = ptx::abi(PTX_SM90);
    assert_eq!(
        (ca::WG_BM, ca::WG_BN, ca::WG_THREADS as usize, ca::WG_SLACK),
        (abi90["wgmma bm"], abi90["wgmma bn"], abi90["wgmma threads"], abi90["wgmma slack"])
    );
    for t in [vistok::DType::BF16, vistok::DType::F16] {
        for d in ca::WG_HEAD_DIMS {
            assert!(sm90.contains(&ca::wgmma_kernel_name(t, d).unwrap()), "{t:?} D = {d}");
        }
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_tests_skipped_without_cuda_feature() {
    common::skip_without_cuda_feature();
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::gpu::gpu;
    use super::common::judge::{
        self, atol, attention, max_err, naive, oracle, visible, BiasKind, Data, Dims, MaskKind, Opts,
    };
    use super::common::{poison, sim_cap, simulated, Rng};
    use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use vistok::attention::{Attention, Bias, QkvLayout};
    use vistok::cuda::attention::AttentionKernel;
    use vistok::cuda::Gpu;
    use vistok::{bf16, f16, DType, Error, Float, View};

    /// A random problem, segment ids stepping about every 9 tokens in sorted runs.
    fn make<T: Float>(dm: &Dims, o: &Opts, seed: u64) -> Data<T> {
        judge::make(dm, o, seed, 9)
    }

    /// Runs the GPU kernel through the device API with poisoned outputs.
    fn run_gpu<T: Float + DeviceRepr + ValidAsZeroBits>(
        gpu: &Gpu,
        a: &Attention<'_>,
        dm: &Dims,
        data: &Data<T>,
    ) -> Result<(Vec<T>, Vec<f32>), Error> {
        run_with(gpu, a, dm, data, None)
    }

    /// `run_gpu` with the entry forced: `Some(true)` the sm_90a wgmma one, `Some(false)` the
    /// mma.sync / f32 one.
    fn run_with<T: Float + DeviceRepr + ValidAsZeroBits>(
        gpu: &Gpu,
        a: &Attention<'_>,
        dm: &Dims,
        data: &Data<T>,
        wg: Option<bool>,
    ) -> Result<(Vec<T>, Vec<f32>), Error> {
        let mut kernel = AttentionKernel::new(gpu, a, T::DTYPE, &dm.q(), &dm.kv())?;
        if let Some(on) = wg {
            kernel = kernel.with_wgmma(on)?;
            assert_eq!(kernel.wgmma(), on);
        }
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
        check_with::<T>(gpu, dm, o, seed, None)
    }

    fn check_with<T: Float + DeviceRepr + ValidAsZeroBits>(
        gpu: &Gpu,
        dm: &Dims,
        o: &Opts,
        seed: u64,
        wg: Option<bool>,
    ) -> f64 {
        let data = make::<T>(dm, o, seed);
        let a = attention(o, dm, &data);
        let (want_o, want_l) = oracle(&a, dm, &data);
        let (naive_o, naive_l) = naive(o, dm, &data);
        let en_o = max_err(naive_o.iter().copied(), &want_o, "naive out");
        let en_l = max_err(naive_l.iter().copied(), &want_l, "naive lse");
        let lmax = want_l.iter().filter(|x| x.is_finite()).fold(0.0f32, |a, x| a.max(x.abs()));
        let (got_o, got_l) = run_with(gpu, &a, dm, &data, wg).unwrap_or_else(|e| panic!("{dm:?} {o:?}: {e}"));
        let ek_o = max_err(got_o.iter().map(|x| x.to_f32()), &want_o, "out");
        let ek_l = max_err(got_l.iter().copied(), &want_l, "lse");
        let (tol_o, tol_l) = (2.0 * en_o + atol::<T>(lmax, false), 2.0 * en_l + atol::<T>(lmax, true));
        assert!(
            ek_o <= tol_o && ek_l <= tol_l,
            "cuda {:?} (wgmma {wg:?}) {dm:?} {o:?} seed {seed}: out error {ek_o:e} (naive {en_o:e}, tol {tol_o:e}), lse error {ek_l:e} \
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
        let cases = sim_cap(80, 3);
        random_family::<f32>(gpu, cases, 1);
        random_family::<f16>(gpu, cases, 2);
        random_family::<bf16>(gpu, cases, 3);
    }

    /// Several tiles in both directions, every mask, at every tensor-core D (and f32).
    #[test]
    fn multi_tile_problems_match_the_reference() {
        let Some(gpu) = gpu() else { return };
        let masks = [MaskKind::None, MaskKind::Causal, MaskKind::Window(70, 3), MaskKind::Segments];
        let mut n = 0;
        // tools/simcuda: two tiles each way at one D.
        let sizes: &[(usize, usize)] = if simulated() { &[(129, 70)] } else { &[(300, 300), (129, 333), (333, 129)] };
        let ds: &[usize] = if simulated() { &[64] } else { &[32, 64, 128] };
        for (i, mask) in masks.into_iter().enumerate() {
            for &(nq, nk) in sizes {
                let o = Opts { mask, bias: BiasKind::None, scale: None, amp: 2.0 };
                for &d in ds {
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
        if simulated() {
            return;
        }
        // The FlashAttention rule without the absolute term, where the maximum error is stable.
        let dm = Dims { b: 1, h: 2, hkv: 1, nq: 200, nk: 300, d: 64, layout: QkvLayout::Bhnd };
        let o = Opts { mask: MaskKind::Causal, bias: BiasKind::Key(true), scale: None, amp: 2.0 };
        let (rb, rh) = (check::<bf16>(gpu, &dm, &o, 53), check::<f16>(gpu, &dm, &o, 52));
        println!("cuda: {n} multi-tile problems; 200x300 causal + key bias: error / naive bf16 {rb:.2}, f16 {rh:.2}");
        assert!(rb <= 2.0 && rh <= 2.0, "bf16 {rb}, f16 {rh}");
    }

    /// The sm_90a wgmma entries where they apply (compute capability 9.0, f16 / bf16, D = 64 or
    /// 128): the default there; several query and key tiles, every mask, key and full bias,
    /// GQA, both layouts, each against the reference and the mma.sync entry on the same data.
    /// Elsewhere `with_wgmma(true)` is a typed error.
    #[test]
    fn wgmma_entries_match_the_reference() {
        let Some(gpu) = gpu() else { return };
        let dm = Dims { b: 1, h: 1, hkv: 1, nq: 5, nk: 7, d: 64, layout: QkvLayout::Bhnd };
        let a = Attention::new();
        let d32 = Dims { d: 32, ..dm };
        let k32 = AttentionKernel::new(gpu, &a, vistok::DType::BF16, &d32.q(), &d32.kv()).unwrap();
        assert!(!k32.wgmma() && matches!(k32.with_wgmma(true), Err(Error::Unsupported { .. })), "D = 32");
        let kf = AttentionKernel::new(gpu, &a, vistok::DType::F32, &dm.q(), &dm.kv()).unwrap();
        assert!(!kf.wgmma() && matches!(kf.with_wgmma(true), Err(Error::Unsupported { .. })), "f32");
        let k64 = AttentionKernel::new(gpu, &a, vistok::DType::BF16, &dm.q(), &dm.kv()).unwrap();
        if gpu.compute_capability().unwrap() != (9, 0) {
            assert!(!k64.wgmma() && matches!(k64.with_wgmma(true), Err(Error::Unsupported { .. })), "not sm_90");
            eprintln!("skipped: the wgmma attention entries need compute capability 9.0");
            return;
        }
        assert!(k64.wgmma(), "the default on compute capability 9.0");
        assert_eq!(k64.entry(), "attention_wgmma_bf16_d64");
        let k64 = k64.with_wgmma(false).unwrap();
        assert_eq!((k64.entry(), k64.shared_bytes()), ("attention_bf16_d64", 0));
        let sim = super::common::simulated();
        let cases: Vec<(Dims, Opts)> = {
            let o = |mask, bias| Opts { mask, bias, scale: None, amp: 2.0 };
            let dims = |b, h, hkv, nq, nk, d, layout| Dims { b, h, hkv, nq, nk, d, layout };
            let (bh, bn) = (QkvLayout::Bhnd, QkvLayout::Bnhd);
            let mut v = vec![
                (dims(1, 2, 1, 130, 150, 64, bh), o(MaskKind::Causal, BiasKind::None)),
                (dims(1, 1, 1, 40, 260, 128, bn), o(MaskKind::Segments, BiasKind::Key(true))),
            ];
            if !sim {
                v.extend([
                    (dims(2, 4, 2, 300, 333, 64, bh), o(MaskKind::None, BiasKind::Full(true, false))),
                    (dims(1, 2, 2, 333, 129, 128, bh), o(MaskKind::Window(70, 3), BiasKind::None)),
                    (dims(1, 3, 1, 257, 1000, 128, bn), o(MaskKind::Causal, BiasKind::Key(false))),
                    (dims(1, 2, 1, 1, 1, 64, bn), o(MaskKind::None, BiasKind::None)),
                    (dims(1, 2, 1, 129, 128, 128, bh), o(MaskKind::Segments, BiasKind::None)),
                ]);
            }
            v
        };
        let mut worst = [0.0f64; 2];
        for (i, (dm, o)) in cases.iter().enumerate() {
            for (w, wg) in [true, false].into_iter().enumerate() {
                let seed = 500 + i as u64;
                let r = if i % 2 == 0 {
                    check_with::<bf16>(gpu, dm, o, seed, Some(wg))
                } else {
                    check_with::<f16>(gpu, dm, o, seed, Some(wg))
                };
                worst[w] = worst[w].max(r);
            }
        }
        println!(
            "cuda attention: {} problems on wgmma and mma.sync; worst error / naive error {:.2} / {:.2}",
            cases.len(),
            worst[0],
            worst[1]
        );
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
        for &d in if simulated() { &[64usize][..] } else { &[32usize, 64, 128][..] } {
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
        let extremes = [(1e4f32, 10.0f32), (1.0, 1e4), (1e4, 1.0), (100.0, 1e3)];
        for (amp, scale) in extremes.into_iter().take(sim_cap(4, 2)) {
            for mask in [MaskKind::None, MaskKind::Causal] {
                let o = Opts { mask, bias: BiasKind::None, scale: Some(scale), amp };
                let dm = Dims { b: 1, h: 2, hkv: 1, nq: 77, nk: 85, d: 64, layout: QkvLayout::Bnhd };
                check::<bf16>(gpu, &dm, &o, 12);
                // f16 cannot hold these logits (|q·scale| and the scores reach 1e5 and more, past
                // 65504): its naive same-dtype yardstick overflows, so f16 is held to the f64
                // oracle directly (the kernel scales and accumulates in f32).
                let data = make::<f16>(&dm, &o, 13);
                let a = attention(&o, &dm, &data);
                let (want_o, want_l) = oracle(&a, &dm, &data);
                let (out, lse) = run_gpu(gpu, &a, &dm, &data).unwrap();
                let lmax = want_l.iter().filter(|x| x.is_finite()).fold(0.0f32, |a, x| a.max(x.abs()));
                let eo = max_err(out.iter().map(|x| x.to_f32()), &want_o, "f16 out");
                let el = max_err(lse.iter().copied(), &want_l, "f16 lse");
                // Four times the rounding of an output of |V| ≤ 1; FlashAttention's relative 1e−5.
                let (to, tl) = (4.0 * atol::<f16>(lmax, false), atol::<f16>(lmax, true));
                assert!(
                    eo <= to && el <= tl,
                    "f16 amp {amp} scale {scale}: out error {eo:e} (tol {to:e}), lse {el:e} ({tl:e})"
                );
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
