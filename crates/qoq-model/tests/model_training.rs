//! Training support: every trainable parameter gets a finite gradient (Train mode, image + ECG),
//! gradients agree with finite differences in f64, freezing switches, LoRA adapters and merged
//! saving.

mod support;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use qoq_model::loading::{checkpoint_var_builder, load_model, read_config};
use qoq_model::lora::{LoraBuilder, LoraConfig, all_targets};
use qoq_model::train::{Component, Freeze, ParamStore, save_merged, trainable_var_builder};
use qoq_model::{ClinicalVlm, ForwardMode, ModelInputs, attention, checkpoint};
use support::*;

fn build(dtype: DType, freeze: Freeze) -> (ClinicalVlm, ParamStore) {
    let cfg = read_config(&tiny_dir()).unwrap();
    let (vb, _) = checkpoint_var_builder(&tiny_dir(), dtype, &Device::Cpu).unwrap();
    let (vb, store) = trainable_var_builder(vb, freeze);
    (ClinicalVlm::new(&cfg, vb).unwrap(), store)
}

/// A scalar that depends on every logit: `sum(logits * w)` with a fixed pseudo-random `w`.
fn loss(model: &ClinicalVlm, inputs: &ModelInputs) -> Tensor {
    let logits = model.forward(inputs, ForwardMode::Train).unwrap();
    let n = logits.elem_count();
    let w: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.7548776662).sin()).collect();
    let w = Tensor::from_vec(w, logits.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(logits.dtype())
        .unwrap();
    (logits * w).unwrap().sum_all().unwrap()
}

#[test]
fn every_trainable_parameter_receives_a_finite_nonzero_gradient() {
    let (model, store) = build(DType::F32, Freeze::default());
    let (inputs, _) = case_inputs(&cases(), "ecg_image_text");
    let grads = loss(&model, &inputs).backward().unwrap();
    let trainable = store.trainable().unwrap();
    let all = store.tensors().unwrap();
    // Everything but ECG-JEPA's fixed positional table is trained.
    assert_eq!(trainable.len(), all.len() - 1);
    let mut seen = [false; 3];
    for (name, var) in &trainable {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite() && n > 0.0, "{name}: gradient norm² {n}");
        // A gradient that records a graph keeps the activations and output gradients it was
        // computed from alive until the backward ends (candle never detaches a variable's).
        assert!(!g.track_op(), "{name}: its gradient records a graph");
        seen[Component::of(name) as usize] = true;
    }
    assert_eq!(
        seen, [true; 3],
        "vision, ECG and LLM parameters all trained"
    );
}

/// Every parameter of `params` has a gradient in `a` and in `b` (`what` names `b`'s path), equal
/// to 1e-6 of the larger of 1 and `a`'s largest entry; with `nonzero`, none of `a`'s is zero.
fn same_gradients(
    params: &[(String, candle_core::Var)],
    a: &candle_core::backprop::GradStore,
    b: &candle_core::backprop::GradStore,
    what: &str,
    nonzero: bool,
) {
    for (name, var) in params {
        let a = a
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let b = b
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no {what} gradient"));
        let scale: f64 = a.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        let d: f64 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        if nonzero {
            assert!(scale > 0.0, "{name}: zero gradient");
        }
        assert!(
            d <= 1e-6 * scale.max(1.0),
            "{name}: differs by {d} (scale {scale})"
        );
    }
}

#[test]
fn checkpointed_gradients_equal_the_plain_ones_for_every_parameter() {
    // Activation checkpointing (every decoder layer and vision block recomputed in the
    // backward) changes where activations live, not the gradients: image + ECG + text, f64.
    let (model, store) = build(DType::F64, Freeze::default());
    let (inputs, _) = case_inputs(&cases(), "ecg_image_text");
    let plain = checkpoint::backward(&loss(&model, &inputs)).unwrap();
    let ckpt_loss = checkpoint::scope(true, || loss(&model, &inputs));
    let ckpt = checkpoint::backward(&ckpt_loss).unwrap();
    let trainable = store.trainable().unwrap();
    assert_eq!(trainable.len(), store.tensors().unwrap().len() - 1);
    same_gradients(&trainable, &plain, &ckpt, "checkpointed", true);
    // The checkpointed forward really went through the recomputing op: its graph holds one
    // node per layer and block boundary instead of every activation (the ECG encoder, not
    // checkpointed, is in both counts: 323 of 609 nodes remain).
    let plain_nodes = loss(&model, &inputs).sorted_nodes().len();
    let ckpt_nodes = checkpoint::scope(true, || loss(&model, &inputs))
        .sorted_nodes()
        .len();
    assert!(
        ckpt_nodes * 5 < plain_nodes * 3,
        "graph nodes: {ckpt_nodes} checkpointed vs {plain_nodes} plain"
    );
}

