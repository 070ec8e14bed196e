//! `vistok run lfq` / `vistok run fsq` and their `vistok bench` cases, end to end: input files
//! written here by an independent little .npy writer, the binary run as a process, its outputs
//! read by an independent little reader and compared bit for bit with the library API. Round
//! trips encode → decode → encode; bad inputs: exit code, one-line message, no output file.
#![cfg(feature = "cli")]

mod common;

use common::cli::{le, p, read_npy, run_err, run_ok, vistok, write_npy_raw, Dir};
use common::Rng;
use vistok::{f16, Backend, BitOrder, Element, Float, Fsq, Lfq, LfqConfig, View, ViewMut};

/// Signed values centred on 0 (so LFQ bits are mixed), exact ±0 included.
fn signed(n: usize, range: f32, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n)
        .map(|_| match r.next_u64() % 16 {
            0 => 0.0,
            1 => -0.0,
            _ => r.uniform(-range, range),
        })
        .collect()
}

fn to<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

// ---------------------------------------------------------------------------------------------
// Library expectations.

fn lib_lfq_encode<T: Float>(plan: &Lfq, z: &[T], backend: Backend) -> Vec<u32> {
    let n = z.len() / plan.channels();
    let mut ids = vec![u32::MAX; n * plan.groups()];
    plan.encode(
        backend,
        View::new(z, &plan.codes_dims(n)).unwrap(),
        ViewMut::new(&mut ids, &plan.ids_dims(n)).unwrap(),
    )
    .unwrap();
    ids
}

fn lib_lfq_decode(plan: &Lfq, ids: &[u32]) -> Vec<f32> {
    let n = ids.len() / plan.groups();
    let mut codes = vec![f32::NAN; n * plan.channels()];
    plan.decode(
        Backend::Reference,
        View::new(ids, &plan.ids_dims(n)).unwrap(),
        ViewMut::new(&mut codes, &plan.codes_dims(n)).unwrap(),
    )
    .unwrap();
    codes
}

fn lib_fsq_encode<T: Float>(fsq: &Fsq, z: &[T], backend: Backend) -> Vec<u32> {
    let n = z.len() / fsq.dim();
    let mut ids = vec![u32::MAX; n];
    fsq.encode(backend, View::new(z, &[n, fsq.dim()]).unwrap(), ViewMut::new(&mut ids, &[n]).unwrap()).unwrap();
    ids
}

fn lib_fsq_decode(fsq: &Fsq, ids: &[u32]) -> Vec<f32> {
    let mut codes = vec![f32::NAN; ids.len() * fsq.dim()];
    fsq.decode(
        Backend::Reference,
        View::new(ids, &[ids.len()]).unwrap(),
        ViewMut::new(&mut codes, &[ids.len(), fsq.dim()]).unwrap(),
    )
    .unwrap();
    codes
}

// ---------------------------------------------------------------------------------------------
// lfq

/// Encodes `z` (written as `descr`) with `flags` on both host backends; checks ids (`<u4`,
/// shape `lead + [G]`) against the library's.
fn check_lfq_encode<T: Float + bytemuck::Pod>(
    dir: &Dir,
    plan: &Lfq,
    shape: &[usize],
    z: &[T],
    descr: &str,
    flags: &[&str],
) {
    write_npy_raw(&dir.path("z.npy"), descr, shape, &le(z));
    let mut ids_shape = shape[..shape.len() - 1].to_vec();
    ids_shape.push(plan.groups());
    for (backend, name) in [(Backend::Reference, "reference"), (Backend::Cpu, "cpu")] {
        let (zp, out) = (dir.path("z.npy"), dir.path(&format!("ids-{name}.npy")));
        let mut args = vec!["lfq", "--backend", name];
        args.extend(flags);
        args.extend([p(&zp), p(&out)]);
        run_ok(&args);
        let (d, s, data) = read_npy(&out);
        assert_eq!((d.as_str(), s), ("<u4", ids_shape.clone()), "{args:?}");
        let want = lib_lfq_encode(plan, z, backend);
        assert_eq!(data, le(&want), "{args:?}: ids differ from the library's {name} backend");
    }
}

