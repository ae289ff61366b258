//! Numerical building blocks in two flavours.
//!
//! candle's fused `softmax_last_dim`, `rms_norm` and `layer_norm` kernels record **no gradient and
//! raise no error** when used under autograd. Every block therefore takes a [`ForwardMode`]:
//! [`ForwardMode::Train`] composes differentiable primitives, [`ForwardMode::Inference`] may use
//! the fused kernels. Tests assert both give the same values. On the CPU, Train mode's RMSNorm and
//! softmax are [`crate::fused`]'s differentiable kernels.

use candle_core::{D, DType, Result, Tensor};

/// The dtype a block computes in: f64 stays f64 (finite-difference checks), all else is f32.
pub fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Which implementation of the numerical blocks a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardMode {
    /// Differentiable composed ops (gradients flow through every op).
    Train,
    /// Fused kernels where candle has them (no gradients).
    #[default]
    Inference,
}

/// Softmax over the last dimension, computed in f32 (f64 for f64 input) and cast back to the input
/// dtype.
pub fn softmax_last_dim(x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    let y = if crate::fused::available(&x) {
        // The fused kernel on the CPU in both modes: candle's inference softmax calls `exp` on
        // masked logits too, whose underflow path dominated prefill attention (see `fused`).
        crate::fused::softmax_last_dim(&x, x.dtype())?
    } else {
        match mode {
            ForwardMode::Inference => candle_nn::ops::softmax_last_dim(&x)?,
            ForwardMode::Train => {
                let max = x.max_keepdim(D::Minus1)?.detach();
                let e = x.broadcast_sub(&max)?.exp()?;
                let s = e.sum_keepdim(D::Minus1)?;
                e.broadcast_div(&s)?
            }
        }
    };
    y.to_dtype(dtype)
}

/// Attention probabilities from raw scores: `softmax(masked_fill(scores · scale, !mask,
/// f32::MIN))` over the last dimension, computed in f32 (f64 for f64 scores) and cast back to the
/// scores' dtype. `scores: (b, heads, q, t)`, `mask: (b or 1, 1, s, t)` u8, 1 where query `i`
/// may see key `j`, with `q` a multiple of `s`: score row `r` of a head is query `r mod s`
/// (grouped-query attention's `n_rep` query heads stacked as `n_rep · s` rows against their
/// shared keys). Without a mask `scores` may have any shape. A query whose keys are all
/// masked attends uniformly (the reference's additive `finfo.min` mask), and masked scores pass
/// no gradient. On the CPU one differentiable fused op in both modes ([`crate::fused`]);
/// elsewhere the composed ops.
pub fn attention_probs(
    scores: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    mode: ForwardMode,
) -> Result<Tensor> {
    let dtype = scores.dtype();
    let work = compute_dtype(dtype);
    if crate::fused::available(scores) {
        return crate::fused::scaled_masked_softmax(scores, scale, mask, work)?.to_dtype(dtype);
    }
    let scaled = (scores * scale)?.to_dtype(work)?;
    let scaled = match mask {
        Some(m) => {
            let (b, h, q, t) = scaled.dims4()?;
            let s = m.dim(2)?;
            let rows = scaled.reshape((b, h * q / s, s, t))?;
            mask_scores(&rows, m)?.reshape((b, h, q, t))?
        }
        None => scaled,
    };
    softmax_last_dim(&scaled, mode)?.to_dtype(dtype)
}

/// Replace masked attention logits by the f32 minimum (`masked_fill`, as the reference's
/// additive `finfo.min` mask; f32's also for f64 logits: the value HF uses for f32 models).
fn mask_scores(scores: &Tensor, allowed: &Tensor) -> Result<Tensor> {
    let neg = Tensor::new(f64::from(f32::MIN), scores.device())?
        .to_dtype(scores.dtype())?
        .broadcast_as(scores.shape())?;
    allowed
        .broadcast_as(scores.shape())?
        .where_cond(scores, &neg)
}