#[test]
fn chunked_attention_gives_the_eager_loss_and_gradients_for_every_parameter() {
    // The chunked attention forced on every decoder layer and vision segment against the eager
    // path: a left-padded batch of two with images and ECGs, f64 (GQA: the tiny model has
    // fewer key-value heads than query heads).
    let cfg = read_config(&tiny_dir()).unwrap();
    assert!(cfg.text.num_key_value_heads < cfg.text.num_attention_heads);
    let (model, store) = build(DType::F64, Freeze::default());
    let (inputs, _) = case_inputs(&cases(), "ecg_image_text");
    let mask: Vec<Vec<f32>> = inputs
        .attention_mask
        .as_ref()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert!(mask.iter().flatten().any(|&m| m == 0.0), "a padded row");
    let eager = attention::with_min_macs(usize::MAX, || loss(&model, &inputs));
    let calls = attention::calls();
    let chunked = attention::with_min_macs(0, || loss(&model, &inputs));
    // Every decoder layer and vision segment run went through the op.
    let layers = cfg.text.num_hidden_layers + cfg.vision.depth;
    assert!(attention::calls() - calls >= layers as u64);
    let (le, lc): (f64, f64) = (eager.to_scalar().unwrap(), chunked.to_scalar().unwrap());
    assert!(
        (le - lc).abs() <= 1e-9 * le.abs().max(1.0),
        "loss {le} vs {lc}"
    );
    let (ge, gc) = (eager.backward().unwrap(), chunked.backward().unwrap());
    same_gradients(&store.trainable().unwrap(), &ge, &gc, "chunked", false);
}

#[test]
fn freezing_switches_remove_components_from_the_trainable_set() {
    let freeze = Freeze {
        vision_tower: true,
        time_series_encoder: true,
        llm: false,
    };
    let (model, store) = build(DType::F32, freeze);
    let trainable = store.trainable().unwrap();
    assert!(!trainable.is_empty());
    assert!(
        trainable
            .iter()
            .all(|(n, _)| Component::of(n) == Component::Llm)
    );
    let (inputs, _) = case_inputs(&cases(), "ecg_image_text");
    let grads = loss(&model, &inputs).backward().unwrap();
    for (name, t) in store.tensors().unwrap() {
        let is_trainable = trainable.iter().any(|(n, _)| *n == name);
        assert_eq!(grads.get(&t).is_some(), is_trainable, "{name}");
    }
    let (_, store) = build(
        DType::F32,
        Freeze {
            vision_tower: true,
            time_series_encoder: true,
            llm: true,
        },
    );
    assert!(store.trainable().unwrap().is_empty());
}

