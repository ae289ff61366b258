//! Mixed precision (bf16 compute copies of f32 master weights, [`cast_var_builder`]) and LoRA
//! adapters in PEFT's layout: gradients land on the f32 masters, the bf16 loss stays close to the
//! f32 one, PEFT key names and shapes, the merged weight is `W + alpha/r · B A`.

mod support;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use qoq_model::loading::{checkpoint_var_builder, read_config};
use qoq_model::lora::{self, LoraBuilder, LoraConfig};
use qoq_model::train::{Freeze, cast_var_builder, merged_tensors, trainable_var_builder};
use qoq_model::{ClinicalVlm, ForwardMode, ModelInputs};
use support::*;

/// Mean token log-likelihood of the input ids under the model, computed in f32 from the logits
/// (as the trainer's loss: the logits are upcast before the log-softmax).
fn f32_loss(model: &ClinicalVlm, inputs: &ModelInputs) -> Tensor {
    let logits = model
        .forward(inputs, ForwardMode::Train)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let lp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
    let ids = inputs
        .input_ids
        .to_dtype(DType::U32)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    let picked = lp.gather(&ids, 2).unwrap();
    picked.mean_all().unwrap().neg().unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
}

fn norm(t: &Tensor) -> f32 {
    scalar(
        &t.to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap(),
    )
    .sqrt()
}

