//! The trainer with bf16 compute over f32 master weights (`model.compute_dtype = "bf16"`) and
//! with LoRA adapters (`[model.lora]`): what trains, what the reference holds, what checkpoints
//! hold, the PEFT export, and kill-and-resume giving bit-identical weights and metrics.

use candle_core::DType;
use qoq_rl::config::{DtypeName, LoraSection, RunConfig};
use qoq_rl::trainer::Trainer;
use std::path::Path;

mod support;

use support::{Vowels, comparable, config, text_manifest, tiny_model, weights};

/// bf16 compute over f32 masters: 2 prompts × 2 rollouts, two optimiser steps per step (so the
/// compute copies are retaken between the mini-batches of a step).
fn mixed(model: &Path, manifest: &Path, out: &Path, steps: u64) -> RunConfig {
    let mut c = config(model, manifest, out, 2, 2, 6, 1e-3, steps, 1, true);
    c.model.compute_dtype = DtypeName::Bf16;
    c
}

fn lora(model: &Path, manifest: &Path, out: &Path, steps: u64) -> RunConfig {
    let mut c = config(model, manifest, out, 4, 4, 6, 1e-2, steps, 1, true);
    c.model.lora = Some(LoraSection {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "up_proj".into()],
    });
    c
}

/// Kills a run after 2 of its steps (checkpoint at 2, a lost third step) and resumes it to
/// the end: weights, adapters and metrics equal a straight run's, bit for bit.
fn kill_and_resume(cfg: impl Fn(&Path) -> RunConfig, root: &Path) -> (Trainer, Trainer) {
    let mut a = Trainer::with_reward(cfg(&root.join("a")), Box::new(Vowels)).unwrap();
    a.run().unwrap();
    let mut b = Trainer::with_reward(cfg(&root.join("b")), Box::new(Vowels)).unwrap();
    b.step().unwrap();
    b.step().unwrap();
    let ck = b.save_checkpoint().unwrap();
    b.step().unwrap();
    drop(b);
    let mut b = Trainer::resume_with_reward(&ck, Box::new(Vowels)).unwrap();
    assert_eq!(b.step_count(), 2);
    b.run().unwrap();
    assert_eq!(weights(&a), weights(&b), "weights differ after resuming");
    assert_eq!(
        comparable(&a),
        comparable(&b),
        "metrics differ after resuming"
    );
    assert_eq!(a.optimizer().steps(), b.optimizer().steps());
    (a, b)
}

#[test]
fn bf16_compute_trains_the_f32_masters_with_a_bf16_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 6);
    let mut t = Trainer::with_reward(
        mixed(&model, &manifest, &dir.path().join("run"), 1),
        Box::new(Vowels),
    )
    .unwrap();
    assert_eq!(
        t.model().dtype(),
        DType::BF16,
        "the policy computes in bf16"
    );
    let reference = t
        .reference_model()
        .expect("the KL loss needs the reference");
    assert_eq!(
        reference.dtype(),
        DType::BF16,
        "the reference is held in bf16"
    );
    let before = weights(&t);
    let o = t.step().unwrap();
    for key in ["actor/pg_loss", "actor/kl_loss", "actor/grad_norm"] {
        let v = o.metrics[key];
        assert!(v.is_finite(), "{key} = {v}");
    }
    assert!(o.metrics["actor/grad_norm"] > 0.0);
    // The masters stay f32 and every trainable one moved.
    let w = t.weights().unwrap();
    assert!(w.values().all(|x| x.dtype() == DType::F32));
    let after = weights(&t);
    // Every decoder parameter moves (deep encoder weights of this random tiny checkpoint get
    // gradients below AdamW's epsilon, as in the f32 run's test).
    let unchanged: Vec<&String> = before
        .iter()
        .filter(|(k, v)| {
            (k.starts_with("model.") || k.starts_with("lm_head.")) && after[k.as_str()] == **v
        })
        .map(|(k, _)| k)
        .collect();
    assert!(
        unchanged.is_empty(),
        "unchanged decoder parameters: {unchanged:?}"
    );
    assert!(
        before
            .iter()
            .any(|(k, v)| k.starts_with("visual.") && after[k] != *v)
    );
    // The compute copies follow the updated masters.
    assert_eq!(t.model().dtype(), DType::BF16);
    // Checkpoints save the f32 masters.
    let ck = t.save_checkpoint().unwrap();
    let saved =
        candle_core::safetensors::load(ck.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(saved.values().all(|x| x.dtype() == DType::F32));
    assert_eq!(saved.len(), w.len());
}

