//! The training loop on a tiny random model (the processor fixture's config and tokenizer):
//! one step end to end on the multimodal mini manifest, learning a toy reward, and
//! kill-and-resume giving bit-identical weights and metrics.

use qoq_core::RewardScore;
use qoq_reward::{RewardFn, RewardInput};
use qoq_rl::trainer::Trainer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod support;

use support::{Vowels, comparable, config, repo, text_manifest, tiny_model, val_manifest, weights};

#[test]
fn one_step_on_the_mini_manifest_updates_every_trainable_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = repo().join("examples/mini/manifest.jsonl");
    let out = dir.path().join("run");
    let cfg = config(&model, &manifest, &out, 4, 2, 6, 1e-3, 1, 1, true);
    let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    let before = weights(&t);
    let o = t.step().unwrap();
    assert_eq!(o.step, 1);
    for key in [
        "actor/pg_loss",
        "actor/grad_norm",
        "actor/lr",
        "actor/kl_loss",
        "reward/overall",
        "critic/score/mean",
        "critic/advantages/mean",
        "response_length/mean",
        "response_length/clip_ratio",
        "perf/time_per_step",
    ] {
        let v = o
            .metrics
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing"));
        assert!(v.is_finite(), "{key} = {v}");
    }
    assert!(o.metrics["actor/grad_norm"] > 0.0);
    // One optimiser step per mini-batch: 4 prompts × 2 rollouts / (2 × 2).
    assert_eq!(t.optimizer().steps() + t.optimizer().skipped(), 2);
    let after = weights(&t);
    assert_eq!(t.optimizer().skipped(), 0);
    // Every decoder parameter moves; the encoders receive gradients (at least one tensor of
    // each moves). Deep encoder weights of this random tiny checkpoint get gradients below
    // AdamW's epsilon, so not all of their tensors are required to move.
    let mut unchanged = Vec::new();
    let mut moved_in = BTreeMap::<&str, usize>::new();
    for (k, v) in &before {
        if k.ends_with(".pos_embed") {
            continue; // fixed sin-cos table, not trained
        }
        let component = k.split('.').next().unwrap();
        if after[k] != *v {
            *moved_in.entry(component).or_default() += 1;
        } else if component == "model" || component == "lm_head" {
            unchanged.push(k.clone());
        }
    }
    assert!(
        unchanged.is_empty(),
        "unchanged decoder parameters: {unchanged:?}"
    );
    for c in ["model", "lm_head", "visual", "time_series_embedding"] {
        assert!(
            moved_in.get(c).copied().unwrap_or(0) > 0,
            "{c}: nothing moved ({moved_in:?})"
        );
    }
    // The metrics log holds the step.
    let recs = qoq_rl::metrics_log::read_records(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(
        recs[0].metrics["reward/overall"],
        o.metrics["reward/overall"]
    );
    // Validation: the chest X-ray's box is given in the pixels of the image the model saw
    // (160x128 resized under max_pixels 12544), as its predicted boxes are.
    let val = t.validate(1).unwrap();
    assert!(val["val/reward_score"].is_finite());
    let text = std::fs::read_to_string(out.join("val_generations_1.jsonl")).unwrap();
    let cxr: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["dataset"] == "demo-cxr")
        .unwrap();
    let to = qoq_data::vision::dataset_resize_dims(160, 128, 3136, 12544);
    assert_ne!(to, (160, 128));
    let want = qoq_data::vision::rescale_bbox([42.0, 32.0, 78.0, 68.0], (160, 128), to);
    let got: Vec<f64> = cxr["bbox"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got, want.to_vec());
    // Per-domain rewards of the mini manifest's datasets.
    assert!(
        o.metrics.keys().any(|k| k.contains("demo-cxr")),
        "{:?}",
        o.metrics.keys()
    );
}

#[test]
fn a_toy_reward_rises_within_a_few_steps() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 8);
    let out = dir.path().join("run");
    let steps = 16;
    let cfg = config(&model, &manifest, &out, 4, 8, 8, 1e-2, steps, 100, false);
    let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    let mut rewards = Vec::new();
    for _ in 0..steps {
        rewards.push(t.step().unwrap().metrics["reward/overall"]);
    }
    let first: f64 = rewards[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = rewards[rewards.len() - 3..].iter().sum::<f64>() / 3.0;
    eprintln!("rewards: {rewards:?}");
    assert!(
        last > first + 0.1,
        "mean reward did not rise: first {first:.3}, last {last:.3} ({rewards:?})"
    );
}

