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
    /// The embedded default: synthetic imbalanced world, SFT, then GRPO vs DRPO, evaluated per
    /// domain (the paper's Table 2 layout).
    Demo(cmd::demo::DemoArgs),
    /// Manifests and clinical files: validate, convert.
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
    /// Benchmarks of the pipeline's stages.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Score model responses with the QoQ medical reward (one JSON line per case).
    Reward(cmd::reward::RewardArgs),
    /// Metrics with the paper's conventions over a predictions file.
    Metrics(cmd::metrics::MetricsArgs),
    /// Advantages of training steps' rollouts (GRPO, DRPO, ...), state carried across steps.
    Advantage(cmd::advantage::AdvantageArgs),
    /// Run the model on saved inputs and write its logits.
    Logits(cmd::logits::LogitsArgs),
    /// Turn manifest rows into model-ready arrays.
    Process(cmd::process::ProcessArgs),
    /// Run one case end to end: images, ECG and a question in; reasoning, boxes and answer out.
    Infer(cmd::infer::InferArgs),
    /// Training curves (one PNG per metric group) from a run's metrics.jsonl.
    Plot(cmd::plot::PlotArgs),
    /// Evaluate responses with every reasoning trace kept; compare runs.
    Eval(cmd::eval::EvalArgs),
    /// Write the synthetic imbalanced clinical world (images, volumes, ECGs, manifests).
    Synth(cmd::synth::SynthArgs),
    /// OpenAI-compatible HTTP server (chat completions, streaming, images, ECG).
    Serve(cmd::serve::ServeArgs),
    /// Model folders: a fresh one with seeded random weights (`init`).
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// RL training of a run file (rollouts, rewards, advantages, updates, checkpoints).
    Train(cmd::train::TrainArgs),
}

#[allow(unsafe_code)] // qoq_model::threads::pin_thread_count, before any thread exists
fn main() -> std::process::ExitCode {
    // SAFETY: the first statements of main, before any thread exists.
    unsafe { qoq_model::threads::pin_thread_count() };
    keep_freed_memory();
    // No colour codes when stderr is a file or a pipe (log files stay plain text).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,jpeg2k=warn,openjp2=warn")
            }),
        )
        .init();
    let cli = Cli::parse();
    // On a compute thread: the kernels' parallel jobs start there instead of waking the pool
    // from `main` each time (qoq_model::threads::install). Except the server: its async runtime
    // waits on sockets and would hold a compute thread idle; its scheduler thread runs the
    // model's work on them.
    let result = if matches!(cli.command, Command::Serve(_)) {
        run(cli.command)
    } else {
        qoq_model::threads::install(|| run(cli.command))
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

/// Runs one command.
fn run(command: Command) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Data(c) => cmd::data::run(c),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Reward(a) => cmd::reward::run(a),
        Command::Metrics(a) => cmd::metrics::run(a),
        Command::Advantage(a) => cmd::advantage::run(a),
        Command::Logits(a) => cmd::logits::run(a),
        Command::Process(a) => cmd::process::run(a),
        Command::Synth(a) => cmd::synth::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Infer(a) => cmd::infer::run(a),
        Command::Plot(a) => cmd::plot::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Model(c) => cmd::model::run(c),
        Command::Train(a) => cmd::train::run(a),
    }
}

/// glibc's allocator gives every freed block above its (dynamic) mmap threshold back to the
/// kernel and trims the heap top above 128 KiB free, so the outputs of tensor ops, allocated and
/// freed in every layer, were fresh pages to fault in and zero each time: a sixth of a tiny
/// model's training step went to page faults. Blocks up to glibc's largest threshold (32 MiB)
/// now come from the heap, and up to 1 GiB of freed heap is kept for reuse. (mimalloc was tried
/// instead: with its default purging, a 0.5B-class step spent half its time zeroing pages.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // mallopt: glibc's documented tuning call, made before any allocation races
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