#[test]
fn lfq_encode_matches_the_library() {
    let dir = Dir::new("lfq-encode");
    // One group of 18 bits, MSB first, [B, T, C] input: ids [B, T, 1].
    let z = signed(3 * 5 * 18, 2.0, 1);
    let plan = Lfq::new(&LfqConfig::new(1, 18, BitOrder::MsbFirst)).unwrap();
    check_lfq_encode(&dir, &plan, &[3, 5, 18], &z, "<f4", &["--order", "msb"]);
    // Group-wise, LSB first, given as --groups (d inferred) or --bits (G inferred).
    let plan = Lfq::new(&LfqConfig::new(2, 9, BitOrder::LsbFirst)).unwrap();
    check_lfq_encode(&dir, &plan, &[15, 18], &z, "<f4", &["--order", "lsb", "--groups", "2"]);
    check_lfq_encode(&dir, &plan, &[15, 18], &z, "<f4", &["--bit-order", "lsb", "--bits", "9"]);
    // f16 input, 32 bits (the largest d), 4 groups of 8 over 32 channels.
    let z16: Vec<f16> = to(&signed(7 * 32, 1.0, 2));
    let plan = Lfq::new(&LfqConfig::new(1, 32, BitOrder::MsbFirst)).unwrap();
    check_lfq_encode(&dir, &plan, &[7, 32], &z16, "<f2", &["--order", "msb"]);
    let plan = Lfq::new(&LfqConfig::new(4, 8, BitOrder::LsbFirst)).unwrap();
    check_lfq_encode(&dir, &plan, &[7, 32], &z16, "<f2", &["--order", "lsb", "--groups", "4", "--bits", "8"]);
    // A single token [C], and an empty batch [0, C].
    let plan = Lfq::new(&LfqConfig::new(1, 6, BitOrder::MsbFirst)).unwrap();
    check_lfq_encode(&dir, &plan, &[6], &z[..6], "<f4", &["--order", "msb"]);
    check_lfq_encode::<f32>(&dir, &plan, &[0, 6], &[], "<f4", &["--order", "msb"]);
}

#[test]
fn lfq_dtype_and_ids_dtype() {
    let dir = Dir::new("lfq-dtypes");
    // --dtype bf16 rounds z to bf16 before encoding; ids written as <i8, then <i4.
    let z = signed(9 * 12, 3.0, 3);
    write_npy_raw(&dir.path("z.npy"), "<f4", &[9, 12], &le(&z));
    let plan = Lfq::new(&LfqConfig::new(3, 4, BitOrder::MsbFirst)).unwrap();
    let (zp, out) = (dir.path("z.npy"), dir.path("ids.npy"));
    run_ok(&["lfq", "--order", "msb", "--groups", "3", "--dtype", "bf16", "--ids-dtype", "i8", p(&zp), p(&out)]);
    let (d, s, data) = read_npy(&out);
    let want = lib_lfq_encode(&plan, &to::<vistok::bf16>(&z), Backend::Cpu);
    assert_eq!((d.as_str(), s), ("<i8", vec![9, 3]));
    assert_eq!(data, le(&want.iter().map(|&x| x as i64).collect::<Vec<_>>()));
    run_ok(&["lfq", "--order", "msb", "--groups", "3", "--ids-dtype", "i4", p(&zp), p(&out)]);
    let (d, _, data) = read_npy(&out);
    let want = lib_lfq_encode(&plan, &z, Backend::Cpu);
    assert_eq!((d.as_str(), data), ("<i4", le(&want.iter().map(|&x| x as i32).collect::<Vec<_>>())));
}

