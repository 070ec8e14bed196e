//! `vistok run argmin`, `vistok run attention` and `vistok run merge`, end to end: inputs
//! written by an independent .npy writer, the binary run as a process, outputs read back and
//! compared bit for bit with the library API; bad inputs give one line, exit code 1 and no file.
#![cfg(feature = "cli")]

mod common;

use common::cli::{le, p, read_as, run_err, run_ok, write_npy_raw, Dir};
use common::Rng;
use vistok::argmin::{Codebook, Metric};
use vistok::attention::{Attention, Bias, Mask};
use vistok::merge::{MatchConfig, MergeMode, MergePlan};
use vistok::{f16, Backend, Element, Float, View, ViewMut};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n).map(|_| r.uniform(-2.0, 2.0)).collect()
}

fn to<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------------
// argmin

fn lib_argmin<T: Float>(
    e: &[T],
    k: usize,
    d: usize,
    metric: Metric,
    x: &[T],
    backend: Backend,
) -> (Vec<u32>, Vec<f32>) {
    let cb = Codebook::new(View::new(e, &[k, d]).unwrap(), metric).unwrap();
    let n = x.len() / d;
    let (mut ids, mut dist) = (vec![0u32; n], vec![0f32; n]);
    cb.argmin(
        backend,
        View::new(x, &[n, d]).unwrap(),
        ViewMut::new(&mut ids, &[n]).unwrap(),
        Some(ViewMut::new(&mut dist, &[n]).unwrap()),
    )
    .unwrap();
    (ids, dist)
}

#[test]
fn argmin_search_and_lookup_match_the_library() {
    let dir = Dir::new("argmin");
    let (k, d, lead) = (19, 7, [3usize, 5]);
    let n = lead[0] * lead[1];
    let e = values(k * d, 1);
    let x = values(n * d, 2);
    let (xp, ep, ip, dp, lp) =
        (dir.path("x.npy"), dir.path("e.npy"), dir.path("ids.npy"), dir.path("d.npy"), dir.path("l.npy"));
    for (metric, mname) in [(Metric::L2, "l2"), (Metric::Cosine, "cosine")] {
        for backend in ["cpu", "reference"] {
            let lib_backend = if backend == "cpu" { Backend::Cpu } else { Backend::Reference };
            // f32 files.
            write_npy_raw(&xp, "<f4", &[lead[0], lead[1], d], &le(&x));
            write_npy_raw(&ep, "<f4", &[k, d], &le(&e));
            run_ok(&[
                "argmin",
                "--codebook",
                p(&ep),
                "--metric",
                mname,
                "--backend",
                backend,
                "--dist",
                p(&dp),
                p(&xp),
                p(&ip),
            ]);
            let (want_ids, want_dist) = lib_argmin(&e, k, d, metric, &x, lib_backend);
            assert_eq!(read_as::<u32>(&ip, "<u4", &lead), want_ids, "{mname} {backend}");
            assert_eq!(f32_bits(&read_as::<f32>(&dp, "<f4", &lead)), f32_bits(&want_dist), "{mname} {backend}");
            // f16 files: the search runs in f16 (codebook converted to x's type).
            let (x16, e16) = (to::<f16>(&x), to::<f16>(&e));
            write_npy_raw(&xp, "<f2", &[lead[0], lead[1], d], &le(&x16));
            write_npy_raw(&ep, "<f2", &[k, d], &le(&e16));
            run_ok(&[
                "argmin",
                "--codebook",
                p(&ep),
                "--metric",
                mname,
                "--backend",
                backend,
                "--ids-dtype",
                "i8",
                p(&xp),
                p(&ip),
            ]);
            let (want_ids, _) = lib_argmin(&e16, k, d, metric, &x16, lib_backend);
            let got: Vec<u32> = read_as::<i64>(&ip, "<i8", &lead).into_iter().map(|v| v as u32).collect();
            assert_eq!(got, want_ids, "{mname} {backend} f16");
        }
    }
    // Lookup: ids → entries, in the codebook's type (f32 here), and --dtype bf16 rounding.
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % k as u32).collect();
    write_npy_raw(&ip, "<u4", &lead, &le(&ids));
    write_npy_raw(&ep, "<f4", &[k, d], &le(&e));
    run_ok(&["argmin", "--lookup", "--codebook", p(&ep), p(&ip), p(&lp)]);
    let want: Vec<f32> = ids.iter().flat_map(|&i| e[i as usize * d..][..d].to_vec()).collect();
    assert_eq!(f32_bits(&read_as::<f32>(&lp, "<f4", &[lead[0], lead[1], d])), f32_bits(&want));
    run_ok(&["argmin", "--lookup", "--dtype", "bf16", "--codebook", p(&ep), p(&ip), p(&lp)]);
    let want16: Vec<f32> = want.iter().map(|&v| vistok::bf16::from_f32(v).to_f32()).collect();
    assert_eq!(f32_bits(&read_as::<f32>(&lp, "<f4", &[lead[0], lead[1], d])), f32_bits(&want16));
}

