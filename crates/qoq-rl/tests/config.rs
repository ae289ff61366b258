//! Run configuration: the shipped files parse, defaults are the reference's (spec §11),
//! overrides change fields, unknown keys are errors that name them.

use qoq_rl::advantage::Estimator;
use qoq_rl::advantage::drpo::DrpoMode;
use qoq_rl::config::{ConfigError, EstimatorKind, RunConfig, apply_override};
use qoq_rl::loss::config::{KlEstimator, LossAggMode};
use qoq_rl::optim::LrSchedule;
use std::path::PathBuf;

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

#[test]
fn defaults_equal_the_reference_7b_yaml() {
    let c = RunConfig::default();
    // rollout (spec §7, §11)
    assert_eq!(c.rollout.n, 5);
    assert_eq!((c.rollout.temperature, c.rollout.top_p), (1.0, 0.99));
    assert_eq!((c.rollout.top_k, c.rollout.seed), (-1, 1));
    assert_eq!(
        (c.rollout.val_override.temperature, c.rollout.val_override.n),
        (0.5, 1)
    );
    // f32 compute by default (the yaml computes in bf16: `model.compute_dtype = "bf16"`);
    // activation checkpointing is off by default (it costs a second forward of every layer)
    // and on in the 7B recipe, as in the yaml.
    assert_eq!(c.model.compute_dtype, c.model.master_dtype);
    assert!(!c.model.gradient_checkpointing);
    // data
    assert_eq!(
        (c.data.max_prompt_length, c.data.max_response_length),
        (4000, 4000)
    );
    assert_eq!(
        (c.data.rollout_batch_size, c.data.val_batch_size),
        (512, 1024)
    );
    assert_eq!((c.data.max_pixels, c.data.min_pixels), (524_288, 65_536));
    assert_eq!((c.data.shuffle, c.data.seed), (true, 1));
    assert_eq!(c.data.manifest.video_frames, 2);
    // algorithm
    assert_eq!(c.algorithm.estimator, EstimatorKind::Grpo);
    assert_eq!(c.algorithm.grpo_eps, 1e-6);
    assert_eq!(c.algorithm.kl.kl_coef, 1e-4);
    assert_eq!(c.algorithm.kl.kl_penalty, KlEstimator::LowVarKl);
    assert!(c.algorithm.kl.use_kl_loss);
    assert_eq!((c.algorithm.drpo.k_max, c.algorithm.drpo.tol), (10, 0.10));
    assert_eq!(c.algorithm.drpo.mode, DrpoMode::Reference);
    // actor (spec §10)
    assert_eq!(c.actor.global_batch_size, 128);
    assert_eq!(c.actor.micro_batch_size_per_device_for_update, 2);
    assert_eq!(c.actor.micro_batch_size_per_device_for_experience, 8);
    assert_eq!(c.actor.ppo_epochs, 1);
    assert_eq!(c.actor.optim.lr, 1e-6);
    assert_eq!(c.actor.optim.weight_decay, 1e-2);
    assert_eq!((c.actor.optim.beta1, c.actor.optim.beta2), (0.9, 0.999));
    assert_eq!(c.actor.optim.max_grad_norm, Some(1.0));
    assert_eq!(
        c.actor.optim.schedule,
        LrSchedule::Constant { warmup_steps: 0 }
    );
    assert_eq!(
        (
            c.actor.policy_loss.clip_ratio_low,
            c.actor.policy_loss.clip_ratio_high,
            c.actor.policy_loss.clip_ratio_dual
        ),
        (0.2, 0.3, 3.0)
    );
    assert_eq!(c.actor.policy_loss.loss_agg_mode, LossAggMode::TokenMean);
    // trainer
    assert_eq!(c.trainer.total_episodes, 3);
    assert_eq!(
        (
            c.trainer.val_freq,
            c.trainer.save_freq,
            c.trainer.save_limit
        ),
        (5, 30, 3)
    );
    assert_eq!(c.trainer.n_gpus_per_node, 8);
    // spec §16.6 sanity counts
    assert_eq!(c.rollouts_per_step(), 2560);
    assert_eq!(c.rollouts_per_optimizer_step(), 640);
    assert_eq!(c.optimizer_steps_per_step(), 4);
    assert_eq!(c.gradient_accumulation(), 40);
}