#[test]
fn lfq_round_trip_codes_decode_encode() {
    let dir = Dir::new("lfq-round-trip");
    let z = signed(11 * 10, 2.0, 4);
    write_npy_raw(&dir.path("z.npy"), "<f4", &[11, 10], &le(&z));
    for (order, bo) in [("msb", BitOrder::MsbFirst), ("lsb", BitOrder::LsbFirst)] {
        for (extra, config) in [
            (&[][..], LfqConfig::new(2, 5, bo)),
            (&["--scale", "0.5"][..], LfqConfig::new(2, 5, bo).scale(0.5)),
            (&["--spherical", "--scale", "2"][..], LfqConfig::new(2, 5, bo).scale(2.0).spherical(true)),
        ] {
            let plan = Lfq::new(&config).unwrap();
            let [zp, ids, codes, back, ids2] =
                ["z", "ids", "codes", "back", "ids2"].map(|n| dir.path(&format!("{n}.npy")));
            let mut args = vec!["lfq", "--order", order, "--bits", "5", "--codes", p(&codes), p(&zp), p(&ids)];
            args.extend(extra);
            run_ok(&args);
            let want_ids = lib_lfq_encode(&plan, &z, Backend::Reference);
            assert_eq!(read_npy(&ids).2, le(&want_ids), "{args:?}");
            let want_codes = lib_lfq_decode(&plan, &want_ids);
            assert_eq!(read_npy(&codes), ("<f4".into(), vec![11, 10], le(&want_codes)), "{args:?}");
            // ids → codes with --decode gives the same codes; codes → ids gives the ids back.
            let mut args = vec!["lfq", "--decode", "--order", order, "--bits", "5", p(&ids), p(&back)];
            args.extend(extra);
            run_ok(&args);
            assert_eq!(read_npy(&back), read_npy(&codes), "{args:?}");
            let mut args = vec!["lfq", "--order", order, "--bits", "5", p(&back), p(&ids2)];
            args.extend(extra);
            run_ok(&args);
            assert_eq!(read_npy(&ids2), read_npy(&ids), "{args:?}");
        }
    }
    // Decode reads <i8 ids too, and writes f16 codes with --dtype f16.
    let plan = Lfq::new(&LfqConfig::new(1, 3, BitOrder::MsbFirst)).unwrap();
    let ids: Vec<i64> = vec![0, 5, 7, 2];
    write_npy_raw(&dir.path("i8.npy"), "<i8", &[4, 1], &le(&ids));
    let (input, out) = (dir.path("i8.npy"), dir.path("c16.npy"));
    run_ok(&["lfq", "--decode", "--order", "msb", "--bits", "3", "--dtype", "f16", p(&input), p(&out)]);
    let want: Vec<f16> = to(&lib_lfq_decode(&plan, &[0, 5, 7, 2]));
    assert_eq!(read_npy(&out), ("<f2".into(), vec![4, 3], le(&want)));
}

#[test]
fn lfq_normalized_matches_the_library() {
    let dir = Dir::new("lfq-normalized");
    let mut z = signed(6 * 8, 2.0, 5);
    z[8..12].fill(0.0); // an all-zero group stays zero
    write_npy_raw(&dir.path("z.npy"), "<f4", &[6, 8], &le(&z));
    let plan = Lfq::new(&LfqConfig::new(2, 4, BitOrder::LsbFirst).spherical(true)).unwrap();
    let [zp, ids, u] = ["z", "ids", "u"].map(|n| dir.path(&format!("{n}.npy")));
    run_ok(&["lfq", "--order", "lsb", "--bits", "4", "--spherical", "--normalized", p(&u), p(&zp), p(&ids)]);
    let (mut want_ids, mut want_u) = (vec![0u32; 12], vec![f32::NAN; 48]);
    plan.encode_normalized(
        Backend::Reference,
        View::new(&z, &[6, 8]).unwrap(),
        ViewMut::new(&mut want_ids, &[6, 2]).unwrap(),
        ViewMut::new(&mut want_u, &[6, 8]).unwrap(),
    )
    .unwrap();
    assert_eq!(read_npy(&ids).2, le(&want_ids));
    assert_eq!(read_npy(&u), ("<f4".into(), vec![6, 8], le(&want_u)));
}