#[test]
fn bf16_compute_kill_and_resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 6);
    kill_and_resume(|out| mixed(&model, &manifest, out, 3), dir.path());
}

#[test]
fn bf16_masters_with_adamw_bf16_still_train() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 6);
    let mut c = config(
        &model,
        &manifest,
        &dir.path().join("run"),
        4,
        4,
        6,
        1e-3,
        1,
        1,
        true,
    );
    c.model.master_dtype = DtypeName::Bf16;
    c.model.compute_dtype = DtypeName::Bf16;
    c.actor.strategy = qoq_rl::config::OptimizerStrategy::AdamwBf16;
    let mut t = Trainer::with_reward(c, Box::new(Vowels)).unwrap();
    let as_f32 = |t: &Trainer| -> std::collections::BTreeMap<String, Vec<f32>> {
        let w = t.weights().unwrap();
        assert!(w.values().all(|x| x.dtype() == DType::BF16));
        w.into_iter()
            .map(|(k, v)| {
                let v = v.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                (k, v.to_vec1::<f32>().unwrap())
            })
            .collect()
    };
    let before = as_f32(&t);
    let o = t.step().unwrap();
    assert!(o.metrics["actor/grad_norm"].is_finite());
    assert_eq!(t.model().dtype(), DType::BF16);
    assert_eq!(
        t.optimizer().precision(),
        qoq_rl::optim::Precision::Bf16Kahan
    );
    assert_ne!(before, as_f32(&t));
}

