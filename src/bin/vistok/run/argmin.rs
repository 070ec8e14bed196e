//! `vistok run argmin`.

use std::ffi::OsString;

pub fn main(_args: Vec<OsString>) -> Result<(), String> {
    Err("run argmin: the argmin family is not in vistok yet (see the issues)".into())
}
