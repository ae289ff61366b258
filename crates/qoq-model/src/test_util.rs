//! Helpers of this crate's unit tests.

use candle_core::{DType, Device, Tensor};

/// A tensor of `shape` holding `sin(i · f + 0.3)` (element `i` in row-major order) in `dtype`.
pub(crate) fn wave(shape: &[usize], f: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| ((i as f64) * f + 0.3).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The bits of every element, widened to f64 (exact for every float dtype).
pub(crate) fn bits(t: &Tensor) -> Vec<u64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}