#[test]
fn argmin_bad_input_is_one_line_and_no_file() {
    let dir = Dir::new("argmin-bad");
    let (xp, ep, ip, op) = (dir.path("x.npy"), dir.path("e.npy"), dir.path("ids.npy"), dir.path("o.npy"));
    let mut x = values(4 * 3, 5);
    write_npy_raw(&ep, "<f4", &[5, 3], &le(&values(15, 6)));
    write_npy_raw(&xp, "<f4", &[4, 3], &le(&x));
    let inputs = ["e.npy", "x.npy"];
    run_err(&dir, &["argmin", p(&xp), p(&op)], "--codebook E.npy is required", &inputs);
    run_err(&dir, &["argmin", "--codebook", p(&ep), "--metric", "l1", p(&xp), p(&op)], "--metric", &inputs);
    run_err(&dir, &["argmin", "--tensor-cores", "--codebook", p(&ep), p(&xp), p(&op)], "--backend cuda", &inputs);

    write_npy_raw(&ep, "<f4", &[3, 5], &le(&values(15, 6)));
    run_err(&dir, &["argmin", "--codebook", p(&ep), p(&xp), p(&op)], "expected [..., 5]", &inputs);
    write_npy_raw(&ep, "<f4", &[5, 3], &le(&values(15, 6)));
    x[7] = f32::NAN;
    write_npy_raw(&xp, "<f4", &[4, 3], &le(&x));
    run_err(&dir, &["argmin", "--codebook", p(&ep), p(&xp), p(&op)], "x[2, 1]", &inputs);
    write_npy_raw(&ip, "<u4", &[3], &le(&[0u32, 5, 1]));
    run_err(
        &dir,
        &["argmin", "--lookup", "--codebook", p(&ep), p(&ip), p(&op)],
        "indices[1] = 5",
        &["e.npy", "ids.npy", "x.npy"],
    );
}

// ---------------------------------------------------------------------------------------------
// attention