#[test]
fn lora_trains_only_the_adapters_and_checkpoints_them_in_peft_layout() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 6);
    let out = dir.path().join("run");
    let mut t = Trainer::with_reward(lora(&model, &manifest, &out, 2), Box::new(Vowels)).unwrap();
    let base = weights(&t);
    let adapters0 = t.adapters().unwrap().unwrap();
    // Two layers × three targets × (A, B).
    assert_eq!(adapters0.len(), 2 * 3 * 2);
    t.run().unwrap();
    // The optimiser state is the adapters' alone.
    let state = t.optimizer().state_tensors().unwrap();
    let mut names: Vec<String> = state
        .keys()
        .filter_map(|k| k.strip_prefix("m.").map(String::from))
        .collect();
    names.sort();
    let mut want: Vec<String> = adapters0.keys().cloned().collect();
    want.sort();
    assert_eq!(names, want);
    // The adapters moved (B away from zero); the weights changed exactly on the targets.
    let adapters = t.adapters().unwrap().unwrap();
    let b = &adapters["model.layers.0.self_attn.q_proj.lora_B.weight"];
    let b_abs = b
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(b_abs > 0.0, "lora_B trained");
    let merged = weights(&t);
    for (k, v) in &base {
        let targeted = ["q_proj", "v_proj", "up_proj"]
            .iter()
            .any(|p| k.ends_with(&format!("{p}.weight")))
            && k.starts_with("model.layers.");
        assert_eq!(merged[k] != *v, targeted, "{k}");
    }
    // The checkpoint holds the merged weights and the adapters in PEFT's layout.
    let ck = out.join("checkpoint_step_2");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (c["r"].as_u64(), c["lora_alpha"].as_u64()),
        (Some(2), Some(4))
    );
    assert_eq!(c["base_model_name_or_path"], model.display().to_string());
    let saved = candle_core::safetensors::load(
        ck.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(saved.len(), adapters.len());
    assert!(saved.contains_key("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"));
    // The export: an HF model folder with the merged weights, and the PEFT adapter.
    let export = dir.path().join("export");
    let adapter_dir = t
        .export(&export)
        .unwrap()
        .expect("a LoRA run exports its adapter");
    assert_eq!(adapter_dir, export.join("adapter"));
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(export.join(f).is_file(), "{f}");
    }
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(adapter_dir.join(f).is_file(), "{f}");
    }
    let exported =
        candle_core::safetensors::load(export.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let k = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(
        exported[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        merged[k]
    );
}

#[test]
fn lora_kill_and_resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 6);
    let (a, b) = kill_and_resume(|out| lora(&model, &manifest, out, 4), dir.path());
    let flat = |t: &Trainer| -> Vec<(String, Vec<f32>)> {
        let mut v: Vec<(String, Vec<f32>)> = t
            .adapters()
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|(k, x)| (k, x.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    assert_eq!(flat(&a), flat(&b), "adapters differ after resuming");
}

#[test]
fn lora_with_bf16_compute_trains_f32_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 6);
    let mut c = lora(&model, &manifest, &dir.path().join("run"), 1);
    c.model.compute_dtype = DtypeName::Bf16;
    let mut t = Trainer::with_reward(c, Box::new(Vowels)).unwrap();
    // The frozen base is held in bf16 only, and the reference (the base) is bf16.
    assert_eq!(t.model().dtype(), DType::BF16);
    assert_eq!(t.reference_model().unwrap().dtype(), DType::BF16);
    let o = t.step().unwrap();
    assert!(o.metrics["actor/grad_norm"].is_finite() && o.metrics["actor/grad_norm"] > 0.0);
    let adapters = t.adapters().unwrap().unwrap();
    assert!(adapters.values().all(|x| x.dtype() == DType::F32));
    // The merged weights come out in the master dtype (f32): the bf16 base exactly, plus the
    // adapters' update unrounded.
    let w = t.weights().unwrap();
    assert!(w.values().all(|x| x.dtype() == DType::F32));
    let k = "model.embed_tokens.weight";
    let rounded = w[k]
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(
        rounded.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        w[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        "the frozen base is the bf16 one"
    );
    // And the run resumes from its checkpoint (the base check passes on the bf16 base).
    let ck = t.save_checkpoint().unwrap();
    drop(t);
    let r = Trainer::resume_with_reward(&ck, Box::new(Vowels)).unwrap();
    assert_eq!(r.step_count(), 1);
    assert_eq!(r.adapters().unwrap().unwrap().len(), adapters.len());
    let _ = r.weights().unwrap();
    assert!(r.is_finished());
}

#[test]
fn lora_settings_that_cannot_work_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 6);
    let out = dir.path().join("run");
    let err = |f: &dyn Fn(&mut RunConfig)| {
        let mut c = lora(&model, &manifest, &out, 1);
        f(&mut c);
        c.validate().unwrap_err().to_string()
    };
    let e = err(&|c| c.model.lora.as_mut().unwrap().dropout = 0.05);
    assert!(
        e.contains("model.lora.dropout") && e.contains("not implemented"),
        "{e}"
    );
    let e = err(&|c| c.model.lora.as_mut().unwrap().rank = 0);
    assert!(e.contains("model.lora.rank"), "{e}");
    let e = err(&|c| c.model.lora.as_mut().unwrap().target_modules = vec!["qkv".into()]);
    assert!(
        e.contains("model.lora.target_modules") && e.contains("`qkv`"),
        "{e}"
    );
    let e = err(&|c| c.model.trainable = Some(vec!["llm".into()]));
    assert!(
        e.contains("model.lora") && e.contains("model.trainable"),
        "{e}"
    );
    // In a run file.
    let text = "[model.lora]\nrank = 8\nalpha = 16\ntarget_modules = [\"q_proj\", \"v_proj\"]\n";
    let c = RunConfig::from_toml_str(text, "run.toml").unwrap();
    let l = c.model.lora.unwrap();
    assert_eq!((l.rank, l.alpha, l.dropout), (8, 16.0, 0.0));
}