#[test]
fn shipped_configs_parse_and_validate() {
    let c = RunConfig::load(&configs_dir().join("qoq_med_7b_drpo.toml"), &[]).unwrap();
    assert_eq!(c.algorithm.estimator, EstimatorKind::Drpo);
    assert!(matches!(c.algorithm.build_estimator(), Estimator::Drpo(_)));
    assert_eq!(c.actor.optim.lr, 1e-6);
    assert_eq!(c.rollout.n, 5);
    assert_eq!(c.gradient_accumulation(), 40);
    let t = RunConfig::load(&configs_dir().join("tiny_cpu.toml"), &[]).unwrap();
    assert_eq!(t.trainer.world_size(), 1);
    assert!(t.rollouts_per_step() < 100, "{}", t.rollouts_per_step());
    // The files `qoq synth` and `qoq model init` write (the commands in its header).
    assert_eq!(t.data.train_files, "runs/synth/train.jsonl");
    assert_eq!(t.data.val_files, "runs/synth/test.jsonl");
    assert_eq!(t.model.model_path, "runs/tiny_model");
}

#[test]
fn every_shipped_config_loads() {
    let mut n = 0;
    for e in std::fs::read_dir(configs_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let c = RunConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let back =
                RunConfig::from_toml_str(&c.to_toml_string().unwrap(), "<resolved>").unwrap();
            assert_eq!(back, c, "{}", p.display());
            n += 1;
        }
    }
    assert!(n >= 4, "{n} run files in configs/");
}

#[test]
fn resolved_toml_round_trips() {
    let c = RunConfig::load(&configs_dir().join("qoq_med_7b_drpo.toml"), &[]).unwrap();
    let text = c.to_toml_string().unwrap();
    assert!(text.contains("[algorithm.drpo]") && text.contains("type = \"qoq_medical\""));
    let back = RunConfig::from_toml_str(&text, "<resolved>").unwrap();
    assert_eq!(back, c);
}

#[test]
fn overrides_change_fields_with_inferred_types() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("run.toml");
    std::fs::write(
        &p,
        "[data]\ntrain_files = \"train.jsonl\"\nval_files = \"val.jsonl\"\n",
    )
    .unwrap();
    let c = RunConfig::load(
        &p,
        &[
            "algorithm.estimator=drpo".into(),
            "algorithm.drpo.k_max=3".into(),
            "actor.optim.lr=5e-5".into(),
            "actor.optim.weight_decay=0".into(),
            "rollout.temperature=1".into(),
            "algorithm.kl.use_kl_loss=false".into(),
            "trainer.max_steps=7".into(),
            // a tagged variant with fields is set whole, as an inline table
            "algorithm.drpo.mode={type = \"window\", steps = 4}".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.algorithm.estimator, EstimatorKind::Drpo);
    assert_eq!(c.algorithm.drpo.k_max, 3);
    assert_eq!(c.actor.optim.lr, 5e-5);
    assert_eq!(c.actor.optim.weight_decay, 0.0);
    assert!(!c.algorithm.kl.use_kl_loss);
    assert_eq!(c.trainer.max_steps, Some(7));
    assert_eq!(c.algorithm.drpo.mode, DrpoMode::Window { steps: 4 });
}

