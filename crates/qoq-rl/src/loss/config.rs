//! Loss and KL configuration (spec §10.1, §10.2, §11).
//!
//! Field names follow the reference's config keys (`verl/workers/actor/config.py::ActorConfig`,
//! `verl/trainer/config.py::AlgorithmConfig`). Defaults are the values the released 7B run used
//! (`examples/grpo_climb_engaging.yaml`, spec §11); where the reference dataclass default differs
//! from the yaml, the field's doc says so.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{LossError, Result};

/// How a `(b, t)` loss matrix is reduced to a scalar (verl `agg_loss`; the reference itself only
/// has `token-mean`, spec §10.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossAggMode {
    /// `Σ(L·m) / (Σm + 1e-8)` over every token of the micro-batch (the reference, spec §10.1).
    #[default]
    TokenMean,
    /// Mean over sequences of the per-sequence masked token sum.
    SeqMeanTokenSum,
    /// Mean over sequences of the per-sequence masked token mean (paper's `1/|o|` then group mean).
    SeqMeanTokenMean,
    /// Dr.GRPO: `Σ(L·m) / C` with a constant normaliser `C` (`loss_scale_factor`, or the padded
    /// response length `t` when unset, as verl does).
    SeqMeanTokenSumNorm,
}

impl LossAggMode {
    /// The config spelling (`token-mean`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokenMean => "token-mean",
            Self::SeqMeanTokenSum => "seq-mean-token-sum",
            Self::SeqMeanTokenMean => "seq-mean-token-mean",
            Self::SeqMeanTokenSumNorm => "seq-mean-token-sum-norm",
        }
    }

    /// Every mode, in declaration order.
    pub const ALL: [LossAggMode; 4] = [
        Self::TokenMean,
        Self::SeqMeanTokenSum,
        Self::SeqMeanTokenMean,
        Self::SeqMeanTokenSumNorm,
    ];
}

impl fmt::Display for LossAggMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LossAggMode {
    type Err = LossError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| LossError::UnknownName {
                what: "loss_agg_mode",
                name: s.to_string(),
            })
    }
}

/// Per-token KL estimator (`core_algos.py::compute_kl`, spec §10.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// k1: `logp − ref`.
    #[serde(alias = "k1")]
    Kl,
    /// `|logp − ref|`.
    Abs,
    /// k2: `0.5·(logp − ref)²`.
    #[serde(alias = "k2")]
    Mse,
    /// k3: `x = ref − logp; clamp(exp(x) − x − 1, −10, 10)` (the released configs' choice).
    #[default]
    #[serde(alias = "k3")]
    LowVarKl,
    /// Full-distribution KL `Σ_v exp(logp)(logp − ref)` over the last axis.
    Full,
}

impl KlEstimator {
    /// The config spelling (`kl`, `abs`, `mse`, `low_var_kl`, `full`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kl => "kl",
            Self::Abs => "abs",
            Self::Mse => "mse",
            Self::LowVarKl => "low_var_kl",
            Self::Full => "full",
        }
    }

    /// Every estimator, in declaration order.
    pub const ALL: [KlEstimator; 5] = [Self::Kl, Self::Abs, Self::Mse, Self::LowVarKl, Self::Full];
}

impl fmt::Display for KlEstimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KlEstimator {
    type Err = LossError;
    fn from_str(s: &str) -> Result<Self> {
        let alias = match s {
            "k1" => "kl",
            "k2" => "mse",
            "k3" => "low_var_kl",
            other => other,
        };
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == alias)
            .ok_or_else(|| LossError::UnknownName {
                what: "kl_penalty",
                name: s.to_string(),
            })
    }
}

/// KL coefficient controller kind (`core_algos.py::get_kl_controller`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlControllerKind {
    /// β stays constant.
    #[default]
    Fixed,
    /// Ziegler et al. proportional controller towards `kl_target` over `kl_horizon` rollouts.
    Adaptive,
}

