//! `vistok bench` and `vistok roofline` (placeholder until the harness lands).

use std::ffi::OsString;

pub fn main(_args: Vec<OsString>) -> Result<(), String> {
    Err("bench: not implemented yet".into())
}

pub fn roofline_main(_args: Vec<OsString>) -> Result<(), String> {
    Err("roofline: not implemented yet".into())
}
