//! Reading the PTX modules in kernels/ without a GPU: entry declarations, the `// abi` header
//! lines written by the generators, and the generators' own staleness check.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::say_skipped;

/// One `.visible .entry name( ... )` declaration.
pub struct EntryDecl {
    pub name: String,
    /// The parameter lines, trimmed, without the trailing comma.
    pub params: Vec<String>,
    /// The argument of the `.maxntid` directive, if any.
    pub maxntid: Option<String>,
}

/// Every `.visible .entry name( ... )` with its parameter lines and `.maxntid` directive, in
/// file order.
pub fn entries(ptx: &str) -> Vec<EntryDecl> {
    let lines: Vec<&str> = ptx.lines().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < lines.len() {
        if let Some(rest) = lines[i].trim().strip_prefix(".visible .entry ") {
            let name = rest.trim_end_matches('(').trim().to_string();
            assert!(rest.ends_with('('), "entry {name}: expected the parameter list on the next lines");
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
            out.push(EntryDecl { name, params, maxntid });
        }
        i += 1;
    }
    out
}

/// The `// abi KEY... VALUE` header lines: "patchify size" -> 192, "block" -> 256, ...
pub fn abi(ptx: &str) -> BTreeMap<String, usize> {
    ptx.lines()
        .filter_map(|l| l.strip_prefix("// abi "))
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// The `(field, offset)` pairs of the `// abi {prefix} field offset` lines (the `size` line
/// left out), sorted by field name.
pub fn abi_fields(ptx: &str, prefix: &str) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = abi(ptx)
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&format!("{prefix} ")).filter(|f| *f != "size").map(|f| (f.to_string(), v)))
        .collect();
    v.sort();
    v
}

/// The argument of the first line starting with `directive` (e.g. `".target "`), trimmed.
pub fn directive<'a>(ptx: &'a str, directive: &str) -> Option<&'a str> {
    ptx.lines().find_map(|l| l.strip_prefix(directive)).map(str::trim)
}

/// `kernels/{name}` of this checkout, found at run time (the test binary may run from a copy of
/// the tree at another path): under `$CARGO_MANIFEST_DIR`, the current directory, then the
/// crate root this binary was built from.
pub fn kernels_file(name: &str) -> Option<PathBuf> {
    let roots = [
        std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from),
        std::env::current_dir().ok(),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    roots.into_iter().flatten().map(|r| r.join("kernels").join(name)).find(|p| p.is_file())
}

/// Runs `python3 kernels/{generator} {args}`: `Some(output)`, or `None` after a `skipped:` line
/// when the generator or python3 is missing.
pub fn run_generator(generator: &str, args: &[&str]) -> Option<std::process::Output> {
    let Some(gen) = kernels_file(generator) else {
        say_skipped(&format!("kernels/{generator} not found (run from the crate root)"));
        return None;
    };
    match std::process::Command::new("python3").arg(&gen).args(args).output() {
        Ok(out) => Some(out),
        Err(e) => {
            say_skipped(&format!("python3 not available ({e})"));
            None
        }
    }
}

/// Runs `python3 kernels/{generator} {args}` (an interpreter check) and asserts it succeeds and
/// prints `passed` (its success line); echoes its report. Skips without python3.
pub fn check_generator_run(generator: &str, args: &[&str], passed: &str) {
    if let Some(out) = run_generator(generator, args) {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(passed),
            "{generator} {args:?} failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", text.trim_end());
    }
}

/// Runs `kernels/{generator} --stdout {args}` and asserts it writes `embedded` (the PTX embedded
/// in the test binary, not the file next to the generator); skips without python3.
pub fn check_generated(generator: &str, args: &[&str], file: &str, embedded: &str) {
    let all: Vec<&str> = ["--stdout"].iter().chain(args).copied().collect();
    if let Some(out) = run_generator(generator, &all) {
        assert!(out.status.success(), "{generator} failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout == embedded.as_bytes(), "kernels/{file} is stale: run python3 kernels/{generator}");
    }
}
