//! The CUDA token-merging backend against the cpu backend, bit for bit.
//!
//! Without a GPU: the committed `kernels/merge.ptx` is what `kernels/gen_merge.py` writes, and
//! every entry the Rust side launches exists with one parameter block of `MergeParams`' size
//! (and, with the `cuda` feature, the same field offsets as the PTX's `// abi` lines), and that
//! PTX runs on `kernels/ptx_sim.py` as the contract says.
//!
//! With a GPU (skipped with a `skipped:` line when there is none, FAILING when
//! `VISTOK_REQUIRE_GPU=1`): random B, N (odd / even, 2, 3, tile edges), C (1, odd, not a
//! multiple of the 16-channel stage), r (0, 1, max, random), class / distillation flags, output
//! order, metric dtypes f32 / f16 / bf16, planted exact ties (duplicate rows, all-zero rows,
//! small integer values) and both B-tile split settings: the GPU plan must EQUAL the cpu plan
//! (same f32 contract, so no near-tie allowance); merge (sum, mean), weighted merge (values and
//! sizes) and unmerge must equal the cpu backend bit for bit (any NaN equal to any NaN; outputs
//! poisoned first). Bad input: typed errors, the same as the cpu backend's where both check.

mod common;

use std::collections::BTreeMap;

use common::ptx::{self, EntryDecl};

const PTX: &str = include_str!("../kernels/merge.ptx");
const PTX_SM90: &str = include_str!("../kernels/merge_sm90.ptx");
const PARAM_BYTES: usize = 96;
const BLOCK: usize = 256;

/// `(entry)` in file order.
fn expected_entries() -> Vec<String> {
    let floats = ["f32", "f16", "bf16"];
    let mut v: Vec<String> = floats.iter().map(|t| format!("merge_normalize_{t}")).collect();
    v.extend(["merge_similarity", "merge_reduce", "merge_rank"].map(String::from));
    for kind in ["sum", "mean", "wavg", "unmerge"] {
        v.extend(floats.iter().map(|t| format!("merge_{kind}_{t}")));
    }
    for kind in ["pack", "similarity_mma"] {
        v.extend(["f16", "bf16"].map(|t| format!("merge_{kind}_{t}")));
    }
    v
}

fn abi() -> BTreeMap<String, usize> {
    ptx::abi(PTX)
}
#[test]
fn ptx_header_and_entries() {
    let directive = |d: &str| ptx::directive(PTX, d);
    assert_eq!(directive(".version "), Some("8.0"));
    assert_eq!(directive(".target "), Some("sm_80"));
    assert_eq!(directive(".address_size "), Some("64"));
    assert!(PTX.is_ascii() && !PTX.contains('\0'));
    let found = ptx::entries(PTX);
    let names: Vec<&str> = found.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, expected_entries(), "entries and their order");
    for EntryDecl { name, params, maxntid } in &found {
        assert_eq!(params, &[format!(".param .align 8 .b8 p[{PARAM_BYTES}]")], "{name}: parameter list");
        assert_eq!(maxntid.as_deref(), Some(format!("{BLOCK}, 1, 1").as_str()), "{name}: .maxntid");
    }
    let abi = abi();
    assert_eq!((abi["merge size"], abi["block"], abi["tile"], abi["kstep"]), (PARAM_BYTES, BLOCK, 64, 16));
    assert_eq!((abi["tc_tile"], abi["tc_k"]), (128, 32));
    let offs: Vec<usize> =
        abi.iter().filter(|(k, _)| k.starts_with("merge ") && *k != "merge size").map(|(_, &v)| v).collect();
    assert!(offs.len() == 17 && offs.iter().all(|&o| o < PARAM_BYTES), "{offs:?}");
    // Nothing approximate or flushing: the score contract needs correctly rounded f32.
    for bad in [".ftz", ".approx", "mul.f32", "add.f32", "fma.f32", "div.f32", "sqrt.f32", "rcp"] {
        assert!(!PTX.contains(bad), "merge.ptx contains `{bad}`");
    }
}

