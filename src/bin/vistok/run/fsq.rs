//! `vistok run fsq`.

use std::ffi::OsString;

pub fn main(_args: Vec<OsString>) -> Result<(), String> {
    Err("run fsq: the fsq family is not in vistok yet (see the issues)".into())
}
