//! Differentiable building blocks of the loss (spec §10.1, §10.3, §10.4).
//!
//! * [`masked_mean`]: `verl/utils/torch_functional.py::masked_mean` (`Σ(x·m) / (Σm + 1e-8)`).
//! * [`agg_loss`]: verl `core_algos.py::agg_loss` modes (the reference only uses `token-mean`).
//! * [`log_softmax_last_dim`], [`log_probs_from_logits`]: composed `x − logsumexp(x)` plus a
//!   gather; the reference's `log_probs_from_logits` (`F.cross_entropy(logits.float(), labels)`).
//! * [`entropy_from_logits`]: verl's `logsumexp(x) − Σ softmax(x)·x`.
//!
//! candle's fused `softmax`/`log_softmax` kernels record no gradient, so everything here is
//! composed from primitives that do. The row maximum used for stability is detached: the results
//! are invariant to that shift, so the gradient is exact.

use candle_core::{D, DType, Tensor};

use super::config::LossAggMode;
use super::{LossError, Result, check_rank2, check_shape};

/// The `eps` of the reference's `masked_mean` denominator.
pub const MASKED_MEAN_EPS: f64 = 1e-8;

/// The dtype the loss is computed in: f64 stays f64, everything else becomes f32 (the reference
/// casts to `.float()`).
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Casts to [`compute_dtype`] (a no-op that keeps the graph when the dtype already matches).
pub(crate) fn to_compute(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(compute_dtype(x.dtype()))?)
}