#[test]
fn attention_matches_the_library_with_masks_biases_and_lse() {
    let dir = Dir::new("attention");
    let (b, h, hkv, nq, nk, d) = (2, 4, 2, 9, 11, 16);
    let (qs, ks) = ([b, h, nq, d], [b, hkv, nk, d]);
    let (q, k, v) = (values(b * h * nq * d, 7), values(b * hkv * nk * d, 8), values(b * hkv * nk * d, 9));
    let kb: Vec<f32> = values(b * nk, 10).iter().map(|x| x.abs().ln_1p()).collect();
    let full = values(b * h * nq * nk, 11);
    let (sq, sk): (Vec<u32>, Vec<u32>) =
        ((0..nq as u32).map(|i| i / 3).collect(), (0..nk as u32).map(|j| j / 4).collect());
    let path = |n: &str| dir.path(n);
    write_npy_raw(&path("q.npy"), "<f4", &qs, &le(&q));
    write_npy_raw(&path("k.npy"), "<f4", &ks, &le(&k));
    write_npy_raw(&path("v.npy"), "<f4", &ks, &le(&v));
    write_npy_raw(&path("kb.npy"), "<f4", &[b, nk], &le(&kb));
    write_npy_raw(&path("fb.npy"), "<f4", &[b, h, nq, nk], &le(&full));
    write_npy_raw(&path("sq.npy"), "<u4", &[nq], &le(&sq));
    write_npy_raw(&path("sk.npy"), "<u4", &[nk], &le(&sk));
    let (qp, kp, vp, op, lp) = (path("q.npy"), path("k.npy"), path("v.npy"), path("o.npy"), path("lse.npy"));
    let segs = format!("{},{}", p(&path("sq.npy")), p(&path("sk.npy")));
    let cases: Vec<(Vec<String>, Attention)> = vec![
        (vec![], Attention::new()),
        (vec!["--causal".into()], Attention::new().mask(Mask::Causal)),
        (vec!["--window".into(), "2,inf".into()], Attention::new().mask(Mask::Window { left: 2, right: usize::MAX })),
        (vec!["--segments".into(), segs.clone()], Attention::new().mask(Mask::Segments { q: &sq, k: &sk })),
        (
            vec!["--key-bias".into(), p(&path("kb.npy")).into(), "--scale".into(), "1/3".into()],
            Attention::new().bias(Bias::Key(View::new(&kb, &[b, nk]).unwrap())).scale(1.0 / 3.0),
        ),
        (
            vec!["--bias".into(), p(&path("fb.npy")).into()],
            Attention::new().bias(Bias::Full(View::new(&full, &[b, h, nq, nk]).unwrap())),
        ),
    ];
    for (flags, attn) in &cases {
        for backend in ["cpu", "reference"] {
            let mut args: Vec<&str> = vec!["attention", "--backend", backend, "--lse", p(&lp)];
            args.extend(flags.iter().map(String::as_str));
            args.extend([p(&qp), p(&kp), p(&vp), p(&op)]);
            run_ok(&args);
            let lib_backend = if backend == "cpu" { Backend::Cpu } else { Backend::Reference };
            let (mut o, mut lse) = (vec![0f32; q.len()], vec![0f32; b * h * nq]);
            attn.forward_lse(
                lib_backend,
                View::new(&q, &qs).unwrap(),
                View::new(&k, &ks).unwrap(),
                View::new(&v, &ks).unwrap(),
                ViewMut::new(&mut o, &qs).unwrap(),
                ViewMut::new(&mut lse, &[b, h, nq]).unwrap(),
            )
            .unwrap();
            assert_eq!(f32_bits(&read_as::<f32>(&op, "<f4", &qs)), f32_bits(&o), "{flags:?} {backend}");
            assert_eq!(f32_bits(&read_as::<f32>(&lp, "<f4", &[b, h, nq])), f32_bits(&lse), "{flags:?} {backend}");
        }
    }
    // bf16: inputs rounded, output bf16 written as exact <f4.
    run_ok(&["attention", "--dtype", "bf16", "--causal", p(&qp), p(&kp), p(&vp), p(&op)]);
    let (qb, kb16, vb) = (to::<vistok::bf16>(&q), to::<vistok::bf16>(&k), to::<vistok::bf16>(&v));
    let mut o = vec![vistok::bf16::from_f32(0.0); q.len()];
    Attention::new()
        .mask(Mask::Causal)
        .forward(
            Backend::Cpu,
            View::new(&qb, &qs).unwrap(),
            View::new(&kb16, &ks).unwrap(),
            View::new(&vb, &ks).unwrap(),
            ViewMut::new(&mut o, &qs).unwrap(),
        )
        .unwrap();
    let want: Vec<f32> = o.iter().map(|x| x.to_f32()).collect();
    assert_eq!(f32_bits(&read_as::<f32>(&op, "<f4", &qs)), f32_bits(&want));
}

#[test]
fn attention_bad_input_is_one_line_and_no_file() {
    let dir = Dir::new("attention-bad");
    let path = |n: &str| dir.path(n);
    write_npy_raw(&path("q.npy"), "<f4", &[1, 3, 4, 8], &le(&values(96, 1)));
    write_npy_raw(&path("k.npy"), "<f4", &[1, 2, 5, 8], &le(&values(80, 2)));
    let (qp, kp, op) = (path("q.npy"), path("k.npy"), path("o.npy"));
    let inputs = ["k.npy", "q.npy"];
    run_err(&dir, &["attention", p(&qp), p(&kp), p(&kp), p(&op)], "multiple", &inputs);
    run_err(&dir, &["attention", p(&qp), p(&kp), p(&op)], "expected four paths", &inputs);
    run_err(
        &dir,
        &["attention", "--causal", "--window", "1,1", p(&qp), p(&kp), p(&kp), p(&op)],
        "only one of",
        &inputs,
    );
    run_err(&dir, &["attention", "--window", "1", p(&qp), p(&kp), p(&kp), p(&op)], "--window", &inputs);
    run_err(&dir, &["attention", "--layout", "nhwc", p(&qp), p(&kp), p(&kp), p(&op)], "--layout", &inputs);
}

