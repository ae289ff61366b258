//! Checkpoint loading: key coverage (7B index and the tiny fixture), both key layouts, sharded
//! checkpoints, and clear errors for missing or truncated shards.

mod support;

use candle_core::{DType, Device, Tensor};
use qoq_core::hf_config::QwenVlConfig;
use qoq_model::loading::{
    KeyLayout, checkpoint_var_builder, compare_keys, load_model, read_config, read_index,
    requested_parameters, requested_parameters_with,
};
use qoq_model::{ClinicalVlm, ForwardMode};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use support::*;

fn tiny_weights() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(tiny_dir().join("model.safetensors"), &Device::Cpu).unwrap()
}

fn logits_of(dir: &Path) -> Tensor {
    let (_, model) = load_model(dir, DType::F32, &Device::Cpu).unwrap();
    let (inputs, _) = case_inputs(&cases(), "ecg_image_text");
    model.forward(&inputs, ForwardMode::Inference).unwrap()
}

#[test]
fn every_tiny_checkpoint_tensor_is_a_parameter_with_its_shape() {
    let cfg = read_config(&tiny_dir()).unwrap();
    let weights = tiny_weights();
    let report = compare_keys(&cfg, weights.keys().map(String::as_str)).unwrap();
    assert!(report.is_exact(), "{report:?}");
    let shapes: BTreeMap<String, Vec<usize>> = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    let requested = requested_parameters_with(&cfg, &shapes).unwrap();
    assert_eq!(requested.len(), weights.len());
    for (name, shape) in &requested {
        assert_eq!(weights[name].dims(), shape.as_slice(), "{name}");
    }
    // A synthetic index that lacks one tensor and has one extra is reported both ways.
    let mut names: Vec<&str> = weights.keys().map(String::as_str).collect();
    names.retain(|n| *n != "model.norm.weight");
    names.push("model.layers.7.mlp.up_proj.weight");
    let report = compare_keys(&cfg, names).unwrap();
    assert_eq!(report.missing, vec!["model.norm.weight".to_string()]);
    assert_eq!(
        report.unused,
        vec!["model.layers.7.mlp.up_proj.weight".to_string()]
    );
}

#[test]
fn every_name_of_the_7b_index_maps_to_a_parameter_of_the_right_shape() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/qoq_med_vl_7b_time_series");
    if !dir.join("model.safetensors.index.json").exists() {
        eprintln!("skipping: {} not present", dir.display());
        return;
    }
    let cfg = QwenVlConfig::from_file(&dir.join("config.json")).unwrap();
    let index = read_index(&dir.join("model.safetensors.index.json")).unwrap();
    assert_eq!(index.len(), 868);
    let report = compare_keys(&cfg, index.keys().map(String::as_str)).unwrap();
    assert!(report.is_exact(), "{report:?}");
    // The one tensor stored with a leading batch axis (an `nn.Parameter` of shape (1, 400, 768)).
    let known = BTreeMap::from([(
        "time_series_embedding.encoder.pos_embed".to_string(),
        vec![1, 400, 768],
    )]);
    let req = requested_parameters_with(&cfg, &known).unwrap();
    assert_eq!(req.len(), 868);
    // Shapes from the published architecture (spec §4.2, §5.2, §5.5), independent of our code.
    let (h, kv, inter, vocab) = (3584, 4 * 128, 18944, 152064);
    let expect: &[(&str, &[usize])] = &[
        ("model.embed_tokens.weight", &[vocab, h]),
        ("lm_head.weight", &[vocab, h]),
        ("model.norm.weight", &[h]),
        ("model.layers.27.self_attn.q_proj.weight", &[h, h]),
        ("model.layers.27.self_attn.q_proj.bias", &[h]),
        ("model.layers.0.self_attn.k_proj.weight", &[kv, h]),
        ("model.layers.0.self_attn.v_proj.bias", &[kv]),
        ("model.layers.0.self_attn.o_proj.weight", &[h, h]),
        ("model.layers.3.mlp.gate_proj.weight", &[inter, h]),
        ("model.layers.3.mlp.down_proj.weight", &[h, inter]),
        ("model.layers.3.input_layernorm.weight", &[h]),
        ("visual.patch_embed.proj.weight", &[1280, 3, 2, 14, 14]),
        ("visual.blocks.31.attn.qkv.weight", &[3 * 1280, 1280]),
        ("visual.blocks.31.attn.qkv.bias", &[3 * 1280]),
        ("visual.blocks.0.mlp.gate_proj.weight", &[3420, 1280]),
        ("visual.blocks.0.norm1.weight", &[1280]),
        ("visual.merger.ln_q.weight", &[1280]),
        ("visual.merger.mlp.0.weight", &[5120, 5120]),
        ("visual.merger.mlp.2.weight", &[h, 5120]),
        ("time_series_embedding.encoder.W_P.weight", &[768, 50]),
        ("time_series_embedding.encoder.pos_embed", &[1, 400, 768]),
        (
            "time_series_embedding.encoder.encoder_blocks.blocks.11.attn.qkv.weight",
            &[2304, 768],
        ),
        (
            "time_series_embedding.encoder.encoder_blocks.blocks.11.mlp.fc1.weight",
            &[3072, 768],
        ),
        ("time_series_embedding.linear.weight", &[h, 768]),
        ("time_series_embedding.linear.bias", &[h]),
    ];
    for (name, shape) in expect {
        assert_eq!(req[*name].as_slice(), *shape, "{name}");
    }
    // Every decoder tensor's shape follows from the config alone.
    for (name, shape) in &req {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let leaf = rest.split_once('.').unwrap().1;
            let want: Vec<usize> = match leaf {
                "self_attn.q_proj.weight" | "self_attn.o_proj.weight" => vec![h, h],
                "self_attn.q_proj.bias"
                | "input_layernorm.weight"
                | "post_attention_layernorm.weight" => vec![h],
                "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
                "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![kv],
                "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![inter, h],
                "mlp.down_proj.weight" => vec![h, inter],
                other => panic!("unexpected decoder tensor {other}"),
            };
            assert_eq!(shape, &want, "{name}");
        }
    }
}

