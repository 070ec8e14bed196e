//! The ABI between the PTX modules in kernels/ and the Rust launchers, checked without a GPU.
//!
//! Always compiled: the expected entries and parameter sizes are written here, checked
//! against the PTX (and its `// abi` header lines, written by kernels/gen_patchify.py and
//! kernels/gen_quant.py); with the `cuda` feature they are also checked against the Rust
//! side's constants, struct sizes and field offsets.

mod common;

use std::collections::BTreeMap;

use common::ptx::{self, EntryDecl};

const PTX: &str = include_str!("../kernels/patchify.ptx");
const LFQ_PTX: &str = include_str!("../kernels/lfq.ptx");
const FSQ_PTX: &str = include_str!("../kernels/fsq.ptx");

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

/// Every `.visible .entry name( ... )` with its parameter lines and `.maxntid` directive.
fn entries() -> Vec<EntryDecl> {
    ptx::entries(PTX)
}

/// The `// abi KEY... VALUE` header lines: "patchify size" -> 192, "patchify div" -> 56, ...
fn abi() -> BTreeMap<String, usize> {
    ptx::abi(PTX)
}

#[test]
fn header_declares_a_jittable_version_and_target() {
    for ptx in [PTX, LFQ_PTX, FSQ_PTX] {
        let directive = |d: &str| ptx::directive(ptx, d);
        let version = directive(".version ").expect(".version");
        let (major, minor) = version.split_once('.').unwrap();
        let v = (major.parse::<u32>().unwrap(), minor.parse::<u32>().unwrap());
        assert!(v <= (8, 0), "PTX .version {version} is newer than CUDA 12.0 drivers can JIT (8.0)");
        assert_eq!(directive(".target "), Some("sm_80"));
        assert_eq!(directive(".address_size "), Some("64"));
        assert!(ptx.is_ascii() && !ptx.contains('\0'));
    }
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
    ptx::check_generated("gen_patchify.py", &[], "patchify.ptx", PTX);
    ptx::check_generated("gen_quant.py", &["lfq"], "lfq.ptx", LFQ_PTX);
    ptx::check_generated("gen_quant.py", &["fsq"], "fsq.ptx", FSQ_PTX);
}

// ---------------------------------------------------------------- LFQ / FSQ

const LFQ_BYTES: usize = 56;
const FSQ_BYTES: usize = 48;
const FSQ_TABLE_BYTES: usize = 48;
const FLOATS: [&str; 3] = ["f32", "f16", "bf16"];

/// `(entry, parameter bytes)` of a quantizer module in file order: encode then decode, per dtype.
fn quant_expected(module: &str, bytes: usize) -> Vec<(String, usize)> {
    ["encode", "decode"].iter().flat_map(|d| FLOATS.iter().map(move |t| (format!("{module}_{d}_{t}"), bytes))).collect()
}

#[test]
fn quantizer_entries_exist_with_one_param_block_of_the_right_size() {
    for (ptx, module, bytes) in [(LFQ_PTX, "lfq", LFQ_BYTES), (FSQ_PTX, "fsq", FSQ_BYTES)] {
        let found = ptx::entries(ptx);
        let want = quant_expected(module, bytes);
        let names: Vec<&str> = found.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, want.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), "{module}: entries and order");
        for (e, (_, bytes)) in found.iter().zip(&want) {
            assert_eq!(e.params, [format!(".param .align 8 .b8 p[{bytes}]")], "{}: parameter list", e.name);
            assert_eq!(e.maxntid.as_deref(), Some(format!("{BLOCK}, 1, 1").as_str()), "{}: .maxntid", e.name);
        }
        let abi = ptx::abi(ptx);
        assert_eq!(abi[&format!("{module} size")], bytes);
        assert_eq!(abi["block"], BLOCK);
        let offs: Vec<usize> = abi
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{module} ")) && !k.ends_with(" size"))
            .map(|(_, &v)| v)
            .collect();
        assert!(offs.len() >= 8 && offs.iter().all(|&o| o < bytes), "{module}: offsets {offs:?}");
    }
    let abi = ptx::abi(FSQ_PTX);
    assert_eq!(abi["table size"], FSQ_TABLE_BYTES);
}

#[cfg(feature = "cuda")]
#[test]
fn quantizer_launchers_agree_with_the_ptx() {
    use vistok::cuda::{fsq as cf, lfq as cl};
    let lfq_names = quant_expected("lfq", LFQ_BYTES);
    assert_eq!(cl::KERNEL_NAMES.to_vec(), lfq_names.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>());
    let fsq_names = quant_expected("fsq", FSQ_BYTES);
    assert_eq!(cf::KERNEL_NAMES.to_vec(), fsq_names.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>());
    assert_eq!((cl::PARAM_BYTES, cf::PARAM_BYTES, cf::TABLE_BYTES), (LFQ_BYTES, FSQ_BYTES, FSQ_TABLE_BYTES));
    assert_eq!((cl::BLOCK as usize, cf::BLOCK as usize), (BLOCK, BLOCK));
    assert_eq!((cl::PTX, cf::PTX), (LFQ_PTX, FSQ_PTX));
    let sorted = |v: Vec<(&str, usize)>| {
        let mut v: Vec<(String, usize)> = v.into_iter().map(|(f, o)| (f.to_string(), o)).collect();
        v.sort();
        v
    };
    assert_eq!(sorted(cl::param_offsets()), ptx::abi_fields(LFQ_PTX, "lfq"), "lfq: field offsets, Rust vs PTX");
    assert_eq!(sorted(cf::param_offsets()), ptx::abi_fields(FSQ_PTX, "fsq"), "fsq: field offsets, Rust vs PTX");
    assert_eq!(sorted(cf::TABLE_OFFSETS.to_vec()), ptx::abi_fields(FSQ_PTX, "table"), "fsq: table layout, Rust vs PTX");
}

#[test]
fn fsq_ptx_uses_the_tanh_coefficients_of_the_crate() {
    // The generator rounds the decimal literals of src/fsq.rs itself; they must give exactly
    // the f32 bits Rust gives them, and every one must appear in each encode entry.
    use vistok::fsq::tanh_coef::*;
    let abi = ptx::abi(FSQ_PTX);
    let want = [
        ("CLAMP", CLAMP),
        ("A1", A1),
        ("A3", A3),
        ("A5", A5),
        ("A7", A7),
        ("A9", A9),
        ("A11", A11),
        ("A13", A13),
        ("B0", B0),
        ("B2", B2),
        ("B4", B4),
        ("B6", B6),
    ];
    for (name, value) in want {
        let bits = abi[&format!("tanh {name}")];
        assert_eq!(bits, value.to_bits() as usize, "tanh {name}: PTX {bits:#010x} vs Rust {:#010x}", value.to_bits());
        let imm = format!("0f{:08X}", value.to_bits());
        let uses = FSQ_PTX.matches(&imm).count();
        assert!(uses >= 3, "{name} ({imm}) appears {uses} times, expected once per encode entry");
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
        let mut in_rust: Vec<(String, usize)> = offsets.iter().map(|&(f, o)| (f.to_string(), o)).collect();
        in_rust.sort();
        assert_eq!(in_rust, ptx::abi_fields(PTX, family), "{family}: field offsets, Rust vs PTX");
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