#[test]
fn unknown_keys_are_errors_naming_them() {
    let mut doc: toml::Value = toml::from_str("[data]\ntrain_files = \"t.jsonl\"\n").unwrap();
    let e = apply_override(&mut doc, "algorithm.estimatr", "drpo").unwrap_err();
    assert!(matches!(e, ConfigError::UnknownKey { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("algorithm.estimatr"), "{msg}");
    assert!(msg.contains("estimator"), "known keys listed: {msg}");
    let e = apply_override(&mut doc, "trainer.nope.deeper", "1").unwrap_err();
    assert!(e.to_string().contains("trainer.nope.deeper"), "{e}");
    // a known key with a value of the wrong type names the key
    let e = apply_override(&mut doc, "rollout.n", "many").unwrap_err();
    assert!(matches!(e, ConfigError::BadOverride { .. }), "{e}");
    assert!(e.to_string().contains("rollout.n"), "{e}");
    // the document is unchanged by failed overrides
    assert!(doc.get("algorithm").is_none());
    // an unknown key in a file is an error naming it
    let e = RunConfig::from_toml_str("[trainer]\nsave_freqq = 3\n", "run.toml").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("run.toml") && msg.contains("save_freqq"),
        "{msg}"
    );
}

#[test]
fn validation_names_the_field() {
    let mut c = RunConfig::default();
    c.data.train_files = "t.jsonl".into();
    c.data.val_files = "v.jsonl".into();
    c.validate().unwrap();
    c.actor.micro_batch_size_per_device_for_update = 3;
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("actor.micro_batch_size_per_device_for_update"),
        "{e}"
    );
    let mut c2 = RunConfig::default();
    c2.data.train_files = "t.jsonl".into();
    let e = c2.validate().unwrap_err().to_string();
    assert!(e.contains("data.val_files"), "{e}");
}

#[test]
fn the_7b_recipe_differs_from_the_defaults_only_in_estimator_paths_checkpointing_and_compute_dtype()
{
    let mut c = RunConfig::load(&configs_dir().join("qoq_med_7b_drpo.toml"), &[]).unwrap();
    assert_eq!(c.data.train_files, "data/climb/geom_train.jsonl");
    // Activation checkpointing: on in the recipe as in the yaml, off by default (it costs a
    // second forward of every layer, which small runs need not pay).
    assert!(c.model.gradient_checkpointing);
    c.model.gradient_checkpointing = false;
    c.algorithm.estimator = EstimatorKind::Grpo;
    c.data.train_files.clear();
    c.data.val_files.clear();
    c.trainer.out_dir = RunConfig::default().trainer.out_dir;
    // The recipe computes in bf16 as the reference yaml; the default stays f32.
    assert_eq!(c.model.compute_dtype, qoq_rl::config::DtypeName::Bf16);
    c.model.compute_dtype = RunConfig::default().model.compute_dtype;
    assert_eq!(c, RunConfig::default());
}

#[test]
fn step_counts_and_schedules_follow_the_reference_loop() {
    let mut c = RunConfig::default();
    // 2,000 rows / 512 per step = 3 full batches (drop_last) × 3 episodes
    assert_eq!(c.training_steps(2000), 9);
    let vals: Vec<u64> = (1..=12).filter(|&s| c.trainer.is_val_step(s, 12)).collect();
    assert_eq!(vals, vec![5, 10, 12]);
    let saves: Vec<u64> = (1..=61)
        .filter(|&s| c.trainer.is_save_step(s, 61))
        .collect();
    assert_eq!(saves, vec![30, 60, 61]);
    c.trainer.max_steps = Some(4);
    c.trainer.val_freq = 0;
    assert_eq!(c.training_steps(2000), 4);
    assert!(!c.trainer.is_val_step(3, 4) && c.trainer.is_val_step(4, 4));
    assert_eq!(c.trainer.keep_last(), Some(3));
    c.trainer.save_limit = -1;
    assert_eq!(c.trainer.keep_last(), None);
}

