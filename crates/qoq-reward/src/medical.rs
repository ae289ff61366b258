//! The QoQ medical reward, `examples/reward_function/medical.py::medical_compute_score`
//! (spec §8): `w_acc·F1 + w_iou·IoU + w_fmt·format + w_len·length (+ w_coh·coherence)` with
//! every component reported.
//!
//! Two modes ([`Compat`]): `reference` reproduces the released function to the last digit,
//! defects included (IoU 0 whenever a malformed box raises or two boxes meet a ground-truth box
//! without a mask; mean over boxes; float32 arithmetic when the mask branch ran); `fixed` (the
//! default) scores each box on its own, works for any number of boxes, and offers
//! `iou_reduce = "max"` (the paper's best box), `format = "box_per_label"` (the paper's binary
//! format reward) and `coherence_weight` (the paper's visual-coherence reward), both in
//! [`crate::paper`]. [`MedicalConfig::paper`] is the paper's reward: `0.6·F1 + 0.2·IoU (best box)
//! + 0.2·format (binary)`, no length term.

use crate::error::{Error, Result};
use crate::format::format_score_cached;
use crate::iou::{
    IouReduce, MaskIndex, RefIou, collect_bboxes, extract_json_cached, fixed_iou, reference_iou,
};
use crate::paper::{FormatReward, box_per_label_score, coherence_score, coherence_views};
use crate::text::standard_score;
use qoq_core::{ClinicalSample, RewardScore, SegMask};
use serde::{Deserialize, Serialize};

/// Which semantics the reward follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compat {
    /// The released code, bit for bit, defects included.
    Reference,
    /// Defects fixed (see the module docs).
    #[default]
    Fixed,
}

/// Component weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    /// Weight of the answer F1 (`standard_score`).
    pub accuracy: f64,
    /// Weight of the box IoU.
    pub iou: f64,
    /// Weight of the JSON-bbox format score.
    pub format: f64,
    /// Weight of the length score.
    pub length: f64,
}

impl Weights {
    /// The released code's weights 0.5 / 0.3 / 0.1 / 0.1.
    pub const CODE: Weights = Weights {
        accuracy: 0.5,
        iou: 0.3,
        format: 0.1,
        length: 0.1,
    };
    /// The paper's `(λ_acc, λ_IoU, λ_aux) = (0.6, 0.2, 0.2)`, the auxiliary weight on the format
    /// score (the paper has no length term).
    pub const PAPER: Weights = Weights {
        accuracy: 0.6,
        iou: 0.2,
        format: 0.2,
        length: 0.0,
    };
    /// The [DEV] history's 0.5 / 0.3 / 0.2 without a length term (2025-04-26..05-03).
    pub const EARLY_CODE: Weights = Weights {
        accuracy: 0.5,
        iou: 0.3,
        format: 0.2,
        length: 0.0,
    };
}

impl Default for Weights {
    fn default() -> Self {
        Weights::CODE
    }
}

/// Named weight presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightPreset {
    /// [`Weights::CODE`].
    Code,
    /// [`Weights::PAPER`].
    Paper,
    /// [`Weights::EARLY_CODE`].
    EarlyCode,
}

/// Weights as a preset name (`weights = "paper"`) or explicit values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WeightsConfig {
    /// A named preset.
    Preset(WeightPreset),
    /// Explicit weights.
    Explicit(Weights),
}

impl Default for WeightsConfig {
    fn default() -> Self {
        WeightsConfig::Preset(WeightPreset::Code)
    }
}

impl WeightsConfig {
    /// The resolved weights.
    pub fn resolve(&self) -> Weights {
        match self {
            WeightsConfig::Preset(WeightPreset::Code) => Weights::CODE,
            WeightsConfig::Preset(WeightPreset::Paper) => Weights::PAPER,
            WeightsConfig::Preset(WeightPreset::EarlyCode) => Weights::EARLY_CODE,
            WeightsConfig::Explicit(w) => *w,
        }
    }
}

/// Configuration of [`QoqMedicalReward`] (TOML section `[reward]` with `type = "qoq_medical"`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MedicalConfig {
    /// `reference` (the released code, bit-exact) or `fixed` (default).
    pub compat: Compat,
    /// IoU over several boxes: `mean` (code) or `max` (paper). Only `mean` in reference mode.
    pub iou_reduce: IouReduce,
    /// Component weights: a preset (`code`, `paper`, `early_code`) or explicit values.
    pub weights: WeightsConfig,
    /// The format component: `graded_json` (the code's graded score, default) or
    /// `box_per_label` (the paper's binary reward). Only `graded_json` in reference mode.
    pub format: FormatReward,
    /// Weight of the paper's visual-coherence reward across the frames of one volume (default
    /// 0: off). The component weights plus this one sum to at most 1. Only 0 in reference mode.
    pub coherence_weight: f64,
}

impl MedicalConfig {
    /// The released function's configuration.
    pub fn reference() -> Self {
        Self {
            compat: Compat::Reference,
            ..Self::default()
        }
    }

    /// The paper's reward (Sec. 3.4, App. B.3): weights 0.6 / 0.2 / 0.2 on F1, IoU of the best
    /// box and the binary box-per-label format reward, no length term, no coherence term.
    pub fn paper() -> Self {
        Self {
            compat: Compat::Fixed,
            iou_reduce: IouReduce::Max,
            weights: WeightsConfig::Preset(WeightPreset::Paper),
            format: FormatReward::BoxPerLabel,
            coherence_weight: 0.0,
        }
    }
}

/// The QoQ medical reward.
#[derive(Debug, Clone)]
pub struct QoqMedicalReward {
    cfg: MedicalConfig,
    weights: Weights,
}