#[test]
fn stock_config_requests_no_ecg_module() {
    let mut cfg = read_config(&tiny_dir()).unwrap();
    cfg.time_series_token_id = None;
    let req = requested_parameters(&cfg).unwrap();
    assert!(!req.is_empty());
    assert!(req.keys().all(|k| !k.starts_with("time_series_embedding.")));
    let names: Vec<String> = tiny_weights()
        .into_keys()
        .filter(|k| !k.starts_with("time_series_embedding."))
        .collect();
    assert!(
        compare_keys(&cfg, names.iter().map(String::as_str))
            .unwrap()
            .is_exact()
    );
}

#[test]
fn nested_key_layout_loads_to_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let layout = KeyLayout::Nested;
    let renamed: HashMap<String, Tensor> = tiny_weights()
        .into_iter()
        .map(|(k, v)| (layout.checkpoint_name(&k), v))
        .collect();
    assert!(renamed.contains_key("model.language_model.layers.0.self_attn.q_proj.weight"));
    assert!(renamed.contains_key("model.visual.merger.ln_q.weight"));
    assert!(renamed.contains_key("lm_head.weight"));
    candle_core::safetensors::save(&renamed, tmp.path().join("model.safetensors")).unwrap();
    let (_, detected) = checkpoint_var_builder(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(detected, KeyLayout::Nested);
    assert!(max_abs(&logits_of(tmp.path()), &logits_of(&tiny_dir())) == 0.0);
}