fn set_entry(var: &Var, index: usize, value: f64) {
    let shape = var.as_tensor().shape().clone();
    let mut v: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    v[index] = value;
    var.set(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        .unwrap();
}

/// Central differences of the loss against the analytic gradient at a few entries.
fn check_finite_differences(case: &str, picks: &[(&str, usize)], eps: f64, rel_tol: f64) {
    let (model, store) = build(DType::F64, Freeze::default());
    let (inputs, _) = case_inputs(&cases(), case);
    let grads = loss(&model, &inputs).backward().unwrap();
    let trainable = store.trainable().unwrap();
    let entry = |t: &Tensor, idx: usize| -> f64 {
        t.flatten_all()
            .unwrap()
            .get(idx)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    for &(name, idx) in picks {
        let var = &trainable.iter().find(|(n, _)| n == name).unwrap().1;
        let analytic = entry(grads.get(var.as_tensor()).unwrap(), idx);
        let x0 = entry(var.as_tensor(), idx);
        set_entry(var, idx, x0 + eps);
        let up: f64 = loss(&model, &inputs).to_scalar().unwrap();
        set_entry(var, idx, x0 - eps);
        let down: f64 = loss(&model, &inputs).to_scalar().unwrap();
        set_entry(var, idx, x0);
        let numeric = (up - down) / (2.0 * eps);
        eprintln!("{case} {name}[{idx}]: analytic {analytic:.9e} numeric {numeric:.9e}");
        assert!(
            analytic != 0.0,
            "{name}[{idx}]: pick an entry with a non-zero gradient"
        );
        assert!(
            (numeric - analytic).abs() <= rel_tol * analytic.abs().max(1.0),
            "{case} {name}[{idx}]: analytic {analytic} vs finite difference {numeric}"
        );
    }
}

#[test]
fn decoder_gradients_match_central_finite_differences_in_f64() {
    // The text path computes entirely in f64, so the agreement is tight.
    let ids: Vec<Vec<i64>> = cases()["text_only.input_ids"].to_vec2().unwrap();
    let token = ids[0][0] as usize;
    check_finite_differences(
        "text_only",
        &[
            ("model.embed_tokens.weight", 64 * token + 3),
            ("model.layers.0.self_attn.q_proj.weight", 517),
            ("model.layers.0.self_attn.k_proj.weight", 300),
            ("model.layers.1.self_attn.k_proj.bias", 5),
            ("model.layers.1.self_attn.v_proj.weight", 77),
            ("model.layers.1.self_attn.o_proj.weight", 1234),
            ("model.layers.1.mlp.gate_proj.weight", 2000),
            ("model.layers.1.mlp.down_proj.weight", 1000),
            ("model.layers.0.input_layernorm.weight", 11),
            ("model.norm.weight", 9),
            ("lm_head.weight", 4000),
        ],
        1e-5,
        1e-6,
    );
}

#[test]
fn encoder_gradients_match_central_finite_differences_in_f64() {
    // The vision tower and the ECG encoder keep some f32 steps (attention logits, norms), so the
    // loss carries f32 rounding: a larger step and a looser tolerance.
    check_finite_differences(
        "ecg_image_text",
        &[
            ("visual.patch_embed.proj.weight", 777),
            ("visual.blocks.0.attn.qkv.weight", 123),
            ("visual.blocks.1.mlp.up_proj.weight", 50),
            ("visual.merger.mlp.0.weight", 321),
            ("time_series_embedding.encoder.W_P.weight", 40),
            (
                "time_series_embedding.encoder.encoder_blocks.blocks.1.attn.qkv.weight",
                99,
            ),
            ("time_series_embedding.linear.weight", 200),
            ("model.layers.0.self_attn.q_proj.weight", 517),
        ],
        1e-2,
        5e-3,
    );
}

fn lora_model(cfg_lora: &LoraConfig, adapters: &VarMap) -> (ClinicalVlm, ParamStore) {
    let cfg = read_config(&tiny_dir()).unwrap();
    let (vb, _) = checkpoint_var_builder(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let freeze = Freeze {
        vision_tower: true,
        time_series_encoder: true,
        llm: true,
    };
    let (vb, store) = trainable_var_builder(vb, freeze);
    let lora = LoraBuilder {
        cfg: cfg_lora.clone(),
        vb: VarBuilder::from_varmap(adapters, DType::F32, &Device::Cpu),
    };
    (
        ClinicalVlm::new_with_lora(&cfg, vb, Some(&lora)).unwrap(),
        store,
    )
}

#[test]
fn fresh_lora_adapters_change_nothing_and_receive_gradients() {
    let lcfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: all_targets(),
    };
    let adapters = VarMap::new();
    let (model, store) = lora_model(&lcfg, &adapters);
    assert!(store.trainable().unwrap().is_empty());
    assert_eq!(model.adapted_projs().len(), 2 * 7);
    assert_eq!(adapters.all_vars().len(), 2 * 7 * 2);
    let (inputs, expected) = case_inputs(&cases(), "ecg_image_text");
    let got = model.forward(&inputs, ForwardMode::Inference).unwrap();
    assert!(max_abs(&got, &expected) < 1e-4);
    let grads = loss(&model, &inputs).backward().unwrap();
    let data = adapters.data().lock().unwrap();
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite(), "{name}");
        // B starts at zero, so only B gets a non-zero gradient on the first step.
        if name.contains("lora_B") {
            assert!(n > 0.0, "{name}");
        }
    }
}

