//! `qoq synth`: write the synthetic clinical world (the embedded default data) to a directory.

use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory (created; existing files with the same names are overwritten).
    #[arg(long)]
    out: PathBuf,
    /// A JSON file with a `WorldConfig` (any subset of its fields); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Master seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Side of every image and volume slice in pixels.
    #[arg(long)]
    image_size: Option<usize>,
    /// Training rows of the largest domain.
    #[arg(long)]
    largest_domain_rows: Option<usize>,
    /// Largest : rarest domain ratio of training rows.
    #[arg(long)]
    domain_imbalance: Option<f64>,
    /// Test rows per class per dataset.
    #[arg(long)]
    test_per_class: Option<usize>,
}

pub fn run(a: SynthArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => qoq_synth::WorldConfig::default(),
    };
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.image_size {
        cfg.image_size = v;
    }
    if let Some(v) = a.largest_domain_rows {
        cfg.largest_domain_rows = v;
    }
    if let Some(v) = a.domain_imbalance {
        cfg.domain_imbalance = v;
    }
    if let Some(v) = a.test_per_class {
        cfg.test_per_class = v;
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let started = std::time::Instant::now();
    let summary = qoq_synth::generate(&cfg, &a.out)
        .with_context(|| format!("writing the synthetic world to {}", a.out.display()))?;
    println!("| domain | dataset | train rows per class | test rows |");
    println!("|---|---|---|---|");
    for d in &summary.datasets {
        let per_class: Vec<String> = d
            .train
            .labels
            .iter()
            .zip(&d.train.counts)
            .map(|(l, n)| format!("{l}: {n}"))
            .collect();
        println!(
            "| {} | {} | {} | {} |",
            d.data_source,
            d.dataset,
            per_class.join(", "),
            d.test.counts.iter().sum::<usize>()
        );
    }
    eprintln!(
        "wrote {}/train.jsonl and test.jsonl in {:.1} s",
        a.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
