//! `qoq data ...`: manifests and clinical files.

use anyhow::Context;
use clap::{Args, Subcommand};
use qoq_data::manifest::ManifestConfig;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Validate every row of a JSONL manifest (files exist and decode, labels present) and print
    /// a per-domain / per-dataset summary with where the rows' domains came from (their
    /// data_source/dataset keys or the <data_source>/<dataset>/<file> path layout; docs/manifest.md).
    /// Exits 1 when any row is bad, listing them by line.
    Check(CheckArgs),
    /// Convert CLIMB's LLaVA-style annotation_{split}.jsonl to the training schema
    /// (problem / answer / images). Bad rows are skipped and listed by line; exit 1 if any.
    Convert(ConvertArgs),
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// CLIMB annotation file (JSONL with images, conversations, label).
    pub input: PathBuf,
    /// Output manifest in the training schema.
    pub output: PathBuf,
    /// Prefix for every image path, e.g. `chest_xray` so paths read
    /// `<data_source>/<dataset>/...` relative to the output's folder.
    #[arg(long, default_value = "")]
    pub image_prefix: String,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The manifest (JSONL in the released schema; paths relative to its folder).
    pub manifest: PathBuf,
    /// Manifest reader options as a JSON object (key names, video_frames, ...), e.g.
    /// '{"prompt_key": "question"}'.
    #[arg(long)]
    pub config: Option<String>,
    /// ECG load options for arrays / CSV as a JSON object (fs, orientation, leads, npz_key,
    /// offset, gain, dicom_item), e.g. '{"fs": 500, "orientation": "samples_by_leads"}'.
    #[arg(long)]
    pub ecg: Option<String>,
    /// DICOM windowing: `file` (the file's window, else min-max), `minmax`, or
    /// `CENTER,WIDTH` in modality units (e.g. `-600,1500`).
    #[arg(long, default_value = "file", allow_hyphen_values = true)]
    pub window: String,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Also list every row's data_source/dataset and where they came from (keys, path, ...).
    #[arg(long)]
    pub rows: bool,
}

fn parse_window(s: &str) -> anyhow::Result<qoq_data::dicom::Windowing> {
    use qoq_data::dicom::Windowing;
    Ok(match s {
        "file" => Windowing::FromFile,
        "minmax" => Windowing::MinMax,
        _ => {
            let (c, w) = s
                .split_once(',')
                .context("--window must be `file`, `minmax` or CENTER,WIDTH")?;
            let center: f64 = c
                .trim()
                .parse()
                .context("--window centre is not a number")?;
            let width: f64 = w.trim().parse().context("--window width is not a number")?;
            anyhow::ensure!(width >= 1.0, "--window width must be at least 1");
            Windowing::Fixed { center, width }
        }
    })
}

pub fn run(cmd: DataCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DataCommand::Check(a) => check(a),
        DataCommand::Convert(a) => convert(a),
    }
}

fn convert(a: ConvertArgs) -> anyhow::Result<ExitCode> {
    let input = std::fs::File::open(&a.input)
        .with_context(|| format!("cannot open {}", a.input.display()))?;
    let output = std::fs::File::create(&a.output)
        .with_context(|| format!("cannot create {}", a.output.display()))?;
    let stats = qoq_data::convert::convert_climb(
        std::io::BufReader::new(input),
        &a.input,
        &a.image_prefix,
        std::io::BufWriter::new(output),
    )?;
    println!(
        "converted {} rows to {}, skipped {}",
        stats.converted,
        a.output.display(),
        stats.skipped.len()
    );
    for (line, reason) in &stats.skipped {
        println!("  {}:{line}: {reason}", a.input.display());
    }
    Ok(if stats.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let cfg: ManifestConfig = match &a.config {
        Some(js) => serde_json::from_str(js).context("--config is not a valid manifest config")?,
        None => ManifestConfig::default(),
    };
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} rows {per_sec}")
                .expect("static template"),
        );
        bar
    };
    let opts = qoq_data::check::CheckOptions {
        image: qoq_data::vision::ImageLoadOptions {
            windowing: parse_window(&a.window)?,
            video_frames: cfg.video_frames,
        },
        ecg: match &a.ecg {
            Some(js) => serde_json::from_str(js).context("--ecg is not valid ECG load options")?,
            None => Default::default(),
        },
        list_rows: a.rows,
    };
    let report = qoq_data::check::check_manifest_with(&a.manifest, cfg, &opts, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("checking {}", a.manifest.display()))?;
    bar.finish_and_clear();
    print!("{report}");
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