#[test]
fn lfq_stats_and_histogram() {
    let dir = Dir::new("lfq-stats");
    let z = signed(40 * 6, 1.0, 6);
    write_npy_raw(&dir.path("z.npy"), "<f4", &[40, 6], &le(&z));
    let plan = Lfq::new(&LfqConfig::new(2, 3, BitOrder::MsbFirst)).unwrap();
    let ids = lib_lfq_encode(&plan, &z, Backend::Reference);
    let stats = plan.statistics(Backend::Reference, View::new(&ids, &[40, 2]).unwrap()).unwrap();
    let [zp, h] = ["z", "h"].map(|n| dir.path(&format!("{n}.npy")));
    // With --stats and no OUT, only the JSON (and the histogram file).
    let out = run_ok(&["lfq", "--order", "msb", "--groups", "2", "--stats", "--histogram", p(&h), p(&zp)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("--stats prints JSON");
    assert_eq!(v["tokens"], 40);
    assert_eq!((v["groups"].as_u64(), v["bits"].as_u64(), v["order"].as_str()), (Some(2), Some(3), Some("msb")));
    let ones: Vec<u64> = v["ones"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(ones, stats.ones);
    let freq: Vec<f64> = v["bit_frequency"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(freq, stats.bit_frequency());
    let hist = stats.histogram.unwrap();
    let used = hist.iter().filter(|&&c| c > 0).count();
    let hv = &v["histogram"];
    assert_eq!((hv["size"].as_u64(), hv["ids"].as_u64(), hv["used"].as_u64()), (Some(8), Some(80), Some(used as u64)));
    assert_eq!(hv["max_count"].as_u64(), hist.iter().max().copied());
    let entropy: f64 = hist.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / 80.0) * (c as f64 / 80.0).log2()).sum();
    assert!((hv["entropy_bits"].as_f64().unwrap() - entropy).abs() < 1e-12 && entropy > 1.0);
    let want_h: Vec<i64> = hist.iter().map(|&c| c as i64).collect();
    assert_eq!(read_npy(&h), ("<i8".into(), vec![8], le(&want_h)));
    assert_eq!(dir.files(), ["h.npy", "z.npy"]);
    // Decode with --stats: the statistics of the input ids; d > 20 has no histogram.
    let plan = Lfq::new(&LfqConfig::new(1, 24, BitOrder::LsbFirst)).unwrap();
    let ids: Vec<u32> = vec![1, 3, 0xff_ffff];
    write_npy_raw(&dir.path("ids.npy"), "<u4", &[3, 1], &le(&ids));
    let (ip, cp) = (dir.path("ids.npy"), dir.path("codes.npy"));
    let out = run_ok(&["lfq", "--decode", "--order", "lsb", "--bits", "24", "--stats", p(&ip), p(&cp)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["histogram"].is_null() && v["tokens"] == 3 && v["ones"][0] == 3 && v["ones"][1] == 2 && v["ones"][2] == 1,
        "{v}"
    );
    assert_eq!(read_npy(&cp).2, le(&lib_lfq_decode(&plan, &ids)));
}

#[test]
fn lfq_bad_input_is_one_line_and_no_file() {
    let dir = Dir::new("lfq-bad");
    let mut z = signed(4 * 6, 1.0, 7);
    write_npy_raw(&dir.path("z.npy"), "<f4", &[4, 6], &le(&z));
    z[9] = f32::NAN;
    write_npy_raw(&dir.path("nan.npy"), "<f4", &[4, 6], &le(&z));
    write_npy_raw(&dir.path("u8.npy"), "|u1", &[4, 6], &[1; 24]);
    write_npy_raw(&dir.path("wide.npy"), "<f4", &[1, 40], &le(&[1.0f32; 40]));
    write_npy_raw(&dir.path("ids.npy"), "<u4", &[2, 1], &le(&[3u32, 8]));
    write_npy_raw(&dir.path("neg.npy"), "<i8", &[2, 1], &le(&[3i64, -1]));
    write_npy_raw(&dir.path("big.npy"), "<i8", &[1, 1], &le(&[1i64 << 33]));
    let inputs = ["big.npy", "ids.npy", "nan.npy", "neg.npy", "u8.npy", "wide.npy", "z.npy"];
    let d = |n: &str| dir.path(n).to_str().unwrap().to_string();
    let (zp, out, out2) = (d("z.npy"), d("out.npy"), d("out2.npy"));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![zp.clone(), out.clone()], "--order msb|lsb is required"),
        (vec!["--order".into(), "mid".into(), zp.clone(), out.clone()], "--order: expected msb or lsb"),
        (vec!["--order".into(), "msb".into(), d("nan.npy"), out.clone()], "z[1, 3] is not finite"),
        (
            vec!["--order".into(), "msb".into(), "--groups".into(), "4".into(), zp.clone(), out.clone()],
            "--groups 4 does not divide the 6 channels",
        ),
        (
            vec![
                "--order".into(),
                "msb".into(),
                "--groups".into(),
                "2".into(),
                "--bits".into(),
                "2".into(),
                zp.clone(),
                out.clone(),
            ],
            "is not the 6 channels",
        ),
        (
            vec!["--order".into(), "msb".into(), "--bits".into(), "33".into(), zp.clone(), out.clone()],
            "--bits: expected an integer in 1..=32",
        ),
        (vec!["--order".into(), "msb".into(), d("wide.npy"), out.clone()], "D = 40 bits per group is not in 1..=32"),
        (vec!["--order".into(), "msb".into(), d("u8.npy"), out.clone()], "not a token dtype"),
        (vec!["--order".into(), "msb".into(), d("missing.npy"), out.clone()], "missing.npy: cannot open"),
        (
            vec![
                "--order".into(),
                "msb".into(),
                "--backend".into(),
                "cuda".into(),
                "--normalized".into(),
                d("u.npy"),
                zp.clone(),
                out.clone(),
            ],
            "--normalized is not computed on the GPU",
        ),
        (
            vec!["--order".into(), "msb".into(), "--scale".into(), "-1".into(), zp.clone(), out.clone()],
            "must be finite and positive",
        ),
        (vec!["--order".into(), "msb".into(), "--codes".into(), out.clone(), zp.clone(), out.clone()], "same file"),
        (
            vec!["--order".into(), "msb".into(), "--frobnicate".into(), zp.clone(), out.clone()],
            "unknown flag --frobnicate",
        ),
        (vec!["--order".into(), "msb".into(), zp.clone()], "expected two paths"),
        (
            vec![
                "--order".into(),
                "msb".into(),
                "--bits".into(),
                "32".into(),
                "--ids-dtype".into(),
                "i4".into(),
                d("wide.npy"),
                out.clone(),
            ],
            "--bits 32 does not divide",
        ),
        (vec!["--decode".into(), "--order".into(), "msb".into(), d("ids.npy"), out.clone()], "--decode needs --bits"),
        (
            vec![
                "--decode".into(),
                "--order".into(),
                "msb".into(),
                "--bits".into(),
                "3".into(),
                d("ids.npy"),
                out.clone(),
            ],
            "ids[1, 0] (element 1) = 8 has bits at or above d = 3",
        ),
        (
            vec![
                "--decode".into(),
                "--order".into(),
                "msb".into(),
                "--bits".into(),
                "3".into(),
                d("neg.npy"),
                out.clone(),
            ],
            "ids[1] = -1 is not a valid id",
        ),
        (
            vec![
                "--decode".into(),
                "--order".into(),
                "msb".into(),
                "--bits".into(),
                "3".into(),
                d("big.npy"),
                out.clone(),
            ],
            "ids[0] = 8589934592 is not a valid id",
        ),
        (
            vec![
                "--decode".into(),
                "--order".into(),
                "msb".into(),
                "--bits".into(),
                "3".into(),
                "--groups".into(),
                "2".into(),
                d("ids.npy"),
                out.clone(),
            ],
            "--groups 2 but the ids have 1 per token",
        ),
        (
            vec![
                "--decode".into(),
                "--order".into(),
                "msb".into(),
                "--bits".into(),
                "3".into(),
                "--codes".into(),
                out2.clone(),
                d("ids.npy"),
                out.clone(),
            ],
            "--codes is for encoding",
        ),
    ];
    for (args, want) in &cases {
        let mut all = vec!["lfq"];
        all.extend(args.iter().map(String::as_str));
        run_err(&dir, &all, want, &inputs);
    }
    // --ids-dtype i4 with 32-bit ids, and --histogram with d > 20.
    write_npy_raw(&dir.path("w32.npy"), "<f4", &[1, 32], &le(&[1.0f32; 32]));
    write_npy_raw(&dir.path("w21.npy"), "<f4", &[1, 21], &le(&[1.0f32; 21]));
    let mut inputs = inputs.to_vec();
    inputs.extend(["w21.npy", "w32.npy"]);
    run_err(
        &dir,
        &["lfq", "--order", "msb", "--ids-dtype", "i4", p(&dir.path("w32.npy")), &out],
        "do not all fit --ids-dtype i4",
        &inputs,
    );
    run_err(
        &dir,
        &["lfq", "--order", "msb", "--histogram", &out2, p(&dir.path("w21.npy")), &out],
        "--histogram needs D <= 20",
        &inputs,
    );
    // An existing output survives a failed run untouched.
    std::fs::write(&out, b"precious").unwrap();
    let o = vistok(&["run", "lfq", "--order", "msb", &d("nan.npy"), &out]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
}

// ---------------------------------------------------------------------------------------------
// fsq

#[test]
fn fsq_encode_decode_match_the_library() {
    let dir = Dir::new("fsq");
    let levels = [8u32, 5, 5, 5, 3, 2];
    let fsq = Fsq::new(&levels).unwrap();
    let z = signed(4 * 7 * 6, 4.0, 8);
    write_npy_raw(&dir.path("z.npy"), "<f4", &[4, 7, 6], &le(&z));
    let [zp, codes, back] = ["z", "codes", "back"].map(|n| dir.path(&format!("{n}.npy")));
    for (backend, name) in [(Backend::Reference, "reference"), (Backend::Cpu, "cpu")] {
        let ids = dir.path(&format!("ids-{name}.npy"));
        run_ok(&["fsq", "--backend", name, "--levels", "8,5,5,5,3,2", "--codes", p(&codes), p(&zp), p(&ids)]);
        let want = lib_fsq_encode(&fsq, &z, backend);
        assert_eq!(read_npy(&ids), ("<u4".into(), vec![4, 7], le(&want)), "{name}");
        let want_codes = lib_fsq_decode(&fsq, &want);
        assert_eq!(read_npy(&codes), ("<f4".into(), vec![4, 7, 6], le(&want_codes)), "{name}");
        // ids → codes with --decode: the same codes.
        run_ok(&["fsq", "--decode", "--backend", name, "--levels", "8,5,5,5,3,2", p(&ids), p(&back)]);
        assert_eq!(read_npy(&back), read_npy(&codes), "{name}");
    }
    // Every id of a small codebook: ids → codes → ids is the identity (codes are cell centres).
    let fsq = Fsq::new(&[4, 3, 5]).unwrap();
    let all: Vec<u32> = (0..60).collect();
    write_npy_raw(&dir.path("all.npy"), "<i4", &[60], &le(&all.iter().map(|&x| x as i32).collect::<Vec<_>>()));
    let [allp, c, again] = ["all", "c", "again"].map(|n| dir.path(&format!("{n}.npy")));
    run_ok(&["fsq", "--decode", "--levels", "4,3,5", p(&allp), p(&c)]);
    assert_eq!(read_npy(&c), ("<f4".into(), vec![60, 3], le(&lib_fsq_decode(&fsq, &all))));
    run_ok(&["fsq", "--levels", "4,3,5", "--ids-dtype", "i8", p(&c), p(&again)]);
    let want: Vec<i64> =
        lib_fsq_encode(&fsq, &lib_fsq_decode(&fsq, &all), Backend::Cpu).iter().map(|&x| x as i64).collect();
    assert_eq!(read_npy(&again), ("<i8".into(), vec![60], le(&want)));
    // f16 input, bf16 compute: ids of the bf16-rounded values.
    let z16: Vec<f16> = to(&z);
    write_npy_raw(&dir.path("z16.npy"), "<f2", &[28, 6], &le(&z16));
    let (z16p, ids16) = (dir.path("z16.npy"), dir.path("ids16.npy"));
    run_ok(&["fsq", "--levels", "8,5,5,5,3,2", "--dtype", "bf16", p(&z16p), p(&ids16)]);
    let fsq = Fsq::new(&levels).unwrap();
    let want =
        lib_fsq_encode(&fsq, &to::<vistok::bf16>(&z16.iter().map(|x| x.to_f32()).collect::<Vec<_>>()), Backend::Cpu);
    assert_eq!(read_npy(&ids16), ("<u4".into(), vec![28], le(&want)));
}

#[test]
fn fsq_bad_input_is_one_line_and_no_file() {
    let dir = Dir::new("fsq-bad");
    let mut z = signed(3 * 4, 1.0, 9);
    write_npy_raw(&dir.path("z.npy"), "<f4", &[3, 4], &le(&z));
    z[6] = f32::NAN;
    write_npy_raw(&dir.path("nan.npy"), "<f4", &[3, 4], &le(&z));
    write_npy_raw(&dir.path("ids.npy"), "<u4", &[2], &le(&[3u32, 1000]));
    let inputs = ["ids.npy", "nan.npy", "z.npy"];
    let d = |n: &str| dir.path(n).to_str().unwrap().to_string();
    let (zp, ids, out, nan) = (d("z.npy"), d("ids.npy"), d("out.npy"), d("nan.npy"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![&zp, &out], "--levels L0,L1,... is required"),
        (vec!["--levels", "8,1,5,5", &zp, &out], "level 1 of dimension 1 is not in 2..="),
        (vec!["--levels", "8,x", &zp, &out], "--levels: expected comma-separated positive integers"),
        (vec!["--levels", "65536,65536,2,2", &zp, &out], "exceeds 2^32"),
        (vec!["--levels", "8,5,5", &zp, &out], "expected [..., 3] (3 levels given)"),
        (vec!["--levels", "8,5,5,5", &nan, &out], "z[1, 2] is not finite"),
        (
            vec!["--levels", "8,5,5,5", "--ids-dtype", "i4", "--levels", "65536,65536", &zp, &out],
            "do not all fit --ids-dtype i4",
        ),
        (vec!["--levels", "8,5,5,5", "--codes", &out, &zp, &out], "same file"),
        (vec!["--decode", "--levels", "8,5,5,5", &ids, &out], "ids[1] = 1000 is not below the codebook size 1000"),
        (vec!["--decode", "--levels", "8,5,5,5", "--codes", &zp, &ids, &out], "--codes is for encoding"),
        (vec!["--levels", "8,5,5,5", "--bits", "3", &zp, &out], "unknown flag --bits"),
    ];
    for (args, want) in cases {
        let mut all = vec!["fsq"];
        all.extend(args);
        run_err(&dir, &all, want, &inputs);
    }
}

#[test]
fn run_help_lists_lfq_and_fsq() {
    for (args, want) in [
        (&["run", "--help"][..], "lfq          tokens"),
        (&["run", "lfq", "--help"][..], "--order msb|lsb"),
        (&["run", "fsq", "-h"][..], "--levels L0,L1,..."),
    ] {
        let o = vistok(args);
        assert!(o.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&o.stdout).contains(want), "{args:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// bench cases

#[test]
fn bench_ci_cases_run_and_check() {
    let o = vistok(&["bench", "--quick", "--threads", "2", "--filter", "lfq/*-ci", "--filter", "fsq/*-ci"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stderr}");
    let line = |id: &str| stdout.lines().find(|l| l.starts_with(id)).unwrap_or_else(|| panic!("no {id}:\n{stdout}"));
    for (family, dtype, shape) in [
        ("lfq", "f32", "1031x18-ci"),
        ("lfq", "u32-f32", "1031x18-ci"),
        ("fsq", "f32", "1031x6-ci"),
        ("fsq", "u32-f32", "1031x6-ci"),
    ] {
        assert!(line(&format!("{family}/reference/{dtype}/{shape}")).ends_with("oracle"), "{stdout}");
        assert!(line(&format!("{family}/cpu/{dtype}/{shape}")).ends_with("exact"), "{stdout}");
    }
    // The host rows (a `--features cuda` binary on a GPU, as `scripts/gpu-check.sh` runs this
    // test, adds a cuda row per case).
    let host = |l: &&str| (l.starts_with("lfq/") || l.starts_with("fsq/")) && !l.contains("/cuda/");
    assert_eq!(stdout.lines().filter(host).count(), 8, "{stdout}");
    assert!(!stdout.contains("1048576"), "the filter let other cases through:\n{stdout}");
}

/// `--backend cuda`: ids and codes equal the cpu backend's bit for bit on a GPU; without the
/// `cuda` feature a one-line "built without CUDA"; with it but no GPU, "no usable GPU" (and
/// under `VISTOK_REQUIRE_GPU=1` that fails).
#[test]
fn lfq_fsq_cuda_backend_is_exact_or_a_clear_error() {
    let dir = Dir::new("cuda");
    let (n, c) = (1000, 18);
    let z = signed(n * c, 3.0, 41);
    let (zp, out, codes) = (dir.path("z.npy"), dir.path("ids.npy"), dir.path("codes.npy"));
    write_npy_raw(&zp, "<f4", &[n, c], &le(&z));
    let args = ["lfq", "--backend", "cuda", "--groups", "2", "--order", "lsb", "--codes", p(&codes), p(&zp), p(&out)];
    if !common::cli::run_cuda(&dir, &args, &["z.npy"]) {
        if !cfg!(feature = "cuda") {
            run_err(
                &dir,
                &["fsq", "--backend", "cuda", "--levels", "8,5,5,5,5,5,3,3,3,3,2,2,2,2,2,2,2,2", p(&zp), p(&out)],
                "built without CUDA",
                &["z.npy"],
            );
        }
        return;
    }
    let plan = Lfq::new(&LfqConfig::new(2, 9, BitOrder::LsbFirst)).unwrap();
    let ids = lib_lfq_encode(&plan, &z, Backend::Cpu);
    let (_, _, got) = read_npy(&out);
    assert_eq!(got, le(&ids), "lfq ids from the GPU");
    assert_eq!(read_npy(&codes).2, le(&lib_lfq_decode(&plan, &ids)), "lfq codes from the GPU");
    // Decode on the GPU.
    run_ok(&["lfq", "--decode", "--backend", "cuda", "--bits", "9", "--order", "lsb", p(&out), p(&codes)]);
    assert_eq!(read_npy(&codes).2, le(&lib_lfq_decode(&plan, &ids)), "lfq decode on the GPU");
    // FSQ, 6 dimensions (D does not divide the warp).
    let fz: Vec<f32> = signed(n * 6, 4.0, 42);
    write_npy_raw(&zp, "<f4", &[n, 6], &le(&fz));
    run_ok(&["fsq", "--backend", "cuda", "--levels", "8,8,8,5,5,5", "--codes", p(&codes), p(&zp), p(&out)]);
    let fsq = Fsq::new(&[8, 8, 8, 5, 5, 5]).unwrap();
    let ids = lib_fsq_encode(&fsq, &fz, Backend::Cpu);
    assert_eq!(read_npy(&out).2, le(&ids), "fsq ids from the GPU");
    assert_eq!(read_npy(&codes).2, le(&lib_fsq_decode(&fsq, &ids)), "fsq codes from the GPU");
    eprintln!("lfq / fsq --backend cuda: {n} tokens, ids and codes identical to the cpu backend");
}