#[test]
fn kill_and_resume_gives_bit_identical_weights_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 6);
    // Straight run: 4 steps, checkpoints every 2.
    let out_a = dir.path().join("a");
    let cfg = config(&model, &manifest, &out_a, 4, 4, 6, 1e-3, 4, 2, true);
    let mut a = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    a.run().unwrap();
    assert_eq!(a.step_count(), 4);
    assert!(out_a.join("checkpoint_step_2").is_dir());
    assert!(out_a.join("checkpoint_step_4").is_dir());
    // Killed run: 2 steps, a checkpoint, dropped; a third step's log line is lost with it.
    let out_b = dir.path().join("b");
    let cfg = config(&model, &manifest, &out_b, 4, 4, 6, 1e-3, 4, 2, true);
    let mut b = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    b.step().unwrap();
    b.step().unwrap();
    let ck = b.save_checkpoint().unwrap();
    b.step().unwrap();
    drop(b);
    let mut b = Trainer::resume_with_reward(&ck, Box::new(Vowels)).unwrap();
    assert_eq!(b.step_count(), 2);
    b.run().unwrap();
    assert_eq!(b.step_count(), 4);
    assert_eq!(weights(&a), weights(&b), "weights differ after resuming");
    assert_eq!(b.records().len(), 4);
    assert_eq!(comparable(&a), comparable(&b));
    let logged = qoq_rl::metrics_log::read_records(&out_b.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = logged.iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert_eq!(a.optimizer().steps(), b.optimizer().steps());
}

#[test]
fn sft_steps_lower_the_answer_cross_entropy_and_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 4);
    let out = dir.path().join("run");
    let cfg = config(&model, &manifest, &out, 4, 2, 16, 1e-2, 6, 3, false);
    let mut t = Trainer::new(cfg).unwrap();
    t.set_sft(true);
    t.run().unwrap();
    let losses: Vec<f64> = t
        .records()
        .iter()
        .map(|r| r.metrics[qoq_rl::trainer::SFT_LOSS])
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(
        losses[5] < 0.8 * losses[0],
        "SFT loss did not fall: {losses:?}"
    );
    assert!(out.join("checkpoint_step_6").is_dir());
    assert_eq!(t.optimizer().steps(), 12);
    // The mode is saved: a resumed SFT run takes SFT steps.
    let r = Trainer::resume(&out.join("checkpoint_step_3")).unwrap();
    assert!(r.is_sft());
    assert_eq!(r.step_count(), 3);
    // The mode is a run-file key: the config saved with the checkpoints says `trainer.sft`
    // (set_sft keeps them in step), and a run file with it builds an SFT trainer.
    assert!(r.config().trainer.sft);
    let mut cfg = config(
        &model,
        &manifest,
        &dir.path().join("run2"),
        4,
        2,
        16,
        1e-2,
        6,
        3,
        false,
    );
    assert!(!Trainer::new(cfg.clone()).unwrap().is_sft());
    cfg.trainer.sft = true;
    assert!(Trainer::new(cfg).unwrap().is_sft());
}

/// `actor.policy_loss.loss_agg_mode` (and `loss_scale_factor`) reduce the SFT loss too: from the
/// same weights, one micro-batch of 4 equal-length targets gives `Σ nll / 4` (seq-mean-token-sum),
/// `Σ nll / C` (seq-mean-token-sum-norm) and `Σ nll / (4 L)` (token-mean). An SFT step that
/// ignored the mode would log the token-mean three times.
#[test]
fn sft_loss_follows_the_loss_aggregation_mode() {
    use qoq_rl::loss::LossAggMode;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 4);
    let first_loss = |mode: LossAggMode, scale: Option<f64>, name: &str| -> f64 {
        let mut cfg = config(
            &model,
            &manifest,
            &dir.path().join(name),
            4,
            2,
            16,
            1e-2,
            1,
            0,
            false,
        );
        cfg.actor.global_batch_size = 4;
        cfg.actor.micro_batch_size_per_device_for_update = 4;
        cfg.actor.policy_loss.loss_agg_mode = mode;
        cfg.actor.policy_loss.loss_scale_factor = scale;
        let mut t = Trainer::new(cfg).unwrap();
        t.set_sft(true);
        t.run().unwrap();
        t.records()[0].metrics[qoq_rl::trainer::SFT_LOSS]
    };
    let token_mean = first_loss(LossAggMode::TokenMean, None, "tm");
    let seq_sum = first_loss(LossAggMode::SeqMeanTokenSum, None, "sts");
    let seq_mean = first_loss(LossAggMode::SeqMeanTokenMean, None, "stm");
    let norm = first_loss(LossAggMode::SeqMeanTokenSumNorm, Some(7.0), "norm");
    let total = seq_sum * 4.0;
    assert!(
        (norm * 7.0 - total).abs() <= 1e-5 * total,
        "seq-mean-token-sum-norm {norm} x 7 != seq-mean-token-sum {seq_sum} x 4"
    );
    // Every target has the same length L (> 1 token): token-mean = Σ / (4 L), and so is the
    // mean of the rows' means.
    let len = total / (4.0 * token_mean);
    assert!(
        len > 1.5,
        "token-mean {token_mean} vs sum {total}: {len} tokens per target"
    );
    assert!(
        (len - len.round()).abs() < 1e-3,
        "{len} is not a whole target length"
    );
    assert!((seq_mean - token_mean).abs() <= 1e-5 * token_mean);
}

