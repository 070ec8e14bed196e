//! The CUDA codebook argmin against the cpu backend, bit for bit (indices and distances, every
//! dtype and metric), and against the f64 reference up to counted near-ties; planted answers,
//! bad input and lookup. GPU tests skip with a `skipped:` line when there is no device (and
//! fail when `VISTOK_REQUIRE_GPU=1`). Without a GPU: the committed PTX is what
//! `kernels/gen_argmin.py` writes, and every entry the Rust side launches exists with the
//! parameter block it passes.

mod common;

use std::collections::BTreeMap;

use common::ptx::{self, EntryDecl};

const PTX: &str = include_str!("../kernels/argmin.ptx");
const PTX_SM90: &str = include_str!("../kernels/argmin_sm90.ptx");
const PARAM_BYTES: usize = 112;
const DTYPES: [&str; 3] = ["f32", "f16", "bf16"];

/// The entries, written out independently of src/cuda/argmin.rs, in file order.
fn expected_entries() -> Vec<String> {
    let mut v: Vec<String> = DTYPES.iter().map(|t| format!("argmin_check_{t}")).collect();
    for t in DTYPES {
        for m in ["l2", "cos"] {
            for bd in [4, 8, 16] {
                v.push(format!("argmin_search_{t}_{m}_bd{bd}"));
            }
        }
    }
    v.extend(DTYPES.iter().map(|t| format!("argmin_finish_{t}")));
    v.extend(DTYPES.iter().map(|t| format!("argmin_lookup_{t}")));
    for t in ["f16", "bf16"] {
        for m in ["l2", "cos"] {
            v.push(format!("argmin_mma_{t}_{m}"));
        }
    }
    v.push("argmin_pad_b16".into());
    v
}

/// The `// abi KEY VALUE` header lines.
fn abi() -> BTreeMap<String, usize> {
    ptx::abi(PTX)
}

fn entries() -> Vec<EntryDecl> {
    ptx::entries(PTX)
}
#[test]
fn ptx_declares_every_entry_with_one_param_block() {
    let directive = |d: &str| ptx::directive(PTX, d);
    assert_eq!(directive(".version "), Some("8.0"));
    assert_eq!(directive(".target "), Some("sm_80"));
    assert_eq!(directive(".address_size "), Some("64"));
    assert!(PTX.is_ascii());
    let found = entries();
    let names: Vec<&str> = found.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, expected_entries(), "entries and their order");
    for EntryDecl { name, params, maxntid } in &found {
        assert_eq!(params, &[format!(".param .align 8 .b8 p[{PARAM_BYTES}]")], "{name}: parameters");
        assert_eq!(maxntid.as_deref(), Some("256, 1, 1"), "{name}: .maxntid");
    }
    let abi = abi();
    assert_eq!((abi["argmin size"], abi["block"], abi["bm"], abi["bn"]), (PARAM_BYTES, 256, 128, 128));
}

/// The Hopper module: sm_90a (wgmma), PTX ISA 8.0, the four wgmma searches with the same
/// parameter block, and the layout constants the host mirrors.
#[test]
fn sm90_ptx_declares_the_wgmma_entries() {
    let directive = |d: &str| ptx::directive(PTX_SM90, d);
    assert_eq!(directive(".version "), Some("8.0"));
    assert_eq!(directive(".target "), Some("sm_90a"));
    assert!(PTX_SM90.is_ascii());
    let found = ptx::entries(PTX_SM90);
    let names: Vec<&str> = found.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["argmin_wgmma_f16_l2", "argmin_wgmma_f16_cos", "argmin_wgmma_bf16_l2", "argmin_wgmma_bf16_cos"]);
    for EntryDecl { name, params, maxntid } in &found {
        assert_eq!(params, &[format!(".param .align 8 .b8 p[{PARAM_BYTES}]")], "{name}: parameters");
        assert_eq!(maxntid.as_deref(), Some("256, 1, 1"), "{name}: .maxntid");
    }
    let abi = ptx::abi(PTX_SM90);
    assert_eq!(
        abi,
        ptx::abi(PTX).into_iter().chain(abi.clone().into_iter().filter(|(k, _)| k.starts_with("wgmma"))).collect()
    );
    assert_eq!((abi["wgmma_kb"], abi["wgmma_stages"], abi["wgmma_max_d"], abi["wgmma_slack"]), (64, 4, 256, 1024));
}

