//! `qoq bench ...`: benchmarks of the pipeline's stages.

use anyhow::Context;
use clap::{Args, Subcommand};
use qoq_data::manifest::{ManifestConfig, scan_manifest};
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Stream a synthetic manifest: index it and decode every row (no file access).
    /// Prints rows/s and the process's peak resident memory.
    Manifest(ManifestBenchArgs),
    /// One RL training step (process, generate, reference log-probs, update) split by phase,
    /// with seconds and peak resident memory per phase, against the identical step in PyTorch
    /// (`tools/bench/train_step_ref.py`) in the same run.
    TrainStep(super::bench_train::TrainStepArgs),
    /// Load on `qoq serve` over loopback (fixed request count, concurrency levels, mixed prompt
    /// and output lengths, with and without images): throughput, TTFT and inter-token latency
    /// percentiles, errors, against the one-at-a-time baseline (`--max-running 1`) in the same run.
    Serve(super::bench_serve::ServeBenchArgs),
    /// Generation throughput of the engine on a model folder (text prompts, fixed lengths):
    /// prefill and decode tokens/s, measured as `tools/bench/generate_ref.py` measures
    /// transformers' `generate` (scripts/gpu-check.sh sets the two side by side).
    Generate(super::bench_generate::GenerateBenchArgs),
}

#[derive(Debug, Args)]
pub struct ManifestBenchArgs {
    /// Rows in the synthetic manifest.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: usize,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Manifest(a) => manifest(a),
        BenchCommand::TrainStep(a) => super::bench_train::train_step(a),
        BenchCommand::Serve(a) => super::bench_serve::serve(a),
        BenchCommand::Generate(a) => super::bench_generate::run(a),
    }
}

/// Peak resident set size of this process in KiB (Linux `VmHWM`), if available.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn manifest(a: ManifestBenchArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir().context("creating a temporary folder")?;
    let path = dir.path().join("synthetic.jsonl");
    let domains = [
        ("chest_xray", "mimic-cxr"),
        ("ct", "rspect"),
        ("derm", "ham10000"),
        ("mammo", "vindr"),
        ("fundus", "aptos"),
    ];
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for i in 0..a.rows {
            let (src, ds) = domains[i % domains.len()];
            writeln!(
                w,
                r#"{{"problem": "<image>\nAbove is an image of a patient. What is the diagnosis?Answer with one of the following:\nA\nB\nC", "answer": "B", "images": ["{src}/{ds}/case_{i:07}.png"], "segmentation_path": "masks/case_{i:07}.png", "bbox": [10, 20, 110, 140]}}"#
            )?;
        }
        w.flush()?;
    }
    let bytes = std::fs::metadata(&path)?.len();
    let rss_before = peak_rss_kib();
    let t = Instant::now();
    let stats = scan_manifest(&path, ManifestConfig::default())?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        stats.rows == a.rows,
        "scanned {} of {} rows",
        stats.rows,
        a.rows
    );
    println!(
        "manifest scan: {} rows ({:.1} MiB) in {:.2} s = {:.0} rows/s",
        stats.rows,
        bytes as f64 / (1 << 20) as f64,
        secs,
        stats.rows as f64 / secs
    );
    if let (Some(before), Some(after)) = (rss_before, peak_rss_kib()) {
        println!(
            "peak RSS: {:.1} MiB (before the scan: {:.1} MiB)",
            after as f64 / 1024.0,
            before as f64 / 1024.0
        );
    }
    Ok(ExitCode::SUCCESS)
}
