//! The `RewardFn` plugin trait, its serde-tagged config enum and the `weighted` combinator.

use crate::error::{Error, Result};
use crate::iou::MaskIndex;
use crate::medical::{MedicalConfig, QoqMedicalReward};
use crate::text::standard_score;
use qoq_core::{ClinicalSample, RewardScore};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// What a reward sees of one rollout: the response and the **whole** sample (answer, domain,
/// dataset, bbox, extra manifest fields), plus the sample's mask prepared once per group.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    /// The decoded response text.
    pub response: &'a str,
    /// The sample the response answers.
    pub sample: &'a ClinicalSample,
    /// The sample's segmentation mask, prepared for IoU queries.
    pub mask: Option<&'a MaskIndex>,
}

/// A reward function. Implementations are total: any response gives a finite `overall` in
/// [0, 1] and never panics.
pub trait RewardFn: Send + Sync {
    /// Short name, used as a prefix of component names by combinators.
    fn name(&self) -> &str;

    /// Score one rollout.
    fn score(&self, input: &RewardInput<'_>) -> RewardScore;

    /// Score many rollouts in parallel (rayon); output order equals input order.
    fn score_batch(&self, inputs: &[RewardInput<'_>]) -> Vec<RewardScore> {
        inputs.par_iter().map(|i| self.score(i)).collect()
    }
}

impl RewardFn for QoqMedicalReward {
    fn name(&self) -> &str {
        "qoq_medical"
    }

    fn score(&self, input: &RewardInput<'_>) -> RewardScore {
        self.score_parts_views(
            input.response,
            &input.sample.answer,
            input.mask,
            input.sample.bbox,
            crate::paper::coherence_views(input.sample),
        )
    }
}

/// `medical.py::medical_standard_score`: `overall = 0.5·F1` (defined in the release, unused by
/// its configs).
#[derive(Debug, Clone, Copy, Default)]
pub struct MedicalStandard;

impl RewardFn for MedicalStandard {
    fn name(&self) -> &str {
        "medical_standard"
    }

    fn score(&self, input: &RewardInput<'_>) -> RewardScore {
        let f1 = standard_score(input.response, &input.sample.answer);
        RewardScore {
            overall: 0.5 * f1,
            standard_score: f1,
            ..RewardScore::default()
        }
    }
}

/// A sum of rewards with weights. `overall = Σ wᵢ·overallᵢ`; the medical components are the
/// weighted sums of the parts' components; every part's components are also reported in
/// `extra` as `"{part name}/{component}"`.
pub struct Weighted {
    parts: Vec<(f64, String, Box<dyn RewardFn>)>,
}

impl std::fmt::Debug for Weighted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.parts.iter().map(|(w, n, _)| (w, n)))
            .finish()
    }
}

impl RewardFn for Weighted {
    fn name(&self) -> &str {
        "weighted"
    }

    fn score(&self, input: &RewardInput<'_>) -> RewardScore {
        let mut out = RewardScore::default();
        for (w, name, r) in &self.parts {
            let s = r.score(input);
            out.overall += w * s.overall;
            out.standard_score += w * s.standard_score;
            out.iou_score += w * s.iou_score;
            out.format_score += w * s.format_score;
            out.length_score += w * s.length_score;
            for (k, v) in s.components() {
                out.extra.insert(format!("{name}/{k}"), v);
            }
        }
        out.overall = if out.overall.is_finite() {
            out.overall.clamp(0.0, 1.0)
        } else {
            0.0
        };
        out
    }
}

/// One weighted part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedPart {
    /// Weight (finite, >= 0; the weights of a `weighted` reward sum to at most 1).
    pub weight: f64,
    /// Name used in component keys; defaults to `"{index}_{type}"`.
    #[serde(default)]
    pub name: Option<String>,
    /// The part's reward.
    pub reward: RewardConfig,
}

/// Builds a reward: `#[serde(tag = "type")]`, e.g. `{"type": "qoq_medical", "compat":
/// "reference"}` or `{"type": "weighted", "parts": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RewardConfig {
    /// [`QoqMedicalReward`].
    QoqMedical(MedicalConfig),
    /// [`MedicalStandard`].
    MedicalStandard,
    /// [`Weighted`].
    Weighted {
        /// The parts.
        parts: Vec<WeightedPart>,
    },
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig::QoqMedical(MedicalConfig::default())
    }
}

impl RewardConfig {
    /// Build the reward, validating weights.
    pub fn build(&self) -> Result<Box<dyn RewardFn>> {
        Ok(match self {
            RewardConfig::QoqMedical(c) => Box::new(QoqMedicalReward::new(*c)?),
            RewardConfig::MedicalStandard => Box::new(MedicalStandard),
            RewardConfig::Weighted { parts } => {
                let mut built = Vec::with_capacity(parts.len());
                let mut sum = 0.0;
                for (i, p) in parts.iter().enumerate() {
                    if !p.weight.is_finite() || p.weight < 0.0 {
                        return Err(Error::Config(format!(
                            "weighted part {i}: weight must be finite and >= 0, got {}",
                            p.weight
                        )));
                    }
                    sum += p.weight;
                    let r = p.reward.build()?;
                    let name = p
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("{i}_{}", r.name()));
                    built.push((p.weight, name, r));
                }
                if sum > 1.0 + 1e-9 {
                    return Err(Error::Config(format!(
                        "weighted parts' weights sum to {sum} > 1, the total would leave [0, 1]"
                    )));
                }
                Box::new(Weighted { parts: built })
            }
        })
    }
}