#[test]
fn baseline_estimators_parse_and_their_keys_are_refused_elsewhere() {
    let base = "[data]\ntrain_files = \"t.jsonl\"\nval_files = \"v.jsonl\"\n";
    for (name, kind) in [
        ("reinforce_plus_plus", EstimatorKind::ReinforcePlusPlus),
        ("remax", EstimatorKind::Remax),
        ("gae", EstimatorKind::Gae),
    ] {
        let c = RunConfig::from_toml_str_with_overrides(
            base,
            "test",
            &[format!("algorithm.estimator={name}")],
        )
        .unwrap();
        assert_eq!(c.algorithm.estimator, kind);
        assert_eq!(kind.name(), name);
    }
    let c = RunConfig::from_toml_str_with_overrides(
        base,
        "test",
        &[
            "algorithm.estimator=gae".into(),
            "algorithm.gamma=0.99".into(),
            "algorithm.lam=0.95".into(),
            "critic.optim.lr=1e-5".into(),
            "critic.cliprange_value=0.2".into(),
        ],
    )
    .unwrap();
    match c.algorithm.build_estimator() {
        Estimator::Gae { gamma, lam } => assert_eq!((gamma, lam), (0.99, 0.95)),
        e => panic!("{e:?}"),
    }
    for (overrides, field) in [
        (vec!["algorithm.gamma=0.9"], "algorithm.gamma"),
        (
            vec![
                "algorithm.estimator=reinforce_plus_plus",
                "algorithm.lam=0.9",
            ],
            "algorithm.lam",
        ),
        (vec!["critic.optim.lr=1e-5"], "critic"),
        (
            vec!["algorithm.estimator=gae", "critic.cliprange_value=0"],
            "critic.cliprange_value",
        ),
        (
            vec!["algorithm.estimator=gae", "algorithm.gamma=1.5"],
            "algorithm.gamma",
        ),
    ] {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let e = RunConfig::from_toml_str_with_overrides(base, "test", &o).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { field: f, .. } if f == field),
            "{overrides:?}: {e}"
        );
    }
}

/// The paper's two stages: every value the spec records for the paper (§8.7, §11, §14 items 7
/// and 10, §15), and the one difference between the stages (what trains, where the run goes).
#[test]
fn the_paper_stage_files_carry_the_papers_values() {
    use qoq_reward::RewardConfig;
    use qoq_reward::{IouReduce, WeightPreset, WeightsConfig};
    use qoq_rl::advantage::DrpoConfig;
    use qoq_rl::early_stopping::StopMode;
    let s1 = RunConfig::load(&configs_dir().join("qoq_med_paper_stage1.toml"), &[]).unwrap();
    let s2 = RunConfig::load(&configs_dir().join("qoq_med_paper_stage2.toml"), &[]).unwrap();
    for c in [&s1, &s2] {
        // §14 10: one epoch, pre-shuffled with seed 42, no shuffling, early stopping.
        assert_eq!(c.trainer.total_episodes, 1);
        assert_eq!(c.data.preshuffle_seed, Some(42));
        assert!(!c.data.shuffle);
        let es = c.trainer.early_stopping.as_ref().unwrap();
        assert_eq!((es.metric.as_str(), es.mode), ("val/f1", StopMode::Max));
        assert!(es.patience >= 1);
        // §14 10 / §11: per-device micro-batch 4, lr 1e-6, wd 1e-2, 512 prompts, n 5.
        assert_eq!(c.actor.micro_batch_size_per_device_for_update, 4);
        assert_eq!((c.actor.optim.lr, c.actor.optim.weight_decay), (1e-6, 1e-2));
        assert_eq!((c.data.rollout_batch_size, c.rollout.n), (512, 5));
        assert_eq!(c.data.max_pixels, 524_288);
        // §14 9: 4 frames per volume.
        assert_eq!(c.data.manifest.video_frames, 4);
        // §14 1-6: DRPO as the paper reads.
        assert_eq!(c.algorithm.estimator, EstimatorKind::Drpo);
        let mut want = DrpoConfig::paper();
        want.engine = c.algorithm.drpo.engine;
        assert_eq!(c.algorithm.drpo, want);
        // §11: the KL loss, low_var_kl, β 1e-4.
        assert!(c.algorithm.kl.use_kl_loss);
        assert_eq!(c.algorithm.kl.kl_penalty, KlEstimator::LowVarKl);
        assert_eq!(c.algorithm.kl.kl_coef, 1e-4);
        // §14 11: symmetric clip, per-sequence mean.
        assert_eq!(
            c.actor.policy_loss.clip_ratio_low,
            c.actor.policy_loss.clip_ratio_high
        );
        assert_eq!(
            c.actor.policy_loss.loss_agg_mode,
            LossAggMode::SeqMeanTokenMean
        );
        // §14 7 / §8.7: the paper's reward = `qoq reward --preset paper`.
        let RewardConfig::QoqMedical(r) = &c.reward else {
            panic!("{:?}", c.reward)
        };
        assert_eq!(*r, qoq_reward::medical::MedicalConfig::paper());
        assert_eq!(r.iou_reduce, IouReduce::Max);
        assert_eq!(r.weights, WeightsConfig::Preset(WeightPreset::Paper));
    }
    // Stage 1 aligns the modalities: merger and ECG encoder/projector only; Stage 2 trains all.
    assert_eq!(
        s1.model.trainable,
        Some(vec!["merger".to_string(), "ecg".to_string()])
    );
    assert_eq!(s2.model.trainable, None);
    assert_ne!(s1.trainer.out_dir, s2.trainer.out_dir);
    // Apart from those, the two files are the same recipe.
    let mut a = s1.clone();
    a.model.trainable = None;
    a.trainer.out_dir = s2.trainer.out_dir.clone();
    assert_eq!(a, s2);
}

