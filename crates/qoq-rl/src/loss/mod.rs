//! Policy loss, KL and aggregation (spec §10), differentiable candle ops.
//!
//! Reference: `verl/trainer/core_algos.py::{compute_policy_loss, compute_kl, KLController,
//! get_kl_controller}`, `verl/trainer/ray_trainer.py::apply_kl_penalty`,
//! `verl/workers/actor/dp_actor.py::update_policy` and `verl/utils/torch_functional.py::masked_mean`
//! of the released QoQ-Med code (EasyR1 v0.3.0 fork), plus verl's `agg_loss` modes and
//! `entropy_from_logits` for the switches the reference lacks.
//!
//! * [`policy`]: clipped surrogate with clip-higher and dual clip, metrics, the actor loss
//!   (surrogate + KL loss term).
//! * [`kl`]: per-token KL estimators, full-vocabulary KL from logits, fixed/adaptive KL
//!   controllers, KL as a token-level reward penalty.
//! * [`ops`]: masked mean, loss aggregation, composed log-softmax, log-probs of chosen tokens,
//!   entropy from logits.
//! * [`value`]: the critic's clipped value loss (PPO with GAE).
//! * [`config`]: serde configs with the reference's defaults (spec §11).
//!
//! Every function that a gradient must pass through is built from candle primitives that record
//! a backward op (no fused softmax kernels). Tensors are `(b, t)` (`(b, t, v)` for logits); f32 and
//! f64 are computed in their own precision, half types are upcast to f32 as the reference's
//! `.float()` does. Masks are 0/1 float tensors.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use qoq_rl::loss::{ActorLossInputs, KlTerm, LossConfig, PolicyLossInputs, compute_actor_loss};
//!
//! # fn main() -> qoq_rl::loss::Result<()> {
//! let dev = Device::Cpu;
//! let old = Tensor::new(&[[-1.0f32, -0.5, -2.0]], &dev)?;
//! let log_probs = Var::new(&[[-0.8f32, -0.6, -2.0]], &dev)?; // from the training forward
//! let reference = Tensor::new(&[[-1.1f32, -0.5, -1.9]], &dev)?;
//! let advantages = Tensor::new(&[[0.7f32, 0.7, 0.7]], &dev)?;
//! let mask = Tensor::new(&[[1.0f32, 1.0, 0.0]], &dev)?;
//! let out = compute_actor_loss(
//!     &ActorLossInputs {
//!         policy: PolicyLossInputs {
//!             old_log_probs: &old,
//!             log_probs: log_probs.as_tensor(),
//!             advantages: &advantages,
//!             response_mask: &mask,
//!         },
//!         kl: Some(KlTerm::RefLogProbs(&reference)),
//!     },
//!     &LossConfig::default(),
//! )?;
//! let grads = out.loss.backward()?; // gradient w.r.t. log_probs (and the model behind it)
//! assert!(grads.get(log_probs.as_tensor()).is_some());
//! // the first token's ratio exp(0.2) = 1.22 is inside [0.8, 1.3]: nothing clipped
//! assert_eq!(out.metrics.pg_clipfrac_higher, 0.0);
//! for (name, value) in out.metrics.entries() {
//!     println!("{name} = {value}");
//! }
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod kl;
pub mod ops;
pub mod policy;
pub mod value;

pub use config::{
    KlConfig, KlControllerKind, KlEstimator, LossAggMode, LossConfig, PolicyLossConfig,
};
pub use kl::{
    KlController, KlPenaltyOutput, apply_kl_penalty, compute_kl, full_kl_from_logits,
    kl_penalized_rewards,
};
pub use ops::{
    agg_loss, check_labels, entropy_from_logits, log_probs_from_logits, log_softmax_last_dim,
    masked_mean, masked_mean_last_dim, mean_entropy_from_logits,
};
pub use policy::{
    ActorLossInputs, KlTerm, PolicyLossInputs, PolicyLossMetrics, PolicyLossOutput,
    compute_actor_loss, compute_policy_loss,
};
pub use value::{ValueLossInputs, ValueLossMetrics, ValueLossOutput, compute_value_loss};

/// Errors of the loss module.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// A tensor operation failed.
    #[error("tensor op failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// An input tensor has the wrong shape.
    #[error("`{name}` has shape {got:?}, expected {expected}")]
    Shape {
        /// Argument name.
        name: &'static str,
        /// Its shape.
        got: Vec<usize>,
        /// What was expected, in words.
        expected: String,
    },
    /// A configuration value is out of range.
    #[error("invalid loss config field `{field}`: {reason}")]
    InvalidConfig {
        /// Config field name.
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// An unknown name for an enum-valued setting.
    #[error("unknown {what} `{name}`")]
    UnknownName {
        /// Setting name.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// A label id is outside the vocabulary.
    #[error("label id {id} is out of range for a vocabulary of {vocab}")]
    LabelOutOfRange {
        /// Largest label id found.
        id: u64,
        /// Vocabulary size (last logits dim).
        vocab: usize,
    },
}

/// Result type of the loss module.
pub type Result<T> = std::result::Result<T, LossError>;

/// Fails unless `t` has exactly `expected` as its shape.
pub(crate) fn check_shape(
    name: &'static str,
    t: &candle_core::Tensor,
    expected: &[usize],
) -> Result<()> {
    if t.dims() != expected {
        return Err(LossError::Shape {
            name,
            got: t.dims().to_vec(),
            expected: format!("{expected:?}"),
        });
    }
    Ok(())
}

/// Fails unless `t` is a `(b, t)` matrix; returns its dims.
pub(crate) fn check_rank2(name: &'static str, t: &candle_core::Tensor) -> Result<(usize, usize)> {
    match t.dims() {
        &[b, n] => Ok((b, n)),
        d => Err(LossError::Shape {
            name,
            got: d.to_vec(),
            expected: "a (batch, response_length) matrix".to_string(),
        }),
    }
}