/// The Hopper module: sm_90a (wgmma), PTX ISA 8.0, the two wgmma similarities with the same
/// parameter block.
#[test]
fn sm90_ptx_header_and_entries() {
    let directive = |d: &str| ptx::directive(PTX_SM90, d);
    assert_eq!((directive(".version "), directive(".target ")), (Some("8.0"), Some("sm_90a")));
    assert!(PTX_SM90.is_ascii());
    let found = ptx::entries(PTX_SM90);
    let names: Vec<&str> = found.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["merge_similarity_wgmma_f16", "merge_similarity_wgmma_bf16"]);
    for EntryDecl { name, params, maxntid } in &found {
        assert_eq!(params, &[format!(".param .align 8 .b8 p[{PARAM_BYTES}]")], "{name}: parameter list");
        assert_eq!(maxntid.as_deref(), Some(format!("{BLOCK}, 1, 1").as_str()), "{name}: .maxntid");
    }
    let abi = ptx::abi(PTX_SM90);
    assert_eq!((abi["tc_tile"], abi["wgmma_shared"]), (128, 1024 + 4 * 32768));
    for (k, v) in ptx::abi(PTX).iter().filter(|(k, _)| k.starts_with("merge ")) {
        assert_eq!(abi.get(k), Some(v), "{k}: the same parameter block as merge.ptx");
    }
    for bad in [".ftz", ".approx", "mul.f32", "add.f32", "fma.f32", "div.f32", "sqrt.f32", "rcp"] {
        assert!(!PTX_SM90.contains(bad), "merge_sm90.ptx contains `{bad}`");
    }
}

#[test]
fn committed_ptx_is_what_the_generator_writes() {
    ptx::check_generated("gen_merge.py", &["merge"], "merge.ptx", PTX);
    ptx::check_generated("gen_merge.py", &["merge_sm90"], "merge_sm90.ptx", PTX_SM90);
}