/// The error of loading `base` with the overrides `set`.
fn load_err(base: &std::path::Path, set: &[&str]) -> String {
    let o: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    RunConfig::load(base, &o).unwrap_err().to_string()
}

#[test]
fn new_keys_are_refused_when_they_cannot_work() {
    let base = configs_dir().join("qoq_med_paper_stage1.toml");
    let err = |set: &[&str]| load_err(&base, set);
    let e = err(&["trainer.early_stopping.metric=val/f2"]);
    assert!(e.contains("`val/f2`") && e.contains("val/accuracy"), "{e}");
    let e = err(&["trainer.val_freq=0"]);
    assert!(
        e.contains("trainer.early_stopping") && e.contains("val_freq"),
        "{e}"
    );
    let e = err(&["model.trainable=[\"merger\", \"projector\"]"]);
    assert!(
        e.contains("model.trainable") && e.contains("`projector`"),
        "{e}"
    );
    let e = err(&["model.freeze_llm=true"]);
    assert!(
        e.contains("model.trainable") && e.contains("model.freeze_llm"),
        "{e}"
    );
    let e = err(&["trainer.early_stopping.patience=0"]);
    assert!(e.contains("trainer.early_stopping.patience"), "{e}");
}

#[test]
fn settings_without_an_implementation_are_refused_naming_the_key() {
    let base = configs_dir().join("qoq_med_7b_drpo.toml");
    RunConfig::load(&base, &[]).expect("the 7B recipe loads");
    let err = |set: &[&str]| load_err(&base, set);
    // Mixed precision is f32 masters with bf16 compute; other mixes are refused.
    let c = RunConfig::load(&base, &["model.compute_dtype=bf16".into()]).expect("f32 + bf16");
    assert_eq!(c.model.compute_dtype, qoq_rl::config::DtypeName::Bf16);
    let e = err(&["model.master_dtype=bf16", "model.compute_dtype=f32"]);
    assert!(
        e.contains("model.compute_dtype") && e.contains("mixed precision"),
        "{e}"
    );
    let e = err(&["model.compute_dtype=f16"]);
    assert!(e.contains("model.compute_dtype"), "{e}");
    // Implemented (activation checkpointing in the trainer's update): accepted.
    let c = RunConfig::load(&base, &["model.gradient_checkpointing=true".into()])
        .expect("gradient checkpointing is implemented");
    assert!(c.model.gradient_checkpointing);
    let e = err(&["rollout.tensor_parallel_size=4"]);
    assert!(e.contains("rollout.tensor_parallel_size"), "{e}");
    let e = err(&["rollout.limit_images=0"]);
    assert!(e.contains("rollout.limit_images"), "{e}");
}