/// Clipped-surrogate settings (`ActorConfig`, spec §10.1, §11).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyLossConfig {
    /// ε_low: the ratio is clipped below at `1 − clip_ratio_low`. Default 0.2.
    pub clip_ratio_low: f64,
    /// ε_high (clip-higher, DAPO): the ratio is clipped above at `1 + clip_ratio_high`. Default 0.3.
    pub clip_ratio_high: f64,
    /// Dual-clip constant c: for negative advantages the loss is capped at `−A·c`. Default 3.0.
    pub clip_ratio_dual: f64,
    /// Loss aggregation. Default `token-mean` (the only mode in the reference).
    pub loss_agg_mode: LossAggMode,
    /// Constant normaliser for `seq-mean-token-sum-norm`; unset (default) = the padded response
    /// length `t` of each call, as verl does.
    pub loss_scale_factor: Option<f64>,
}

impl Default for PolicyLossConfig {
    fn default() -> Self {
        Self {
            clip_ratio_low: 0.2,
            clip_ratio_high: 0.3,
            clip_ratio_dual: 3.0,
            loss_agg_mode: LossAggMode::TokenMean,
            loss_scale_factor: None,
        }
    }
}

impl PolicyLossConfig {
    /// Checks the ranges the formulas need: `0 ≤ ε_low < 1` (the log of `1 − ε_low` must be
    /// finite), `ε_high ≥ 0`, `c_dual ≥ 1`, a positive finite `loss_scale_factor`.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &'static str, reason: String| Err(LossError::InvalidConfig { field, reason });
        if !(self.clip_ratio_low >= 0.0 && self.clip_ratio_low < 1.0) {
            return bad(
                "clip_ratio_low",
                format!("{} is not in [0, 1)", self.clip_ratio_low),
            );
        }
        if !(self.clip_ratio_high >= 0.0 && self.clip_ratio_high.is_finite()) {
            return bad(
                "clip_ratio_high",
                format!("{} is not a finite value ≥ 0", self.clip_ratio_high),
            );
        }
        if !(self.clip_ratio_dual >= 1.0 && self.clip_ratio_dual.is_finite()) {
            return bad(
                "clip_ratio_dual",
                format!("{} is not a finite value ≥ 1", self.clip_ratio_dual),
            );
        }
        if let Some(c) = self.loss_scale_factor
            && !(c > 0.0 && c.is_finite())
        {
            return bad(
                "loss_scale_factor",
                format!("{c} is not a finite value > 0"),
            );
        }
        Ok(())
    }
}

/// KL-to-reference settings (`AlgorithmConfig`, spec §10.2, §11).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KlConfig {
    /// No reference policy at all: no KL loss, KL-in-reward coefficient 0. Default false.
    pub disable_kl: bool,
    /// KL as a loss term (true) or as a token-level reward penalty (false). Default true (yaml;
    /// the dataclass default is false).
    pub use_kl_loss: bool,
    /// Estimator. Default `low_var_kl` (yaml; the dataclass default is `kl`).
    pub kl_penalty: KlEstimator,
    /// β. Default 1e-4 (7B yaml; the bf16 yaml uses 1e-6, the dataclass default is 1e-3).
    pub kl_coef: f64,
    /// Controller. Default `fixed`.
    pub kl_type: KlControllerKind,
    /// Adaptive controller horizon (rollouts); must be > 0 for `adaptive`. Default 0.
    pub kl_horizon: f64,
    /// Adaptive controller target KL; must be > 0 for `adaptive`. Default 0.
    pub kl_target: f64,
}

impl Default for KlConfig {
    fn default() -> Self {
        Self {
            disable_kl: false,
            use_kl_loss: true,
            kl_penalty: KlEstimator::LowVarKl,
            kl_coef: 1e-4,
            kl_type: KlControllerKind::Fixed,
            kl_horizon: 0.0,
            kl_target: 0.0,
        }
    }
}