/// Checkpoints written by `save_pretrained` of transformers 4.51 (flat config) and transformers
/// 5 (nested `text_config` with `rope_parameters`, `dtype`, `layer_types`), bf16 weights
/// (`tools/fixtures/hf_layouts.py`): both load, in both forward modes, to transformers' f32
/// logits. Both write the flat weight names (transformers 5 reverses its key conversion on save;
/// nested weight names are covered by `nested_key_layout_loads_to_the_same_logits`).
#[test]
fn transformers_4_and_5_checkpoints_load_and_match_transformers() {
    for (name, nested) in [("hf_t4", false), ("hf_t5", true)] {
        let dir = fixture_dir(name);
        let (cfg, model) = load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(cfg.nested, nested, "{name}");
        assert_eq!(cfg.text.rope_theta, 10000.0, "{name}");
        assert_eq!(cfg.text.rope_scaling.mrope_section, vec![2, 3, 3], "{name}");
        assert_eq!(cfg.text.torch_dtype.as_deref(), Some("bfloat16"), "{name}");
        assert!(!cfg.has_time_series());
        let (_, layout) = checkpoint_var_builder(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(layout, KeyLayout::Flat, "{name}");
        let all = cases_in(&dir);
        for case in ["text_only", "image_text"] {
            let (inputs, expected) = case_inputs(&all, case);
            for mode in [ForwardMode::Inference, ForwardMode::Train] {
                let got = model.forward(&inputs, mode).unwrap();
                assert_eq!(got.dims(), expected.dims(), "{name} {case}");
                let d = max_abs(&got, &expected);
                assert!(
                    d < 1e-4,
                    "{name} {case} {mode:?}: logits differ from HF by {d}"
                );
            }
        }
    }
}

fn write_sharded(dir: &Path) {
    std::fs::copy(tiny_dir().join("config.json"), dir.join("config.json")).unwrap();
    let mut a = HashMap::new();
    let mut b = HashMap::new();
    let mut map = serde_json::Map::new();
    for (k, v) in tiny_weights() {
        let shard = if k.starts_with("model.") {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(k.clone(), shard.into());
        if k.starts_with("model.") {
            a.insert(k, v)
        } else {
            b.insert(k, v)
        };
    }
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_checkpoint_loads_to_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    write_sharded(tmp.path());
    assert!(max_abs(&logits_of(tmp.path()), &logits_of(&tiny_dir())) == 0.0);
}

#[test]
fn missing_or_truncated_shard_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_sharded(tmp.path());
    let shard = tmp.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_model(tmp.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("truncated"),
        "{err}"
    );
    std::fs::remove_file(&shard).unwrap();
    let err = load_model(tmp.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("missing"),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = checkpoint_var_builder(empty.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn bf16_weights_give_close_logits() {
    let (cfg, vb) = {
        let cfg = read_config(&tiny_dir()).unwrap();
        let (vb, _) = checkpoint_var_builder(&tiny_dir(), DType::BF16, &Device::Cpu).unwrap();
        (cfg, vb)
    };
    let model = ClinicalVlm::new(&cfg, vb).unwrap();
    let (inputs, expected) = case_inputs(&cases(), "text_only");
    let got = model.forward(&inputs, ForwardMode::Inference).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    let d = max_abs(&got, &expected);
    assert!(d < 0.5, "bf16 logits differ by {d}");
}

#[test]
fn tied_embeddings_request_no_lm_head() {
    let mut cfg = read_config(&tiny_dir()).unwrap();
    assert!(
        requested_parameters(&cfg)
            .unwrap()
            .contains_key("lm_head.weight")
    );
    cfg.text.tie_word_embeddings = true;
    let req = requested_parameters(&cfg).unwrap();
    assert!(!req.contains_key("lm_head.weight"));
    // With tied weights, lm_head is the embedding matrix: logits = hidden · E^T.
    let weights = tiny_weights();
    let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let model = ClinicalVlm::new(&cfg, vb).unwrap();
    let h = Tensor::ones((1, 1, 64), DType::F32, &Device::Cpu).unwrap();
    let got = model.logits_from_hidden(&h).unwrap().flatten_all().unwrap();
    let want = weights["model.embed_tokens.weight"].sum(1).unwrap();
    assert!(max_abs(&got, &want) < 1e-4);
}

#[test]
fn a_random_checkpoint_has_no_all_zero_matrix_and_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = qoq_model::loading::read_config(&support::tiny_dir()).unwrap();
    qoq_model::train::write_random_checkpoint(&cfg, dir.path()).unwrap();
    let t =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, w) in &t {
        if w.rank() >= 2 {
            let m = w
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(m > 0.0, "{name} is all zeros");
        }
    }
    let (_, model) = qoq_model::loading::load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config().text.hidden_size, cfg.text.hidden_size);
    // Deterministic: the same seed gives the same bytes, another seed other weights.
    let again = tempfile::tempdir().unwrap();
    qoq_model::train::write_random_checkpoint(&cfg, again.path()).unwrap();
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(bytes(dir.path()), bytes(again.path()));
    qoq_model::train::write_random_checkpoint_seeded(&cfg, again.path(), 7).unwrap();
    assert_ne!(bytes(dir.path()), bytes(again.path()));
}
