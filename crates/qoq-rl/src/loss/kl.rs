//! KL to the reference policy (spec §10.2).
//!
//! * [`compute_kl`]: `core_algos.py::compute_kl` (estimators `kl` k1, `abs`, `mse` k2,
//!   `low_var_kl` k3 clamped to ±10, `full`).
//! * [`full_kl_from_logits`]: the `full` estimator on two logits tensors, per token.
//! * [`KlController`]: `FixedKLController`, `AdaptiveKLController` and `get_kl_controller`.
//! * [`apply_kl_penalty`]: `ray_trainer.py::apply_kl_penalty` (KL as a token-level reward penalty).

use candle_core::{D, Tensor};
use serde::{Deserialize, Serialize};

use super::config::{KlConfig, KlControllerKind, KlEstimator};
use super::ops::{
    clamp_with_grad, log_softmax_last_dim, masked_mean_last_dim, scalar_f64, to_compute,
};
use super::{LossError, Result, check_rank2, check_shape};

/// Bound on `x = ref − logp` inside the k3 estimator's `exp`. Beyond ±20 the reference's k3 is
/// already clamped to 10 (`e^20 − 21 > 10`, `e^−20 + 19 > 10`) with a zero gradient, so capping
/// there changes no value or gradient wherever the reference is finite, and avoids the `0·inf`
/// NaN gradient that `exp` overflow gives (x > 88.7 in f32).
const K3_EXP_CAP: f64 = 20.0;

/// Bound of the reference's `torch.clamp(kld, min=-10, max=10)`.
const K3_CLAMP: f64 = 10.0;

/// Per-token KL between the policy and the reference policy (`compute_kl`).
///
/// Both inputs are cast to f32 (f64 kept), as the reference's `.float()`. The gradient flows to
/// both arguments (the reference log-probs normally carry none).
///
/// # Shapes
/// `log_probs`, `ref_log_probs`: the same shape `(..., n)`. Every estimator but `full` returns that
/// shape. `full` computes `Σ exp(logp)·(logp − ref)` over the **last** axis and so returns
/// `(...)`: on vocabulary log-probs `(b, t, v)` it is the per-token full KL `(b, t)`; on gathered
/// per-token log-probs `(b, t)` it sums over the sequence, exactly as the reference does (spec §10.2).
pub fn compute_kl(
    log_probs: &Tensor,
    ref_log_probs: &Tensor,
    estimator: KlEstimator,
) -> Result<Tensor> {
    check_shape("ref_log_probs", ref_log_probs, log_probs.dims())?;
    let lp = to_compute(log_probs)?;
    let rf = ref_log_probs.to_dtype(lp.dtype())?;
    let out = match estimator {
        KlEstimator::Kl => lp.sub(&rf)?,
        KlEstimator::Abs => {
            // d·sign(d): torch's |d| gradient (0 at d = 0; candle's abs gives 1 there).
            let d = lp.sub(&rf)?;
            d.mul(&d.sign()?.detach())?
        }
        KlEstimator::Mse => (lp.sub(&rf)?.sqr()? * 0.5)?,
        KlEstimator::LowVarKl => {
            let x = clamp_with_grad(&rf.sub(&lp)?, -K3_EXP_CAP, K3_EXP_CAP)?;
            let kld = ((x.exp()? - &x)? - 1.0)?;
            clamp_with_grad(&kld, -K3_CLAMP, K3_CLAMP)?
        }
        KlEstimator::Full => lp.exp()?.mul(&lp.sub(&rf)?)?.sum(D::Minus1)?,
    };
    Ok(out)
}

/// Per-token full-vocabulary KL(π ‖ π_ref) from two logits tensors:
/// `compute_kl(log_softmax(logits), log_softmax(ref_logits), "full")`.
///
/// # Shapes
/// `logits`, `ref_logits`: `(b, t, v)` → `(b, t)`.
pub fn full_kl_from_logits(logits: &Tensor, ref_logits: &Tensor) -> Result<Tensor> {
    check_shape("ref_logits", ref_logits, logits.dims())?;
    let lp = log_softmax_last_dim(logits)?;
    let rf = log_softmax_last_dim(ref_logits)?;
    compute_kl(&lp, &rf, KlEstimator::Full)
}

