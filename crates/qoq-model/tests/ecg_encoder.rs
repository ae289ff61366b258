//! ECG-JEPA encoder (`qoq_model::ecg::TimeSeriesEmbedding`) against PyTorch.
//!
//! * the shared golden files (upstream ECG-JEPA code, width 96): skipped with a notice when
//!   `../../../shared` is absent;
//! * the committed tiny fixture written by `tools/fixtures/ecg.py` (width 8);
//! * gradients in `ForwardMode::Train` (every parameter, and finite differences in f64);
//! * input validation.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use qoq_core::hf_config::TimeSeriesConfig;
use qoq_model::ForwardMode;
use qoq_model::ecg::{TimeSeriesEmbedding, sincos_pos_embed};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const PREFIX: &str = "time_series_embedding";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden_dir() -> Option<PathBuf> {
    let d = crate_dir().join("../../../shared/data/ecg_jepa_golden");
    if d.join("weights.safetensors").exists() {
        Some(d)
    } else {
        eprintln!(
            "notice: {} is absent; skipping the ECG-JEPA golden comparison",
            d.display()
        );
        None
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
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

/// The tiny fixture: tensors (weights under `time_series_embedding.`, `input.*`, `expected.*`),
/// the encoder config and the projector width.
struct Tiny {
    tensors: HashMap<String, Tensor>,
    cfg: TimeSeriesConfig,
    out_dim: usize,
}

fn tiny() -> Tiny {
    let dir = crate_dir().join("tests/fixtures/ecg_tiny");
    let tensors =
        candle_core::safetensors::load(dir.join("fixture.safetensors"), &Device::Cpu).unwrap();
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg: TimeSeriesConfig = serde_json::from_value(js["time_series_config"].clone()).unwrap();
    let out_dim = js["projector_out"].as_u64().unwrap() as usize;
    Tiny {
        tensors,
        cfg,
        out_dim,
    }
}

/// Golden `config.json` carries extra keys (`projector_out`, `inputs`), so pick the encoder's.
fn golden_config(dir: &Path) -> (TimeSeriesConfig, usize) {
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let u = |k: &str| js[k].as_u64().unwrap_or_else(|| panic!("config key {k}")) as usize;
    let cfg = TimeSeriesConfig {
        embed_dim: u("embed_dim"),
        depth: u("depth"),
        num_heads: u("num_heads"),
        mlp_ratio: js["mlp_ratio"].as_f64().unwrap(),
        qkv_bias: js["qkv_bias"].as_bool().unwrap(),
        leads: u("leads"),
        patches_per_lead: u("patches_per_lead"),
        patch_size: u("patch_size"),
        layer_norm_eps: js["layer_norm_eps"].as_f64().unwrap(),
    };
    (cfg, u("projector_out"))
}

fn weights_only(tensors: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn build(
    weights: HashMap<String, Tensor>,
    cfg: &TimeSeriesConfig,
    out_dim: usize,
) -> TimeSeriesEmbedding {
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    TimeSeriesEmbedding::new(cfg, out_dim, vb.pp(PREFIX)).unwrap()
}

#[test]
fn golden_encoder_and_projector_match_upstream_in_both_modes() -> Result<()> {
    let Some(dir) = golden_dir() else {
        return Ok(());
    };
    let (cfg, out_dim) = golden_config(&dir);
    let weights = candle_core::safetensors::load(dir.join("weights.safetensors"), &Device::Cpu)?;
    let x = candle_core::safetensors::load(dir.join("inputs.safetensors"), &Device::Cpu)?
        .remove("time_series_data")
        .expect("time_series_data");
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
    let model = build(weights, &cfg, out_dim);
    for mode in [ForwardMode::Train, ForwardMode::Inference] {
        let repr = model.encode(&x, mode)?;
        let proj = model.forward(&x, mode)?;
        let d_repr = max_abs_diff(&repr, &expected["encoder_repr"]);
        let d_proj = max_abs_diff(&proj, &expected["projected"]);
        eprintln!("golden {mode:?}: max|repr diff| {d_repr:e}, max|projected diff| {d_proj:e}");
        assert!(d_repr < 1e-5, "{mode:?} encoder_repr differs by {d_repr}");
        assert!(d_proj < 1e-5, "{mode:?} projected differs by {d_proj}");
    }
    Ok(())
}

#[test]
fn golden_pos_embed_is_the_two_d_sincos_table() -> Result<()> {
    let Some(dir) = golden_dir() else {
        return Ok(());
    };
    let (cfg, out_dim) = golden_config(&dir);
    let weights = candle_core::safetensors::load(dir.join("weights.safetensors"), &Device::Cpu)?;
    let model = build(weights, &cfg, out_dim);
    let table = sincos_pos_embed(cfg.embed_dim, cfg.leads, cfg.patches_per_lead, &Device::Cpu)?
        .unsqueeze(0)?;
    let d = max_abs_diff(model.pos_embed(), &table);
    assert!(d < 1e-6, "pos_embed differs from the sin-cos table by {d}");
    Ok(())
}

#[test]
fn tiny_fixture_matches_pytorch_in_both_modes() -> Result<()> {
    let t = tiny();
    let model = build(weights_only(&t.tensors), &t.cfg, t.out_dim);
    let x = &t.tensors["input.time_series_data"];
    for mode in [ForwardMode::Train, ForwardMode::Inference] {
        let d_repr = max_abs_diff(&model.encode(x, mode)?, &t.tensors["expected.encoder_repr"]);
        let d_proj = max_abs_diff(&model.forward(x, mode)?, &t.tensors["expected.projected"]);
        assert!(d_repr < 1e-5, "{mode:?} encoder_repr differs by {d_repr}");
        assert!(d_proj < 1e-5, "{mode:?} projected differs by {d_proj}");
    }
    Ok(())
}

#[test]
fn each_ecg_in_a_batch_is_encoded_independently() -> Result<()> {
    let t = tiny();
    let model = build(weights_only(&t.tensors), &t.cfg, t.out_dim);
    let x = &t.tensors["input.time_series_data"];
    let batch = model.forward(x, ForwardMode::Inference)?;
    for i in 0..x.dim(0)? {
        let alone = model.forward(&x.narrow(0, i, 1)?, ForwardMode::Inference)?;
        let d = max_abs_diff(&alone, &batch.narrow(0, i, 1)?);
        assert!(
            d < 1e-6,
            "sample {i} alone differs from its batch row by {d}"
        );
    }
    Ok(())
}

#[test]
fn wrong_lead_count_or_length_is_a_clear_error() {
    let t = tiny();
    let model = build(weights_only(&t.tensors), &t.cfg, t.out_dim);
    let dev = Device::Cpu;
    for shape in [vec![1, 12, 2500], vec![1, 8, 5000], vec![8, 2500]] {
        let x = Tensor::zeros(shape.as_slice(), DType::F32, &dev).unwrap();
        let err = model
            .forward(&x, ForwardMode::Inference)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("8 leads") && err.contains("2500 samples") && err.contains("got"),
            "unclear error for {shape:?}: {err}"
        );
    }
}

/// A `VarMap` holding the fixture weights as `Var`s of `dtype`.
fn varmap_with(tensors: &HashMap<String, Tensor>, dtype: DType) -> VarMap {
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        for (k, v) in weights_only(tensors) {
            data.insert(k, Var::from_tensor(&v.to_dtype(dtype).unwrap()).unwrap());
        }
    }
    vm
}

/// A fixed, deterministic `(rows, cols)` weighting for the scalar test loss.
fn weighting(rows: usize, cols: usize, dtype: DType) -> Result<Tensor> {
    let n = (rows * cols) as u32;
    (Tensor::arange(0u32, n, &Device::Cpu)?.to_dtype(DType::F64)? * 1.37)?
        .sin()?
        .reshape((rows, cols))?
        .to_dtype(dtype)
}

/// `sum(forward(x) * r)`.
fn loss(model: &TimeSeriesEmbedding, x: &Tensor, r: &Tensor) -> Result<Tensor> {
    (model.forward(x, ForwardMode::Train)? * r)?.sum_all()
}

#[test]
fn train_mode_gives_every_trainable_parameter_a_finite_nonzero_gradient() -> Result<()> {
    let t = tiny();
    let dev = Device::Cpu;
    let vm = varmap_with(&t.tensors, DType::F32);
    let model = TimeSeriesEmbedding::new(
        &t.cfg,
        t.out_dim,
        VarBuilder::from_varmap(&vm, DType::F32, &dev).pp(PREFIX),
    )?;
    let x = &t.tensors["input.time_series_data"];
    let r = weighting(x.dim(0)?, t.out_dim, DType::F32)?;
    let grads = loss(&model, x, &r)?.backward()?;
    let data = vm.data().lock().unwrap();
    assert_eq!(data.len(), weights_only(&t.tensors).len());
    let mut checked = 0;
    for (name, var) in data.iter() {
        let g = grads.get(var.as_tensor());
        if name.ends_with("pos_embed") {
            // fixed sin-cos table (requires_grad=False upstream)
            assert!(g.is_none(), "{name} must not receive a gradient");
            continue;
        }
        let g = g.unwrap_or_else(|| panic!("{name} received no gradient"));
        let n = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(n.is_finite() && n > 0.0, "{name}: gradient norm^2 {n}");
        checked += 1;
    }
    assert_eq!(checked, data.len() - 1);
    Ok(())
}

#[test]
fn finite_differences_agree_with_backprop_in_f64() -> Result<()> {
    let t = tiny();
    let dev = Device::Cpu;
    let vm = varmap_with(&t.tensors, DType::F64);
    let model = TimeSeriesEmbedding::new(
        &t.cfg,
        t.out_dim,
        VarBuilder::from_varmap(&vm, DType::F64, &dev).pp(PREFIX),
    )?;
    let x = t.tensors["input.time_series_data"].to_dtype(DType::F64)?;
    let r = weighting(x.dim(0)?, t.out_dim, DType::F64)?;
    let grads = loss(&model, &x, &r)?.backward()?;
    // (parameter, flat element index)
    let probes = [
        ("encoder.W_P.weight", 57usize),
        ("encoder.encoder_blocks.blocks.0.attn.qkv.weight", 13),
        ("encoder.encoder_blocks.blocks.1.mlp.fc1.bias", 5),
        ("encoder.encoder_blocks.blocks.0.norm1.weight", 3),
        ("encoder.norm.bias", 6),
        ("linear.weight", 20),
    ];
    let h = 1e-3;
    for (name, idx) in probes {
        let var = vm.data().lock().unwrap()[&format!("{PREFIX}.{name}")].clone();
        let orig = var.as_tensor().copy()?;
        let g = grads.get(var.as_tensor()).expect("gradient");
        let analytic = g.flatten_all()?.get(idx)?.to_scalar::<f64>()?;
        let bump = |delta: f64| -> Result<f64> {
            let mut v = orig.flatten_all()?.to_vec1::<f64>()?;
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, orig.shape(), &dev)?)?;
            loss(&model, &x, &r)?.to_scalar::<f64>()
        };
        let numeric = (bump(h)? - bump(-h)?) / (2.0 * h);
        var.set(&orig)?;
        let err = (numeric - analytic).abs();
        eprintln!("{name}[{idx}]: backprop {analytic:.6e}, finite difference {numeric:.6e}");
        assert!(
            err <= 2e-3 * analytic.abs().max(1e-2),
            "{name}[{idx}]: backprop {analytic} vs finite difference {numeric}"
        );
    }
    Ok(())
}
