//! One module per subcommand; each is a thin layer over library calls.

pub mod bench;
pub mod data;