/// `rollout.gpu_memory_utilization` sizes the cache from GPU memory: on the CPU it is refused
/// naming `rollout.kv_cache_mib` (the CPU's bound), outside (0, 1] it is refused, and with
/// `kv_cache_mib` also set it is refused (two bounds for one cache); `kv_cache_mib` alone loads.
#[test]
fn kv_cache_bounds_are_checked_against_the_device() {
    let base = configs_dir().join("qoq_med_7b_drpo.toml");
    let err = |set: &[&str]| load_err(&base, set);
    let e = err(&["rollout.gpu_memory_utilization=0.4"]);
    assert!(
        e.contains("rollout.gpu_memory_utilization")
            && e.contains("device is cpu")
            && e.contains("rollout.kv_cache_mib"),
        "{e}"
    );
    for bad in ["0", "1.5", "-0.2"] {
        let e = err(&[&format!("rollout.gpu_memory_utilization={bad}")]);
        assert!(e.contains("is not in (0, 1]"), "{bad}: {e}");
    }
    let c = RunConfig::load(&base, &["rollout.kv_cache_mib=512".to_string()]).unwrap();
    assert_eq!(c.rollout.kv_cache_mib, 512);
    assert_eq!(c.rollout.gpu_memory_utilization, None);
    if cfg!(feature = "cuda") {
        let e = err(&[
            "model.device=cuda",
            "rollout.gpu_memory_utilization=0.6",
            "rollout.kv_cache_mib=64",
        ]);
        assert!(e.contains("set one of them"), "{e}");
    }
}

/// `trainer.all_reduce`: `auto` by default, `host` accepted, `nccl` refused naming the key where
/// it cannot run (a build without the `nccl` feature; the CPU), an unknown value refused.
#[test]
fn all_reduce_nccl_needs_the_feature_and_a_gpu() {
    use qoq_rl::config::AllReduce;
    let base = configs_dir().join("qoq_med_7b_drpo.toml");
    assert_eq!(
        RunConfig::load(&base, &[]).unwrap().trainer.all_reduce,
        AllReduce::Auto
    );
    let c = RunConfig::load(&base, &["trainer.all_reduce=host".into()]).unwrap();
    assert_eq!(c.trainer.all_reduce, AllReduce::Host);
    let e = load_err(&base, &["trainer.all_reduce=nccl"]);
    assert!(e.contains("trainer.all_reduce"), "{e}");
    if cfg!(feature = "nccl") {
        assert!(e.contains("needs a CUDA model.device"), "{e}");
    } else {
        assert!(
            e.contains("without the `nccl` feature") && e.contains("scripts/build-cuda.sh"),
            "{e}"
        );
    }
    let e = load_err(&base, &["trainer.all_reduce=gloo"]);
    assert!(e.contains("all_reduce") && e.contains("gloo"), "{e}");
}

/// `model.device` goes through qoq-model's device parser: `cpu` by default, `cuda:N` refused by
/// a build without the `cuda` feature (with the command that builds one), an unknown name
/// refused naming the field; an override replaces the file's value before validation (what
/// `qoq train --device` does).
#[test]
fn model_device_is_parsed_and_cuda_needs_the_cuda_feature() {
    use qoq_model::DeviceSpec;
    let base = configs_dir().join("qoq_med_7b_drpo.toml");
    let c = RunConfig::load(&base, &[]).unwrap();
    assert_eq!(c.model.device, "cpu");
    assert_eq!(c.device().unwrap(), DeviceSpec::Cpu);
    assert_eq!(RunConfig::default().model.device, "cpu");
    let text = std::fs::read_to_string(&base)
        .unwrap()
        .replace("device = \"cpu\"", "device = \"cuda:0\"");
    assert!(text.contains("device = \"cuda:0\""));
    let r = RunConfig::from_toml_str_with_overrides(&text, "run.toml", &[]);
    if cfg!(feature = "cuda") {
        assert_eq!(r.unwrap().device().unwrap(), DeviceSpec::Cuda(0));
    } else {
        let e = r.unwrap_err().to_string();
        assert_eq!(
            e,
            "config `model.device`: device `cuda:0`: qoq was built without the `cuda` feature: \
             rebuild with `cargo build --release -p qoq-cli --features cuda`"
        );
    }
    let c =
        RunConfig::from_toml_str_with_overrides(&text, "run.toml", &["model.device=cpu".into()])
            .unwrap();
    assert_eq!(c.device().unwrap(), DeviceSpec::Cpu);
    let err = |set: &[&str]| load_err(&base, set);
    let e = err(&["model.device=gpu"]);
    assert!(
        e.starts_with("config `model.device`: unknown device `gpu`") && e.contains("`cuda:N`"),
        "{e}"
    );
    let e = err(&["model.device=metal"]);
    assert!(
        e.contains("model.device") && e.contains("Metal is not supported"),
        "{e}"
    );
}