// ---------------------------------------------------------------------------------------------
// merge

#[test]
fn merge_matches_the_library() {
    let dir = Dir::new("merge");
    let (b, n, cm, c) = (2, 13, 6, 5);
    let metric = values(b * n * cm, 21);
    let x = values(b * n * c, 22);
    let sizes: Vec<f32> = (0..b * n).map(|i| 1.0 + (i % 3) as f32).collect();
    let path = |s: &str| dir.path(s);
    write_npy_raw(&path("m.npy"), "<f4", &[b, n, cm], &le(&metric));
    write_npy_raw(&path("x.npy"), "<f4", &[b, n, c], &le(&x));
    write_npy_raw(&path("s.npy"), "<f4", &[b, n], &le(&sizes));
    let (mp, xp, sp, op, slp, sop) =
        (path("m.npy"), path("x.npy"), path("s.npy"), path("o.npy"), path("slots.npy"), path("so.npy"));
    for (flags, config) in [
        (vec![], MatchConfig::new(4)),
        (vec!["--class-token"], MatchConfig::new(4).class_token(true)),
        (
            vec!["--class-token", "--distill-token", "--keep-order"],
            MatchConfig::new(4).class_token(true).distill_token(true).keep_original_order(true),
        ),
    ] {
        for backend in ["cpu", "reference"] {
            let lib_backend = if backend == "cpu" { Backend::Cpu } else { Backend::Reference };
            let plan = MergePlan::bipartite(lib_backend, View::new(&metric, &[b, n, cm]).unwrap(), &config).unwrap();
            let o_dims = [b, plan.out_tokens(), c];
            for mode in ["mean", "sum"] {
                let mut args =
                    vec!["merge", "--r", "4", "--backend", backend, "--mode", mode, "--x", p(&xp), "--slots", p(&slp)];
                args.extend(&flags);
                args.extend([p(&mp), p(&op)]);
                run_ok(&args);
                let mut want = vec![0f32; b * plan.out_tokens() * c];
                let m = if mode == "sum" { MergeMode::Sum } else { MergeMode::Mean };
                plan.merge(
                    lib_backend,
                    View::new(&x, &[b, n, c]).unwrap(),
                    m,
                    ViewMut::new(&mut want, &o_dims).unwrap(),
                )
                .unwrap();
                assert_eq!(
                    f32_bits(&read_as::<f32>(&op, "<f4", &o_dims)),
                    f32_bits(&want),
                    "{flags:?} {backend} {mode}"
                );
                assert_eq!(read_as::<u32>(&slp, "<u4", &[b, n]), plan.slots(), "{flags:?} {backend}");
            }
            let mut args = vec!["merge", "--r", "4", "--backend", backend, "--mode", "wavg", "--x", p(&xp)];
            args.extend(["--sizes", p(&sp), "--out-sizes", p(&sop)]);
            args.extend(&flags);
            args.extend([p(&mp), p(&op)]);
            run_ok(&args);
            let (mut want, mut want_sizes) = (vec![0f32; b * plan.out_tokens() * c], vec![0f32; b * plan.out_tokens()]);
            plan.merge_weighted(
                lib_backend,
                View::new(&x, &[b, n, c]).unwrap(),
                Some(View::new(&sizes, &[b, n]).unwrap()),
                ViewMut::new(&mut want, &o_dims).unwrap(),
                ViewMut::new(&mut want_sizes, &[b, plan.out_tokens()]).unwrap(),
            )
            .unwrap();
            assert_eq!(f32_bits(&read_as::<f32>(&op, "<f4", &o_dims)), f32_bits(&want), "{flags:?} {backend} wavg");
            assert_eq!(f32_bits(&read_as::<f32>(&sop, "<f4", &[b, plan.out_tokens()])), f32_bits(&want_sizes));
        }
    }
    // Without --x the metric itself is merged.
    run_ok(&["merge", "--r", "3", p(&mp), p(&op)]);
    let plan =
        MergePlan::bipartite(Backend::Cpu, View::new(&metric, &[b, n, cm]).unwrap(), &MatchConfig::new(3)).unwrap();
    let mut want = vec![0f32; b * (n - 3) * cm];
    plan.merge(
        Backend::Cpu,
        View::new(&metric, &[b, n, cm]).unwrap(),
        MergeMode::Mean,
        ViewMut::new(&mut want, &[b, n - 3, cm]).unwrap(),
    )
    .unwrap();
    assert_eq!(f32_bits(&read_as::<f32>(&op, "<f4", &[b, n - 3, cm])), f32_bits(&want));
}

