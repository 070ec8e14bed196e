//! `vistok run attention`.

use std::ffi::OsString;

pub fn main(_args: Vec<OsString>) -> Result<(), String> {
    Err("run attention: the attention family is not in vistok yet (see the issues)".into())
}
