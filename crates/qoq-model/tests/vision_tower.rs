//! Qwen2.5-VL vision tower (`qoq_model::vision::VisionTower`) against transformers 4.51.3.
//!
//! The fixture `tests/fixtures/vision_tiny.safetensors` is written by `tools/fixtures/vision.py`
//! from transformers' own `Qwen2_5_VisionTransformerPretrainedModel` (tiny, seeded, random
//! weights; two images of different grid sizes and a two-frame video; windows really partition).

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use qoq_core::hf_config::{QwenVlConfig, VisionConfig};
use qoq_model::ForwardMode;
use qoq_model::ecg::TimeSeriesEmbedding;
use qoq_model::vision::VisionTower;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

struct Fixture {
    tensors: HashMap<String, Tensor>,
    cfg: VisionConfig,
    grid: Vec<[usize; 3]>,
}

fn fixture() -> Fixture {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tensors =
        candle_core::safetensors::load(dir.join("vision_tiny.safetensors"), &Device::Cpu).unwrap();
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("vision_tiny.json")).unwrap())
            .unwrap();
    let cfg: VisionConfig = serde_json::from_value(js["vision_config"].clone()).unwrap();
    let grid: Vec<[usize; 3]> = serde_json::from_value(js["grid_thw"].clone()).unwrap();
    Fixture { tensors, cfg, grid }
}

impl Fixture {
    fn weights(&self) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter(|(k, _)| k.starts_with("visual."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn tower(&self, dtype: DType) -> VisionTower {
        let vb = VarBuilder::from_tensors(self.weights(), dtype, &Device::Cpu);
        VisionTower::new(&self.cfg, vb.pp("visual")).unwrap()
    }

    fn pixels(&self) -> Tensor {
        self.tensors["input.pixel_values"]
            .to_dtype(DType::F32)
            .unwrap()
    }

    /// Patch rows and merged-token rows where grid entry `i` starts, and their counts.
    fn span(&self, i: usize) -> (usize, usize, usize, usize) {
        let unit = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        let patches = |g: &[usize; 3]| g[0] * g[1] * g[2];
        let start: usize = self.grid[..i].iter().map(patches).sum();
        let n = patches(&self.grid[i]);
        (start, n, start / unit, n / unit)
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

#[test]
fn fixture_grid_matches_the_stored_grid_thw() -> Result<()> {
    let f = fixture();
    let stored = f.tensors["input.grid_thw"].to_vec2::<i64>()?;
    let as_usize: Vec<[usize; 3]> = stored
        .iter()
        .map(|r| [r[0] as usize, r[1] as usize, r[2] as usize])
        .collect();
    assert_eq!(as_usize, f.grid);
    Ok(())
}

#[test]
fn window_layout_matches_hf_get_window_index() -> Result<()> {
    let f = fixture();
    let layout = f.tower(DType::F32).layout(&f.grid)?;
    let want_index: Vec<usize> = f.tensors["expected.window_index"]
        .to_vec1::<i64>()?
        .into_iter()
        .map(|v| v as usize)
        .collect();
    let want_cu: Vec<usize> = f.tensors["expected.cu_window_seqlens"]
        .to_vec1::<i64>()?
        .into_iter()
        .map(|v| v as usize)
        .collect();
    assert_eq!(layout.window_index, want_index);
    assert_eq!(layout.cu_window_seqlens, want_cu);
    // the windows really partition: more windows than frames
    assert!(layout.cu_window_seqlens.len() > layout.cu_seqlens.len());
    Ok(())
}

#[test]
fn tower_matches_transformers_in_both_modes() -> Result<()> {
    let f = fixture();
    let tower = f.tower(DType::F32);
    let want = &f.tensors["expected.output"];
    for mode in [ForwardMode::Train, ForwardMode::Inference] {
        let got = tower.forward(&f.pixels(), &f.grid, mode)?;
        let d = max_abs_diff(&got, want);
        eprintln!("vision {mode:?}: max|diff| {d:e}");
        assert!(
            d < 1e-4,
            "{mode:?}: output differs from transformers by {d}"
        );
    }
    Ok(())
}

#[test]
fn window_partition_changes_the_output() -> Result<()> {
    // Negative control: with windows as large as the images, every block attends over whole
    // frames, and the result must no longer match the reference.
    let mut f = fixture();
    f.cfg.window_size *= 4;
    let got = f
        .tower(DType::F32)
        .forward(&f.pixels(), &f.grid, ForwardMode::Inference)?;
    let d = max_abs_diff(&got, &f.tensors["expected.output"]);
    assert!(
        d > 1e-2,
        "window attention had no effect on the output ({d})"
    );
    Ok(())
}

#[test]
fn one_image_alone_equals_the_same_image_inside_the_batch() -> Result<()> {
    let f = fixture();
    let tower = f.tower(DType::F32);
    let batch = tower.forward(&f.pixels(), &f.grid, ForwardMode::Inference)?;
    for i in 0..f.grid.len() {
        let (p0, np, m0, nm) = f.span(i);
        let alone = tower.forward(
            &f.pixels().narrow(0, p0, np)?,
            &f.grid[i..=i],
            ForwardMode::Inference,
        )?;
        let d = max_abs_diff(&alone, &batch.narrow(0, m0, nm)?);
        assert!(d < 1e-5, "grid entry {i} alone differs by {d}");
    }
    Ok(())
}

#[test]
fn bf16_weights_stay_close_to_the_f32_reference() -> Result<()> {
    let f = fixture();
    let tower = f.tower(DType::BF16);
    let got = tower.forward(&f.pixels(), &f.grid, ForwardMode::Inference)?;
    assert_eq!(got.dtype(), DType::BF16);
    let d = max_abs_diff(&got, &f.tensors["expected.output"]);
    eprintln!("vision bf16: max|diff| vs f32 reference {d:e}");
    assert!(d < 0.1, "bf16 output differs from the f32 reference by {d}");
    Ok(())
}

#[test]
fn pixel_rows_not_matching_the_grid_are_a_clear_error() {
    let f = fixture();
    let tower = f.tower(DType::F32);
    let px = f.pixels();
    let short = px.narrow(0, 0, px.dim(0).unwrap() - 4).unwrap();
    let err = tower
        .forward(&short, &f.grid, ForwardMode::Inference)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pixel_values") && err.contains("sum(t*h*w)"),
        "{err}"
    );
    let narrow_cols = px.narrow(1, 0, 1000).unwrap();
    let err = tower
        .forward(&narrow_cols, &f.grid, ForwardMode::Inference)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1176"), "{err}");
    let err = tower
        .forward(&px, &[[1, 5, 4]], ForwardMode::Inference)
        .unwrap_err()
        .to_string();
    assert!(err.contains("spatial_merge_size"), "{err}");
    let err = tower
        .forward(&px, &[], ForwardMode::Inference)
        .unwrap_err()
        .to_string();
    assert!(err.contains("grid_thw is empty"), "{err}");
}

#[test]
fn train_mode_gives_every_parameter_a_finite_nonzero_gradient() -> Result<()> {
    let f = fixture();
    let dev = Device::Cpu;
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        for (k, v) in f.weights() {
            data.insert(k, Var::from_tensor(&v.to_dtype(DType::F32)?)?);
        }
    }
    let tower = VisionTower::new(
        &f.cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &dev).pp("visual"),
    )?;
    let out = tower.forward(&f.pixels(), &f.grid, ForwardMode::Train)?;
    let n = out.elem_count() as u32;
    let r = (Tensor::arange(0u32, n, &dev)?.to_dtype(DType::F32)? * 0.73)?
        .sin()?
        .reshape(out.shape())?;
    let grads = (out * r)?.sum_all()?.backward()?;
    let data = vm.data().lock().unwrap();
    assert_eq!(data.len(), f.weights().len());
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} received no gradient"));
        let n2 = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(n2.is_finite() && n2 > 0.0, "{name}: gradient norm^2 {n2}");
    }
    Ok(())
}

