//! `qoq metrics`: the paper's metrics over a predictions file (spec §8.9, §13; reference
//! `examples/reward_function/evaluation.py::compute_metrics_by_data_source`).
//!
//! Reads JSON Lines `{"response", "answer", "data_source", "dataset"[, "iou"]}` and prints the
//! flat metrics JSON (`{src}/{ds}/{metric}`, `{src}/{metric}`, `val/{metric}`), a Markdown table,
//! or the full nested report with per-class metrics.

use anyhow::Context;
use clap::{Args, ValueEnum};
use qoq_eval::{Extraction, MetricsAccumulator};
use std::io::Write;
use std::path::PathBuf;

/// Output format of `qoq metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object with the reference's flat keys (sorted).
    Json,
    /// A Markdown table: datasets, domain means, overall.
    Markdown,
    /// The nested report as JSON, per-class metrics and confusion matrices included.
    Report,
}

/// How the predicted answer is taken out of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExtractionArg {
    /// The validation metrics' extractor (first `\boxed{}`, else `[...]`, else the text).
    Evaluation,
    /// The reward's extractor (last `\boxed{}` with nesting; no box predicts nothing).
    Reward,
}

/// Arguments of `qoq metrics`.
#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// Predictions file: JSON Lines with `response`, `answer`, `data_source`, `dataset` and an
    /// optional `iou`.
    #[arg(long)]
    pub input: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Answer extraction applied to responses.
    #[arg(long, value_enum, default_value_t = ExtractionArg::Evaluation)]
    pub extraction: ExtractionArg,
}

/// Run `qoq metrics`.
pub fn run(args: MetricsArgs) -> anyhow::Result<std::process::ExitCode> {
    let extraction = match args.extraction {
        ExtractionArg::Evaluation => Extraction::Evaluation,
        ExtractionArg::Reward => Extraction::Reward,
    };
    let mut acc = MetricsAccumulator::new(extraction);
    let n = qoq_eval::accumulate_file(&args.input, &mut acc)
        .with_context(|| format!("reading predictions {}", args.input.display()))?;
    tracing::info!(predictions = n, file = %args.input.display(), "metrics");
    let report = acc.finish();
    let text = match args.format {
        Format::Json => serde_json::to_string_pretty(&report.to_flat_json())? + "\n",
        Format::Markdown => report.to_markdown(),
        Format::Report => serde_json::to_string_pretty(&report)? + "\n",
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(std::process::ExitCode::SUCCESS)
}