#[test]
fn committed_ptx_is_what_the_generator_writes() {
    ptx::check_generated("gen_argmin.py", &["argmin"], "argmin.ptx", PTX);
    ptx::check_generated("gen_argmin.py", &["argmin_sm90"], "argmin_sm90.ptx", PTX_SM90);
}

/// The committed PTX run on `kernels/ptx_sim.py` (no GPU): search (every dtype, both metrics,
/// each chunk depth, ties, K split over the grid, two row tiles), the NaN check and lookup,
/// against a Python model of the contract in `kernels/gen_argmin.py --emulate`.
#[test]
fn ptx_runs_on_the_interpreter_as_the_contract_says() {
    ptx::check_generator_run("gen_argmin.py", &["--emulate", "quick"], "argmin emulation passed");
}

#[cfg(feature = "cuda")]
#[test]
fn rust_launches_match_the_ptx_abi() {
    use vistok::cuda::argmin as ca;
    let names: Vec<String> = entries().into_iter().map(|e| e.name).collect();
    assert_eq!(ca::kernel_names(), names);
    assert_eq!(ca::PARAM_BYTES, PARAM_BYTES);
    let abi = abi();
    for (field, off) in ca::param_offsets() {
        assert_eq!(abi.get(&format!("argmin {field}")), Some(&off), "offset of {field}");
    }
    let fields = abi.keys().filter(|k| k.starts_with("argmin ") && *k != "argmin size").count();
    assert_eq!(fields, ca::param_offsets().len(), "every PTX field has a Rust field");
    assert_eq!((ca::BLOCK as usize, ca::BM, ca::BN), (abi["block"], abi["bm"], abi["bn"]));
    let sm90: Vec<String> = ptx::entries(PTX_SM90).into_iter().map(|e| e.name).collect();
    assert_eq!(ca::wgmma_kernel_names(), sm90);
    let abi90 = ptx::abi(PTX_SM90);
    assert_eq!(
        (ca::WG_KB, ca::WG_STAGES, ca::WG_MAX_D, ca::WG_SLACK),
        (abi90["wgmma_kb"], abi90["wgmma_stages"], abi90["wgmma_max_d"], abi90["wgmma_slack"])
    );
    // Every search entry the host can pick exists.
    for d in 1..=300 {
        assert!(names.contains(&ca::search_name(vistok::DType::F32, vistok::argmin::Metric::L2, ca::depth(d))));
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn skipped_without_cuda_feature() {
    common::skip_without_cuda_feature();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    use super::common::Rng;
    use cudarc::driver::DeviceRepr;
    use proptest::prelude::*;
    use vistok::argmin::{Codebook, Metric};
    use vistok::cuda::argmin::CodebookGpu;
    use vistok::cuda::Gpu;
    use vistok::{bf16, f16, Backend, DType, Error, Family, Float, View, ViewMut};

    const U: f64 = 1.0 / (1u64 << 24) as f64;

    fn gpu() -> Option<&'static Gpu> {
        static GPU: OnceLock<Result<Gpu, Error>> = OnceLock::new();
        match GPU.get_or_init(|| Gpu::new(0)) {
            Ok(g) => Some(g),
            Err(e) => {
                assert!(
                    std::env::var("VISTOK_REQUIRE_GPU").as_deref() != Ok("1"),
                    "VISTOK_REQUIRE_GPU=1 but no usable CUDA device: {e}"
                );
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| super::common::say_skipped(&format!("no CUDA device ({e})")));
                None
            }
        }
    }

    /// Random values: mostly uniform in [-1, 1], some exact zeros, small values, and (bf16)
    /// subnormals, which the bf16 rule reads as zero.
    fn values<T: Float>(n: usize, seed: u64) -> Vec<T> {
        let mut r = Rng(seed);
        (0..n)
            .map(|_| {
                let v = match r.next_u64() % 32 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => r.uniform(-1e-3, 1e-3),
                    3 if T::DTYPE == DType::BF16 => r.uniform(-1.0, 1.0) * 1e-39,
                    _ => r.uniform(-1.0, 1.0),
                };
                T::from_f32(v)
            })
            .collect()
    }

    /// Small integers: exact arithmetic, so ties are real ties.
    fn lattice<T: Float>(n: usize, seed: u64) -> Vec<T> {
        let mut r = Rng(seed);
        (0..n).map(|_| T::from_f32((r.next_u64() % 5) as f32 - 2.0)).collect()
    }

    fn codebook<T: Float>(e: &[T], d: usize, metric: Metric) -> Codebook<T> {
        Codebook::new(View::new(e, &[e.len() / d, d]).unwrap(), metric).unwrap()
    }

    fn host<T: Float>(cb: &Codebook<T>, be: Backend, x: &[T]) -> Result<(Vec<u32>, Vec<f32>), Error> {
        let n = x.len() / cb.dim();
        let (mut idx, mut dist) = (vec![0xDEAD_BEEF; n], vec![f32::NAN; n]);
        cb.argmin(
            be,
            View::new(x, &[n, cb.dim()])?,
            ViewMut::new(&mut idx, &[n])?,
            Some(ViewMut::new(&mut dist, &[n])?),
        )?;
        Ok((idx, dist))
    }

    /// Rows of `got` that differ from the reference, checked to be near-ties within the module
    /// docs' bound (bf16 flushes included); returns how many there were.
    /// `slack` scales the bound (tensor cores round their accumulation differently).
    fn near_ties<T: Float>(cb: &Codebook<T>, x: &[T], got: &[u32], want: &[u32], slack: f64) -> usize {
        let d = cb.dim();
        let e = cb.entries();
        let mut ties = 0;
        for (r, (&g, &w)) in got.iter().zip(want).enumerate().filter(|(_, (g, w))| g != w) {
            let xr: Vec<f64> = x[r * d..][..d].iter().map(|v| v.to_f32() as f64).collect();
            let row = |k: u32| -> Vec<f64> { e[k as usize * d..][..d].iter().map(|&v| v as f64).collect() };
            let (eg, ew) = (row(g), row(w));
            let n2 = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
            let tiny = |v: f64| v != 0.0 && v.abs() < f32::MIN_POSITIVE as f64;
            let flush = |e: &[f64]| {
                if T::DTYPE != DType::BF16 {
                    return 0.0;
                }
                let lost: f64 =
                    xr.iter().zip(e).filter(|(a, b)| tiny(**a) || tiny(**b)).map(|(a, b)| (a * b).abs()).sum();
                lost + d as f64 * 2f64.powi(-126)
            };
            let (worse, tol) = match cb.metric() {
                Metric::L2 => {
                    let dist = |e: &[f64]| xr.iter().zip(e).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
                    let tol =
                        2.0 * (d as f64 + 2.0) * U * (n2(&xr) + n2(&eg) + n2(&ew)) + 2.0 * (flush(&eg) + flush(&ew));
                    (dist(&eg) - dist(&ew), tol)
                }
                Metric::Cosine => {
                    let cos = |e: &[f64]| {
                        let (xx, ee) = (n2(&xr), n2(e));
                        if xx == 0.0 || ee == 0.0 {
                            0.0
                        } else {
                            xr.iter().zip(e).map(|(a, b)| a * b).sum::<f64>() / (xx * ee).sqrt()
                        }
                    };
                    let rel = |f: f64, e: &[f64]| if f == 0.0 { 0.0 } else { f / (n2(&xr) * n2(e)).sqrt() };
                    (cos(&ew) - cos(&eg), (3.0 * d as f64 + 8.0) * U + rel(flush(&eg), &eg) + rel(flush(&ew), &ew))
                }
            };
            let tol = tol * slack;
            assert!(worse <= tol, "row {r}: got {g}, best {w}: {worse:e} worse, tolerance {tol:e}");
            ties += usize::from(worse > 0.0);
        }
        ties
    }

    static ROWS: AtomicUsize = AtomicUsize::new(0);
    static TIES: AtomicUsize = AtomicUsize::new(0);

    /// cuda == cpu bit for bit (indices and distances), and both near the reference.
    fn agree<T: Float + DeviceRepr>(g: &Gpu, cb: &Codebook<T>, x: &[T], ctx: &str) {
        let dev = CodebookGpu::new(g, cb).unwrap();
        let (idx, dist) = dev.argmin_dist_host(x).unwrap();
        let (ci, cd) = host(cb, Backend::Cpu, x).unwrap();
        assert_eq!(idx, ci, "{ctx}: indices differ from the cpu backend");
        // Bit for bit, except that any NaN equals any NaN: overflowing scores give the GPU's
        // canonical NaN (0x7fffffff) where x86 gives its default one (0xffc00000).
        let bits =
            |d: &[f32]| -> Vec<u32> { d.iter().map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() }).collect() };
        assert_eq!(bits(&dist), bits(&cd), "{ctx}: distances differ from the cpu backend");
        assert_eq!(dev.argmin_host(x).unwrap(), ci, "{ctx}: without distances");
        let (ri, _) = host(cb, Backend::Reference, x).unwrap();
        TIES.fetch_add(near_ties(cb, x, &idx, &ri, 1.0), Ordering::Relaxed);
        ROWS.fetch_add(idx.len(), Ordering::Relaxed);
    }

    fn random_case<T: Float + DeviceRepr>(g: &Gpu, n: usize, k: usize, d: usize, metric: Metric, seed: u64, lat: bool) {
        let (e, x) = if lat {
            (lattice::<T>(k * d, seed), lattice::<T>(n * d, seed ^ 7))
        } else {
            (values::<T>(k * d, seed), values::<T>(n * d, seed ^ 7))
        };
        let cb = codebook(&e, d, metric);
        agree(g, &cb, &x, &format!("{} {metric:?} n={n} k={k} d={d} seed={seed}", T::DTYPE.name()));
    }

    const DIMS: [usize; 17] = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 100, 256];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(super::common::sim_cap(96, 6) as u32))]
        #[test]
        fn matches_cpu_on_random_shapes(n in 1usize..300, k in 1usize..400, di in 0usize..DIMS.len(),
                                        cos in any::<bool>(), dt in 0usize..3, lat in any::<bool>(), seed in any::<u64>()) {
            let Some(g) = gpu() else { return Ok(()) };
            let metric = if cos { Metric::Cosine } else { Metric::L2 };
            let d = DIMS[di];
            // tools/simcuda: one tile each way, odd sizes kept.
            let (n, k) = if super::common::simulated() { (1 + n % 130, 1 + k % 130) } else { (n, k) };
            match dt {
                0 => random_case::<f32>(g, n, k, d, metric, seed, lat),
                1 => random_case::<f16>(g, n, k, d, metric, seed, lat),
                _ => random_case::<bf16>(g, n, k, d, metric, seed, lat),
            }
        }
    }

    #[test]
    fn grid_edges_and_k_splits() {
        let Some(g) = gpu() else { return };
        // One row against many tiles (K split across the grid), partial row tiles, N = 1,
        // K = 1, K one past a tile, the D values.
        for &(n, k, d) in &[
            (1usize, 1usize, 1usize),
            (1, 20000, 8),
            (5, 5000, 4),
            (127, 129, 16),
            (129, 128, 32),
            (1000, 300, 64),
            (3000, 700, 8),
            (257, 1025, 256),
            (70, 3, 33),
        ] {
            // On tools/simcuda only the cases of at most 200 (row tile, code tile, dim) steps,
            // (5, 5000, 4) among them: K split over the grid.
            if super::common::simulated() && n.div_ceil(128) * k.div_ceil(128) * d > 200 {
                continue;
            }
            for metric in [Metric::L2, Metric::Cosine] {
                random_case::<f32>(g, n, k, d, metric, (n * 31 + k * 7 + d) as u64, false);
                random_case::<bf16>(g, n, k, d, metric, (n + k + d) as u64, false);
            }
        }
        eprintln!(
            "cuda argmin: {} rows compared, indices and distances bit-identical to cpu; {} near-ties vs the reference",
            ROWS.load(Ordering::Relaxed),
            TIES.load(Ordering::Relaxed)
        );
    }

    #[test]
    fn planted_answers() {
        let Some(g) = gpu() else { return };
        let d = 8;
        // Duplicated entries: ties go to the lowest index; x equal to an entry: distance 0.
        let mut e = values::<f32>(300 * d, 11);
        for j in 0..d {
            e[250 * d + j] = e[17 * d + j];
            e[299 * d + j] = e[17 * d + j];
        }
        let x: Vec<f32> = [17usize, 250, 299, 3].iter().flat_map(|&k| e[k * d..][..d].to_vec()).collect();
        for metric in [Metric::L2, Metric::Cosine] {
            let cb = codebook(&e, d, metric);
            let (idx, dist) = CodebookGpu::new(g, &cb).unwrap().argmin_dist_host(&x).unwrap();
            assert_eq!(idx, [17, 17, 17, 3], "{metric:?}");
            if metric == Metric::L2 {
                assert_eq!(dist, [0.0; 4]);
            }
            agree(g, &cb, &x, &format!("planted duplicates {metric:?}"));
        }
        // The answer in the last tile of a large K: every entry far away but the last.
        let (k, d) = (128 * 40 + 1, 16);
        let mut e = vec![0.0f32; k * d];
        for (i, v) in e.iter_mut().enumerate() {
            *v = 100.0 + (i % 13) as f32;
        }
        let x: Vec<f32> = (0..3 * d).map(|i| (i % 5) as f32 * 0.25 - 0.5).collect();
        e[(k - 1) * d..].copy_from_slice(&x[..d]);
        let cb = codebook(&e, d, Metric::L2);
        let idx = CodebookGpu::new(g, &cb).unwrap().argmin_host(&x).unwrap();
        assert_eq!(idx[0], (k - 1) as u32);
        agree(g, &cb, &x, "answer in the last tile");
        // Zero vectors under cosine: a zero x picks entry 0, a zero entry scores 0.
        let e = [0.0f32, 0.0, 1.0, 0.0, -1.0, 0.0];
        let x = [0.0f32, 0.0, -2.0, 0.0, 0.0, 1.0];
        let cb = codebook(&e, 2, Metric::Cosine);
        assert_eq!(CodebookGpu::new(g, &cb).unwrap().argmin_host(&x).unwrap(), [0, 2, 0]);
        agree(g, &cb, &x, "cosine zero vectors");
        // Huge values: scores overflow to ±inf / NaN; still the cpu's indices. (Entries whose
        // squared norm overflows f32 are refused by Codebook::new, so the size is in x.)
        let e = [1e19f32, 0.0, -1e19, 1.0, 1.0, 1.0];
        let x = [3e20f32, 0.0, 1.0, 1.0, -1e20, 2e20];
        for metric in [Metric::L2, Metric::Cosine] {
            agree(g, &codebook(&e, 2, metric), &x, &format!("overflow {metric:?}"));
        }
    }

    #[test]
    fn non_finite_x_is_the_cpu_error() {
        let Some(g) = gpu() else { return };
        fn case<T: Float + DeviceRepr>(g: &Gpu) {
            let d = 5;
            let cb = codebook(&values::<T>(40 * d, 3), d, Metric::L2);
            let dev = CodebookGpu::new(g, &cb).unwrap();
            for (pos, bad) in [(0, f32::NAN), (7 * d + 3, f32::INFINITY), (299 * d + 4, f32::NEG_INFINITY)] {
                let mut x = values::<T>(300 * d, 4);
                x[pos] = T::from_f32(bad);
                x[299 * d] = T::from_f32(f32::NAN); // a later one: the first is named
                let want = host(&cb, Backend::Cpu, &x).unwrap_err();
                let got = dev.argmin_host(&x).unwrap_err();
                assert!(matches!(got, Error::NonFinite { family: Family::Argmin, .. }), "{got}");
                assert_eq!(got, want, "{}", T::DTYPE.name());
            }
        }
        case::<f32>(g);
        case::<f16>(g);
        case::<bf16>(g);
    }

    #[test]
    fn lookup_matches_cpu_and_rejects_bad_indices() {
        let Some(g) = gpu() else { return };
        fn case<T: Float + DeviceRepr, O: Float + DeviceRepr + cudarc::driver::ValidAsZeroBits>(g: &Gpu) {
            for &(k, d, n) in &[(1usize, 1usize, 1usize), (300, 7, 1000), (5, 256, 33)] {
                let cb = codebook(&values::<T>(k * d, 9), d, Metric::L2);
                let dev = CodebookGpu::new(g, &cb).unwrap();
                let mut r = Rng(k as u64);
                let ids: Vec<u32> = (0..n).map(|_| (r.next_u64() % k as u64) as u32).collect();
                let got: Vec<O> = dev.lookup_host(&ids).unwrap();
                let mut want = vec![O::from_f32(0.0); n * d];
                cb.lookup(Backend::Cpu, View::new(&ids, &[n]).unwrap(), ViewMut::new(&mut want, &[n, d]).unwrap())
                    .unwrap();
                let (gb, wb): (Vec<f32>, Vec<f32>) =
                    (got.iter().map(|v| v.to_f32()).collect(), want.iter().map(|v| v.to_f32()).collect());
                assert_eq!(gb, wb, "lookup {} -> {} k={k} d={d}", T::DTYPE.name(), O::DTYPE.name());
                let mut bad = ids.clone();
                bad[n / 2] = k as u32;
                if n > 1 {
                    bad[n - 1] = u32::MAX;
                }
                let e = dev.lookup_host::<O>(&bad).unwrap_err();
                let mut sink = vec![O::from_f32(0.0); n * d];
                let want = cb
                    .lookup(Backend::Cpu, View::new(&bad, &[n]).unwrap(), ViewMut::new(&mut sink, &[n, d]).unwrap())
                    .unwrap_err();
                assert_eq!(e, want);
            }
        }
        case::<f32, f32>(g);
        case::<f32, bf16>(g);
        case::<bf16, f16>(g);
        case::<f16, f32>(g);
    }

    /// One tensor-core search against the reference (near-ties counted, returned with the
    /// rows) and the cpu backend; `wg`: force the wgmma (`Some(true)`) or mma.sync search.
    #[allow(clippy::too_many_arguments)]
    fn tc_case<T: Float + DeviceRepr>(
        g: &Gpu,
        n: usize,
        k: usize,
        d: usize,
        metric: Metric,
        seed: u64,
        lat: bool,
        wg: Option<bool>,
    ) -> (usize, usize) {
        let (e, x) = if lat {
            (lattice::<T>(k * d, seed), lattice::<T>(n * d, seed ^ 7))
        } else {
            (values::<T>(k * d, seed), values::<T>(n * d, seed ^ 7))
        };
        let cb = codebook(&e, d, metric);
        let mut dev = CodebookGpu::new(g, &cb).unwrap().with_tensor_cores(true).unwrap();
        if let Some(on) = wg {
            dev = dev.with_wgmma(on).unwrap();
            assert_eq!(dev.wgmma(), on);
        }
        assert!(dev.tensor_cores());
        let (idx, dist) = dev.argmin_dist_host(&x).unwrap();
        let (ri, _) = host(&cb, Backend::Reference, &x).unwrap();
        let (ci, cd) = host(&cb, Backend::Cpu, &x).unwrap();
        let kernel = if dev.wgmma() { "wgmma" } else { "mma.sync" };
        let ctx = format!("tensor cores ({kernel}) {} {metric:?} n={n} k={k} d={d} seed={seed}", T::DTYPE.name());
        if lat {
            // Small integers: every dot product is exact in f32 however it is summed.
            assert_eq!(idx, ci, "{ctx}: exact data must give the cpu's indices");
        }
        // Tensor cores may truncate inside an mma (Fasi et al. 2021): twice the f32 bound.
        let ties = near_ties(&cb, &x, &idx, &ri, 2.0);
        for r in 0..n {
            if idx[r] == ci[r] {
                assert_eq!(dist[r].to_bits(), cd[r].to_bits(), "{ctx}: row {r} distance");
            }
        }
        (ties, n)
    }

    /// The tensor-core path: indices equal to the reference's except at near-ties (rounding
    /// order differs), counted; distances bit-identical to the cpu backend's wherever the
    /// indices agree (the finish kernel is shared); ties to the lowest index on exact data.
    #[test]
    fn tensor_cores_match_the_reference_up_to_near_ties() {
        let Some(g) = gpu() else { return };
        let (mut ties, mut rows) = (0, 0);
        let mut rng = Rng(99);
        for i in 0..super::common::sim_cap(48, 6) as u64 {
            let n = 1 + (rng.next_u64() % 300) as usize;
            let k = 1 + (rng.next_u64() % 600) as usize;
            let d = [1, 3, 4, 8, 15, 16, 17, 32, 33, 64, 256][(rng.next_u64() % 11) as usize];
            let (n, k) = if super::common::simulated() { (1 + n % 130, 1 + k % 130) } else { (n, k) };
            let metric = if i % 2 == 0 { Metric::L2 } else { Metric::Cosine };
            let lat = i % 3 == 0;
            let (t, r) = if i % 4 < 2 {
                tc_case::<bf16>(g, n, k, d, metric, i, lat, None)
            } else {
                tc_case::<f16>(g, n, k, d, metric, i, lat, None)
            };
            ties += t;
            rows += r;
        }
        let big: &[(usize, usize, usize)] = if super::common::simulated() {
            &[(130, 129, 16)]
        } else {
            &[(1, 20000, 8), (3000, 1100, 256), (130, 129, 16)]
        };
        for &(n, k, d) in big {
            ties += tc_case::<bf16>(g, n, k, d, Metric::L2, 5, false, None).0;
            rows += n;
        }
        // x not 16-byte aligned (a view one element in, D a multiple of 8): the padded copy,
        // with the same indices as the aligned buffer and (small integers) as the cpu's.
        let (n, d) = (37, 16);
        let e = lattice::<bf16>(70 * d, 3);
        let cb = codebook(&e, d, Metric::L2);
        let dev = CodebookGpu::new(g, &cb).unwrap().with_tensor_cores(true).unwrap();
        let x = lattice::<bf16>(n * d + 1, 4); // exact dot products: the cpu's indices
        let stream = g.stream();
        let whole = stream.clone_htod(&x).unwrap();
        let aligned = stream.clone_htod(&x[1..]).unwrap();
        let (mut i1, mut i2) = (stream.alloc_zeros::<u32>(n).unwrap(), stream.alloc_zeros::<u32>(n).unwrap());
        dev.argmin(stream, &whole.slice(1..), &mut i1, None).unwrap();
        dev.argmin(stream, &aligned, &mut i2, None).unwrap();
        let (h1, h2) = (stream.clone_dtoh(&i1).unwrap(), stream.clone_dtoh(&i2).unwrap());
        assert_eq!(h1, h2, "an unaligned x view gives other indices");
        assert_eq!(h1, host(&cb, Backend::Cpu, &x[1..]).unwrap().0, "unaligned x vs the cpu backend");
        eprintln!("cuda argmin tensor cores: {rows} rows vs the reference, {ties} near-ties (within 2x the f32 bound)");
        assert!(CodebookGpu::new(g, &codebook(&values::<f32>(8, 1), 2, Metric::L2))
            .unwrap()
            .with_tensor_cores(true)
            .is_err());
    }

    /// The sm_90a wgmma search where it applies (compute capability 9.0, 64 ≤ D ≤ 256): one
    /// k-block and several (D = 64, 72, 256; D = 67 through the padded x), both metrics and
    /// dtypes, exact data equal to the cpu's indices, random data against the reference up to
    /// near-ties, and the mma.sync search on the same data; elsewhere `with_wgmma(true)` is a
    /// typed error.
    #[test]
    fn wgmma_search_matches_the_reference_up_to_near_ties() {
        let Some(g) = gpu() else { return };
        let e = lattice::<bf16>(40 * 16, 1);
        let small = CodebookGpu::new(g, &codebook(&e, 16, Metric::L2)).unwrap();
        assert!(matches!(small.with_wgmma(true), Err(Error::Unsupported { .. })), "wgmma before tensor cores");
        let small = CodebookGpu::new(g, &codebook(&e, 16, Metric::L2)).unwrap().with_tensor_cores(true).unwrap();
        assert!(!small.wgmma(), "D = 16 is below WG_MIN_D: mma.sync");
        assert!(matches!(small.with_wgmma(true), Err(Error::Unsupported { .. })), "D = 16");
        if g.compute_capability().unwrap() != (9, 0) {
            let e = lattice::<bf16>(40 * 64, 1);
            let dev = CodebookGpu::new(g, &codebook(&e, 64, Metric::L2)).unwrap().with_tensor_cores(true).unwrap();
            assert!(!dev.wgmma());
            assert!(matches!(dev.with_wgmma(true), Err(Error::Unsupported { .. })), "not sm_90");
            eprintln!("skipped: the wgmma search needs compute capability 9.0");
            return;
        }
        let sim = super::common::simulated();
        let cases: &[(usize, usize, usize, bool)] = if sim {
            &[(70, 150, 72, true), (130, 20, 64, false), (3, 9, 256, false), (5, 30, 67, true)]
        } else {
            &[(70, 150, 72, true), (3000, 1100, 256, false), (1000, 5000, 64, false), (129, 300, 67, true)]
        };
        let (mut ties, mut rows) = (0, 0);
        for (i, &(n, k, d, lat)) in cases.iter().enumerate() {
            let metric = if i % 2 == 0 { Metric::L2 } else { Metric::Cosine };
            for wg in [true, false] {
                let (t, r) = if i % 2 == 0 {
                    tc_case::<bf16>(g, n, k, d, metric, 40 + i as u64, lat, Some(wg))
                } else {
                    tc_case::<f16>(g, n, k, d, metric, 40 + i as u64, lat, Some(wg))
                };
                ties += t;
                rows += r;
            }
        }
        // The default on this GPU for D in range is wgmma; codebooks of different D share the
        // entry (and its dynamic shared memory limit): a later, smaller one must not break an
        // earlier, larger one.
        let (e256, e64) = (lattice::<bf16>(20 * 256, 9), lattice::<bf16>(20 * 64, 10));
        let big = CodebookGpu::new(g, &codebook(&e256, 256, Metric::L2)).unwrap().with_tensor_cores(true).unwrap();
        let dev = CodebookGpu::new(g, &codebook(&e64, 64, Metric::L2)).unwrap().with_tensor_cores(true).unwrap();
        assert!(big.wgmma() && dev.wgmma());
        let x = lattice::<bf16>(3 * 256, 11);
        let (want, _) = host(&codebook(&e256, 256, Metric::L2), Backend::Cpu, &x).unwrap();
        assert_eq!(big.argmin_host(&x).unwrap(), want, "D = 256 after a D = 64 codebook");
        eprintln!(
            "cuda argmin wgmma / mma.sync: {rows} rows vs the reference, {ties} near-ties (within 2x the f32 bound)"
        );
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let Some(g) = gpu() else { return };
        let cb = codebook(&values::<f32>(10 * 4, 1), 4, Metric::L2);
        let dev = CodebookGpu::new(g, &cb).unwrap();
        let e = dev.argmin_host(&[0.0f32; 7]).unwrap_err();
        assert!(matches!(e, Error::Shape { family: Family::Argmin, .. }), "{e}");
        assert_eq!(dev.argmin_host(&[]).unwrap(), Vec::<u32>::new());
        let stream = g.stream();
        let x = stream.clone_htod(&[1.0f32; 8]).unwrap();
        let mut idx = stream.alloc_zeros::<u32>(3).unwrap();
        let e = dev.argmin(stream, &x, &mut idx, None).unwrap_err();
        assert!(matches!(e, Error::Length { family: Family::Argmin, what: "indices", expected: 2, got: 3 }), "{e}");
        let mut idx = stream.alloc_zeros::<u32>(2).unwrap();
        let mut dist = stream.alloc_zeros::<f32>(1).unwrap();
        let e = dev.argmin(stream, &x, &mut idx, Some(&mut dist)).unwrap_err();
        assert!(matches!(e, Error::Length { what: "dist", .. }), "{e}");
        let mut out = stream.alloc_zeros::<f32>(7).unwrap();
        let e = dev.lookup(stream, &idx, &mut out).unwrap_err();
        assert!(matches!(e, Error::Length { .. }), "{e}");
    }
}
