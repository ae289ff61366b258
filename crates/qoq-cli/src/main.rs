//! The `qoq` binary: thin commands over the library crates.
//!
//! Logs go to stderr (`RUST_LOG=debug` for more); data goes to stdout or files.

mod cmd;

use clap::{Parser, Subcommand};

/// qoq: build, train, evaluate and serve multimodal clinical foundation models (QoQ-Med in Rust).
#[derive(Debug, Parser)]
#[command(name = "qoq", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manifests and clinical files: validate, convert.
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
    /// Benchmarks of the pipeline's stages.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(c) => cmd::data::run(c),
        Command::Bench(c) => cmd::bench::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::from(2)
        }
    }
}
