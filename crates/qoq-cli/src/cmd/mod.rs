//! One module per subcommand; each is a thin layer over library calls.

pub mod advantage;
pub mod bench;
pub mod bench_serve;
pub mod bench_train;
pub mod data;
pub mod demo;
pub mod eval;
pub mod infer;
pub mod logits;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod process;
pub mod reward;
pub mod serve;
pub mod synth;
pub mod train;
