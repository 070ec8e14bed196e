//! Command-line options of `vistok bench` and `vistok roofline`, and the `--filter` matcher.

use std::ffi::OsString;
use std::path::PathBuf;

pub const BENCH_USAGE: &str = "\
usage: vistok bench [options]
  --filter PAT          run only ids matching PAT: a substring, or a glob with * and ?
                        (ids: family/backend/dtype/shape, e.g. patchify/cpu/u8-f32/32x3x256x256-nchw-p16);
                        repeatable, a case runs if any pattern matches
  --threads N           size of the thread pool (default: every core)
  --quick               fewer, shorter repetitions and a quick roofline (CI)
  --time-limit SECS     start no case after SECS seconds of cases (the first always runs); the
                        table and JSON list the cases left out (a device lent for minutes)
  --json FILE           write every figure and the machine info as JSON
  --baseline FILE       compare with an earlier --json file
  --max-regression PCT  with --baseline: fail if a kernel's median is slower by more than PCT% (default 10)
  --plot FILE.svg       draw the roofline chart";

pub const ROOFLINE_USAGE: &str = "\
usage: vistok roofline [options]
  --threads N   size of the thread pool (default: every core)
  --quick       smaller arrays and fewer passes
  --json FILE   write the figures as JSON";

#[derive(Debug, Default)]
pub struct Bench {
    pub filters: Vec<String>,
    pub threads: Option<usize>,
    pub quick: bool,
    pub json: Option<PathBuf>,
    pub baseline: Option<PathBuf>,
    pub max_regression: f64,
    pub plot: Option<PathBuf>,
    /// `--time-limit`: no case starts once the cases have run this long.
    pub time_limit: Option<std::time::Duration>,
}

#[derive(Debug, Default)]
pub struct Roofline {
    pub threads: Option<usize>,
    pub quick: bool,
    pub json: Option<PathBuf>,
}

/// `None`: `--help` was asked for (and printed).
pub fn bench(args: Vec<OsString>) -> Result<Option<Bench>, String> {
    use lexopt::prelude::*;
    let mut o = Bench { max_regression: 10.0, ..Bench::default() };
    let mut max_regression = None;
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("filter") => o.filters.push(string(&mut p, "--filter")?),
            Long("threads") => o.threads = Some(threads(&mut p)?),
            Long("quick") => o.quick = true,
            Long("json") => o.json = Some(path(&mut p)?),
            Long("baseline") => o.baseline = Some(path(&mut p)?),
            Long("max-regression") => max_regression = Some(percent(&mut p)?),
            Long("plot") => o.plot = Some(path(&mut p)?),
            Long("time-limit") => o.time_limit = Some(seconds(&mut p, "--time-limit")?),
            Short('h') | Long("help") => {
                println!("{BENCH_USAGE}");
                return Ok(None);
            }
            _ => return Err(format!("{} (vistok bench --help lists the options)", arg.unexpected())),
        }
    }
    if let Some(pct) = max_regression {
        if o.baseline.is_none() {
            return Err("--max-regression needs --baseline FILE".into());
        }
        o.max_regression = pct;
    }
    Ok(Some(o))
}

/// `None`: `--help` was asked for (and printed).
pub fn roofline(args: Vec<OsString>) -> Result<Option<Roofline>, String> {
    use lexopt::prelude::*;
    let mut o = Roofline::default();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("threads") => o.threads = Some(threads(&mut p)?),
            Long("quick") => o.quick = true,
            Long("json") => o.json = Some(path(&mut p)?),
            Short('h') | Long("help") => {
                println!("{ROOFLINE_USAGE}");
                return Ok(None);
            }
            _ => return Err(format!("{} (vistok roofline --help lists the options)", arg.unexpected())),
        }
    }
    Ok(Some(o))
}

fn string(p: &mut lexopt::Parser, flag: &str) -> Result<String, String> {
    let v = p.value().map_err(|e| e.to_string())?;
    v.into_string().map_err(|v| format!("{flag}: not valid UTF-8: {v:?}"))
}

fn path(p: &mut lexopt::Parser) -> Result<PathBuf, String> {
    p.value().map(PathBuf::from).map_err(|e| e.to_string())
}

fn threads(p: &mut lexopt::Parser) -> Result<usize, String> {
    let v = string(p, "--threads")?;
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=4096).contains(&n) => Ok(n),
        _ => Err(format!("--threads: expected a whole number from 1 to 4096, got {v:?}")),
    }
}

fn percent(p: &mut lexopt::Parser) -> Result<f64, String> {
    let v = string(p, "--max-regression")?;
    match v.trim().trim_end_matches('%').parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("--max-regression: expected a percentage ≥ 0 such as 10, got {v:?}")),
    }
}

fn seconds(p: &mut lexopt::Parser, flag: &str) -> Result<std::time::Duration, String> {
    let v = string(p, flag)?;
    match v.trim().trim_end_matches('s').parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x <= 1e7 => Ok(std::time::Duration::from_secs_f64(x)),
        _ => Err(format!("{flag}: expected a number of seconds > 0 such as 240, got {v:?}")),
    }
}

/// Whether `id` passes the filters: none given, or any pattern matches (a glob when it has `*`
/// or `?`, matched against the whole id; otherwise a substring).
pub fn selected(filters: &[String], id: &str) -> bool {
    filters.is_empty()
        || filters.iter().any(|f| {
            if f.contains(['*', '?']) {
                glob(f.as_bytes(), id.as_bytes())
            } else {
                id.contains(f.as_str())
            }
        })
}

/// `*` matches any run (including `/`), `?` one byte.
fn glob(pat: &[u8], s: &[u8]) -> bool {
    // Iterative with one backtrack point: linear for patterns without pathological stars.
    let (mut p, mut i, mut star, mut mark) = (0, 0, None, 0);
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            mark = i;
            p += 1;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_substrings_or_globs() {
        let id = "patchify/cpu/u8-f32/32x3x256x256-nchw-p16";
        assert!(selected(&[], id));
        assert!(selected(&["cpu/u8".into()], id));
        assert!(selected(&["patchify/*/u8-f32/*".into()], id));
        assert!(selected(&["*-p1?".into()], id));
        assert!(!selected(&["*-p1".into()], id));
        assert!(!selected(&["reference".into(), "cuda/*".into()], id));
        assert!(selected(&["reference".into(), "*/cpu/*".into()], id));
    }
}