impl QoqMedicalReward {
    /// Check the configuration: weights finite, non-negative, summing to at most 1 (so the total
    /// stays in [0, 1]); reference mode needs `iou_reduce = "mean"`.
    pub fn new(cfg: MedicalConfig) -> Result<Self> {
        let w = cfg.weights.resolve();
        let ws = [w.accuracy, w.iou, w.format, w.length, cfg.coherence_weight];
        if ws.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(Error::Config(format!(
                "qoq_medical weights must be finite and >= 0, got {w:?}, coherence_weight {}",
                cfg.coherence_weight
            )));
        }
        if ws.iter().sum::<f64>() > 1.0 + 1e-9 {
            return Err(Error::Config(format!(
                "qoq_medical weights (with coherence_weight) sum to {} > 1, the total would leave [0, 1]",
                ws.iter().sum::<f64>()
            )));
        }
        if cfg.compat == Compat::Reference && cfg.format != FormatReward::GradedJson {
            return Err(Error::Config(
                "compat = \"reference\" scores the graded JSON format; format = \"box_per_label\" needs compat = \"fixed\"".into(),
            ));
        }
        if cfg.compat == Compat::Reference && cfg.coherence_weight != 0.0 {
            return Err(Error::Config(
                "compat = \"reference\" has no coherence reward; coherence_weight > 0 needs compat = \"fixed\"".into(),
            ));
        }
        if cfg.compat == Compat::Reference && cfg.iou_reduce != IouReduce::Mean {
            return Err(Error::Config(
                "compat = \"reference\" reduces IoU by mean; iou_reduce = \"max\" needs compat = \"fixed\"".into(),
            ));
        }
        Ok(Self { cfg, weights: w })
    }

    /// The configuration.
    pub fn config(&self) -> &MedicalConfig {
        &self.cfg
    }

    /// Score one response against the sample's answer and its mask (if any) or `sample.bbox`.
    pub fn score(
        &self,
        response: &str,
        sample: &ClinicalSample,
        mask: Option<&SegMask>,
    ) -> RewardScore {
        let idx = mask.map(MaskIndex::new);
        self.score_parts_views(
            response,
            &sample.answer,
            idx.as_ref(),
            sample.bbox,
            coherence_views(sample),
        )
    }

    /// Score from the parts the reference function takes: response, ground-truth answer,
    /// prepared mask and ground-truth box (no views for the coherence reward).
    pub fn score_parts(
        &self,
        response: &str,
        answer: &str,
        mask: Option<&MaskIndex>,
        gt_bbox: Option<[f64; 4]>,
    ) -> RewardScore {
        self.score_parts_views(response, answer, mask, gt_bbox, 0)
    }

    /// [`QoqMedicalReward::score_parts`] with the number of frames of one volume the response's
    /// boxes refer to, for the coherence reward ([`coherence_views`]; 0 or 1: none).
    pub fn score_parts_views(
        &self,
        response: &str,
        answer: &str,
        mask: Option<&MaskIndex>,
        gt_bbox: Option<[f64; 4]>,
        views: usize,
    ) -> RewardScore {
        let standard = standard_score(response, answer);
        let (graded, memo) = format_score_cached(response);
        // characters (Python's len); a UTF-8 character has at most 4 bytes
        let n_chars = if response.len() > 4 * 600 {
            response.len()
        } else {
            response.chars().count()
        };
        let length = if n_chars > 600 {
            1.0
        } else {
            n_chars as f64 * 0.001
        };
        let json = extract_json_cached(response, memo);
        let json = match &json {
            Ok(Some(v)) if v.truthy() => Some(v),
            _ => None,
        };
        let pred = json.map(collect_bboxes).unwrap_or_default();
        let format = match self.cfg.format {
            FormatReward::GradedJson => graded,
            FormatReward::BoxPerLabel => box_per_label_score(response, json),
        };
        let coherence = if self.cfg.coherence_weight > 0.0 {
            Some(coherence_score(json, views))
        } else {
            None
        };
        let w = &self.weights;
        let (iou, overall) = match self.cfg.compat {
            Compat::Reference => {
                let iou = if pred.is_empty() {
                    RefIou::Float(0.0)
                } else {
                    reference_iou(&pred, mask, gt_bbox).unwrap_or(RefIou::Float(0.0))
                };
                let overall = match iou {
                    RefIou::Float(v) => {
                        w.accuracy * standard + w.iou * v + w.format * format + w.length * length
                    }
                    // float32 tensor arithmetic: each Python float is cast to float32 first
                    RefIou::F32(v) => {
                        let t = (w.accuracy * standard) as f32 + (w.iou as f32) * v;
                        let t = t + (w.format * format) as f32;
                        (t + (w.length * length) as f32) as f64
                    }
                };
                (iou.value(), overall)
            }
            Compat::Fixed => {
                let iou = fixed_iou(&pred, mask, gt_bbox, self.cfg.iou_reduce);
                let coh = self.cfg.coherence_weight * coherence.unwrap_or(0.0);
                (
                    iou,
                    w.accuracy * standard
                        + w.iou * iou
                        + w.format * format
                        + w.length * length
                        + coh,
                )
            }
        };
        let finite01 = |v: f64| {
            if v.is_finite() {
                v.clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        RewardScore {
            overall: finite01(overall),
            standard_score: finite01(standard),
            iou_score: finite01(iou),
            format_score: finite01(format),
            length_score: finite01(length),
            extra: coherence
                .map(|c| [("coherence_score".to_string(), finite01(c))].into())
                .unwrap_or_default(),
        }
    }
}
