//! One module per subcommand; each is a thin layer over library calls.

pub mod advantage;
pub mod bench;
pub mod bench_generate;
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

/// `--device`, shared by the commands that run a model (`infer`, `serve`, `eval`, `logits`,
/// `bench`); `train` has its own, which overrides the run file's `model.device`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Where the model runs: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. CUDA needs a binary built
    /// with `cargo build --release -p qoq-cli --features cuda`.
    #[arg(long, default_value = "cpu", value_parser = qoq_model::DeviceSpec::parse)]
    pub device: qoq_model::DeviceSpec,
}

impl DeviceArgs {
    /// Opens the device (a GPU that cannot be opened is an error naming it).
    pub fn open(&self) -> anyhow::Result<candle_core::Device> {
        Ok(self.device.device()?)
    }
}