#[test]
fn merge_bad_input_is_one_line_and_no_file() {
    let dir = Dir::new("merge-bad");
    let (mp, xp, op) = (dir.path("m.npy"), dir.path("x.npy"), dir.path("o.npy"));
    write_npy_raw(&mp, "<f4", &[2, 7, 3], &le(&values(42, 3)));
    write_npy_raw(&xp, "<f4", &[2, 6, 3], &le(&values(36, 4)));
    let inputs = ["m.npy", "x.npy"];
    run_err(&dir, &["merge", p(&mp), p(&op)], "--r R is required", &inputs);
    run_err(&dir, &["merge", "--r", "2", "--x", p(&xp), p(&mp), p(&op)], "expected [2, 7, C]", &inputs);
    run_err(&dir, &["merge", "--r", "2", "--sizes", p(&xp), p(&mp), p(&op)], "--mode wavg", &inputs);
    run_err(&dir, &["merge", "--r", "2", "--mode", "max", p(&mp), p(&op)], "--mode", &inputs);
    run_err(&dir, &["merge", "--r", "2", "--tensor-cores", p(&mp), p(&op)], "--backend cuda", &inputs);
    run_err(&dir, &["merge", "--r", "2", p(&xp), p(&xp), p(&op)], "expected two paths", &inputs);
}

/// `vistok run merge --backend cuda`: the plan (slots) and merged values equal the cpu's bit for
/// bit on a GPU; a one-line error without the feature or without a GPU (a failure under
/// `VISTOK_REQUIRE_GPU=1`).
#[test]
fn merge_cuda_backend_is_exact_or_a_clear_error() {
    let dir = Dir::new("merge-cuda");
    let (b, n, c) = (3, 41, 24);
    let x = values(b * n * c, 31);
    let (mp, op, slp, sop) = (dir.path("m.npy"), dir.path("o.npy"), dir.path("slots.npy"), dir.path("so.npy"));
    write_npy_raw(&mp, "<f4", &[b, n, c], &le(&x));
    let args = ["merge", "--backend", "cuda", "--r", "13", "--class-token", "--slots", p(&slp), p(&mp), p(&op)];
    if !common::cli::run_cuda(&dir, &args, &["m.npy"]) {
        return;
    }
    let config = MatchConfig::new(13).class_token(true);
    let plan = MergePlan::bipartite(Backend::Cpu, View::new(&x, &[b, n, c]).unwrap(), &config).unwrap();
    let o_dims = [b, plan.out_tokens(), c];
    let mut want = vec![0f32; b * plan.out_tokens() * c];
    plan.merge(
        Backend::Cpu,
        View::new(&x, &[b, n, c]).unwrap(),
        MergeMode::Mean,
        ViewMut::new(&mut want, &o_dims).unwrap(),
    )
    .unwrap();
    assert_eq!(read_as::<u32>(&slp, "<u4", &[b, n]), plan.slots(), "plan from the GPU");
    assert_eq!(f32_bits(&read_as::<f32>(&op, "<f4", &o_dims)), f32_bits(&want), "mean merge on the GPU");
    run_ok(&[
        "merge",
        "--backend",
        "cuda",
        "--r",
        "13",
        "--class-token",
        "--mode",
        "wavg",
        "--out-sizes",
        p(&sop),
        p(&mp),
        p(&op),
    ]);
    let (mut want_sizes, mut want) = (vec![0f32; b * plan.out_tokens()], vec![0f32; want.len()]);
    plan.merge_weighted(
        Backend::Cpu,
        View::new(&x, &[b, n, c]).unwrap(),
        None,
        ViewMut::new(&mut want, &o_dims).unwrap(),
        ViewMut::new(&mut want_sizes, &[b, plan.out_tokens()]).unwrap(),
    )
    .unwrap();
    assert_eq!(f32_bits(&read_as::<f32>(&op, "<f4", &o_dims)), f32_bits(&want), "wavg merge on the GPU");
    assert_eq!(f32_bits(&read_as::<f32>(&sop, "<f4", &[b, plan.out_tokens()])), f32_bits(&want_sizes));
    // --tensor-cores (a bf16 metric): the cpu's plan on the same rounded values. Cosine
    // similarities are rounded differently on tensor cores, so plans may differ at near-ties
    // (tests/cuda_merge.rs counts them); on these random values no choice is that close.
    let m16: Vec<f32> = x.iter().map(|&v| vistok::bf16::from_f32(v).to_f32()).collect();
    let args = ["merge", "--backend", "cuda", "--tensor-cores", "--dtype", "bf16", "--r", "13", "--slots", p(&slp)];
    run_ok(&[&args[..], &[p(&mp), p(&op)]].concat());
    let plan = MergePlan::bipartite(Backend::Cpu, View::new(&m16, &[b, n, c]).unwrap(), &MatchConfig::new(13)).unwrap();
    assert_eq!(read_as::<u32>(&slp, "<u4", &[b, n]), plan.slots(), "plan from the tensor cores");
    eprintln!(
        "merge --backend cuda: [{b}, {n}, {c}] r=13, plan and values identical to the cpu backend; --tensor-cores too"
    );
}

