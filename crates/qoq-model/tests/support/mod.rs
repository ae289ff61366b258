//! Shared helpers of the model tests: the tiny parity fixture written by
//! `tools/fixtures/model.py`.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use qoq_model::ModelInputs;
use std::collections::HashMap;
use std::path::PathBuf;

/// The four parity cases of the fixture.
pub const CASES: [&str; 4] = ["text_only", "image_text", "two_images", "ecg_image_text"];

/// `tests/fixtures/model_tiny`.
pub fn tiny_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model_tiny")
}

/// All tensors of `cases.safetensors`.
pub fn cases() -> HashMap<String, Tensor> {
    cases_in(&tiny_dir())
}

/// `tests/fixtures/<name>`.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// All tensors of `<dir>/cases.safetensors`.
pub fn cases_in(dir: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("cases.safetensors"), &Device::Cpu)
        .expect("fixture cases")
}

/// `model.py::pixel_pool`: `sin(0.618034 k)` over row-major index k, `(n, 1176)`.
pub fn pixel_pool(n: usize) -> Tensor {
    let v: Vec<f32> = (0..n * 1176)
        .map(|k| (k as f64 * 0.618034).sin() as f32)
        .collect();
    Tensor::from_vec(v, (n, 1176), &Device::Cpu).unwrap()
}

/// `model.py::ecg_series`: `sin(0.01 (l + 1) t + r) + 0.25 cos(0.37 t)`, `(b, 8, 2500)`.
pub fn ecg_series(b: usize) -> Tensor {
    let mut v = Vec::with_capacity(b * 8 * 2500);
    for r in 0..b {
        for l in 0..8 {
            for t in 0..2500 {
                let t = t as f64;
                v.push(
                    ((0.01 * (l as f64 + 1.0) * t + r as f64).sin() + 0.25 * (0.37 * t).cos())
                        as f32,
                );
            }
        }
    }
    Tensor::from_vec(v, (b, 8, 2500), &Device::Cpu).unwrap()
}

/// The inputs of one case (and its expected logits).
pub fn case_inputs(all: &HashMap<String, Tensor>, name: &str) -> (ModelInputs, Tensor) {
    let get = |k: &str| all.get(&format!("{name}.{k}")).cloned();
    let input_ids = get("input_ids").expect("input_ids");
    let mut inputs = ModelInputs::text(
        input_ids.clone(),
        get("attention_mask"),
        get("position_ids").expect("position_ids"),
    );
    if let Some(g) = get("image_grid_thw") {
        let grids: Vec<[usize; 3]> = g
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2::<i64>()
            .unwrap()
            .into_iter()
            .map(|r| [r[0] as usize, r[1] as usize, r[2] as usize])
            .collect();
        let n: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        inputs.pixel_values = Some(pixel_pool(n));
        inputs.image_grid_thw = grids;
    }
    if name.starts_with("ecg") {
        inputs.time_series_data = Some(ecg_series(input_ids.dim(0).unwrap()));
    }
    (inputs, get("logits").expect("logits"))
}

/// Largest absolute difference.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
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
