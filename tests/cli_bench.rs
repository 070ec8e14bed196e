//! `vistok bench` / `vistok roofline` end to end: the table, the JSON, the SVG, the baseline
//! comparison (planted slowdowns and speed-ups) and bad command lines. Every run is filtered to
//! the tiny `-ci` shape's host rows, named one by one (a `--features cuda` binary on a GPU, as
//! `scripts/gpu-check.sh` runs these tests, adds a cuda row a glob would take too), and uses
//! `--quick`, so each test takes a second or two.
#![cfg(feature = "cli")]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

const CPU_CI: &str = "patchify/cpu/u8-f32/2x3x64x64-nchw-p16-ci";
const REF_CI: &str = "patchify/reference/u8-f32/2x3x64x64-nchw-p16-ci";

fn vistok(args: &[&str]) -> Output {
    Command::new(common::cli::vistok_bin()).args(args).output().expect("the vistok binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vistok-cli-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON")
}

/// Runs the cpu ci case once and returns its JSON (this machine's "reality").
fn measured(dir: &std::path::Path) -> Value {
    let json = dir.join("now.json");
    let out = vistok(&["bench", "--quick", "--filter", CPU_CI, "--json", json.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    read_json(&json)
}

/// Scales every time of the row `id` by `factor`.
fn plant(json: &mut Value, id: &str, factor: f64) {
    let rows = json["results"].as_array_mut().unwrap();
    let row = rows.iter_mut().find(|r| r["id"] == id).unwrap();
    for key in ["median_s", "min_s", "max_s"] {
        row[key] = Value::from(row[key].as_f64().unwrap() * factor);
    }
}

/// Makes `id`'s baseline a single point: `factor` × its fastest sample.
fn plant_point(json: &mut Value, id: &str, factor: f64) {
    let rows = json["results"].as_array_mut().unwrap();
    let row = rows.iter_mut().find(|r| r["id"] == id).unwrap();
    let t = row["min_s"].as_f64().unwrap() * factor;
    for key in ["median_s", "min_s", "max_s"] {
        row[key] = Value::from(t);
    }
}

#[test]
fn table_json_and_plot() {
    let dir = scratch("table");
    let (json, svg) = (dir.join("b.json"), dir.join("b.svg"));
    let out = vistok(&[
        "bench",
        "--quick",
        "--threads",
        "2",
        "--filter",
        REF_CI,
        "--filter",
        CPU_CI,
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");

    // The table: a header, one line per case with its check, only the filtered cases.
    assert!(stdout.contains("median") && stdout.contains("GB/s") && stdout.contains("% roof"), "{stdout}");
    let line = |id: &str| stdout.lines().find(|l| l.starts_with(id)).unwrap_or_else(|| panic!("no {id}:\n{stdout}"));
    assert!(line(REF_CI).ends_with("oracle"), "{stdout}");
    assert!(line(CPU_CI).ends_with("exact"), "{stdout}");
    assert!(!stdout.contains("32x3x256x256"), "the filter let other cases through:\n{stdout}");
    // Progress goes to stderr, not into the table.
    assert!(stderr.contains(CPU_CI) && stderr.contains("roofline"), "{stderr}");

    // The JSON: every figure, the machine, the roofline.
    let v = read_json(&json);
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        for key in
            ["median_s", "min_s", "max_s", "gb_per_s", "gflop_per_s", "arithmetic_intensity", "roofline_fraction"]
        {
            assert!(r[key].as_f64().is_some_and(|x| x > 0.0 && x.is_finite()), "{key} in {r}");
        }
        assert!(r["min_s"].as_f64() <= r["median_s"].as_f64() && r["median_s"].as_f64() <= r["max_s"].as_f64());
        assert_eq!(r["bytes"], Value::from(2 * 3 * 64 * 64 * 5)); // u8 in + f32 out
        assert_eq!(r["check_ok"], Value::Bool(true));
    }
    let m = &v["machine"];
    for key in ["cpu_model", "simd", "os", "arch", "vistok_version"] {
        assert!(m[key].as_str().is_some_and(|s| !s.is_empty()), "machine.{key} in {m}");
    }
    assert_eq!(m["threads"], Value::from(2));
    assert_eq!(m["vistok_version"], env!("CARGO_PKG_VERSION"));
    assert!(m.get("gpu").is_some());
    let roof = &v["roofline"];
    assert!(roof["bandwidth"].as_array().is_some_and(|b| !b.is_empty()));
    assert!(roof["f32_fma"]["gflop_per_s_all_threads"].as_f64().is_some_and(|x| x > 0.0));

    // The SVG: the two points, the ceilings, the ids in the legend.
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    assert!(s.matches("<circle").count() >= 4, "2 points + 2 legend markers"); // plus backend keys
    assert!(s.contains(CPU_CI) && s.contains(REF_CI) && s.contains("GB/s") && s.contains("<polyline"));
}

/// `--time-limit`: the first case always runs, later ones only while the limit is not reached;
/// the ones left out are listed after the table and in the JSON, and the run still succeeds.
/// Each finished row's figures also go to stderr as they come (a run killed from outside keeps
/// what it measured).
#[test]
fn a_time_limit_runs_the_first_case_and_lists_the_rest() {
    let dir = scratch("time-limit");
    let json = dir.join("t.json");
    let out = vistok(&[
        "bench",
        "--quick",
        "--filter",
        REF_CI,
        "--filter",
        CPU_CI,
        "--time-limit",
        "0.000000001",
        "--json",
        json.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let timed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("patchify/")).collect();
    assert_eq!(timed.len(), 1, "{stdout}");
    assert!(timed[0].starts_with(REF_CI) && timed[0].ends_with("oracle"), "{stdout}");
    assert!(
        stdout.contains("not run (--time-limit reached): 1") && stdout.contains(&format!("  {CPU_CI}")),
        "{stdout}"
    );
    assert!(stderr.contains("1 of 2 cases not run"), "{stderr}");
    // The streamed line carries the same figures as the table's.
    let streamed = stderr.lines().find(|l| l.starts_with("  = ")).unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(streamed.trim_start_matches("  = ").split_whitespace().next(), Some(REF_CI), "{stderr}");
    assert!(streamed.ends_with("oracle"), "{stderr}");
    let v = read_json(&json);
    assert_eq!(v["results"].as_array().unwrap().len(), 1);
    assert_eq!(v["not_run"], serde_json::json!([CPU_CI]));

    // Without a limit (or with a generous one) nothing is left out.
    let out = vistok(&["bench", "--quick", "--filter", REF_CI, "--filter", CPU_CI, "--time-limit", "600"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success() && !stdout.contains("not run"), "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("patchify/")).count(), 2, "{stdout}");
}

#[test]
fn a_planted_regression_fails_naming_the_kernel() {
    let dir = scratch("regressed");
    let mut base = measured(&dir);
    // The baseline claims every sample was 100× faster than this run's fastest: a range that
    // no run-to-run spread reaches, even on a loaded machine where one quick run's
    // [min, max] can span 100× (its slowest sample is not carried into the baseline).
    plant_point(&mut base, CPU_CI, 0.01);
    let path = dir.join("base.json");
    std::fs::write(&path, base.to_string()).unwrap();
    let out = vistok(&[
        "bench",
        "--quick",
        "--filter",
        CPU_CI,
        "--baseline",
        path.to_str().unwrap(),
        "--max-regression",
        "50",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "a 100x slowdown passed:\n{stdout}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(last.contains(CPU_CI) && last.contains("50%"), "{stderr}");
    assert!(stdout.contains("REGRESSED") && stdout.contains("outside the run-to-run spread"), "{stdout}");
}

#[test]
fn a_faster_kernel_and_a_new_kernel_pass() {
    let dir = scratch("faster");
    let mut base = measured(&dir);
    // The baseline claims the kernel was 10× slower; the reference row is not in it at all.
    plant(&mut base, CPU_CI, 10.0);
    let path = dir.join("base.json");
    std::fs::write(&path, base.to_string()).unwrap();
    let json = dir.join("cmp.json");
    let out = vistok(&[
        "bench",
        "--quick",
        "--filter",
        REF_CI,
        "--filter",
        CPU_CI,
        "--baseline",
        path.to_str().unwrap(),
        "--max-regression",
        "50",
        "--json",
        json.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}\n{stdout}");
    let line =
        |id: &str| stdout.lines().rfind(|l| l.contains(id)).unwrap_or_else(|| panic!("no {id}:\n{stdout}")).to_string();
    assert!(line(CPU_CI).contains("faster"), "{stdout}");
    assert!(line(REF_CI).contains("new"), "{stdout}");
    let cmp = &read_json(&json)["baseline"]["comparisons"];
    let verdicts: Vec<&str> = cmp.as_array().unwrap().iter().map(|c| c["verdict"].as_str().unwrap()).collect();
    assert_eq!(verdicts, ["new", "faster"]);
}

#[test]
fn bad_command_lines_fail_with_one_clear_line() {
    for (args, needle) in [
        (&["bench", "--frobnicate"][..], "--frobnicate"),
        (&["bench", "--threads", "zero"], "--threads"),
        (&["bench", "--threads", "0"], "--threads"),
        (&["bench", "--threads"], "--threads"),
        (&["bench", "--max-regression", "5"], "--baseline"),
        (&["bench", "--time-limit", "0"], "--time-limit"),
        (&["bench", "--time-limit", "soon"], "--time-limit"),
        (&["bench", "--time-limit", "inf"], "--time-limit"),
        (&["bench", "--filter", "no-such-kernel"], "no case matches"),
        (&["bench", "--quick", "--filter", CPU_CI, "--baseline", "/nonexistent/base.json"], "/nonexistent/base.json"),
        (&["roofline", "--bogus"], "--bogus"),
    ] {
        let out = vistok(args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        // The error is the last line (notes and progress may come before it).
        let last = stderr.lines().last().unwrap_or("");
        assert!(last.starts_with(&format!("vistok {}: ", args[0])) && last.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_malformed_baseline_is_an_error_not_a_panic() {
    let dir = scratch("malformed");
    let path = dir.join("bad.json");
    std::fs::write(&path, "{\"results\": [{\"id\": 3}]}").unwrap();
    let out = vistok(&["bench", "--quick", "--filter", CPU_CI, "--baseline", path.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not a vistok bench JSON") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn roofline_prints_and_writes_json() {
    let dir = scratch("roofline");
    let json = dir.join("r.json");
    let out = vistok(&["roofline", "--quick", "--threads", "1", "--json", json.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for needle in ["copy", "triad", "non-temporal", "f32 FMA", "bf16 dot", "GB/s", "GFLOP/s"] {
        assert!(stdout.contains(needle), "{needle}:\n{stdout}");
    }
    let v = read_json(&json);
    assert_eq!(v["machine"]["threads"], Value::from(1));
    assert!(v["roofline"]["bandwidth"]
        .as_array()
        .is_some_and(|b| b.iter().all(|x| x["gb_per_s"].as_f64() > Some(0.0))));
}
