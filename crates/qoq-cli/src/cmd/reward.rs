//! `qoq reward`: score model responses with the QoQ medical reward (spec §8; reference
//! `examples/reward_function/medical.py::medical_compute_score`).
//!
//! Reads JSON Lines `{"response", "answer"[, "segmentation_path"][, "bbox"][, "views"]}` (mask
//! paths are relative to the cases file's folder; non-zero pixels are foreground; `views` is the
//! number of frames of one volume the response's boxes refer to, for the coherence reward) and
//! writes one JSON line per case to stdout: `{"overall", "standard_score", "iou_score",
//! "format_score", "length_score"[, "coherence_score"]}`. Cases are scored in parallel; output
//! order is input order. `--preset paper` is the paper's reward (`MedicalConfig::paper`).

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use qoq_reward::{
    Compat, FormatReward, IouReduce, MaskIndex, MedicalConfig, QoqMedicalReward, WeightPreset,
    Weights, WeightsConfig,
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

/// `--weights`: a preset name (`code` 0.5/0.3/0.1/0.1, `paper` 0.6/0.2/0.2/0, `early-code`
/// 0.5/0.3/0.2/0) or four numbers `ACCURACY,IOU,FORMAT,LENGTH`.
fn parse_weights(s: &str) -> Result<WeightsConfig, String> {
    match s {
        "code" => return Ok(WeightsConfig::Preset(WeightPreset::Code)),
        "paper" => return Ok(WeightsConfig::Preset(WeightPreset::Paper)),
        "early-code" | "early_code" => return Ok(WeightsConfig::Preset(WeightPreset::EarlyCode)),
        _ => {}
    }
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            format!("`{s}`: expected code, paper, early-code or ACCURACY,IOU,FORMAT,LENGTH")
        })?;
    let [accuracy, iou, format, length] = v[..] else {
        return Err(format!(
            "`{s}`: expected four weights ACCURACY,IOU,FORMAT,LENGTH"
        ));
    };
    Ok(WeightsConfig::Explicit(Weights {
        accuracy,
        iou,
        format,
        length,
    }))
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// The released code's graded JSON-box score (default).
    GradedJson,
    /// The paper's binary reward: 1 when every predicted label has a box; needs `--compat fixed`.
    BoxPerLabel,
}

/// `--preset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    /// The paper's reward: 0.6 F1 + 0.2 IoU of the best box + 0.2 binary box-per-label format,
    /// no length term (`--compat fixed --iou-reduce max --weights paper --format box-per-label`).
    Paper,
}

/// Arguments of `qoq reward`.
#[derive(Debug, Args)]
pub struct RewardArgs {
    /// Cases file: JSON Lines with `response`, `answer` and optional `segmentation_path`, `bbox`,
    /// `views` (frames of one volume, for the coherence reward).
    #[arg(long)]
    pub input: PathBuf,
    /// A whole reward configuration; excludes the other scoring flags.
    #[arg(
        long,
        value_enum,
        conflicts_with_all = ["compat", "iou_reduce", "weights", "format", "coherence_weight"]
    )]
    pub preset: Option<PresetArg>,
    /// Semantics: the released code (`reference`) or defects fixed (`fixed`).
    #[arg(long, value_enum, default_value_t = CompatArg::Fixed)]
    pub compat: CompatArg,
    /// IoU over several predicted boxes.
    #[arg(long, value_enum, default_value_t = IouReduceArg::Mean)]
    pub iou_reduce: IouReduceArg,
    /// Component weights: `code` (0.5/0.3/0.1/0.1), `paper` (0.6/0.2/0.2/0), `early-code`
    /// (0.5/0.3/0.2/0) or `ACCURACY,IOU,FORMAT,LENGTH`.
    #[arg(long, value_parser = parse_weights, default_value = "code")]
    pub weights: WeightsConfig,
    /// The format component.
    #[arg(long, value_enum, default_value_t = FormatArg::GradedJson)]
    pub format: FormatArg,
    /// Weight of the paper's visual-coherence reward across the frames of one volume (0: off);
    /// the weights plus this one must sum to at most 1 (e.g. `--weights 0.6,0.2,0.1,0
    /// --coherence-weight 0.1`).
    #[arg(long, default_value_t = 0.0)]
    pub coherence_weight: f64,
}

#[derive(Debug, Deserialize)]
struct Case {
    response: String,
    answer: String,
    #[serde(default)]
    segmentation_path: Option<PathBuf>,
    #[serde(default)]
    bbox: Option<[f64; 4]>,
    #[serde(default)]
    views: usize,
}

/// Run `qoq reward`.
pub fn run(args: RewardArgs) -> anyhow::Result<std::process::ExitCode> {
    let cfg = match args.preset {
        Some(PresetArg::Paper) => MedicalConfig::paper(),
        None => flag_config(&args),
    };
    let reward = QoqMedicalReward::new(cfg)?;
    let (cases, masks) = read_cases(&args.input)?;
    let _span = tracing::info_span!("reward", cases = cases.len()).entered();
    let scores: Vec<_> = cases
        .par_iter()
        .zip(masks.par_iter())
        .map(|(c, m)| {
            reward.score_parts_views(&c.response, &c.answer, m.as_deref(), c.bbox, c.views)
        })
        .collect();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for s in scores {
        let mut row = serde_json::json!({
            "overall": s.overall,
            "standard_score": s.standard_score,
            "iou_score": s.iou_score,
            "format_score": s.format_score,
            "length_score": s.length_score,
        });
        for (k, v) in &s.extra {
            row[k] = serde_json::json!(v);
        }
        writeln!(out, "{row}")?;
    }
    out.flush()?;
    tracing::info!(cases = masks.len(), file = %args.input.display(), "scored");
    Ok(std::process::ExitCode::SUCCESS)
}

/// The configuration the individual flags describe.
fn flag_config(args: &RewardArgs) -> MedicalConfig {
    MedicalConfig {
        compat: match args.compat {
            CompatArg::Reference => Compat::Reference,
            CompatArg::Fixed => Compat::Fixed,
        },
        iou_reduce: match args.iou_reduce {
            IouReduceArg::Mean => IouReduce::Mean,
            IouReduceArg::Max => IouReduce::Max,
        },
        weights: args.weights,
        format: match args.format {
            FormatArg::GradedJson => FormatReward::GradedJson,
            FormatArg::BoxPerLabel => FormatReward::BoxPerLabel,
        },
        coherence_weight: args.coherence_weight,
    }
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