/// A `VarBuilder` backend that records every requested key and hands out a broadcast zero of the
/// requested shape (no memory), to compare what the modules load with a real checkpoint index.
#[derive(Clone, Default)]
struct RecordingBackend {
    names: Arc<Mutex<BTreeSet<String>>>,
}

impl SimpleBackend for RecordingBackend {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.names.lock().unwrap().insert(name.to_string());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("unchecked load of {name} is not expected")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn modules_load_exactly_the_real_checkpoint_keys() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/qoq_med_vl_7b_time_series");
    if !dir.join("model.safetensors.index.json").exists() {
        eprintln!(
            "notice: {} is absent; skipping the checkpoint key comparison",
            dir.display()
        );
        return Ok(());
    }
    let cfg = QwenVlConfig::from_file(&dir.join("config.json")).unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let backend = RecordingBackend::default();
    let vb = VarBuilder::from_backend(Box::new(backend.clone()), DType::BF16, Device::Cpu);
    VisionTower::new(&cfg.vision, vb.pp("visual"))?;
    TimeSeriesEmbedding::new(
        &cfg.time_series,
        cfg.text.hidden_size,
        vb.pp("time_series_embedding"),
    )?;
    let loaded = backend.names.lock().unwrap().clone();
    let in_checkpoint: BTreeSet<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("visual.") || k.starts_with("time_series_embedding."))
        .cloned()
        .collect();
    let missing: Vec<_> = in_checkpoint.difference(&loaded).collect();
    let extra: Vec<_> = loaded.difference(&in_checkpoint).collect();
    assert!(
        missing.is_empty(),
        "checkpoint keys not loaded: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "loaded keys absent from the checkpoint: {extra:?}"
    );
    // vision: 32 blocks x 12 + patch_embed + 5 merger; ECG: 12 blocks x 11 + W_P 2, pos, norm 2,
    // projector 2
    assert_eq!(loaded.len(), 32 * 12 + 1 + 5 + 12 * 11 + 7);
    Ok(())
}