#[test]
fn drpo_raises_the_validation_reward_and_writes_the_generations() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 8);
    let val = val_manifest(dir.path(), 4);
    let out = dir.path().join("run");
    let steps = 16;
    let mut cfg = config(&model, &manifest, &out, 4, 8, 8, 1e-2, steps, 100, false);
    cfg.data.val_files = val.display().to_string();
    cfg.algorithm.estimator = qoq_rl::config::EstimatorKind::Drpo;
    cfg.trainer.val_freq = 8;
    cfg.trainer.val_before_train = true;
    let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    t.run().unwrap();
    let val: Vec<(u64, f64)> = t
        .records()
        .iter()
        .filter_map(|r| r.metrics.get("val/reward_score").map(|v| (r.step, *v)))
        .collect();
    eprintln!("validation rewards: {val:?}");
    assert_eq!(
        val.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![0, 8, 16]
    );
    assert!(
        val[2].1 > val[0].1 + 0.1,
        "validation reward did not rise: {val:?}"
    );
    // DRPO's per-domain scaling is logged for both datasets.
    let last = &t.records().last().unwrap().metrics;
    for d in ["alpha", "beta"] {
        assert!(last[&format!("drpo/{d}/temperature")].is_finite(), "{d}");
        assert!(last.contains_key(&format!("critic/advantages/abs_mean/{d}")));
    }
    // Evaluation metrics per dataset and overall.
    assert!(last["val/accuracy"].is_finite());
    // Every validation wrote its generations: one line per held-out row, with the reward.
    for step in [0, 8, 16] {
        let text =
            std::fs::read_to_string(out.join(format!("val_generations_{step}.jsonl"))).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        for l in &lines {
            assert_eq!(l["step"], step);
            assert!(l["reward"]["overall"].as_f64().unwrap() >= 0.0);
            assert!(l["response"].is_string());
        }
    }
    let mean0: f64 = std::fs::read_to_string(out.join("val_generations_0.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["reward"]["overall"]
                .as_f64()
                .unwrap()
        })
        .sum::<f64>()
        / 4.0;
    assert!((mean0 - val[0].1).abs() < 1e-12);
}

/// Rewards `alpha` rows with a constant (no variance in their groups) and `beta` rows with
/// [`Vowels`].
struct ConstantAlpha(f64);

impl RewardFn for ConstantAlpha {
    fn name(&self) -> &str {
        "constant-alpha"
    }
    fn score(&self, input: &RewardInput<'_>) -> RewardScore {
        if input.sample.dataset == "alpha" {
            RewardScore::total(self.0)
        } else {
            Vowels.score(input)
        }
    }
}

#[test]
fn dynamic_filtering_drops_groups_without_reward_variance() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 8);
    let out = dir.path().join("run");
    let mut cfg = config(&model, &manifest, &out, 4, 4, 6, 1e-3, 2, 100, false);
    cfg.algorithm.dynamic_filter = true;
    let mut t = Trainer::with_reward(cfg, Box::new(ConstantAlpha(0.7))).unwrap();
    let o = t.step().unwrap();
    // 4 prompts, alternating datasets: whatever the draw, the alpha groups are dropped.
    let kept = o.metrics["filter/kept_groups"];
    let dropped = o.metrics["filter/dropped_groups"];
    assert_eq!(kept + dropped, 4.0);
    assert!(dropped >= 1.0, "{:?}", o.metrics);
    assert!(!o.metrics.contains_key("critic/advantages/abs_mean/alpha"));
    // The reward means still cover every rollout.
    assert!((o.metrics["reward_by_domain/alpha"] - 0.7).abs() < 1e-12);

    // Nothing but constant groups: no update at all.
    let out2 = dir.path().join("run2");
    let mut cfg2 = config(&model, &manifest, &out2, 4, 4, 6, 1e-3, 2, 100, false);
    cfg2.algorithm.dynamic_filter = true;
    let mut t = Trainer::with_reward(cfg2, Box::new(Flat)).unwrap();
    let before = weights(&t);
    let o = t.step().unwrap();
    assert_eq!(o.metrics["filter/kept_groups"], 0.0);
    assert_eq!(t.optimizer().steps() + t.optimizer().skipped(), 0);
    assert_eq!(weights(&t), before);
    assert!(!o.metrics.contains_key("actor/grad_norm"));
}

/// The same reward for every response.
struct Flat;

impl RewardFn for Flat {
    fn name(&self) -> &str {
        "flat"
    }
    fn score(&self, _: &RewardInput<'_>) -> RewardScore {
        RewardScore::total(0.25)
    }
}