/// `vistok run attention --backend cuda`: f32 and bf16 outputs within a small tolerance of the
/// cpu backend's on a GPU (the kernels differ in exp and summation order, see
/// tests/cuda_attention.rs for the FlashAttention-style judge); a one-line error otherwise.
#[test]
fn attention_cuda_backend_is_close_or_a_clear_error() {
    let dir = Dir::new("attention-cuda");
    let (b, h, hkv, nq, nk, d) = (2, 4, 2, 70, 93, 64);
    let (qs, ks) = ([b, h, nq, d], [b, hkv, nk, d]);
    let (q, k, v) = (values(b * h * nq * d, 51), values(b * hkv * nk * d, 52), values(b * hkv * nk * d, 53));
    let path = |n: &str| dir.path(n);
    write_npy_raw(&path("q.npy"), "<f4", &qs, &le(&q));
    write_npy_raw(&path("k.npy"), "<f4", &ks, &le(&k));
    write_npy_raw(&path("v.npy"), "<f4", &ks, &le(&v));
    let (qp, kp, vp, op, lp) = (path("q.npy"), path("k.npy"), path("v.npy"), path("o.npy"), path("lse.npy"));
    let args = ["attention", "--backend", "cuda", "--causal", "--lse", p(&lp), p(&qp), p(&kp), p(&vp), p(&op)];
    if !common::cli::run_cuda(&dir, &args, &["k.npy", "q.npy", "v.npy"]) {
        return;
    }
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let (mut want, mut want_lse) = (vec![0f32; q.len()], vec![0f32; b * h * nq]);
    Attention::new()
        .mask(Mask::Causal)
        .forward_lse(
            Backend::Cpu,
            View::new(&q, &qs).unwrap(),
            View::new(&k, &ks).unwrap(),
            View::new(&v, &ks).unwrap(),
            ViewMut::new(&mut want, &qs).unwrap(),
            ViewMut::new(&mut want_lse, &[b, h, nq]).unwrap(),
        )
        .unwrap();
    let (eo, el) = (
        max_diff(&read_as::<f32>(&op, "<f4", &qs), &want),
        max_diff(&read_as::<f32>(&lp, "<f4", &[b, h, nq]), &want_lse),
    );
    assert!(eo <= 1e-5 && el <= 1e-5, "f32 on the GPU vs the cpu: O {eo:e}, lse {el:e}");
    // bf16 on tensor cores: P is rounded to bf16 before P·V, as FlashAttention-2 does.
    run_ok(&["attention", "--backend", "cuda", "--dtype", "bf16", p(&qp), p(&kp), p(&vp), p(&op)]);
    let (qb, kb, vb) = (to::<vistok::bf16>(&q), to::<vistok::bf16>(&k), to::<vistok::bf16>(&v));
    let mut wb = vec![vistok::bf16::from_f32(0.0); q.len()];
    Attention::new()
        .forward(
            Backend::Cpu,
            View::new(&qb, &qs).unwrap(),
            View::new(&kb, &ks).unwrap(),
            View::new(&vb, &ks).unwrap(),
            ViewMut::new(&mut wb, &qs).unwrap(),
        )
        .unwrap();
    let wb: Vec<f32> = wb.iter().map(|x| x.to_f32()).collect();
    let eb = max_diff(&read_as::<f32>(&op, "<f4", &qs), &wb);
    assert!(eb <= 2e-2, "bf16 on the GPU vs the cpu: O {eb:e}");
    eprintln!("attention --backend cuda: f32 causal O {eo:e} lse {el:e}, bf16 O {eb:e} from the cpu backend");
}

