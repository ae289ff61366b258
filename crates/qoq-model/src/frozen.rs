//! A linear layer over a frozen weight that back-propagates to its input only.
//!
//! candle's matrix product computes, in the backward, the gradient of both factors, and keeps
//! the gradient of a factor that is not a variable (a frozen weight: LoRA's base, a frozen LLM
//! under a trained tower) in the gradient store until the backward ends: a weight-sized tensor
//! per frozen matrix and one matrix product per layer for nothing. [`linear`] runs the product
//! as a custom op on the input alone, whose backward gives the input's gradient `g · W`; the
//! weight is captured by the op and gets no gradient. Written here because candle has no
//! "no gradient for this operand" switch. CPU only; elsewhere, and whenever the weight is
//! tracked or the input is not, the plain product runs.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Storage, Tensor};
use candle_nn::Linear;

/// `x · Wᵀ (+ b)` of `lin` (see the module docs for when the frozen path runs).
pub fn linear(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    let w = lin.weight();
    let frozen = !w.track_op() && x.track_op() && x.device().is_cpu() && w.device().is_cpu();
    if !frozen {
        return lin.forward(x);
    }
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / k.max(1);
    let x2 = x.reshape((rows, k))?.contiguous()?;
    let y = x2.apply_op1(FrozenMatmul { w: w.clone() })?;
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = w.dim(0)?;
    }
    let y = y.reshape(out_dims)?;
    match lin.bias() {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x (rows, in) → x · Wᵀ (rows, out)` with `W: (out, in)` frozen.
struct FrozenMatmul {
    w: Tensor,
}

/// A CPU tensor holding a copy of `(s, l)` (contiguous).
fn tensor_of(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("frozen linear: a non-contiguous input");
    };
    let shape = l.shape().clone();
    let dev = Device::Cpu;
    Ok(match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], shape, &dev)?,
        CpuStorage::F64(v) => Tensor::from_slice(&v[a..b], shape, &dev)?,
        CpuStorage::BF16(v) => Tensor::from_slice(&v[a..b], shape, &dev)?,
        CpuStorage::F16(v) => Tensor::from_slice(&v[a..b], shape, &dev)?,
        _ => candle_core::bail!("frozen linear: an integer input"),
    })
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "qoq-frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = tensor_of(s, l)?;
        let w = if self.w.dtype() == x.dtype() {
            self.w.clone()
        } else {
            self.w.to_dtype(x.dtype())?
        };
        let y = x.matmul(&w.t()?)?.contiguous()?;
        let shape = y.shape().clone();
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cpu(c) = &*storage else {
            candle_core::bail!("frozen linear: the product left the CPU");
        };
        if layout.start_offset() != 0 {
            candle_core::bail!("frozen linear: unexpected product storage");
        }
        Ok((c.clone(), shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w = if self.w.dtype() == x.dtype() {
            self.w.clone()
        } else {
            self.w.to_dtype(x.dtype())?
        };
        Ok(Some(grad.to_dtype(x.dtype())?.matmul(&w)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    /// The input's gradient equals the plain product's, the forward too, and the frozen weight
    /// (and its transpose) get no entry in the gradient store.
    #[test]
    fn the_input_gets_the_plain_gradient_and_the_weight_none() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let b = Tensor::randn(0f32, 1.0, 5, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let lin = Linear::new(w.clone(), Some(b));
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (2, 4, 3), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let g = Tensor::randn(0f32, 1.0, (2, 4, 5), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let plain = candle_core::Module::forward(&lin, x.as_tensor()).unwrap();
            let ours = linear(&lin, x.as_tensor()).unwrap();
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            assert!(diff(&plain, &ours) < 1e-5, "{dtype:?}");
            let gp = (plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (
                gp.get(x.as_tensor()).unwrap(),
                go.get(x.as_tensor()).unwrap(),
            );
            assert!(diff(a, b) < 1e-5, "{dtype:?}");
            // The plain product holds a weight-sized gradient for the frozen factor; ours none.
            let weight_sized = |gs: &candle_core::backprop::GradStore| {
                gs.get_ids()
                    .filter(|id| {
                        gs.get_id(**id)
                            .is_some_and(|t| t.dims() == [3, 5] || t.dims() == [5, 3])
                    })
                    .count()
            };
            assert!(weight_sized(&gp) > 0);
            assert_eq!(weight_sized(&go), 0);
        }
    }

    /// A tracked weight (a trained one, or a mixed-precision cast of one) takes the plain path.
    #[test]
    fn a_tracked_weight_or_an_untracked_input_takes_the_plain_path() {
        let dev = Device::Cpu;
        let w = Var::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let lin = Linear::new(w.as_tensor().clone(), None);
        let x = Var::randn(0f32, 1.0, (4, 3), &dev).unwrap();
        let y = linear(&lin, x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(
            g.get(w.as_tensor()).is_some(),
            "a trained weight gets its gradient"
        );
        let frozen = Linear::new(w.as_tensor().detach(), None);
        let plain_input = Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap();
        let y = linear(&frozen, &plain_input).unwrap();
        assert!(!y.track_op());
    }
}
