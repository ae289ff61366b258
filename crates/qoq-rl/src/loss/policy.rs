//! Clipped-surrogate policy loss and the actor loss (spec §10.1, §10.2, §10.3).
//!
//! Reference: `core_algos.py::compute_policy_loss` and the loss assembly of
//! `dp_actor.py::update_policy`:
//!
//! ```text
//! Δ = logπθ − logπold ;  ratio = exp(Δ) ;  clipped = exp(clamp(Δ, log(1−ε_low), log(1+ε_high)))
//! L1 = −A·ratio ; L2 = −A·clipped ; L3 = −A·c_dual
//! L_hi = max(L1, L2) ; L_lo = min(L_hi, L3) ; L = where(A < 0, L_lo, L_hi)
//! pg_loss = agg(L, mask)            (token-mean in the reference)
//! pg_clipfrac_higher = masked_mean(L1 < L2) ; pg_clipfrac_lower = masked_mean((L_hi > L3)·(A < 0))
//! ppo_kl = masked_mean(−Δ) ; entropy_loss = −masked_mean(logπθ)
//! actor loss = pg_loss + kl_coef·agg(compute_kl(logπθ, logπref), mask)   (use_kl_loss)
//! ```
//!
//! The trainer divides the returned loss by the gradient-accumulation count (spec §10.4).

use candle_core::Tensor;
use serde::Serialize;

use super::config::{KlEstimator, LossConfig, PolicyLossConfig};
use super::kl::compute_kl;
use super::ops::{agg_loss, clamp_with_grad, masked_mean, scalar_f64, to_compute};
use super::{LossError, Result, check_rank2, check_shape};

/// Lower bound of the cap on `Δ` inside the unclipped `ratio = exp(Δ)` (see [`compute_policy_loss`]).
const RATIO_LOG_CAP: f64 = 20.0;

/// The four `(b, t)` inputs of the surrogate. `log_probs` is the tensor gradients flow into;
/// `old_log_probs` and `advantages` are treated as constants.
#[derive(Debug, Clone, Copy)]
pub struct PolicyLossInputs<'a> {
    /// log π_old of the sampled tokens (rollout-time actor), `(b, t)`.
    pub old_log_probs: &'a Tensor,
    /// log π_θ of the sampled tokens from the training forward, `(b, t)`.
    pub log_probs: &'a Tensor,
    /// Token-level advantages, `(b, t)`.
    pub advantages: &'a Tensor,
    /// 1 for response tokens, 0 for padding, `(b, t)` (f32 or f64).
    pub response_mask: &'a Tensor,
}

/// Plain-number metrics of one loss call; names as logged by the reference (spec §12).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct PolicyLossMetrics {
    /// `actor/pg_loss`: the returned loss value (surrogate plus the KL term when there is one,
    /// as the reference logs it).
    pub pg_loss: f64,
    /// `actor/pg_clipfrac_higher`: token fraction with `L1 < L2`.
    pub pg_clipfrac_higher: f64,
    /// `actor/pg_clipfrac_lower`: token fraction cut by the dual clip (`L_hi > L3`, `A < 0`).
    pub pg_clipfrac_lower: f64,
    /// `actor/ppo_kl`: `masked_mean(logπold − logπθ)`.
    pub ppo_kl: f64,
    /// `actor/entropy_loss`: `−masked_mean(logπθ)`, the sampled-token entropy estimate.
    pub entropy_loss: f64,
    /// `actor/kl_loss`: the aggregated KL term before `kl_coef`, when the KL is a loss.
    pub kl_loss: Option<f64>,
    /// `actor/kl_coef`, when the KL is a loss.
    pub kl_coef: Option<f64>,
}

