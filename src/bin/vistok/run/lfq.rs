//! `vistok run lfq`.

use std::ffi::OsString;

pub fn main(_args: Vec<OsString>) -> Result<(), String> {
    Err("run lfq: the lfq family is not in vistok yet (see the issues)".into())
}