/// Reads a scalar tensor as f64.
pub(crate) fn scalar_f64(x: &Tensor) -> Result<f64> {
    Ok(x.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// `clamp(x, lo, hi)` with torch's gradient: 1 where `lo ≤ x ≤ hi` (bounds inclusive), 0 outside.
/// (candle's `clamp` is `maximum`/`minimum`, which halves the gradient on a tie with a bound.)
pub fn clamp_with_grad(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let inside = x.ge(lo)?.mul(&x.le(hi)?)?; // u8, (same shape as x)
    let clamped = x.detach().clamp(lo, hi)?;
    Ok(inside.where_cond(x, &clamped)?)
}

/// Masked mean over all elements: `Σ(values·mask) / (Σmask + 1e-8)` (scalar tensor).
///
/// An all-zero mask gives `0 / 1e-8 = 0` (not NaN) with a zero gradient, as in the reference.
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_shape("mask", mask, values.dims())?;
    let mask = mask.to_dtype(values.dtype())?;
    let num = values.mul(&mask)?.sum_all()?;
    let den = (mask.sum_all()? + MASKED_MEAN_EPS)?;
    Ok(num.div(&den)?)
}

/// Masked mean along the last axis, `(b, t) → (b,)`, with the same `+1e-8` denominator
/// (`masked_mean(values, mask, dim=-1)`).
pub fn masked_mean_last_dim(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_shape("mask", mask, values.dims())?;
    let mask = mask.to_dtype(values.dtype())?;
    let num = values.mul(&mask)?.sum(D::Minus1)?; // (b,)
    let den = (mask.sum(D::Minus1)? + MASKED_MEAN_EPS)?; // (b,)
    Ok(num.div(&den)?)
}

/// Reduces a `(b, t)` loss matrix to a scalar (verl `agg_loss`).
///
/// * `token-mean`: [`masked_mean`].
/// * `seq-mean-token-sum`: `mean_b Σ_t L·m`.
/// * `seq-mean-token-mean`: `mean_b (Σ_t L·m / max(Σ_t m, 1))`. verl divides by `Σ_t m` alone,
///   which is NaN for a row with no response token; the `max(·, 1)` makes such a row count as 0
///   and is identical for every row with at least one token of a 0/1 mask.
/// * `seq-mean-token-sum-norm` (Dr.GRPO): `Σ L·m / C`, `C = scale_factor` or, when `None`, the
///   padded length `t` (verl's `loss_mask.shape[-1]`).
pub fn agg_loss(
    loss_mat: &Tensor,
    mask: &Tensor,
    mode: LossAggMode,
    scale_factor: Option<f64>,
) -> Result<Tensor> {
    let (_b, t) = check_rank2("loss_mat", loss_mat)?;
    check_shape("response_mask", mask, loss_mat.dims())?;
    let mask = mask.to_dtype(loss_mat.dtype())?;
    match mode {
        LossAggMode::TokenMean => masked_mean(loss_mat, &mask),
        LossAggMode::SeqMeanTokenSum => Ok(loss_mat.mul(&mask)?.sum(D::Minus1)?.mean_all()?),
        LossAggMode::SeqMeanTokenMean => {
            let sums = loss_mat.mul(&mask)?.sum(D::Minus1)?; // (b,)
            let counts = mask.sum(D::Minus1)?.maximum(1.0)?; // (b,)
            Ok(sums.div(&counts)?.mean_all()?)
        }
        LossAggMode::SeqMeanTokenSumNorm => {
            let c = scale_factor.unwrap_or(t as f64);
            Ok((loss_mat.mul(&mask)?.sum_all()? / c)?)
        }
    }
}

/// Composed log-softmax over the last axis, in f32 (f64 kept): `x − max − log Σ exp(x − max)`.
pub fn log_softmax_last_dim(logits: &Tensor) -> Result<Tensor> {
    let x = to_compute(logits)?;
    let max = x.max_keepdim(D::Minus1)?.detach(); // (..., 1)
    let shifted = x.broadcast_sub(&max)?; // (..., v)
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (..., 1)
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Checks that `labels` are token ids of a `vocab`-token vocabulary: an integer tensor (u8, u32
/// or i64) whose every value is in `0..vocab`.
pub fn check_labels(labels: &Tensor, vocab: usize) -> Result<()> {
    if !matches!(labels.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Err(LossError::Shape {
            name: "labels",
            got: labels.dims().to_vec(),
            expected: format!("an integer tensor (u8, u32, i64), got {:?}", labels.dtype()),
        });
    }
    if labels.elem_count() > 0 {
        let as_i64 = labels.to_dtype(DType::I64)?.flatten_all()?;
        let max = as_i64.max(0)?.to_scalar::<i64>()?;
        let min = as_i64.min(0)?.to_scalar::<i64>()?;
        if min < 0 || max as u64 >= vocab as u64 {
            let id = if min < 0 { min as u64 } else { max as u64 };
            return Err(LossError::LabelOutOfRange { id, vocab });
        }
    }
    Ok(())
}

/// Log-probabilities of the chosen tokens: `log_softmax(logits)[..., labels]`.
///
/// # Shapes
/// `logits`: `(b, t, v)`, `labels`: `(b, t)` of an integer dtype (u8, u32 or i64) → `(b, t)`.
/// Scale the logits by `1/temperature` first where the sampler used one (spec §16: the training
/// forward uses temperature 1.0).
pub fn log_probs_from_logits(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let dims = logits.dims();
    if dims.len() < 2 {
        return Err(LossError::Shape {
            name: "logits",
            got: dims.to_vec(),
            expected: "(..., vocab)".to_string(),
        });
    }
    let vocab = dims[dims.len() - 1];
    check_shape("labels", labels, &dims[..dims.len() - 1])?;
    check_labels(labels, vocab)?;
    let x = to_compute(logits)?;
    if qoq_model::fused::available(&x) {
        // One pass per row, without the (b, t, v) log-softmax (same values and gradient).
        return Ok(qoq_model::fused::chosen_log_probs(&x, labels)?);
    }
    let logp = log_softmax_last_dim(&x)?; // (b, t, v)
    let idx = labels.unsqueeze(D::Minus1)?.contiguous()?; // (b, t, 1)
    Ok(logp
        .contiguous()?
        .gather(&idx, D::Minus1)?
        .squeeze(D::Minus1)?)
}

/// Entropy of the categorical distribution given by `logits` over the last axis:
/// `logsumexp(x) − Σ softmax(x)·x` (verl `entropy_from_logits`), composed, in f32 (f64 kept).
///
/// # Shapes
/// `(..., v)` → `(...)`.
pub fn entropy_from_logits(logits: &Tensor) -> Result<Tensor> {
    let x = to_compute(logits)?;
    let max = x.max_keepdim(D::Minus1)?.detach(); // (..., 1)
    let shifted = x.broadcast_sub(&max)?; // (..., v)
    let e = shifted.exp()?;
    let s = e.sum_keepdim(D::Minus1)?; // (..., 1)
    let p = e.broadcast_div(&s)?; // (..., v)
    // logsumexp(x) − Σp·x = log s − Σ p·(x − max), since Σp = 1.
    let lse = s.log()?.squeeze(D::Minus1)?; // (...)
    let expected = p.mul(&shifted)?.sum(D::Minus1)?; // (...)
    Ok(lse.sub(&expected)?)
}

/// Token-mean entropy of the policy over the response, `masked_mean(entropy_from_logits, mask)`,
/// as a plain number (a diagnostic; the reference logs only the sampled-token estimate).
pub fn mean_entropy_from_logits(logits: &Tensor, response_mask: &Tensor) -> Result<f64> {
    let ent = entropy_from_logits(&logits.detach())?; // (b, t)
    scalar_f64(&masked_mean(&ent, response_mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn clamp_with_grad_passes_gradient_at_the_bounds_only_inside() -> Result<()> {
        let x = Var::new(&[-2.0f64, -1.0, 0.0, 1.0, 2.0], &Device::Cpu)?;
        let y = clamp_with_grad(x.as_tensor(), -1.0, 1.0)?;
        assert_eq!(y.to_vec1::<f64>()?, vec![-1.0, -1.0, 0.0, 1.0, 1.0]);
        let g = y.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).unwrap().to_vec1::<f64>()?;
        assert_eq!(gx, vec![0.0, 1.0, 1.0, 1.0, 0.0]);
        Ok(())
    }

    #[test]
    fn log_softmax_matches_candle_fused_kernel() -> Result<()> {
        let x = Tensor::randn(0f32, 3.0, (2, 3, 11), &Device::Cpu)?;
        let a = log_softmax_last_dim(&x)?;
        let b = candle_nn::ops::log_softmax(&x, D::Minus1)?;
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn entropy_of_uniform_logits_is_log_vocab() -> Result<()> {
        let x = Tensor::zeros((2, 3, 7), DType::F64, &Device::Cpu)?;
        for h in entropy_from_logits(&x)?.flatten_all()?.to_vec1::<f64>()? {
            assert!((h - 7f64.ln()).abs() < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn out_of_range_labels_are_rejected() -> Result<()> {
        let x = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu)?;
        let l = Tensor::new(&[[0u32, 4]], &Device::Cpu)?;
        assert!(matches!(
            log_probs_from_logits(&x, &l),
            Err(LossError::LabelOutOfRange { id: 4, vocab: 4 })
        ));
        Ok(())
    }
}