/// The actor loss (clipped surrogate + k3 KL to the reference) of a captured RL micro-batch
/// under `policy`, with `reference`'s log-probs.
fn actor_loss(
    policy: &qoq_model::ClinicalVlm,
    reference: &qoq_model::ClinicalVlm,
    mb: &qoq_rl::trainer::CapturedMicroBatch,
    cfg: &qoq_rl::loss::LossConfig,
) -> (candle_core::Tensor, candle_core::Tensor) {
    use qoq_model::ForwardMode;
    use qoq_rl::trainer::response_log_probs;
    let at = qoq_model::ResponseAt::After(mb.s);
    let lp =
        response_log_probs(policy, &mb.inputs, &at, &mb.labels, ForwardMode::Train, 1).unwrap();
    let rl = response_log_probs(
        reference,
        &mb.inputs,
        &at,
        &mb.labels,
        ForwardMode::Inference,
        1,
    )
    .unwrap()
    .detach();
    let inputs = qoq_rl::loss::ActorLossInputs {
        policy: qoq_rl::loss::PolicyLossInputs {
            old_log_probs: &mb.old_log_probs,
            log_probs: &lp,
            advantages: &mb.advantages,
            response_mask: &mb.mask,
        },
        kl: Some(qoq_rl::loss::KlTerm::RefLogProbs(&rl)),
    };
    let out = qoq_rl::loss::compute_actor_loss(&inputs, cfg).unwrap();
    (out.loss, lp)
}

/// A fresh tiny model in `dir`, the loss settings of an RL run on it (`batch` prompts ×
/// `batch` rollouts, KL to the reference) and a real micro-batch (rollouts, advantages, old
/// log-probs) captured from that run's first f32 step.
fn captured_f32_step(
    dir: &Path,
    batch: usize,
) -> (
    std::path::PathBuf,
    qoq_rl::loss::LossConfig,
    qoq_rl::trainer::CapturedMicroBatch,
) {
    let model = tiny_model(dir);
    let manifest = text_manifest(dir, 6);
    let cfg = config(
        &model,
        &manifest,
        &dir.join("run"),
        batch,
        batch,
        6,
        1e-3,
        1,
        1,
        true,
    );
    let loss_cfg = cfg.loss_config();
    let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    t.set_capture(true);
    t.step().unwrap();
    let captured = t.take_captured().unwrap();
    let mb = captured.micro_batches.into_iter().next().unwrap();
    (model, loss_cfg, mb)
}

#[test]
fn a_mixed_precision_rl_loss_tracks_the_f32_one_and_puts_f32_gradients_on_every_master() {
    use candle_core::Device;
    use qoq_model::loading::{checkpoint_var_builder, read_config};
    use qoq_model::train::{Freeze, cast_var_builder, trainable_var_builder};
    let dir = tempfile::tempdir().unwrap();
    let (model, loss_cfg, mb) = captured_f32_step(dir.path(), 4);
    let mb = &mb;
    // The initial policy in f32, and in bf16 copies of the same f32 masters.
    let mcfg = read_config(&model).unwrap();
    let (vb, _) = checkpoint_var_builder(&model, DType::F32, &Device::Cpu).unwrap();
    let (vb, store) = trainable_var_builder(vb, Freeze::default());
    let f32_policy = qoq_model::ClinicalVlm::new(&mcfg, vb).unwrap();
    let (vb16, copies) = cast_var_builder(&store, DType::BF16, &Device::Cpu);
    let bf16_policy = qoq_model::ClinicalVlm::new(&mcfg, vb16).unwrap();
    let reference = |dtype| {
        let (vb, _) = checkpoint_var_builder(&model, dtype, &Device::Cpu).unwrap();
        qoq_model::ClinicalVlm::new(&mcfg, vb).unwrap()
    };
    let (loss32, lp32) = actor_loss(&f32_policy, &reference(DType::F32), mb, &loss_cfg);
    let (loss16, lp16) = actor_loss(&bf16_policy, &reference(DType::BF16), mb, &loss_cfg);
    assert_eq!((loss16.dtype(), lp16.dtype()), (DType::F32, DType::F32));
    let scalar = |x: &candle_core::Tensor| x.to_scalar::<f32>().unwrap();
    // Token log-probs agree to bf16's precision (8 mantissa bits on logits of order 1-10).
    let lp_diff = scalar(&(&lp32 - &lp16).unwrap().abs().unwrap().max_all().unwrap());
    assert!(lp_diff < 0.1, "log-probs differ by up to {lp_diff}");
    let (a, b) = (scalar(&loss32), scalar(&loss16));
    assert!(
        (a - b).abs() <= 1e-2 + 2e-2 * a.abs(),
        "f32 loss {a}, bf16-compute loss {b}"
    );
    let g32 = loss32.backward().unwrap();
    let g16 = qoq_model::checkpoint::backward_onto_copies(
        &loss16,
        candle_core::backprop::GradStore::default(),
        &copies,
    )
    .unwrap();
    let norm = |x: &candle_core::Tensor| scalar(&x.sqr().unwrap().sum_all().unwrap()).sqrt();
    let mut checked = 0;
    for (name, var) in store.trainable().unwrap() {
        let Some(want) = g32.get(var.as_tensor()) else {
            continue; // not reached by this batch (the f32 run has no gradient either)
        };
        let got = g16
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient on the f32 master"));
        assert_eq!(got.dtype(), DType::F32, "{name}");
        let (n16, n32) = (norm(got), norm(want));
        assert!(n16.is_finite(), "{name}: gradient norm {n16}");
        if n32 > 1e-6 {
            let cos = scalar(&(got * want).unwrap().sum_all().unwrap()) / (n16 * n32);
            assert!(cos > 0.9, "{name}: cosine to the f32 gradient {cos}");
        }
        checked += 1;
    }
    assert!(checked > 20, "{checked} parameters checked");
}