#[test]
fn bf16_compute_over_f32_masters_puts_f32_gradients_on_every_master() {
    let cfg = read_config(&tiny_dir()).unwrap();
    let (inputs, _) = case_inputs(&cases(), "ecg_image_text");
    // The f32 run.
    let (vb, _) = checkpoint_var_builder(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let (vb, store) = trainable_var_builder(vb, Freeze::default());
    let master = ClinicalVlm::new(&cfg, vb).unwrap();
    let loss32 = f32_loss(&master, &inputs);
    let grads32 = loss32.backward().unwrap();
    // The mixed run: bf16 copies of the same masters.
    let (vb16, copies) = cast_var_builder(&store, DType::BF16, &Device::Cpu);
    let mixed = ClinicalVlm::new(&cfg, vb16).unwrap();
    assert_eq!(mixed.dtype(), DType::BF16);
    let logits = mixed.forward(&inputs, ForwardMode::Train).unwrap();
    assert_eq!(logits.dtype(), DType::BF16, "the forward computes in bf16");
    let loss16 = f32_loss(&mixed, &inputs);
    assert_eq!(loss16.dtype(), DType::F32);
    let (a, b) = (scalar(&loss32), scalar(&loss16));
    // bf16 keeps 8 bits of mantissa (relative precision 2^-8 ≈ 0.4 %) per operation.
    assert!(
        (a - b).abs() <= 2e-2 * a.abs().max(1.0),
        "f32 loss {a}, bf16-compute loss {b}"
    );
    // A plain backward leaves the gradients on the bf16 copies (each copy is a leaf `Var`).
    let plain = loss16.backward().unwrap();
    let pairs = copies.pairs().unwrap();
    assert!(
        pairs
            .iter()
            .all(|(c, m)| plain.get(c.as_tensor()).is_some() && plain.get(m.as_tensor()).is_none())
    );
    // backward_onto_copies brings them to the masters in f32 (the projections and the
    // embedding add theirs into the masters' sums during the backward, the rest at its end) and
    // leaves none on the copies: the same values as the copies' bf16 gradients widened, up to
    // the f32 sum of a tied weight's two uses (bf16 in the plain backward).
    let grads16 = qoq_model::checkpoint::backward_onto_copies(
        &loss16,
        candle_core::backprop::GradStore::default(),
        &copies,
    )
    .unwrap();
    for (copy, master) in &pairs {
        assert!(grads16.get(copy.as_tensor()).is_none());
        let got = grads16
            .get(master.as_tensor())
            .expect("a master's gradient");
        let want = plain
            .get(copy.as_tensor())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let diff = scalar(&(got - &want).unwrap().abs().unwrap().max_all().unwrap());
        let scale = scalar(&want.abs().unwrap().max_all().unwrap());
        assert!(
            diff <= 1e-2 * scale.max(1e-12),
            "master {:?}: {diff} off the copy's gradient (max {scale})",
            master.dims()
        );
    }
    let trainable = store.trainable().unwrap();
    assert!(!trainable.is_empty());
    assert_eq!(
        pairs.len(),
        trainable.len(),
        "one copy per trained parameter"
    );
    for (name, var) in &trainable {
        let g = grads16
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient on the master"));
        assert_eq!(
            g.dtype(),
            DType::F32,
            "{name}: gradient in the masters' dtype"
        );
        let g32 = grads32.get(var.as_tensor()).unwrap();
        let (n16, n32) = (norm(g), norm(g32));
        assert!(n16.is_finite() && n16 > 0.0, "{name}: gradient norm {n16}");
        // The direction agrees with the f32 gradient.
        let cos = scalar(&(g * g32).unwrap().sum_all().unwrap()) / (n16 * n32);
        assert!(cos > 0.95, "{name}: cosine to the f32 gradient {cos}");
    }
    // An update of a master reaches the next compute copies (taken at model building).
    let (name, var) = &trainable[0];
    let before = mixed_first(&store, name);
    var.set(&(var.as_tensor() + 1.0).unwrap()).unwrap();
    let after = mixed_first(&store, name);
    assert!(
        (after - before - 1.0).abs() < 1e-2,
        "{name}: {before} → {after}"
    );
    // ... and `refresh` writes it into the copy the built model reads, in place.
    let (copy, _) = pairs
        .iter()
        .find(|(_, m)| m.as_tensor().id() == var.as_tensor().id())
        .expect("the master's copy");
    let first = |t: &Tensor| scalar(&t.flatten_all().unwrap().get(0).unwrap());
    assert!((first(copy.as_tensor()) - before).abs() < 1e-6);
    copies.refresh().unwrap();
    assert_eq!(first(copy.as_tensor()), after, "{name}");
}

fn mixed_first(store: &qoq_model::train::ParamStore, name: &str) -> f32 {
    let (vb, _) = cast_var_builder(store, DType::BF16, &Device::Cpu);
    let t = vb.get_unchecked(name).unwrap();
    assert_eq!(t.dtype(), DType::BF16);
    scalar(&t.flatten_all().unwrap().get(0).unwrap())
}

fn lora_model(lcfg: &LoraConfig, adapters: &VarMap) -> (ClinicalVlm, qoq_model::train::ParamStore) {
    let cfg = read_config(&tiny_dir()).unwrap();
    let (vb, _) = checkpoint_var_builder(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let freeze = Freeze {
        vision_tower: true,
        time_series_encoder: true,
        llm: true,
    };
    let (vb, store) = trainable_var_builder(vb, freeze);
    let lora = LoraBuilder {
        cfg: lcfg.clone(),
        vb: VarBuilder::from_varmap(adapters, DType::F32, &Device::Cpu),
    };
    let model = ClinicalVlm::new_with_lora(&cfg, vb, Some(&lora)).unwrap();
    (model, store)
}

#[test]
fn peft_layout_names_shapes_and_config_of_the_tiny_model() {
    let lcfg = LoraConfig {
        rank: 4,
        alpha: 16.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    let adapters = VarMap::new();
    let (_model, _) = lora_model(&lcfg, &adapters);
    lora::seed_adapters(&adapters, 7).unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = adapters
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    lora::write_peft(
        dir.path(),
        &lcfg,
        0.0,
        "Qwen/Qwen2.5-VL-7B-Instruct",
        &tensors,
    )
    .unwrap();
    // Keys and shapes as PEFT saves them for Qwen2.5-VL (transformers 4.51 module paths).
    let saved =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let cfg = read_config(&tiny_dir()).unwrap();
    let t = &cfg.text;
    let (h, hd) = (t.hidden_size, t.hidden_size / t.num_attention_heads);
    let mut want = std::collections::BTreeMap::new();
    for l in 0..t.num_hidden_layers {
        let p = format!("base_model.model.model.layers.{l}");
        want.insert(format!("{p}.self_attn.q_proj.lora_A.weight"), vec![4, h]);
        want.insert(
            format!("{p}.self_attn.q_proj.lora_B.weight"),
            vec![t.num_attention_heads * hd, 4],
        );
        want.insert(format!("{p}.self_attn.v_proj.lora_A.weight"), vec![4, h]);
        want.insert(
            format!("{p}.self_attn.v_proj.lora_B.weight"),
            vec![t.num_key_value_heads * hd, 4],
        );
        want.insert(
            format!("{p}.mlp.down_proj.lora_A.weight"),
            vec![4, t.intermediate_size],
        );
        want.insert(format!("{p}.mlp.down_proj.lora_B.weight"), vec![h, 4]);
    }
    let got: std::collections::BTreeMap<String, Vec<usize>> = saved
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    assert_eq!(got, want);
    let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let c: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(c["r"], 4);
    assert_eq!(c["lora_alpha"], 16);
    assert_eq!(c["lora_dropout"], 0.0);
    assert_eq!(c["base_model_name_or_path"], "Qwen/Qwen2.5-VL-7B-Instruct");
    // The target regex matches exactly the adapted decoder modules, not the vision MLP.
    let target = c["target_modules"].as_str().unwrap();
    assert_eq!(
        target,
        r"model\.layers\.\d+\.(self_attn\.(q_proj|v_proj)|mlp\.(down_proj))"
    );
    // Read back under this crate's names, bit for bit.
    let back = lora::read_peft_weights(&dir.path().join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(back.len(), tensors.len());
    for (k, v) in &tensors {
        let b = &back[k];
        assert_eq!(
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k}"
        );
    }
    // Seeded: the same seed draws the same A, B stays zero.
    let again = VarMap::new();
    let _ = lora_model(&lcfg, &again);
    lora::seed_adapters(&again, 7).unwrap();
    let data = again.data().lock().unwrap();
    for (k, v) in data.iter() {
        let x = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            x,
            tensors[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k}"
        );
        if k.contains("lora_B") {
            assert!(x.iter().all(|&v| v == 0.0), "{k}");
        }
    }
}

#[test]
fn merged_weight_is_base_plus_scaled_b_times_a() {
    let lcfg = LoraConfig {
        rank: 2,
        alpha: 6.0,
        targets: vec!["q_proj".into()],
    };
    let adapters = VarMap::new();
    let (model, store) = lora_model(&lcfg, &adapters);
    lora::seed_adapters(&adapters, 3).unwrap();
    let name = "model.layers.1.self_attn.q_proj";
    let data = adapters.data().lock().unwrap();
    let a = data[&format!("{name}.lora_A.weight")].as_tensor().clone();
    let b_var = &data[&format!("{name}.lora_B.weight")];
    let b = lora_b_values(b_var.dims());
    b_var.set(&b).unwrap();
    drop(data);
    let merged = merged_tensors(&model, &store).unwrap();
    let base = store
        .tensors()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == &format!("{name}.weight"))
        .unwrap()
        .1;
    // Element by element, in f64: W[i][j] + alpha/r · Σ_k B[i][k] A[k][j].
    let w = base.to_vec2::<f32>().unwrap();
    let av = a.to_vec2::<f32>().unwrap();
    let bv = b.to_vec2::<f32>().unwrap();
    let got = merged[&format!("{name}.weight")].to_vec2::<f32>().unwrap();
    let scale = 6.0 / 2.0;
    for i in 0..w.len() {
        for j in 0..w[0].len() {
            let d: f64 = (0..2).map(|k| bv[i][k] as f64 * av[k][j] as f64).sum();
            let want = w[i][j] as f64 + scale * d;
            assert!(
                (got[i][j] as f64 - want).abs() < 1e-5,
                "[{i}][{j}]: {} vs {want}",
                got[i][j]
            );
        }
    }
    // Projections without adapters are the base weights.
    let k = "model.layers.1.self_attn.k_proj.weight";
    let base_k = store
        .tensors()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == k)
        .unwrap()
        .1;
    assert_eq!(
        merged[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        base_k.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

fn lora_b_values(dims: &[usize]) -> Tensor {
    let n = dims.iter().product::<usize>();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.1).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}