impl KlConfig {
    /// Checks `kl_coef ≥ 0` and, for `adaptive`, `kl_horizon > 0` (the reference asserts this) and
    /// `kl_target > 0` (the reference divides by it at the first update).
    pub fn validate(&self) -> Result<()> {
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            return Err(LossError::InvalidConfig {
                field: "kl_coef",
                reason: format!("{} is not a finite value ≥ 0", self.kl_coef),
            });
        }
        if self.kl_type == KlControllerKind::Adaptive {
            if !(self.kl_horizon > 0.0 && self.kl_horizon.is_finite()) {
                return Err(LossError::InvalidConfig {
                    field: "kl_horizon",
                    reason: format!("horizon must be larger than 0, got {}", self.kl_horizon),
                });
            }
            if !(self.kl_target > 0.0 && self.kl_target.is_finite()) {
                return Err(LossError::InvalidConfig {
                    field: "kl_target",
                    reason: format!("target must be larger than 0, got {}", self.kl_target),
                });
            }
        }
        Ok(())
    }

    /// Whether the actor loss gets a KL term (`use_kl_loss and not disable_kl`).
    pub fn kl_in_loss(&self) -> bool {
        self.use_kl_loss && !self.disable_kl
    }

    /// Whether the rewards get a KL penalty (a reference policy and `use_kl_loss = false`).
    pub fn kl_in_reward(&self) -> bool {
        !self.use_kl_loss && !self.disable_kl
    }
}

/// The `[loss]` section of a run file: policy surrogate and KL settings.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Clipped surrogate and aggregation.
    pub policy: PolicyLossConfig,
    /// KL to the reference policy.
    pub kl: KlConfig,
}

impl LossConfig {
    /// Validates both sections.
    pub fn validate(&self) -> Result<()> {
        self.policy.validate()?;
        self.kl.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_released_run_values() {
        let c = LossConfig::default();
        assert_eq!(
            (
                c.policy.clip_ratio_low,
                c.policy.clip_ratio_high,
                c.policy.clip_ratio_dual
            ),
            (0.2, 0.3, 3.0)
        );
        assert_eq!(c.policy.loss_agg_mode, LossAggMode::TokenMean);
        assert!(c.kl.use_kl_loss && !c.kl.disable_kl);
        assert_eq!(c.kl.kl_penalty, KlEstimator::LowVarKl);
        assert_eq!(c.kl.kl_coef, 1e-4);
        assert_eq!(c.kl.kl_type, KlControllerKind::Fixed);
        c.validate().unwrap();
    }

    #[test]
    fn config_parses_reference_spellings_and_rejects_unknown_keys() {
        let c: LossConfig = serde_json::from_str(
            r#"{"policy": {"loss_agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": 4000.0},
                "kl": {"kl_penalty": "k2", "kl_type": "adaptive", "kl_horizon": 10000.0, "kl_target": 0.1}}"#,
        )
        .unwrap();
        assert_eq!(c.policy.loss_agg_mode, LossAggMode::SeqMeanTokenSumNorm);
        assert_eq!(c.kl.kl_penalty, KlEstimator::Mse);
        assert_eq!(c.policy.clip_ratio_high, 0.3);
        c.validate().unwrap();
        let err = serde_json::from_str::<LossConfig>(r#"{"policy": {"clip_ratio": 0.2}}"#);
        assert!(err.unwrap_err().to_string().contains("clip_ratio"));
    }

    #[test]
    fn names_round_trip() {
        for m in LossAggMode::ALL {
            assert_eq!(m.as_str().parse::<LossAggMode>().unwrap(), m);
        }
        for k in KlEstimator::ALL {
            assert_eq!(k.as_str().parse::<KlEstimator>().unwrap(), k);
        }
        assert_eq!("k3".parse::<KlEstimator>().unwrap(), KlEstimator::LowVarKl);
        assert!("k4".parse::<KlEstimator>().is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let mut kl = KlConfig {
            kl_type: KlControllerKind::Adaptive,
            ..KlConfig::default()
        };
        let e = kl.validate().unwrap_err().to_string();
        assert!(e.contains("kl_horizon"), "{e}");
        kl.kl_horizon = 100.0;
        assert!(kl.validate().unwrap_err().to_string().contains("kl_target"));
        let p = PolicyLossConfig {
            clip_ratio_low: 1.0,
            ..PolicyLossConfig::default()
        };
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("clip_ratio_low")
        );
    }
}