/// Under activation checkpointing the response log-probs run in checkpointed chunks of
/// positions (one chunk's logits at a time): the same log-probs and, through
/// `checkpoint::backward`, the same gradient on every trainable parameter as the whole
/// `(b, r_len, vocab)` logits without checkpointing; the chunks really were recomputed.
#[test]
fn checkpointed_log_prob_chunks_give_the_whole_logits_values_and_gradients() {
    use candle_core::Device;
    use qoq_model::ForwardMode;
    use qoq_model::checkpoint;
    use qoq_model::loading::{checkpoint_var_builder, read_config};
    use qoq_model::train::{Freeze, trainable_var_builder};
    use qoq_rl::trainer::response_log_probs_chunked;
    let dir = tempfile::tempdir().unwrap();
    let (model, _, mb) = captured_f32_step(dir.path(), 2);
    let mb = &mb;
    let (b, r_len) = mb.labels.dims2().unwrap();
    assert!(r_len >= 3, "{r_len} response positions");
    let mcfg = read_config(&model).unwrap();
    let (vb, _) = checkpoint_var_builder(&model, DType::F32, &Device::Cpu).unwrap();
    let (vb, store) = trainable_var_builder(vb, Freeze::default());
    let policy = qoq_model::ClinicalVlm::new(&mcfg, vb).unwrap();
    let vocab = policy.lm_head().unwrap().weight().dim(0).unwrap();
    let at = qoq_model::ResponseAt::After(mb.s);
    let lp = |ckpt: bool, chunk: usize| {
        checkpoint::scope(ckpt, || {
            response_log_probs_chunked(
                &policy,
                &mb.inputs,
                &at,
                &mb.labels,
                ForwardMode::Train,
                1,
                chunk,
            )
            .unwrap()
        })
    };
    // A weighted sum, so that each position's gradient differs.
    let weights: Vec<f32> = (0..b * r_len).map(|i| 1.0 + i as f32 / 7.0).collect();
    let weights = candle_core::Tensor::from_vec(weights, (b, r_len), &Device::Cpu).unwrap();
    let loss = |lp: &candle_core::Tensor| (lp * &weights).unwrap().sum_all().unwrap();
    let plain = lp(false, usize::MAX);
    let before = checkpoint::recomputed();
    // Two positions per chunk: several chunks, the last one shorter when r_len is odd.
    let chunked = lp(true, 2 * b * vocab);
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(chunked.dims(), plain.dims());
    assert!(diff(&chunked, &plain) <= 1e-5, "log-probs differ");
    let gp = checkpoint::backward(&loss(&plain)).unwrap();
    let gc = checkpoint::backward(&loss(&chunked)).unwrap();
    assert!(
        checkpoint::recomputed() - before >= r_len.div_ceil(2) as u64,
        "the chunks were not recomputed"
    );
    let mut checked = 0;
    for (name, var) in store.trainable().unwrap() {
        let Some(want) = gp.get(var.as_tensor()) else {
            continue;
        };
        let got = gc
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient under checkpointing"));
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let scale = scale.to_scalar::<f32>().unwrap().max(1.0);
        let d = diff(got, want);
        assert!(d <= 1e-5 * scale, "{name}: gradients differ by {d}");
        checked += 1;
    }
    assert!(checked > 20, "{checked} parameters checked");
    // A label outside the vocabulary is this step's loss error, as without chunks, not an
    // error from inside a chunk's forward.
    let bad = candle_core::Tensor::full(vocab as u32, mb.labels.dims(), &Device::Cpu).unwrap();
    let e = checkpoint::scope(true, || {
        response_log_probs_chunked(
            &policy,
            &mb.inputs,
            &at,
            &bad,
            ForwardMode::Train,
            1,
            2 * b * vocab,
        )
        .unwrap_err()
    });
    assert!(
        matches!(
            e,
            qoq_rl::trainer::TrainerError::Loss {
                step: 1,
                source: qoq_rl::loss::LossError::LabelOutOfRange { .. }
            }
        ),
        "{e}"
    );
}