/// `overrides_from` lists exactly the differing leaves (strings quoted, arrays whole, skipped
/// prefixes left out), and applying them to the base gives the other config back.
#[test]
fn overrides_from_rebuilds_a_config_from_its_base() {
    let file = configs_dir().join("tiny_cpu.toml");
    let base = RunConfig::load(&file, &[]).unwrap();
    let want = RunConfig::load(
        &file,
        &[
            "trainer.max_steps=7".into(),
            "trainer.out_dir=\"runs/a b=1\"".into(),
            "actor.optim.lr=3e-6".into(),
            "trainer.find_last_checkpoint=false".into(),
            "data.seed=5".into(),
        ],
    )
    .unwrap();
    let diff = want
        .overrides_from(&base, &["trainer.find_last_checkpoint"])
        .unwrap();
    assert_eq!(diff.len(), 4, "{diff:?}");
    assert!(diff.iter().all(|d| !d.contains("find_last_checkpoint")));
    let mut redo = want.clone();
    redo.trainer.find_last_checkpoint = base.trainer.find_last_checkpoint;
    let back = RunConfig::load(&file, &diff).unwrap();
    assert_eq!(back, redo);
    assert!(base.overrides_from(&base, &[]).unwrap().is_empty());
    // A key set in the base and unset in the file cannot be an override: named.
    let mut with_path = base.clone();
    with_path.trainer.load_checkpoint_path = Some("x".into());
    let e = base.overrides_from(&with_path, &[]).unwrap_err();
    assert!(
        e.to_string().contains("trainer.load_checkpoint_path"),
        "{e}"
    );
}

/// `rollout.backend = "openai"` needs `rollout.endpoint` (an http:// URL), the endpoint and the
/// served model need that backend, and the in-process engine's settings or sampling settings the
/// OpenAI API cannot carry are refused with it, each naming its key.
#[test]
fn the_openai_backend_and_its_keys_are_refused_where_they_cannot_work() {
    let base = configs_dir().join("qoq_med_7b_drpo.toml");
    let err = |set: &[&str]| load_err(&base, set);
    let url = "rollout.endpoint=http://127.0.0.1:8000/v1";
    let c = RunConfig::load(&base, &["rollout.backend=openai".into(), url.into()])
        .expect("openai with an endpoint loads");
    assert_eq!(c.rollout.backend, qoq_rl::config::RolloutBackend::Openai);
    assert_eq!(
        RunConfig::default().rollout.backend,
        qoq_rl::config::RolloutBackend::Engine
    );
    let e = err(&["rollout.backend=openai"]);
    assert!(
        e.contains("rollout.backend") && e.contains("rollout.endpoint"),
        "{e}"
    );
    let e = err(&[url]);
    assert!(
        e.contains("rollout.endpoint") && e.contains("\"engine\""),
        "{e}"
    );
    let e = err(&["rollout.served_model=qoq-med"]);
    assert!(e.contains("rollout.served_model"), "{e}");
    let e = err(&["rollout.backend=openai", "rollout.endpoint=https://x/v1"]);
    assert!(
        e.contains("rollout.endpoint") && e.contains("http://"),
        "{e}"
    );
    let e = err(&["rollout.backend=vllm", url]);
    assert!(e.contains("vllm"), "{e}");
    for (set, key) in [
        ("rollout.kv_cache_mib=64", "rollout.kv_cache_mib"),
        (
            "rollout.max_num_batched_tokens=512",
            "rollout.max_num_batched_tokens",
        ),
        ("rollout.top_k=50", "rollout.top_k"),
        ("rollout.temperature=2.5", "rollout.temperature"),
        (
            "rollout.image_pad_logit_bias=-1000",
            "rollout.image_pad_logit_bias",
        ),
        ("rollout.request_timeout_s=0", "rollout.request_timeout_s"),
    ] {
        let e = err(&["rollout.backend=openai", url, set]);
        assert!(e.contains(key), "{set}: {e}");
    }
}