#[test]
fn merged_save_reproduces_the_adapted_model_under_checkpoint_keys() {
    let lcfg = LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    let adapters = VarMap::new();
    let (model, store) = lora_model(&lcfg, &adapters);
    assert_eq!(model.adapted_projs().len(), 2 * 3);
    // Give B non-zero values so the adapters matter.
    for (i, var) in adapters.all_vars().iter().enumerate() {
        let t = var.as_tensor();
        let v = Tensor::randn(0f32, 0.3, t.shape(), &Device::Cpu).unwrap();
        var.set(&(v + i as f64 * 0.0).unwrap()).unwrap();
    }
    let (inputs, expected) = case_inputs(&cases(), "ecg_image_text");
    let adapted = model.forward(&inputs, ForwardMode::Inference).unwrap();
    assert!(
        max_abs(&adapted, &expected) > 1e-2,
        "adapters must change the logits"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    save_merged(&model, &store, &dir.path().join("model.safetensors")).unwrap();
    let saved =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let original =
        candle_core::safetensors::load(tiny_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut keys: Vec<_> = saved.keys().cloned().collect();
    let mut want: Vec<_> = original.keys().cloned().collect();
    keys.sort();
    want.sort();
    assert_eq!(keys, want, "merged file uses exactly the checkpoint's keys");
    let (_, merged) = load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let got = merged.forward(&inputs, ForwardMode::Inference).unwrap();
    let d = max_abs(&got, &adapted);
    assert!(d < 1e-4, "merged model differs from the adapted one by {d}");
}

/// The value model from the tiny policy: weights without `lm_head`, a fresh `score` head, and a
/// scalar depending on every value.
fn value_model(freeze: Freeze) -> (qoq_model::ValueModel, ParamStore, Vec<String>) {
    let cfg = read_config(&tiny_dir()).unwrap();
    let policy =
        candle_core::safetensors::load(tiny_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let weights = qoq_model::value::value_weights_from_policy(policy, &cfg, 0).unwrap();
    let names: Vec<String> = weights.keys().cloned().collect();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let (vb, store) = trainable_var_builder(vb, freeze);
    (qoq_model::ValueModel::new(&cfg, vb).unwrap(), store, names)
}

#[test]
fn value_model_every_trainable_parameter_receives_a_finite_nonzero_gradient() {
    let (model, store, names) = value_model(Freeze::default());
    assert!(names.iter().all(|n| !n.starts_with("lm_head.")));
    let (inputs, _) = case_inputs(&cases(), "ecg_image_text");
    let v = model.forward(&inputs, ForwardMode::Train).unwrap();
    let (b, s) = v.dims2().unwrap();
    assert_eq!(
        (b, s),
        inputs.input_ids.dims2().unwrap(),
        "one value per position"
    );
    let w: Vec<f32> = (0..b * s).map(|i| ((i as f32) * 0.7548776).sin()).collect();
    let w = Tensor::from_vec(w, (b, s), &Device::Cpu).unwrap();
    let grads = (v * w).unwrap().sum_all().unwrap().backward().unwrap();
    let trainable = store.trainable().unwrap();
    // Every parameter of the value model (its keys) but ECG-JEPA's fixed table trains.
    assert_eq!(trainable.len(), names.len() - 1);
    let mut head = 0;
    for (name, var) in &trainable {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite() && n > 0.0, "{name}: gradient norm² {n}");
        head += usize::from(Component::of(name) == Component::ValueHead);
    }
    assert_eq!(head, 2, "score.weight and score.bias train");
    // The fresh head is deterministic and small; the body is the policy's.
    let (again, _, _) = value_model(Freeze::default());
    let v1 = model.forward(&inputs, ForwardMode::Inference).unwrap();
    let v2 = again.forward(&inputs, ForwardMode::Inference).unwrap();
    assert_eq!(v1.to_vec2::<f32>().unwrap(), v2.to_vec2::<f32>().unwrap());
    // Built over the policy's checkpoint directly, it is the same model.
    let cfg = read_config(&tiny_dir()).unwrap();
    let (vb, _) = checkpoint_var_builder(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let direct =
        qoq_model::ValueModel::new(&cfg, qoq_model::value::value_var_builder(vb, 0)).unwrap();
    let v3 = direct.forward(&inputs, ForwardMode::Inference).unwrap();
    assert_eq!(v1.to_vec2::<f32>().unwrap(), v3.to_vec2::<f32>().unwrap());
}

#[test]
fn value_model_head_trains_even_when_the_llm_is_frozen_and_it_has_no_logits() {
    let freeze = Freeze {
        vision_tower: true,
        time_series_encoder: true,
        llm: true,
    };
    let (model, store, _) = value_model(freeze);
    let trainable: Vec<String> = store
        .trainable()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(trainable, vec!["score.bias", "score.weight"]);
    let h = Tensor::zeros((1, 2, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(model.body().logits_from_hidden(&h).is_err());
}