#[test]
fn a_lora_resume_on_another_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 6);
    let out = dir.path().join("run");
    let mut t = Trainer::with_reward(lora(&model, &manifest, &out, 1), Box::new(Vowels)).unwrap();
    t.step().unwrap();
    let ck = t.save_checkpoint().unwrap();
    drop(t);
    // The base at model.model_path is replaced by other weights.
    let cfg = qoq_core::hf_config::QwenVlConfig::from_file(&model.join("config.json")).unwrap();
    qoq_model::train::write_random_checkpoint_seeded(&cfg, &model, 5).unwrap();
    let e = Trainer::resume_with_reward(&ck, Box::new(Vowels))
        .err()
        .expect("a changed base is refused")
        .to_string();
    assert!(e.contains("base weights") && e.contains("differs"), "{e}");
}

#[test]
fn sft_with_bf16_compute_and_with_lora_lowers_the_answer_cross_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 4);
    for (name, lora_rank) in [("mixed", None), ("lora", Some(4))] {
        let out = dir.path().join(name);
        let mut cfg = config(&model, &manifest, &out, 4, 2, 16, 1e-2, 4, 4, false);
        cfg.model.compute_dtype = DtypeName::Bf16;
        if let Some(rank) = lora_rank {
            cfg.model.lora = Some(LoraSection {
                rank,
                alpha: 8.0,
                dropout: 0.0,
                target_modules: qoq_model::lora::all_targets(),
            });
            cfg.actor.optim.lr = 3e-2;
        }
        let mut t = Trainer::new(cfg).unwrap();
        t.set_sft(true);
        t.run().unwrap();
        let losses: Vec<f64> = t
            .records()
            .iter()
            .map(|r| r.metrics[qoq_rl::trainer::SFT_LOSS])
            .collect();
        assert_eq!(losses.len(), 4, "{name}");
        assert!(
            losses.iter().all(|l| l.is_finite()) && losses[3] < losses[0],
            "{name}: SFT loss did not fall: {losses:?}"
        );
    }
}

#[test]
fn ppo_with_gae_runs_a_bf16_compute_actor_beside_its_f32_value_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 6);
    let mut c = mixed(&model, &manifest, &dir.path().join("run"), 1);
    c.algorithm.estimator = qoq_rl::config::EstimatorKind::Gae;
    let mut t = Trainer::with_reward(c, Box::new(Vowels)).unwrap();
    let o = t.step().unwrap();
    assert_eq!(t.model().dtype(), DType::BF16);
    for key in ["actor/grad_norm", "critic/grad_norm"] {
        let v = o.metrics.get(key).copied().unwrap_or(f64::NAN);
        assert!(v.is_finite(), "{key} = {v}");
    }
}