#[test]
fn kl_in_the_reward_is_logged_and_grows_as_the_policy_moves() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 8);
    let out = dir.path().join("run");
    let mut cfg = config(&model, &manifest, &out, 4, 4, 6, 1e-2, 3, 100, true);
    cfg.algorithm.kl.use_kl_loss = false;
    cfg.algorithm.kl.kl_coef = 0.05;
    let mut t = Trainer::with_reward(cfg.clone(), Box::new(Vowels)).unwrap();
    let kls: Vec<f64> = (0..3)
        .map(|_| {
            let o = t.step().unwrap();
            assert_eq!(o.metrics["critic/kl_coef"], 0.05);
            assert!(!o.metrics.contains_key("actor/kl_loss"));
            o.metrics["critic/kl"]
        })
        .collect();
    eprintln!("kl: {kls:?}");
    // Step 1 samples from the reference weights: only rounding between the cached decode and
    // the full forward separates them.
    assert!(kls[0].abs() < 1e-3, "{kls:?}");
    assert!(kls[2] > 10.0 * kls[0].abs().max(1e-6), "{kls:?}");
    // The full estimator cannot be a reward penalty.
    cfg.algorithm.kl.kl_penalty = qoq_rl::loss::KlEstimator::Full;
    cfg.trainer.out_dir = dir.path().join("full").display().to_string();
    let err = Trainer::with_reward(cfg, Box::new(Vowels)).err().unwrap();
    assert!(err.to_string().contains("kl_penalty"), "{err}");
}

/// A one-step GRPO run of 6 text rows in `dir` (checkpointed at step 1): its manifest and its
/// out_dir.
fn one_step_run(dir: &Path) -> (PathBuf, PathBuf) {
    let model = tiny_model(dir);
    let manifest = text_manifest(dir, 6);
    let out = dir.join("run");
    let cfg = config(&model, &manifest, &out, 4, 2, 4, 1e-3, 1, 1, false);
    let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    t.run().unwrap();
    (manifest, out)
}

#[test]
fn resuming_with_overrides_extends_the_run_and_refuses_model_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (_, out) = one_step_run(dir.path());
    let ck = out.join("checkpoint_step_1");
    let r = Trainer::resume_with_overrides(&ck, &["trainer.max_steps=2".to_string()]).unwrap();
    assert_eq!(r.total_steps(), 2);
    assert_eq!(r.config().trainer.max_steps, Some(2));
    let err = Trainer::resume_with_overrides(&ck, &["model.model_path=/elsewhere".to_string()])
        .err()
        .unwrap();
    assert!(err.to_string().contains("model.model_path"), "{err}");
    let err = Trainer::resume_with_overrides(&ck, &["algorithm.estimator=drpo".to_string()])
        .err()
        .unwrap();
    assert!(err.to_string().contains("algorithm.estimator"), "{err}");
    // A resumed run keeps its mode.
    let err = Trainer::resume_with_overrides(&ck, &["trainer.sft=true".to_string()])
        .err()
        .unwrap();
    assert!(err.to_string().contains("trainer.sft"), "{err}");
}

#[test]
fn paper_drpo_trains_with_the_kl_loss_and_damping_from_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 8);
    let out = dir.path().join("run");
    let mut cfg = config(&model, &manifest, &out, 4, 4, 6, 1e-2, 2, 100, true);
    cfg.algorithm.estimator = qoq_rl::config::EstimatorKind::Drpo;
    cfg.algorithm.drpo = qoq_rl::advantage::DrpoConfig::paper();
    assert!(cfg.algorithm.kl.use_kl_loss && cfg.algorithm.needs_rollout_kl());
    let mut t = Trainer::with_reward(cfg.clone(), Box::new(Vowels)).unwrap();
    for _ in 0..2 {
        let o = t.step().unwrap();
        let m = &o.metrics;
        // The KL is in the loss, not in the reward; the damping read each rollout's KL.
        assert!(m["actor/kl_loss"].is_finite(), "{m:?}");
        assert!(m["critic/kl"].is_finite() && m["critic/kl"] >= 0.0, "{m:?}");
        assert!(!m.contains_key("critic/kl_coef"), "{m:?}");
        assert!(
            m.keys()
                .any(|k| k.starts_with("drpo/") && k.ends_with("/temperature"))
        );
        assert_eq!(m["drpo/nonfinite_zeroed"], 0.0);
        assert!(m["actor/grad_norm"].is_finite(), "{m:?}");
    }
    // Combinations that cannot work are refused, naming the keys.
    let mut bad = cfg.clone();
    bad.algorithm.kl.disable_kl = true;
    let e = bad.validate().unwrap_err().to_string();
    assert!(
        e.contains("algorithm.drpo.kl_damping") && e.contains("disable_kl"),
        "{e}"
    );
    let mut bad = cfg.clone();
    bad.algorithm.kl.kl_penalty = qoq_rl::loss::KlEstimator::Full;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("kl_damping") && e.contains("full"), "{e}");
    // Without the damping, disable_kl is fine.
    let mut ok = cfg;
    ok.algorithm.drpo.kl_damping = qoq_rl::advantage::drpo::KlDamping::Off;
    ok.algorithm.kl.disable_kl = true;
    ok.validate().unwrap();
}