/// A norm's scale (`weight`, one per feature) from `vb`: a fresh model (a `VarMap`-backed
/// builder) starts it at one, as PyTorch's `nn.LayerNorm` and `Qwen2RMSNorm` do; a loaded one
/// takes the file's. (A plain `vb.get` starts it at zero, which silences the normalised input:
/// a tower whose norms are zero passes nothing of its input on.)
pub fn norm_weight(vb: &candle_nn::VarBuilder, dim: usize, name: &str) -> Result<Tensor> {
    vb.get_with_hints(dim, name, candle_nn::Init::Const(1.0))
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`, in f32 (f64 for f64
/// input).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, mode: ForwardMode) -> Result<Tensor> {
    let dtype = x.dtype();
    let work = compute_dtype(dtype);
    match mode {
        ForwardMode::Inference => {
            let xf = x.to_dtype(work)?;
            let wf = weight.to_dtype(work)?;
            candle_nn::ops::rms_norm(&xf, &wf, eps as f32)?.to_dtype(dtype)
        }
        ForwardMode::Train if crate::fused::available(x) => {
            crate::fused::rms_norm(x, weight, eps, work)?.to_dtype(dtype)
        }
        ForwardMode::Train => {
            let xf = x.to_dtype(work)?;
            let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
            let y = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
            y.to_dtype(dtype)?.broadcast_mul(weight)
        }
    }
}

/// LayerNorm over the last dimension with affine weight and bias, in f32 (f64 for f64 input).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    mode: ForwardMode,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let work = compute_dtype(dtype);
    let xf = x.to_dtype(work)?;
    let wf = weight.to_dtype(work)?;
    let bf = bias.to_dtype(work)?;
    let y = match mode {
        ForwardMode::Inference => candle_nn::ops::layer_norm(&xf, &wf, &bf, eps as f32)?,
        ForwardMode::Train if crate::fused::available(&xf) => {
            crate::fused::layer_norm(&xf, &wf, &bf, eps, work)?
        }
        ForwardMode::Train => {
            let mean = xf.mean_keepdim(D::Minus1)?;
            let xc = xf.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            xc.broadcast_div(&(var + eps)?.sqrt()?)?
                .broadcast_mul(&wf)?
                .broadcast_add(&bf)?
        }
    };
    y.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn composed_and_fused_blocks_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (2, 5, 16), &dev)? + 1.0)?;
        let w = Tensor::randn(1f32, 0.1, 16, &dev)?;
        let b = Tensor::randn(0f32, 0.1, 16, &dev)?;
        let pairs = [
            (
                softmax_last_dim(&x, ForwardMode::Train)?,
                softmax_last_dim(&x, ForwardMode::Inference)?,
            ),
            (
                rms_norm(&x, &w, 1e-6, ForwardMode::Train)?,
                rms_norm(&x, &w, 1e-6, ForwardMode::Inference)?,
            ),
            (
                layer_norm(&x, &w, &b, 1e-5, ForwardMode::Train)?,
                layer_norm(&x, &w, &b, 1e-5, ForwardMode::Inference)?,
            ),
        ];
        for (a, f) in pairs {
            assert!(max_abs(&a, &f) < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn train_mode_blocks_propagate_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 8), &dev)?)?;
        let w = Var::from_tensor(&Tensor::ones(8, DType::F32, &dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros(8, DType::F32, &dev)?)?;
        let target = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        let y = softmax_last_dim(
            &layer_norm(
                &rms_norm(x.as_tensor(), w.as_tensor(), 1e-6, ForwardMode::Train)?,
                w.as_tensor(),
                b.as_tensor(),
                1e-5,
                ForwardMode::Train,
            )?,
            ForwardMode::Train,
        )?;
        let loss = (y * target)?.sum_all()?;
        let grads = loss.backward()?;
        for v in [&x, &w, &b] {
            let g = grads.get(v.as_tensor()).expect("gradient recorded");
            let n = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(n.is_finite() && n > 0.0, "gradient norm {n}");
        }
        Ok(())
    }
}
