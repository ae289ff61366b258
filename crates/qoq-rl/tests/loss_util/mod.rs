//! Shared helpers of the loss tests: fixture loading, tensor <-> nested Vec conversions and
//! tolerance checks.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// The fixture written by `tools/fixtures/loss.py`.
pub fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/loss.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Flattens a JSON array of arbitrary nesting into f64s and its shape.
pub fn flatten(v: &Value) -> (Vec<f64>, Vec<usize>) {
    fn rec(v: &Value, out: &mut Vec<f64>, shape: &mut Vec<usize>, depth: usize) {
        match v {
            Value::Array(a) => {
                if shape.len() == depth {
                    shape.push(a.len());
                }
                for x in a {
                    rec(x, out, shape, depth + 1);
                }
            }
            Value::Number(n) => out.push(n.as_f64().unwrap()),
            other => panic!("not a number: {other}"),
        }
    }
    let mut out = Vec::new();
    let mut shape = Vec::new();
    rec(v, &mut out, &mut shape, 0);
    (out, shape)
}

/// A tensor of `dtype` from a JSON array.
pub fn tensor(v: &Value, dtype: DType) -> Tensor {
    let (data, shape) = flatten(v);
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A tensor's values as f64.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Asserts `|got − want| ≤ tol·max(1, |want|)` element-wise.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w} (err {err:e}, tol {tol:e})"
        );
    }
}

/// Asserts a scalar matches within `tol·max(1, |want|)`.
pub fn assert_scalar(what: &str, got: f64, want: f64, tol: f64) {
    assert_close(what, &[got], &[want], tol);
}

/// A JSON number.
pub fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}
