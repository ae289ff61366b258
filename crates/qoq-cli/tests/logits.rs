//! `qoq logits` on the tiny model fixture of qoq-model (written by `tools/fixtures/model.py`):
//! position ids computed inside must reproduce HF's logits.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qoq-model/tests/fixtures/model_tiny")
}

/// `model.py::pixel_pool`.
fn pixel_pool(n: usize) -> Tensor {
    let v: Vec<f32> = (0..n * 1176)
        .map(|k| (k as f64 * 0.618034).sin() as f32)
        .collect();
    Tensor::from_vec(v, (n, 1176), &Device::Cpu).unwrap()
}

/// `model.py::ecg_series`.
fn ecg_series(b: usize) -> Tensor {
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

fn run_case(case: &str) -> (Tensor, Tensor) {
    run_case_in(&fixture(), case)
}

fn run_case_in(model: &std::path::Path, case: &str) -> (Tensor, Tensor) {
    let cases =
        candle_core::safetensors::load(model.join("cases.safetensors"), &Device::Cpu).unwrap();
    let get = |k: &str| cases.get(&format!("{case}.{k}")).cloned();
    let ids = get("input_ids").unwrap();
    let mut inputs: HashMap<String, Tensor> = HashMap::new();
    inputs.insert("input_ids".into(), ids.clone());
    inputs.insert("attention_mask".into(), get("attention_mask").unwrap());
    if let Some(g) = get("image_grid_thw") {
        let n: i64 = g
            .to_vec2::<i64>()
            .unwrap()
            .iter()
            .map(|r| r.iter().product::<i64>())
            .sum();
        inputs.insert("pixel_values".into(), pixel_pool(n as usize));
        inputs.insert("image_grid_thw".into(), g);
    }
    if case.starts_with("ecg") {
        inputs.insert("time_series_data".into(), ecg_series(ids.dim(0).unwrap()));
    }
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.safetensors");
    let out = dir.path().join("out.safetensors");
    candle_core::safetensors::save(&inputs, &inp).unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_qoq"))
        .args(["logits", "--model"])
        .arg(model)
        .arg("--inputs")
        .arg(&inp)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["logits"].clone();
    (got, get("logits").unwrap())
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn logits_command_reproduces_transformers_on_the_tiny_model() {
    for case in ["text_only", "two_images", "ecg_image_text"] {
        let (got, want) = run_case(case);
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(got.dims(), want.dims(), "{case}");
        let d = max_abs(&got, &want);
        assert!(d < 1e-4, "{case}: logits differ from HF by {d}");
    }
}

/// The symptom: a checkpoint saved by transformers 5 (`text_config.rope_parameters`, no
/// `rope_scaling`) was refused with "missing field `rope_scaling`". Both versions' checkpoints of
/// `tools/fixtures/hf_layouts.py` now give transformers' logits.
#[test]
fn logits_command_reads_transformers_5_and_4_checkpoints() {
    for name in ["hf_t5", "hf_t4"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../qoq-model/tests/fixtures")
            .join(name);
        for case in ["text_only", "image_text"] {
            let (got, want) = run_case_in(&dir, case);
            assert_eq!(got.dims(), want.dims(), "{name} {case}");
            let d = max_abs(&got, &want);
            assert!(d < 1e-4, "{name} {case}: logits differ from HF by {d}");
        }
    }
}

#[test]
fn logits_command_names_a_missing_input_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.safetensors");
    let t = Tensor::zeros((1, 3), DType::I64, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("attention_mask".to_string(), t)]), &inp)
        .unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_qoq"))
        .args(["logits", "--model"])
        .arg(fixture())
        .arg("--inputs")
        .arg(&inp)
        .arg("--out")
        .arg(dir.path().join("o.safetensors"))
        .output()
        .unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("input_ids"), "{err}");
}
