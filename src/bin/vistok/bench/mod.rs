//! `vistok bench` and `vistok roofline`: every kernel family on built-in deterministic data,
//! timed, checked against the reference and placed on this machine's measured roofline.
//!
//! - [`options`]: the command lines; [`cases`]: what each family registers (the only place a
//!   family touches); [`timing`]: warm-up and samples; [`roofline`]: the machine's ceilings;
//!   [`results`]: a row of figures; [`table`], [`report`] (JSON), [`baseline`], [`plot`]
//!   (SVG): the outputs; [`progress`]: stderr; [`gpu`]: the device, when there is one.
//!
//! Errors are one line on stderr (printed by `main.rs`) and a non-zero exit: bad options, an
//! unreadable baseline, a case that fails to run or disagrees with the reference, a regression.

mod baseline;
mod cases;
mod gpu;
mod machine;
mod options;
mod plot;
mod progress;
mod report;
mod results;
mod roofline;
mod table;
mod timing;

use std::ffi::OsString;
use std::io::Write;

use self::progress::Progress;
use self::results::Row;
use self::roofline::Roofline;

pub fn main(args: Vec<OsString>) -> Result<(), String> {
    bench(args).map_err(|e| prefixed("bench", e))
}

/// `vistok <command>: …`: every error line names its command, once.
fn prefixed(command: &str, e: String) -> String {
    if e.starts_with(command) {
        e
    } else {
        format!("{command}: {e}")
    }
}

fn bench(args: Vec<OsString>) -> Result<(), String> {
    let Some(o) = options::bench(args)? else {
        return Ok(());
    };
    thread_pool(o.threads)?;
    let gpus = gpu::Gpus::open();
    if let Some(why) = &gpus.skipped {
        eprintln!("cuda cases skipped: {why}");
    }
    let env = cases::Env {
        #[cfg(feature = "cuda")]
        gpu: gpus.gpu.clone(),
    };
    let selected: Vec<cases::Case> =
        cases::all(&env)?.into_iter().filter(|c| options::selected(&o.filters, &c.id())).collect();
    if selected.is_empty() {
        return Err(format!(
            "bench: no case matches --filter {:?} (ids look like patchify/cpu/u8-f32/32x3x256x256-nchw-p16)",
            o.filters
        ));
    }
    let machine = machine::Machine::detect(gpus.name());

    let progress = Progress::new(selected.len() + 1);
    progress.step(1, if o.quick { "roofline (quick)" } else { "roofline" });
    let roofline = Roofline::measure(o.quick, &gpus);
    let budget = timing::Budget::new(o.quick);
    let mut rows = vec![];
    let mut failures = vec![];
    let mut not_run = vec![];
    let started = std::time::Instant::now();
    for (i, case) in selected.iter().enumerate() {
        let id = case.id();
        if i > 0 && o.time_limit.is_some_and(|limit| started.elapsed() >= limit) {
            not_run.push(id);
            continue;
        }
        progress.step(i + 2, &id);
        match run_case(case, &budget, &roofline) {
            Ok(row) => {
                if !row.check_ok {
                    failures.push(format!("{id} disagrees with the reference: {}", row.check));
                }
                // On a log (not a terminal), each row's figures as soon as it has them: a run
                // killed from outside still leaves what it measured.
                progress.result(&table::line(&row, id.len()));
                rows.push(row);
            }
            Err(e) => {
                progress.note(&format!("{id}: {e}"));
                failures.push(format!("{id}: {e}"));
            }
        }
    }
    progress.finish();
    if !not_run.is_empty() {
        eprintln!(
            "--time-limit: {} of {} cases not run (limit reached after {:.0} s)",
            not_run.len(),
            selected.len(),
            started.elapsed().as_secs_f64()
        );
    }
    // Free the inputs and reference outputs before writing the reports.
    drop(selected);

    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| format!("writing to stdout: {e}");
    table::print(&mut out, &rows, &roofline).map_err(io)?;
    table::not_run(&mut out, &not_run).map_err(io)?;
    let comparisons = match &o.baseline {
        Some(path) => {
            let cmp = baseline::compare(path, &rows, o.max_regression)?;
            baseline::print(&mut out, path, o.max_regression, &cmp).map_err(io)?;
            Some((path, cmp))
        }
        None => None,
    };
    out.flush().map_err(io)?;

    if let Some(path) = &o.json {
        let summary = comparisons.as_ref().map(|(path, cmp)| report::BaselineSummary {
            file: path.display().to_string(),
            max_regression_pct: o.max_regression,
            comparisons: cmp,
        });
        let file = report::Bench {
            command: "vistok bench",
            quick: o.quick,
            filters: &o.filters,
            machine: &machine,
            roofline: &roofline,
            results: &rows,
            not_run: &not_run,
            baseline: summary,
        };
        report::json(path, &file)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &o.plot {
        report::write(path, plot::svg(&rows, &roofline, &machine).as_bytes())?;
        eprintln!("wrote {}", path.display());
    }

    if let Some(msg) = comparisons.as_ref().and_then(|(_, cmp)| baseline::failure(cmp, o.max_regression)) {
        failures.push(msg);
    }
    match failures.len() {
        0 => Ok(()),
        1 => Err(failures.remove(0)),
        n => Err(format!("bench: {n} failures:\n  {}", failures.join("\n  "))),
    }
}

/// Prepares, times and checks one case.
fn run_case(case: &cases::Case, budget: &timing::Budget, roofline: &Roofline) -> Result<Row, String> {
    let mut runner = (case.setup)()?;
    let stats = timing::measure(budget, |n| runner.run(n))?;
    let check = runner.check()?;
    Ok(Row::new(case, &stats, &check, roofline))
}

pub fn roofline_main(args: Vec<OsString>) -> Result<(), String> {
    roofline(args).map_err(|e| prefixed("roofline", e))
}

fn roofline(args: Vec<OsString>) -> Result<(), String> {
    let Some(o) = options::roofline(args)? else {
        return Ok(());
    };
    thread_pool(o.threads)?;
    let gpus = gpu::Gpus::open();
    let machine = machine::Machine::detect(gpus.name());
    let roofline = Roofline::measure(o.quick, &gpus);
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| format!("writing to stdout: {e}");
    writeln!(
        out,
        "machine: {}, {} threads of {} logical CPUs, SIMD level {}",
        machine.cpu_model, machine.threads, machine.logical_cpus, machine.simd
    )
    .map_err(io)?;
    roofline.print(&mut out).map_err(io)?;
    out.flush().map_err(io)?;
    if let Some(path) = &o.json {
        report::json(
            path,
            &report::RooflineFile { command: "vistok roofline", machine: &machine, roofline: &roofline },
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Sizes rayon's global pool: every kernel and probe of the run uses it.
fn thread_pool(threads: Option<usize>) -> Result<(), String> {
    let Some(n) = threads else { return Ok(()) };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| format!("--threads {n}: cannot start the thread pool: {e}"))
}