/// The committed PTX run on `kernels/ptx_sim.py` (no GPU): the plan kernels (random shapes,
/// class / distillation tokens, exact ties, B-tile splits), the non-finite status words, merge /
/// mean / weighted merge and unmerge in every dtype, against the Python model of the contract
/// in `kernels/gen_merge.py --simulate`, bit for bit.
#[test]
fn ptx_runs_on_the_interpreter_as_the_contract_says() {
    ptx::check_generator_run("gen_merge.py", &["--simulate"], "merge simulation passed");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn skipped_without_cuda_feature() {
    common::skip_without_cuda_feature();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::time::Instant;

    use super::common::gpu::gpu;
    use super::common::plans::{compare_plans, oracle_scores};
    use super::common::{poison, Rng};
    use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use vistok::cuda::merge::{self as cm, MergeKernel};
    use vistok::merge::{MatchConfig, MergeMode, MergePlan};
    use vistok::{bf16, f16, Backend, Error, Family, Float, View, ViewMut};

    #[test]
    fn rust_abi_matches_the_ptx() {
        assert_eq!(cm::PARAM_BYTES, super::PARAM_BYTES);
        assert_eq!(cm::BLOCK as usize, super::BLOCK);
        assert_eq!(cm::KERNEL_NAMES.to_vec(), super::expected_entries());
        let abi = super::abi();
        let mut ptx: Vec<(String, usize)> = abi
            .iter()
            .filter_map(|(k, &v)| k.strip_prefix("merge ").filter(|f| *f != "size").map(|f| (f.to_string(), v)))
            .collect();
        ptx.sort_by_key(|p| p.1);
        let rust: Vec<(String, usize)> = cm::param_offsets().into_iter().map(|(f, o)| (f.to_string(), o)).collect();
        assert_eq!(rust, ptx, "field offsets, Rust vs PTX");
        assert_eq!((abi["tile"], abi["kstep"]), (cm::TILE, cm::KSTEP));
        assert_eq!((abi["tc_tile"], abi["tc_k"]), (cm::TC_TILE, cm::TC_K));
        let sm90: Vec<String> = super::ptx::entries(super::PTX_SM90).into_iter().map(|e| e.name).collect();
        assert_eq!(cm::WGMMA_NAMES.to_vec(), sm90);
        assert_eq!(super::ptx::abi(super::PTX_SM90)["wgmma_shared"], cm::WGMMA_SHARED);
    }

    /// The sm_90a wgmma similarity where it applies (compute capability 9.0, C ≥ 64): one and
    /// two 64-channel k-blocks, both dtypes, class / distillation tokens, B-tile splits, plans
    /// equal to the reference up to counted near-ties, and the mma.sync similarity on the same
    /// metrics; elsewhere `with_wgmma(true)` is a typed error.
    #[test]
    fn wgmma_similarity_plans_equal_the_reference_up_to_near_ties() {
        let Some(gpu) = gpu() else { return };
        let plain = MergeKernel::new(gpu).unwrap();
        assert!(matches!(plain.with_wgmma(true), Err(Error::Unsupported { .. })), "wgmma without tensor cores");
        if gpu.compute_capability().unwrap() != (9, 0) {
            let k = MergeKernel::new(gpu).unwrap().with_tensor_cores(true).unwrap();
            assert!(!k.wgmma());
            assert!(matches!(k.with_wgmma(true), Err(Error::Unsupported { .. })), "not sm_90");
            eprintln!("skipped: the wgmma similarity needs compute capability 9.0");
            return;
        }
        let kernels = |wg: bool| -> Vec<MergeKernel> {
            [1, 4096]
                .map(|t| {
                    MergeKernel::new(gpu)
                        .unwrap()
                        .with_target_blocks(t)
                        .with_tensor_cores(true)
                        .unwrap()
                        .with_wgmma(wg)
                        .unwrap()
                })
                .into()
        };
        let (wg, mma) = (kernels(true), kernels(false));
        assert!(wg[0].wgmma() && !mma[0].wgmma());
        let sim = super::common::simulated();
        let cases: &[([usize; 3], usize, u64)] = if sim {
            &[([1, 131, 72], 30, 3), ([2, 40, 64], 11, 1)]
        } else {
            &[([1, 131, 72], 30, 3), ([2, 40, 64], 11, 1), ([3, 300, 130], 140, 7), ([8, 1024, 768], 256, 0)]
        };
        let mut rng = Rng(5);
        let mut tally = TcTally { plans: 0, batches: 0, tied: 0 };
        for (i, &(dims, r, flags)) in cases.iter().enumerate() {
            let cfg = MatchConfig::new(r).class_token(flags & 1 != 0).distill_token(flags & 2 != 0);
            for ks in [&wg, &mma] {
                if i % 2 == 0 {
                    tc_case::<bf16>(ks, dims, &cfg, 1 + i as u64 % 3, &mut rng, &mut tally);
                } else {
                    tc_case::<f16>(ks, dims, &cfg, 1 + i as u64 % 3, &mut rng, &mut tally);
                }
            }
        }
        eprintln!(
            "cuda merge (wgmma / mma.sync): {} plans equal to the reference ({} of {} batches had a near-tie, allowed)",
            tally.plans, tally.tied, tally.batches
        );
    }

    /// The similarity stage alone (what the benches' `-similarity` rows time): the exact and
    /// the tensor-core kernel, repeated runs give the same partial bests (every entry written:
    /// the buffer starts zeroed and a best key is never 0), the flop count, typed errors.
    #[test]
    fn similarity_stage_runs_alone_and_repeats() {
        let Some(gpu) = gpu() else { return };
        let s = gpu.stream();
        let mut rng = Rng(17);
        let dims = [2usize, 131, 72];
        let [b, n, c] = dims;
        let flops = 2 * (b * n.div_ceil(2) * (n / 2) * c) as u64;
        let exact = MergeKernel::new(gpu).unwrap();
        let tc = MergeKernel::new(gpu).unwrap().with_tensor_cores(true).unwrap();
        let m32 = s.clone_htod(&metric::<f32>(b, n, c, 1, &mut rng)).unwrap();
        let m16 = s.clone_htod(&metric::<bf16>(b, n, c, 1, &mut rng)).unwrap();
        let want_tc = if tc.wgmma() { "merge_similarity_wgmma_bf16" } else { "merge_similarity_mma_bf16" };
        let mut stages = [
            exact.similarity_stage(s, &m32, dims).unwrap(),
            exact.similarity_stage(s, &m16, dims).unwrap(),
            tc.similarity_stage(s, &m16, dims).unwrap(),
        ];
        let kernels = [&exact, &exact, &tc];
        let mut bests = vec![];
        for (stage, (k, want)) in
            stages.iter_mut().zip(kernels.into_iter().zip(["merge_similarity", "merge_similarity", want_tc]))
        {
            assert_eq!((stage.kernel().as_str(), stage.flops()), (want, flops));
            k.run_similarity(s, stage).unwrap();
            let first = stage.partial_bests(s).unwrap();
            assert!(first.len() >= b * n.div_ceil(2) && first.iter().all(|&x| x != 0), "{want}: entries unwritten");
            for _ in 0..2 {
                k.run_similarity(s, stage).unwrap();
            }
            assert_eq!(stage.partial_bests(s).unwrap(), first, "{want}: repeated runs differ");
            let (na, nb) = (n.div_ceil(2), n / 2);
            let splits = first.len() / (b * na);
            assert_eq!(first.len(), b * splits * na, "{want}: [B, splits, na]");
            bests.push(
                (0..b * na)
                    .map(|i| {
                        let (bi, a) = (i / na, i % na);
                        (0..splits)
                            .map(|sp| first[(bi * splits + sp) * na + a])
                            .map(|x| (f32::from_bits(x as u32), (x >> 32) as usize))
                            .fold((f32::NEG_INFINITY, usize::MAX), |acc, e| if e.0 > acc.0 { e } else { acc })
                    })
                    .inspect(|&(_, j)| assert!(j < nb, "{want}: B index {j}"))
                    .collect::<Vec<(f32, usize)>>(),
            );
        }
        // The best B of every A row against the f64 oracle: its oracle score within the
        // contract's tolerance of the oracle's best (the exact kernel: its own score too).
        let v16: Vec<bf16> = s.clone_dtoh(&m16).unwrap();
        let v32: Vec<f32> = s.clone_dtoh(&m32).unwrap();
        let nb = n / 2;
        for (i, best) in bests.iter().enumerate() {
            let oracle = if i == 0 {
                oracle_scores(&v32, dims, &MatchConfig::new(1))
            } else {
                oracle_scores(&v16, dims, &MatchConfig::new(1))
            };
            let tol = 2.0 * tc_tol(c);
            for (row, &(score, j)) in best.iter().enumerate() {
                let o = &oracle[row * nb..][..nb];
                let top = o.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                assert!(top - o[j] <= tol && (score as f64 - o[j]).abs() <= tol, "stage {i}, row {row}: B {j}");
            }
        }
        // f32 and bf16 metrics of the same values (the exact kernel widens bf16 exactly) agree
        // once the f32 metric holds the bf16 values.
        let v16: Vec<bf16> = s.clone_dtoh(&m16).unwrap();
        let widened = s.clone_htod(&v16.iter().map(|x| x.to_f32()).collect::<Vec<f32>>()).unwrap();
        let mut w = exact.similarity_stage(s, &widened, dims).unwrap();
        exact.run_similarity(s, &mut w).unwrap();
        assert_eq!(w.partial_bests(s).unwrap(), stages[1].partial_bests(s).unwrap(), "bf16 vs its f32 widening");
        assert!(matches!(exact.similarity_stage(s, &m32.slice(0..0), [0, n, c]), Err(Error::Invalid { .. })), "B = 0");
        assert!(matches!(exact.similarity_stage(s, &m32, [b, n, c + 1]), Err(Error::Length { .. })), "length");
        assert!(matches!(exact.similarity_stage(s, &m32, [b * n * c, 1, 1]), Err(Error::Shape { .. })), "N = 1");
    }

    /// A metric with planted exact ties: small integers (many equal cosines), duplicated rows,
    /// all-zero rows, or plain random values.
    fn metric<M: Float>(b: usize, n: usize, c: usize, style: u64, rng: &mut Rng) -> Vec<M> {
        let mut v: Vec<f32> = (0..b * n * c)
            .map(|_| match style {
                0 => (rng.next_u64() % 5) as f32 - 2.0,
                _ => rng.uniform(-2.0, 2.0),
            })
            .collect();
        if style >= 2 {
            for row in 0..b * n {
                match rng.next_u64() % 8 {
                    0 if row >= 2 => {
                        let (src, dst) = ((row - 2) * c, row * c);
                        v.copy_within(src..src + c, dst); // same set as row - 2
                    }
                    1 if row >= 1 => {
                        let (src, dst) = ((row - 1) * c, row * c);
                        v.copy_within(src..src + c, dst); // the other set
                    }
                    2 => v[row * c..][..c].fill(0.0),
                    _ => {}
                }
            }
        }
        v.into_iter().map(M::from_f32).collect()
    }

    fn same_bits<T: Float>(a: &[T], b: &[T]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                let (x, y) = (x.to_f32(), y.to_f32());
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
            })
    }

    struct Tally {
        plans: usize,
        merges: usize,
        merged_tokens: usize,
    }

    /// One case: the GPU plan equals the cpu plan; then apply it with values of dtype `T`.
    fn case<M: Float + DeviceRepr, T: Float + DeviceRepr + ValidAsZeroBits>(
        k: &MergeKernel,
        dims: [usize; 3],
        cfg: &MatchConfig,
        style: u64,
        cx: usize,
        rng: &mut Rng,
        tally: &mut Tally,
    ) {
        let [b, n, c] = dims;
        let m: Vec<M> = metric(b, n, c, style, rng);
        let mv = View::new(&m, &dims).unwrap();
        let want = MergePlan::bipartite(Backend::Cpu, mv, cfg).unwrap();
        let got = k.plan_host(mv, cfg).unwrap();
        assert_eq!(got, want, "plan differs from the cpu backend: dims {dims:?} {cfg:?} style {style}");
        tally.plans += 1;
        tally.merged_tokens += b * got.r();

        let o = want.out_tokens();
        let x: Vec<T> = (0..b * n * cx).map(|_| T::from_f32(rng.uniform(-4.0, 4.0))).collect();
        let xv = View::new(&x, &[b, n, cx]).unwrap();
        for mode in [MergeMode::Sum, MergeMode::Mean] {
            let mut y = vec![poison::<T>(); b * o * cx];
            want.merge(Backend::Cpu, xv, mode, ViewMut::new(&mut y, &[b, o, cx]).unwrap()).unwrap();
            let g = k.merge_host(&want, xv, mode).unwrap();
            assert!(same_bits(&g, &y), "merge {mode:?} differs: dims {dims:?} {cfg:?} C {cx}");
        }
        let sizes: Vec<f32> = (0..b * n).map(|_| 1.0 + (rng.next_u64() % 7) as f32 * 0.75).collect();
        let sv = View::new(&sizes, &[b, n]).unwrap();
        let (mut y, mut s) = (vec![poison::<T>(); b * o * cx], vec![f32::NAN; b * o]);
        want.merge_weighted(
            Backend::Cpu,
            xv,
            Some(sv),
            ViewMut::new(&mut y, &[b, o, cx]).unwrap(),
            ViewMut::new(&mut s, &[b, o]).unwrap(),
        )
        .unwrap();
        let (gy, gs) = k.merge_weighted_host(&want, xv, Some(sv)).unwrap();
        assert!(same_bits(&gy, &y), "weighted merge values differ: dims {dims:?} {cfg:?}");
        assert!(same_bits(&gs, &s), "weighted merge sizes differ: dims {dims:?} {cfg:?}");
        let yv = View::new(&y, &[b, o, cx]).unwrap();
        let mut back = vec![poison::<T>(); b * n * cx];
        want.unmerge(Backend::Cpu, yv, ViewMut::new(&mut back, &[b, n, cx]).unwrap()).unwrap();
        assert!(same_bits(&k.unmerge_host(&want, yv).unwrap(), &back), "unmerge differs: dims {dims:?}");
        tally.merges += 1;
    }

    fn run_cases<M: Float + DeviceRepr, T: Float + DeviceRepr + ValidAsZeroBits>(
        k: &MergeKernel,
        seed: u64,
        count: usize,
        tally: &mut Tally,
    ) {
        let mut rng = Rng(seed);
        let ns = [2, 3, 4, 5, 7, 8, 33, 64, 127, 128, 129, 130, 197, 255, 258];
        let cs = [1, 2, 3, 15, 16, 17, 31, 48, 65, 100];
        for i in 0..super::common::sim_cap(count, 2) {
            let b = 1 + (rng.next_u64() % 3) as usize;
            let n = ns[(rng.next_u64() as usize) % ns.len()];
            let c = cs[(rng.next_u64() as usize) % cs.len()];
            let max = n;
            let r = match i % 4 {
                0 => 0,
                1 => 1,
                2 => max,
                _ => (rng.next_u64() as usize) % (n / 2 + 1),
            };
            let f = rng.next_u64();
            let cfg =
                MatchConfig::new(r).class_token(f & 1 != 0).distill_token(f & 2 != 0).keep_original_order(f & 4 != 0);
            let cx = [1, 3, 8, 33][(f >> 3) as usize % 4];
            case::<M, T>(k, [b, n, c], &cfg, (f >> 5) % 4, cx, &mut rng, tally);
        }
    }

    #[test]
    fn plans_and_merges_equal_the_cpu_backend() {
        let Some(gpu) = gpu() else { return };
        let t0 = Instant::now();
        let mut tally = Tally { plans: 0, merges: 0, merged_tokens: 0 };
        for target in [1, 4096] {
            let k = MergeKernel::new(gpu).unwrap().with_target_blocks(target);
            run_cases::<f32, f32>(&k, 11 + target as u64, 48, &mut tally);
            run_cases::<f16, f16>(&k, 23 + target as u64, 24, &mut tally);
            run_cases::<bf16, bf16>(&k, 37 + target as u64, 24, &mut tally);
            run_cases::<f32, bf16>(&k, 41 + target as u64, 12, &mut tally);
        }
        eprintln!(
            "cuda merge: {} plans equal to the cpu backend ({} tokens merged), {} merge/wavg/unmerge sets bit-identical, {:.1} s",
            tally.plans,
            tally.merged_tokens,
            tally.merges,
            t0.elapsed().as_secs_f64()
        );
    }

    #[test]
    fn large_shapes_equal_the_cpu_backend() {
        let Some(gpu) = gpu() else { return };
        let t0 = Instant::now();
        let k = MergeKernel::new(gpu).unwrap();
        let mut rng = Rng(5);
        let mut tally = Tally { plans: 0, merges: 0, merged_tokens: 0 };
        let shapes = [([8, 197, 768], 49, true), ([2, 1024, 320], 256, false), ([1, 4096, 64], 2048, false)];
        let sim = [([2, 197, 40], 49, true)]; // on tools/simcuda: a ViT-like shape, narrow
        let shapes = if super::common::simulated() { &sim[..] } else { &shapes[..] };
        for &(dims, r, class) in shapes {
            for style in [1, 3] {
                let cfg = MatchConfig::new(r).class_token(class);
                case::<f32, f32>(&k, dims, &cfg, style, 16, &mut rng, &mut tally);
                case::<bf16, bf16>(&k, dims, &cfg, style, 16, &mut rng, &mut tally);
            }
        }
        eprintln!(
            "cuda merge (ViT / SD shapes): {} plans and merges equal to the cpu backend, {:.1} s",
            tally.plans,
            t0.elapsed().as_secs_f64()
        );
    }

    /// One tensor-core case: the plan equals the reference's except at near-ties (counted),
    /// is valid within the tolerance everywhere, and is the same for both grid splits.
    fn tc_case<M: Float + DeviceRepr>(
        ks: &[MergeKernel],
        dims: [usize; 3],
        cfg: &MatchConfig,
        style: u64,
        rng: &mut Rng,
        tally: &mut TcTally,
    ) {
        let m: Vec<M> = metric(dims[0], dims[1], dims[2], style, rng);
        let mv = View::new(&m, &dims).unwrap();
        let want = MergePlan::bipartite(Backend::Reference, mv, cfg).unwrap();
        let scores = oracle_scores(&m, dims, cfg);
        let got = ks[0].plan_host(mv, cfg).unwrap();
        let ctx = format!("tensor cores, {}: dims {dims:?} {cfg:?} style {style}", M::DTYPE.name());
        tally.tied += compare_plans(&got, &want, &scores, tc_tol(dims[2]), &ctx);
        tally.batches += dims[0];
        tally.plans += 1;
        for k in &ks[1..] {
            assert_eq!(k.plan_host(mv, cfg).unwrap(), got, "{ctx}: another grid split gave another plan");
        }
    }

    struct TcTally {
        plans: usize,
        batches: usize,
        tied: usize,
    }

    /// The tensor-core score error against the f64 oracle: f32 accumulation of `C` exact
    /// products by the tensor cores (at most one rounding per 16-product step in the PTX
    /// model; allow one per 4 on hardware), the inverse norms' `(C + 6)·2⁻²⁴` each, two
    /// products — doubled, relative to `Σ|u_a u_b| ≤ 1`.
    fn tc_tol(c: usize) -> f64 {
        2.0 * ((c as f64 / 4.0 + 4.0) * 2f64.powi(-23) + 2.0 * (c as f64 + 6.0) * 2f64.powi(-24))
    }

    #[test]
    fn tensor_core_plans_equal_the_reference_up_to_near_ties() {
        let Some(gpu) = gpu() else { return };
        let t0 = Instant::now();
        let ks: Vec<MergeKernel> = [1, 4096]
            .map(|t| MergeKernel::new(gpu).unwrap().with_target_blocks(t).with_tensor_cores(true).unwrap())
            .into();
        assert!(ks[0].tensor_cores());
        let mut rng = Rng(71);
        let mut tally = TcTally { plans: 0, batches: 0, tied: 0 };
        let ns: [usize; 12] = [2, 3, 5, 8, 33, 127, 130, 255, 256, 257, 300, 513];
        let cs = [1, 2, 7, 16, 31, 32, 33, 40, 65, 100];
        for i in 0..super::common::sim_cap(40, 4) {
            let b = 1 + (rng.next_u64() % 3) as usize;
            let n = ns[(rng.next_u64() as usize) % ns.len()];
            let c = cs[(rng.next_u64() as usize) % cs.len()];
            let r = match i % 3 {
                0 => 1,
                1 => n,
                _ => 1 + (rng.next_u64() as usize) % n.div_ceil(2),
            };
            let f = rng.next_u64();
            let cfg =
                MatchConfig::new(r).class_token(f & 1 != 0).distill_token(f & 2 != 0).keep_original_order(f & 4 != 0);
            let style = (f >> 3) % 4;
            if i % 2 == 0 {
                tc_case::<bf16>(&ks, [b, n, c], &cfg, style, &mut rng, &mut tally);
            } else {
                tc_case::<f16>(&ks, [b, n, c], &cfg, style, &mut rng, &mut tally);
            }
        }
        // ViT-B/16, the 8×1024×768 and SD-sized shapes (narrow ones on the stand-in).
        let shapes = [([8, 197, 768], 49, true), ([8, 1024, 768], 256, false), ([2, 4096, 320], 2048, false)];
        let sim = [([2, 197, 40], 49, true)];
        let shapes = if super::common::simulated() { &sim[..] } else { &shapes[..] };
        for &(dims, r, class) in shapes {
            let cfg = MatchConfig::new(r).class_token(class);
            tc_case::<bf16>(&ks[..1], dims, &cfg, 1, &mut rng, &mut tally);
        }
        // f32 metrics keep the exact kernel: equal to the cpu backend.
        let m: Vec<f32> = metric(2, 65, 24, 3, &mut rng);
        let mv = View::new(&m, &[2, 65, 24]).unwrap();
        let cfg = MatchConfig::new(20);
        assert_eq!(ks[0].plan_host(mv, &cfg).unwrap(), MergePlan::bipartite(Backend::Cpu, mv, &cfg).unwrap());
        // A non-finite element: the cpu backend's error.
        let mut m: Vec<bf16> = metric(2, 9, 5, 1, &mut rng);
        m[53] = bf16::from_f32(f32::NAN);
        m[61] = bf16::from_f32(f32::INFINITY);
        let mv = View::new(&m, &[2, 9, 5]).unwrap();
        let cfg = MatchConfig::new(3);
        assert_eq!(ks[0].plan_host(mv, &cfg).unwrap_err(), MergePlan::bipartite(Backend::Cpu, mv, &cfg).unwrap_err());
        eprintln!(
            "cuda merge (tensor cores): {} plans equal to the reference ({} of {} batches had a near-tie, allowed), {:.1} s",
            tally.plans,
            tally.tied,
            tally.batches,
            t0.elapsed().as_secs_f64()
        );
    }

    #[test]
    fn bad_input_gives_typed_errors() {
        let Some(gpu) = gpu() else { return };
        let k = MergeKernel::new(gpu).unwrap();
        let cfg = MatchConfig::new(2);
        let mut m: Vec<f32> = (0..2 * 9 * 5).map(|i| (i % 7) as f32 - 3.0).collect();
        m[53] = f32::NAN;
        for r in [0, 2] {
            let cfg = MatchConfig::new(r);
            let want = MergePlan::bipartite(Backend::Cpu, View::new(&m, &[2, 9, 5]).unwrap(), &cfg).unwrap_err();
            let got = k.plan_host(View::new(&m, &[2, 9, 5]).unwrap(), &cfg).unwrap_err();
            assert_eq!(got, want, "r = {r}");
        }
        m[53] = 1.0;
        m[20] = f32::NEG_INFINITY;
        m[70] = f32::NAN;
        let want = MergePlan::bipartite(Backend::Cpu, View::new(&m, &[2, 9, 5]).unwrap(), &cfg).unwrap_err();
        assert_eq!(k.plan_host(View::new(&m, &[2, 9, 5]).unwrap(), &cfg).unwrap_err(), want);
        assert!(matches!(want, Error::NonFinite { family: Family::Merge, .. }));
        m[20] = 0.5;
        m[70] = 0.25;
        assert!(matches!(
            k.plan_host(View::new(&m[..5], &[1, 1, 5]).unwrap(), &cfg),
            Err(Error::Shape { family: Family::Merge, .. })
        ));
        assert!(matches!(
            k.plan_host(View::new(&m[..0], &[2, 9, 0]).unwrap(), &cfg),
            Err(Error::Shape { family: Family::Merge, .. })
        ));
        let stream = gpu.stream();
        let dev = stream.clone_htod(&m).unwrap();
        assert!(matches!(k.plan(stream, &dev, [2, 9, 4], &cfg), Err(Error::Length { family: Family::Merge, .. })));
        let plan = k.plan(stream, &dev, [2, 9, 5], &cfg).unwrap();
        let dplan = k.upload(stream, &plan).unwrap();
        let mut short = stream.alloc_zeros::<f32>(3).unwrap();
        assert!(matches!(
            k.merge(stream, &dplan, &dev, MergeMode::Mean, &mut short),
            Err(Error::Length { family: Family::Merge, .. })
        ));
        let odd = stream.alloc_zeros::<f32>(2 * 9 * 5 + 1).unwrap();
        let mut out = stream.alloc_zeros::<f32>(2 * 7 * 5).unwrap();
        assert!(matches!(
            k.merge(stream, &dplan, &odd, MergeMode::Sum, &mut out),
            Err(Error::Shape { family: Family::Merge, .. })
        ));
        // Sizes: a non-positive and a NaN size, named as the cpu backend names them.
        let x = vec![1.0f32; 2 * 9 * 3];
        let xv = View::new(&x, &[2, 9, 3]).unwrap();
        for (at, v) in [(13, -1.0f32), (4, f32::NAN), (17, 0.0)] {
            let mut sizes = vec![1.0f32; 18];
            sizes[at] = v;
            let sv = View::new(&sizes, &[2, 9]).unwrap();
            let (mut y, mut s) = (vec![0.0f32; 2 * 7 * 3], vec![0.0f32; 14]);
            let want = plan
                .merge_weighted(
                    Backend::Cpu,
                    xv,
                    Some(sv),
                    ViewMut::new(&mut y, &[2, 7, 3]).unwrap(),
                    ViewMut::new(&mut s, &[2, 7]).unwrap(),
                )
                .unwrap_err();
            assert_eq!(k.merge_weighted_host(&plan, xv, Some(sv)).unwrap_err(), want, "size {v} at {at}");
        }
        eprintln!("cuda merge: bad inputs give the cpu backend's typed errors");
    }
}
