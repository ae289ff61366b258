//! `qoq plot RUN_DIR`: training curves from a run's `metrics.jsonl` (spec §12 metric names;
//! the reference shows the same curves in wandb).
//!
//! Reads `RUN_DIR/metrics.jsonl` (a torn last line of a running or killed run is ignored),
//! groups the metrics into charts with `qoq_rl::metrics_log::metric_groups` (reward, per-domain
//! reward, validation score per domain, KL, loss, clip fractions, grad norm, lr, lengths, ...),
//! and writes one PNG per group to `RUN_DIR/curves/{group}.png` with
//! `qoq_eval::plot::line_chart`. Prints one JSON line per chart (`file`, `metrics`, `points`).

use anyhow::Context;
use clap::Args;
use qoq_rl::metrics_log::{metric_groups, read_records, series};
use std::path::PathBuf;

/// Arguments of `qoq plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run directory holding `metrics.jsonl`.
    pub run_dir: PathBuf,
    /// Metrics file (default `RUN_DIR/metrics.jsonl`).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Output folder (default `RUN_DIR/curves`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only the groups whose name contains this text (e.g. `reward`).
    #[arg(long)]
    pub only: Option<String>,
}

/// Runs `qoq plot`.
pub fn run(args: PlotArgs) -> anyhow::Result<std::process::ExitCode> {
    let metrics_path = args
        .metrics
        .clone()
        .unwrap_or_else(|| args.run_dir.join("metrics.jsonl"));
    let records = read_records(&metrics_path)
        .with_context(|| format!("reading the metrics log of {}", args.run_dir.display()))?;
    anyhow::ensure!(
        !records.is_empty(),
        "{}: no complete metrics line yet",
        metrics_path.display()
    );
    let all = series(&records);
    let out_dir = args.out.unwrap_or_else(|| args.run_dir.join("curves"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let groups = metric_groups(all.keys().map(String::as_str));
    let mut written = 0usize;
    for (group, names) in groups {
        if let Some(only) = &args.only
            && !group.contains(only.as_str())
        {
            continue;
        }
        let lines: Vec<(String, Vec<(f64, f64)>)> = names
            .iter()
            .filter(|n| all[n.as_str()].iter().any(|(_, y)| y.is_finite()))
            .map(|n| (n.clone(), all[n.as_str()].clone()))
            .collect();
        if lines.is_empty() {
            continue;
        }
        let points: usize = lines.iter().map(|(_, p)| p.len()).sum();
        let chart = qoq_eval::plot::line_chart(&group, "step", &lines);
        let file = out_dir.join(format!("{group}.png"));
        chart
            .save_png(&file)
            .with_context(|| format!("writing {}", file.display()))?;
        let line = serde_json::json!({
            "file": file.display().to_string(),
            "metrics": lines.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            "points": points,
        });
        println!("{line}");
        written += 1;
    }
    tracing::info!(charts = written, dir = %out_dir.display(), "curves written");
    anyhow::ensure!(written > 0, "no chart matched (metrics: {})", all.len());
    Ok(std::process::ExitCode::SUCCESS)
}
