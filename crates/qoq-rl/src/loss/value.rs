//! The critic's clipped value loss (spec §9.5; reference `core_algos.py::compute_value_loss`):
//!
//! ```text
//! V_clip = clamp(V, V_old − c, V_old + c)
//! vf_loss = 0.5 · masked_mean(max((V − R)², (V_clip − R)²), mask)        (token-mean)
//! vf_clipfrac = masked_mean((V − R)² < (V_clip − R)²) ; vpred_mean = masked_mean(V)
//! ```
//!
//! `V` are the critic's predictions (the tensor gradients flow into), `V_old` its values when the
//! rollouts were scored, `R` the returns of GAE, `c = critic.cliprange_value` (0.5). The clamp
//! passes the gradient inside the bounds (inclusive) and none outside, as `torch.clamp`; a tie
//! of the two squares splits the gradient in halves, as `torch.max`.

use candle_core::Tensor;
use serde::Serialize;

use super::ops::{masked_mean, scalar_f64, to_compute};
use super::{LossError, Result, check_rank2, check_shape};

/// The four `(b, t)` inputs of [`compute_value_loss`].
#[derive(Debug, Clone, Copy)]
pub struct ValueLossInputs<'a> {
    /// The critic's predictions from the training forward, `(b, t)`.
    pub vpreds: &'a Tensor,
    /// The critic's values at scoring time (constants), `(b, t)`.
    pub old_values: &'a Tensor,
    /// Regression targets (GAE returns, constants), `(b, t)`.
    pub returns: &'a Tensor,
    /// 1 for response tokens, 0 for padding, `(b, t)`.
    pub response_mask: &'a Tensor,
}

/// Metrics of one value-loss call, named as the reference logs them (`critic/...`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct ValueLossMetrics {
    /// `critic/vf_loss`.
    pub vf_loss: f64,
    /// `critic/vf_clipfrac`: token fraction where the clipped square is the larger.
    pub vf_clipfrac: f64,
    /// `critic/vpred_mean`.
    pub vpred_mean: f64,
}

impl ValueLossMetrics {
    /// `(name, value)` pairs with the reference's metric names.
    pub fn entries(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("critic/vf_loss", self.vf_loss),
            ("critic/vf_clipfrac", self.vf_clipfrac),
            ("critic/vpred_mean", self.vpred_mean),
        ]
    }
}

/// A scalar value loss (differentiable w.r.t. `vpreds`) and its metrics.
#[derive(Debug, Clone)]
pub struct ValueLossOutput {
    /// Scalar loss, f32 (f64 for f64 inputs).
    pub loss: Tensor,
    /// Metrics as plain numbers.
    pub metrics: ValueLossMetrics,
}

/// `compute_value_loss` with token-mean aggregation.
///
/// # Shapes
/// All inputs `(b, t)`; the loss is a scalar.
pub fn compute_value_loss(
    inputs: &ValueLossInputs<'_>,
    cliprange_value: f64,
) -> Result<ValueLossOutput> {
    if !(cliprange_value > 0.0 && cliprange_value.is_finite()) {
        return Err(LossError::InvalidConfig {
            field: "cliprange_value",
            reason: format!("{cliprange_value} is not a finite value > 0"),
        });
    }
    check_rank2("vpreds", inputs.vpreds)?;
    let dims = inputs.vpreds.dims();
    check_shape("old_values", inputs.old_values, dims)?;
    check_shape("returns", inputs.returns, dims)?;
    check_shape("response_mask", inputs.response_mask, dims)?;
    let v = to_compute(inputs.vpreds)?;
    let dt = v.dtype();
    let old = inputs.old_values.detach().to_dtype(dt)?;
    let ret = inputs.returns.detach().to_dtype(dt)?;
    let mask = inputs.response_mask.detach().to_dtype(dt)?;
    let lo = (&old - cliprange_value)?;
    let hi = (&old + cliprange_value)?;
    // clamp(V, lo, hi) with torch's gradient: 1 inside [lo, hi], 0 outside.
    let inside = v.ge(&lo)?.mul(&v.le(&hi)?)?; // u8, (b, t)
    let clamped = v.detach().maximum(&lo)?.minimum(&hi)?;
    let v_clip = inside.where_cond(&v, &clamped)?; // (b, t)
    let l1 = v.sub(&ret)?.sqr()?; // (b, t)
    let l2 = v_clip.sub(&ret)?.sqr()?; // (b, t)
    let worst = l1.maximum(&l2)?; // (b, t)
    let loss = (masked_mean(&worst, &mask)? * 0.5)?;
    let clipfrac = l1.lt(&l2)?.to_dtype(dt)?.detach();
    let metrics = ValueLossMetrics {
        vf_loss: scalar_f64(&loss)?,
        vf_clipfrac: scalar_f64(&masked_mean(&clipfrac, &mask)?)?,
        vpred_mean: scalar_f64(&masked_mean(&v.detach(), &mask)?)?,
    };
    Ok(ValueLossOutput { loss, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn unclipped_predictions_give_half_the_masked_squared_error_and_its_gradient() {
        let dev = Device::Cpu;
        let v = Var::new(&[[1.0f64, 2.0, 5.0]], &dev).unwrap();
        let old = Tensor::new(&[[1.1f64, 2.2, 0.0]], &dev).unwrap();
        let ret = Tensor::new(&[[0.0f64, 3.0, 0.0]], &dev).unwrap();
        let mask = Tensor::new(&[[1.0f64, 1.0, 0.0]], &dev).unwrap();
        let out = compute_value_loss(
            &ValueLossInputs {
                vpreds: v.as_tensor(),
                old_values: &old,
                returns: &ret,
                response_mask: &mask,
            },
            0.5,
        )
        .unwrap();
        // tokens 0, 1 inside the clip range: 0.5 · (1 + 1) / 2
        assert!((out.metrics.vf_loss - 0.5).abs() < 1e-7);
        let g: Vec<Vec<f64>> = out
            .loss
            .backward()
            .unwrap()
            .get(v.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        // d/dV of 0.5 · (V − R)² / 2 = (V − R) / 2; masked token: 0
        assert!((g[0][0] - 0.5).abs() < 1e-7 && (g[0][1] + 0.5).abs() < 1e-7);
        assert_eq!(g[0][2], 0.0);
        assert!(
            compute_value_loss(
                &ValueLossInputs {
                    vpreds: v.as_tensor(),
                    old_values: &old,
                    returns: &ret,
                    response_mask: &mask,
                },
                0.0,
            )
            .is_err()
        );
    }
}
