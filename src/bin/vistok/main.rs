//! `vistok`: the bench harness, the roofline probe and the .npy runner.
//!
//! ```text
//! vistok bench [--filter PAT] [--threads N] [--quick] [--json FILE] [--baseline FILE --max-regression PCT] [--plot FILE.svg]
//! vistok roofline [--threads N] [--json FILE]
//! vistok run <family> ... IN.npy OUT.npy
//! ```

mod bench;
mod dev;
mod run;

use std::process::ExitCode;

const USAGE: &str = "usage: vistok <bench|roofline|run> [options]   (vistok <command> --help for more)";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<_> = args.collect();
    let result = match cmd.to_str() {
        Some("bench") => bench::main(rest),
        Some("roofline") => bench::roofline_main(rest),
        Some("run") => run::main(rest),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("{}: unknown command\n{USAGE}", cmd.to_string_lossy())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            // Every command's errors start with its own name: "vistok run patchify: …".
            eprintln!("vistok {msg}");
            ExitCode::FAILURE
        }
    }
}