#[test]
fn resume_refuses_changed_data_unless_allowed_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let (manifest, out) = one_step_run(dir.path());
    let ck = out.join("checkpoint_step_1");
    let state = qoq_rl::checkpoint::Checkpoint::open(&ck)
        .unwrap()
        .trainer_state()
        .unwrap();
    let train = state.data.iter().find(|d| d.role == "train").unwrap();
    assert_eq!(train.rows, 6);
    assert_eq!(train.size, std::fs::metadata(&manifest).unwrap().len());
    assert_eq!(train.sha256.len(), 64);
    // Unchanged data resumes.
    Trainer::resume(&ck).unwrap();
    // The same number of rows, one answer changed: the hash tells.
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replacen("\"yes\"", "\"no!\"", 1)).unwrap();
    let e = Trainer::resume(&ck).err().unwrap().to_string();
    assert!(e.contains("sha256") && !e.contains("rows"), "{e}");
    assert!(
        e.contains("train manifest") && e.contains("allow-changed-data"),
        "{e}"
    );
    let opts = qoq_rl::trainer::ResumeOptions {
        allow_changed_data: true,
        ..Default::default()
    };
    let r = Trainer::resume_with(&ck, &opts).unwrap();
    let events = std::fs::read_to_string(out.join(qoq_rl::run_dir::EVENTS_FILE)).unwrap();
    assert!(events.contains("resume_with_changed_data"), "{events}");
    drop(r);
}

#[test]
fn every_estimator_trains_a_few_steps() {
    use qoq_rl::config::EstimatorKind;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 4);
    for kind in [
        EstimatorKind::Grpo,
        EstimatorKind::Drpo,
        EstimatorKind::DrGrpo,
        EstimatorKind::Rloo,
        EstimatorKind::ReinforcePlusPlus,
        EstimatorKind::Remax,
        EstimatorKind::Gae,
    ] {
        let name = kind.name();
        let out = dir.path().join(name);
        let mut cfg = config(&model, &manifest, &out, 2, 2, 4, 1e-2, 2, 100, false);
        cfg.algorithm.estimator = kind;
        if kind == EstimatorKind::Gae {
            cfg.algorithm.lam = 0.95;
            cfg.critic.optim.lr = 1e-2;
        }
        let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
        let before = weights(&t);
        for _ in 0..2 {
            let o = t.step().unwrap();
            for key in ["actor/pg_loss", "actor/grad_norm", "critic/advantages/mean"] {
                let v = o.metrics.get(key).copied().unwrap_or(f64::NAN);
                assert!(v.is_finite(), "{name}: {key} = {v}");
            }
            match kind {
                EstimatorKind::Remax => {
                    assert!(o.metrics["critic/reward_baseline/mean"].is_finite());
                }
                EstimatorKind::Gae => {
                    for key in ["critic/vf_loss", "critic/vpred_mean", "critic/grad_norm"] {
                        let v = o.metrics.get(key).copied().unwrap_or(f64::NAN);
                        assert!(v.is_finite(), "{name}: {key} = {v}");
                    }
                    assert!(o.metrics["critic/grad_norm"] > 0.0);
                }
                _ => assert!(!o.metrics.contains_key("critic/vf_loss"), "{name}"),
            }
        }
        assert_eq!(t.optimizer().skipped(), 0, "{name}");
        assert_ne!(weights(&t), before, "{name}: the policy did not move");
    }
}

#[test]
fn ppo_epochs_repeat_the_mini_batches_from_the_policys_own_old_log_probs() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 4);
    let run = |epochs: usize, lr: f64| {
        let out = dir.path().join(format!("e{epochs}-{lr}"));
        let mut cfg = config(&model, &manifest, &out, 2, 2, 4, lr, 1, 100, false);
        cfg.actor.ppo_epochs = epochs;
        let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
        let o = t.step().unwrap();
        (t.optimizer().steps() + t.optimizer().skipped(), o.metrics)
    };
    let (steps1, _) = run(1, 1e-3);
    let (steps3, m3) = run(3, 1e-3);
    assert_eq!(
        steps3,
        3 * steps1,
        "one optimiser step per mini-batch per epoch"
    );
    assert!(m3["actor/ppo_kl"].is_finite());
    // With the policy's own log-probs as the old ones and nothing moving (lr 0), every ratio
    // is exactly 1.
    let (_, m0) = run(2, 0.0);
    assert_eq!(m0["actor/ppo_kl"], 0.0);
    assert_eq!(m0["actor/pg_clipfrac_higher"], 0.0);
}