/// KL coefficient controller (`core_algos.py::KLController`); serialisable so a checkpoint can
/// carry the adaptive β.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum KlController {
    /// `FixedKLController`: β never changes.
    Fixed {
        /// β.
        kl_coef: f64,
    },
    /// `AdaptiveKLController` (Ziegler et al. 2019).
    Adaptive {
        /// Current β.
        kl_coef: f64,
        /// Target KL.
        target: f64,
        /// Horizon in rollouts.
        horizon: f64,
    },
}

impl KlController {
    /// `get_kl_controller`: the controller the config asks for; with `disable_kl` (no reference
    /// policy) the trainer's `FixedKLController(0)`. Validates the config first.
    pub fn from_config(cfg: &KlConfig) -> Result<Self> {
        cfg.validate()?;
        if cfg.disable_kl {
            return Ok(Self::disabled());
        }
        Ok(match cfg.kl_type {
            KlControllerKind::Fixed => Self::Fixed {
                kl_coef: cfg.kl_coef,
            },
            KlControllerKind::Adaptive => Self::Adaptive {
                kl_coef: cfg.kl_coef,
                target: cfg.kl_target,
                horizon: cfg.kl_horizon,
            },
        })
    }

    /// `FixedKLController(init_kl_coef=0.0)`, used when there is no reference policy.
    pub fn disabled() -> Self {
        Self::Fixed { kl_coef: 0.0 }
    }

    /// Current β.
    pub fn kl_coef(&self) -> f64 {
        match *self {
            Self::Fixed { kl_coef } | Self::Adaptive { kl_coef, .. } => kl_coef,
        }
    }

    /// `update(current_kl, n_steps)`: for `adaptive`,
    /// `e = clip(kl/target − 1, −0.2, 0.2); β ← β·(1 + e·n_steps/horizon)`; `fixed` does nothing.
    /// `n_steps` is the number of rollouts in the batch.
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        if let Self::Adaptive {
            kl_coef,
            target,
            horizon,
        } = self
        {
            let proportional_error = (current_kl / *target - 1.0).clamp(-0.2, 0.2);
            let mult = 1.0 + proportional_error * n_steps as f64 / *horizon;
            *kl_coef *= mult;
        }
    }
}

/// What [`apply_kl_penalty`] returns.
#[derive(Debug, Clone)]
pub struct KlPenaltyOutput {
    /// `token_level_scores − β·kld·mask`, `(b, t)`.
    pub token_level_rewards: Tensor,
    /// `critic/kl`: batch mean of the per-sequence masked mean of `kld·mask`.
    pub kl: f64,
    /// `critic/kl_coef`: the β that was applied (before the controller's update).
    pub kl_coef: f64,
}

/// Turns a per-token KL into penalised token-level rewards:
/// `token_level_scores − kl_coef·kld·response_mask` (the arithmetic of `apply_kl_penalty`, for
/// any per-token KL, e.g. [`full_kl_from_logits`]). Computed in f32 (f64 kept), returned in the
/// scores' dtype.
///
/// # Shapes
/// All three tensors `(b, t)`.
pub fn kl_penalized_rewards(
    token_level_scores: &Tensor,
    kld: &Tensor,
    response_mask: &Tensor,
    kl_coef: f64,
) -> Result<Tensor> {
    check_rank2("token_level_scores", token_level_scores)?;
    let dims = token_level_scores.dims();
    check_shape("kld", kld, dims)?;
    check_shape("response_mask", response_mask, dims)?;
    let kld = to_compute(&kld.detach())?;
    let mask = response_mask.to_dtype(kld.dtype())?;
    let scores = token_level_scores.to_dtype(kld.dtype())?;
    let penalty = (kld.mul(&mask)? * kl_coef)?;
    Ok(scores.sub(&penalty)?.to_dtype(token_level_scores.dtype())?)
}