/// Overrides are applied together: one that does not fit alone (a new tagged variant without
/// its required field) is completed by a later one, and when nothing completes it the error still
/// names that override's key, not whatever failed last.
#[test]
fn overrides_can_switch_a_tagged_variant_and_give_its_fields() {
    use qoq_rl::optim::LrSchedule;
    let base = "[data]\ntrain_files = \"t.jsonl\"\nval_files = \"v.jsonl\"\n";
    let c = RunConfig::from_toml_str_with_overrides(
        base,
        "test",
        &[
            "actor.optim.schedule.type=warmup_cosine".into(),
            "actor.optim.schedule.warmup_steps=5".into(),
            "actor.optim.schedule.total_steps=100".into(),
            "actor.optim.schedule.min_lr_ratio=0.1".into(),
        ],
    )
    .unwrap();
    assert_eq!(
        c.actor.optim.schedule,
        LrSchedule::WarmupCosine {
            warmup_steps: 5,
            total_steps: 100,
            min_lr_ratio: 0.1
        }
    );
    let e = RunConfig::from_toml_str_with_overrides(
        base,
        "test",
        &[
            "actor.optim.schedule.type=warmup_cosine".into(),
            "trainer.max_steps=3".into(),
        ],
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::BadOverride { .. }), "{e}");
    assert!(e.to_string().contains("actor.optim.schedule.type"), "{e}");
    assert!(e.to_string().contains("missing field"), "{e}");
    // A value of the wrong type is still refused, naming its key.
    let e = RunConfig::from_toml_str_with_overrides(base, "test", &["rollout.n=many".into()])
        .unwrap_err();
    assert!(e.to_string().contains("rollout.n"), "{e}");
}

#[test]
fn data_format_prompt_is_the_reference_template_none_or_a_template_file() {
    use qoq_processor::prompt::{DEFAULT_CHAT_TEMPLATE, DEFAULT_FORMAT_PROMPT, PromptBuilder};
    let base = configs_dir().join("tiny_cpu.toml");
    let load = |set: &[&str]| {
        let o: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        RunConfig::load(&base, &o)
    };
    // The default is the reference's medical_format.jinja.
    let c = load(&[]).unwrap();
    assert_eq!(c.data.format_prompt, "medical");
    let o = c.processor_options().unwrap();
    assert_eq!(o.format_prompt.as_deref(), Some(DEFAULT_FORMAT_PROMPT));
    // "none": the question alone.
    let o = load(&["data.format_prompt=none"])
        .unwrap()
        .processor_options()
        .unwrap();
    assert_eq!(o.format_prompt, None);
    // A template file of the user's: its text, rendered around the question.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("short.jinja");
    std::fs::write(&file, "Answer in one word. {{ content }}\n").unwrap();
    let set = format!("data.format_prompt={}", file.display());
    let o = load(&[&set]).unwrap().processor_options().unwrap();
    let src = o.format_prompt.expect("a template");
    let b = PromptBuilder::new(Some(&src), DEFAULT_CHAT_TEMPLATE).unwrap();
    assert_eq!(
        b.format("Is there a nodule?").unwrap(),
        "Answer in one word. Is there a nodule?"
    );
    // Refused at load, naming the key and the file: missing, unusable, no question.
    let missing = tmp.path().join("absent.jinja");
    let e = load_err(
        &base,
        &[&format!("data.format_prompt={}", missing.display())],
    );
    assert!(
        e.contains("data.format_prompt") && e.contains("absent.jinja"),
        "{e}"
    );
    std::fs::write(&file, "{% if %} {{ content }}").unwrap();
    let e = load_err(&base, &[&set]);
    assert!(
        e.contains("data.format_prompt") && e.contains("short.jinja"),
        "{e}"
    );
    std::fs::write(&file, "Answer in one word.").unwrap();
    let e = load_err(&base, &[&set]);
    assert!(
        e.contains("data.format_prompt") && e.contains("content"),
        "{e}"
    );
    let e = load_err(&base, &["data.format_prompt="]);
    assert!(e.contains("data.format_prompt"), "{e}");
}
