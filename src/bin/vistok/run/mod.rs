//! `vistok run <family>` on .npy files (placeholder until the runner lands).

use std::ffi::OsString;

pub fn main(_args: Vec<OsString>) -> Result<(), String> {
    Err("run: not implemented yet".into())
}