impl PolicyLossMetrics {
    /// `(name, value)` pairs with the reference's metric names.
    pub fn entries(&self) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("actor/pg_loss", self.pg_loss),
            ("actor/pg_clipfrac_higher", self.pg_clipfrac_higher),
            ("actor/pg_clipfrac_lower", self.pg_clipfrac_lower),
            ("actor/entropy_loss", self.entropy_loss),
            ("actor/ppo_kl", self.ppo_kl),
        ];
        if let Some(k) = self.kl_loss {
            v.push(("actor/kl_loss", k));
        }
        if let Some(c) = self.kl_coef {
            v.push(("actor/kl_coef", c));
        }
        v
    }
}

/// A scalar loss tensor (differentiable w.r.t. `log_probs`) and its metrics.
#[derive(Debug, Clone)]
pub struct PolicyLossOutput {
    /// Scalar loss, in f32 (f64 when the inputs are f64).
    pub loss: Tensor,
    /// Metrics as plain numbers.
    pub metrics: PolicyLossMetrics,
}

/// Clipped surrogate with clip-higher and dual clip (`compute_policy_loss`).
///
/// Numerics: the reference's unclipped `ratio = exp(Δ)` overflows for large `Δ` (f32: Δ > 88.7),
/// giving `0·inf = NaN` gradients, and a NaN loss where `A = 0`. Here `Δ` is capped at
/// `max(20, ln(c_dual) + 1, ln(1 + ε_high) + 1)` inside that `exp` only. Above the cap the
/// reference's loss no longer depends on the ratio (A > 0: the high clip holds; A < 0: the dual
/// clip holds; A = 0: zero), so values, metrics and gradients are identical wherever the
/// reference is finite, and finite where it is not.
///
/// An all-zero mask gives a loss of 0 (`0 / (0 + 1e-8)` for `token-mean`), zero gradients and
/// zero metrics, not NaN.
///
/// # Shapes
/// All inputs `(b, t)`; the loss is a scalar.
pub fn compute_policy_loss(
    inputs: &PolicyLossInputs<'_>,
    cfg: &PolicyLossConfig,
) -> Result<PolicyLossOutput> {
    cfg.validate()?;
    check_rank2("log_probs", inputs.log_probs)?;
    let dims = inputs.log_probs.dims();
    check_shape("old_log_probs", inputs.old_log_probs, dims)?;
    check_shape("advantages", inputs.advantages, dims)?;
    check_shape("response_mask", inputs.response_mask, dims)?;

    let lp = to_compute(inputs.log_probs)?;
    let dt = lp.dtype();
    let old = inputs.old_log_probs.detach().to_dtype(dt)?;
    let adv = inputs.advantages.detach().to_dtype(dt)?;
    let mask = inputs.response_mask.detach().to_dtype(dt)?;

    let delta = lp.sub(&old)?; // (b, t), negative_approx_kl
    let cap = RATIO_LOG_CAP
        .max(cfg.clip_ratio_dual.ln() + 1.0)
        .max((1.0 + cfg.clip_ratio_high).ln() + 1.0);
    let ratio = clamp_with_grad(&delta, f64::NEG_INFINITY, cap)?.exp()?;
    let clipped_ratio = clamp_with_grad(
        &delta,
        (1.0 - cfg.clip_ratio_low).ln(),
        (1.0 + cfg.clip_ratio_high).ln(),
    )?
    .exp()?;

    let neg_adv = adv.neg()?;
    let l1 = neg_adv.mul(&ratio)?; // (b, t)
    let l2 = neg_adv.mul(&clipped_ratio)?; // (b, t)
    let l3 = (&neg_adv * cfg.clip_ratio_dual)?; // (b, t), constant
    let l_hi = l1.maximum(&l2)?;
    let l_lo = l_hi.minimum(&l3)?;
    let negative = adv.lt(0.0)?; // u8
    let final_loss = negative.where_cond(&l_lo, &l_hi)?;

    let loss = agg_loss(&final_loss, &mask, cfg.loss_agg_mode, cfg.loss_scale_factor)?;

    let clip_hi = l1.lt(&l2)?.to_dtype(dt)?.detach();
    let clip_lo = l_hi
        .gt(&l3)?
        .to_dtype(dt)?
        .mul(&negative.to_dtype(dt)?)?
        .detach();
    let metrics = PolicyLossMetrics {
        pg_loss: scalar_f64(&loss)?,
        pg_clipfrac_higher: scalar_f64(&masked_mean(&clip_hi, &mask)?)?,
        pg_clipfrac_lower: scalar_f64(&masked_mean(&clip_lo, &mask)?)?,
        ppo_kl: scalar_f64(&masked_mean(&delta.detach().neg()?, &mask)?)?,
        entropy_loss: -scalar_f64(&masked_mean(&lp.detach(), &mask)?)?,
        kl_loss: None,
        kl_coef: None,
    };
    Ok(PolicyLossOutput { loss, metrics })
}