#[test]
fn ppo_with_gae_resumes_with_bit_identical_policy_critic_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 4);
    let cfg_for = |out: &Path| {
        let mut cfg = config(&model, &manifest, out, 2, 2, 4, 1e-2, 3, 1, false);
        cfg.algorithm.estimator = qoq_rl::config::EstimatorKind::Gae;
        cfg.algorithm.lam = 0.95;
        cfg.critic.optim.lr = 1e-2;
        cfg.critic.cliprange_value = 0.2;
        cfg.actor.ppo_epochs = 2;
        cfg
    };
    let out_a = dir.path().join("a");
    let mut a = Trainer::with_reward(cfg_for(&out_a), Box::new(Vowels)).unwrap();
    a.run().unwrap();
    let out_b = dir.path().join("b");
    let mut b = Trainer::with_reward(cfg_for(&out_b), Box::new(Vowels)).unwrap();
    b.train_step().unwrap();
    let ck = out_b.join("checkpoint_step_1");
    assert!(ck.join("critic.safetensors").is_file());
    assert!(ck.join("critic_optimizer.safetensors").is_file());
    b.step().unwrap(); // lost with the process
    drop(b);
    let mut b = Trainer::resume_with_reward(&ck, Box::new(Vowels)).unwrap();
    b.run().unwrap();
    assert_eq!(
        weights(&a),
        weights(&b),
        "policy weights differ after resuming"
    );
    for file in ["critic.safetensors", "critic_optimizer.safetensors"] {
        let x = std::fs::read(out_a.join("checkpoint_step_3").join(file)).unwrap();
        let y = std::fs::read(out_b.join("checkpoint_step_3").join(file)).unwrap();
        assert!(x == y, "{file} differs after resuming");
    }
    assert_eq!(comparable(&a), comparable(&b));
    assert!(comparable(&a)[0].1.contains_key("critic/vf_clipfrac"));
}

#[test]
fn skip_bad_rows_trains_past_damaged_files_and_malformed_lines_counting_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 8);
    // a damaged image and a malformed line among the good rows (lines 9 and 10)
    std::fs::write(
        dir.path().join("derm/alpha/bad.png"),
        b"\x89PNG\r\n\x1a\n junk",
    )
    .unwrap();
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str(
        "{\"problem\": \"<image>Broken?\", \"answer\": \"yes\", \"images\": [\"derm/alpha/bad.png\"], \"dataset\": \"alpha\"}\n",
    );
    text.push_str("{\"problem\": \"cut off\n");
    std::fs::write(&manifest, text).unwrap();
    let clean = tempfile::tempdir().unwrap();
    let val = text_manifest(clean.path(), 2);
    let out = dir.path().join("run");
    let mut cfg = config(&model, &manifest, &out, 4, 2, 4, 1e-3, 3, 100, false);
    cfg.data.val_files = val.display().to_string();

    // Without the flag the first step that meets a bad row stops, naming it.
    let mut strict = Trainer::with_reward(cfg.clone(), Box::new(Vowels)).unwrap();
    let err = (0..3)
        .find_map(|_| strict.step().err().map(|e| e.to_string()))
        .expect("a bad row stops a run without skip_bad_rows");
    assert!(
        err.contains("line 9") || err.contains(":10"),
        "the error names the bad row: {err}"
    );
    drop(strict);
    std::fs::remove_dir_all(&out).unwrap();

    // With it, three steps of 4 rows (12 draws over 10 lines) meet both and train on.
    cfg.data.manifest.skip_bad_rows = true;
    let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    let mut skipped = 0.0;
    for _ in 0..3 {
        let o = t.step().unwrap();
        assert!(o.metrics["actor/grad_norm"].is_finite());
        skipped += o.metrics["data/skipped_rows"];
    }
    assert!(skipped >= 2.0, "both bad rows were skipped: {skipped}");
}

#[test]
fn adamw_bf16_trains_with_kahan_state_and_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 6);
    let bf16 = |out: &Path| {
        let mut c = config(&model, &manifest, out, 4, 4, 6, 1e-3, 3, 1, true);
        c.actor.strategy = qoq_rl::config::OptimizerStrategy::AdamwBf16;
        c
    };
    let out_a = dir.path().join("a");
    let mut a = Trainer::with_reward(bf16(&out_a), Box::new(Vowels)).unwrap();
    assert_eq!(
        a.optimizer().precision(),
        qoq_rl::optim::Precision::Bf16Kahan
    );
    a.run().unwrap();
    let state = a.optimizer().state_tensors().unwrap();
    assert!(state.keys().any(|k| k.starts_with("c.")), "no compensation");
    assert!(
        state
            .iter()
            .filter(|(k, _)| k.starts_with("m."))
            .all(|(_, t)| t.dtype() == candle_core::DType::BF16)
    );
    let out_b = dir.path().join("b");
    let mut b = Trainer::with_reward(bf16(&out_b), Box::new(Vowels)).unwrap();
    b.step().unwrap();
    let ck = b.save_checkpoint().unwrap();
    drop(b);
    let mut b = Trainer::resume_with_reward(&ck, Box::new(Vowels)).unwrap();
    b.run().unwrap();
    assert_eq!(weights(&a), weights(&b), "weights differ after resuming");
    assert_eq!(comparable(&a), comparable(&b));
}

