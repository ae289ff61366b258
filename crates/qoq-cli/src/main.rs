//! The `qoq` binary.
fn main() {}