/// Where the KL loss term comes from.
#[derive(Debug, Clone, Copy)]
pub enum KlTerm<'a> {
    /// Reference-policy log-probs of the sampled tokens `(b, t)`; the configured estimator is
    /// applied to `(log_probs, ref)` (`full` is rejected: it needs vocabulary log-probs).
    RefLogProbs(&'a Tensor),
    /// A precomputed per-token KL `(b, t)`, e.g. [`super::full_kl_from_logits`]; it must be built
    /// from the same graph as `log_probs` for its gradient to reach the model.
    PerToken(&'a Tensor),
}

/// Inputs of [`compute_actor_loss`].
#[derive(Debug, Clone, Copy)]
pub struct ActorLossInputs<'a> {
    /// The surrogate's inputs.
    pub policy: PolicyLossInputs<'a>,
    /// The KL term; `None` when the batch has no reference log-probs.
    pub kl: Option<KlTerm<'a>>,
}

/// The actor's micro-batch loss (`dp_actor.py::update_policy` before the division by the
/// gradient-accumulation count): the surrogate, plus `kl_coef·agg(kld, mask)` when
/// `use_kl_loss && !disable_kl` and a KL term is given. The KL term is aggregated with the same
/// mode as the surrogate (`token-mean` in the reference).
pub fn compute_actor_loss(
    inputs: &ActorLossInputs<'_>,
    cfg: &LossConfig,
) -> Result<PolicyLossOutput> {
    cfg.validate()?;
    let mut out = compute_policy_loss(&inputs.policy, &cfg.policy)?;
    let Some(term) = inputs.kl.filter(|_| cfg.kl.kl_in_loss()) else {
        return Ok(out);
    };
    let p = &inputs.policy;
    let kld = match term {
        KlTerm::RefLogProbs(ref_lp) => {
            if cfg.kl.kl_penalty == KlEstimator::Full {
                return Err(LossError::InvalidConfig {
                    field: "kl_penalty",
                    reason: "`full` needs vocabulary log-probs; pass KlTerm::PerToken(full_kl_from_logits(..))"
                        .to_string(),
                });
            }
            compute_kl(p.log_probs, &ref_lp.detach(), cfg.kl.kl_penalty)?
        }
        KlTerm::PerToken(k) => {
            check_shape("kl", k, p.log_probs.dims())?;
            to_compute(k)?
        }
    };
    let dt = out.loss.dtype();
    let kld = kld.to_dtype(dt)?;
    let mask = p.response_mask.detach().to_dtype(dt)?;
    let kl_loss = agg_loss(
        &kld,
        &mask,
        cfg.policy.loss_agg_mode,
        cfg.policy.loss_scale_factor,
    )?;
    let loss = out.loss.add(&(&kl_loss * cfg.kl.kl_coef)?)?;
    out.metrics.kl_loss = Some(scalar_f64(&kl_loss)?);
    out.metrics.kl_coef = Some(cfg.kl.kl_coef);
    out.metrics.pg_loss = scalar_f64(&loss)?;
    out.loss = loss;
    Ok(out)
}
