//! The ABI between kernels/patchify.ptx and the Rust launcher, checked without a GPU.
//!
//! Always compiled: the expected entries and parameter sizes are written here, checked
//! against the PTX (and its `// abi` header lines, written by kernels/gen_patchify.py); with
//! the `cuda` feature they are also checked against the Rust side's constants, struct sizes
//! and field offsets.

use std::collections::BTreeMap;

const PTX: &str = include_str!("../kernels/patchify.ptx");

const PATCHIFY_BYTES: usize = 192;
const UNPATCHIFY_BYTES: usize = 184;
const BLOCK: usize = 256;
const IMAGE: [&str; 4] = ["u8", "f32", "f16", "bf16"];
const TOKENS: [&str; 3] = ["f32", "f16", "bf16"];

/// `(entry, parameter bytes)` in file order.
fn expected() -> Vec<(String, usize)> {
    let mut v = vec![];
    for i in IMAGE {
        for o in TOKENS {
            v.push((format!("patchify_{i}_{o}"), PATCHIFY_BYTES));
        }
    }
    for i in TOKENS {
        for o in IMAGE {
            v.push((format!("unpatchify_{i}_{o}"), UNPATCHIFY_BYTES));
        }
    }
    v
}

struct EntryDecl {
    name: String,
    params: Vec<String>,
    maxntid: Option<String>,
}

/// Every `.visible .entry name( ... )` with its parameter lines and `.maxntid` directive.
fn entries() -> Vec<EntryDecl> {
    let lines: Vec<&str> = PTX.lines().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if let Some(rest) = line.strip_prefix(".visible .entry ") {
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

/// The `// abi KEY... VALUE` header lines: "patchify size" -> 192, "patchify div" -> 56, ...
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
fn header_declares_a_jittable_version_and_target() {
    let directive = |d: &str| PTX.lines().find_map(|l| l.strip_prefix(d)).map(str::trim);
    let version = directive(".version ").expect(".version");
    let (major, minor) = version.split_once('.').unwrap();
    let v = (major.parse::<u32>().unwrap(), minor.parse::<u32>().unwrap());
    assert!(v <= (8, 0), "PTX .version {version} is newer than CUDA 12.0 drivers can JIT (8.0)");
    assert_eq!(directive(".target "), Some("sm_80"));
    assert_eq!(directive(".address_size "), Some("64"));
    assert!(PTX.is_ascii() && !PTX.contains('\0'));
}

#[test]
fn every_launched_entry_exists_with_one_param_block_of_the_right_size() {
    let found = entries();
    let names: Vec<&str> = found.iter().map(|e| e.name.as_str()).collect();
    let want = expected();
    assert_eq!(names, want.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), "entries and their order");
    for (e, (_, bytes)) in found.iter().zip(&want) {
        assert_eq!(e.params, [format!(".param .align 8 .b8 p[{bytes}]")], "{}: parameter list", e.name);
        assert_eq!(e.maxntid.as_deref(), Some(format!("{BLOCK}, 1, 1").as_str()), "{}: .maxntid", e.name);
    }
}

#[test]
fn abi_header_matches_the_documented_sizes() {
    let abi = abi();
    assert_eq!(abi["patchify size"], PATCHIFY_BYTES);
    assert_eq!(abi["unpatchify size"], UNPATCHIFY_BYTES);
    assert_eq!(abi["block"], BLOCK);
    // Offsets are increasing and inside the block.
    for family in ["patchify", "unpatchify"] {
        let offs: Vec<usize> = abi
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{family} ")) && !k.ends_with(" size"))
            .map(|(_, &v)| v)
            .collect();
        assert!(offs.len() >= 10 && offs.iter().all(|&o| o < abi[&format!("{family} size")]));
    }
}

#[test]
fn committed_ptx_is_what_the_generator_writes() {
    // Found at run time: the test binary may run from a copy of the tree at another path.
    let roots = [std::env::var_os("CARGO_MANIFEST_DIR").map(std::path::PathBuf::from), std::env::current_dir().ok()];
    let Some(gen) = roots.into_iter().flatten().map(|r| r.join("kernels/gen_patchify.py")).find(|p| p.is_file()) else {
        say_skipped("kernels/gen_patchify.py not found (run from the crate root)");
        return;
    };
    match std::process::Command::new("python3").arg(&gen).arg("--stdout").output() {
        // Compare with the PTX embedded in this binary, not the file next to the generator.
        Ok(out) if out.status.success() => {
            assert!(out.stdout == PTX.as_bytes(), "kernels/patchify.ptx is stale: run python3 kernels/gen_patchify.py")
        }
        Ok(out) => panic!("{}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => say_skipped(&format!("python3 not available ({e})")),
    }
}

#[cfg(feature = "cuda")]
#[test]
fn rust_launcher_agrees_with_the_ptx() {
    use vistok::cuda::patchify as cp;
    let want = expected();
    assert_eq!(cp::KERNEL_NAMES.to_vec(), want.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>());
    assert_eq!(cp::PATCHIFY_PARAM_BYTES, PATCHIFY_BYTES);
    assert_eq!(cp::UNPATCHIFY_PARAM_BYTES, UNPATCHIFY_BYTES);
    assert_eq!(cp::BLOCK as usize, BLOCK);
    let abi = abi();
    assert_eq!(abi["flag vload"], cp::FLAG_VLOAD as usize);
    assert_eq!(abi["flag role"], cp::FLAG_ROLE as usize);
    for (family, offsets) in
        [("patchify", cp::patchify_param_offsets()), ("unpatchify", cp::unpatchify_param_offsets())]
    {
        let in_ptx: Vec<(String, usize)> = abi
            .iter()
            .filter_map(|(k, &v)| {
                k.strip_prefix(&format!("{family} ")).filter(|f| *f != "size").map(|f| (f.to_string(), v))
            })
            .collect();
        let mut in_rust: Vec<(String, usize)> = offsets.iter().map(|&(f, o)| (f.to_string(), o)).collect();
        in_rust.sort();
        let mut in_ptx = in_ptx;
        in_ptx.sort();
        assert_eq!(in_rust, in_ptx, "{family}: field offsets, Rust vs PTX");
    }
    for name in cp::KERNEL_NAMES {
        let (family, rest) = name.split_once('_').unwrap();
        let (i, o) = rest.split_once('_').unwrap();
        let dtype = |s: &str| {
            [vistok::DType::U8, vistok::DType::F32, vistok::DType::F16, vistok::DType::BF16]
                .into_iter()
                .find(|d| d.name() == s)
                .unwrap()
        };
        assert_eq!(cp::kernel_name(family, dtype(i), dtype(o)), name);
    }
}

/// Says a test was skipped where a person sees it: straight to the process's stderr, which
/// the test harness does not capture (it captures only the print macros).
fn say_skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}