/// KL as a token-level reward penalty (`ray_trainer.py::apply_kl_penalty`, used when
/// `use_kl_loss = false`): `rewards = scores − β·compute_kl(old, ref)·mask`, then the controller
/// is updated with the batch KL and `n_steps = b`.
///
/// # Shapes
/// `token_level_scores`, `old_log_probs`, `ref_log_probs`, `response_mask`: `(b, t)`.
/// The `full` estimator needs vocabulary log-probs, which this per-token API does not have; it is
/// rejected (compute [`full_kl_from_logits`] and subtract it yourself).
pub fn apply_kl_penalty(
    token_level_scores: &Tensor,
    old_log_probs: &Tensor,
    ref_log_probs: &Tensor,
    response_mask: &Tensor,
    estimator: KlEstimator,
    controller: &mut KlController,
) -> Result<KlPenaltyOutput> {
    let (b, _t) = check_rank2("token_level_scores", token_level_scores)?;
    let dims = token_level_scores.dims();
    check_shape("old_log_probs", old_log_probs, dims)?;
    check_shape("response_mask", response_mask, dims)?;
    if estimator == KlEstimator::Full {
        return Err(LossError::InvalidConfig {
            field: "kl_penalty",
            reason: "`full` needs vocabulary log-probs; per-token log-probs would sum over the \
                     sequence (use full_kl_from_logits)"
                .to_string(),
        });
    }
    let kld = compute_kl(&old_log_probs.detach(), &ref_log_probs.detach(), estimator)?; // (b, t)
    let mask = response_mask.to_dtype(kld.dtype())?;
    let beta = controller.kl_coef();
    let token_level_rewards = kl_penalized_rewards(token_level_scores, &kld, &mask, beta)?;
    let masked = kld.mul(&mask)?; // (b, t), the reference's `kld * response_mask`
    let current_kl = scalar_f64(&masked_mean_last_dim(&masked, &mask)?.mean_all()?)?;
    controller.update(current_kl, b);
    Ok(KlPenaltyOutput {
        token_level_rewards,
        kl: current_kl,
        kl_coef: beta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_controller_follows_the_reference_update_rule() {
        let mut c = KlController::Adaptive {
            kl_coef: 0.1,
            target: 0.05,
            horizon: 1000.0,
        };
        // kl twice the target: error clipped to +0.2, β·(1 + 0.2·640/1000).
        c.update(0.1, 640);
        assert!((c.kl_coef() - 0.1 * (1.0 + 0.2 * 0.64)).abs() < 1e-15);
        // kl at 0.9·target: error −0.1.
        let before = c.kl_coef();
        c.update(0.045, 100);
        assert!((c.kl_coef() - before * (1.0 - 0.1 * 0.1)).abs() < 1e-15);
        let mut f = KlController::Fixed { kl_coef: 1e-4 };
        f.update(10.0, 640);
        assert_eq!(f.kl_coef(), 1e-4);
    }

    #[test]
    fn controller_from_config_and_serde_round_trip() -> Result<()> {
        let cfg = KlConfig {
            kl_type: KlControllerKind::Adaptive,
            kl_horizon: 10000.0,
            kl_target: 0.1,
            ..KlConfig::default()
        };
        let c = KlController::from_config(&cfg)?;
        assert_eq!(
            c,
            KlController::Adaptive {
                kl_coef: 1e-4,
                target: 0.1,
                horizon: 10000.0
            }
        );
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<KlController>(&s).unwrap(), c);
        let off = KlController::from_config(&KlConfig {
            disable_kl: true,
            ..cfg
        })?;
        assert_eq!(off, KlController::disabled());
        assert!(
            KlController::from_config(&KlConfig {
                kl_horizon: 0.0,
                ..cfg
            })
            .is_err()
        );
        Ok(())
    }
}
