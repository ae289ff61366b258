//! `qoq reward`: score model responses with the QoQ medical reward (spec §8; reference
//! `examples/reward_function/medical.py::medical_compute_score`).
//!
//! Reads JSON Lines `{"response", "answer"[, "segmentation_path"][, "bbox"]}` (mask paths are
//! relative to the cases file's folder; non-zero pixels are foreground) and writes one JSON line
//! per case to stdout: `{"overall", "standard_score", "iou_score", "format_score",
//! "length_score"}`. Cases are scored in parallel; output order is input order.

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use qoq_reward::{
    Compat, IouReduce, MaskIndex, MedicalConfig, QoqMedicalReward, WeightPreset, WeightsConfig,
};
use rayon::prelude::*;
use serde::Deserialize;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `--compat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompatArg {
    /// The released code to the last digit, defects included.
    Reference,
    /// Defects fixed (default).
    Fixed,
}

/// `--iou-reduce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IouReduceArg {
    /// Mean over predicted boxes (code).
    Mean,
    /// Best box (paper); needs `--compat fixed`.
    Max,
}

/// `--weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightsArg {
    /// 0.5 / 0.3 / 0.1 / 0.1 (released code).
    Code,
    /// 0.6 / 0.2 / 0.2 / 0 (paper).
    Paper,
    /// 0.5 / 0.3 / 0.2 / 0 (early code history).
    EarlyCode,
}

/// Arguments of `qoq reward`.
#[derive(Debug, Args)]
pub struct RewardArgs {
    /// Cases file: JSON Lines with `response`, `answer` and optional `segmentation_path`, `bbox`.
    #[arg(long)]
    pub input: PathBuf,
    /// Semantics: the released code (`reference`) or defects fixed (`fixed`).
    #[arg(long, value_enum, default_value_t = CompatArg::Fixed)]
    pub compat: CompatArg,
    /// IoU over several predicted boxes.
    #[arg(long, value_enum, default_value_t = IouReduceArg::Mean)]
    pub iou_reduce: IouReduceArg,
    /// Component weights preset.
    #[arg(long, value_enum, default_value_t = WeightsArg::Code)]
    pub weights: WeightsArg,
}

#[derive(Debug, Deserialize)]
struct Case {
    response: String,
    answer: String,
    #[serde(default)]
    segmentation_path: Option<PathBuf>,
    #[serde(default)]
    bbox: Option<[f64; 4]>,
}

/// Run `qoq reward`.
pub fn run(args: RewardArgs) -> anyhow::Result<std::process::ExitCode> {
    let cfg = MedicalConfig {
        compat: match args.compat {
            CompatArg::Reference => Compat::Reference,
            CompatArg::Fixed => Compat::Fixed,
        },
        iou_reduce: match args.iou_reduce {
            IouReduceArg::Mean => IouReduce::Mean,
            IouReduceArg::Max => IouReduce::Max,
        },
        weights: WeightsConfig::Preset(match args.weights {
            WeightsArg::Code => WeightPreset::Code,
            WeightsArg::Paper => WeightPreset::Paper,
            WeightsArg::EarlyCode => WeightPreset::EarlyCode,
        }),
    };
    let reward = QoqMedicalReward::new(cfg)?;
    let (cases, masks) = read_cases(&args.input)?;
    let _span = tracing::info_span!("reward", cases = cases.len()).entered();
    let scores: Vec<_> = cases
        .par_iter()
        .zip(masks.par_iter())
        .map(|(c, m)| reward.score_parts(&c.response, &c.answer, m.as_deref(), c.bbox))
        .collect();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for s in scores {
        let row = serde_json::json!({
            "overall": s.overall,
            "standard_score": s.standard_score,
            "iou_score": s.iou_score,
            "format_score": s.format_score,
            "length_score": s.length_score,
        });
        writeln!(out, "{row}")?;
    }
    out.flush()?;
    tracing::info!(cases = masks.len(), file = %args.input.display(), "scored");
    Ok(std::process::ExitCode::SUCCESS)
}

type Masks = Vec<Option<Arc<MaskIndex>>>;

/// Parse every line (errors name the file and line) and load each distinct mask once.
fn read_cases(path: &Path) -> anyhow::Result<(Vec<Case>, Masks)> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening cases file {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut cache: HashMap<PathBuf, Arc<MaskIndex>> = HashMap::new();
    let (mut cases, mut masks) = (Vec::new(), Vec::new());
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        let line = line.with_context(|| format!("{}: reading", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let case: Case =
            serde_json::from_str(&line).with_context(|| format!("{}: malformed case", at()))?;
        if let Some(b) = case.bbox
            && b.iter().any(|v| !v.is_finite())
        {
            bail!("{}: bbox {b:?} has a non-finite coordinate", at());
        }
        let mask = match &case.segmentation_path {
            None => None,
            Some(p) => {
                let full = base.join(p);
                if let Some(m) = cache.get(&full) {
                    Some(m.clone())
                } else {
                    let m = qoq_reward::load_mask_image(&full)
                        .with_context(|| format!("{}: segmentation_path", at()))?;
                    let m = Arc::new(MaskIndex::new(&m));
                    cache.insert(full, m.clone());
                    Some(m)
                }
            }
        };
        cases.push(case);
        masks.push(mask);
    }
    Ok((cases, masks))
}