#[test]
fn a_row_with_more_images_than_rollout_limit_images_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = repo().join("examples/mini/manifest.jsonl");
    let mut cfg = config(
        &model,
        &manifest,
        &dir.path().join("run"),
        4,
        2,
        6,
        1e-3,
        1,
        1,
        true,
    );
    // Rows in file order: line 3 is a CT volume of two frames (two images).
    cfg.data.shuffle = false;
    cfg.rollout.limit_images = 1;
    let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    let e = t.step().unwrap_err().to_string();
    assert!(
        e.contains("line 3") && e.contains("rollout.limit_images = 1"),
        "{e}"
    );
}

/// `rollout.kv_cache_mib` bounds the rollout batch's key/value memory: on the tiny model
/// (512 bytes per position) 1 MiB holds three rows of ~400 + prompt positions, so the groups
/// of four run in parts and rows wait; the step is the unbounded step (to the rounding of the
/// engine's log-probs in another batch composition). A budget that cannot
/// hold one row is an error naming the key.
#[test]
fn a_kv_cache_budget_changes_nothing_but_memory_and_names_itself_when_too_small() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 4);
    let run = |name: &str, mib: u64, resp: usize| {
        let mut cfg = config(
            &model,
            &manifest,
            &dir.path().join(name),
            2,
            4,
            resp,
            1e-3,
            1,
            1,
            true,
        );
        cfg.rollout.kv_cache_mib = mib;
        cfg.rollout.ignore_eos = true;
        let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
        t.step().map(|_| t).map_err(|e| e.to_string())
    };
    let free = run("free", 0, 400).unwrap();
    let bounded = run("bounded", 1, 400).unwrap();
    // The same rollouts (so the same rewards and advantages); the engine's log-probs, the
    // update's old log-probs, come from differently composed batches: equal to float rounding.
    let (a, b) = (&comparable(&free)[0].1, &comparable(&bounded)[0].1);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, x) in a {
        let y = b[k];
        if k.starts_with("reward") || k.starts_with("critic/") || k.contains("length") {
            assert_eq!(*x, y, "{k}");
        } else {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{k}: {x} vs {y}");
        }
    }
    // AdamW's first step moves a weight by about lr·g/(|g| + eps): gradients that differ in
    // their last bits move weights with tiny gradients by a visible fraction of lr (1e-3).
    let (wa, wb) = (weights(&free), weights(&bounded));
    let mut worst = 0f32;
    for (name, x) in &wa {
        for (p, q) in x.iter().zip(&wb[name]) {
            worst = worst.max((p - q).abs());
        }
    }
    assert!(worst <= 1e-5, "weights differ by {worst}");
    let e = run("small", 1, 3000)
        .err()
        .expect("one row needs > 1 MiB")
        .to_string();
    assert!(
        e.contains("rollout.kv_cache_mib = 1") && e.contains("MiB"),
        "{e}"
    );
}