/// `vistok run argmin --backend cuda`: ids and distances equal the cpu backend's bit for bit on
/// a GPU (the exact f32 path), lookup exact; a one-line error otherwise.
#[test]
fn argmin_cuda_backend_is_exact_or_a_clear_error() {
    let dir = Dir::new("argmin-cuda");
    let (n, k, d) = (777, 300, 16);
    let (x, e) = (values(n * d, 61), values(k * d, 62));
    let (xp, ep, ip, dp, lp) =
        (dir.path("x.npy"), dir.path("e.npy"), dir.path("ids.npy"), dir.path("d.npy"), dir.path("l.npy"));
    write_npy_raw(&xp, "<f4", &[n, d], &le(&x));
    write_npy_raw(&ep, "<f4", &[k, d], &le(&e));
    let args = ["argmin", "--backend", "cuda", "--codebook", p(&ep), "--dist", p(&dp), p(&xp), p(&ip)];
    if !common::cli::run_cuda(&dir, &args, &["e.npy", "x.npy"]) {
        return;
    }
    let (ids, dist) = lib_argmin(&e, k, d, Metric::L2, &x, Backend::Cpu);
    assert_eq!(read_as::<u32>(&ip, "<u4", &[n]), ids, "ids from the GPU");
    assert_eq!(f32_bits(&read_as::<f32>(&dp, "<f4", &[n])), f32_bits(&dist), "distances from the GPU");
    run_ok(&["argmin", "--backend", "cuda", "--metric", "cosine", "--codebook", p(&ep), p(&xp), p(&ip)]);
    assert_eq!(
        read_as::<u32>(&ip, "<u4", &[n]),
        lib_argmin(&e, k, d, Metric::Cosine, &x, Backend::Cpu).0,
        "cosine ids"
    );
    run_ok(&["argmin", "--backend", "cuda", "--lookup", "--codebook", p(&ep), p(&ip), p(&lp)]);
    let got = read_as::<u32>(&ip, "<u4", &[n]);
    let want: Vec<f32> = got.iter().flat_map(|&i| e[i as usize * d..][..d].to_vec()).collect();
    assert_eq!(f32_bits(&read_as::<f32>(&lp, "<f4", &[n, d])), f32_bits(&want), "lookup on the GPU");
    // --tensor-cores (bf16; D = 64: the wgmma search on an H100 / H200 or the stand-in) on small
    // integers, where every dot product is exact however it is summed: the cpu's ids.
    let (n, k, d) = (40, 150, 64);
    let small = |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| ((i * 7 + seed) % 5) as f32 - 2.0).collect() };
    let (x, e) = (small(n * d, 1), small(k * d, 3));
    write_npy_raw(&xp, "<f4", &[n, d], &le(&x));
    write_npy_raw(&ep, "<f4", &[k, d], &le(&e));
    run_ok(&["argmin", "--backend", "cuda", "--tensor-cores", "--dtype", "bf16", "--codebook", p(&ep), p(&xp), p(&ip)]);
    assert_eq!(read_as::<u32>(&ip, "<u4", &[n]), lib_argmin(&e, k, d, Metric::L2, &x, Backend::Cpu).0, "tensor cores");
    eprintln!("argmin --backend cuda: {n}x{k}x{d}, ids, distances and lookup identical to the cpu backend; --tensor-cores too");
}
