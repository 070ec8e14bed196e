//! Progress on stderr: one line rewritten in place on a terminal, plain lines otherwise (logs,
//! CI), so stdout stays the table alone.

use std::io::{IsTerminal, Write};

pub struct Progress {
    tty: bool,
    total: usize,
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        Progress { tty: std::io::stderr().is_terminal(), total }
    }

    /// Announces a step (`i` counts from 1).
    pub fn step(&self, i: usize, what: &str) {
        let mut e = std::io::stderr().lock();
        // A failed write to stderr is not worth failing the run for.
        let _ = if self.tty {
            let bar = bar(i.saturating_sub(1), self.total, 20);
            write!(e, "\r\x1b[K[{bar}] {i}/{} {what}", self.total)
        } else {
            writeln!(e, "[{i}/{}] {what}", self.total)
        };
        let _ = e.flush();
    }

    /// A finished case's figures, on a log only (a terminal gets the table at the end).
    pub fn result(&self, line: &str) {
        if !self.tty {
            eprintln!("  = {line}");
        }
    }

    /// A message that stays (clears the progress line first on a terminal).
    pub fn note(&self, msg: &str) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
        eprintln!("{msg}");
    }

    /// Clears the progress line.
    pub fn finish(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width).checked_div(total).unwrap_or(width).min(width);
    format!("{}{}", "#".repeat(filled), "-".repeat(width - filled))
}
