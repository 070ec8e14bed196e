//! `vistok run merge`.

use std::ffi::OsString;

pub fn main(_args: Vec<OsString>) -> Result<(), String> {
    Err("run merge: the merge family is not in vistok yet (see the issues)".into())
}