/// The largest absolute difference between two runs' weights, over every parameter.
fn max_weight_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flat_map(|(k, x)| x.iter().zip(&b[k]).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn gradient_checkpointing_gives_the_same_rl_step() {
    // The multimodal mini manifest (images, video, ECG): activation checkpointing recomputes
    // every decoder layer and vision block in the backward and must leave the update unchanged.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = repo().join("examples/mini/manifest.jsonl");
    let run = |ckpt: bool| {
        let out = dir.path().join(format!("ckpt-{ckpt}"));
        let mut cfg = config(&model, &manifest, &out, 4, 2, 6, 1e-3, 1, 1, true);
        cfg.model.gradient_checkpointing = ckpt;
        let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
        let before = weights(&t);
        let o = t.step().unwrap();
        (before, weights(&t), o.metrics)
    };
    let (before, plain, m_plain) = run(false);
    let recomputed = qoq_model::checkpoint::recomputed();
    let (_, ckpt, m_ckpt) = run(true);
    assert!(
        qoq_model::checkpoint::recomputed() > recomputed,
        "the update ran checkpointed"
    );
    assert!(
        max_weight_diff(&before, &plain) > 1e-4,
        "the step moved the weights"
    );
    let d = max_weight_diff(&plain, &ckpt);
    assert!(
        d <= 1e-6,
        "weights differ by {d} with gradient checkpointing"
    );
    let rel =
        (m_plain["actor/grad_norm"] - m_ckpt["actor/grad_norm"]).abs() / m_plain["actor/grad_norm"];
    assert!(rel < 1e-5, "gradient norms differ (relative {rel})");
}

#[test]
fn gradient_checkpointing_gives_the_same_ppo_critic_and_sft_steps() {
    // The critic (a value model over the same backbone) and the SFT step go through the same
    // update loop: with checkpointing on they give the same policy and critic.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 4);
    let run = |ckpt: bool| {
        let out = dir.path().join(format!("ckpt-{ckpt}"));
        let mut cfg = config(&model, &manifest, &out, 2, 2, 4, 1e-2, 1, 1, false);
        cfg.algorithm.estimator = qoq_rl::config::EstimatorKind::Gae;
        cfg.critic.optim.lr = 1e-2;
        cfg.model.gradient_checkpointing = ckpt;
        let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
        t.step().unwrap();
        let ck = t.save_checkpoint().unwrap();
        let critic: BTreeMap<String, Vec<f32>> = candle_core::safetensors::load(
            ck.join("critic.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
        t.sft_step().unwrap();
        (weights(&t), critic)
    };
    let (plain, critic_plain) = run(false);
    let recomputed = qoq_model::checkpoint::recomputed();
    let (ckpt, critic_ckpt) = run(true);
    assert!(qoq_model::checkpoint::recomputed() > recomputed);
    let d = max_weight_diff(&plain, &ckpt);
    assert!(
        d <= 1e-6,
        "policy weights differ by {d} with gradient checkpointing"
    );
    let d = max_weight_diff(&critic_plain, &critic_ckpt);
    assert!(
        d <= 1e-6,
        "critic weights differ by {d} with gradient checkpointing"
    );
}

/// `actor.pack_rollouts`: the rollouts of a prompt in a micro-batch as one packed row give the
/// update of one rollout per row up to rounding: the RL step on the multimodal mini manifest
/// (images, video, ECG; the KL to the reference in the loss), with two PPO epochs (the old
/// log-probs), and PPO's critic.
#[test]
fn packed_rollouts_give_the_step_of_one_rollout_per_row() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = repo().join("examples/mini/manifest.jsonl");
    let run = |pack: bool, gae: bool| {
        let out = dir.path().join(format!("pack-{pack}-{gae}"));
        let mut cfg = config(&model, &manifest, &out, 4, 2, 6, 1e-3, 1, 1, !gae);
        cfg.actor.pack_rollouts = pack;
        if gae {
            cfg.algorithm.estimator = qoq_rl::config::EstimatorKind::Gae;
            cfg.critic.optim.lr = 1e-3;
        } else {
            cfg.actor.ppo_epochs = 2;
        }
        let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
        let packed = qoq_model::batch::packed_batches();
        let o = t.step().unwrap();
        (qoq_model::batch::packed_batches() - packed, o.metrics)
    };
    for gae in [false, true] {
        let (n_plain, plain) = run(false, gae);
        let (n_packed, packed) = run(true, gae);
        assert_eq!(n_plain, 0, "packed without the setting");
        assert!(n_packed > 0, "nothing was packed");
        let mut compared = 0;
        for (k, a) in &plain {
            if k.starts_with("perf/") || k.starts_with("timing_s/") {
                continue;
            }
            let b = packed[k];
            assert!(
                (a - b).abs() <= 1e-4 * a.abs().max(1e-2),
                "gae {gae}: {k}: {a} one rollout per row, {b} packed"
            );
            compared += 1;
        }
        for k in ["actor/pg_loss", "actor/grad_norm"] {
            assert!(plain.contains_key(k), "{k}");
        }
        if gae {
            assert!(plain.contains_key("critic/vf_loss"));
        } else {
            assert!(plain.contains_key("actor/kl_loss"));
        }
        assert!(compared > 10, "{compared} metrics compared");
    }
}

/// The processor options are built once: a `data.format_prompt` template file removed after
/// the trainer starts is not read again by a checkpoint or an export, which both carry the
/// template the run trains with.
#[test]
fn a_format_prompt_template_is_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 4);
    let template = dir.path().join("prompt.jinja");
    let text = "{{ content }} Answer in one word.";
    std::fs::write(&template, text).unwrap();
    let mut cfg = config(
        &model,
        &manifest,
        &dir.path().join("run"),
        2,
        2,
        6,
        1e-3,
        2,
        0,
        false,
    );
    cfg.data.format_prompt = template.display().to_string();
    let t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    std::fs::remove_file(&template).unwrap();
    let ck = t.save_checkpoint().unwrap();
    let out = dir.path().join("export");
    t.export(&out).unwrap();
    for folder in [ck.as_path(), out.as_path()] {
        let settings = qoq_processor::ProcessorSettings::read(folder)
            .unwrap()
            .unwrap();
        assert_eq!(
            settings.into_options().format_prompt.as_deref(),
            Some(text),
            "{}",
            folder.display()
        );
    }
}
