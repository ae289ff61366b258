//! Checkpoints: a full round trip (weights, AdamW, DRPO state, RNG, cursor, counters, config),
//! a writer killed mid-save, a truncated or altered file, `latest` discovery and pruning.

use candle_core::{Device, Tensor, Var};
use qoq_data::manifest::Cursor;
use qoq_rl::advantage::{DrpoConfig, Estimator, RolloutReward};
use qoq_rl::checkpoint::{
    self, Checkpoint, CheckpointData, CheckpointError, TrainerState, checkpoint_dir, files,
};
use qoq_rl::config::RunConfig;
use qoq_rl::optim::{AdamW, AdamWConfig};
use qoq_rl::rng::RngStates;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

fn rows(step: u64) -> Vec<RolloutReward> {
    let mut out = Vec::new();
    for q in 0..4u64 {
        for k in 0..3u64 {
            out.push(RolloutReward {
                uid: format!("s{step}q{q}"),
                domain: if q < 2 { "ct" } else { "ecg" }.into(),
                reward: ((q * 7 + k * 3 + step) % 10) as f64 / 10.0,
                kl: None,
            });
        }
    }
    out
}

struct Run {
    model: HashMap<String, Tensor>,
    opt: AdamW,
    vars: Vec<Var>,
    estimator: Estimator,
    rng: ChaCha8Rng,
}

fn run_two_steps() -> Run {
    let dev = Device::Cpu;
    let w = Var::from_tensor(
        &Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap(),
    )
    .unwrap();
    let b = Var::from_tensor(&Tensor::new(&[0.5f32, -0.5], &dev).unwrap()).unwrap();
    let mut opt = AdamW::new(
        vec![
            ("model.layers.0.mlp.weight".into(), w.clone()),
            ("model.layers.0.mlp.bias".into(), b.clone()),
        ],
        AdamWConfig::default(),
    )
    .unwrap();
    for s in 0..2 {
        let g = vec![
            Some(Tensor::full(0.1f32 * (s + 1) as f32, (2, 3), &dev).unwrap()),
            Some(Tensor::new(&[1.0f32, -2.0], &dev).unwrap()),
        ];
        opt.step(&g).unwrap();
    }
    let mut estimator = Estimator::Drpo(Box::new(qoq_rl::advantage::Drpo::new(
        DrpoConfig::reference(),
    )));
    for s in 0..2 {
        estimator.step(&rows(s)).unwrap();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..9 {
        rng.next_u64();
    }
    let model = HashMap::from([
        (
            "model.layers.0.mlp.weight".to_string(),
            w.as_tensor().clone(),
        ),
        ("model.layers.0.mlp.bias".to_string(), b.as_tensor().clone()),
    ]);
    Run {
        model,
        opt,
        vars: vec![w, b],
        estimator,
        rng,
    }
}

fn save(root: &Path, run: &Run, step: u64) -> std::path::PathBuf {
    let mut rng = RngStates::default();
    rng.insert("sampler", &run.rng);
    let mut cfg = RunConfig::default();
    cfg.trainer.save_limit = 2;
    let state = TrainerState {
        step,
        episode: 1,
        optimizer_steps: 2,
        metrics: [
            ("reward/overall".to_string(), 0.42),
            ("actor/grad_norm".to_string(), f64::NAN),
        ]
        .into(),
        sft: true,
        kl_controller: Some(qoq_rl::loss::KlController::Adaptive {
            kl_coef: 0.01,
            target: 0.1,
            horizon: 1000.0,
        }),
        data: vec![qoq_rl::run_dir::DataFingerprint {
            role: "train".into(),
            path: "train.jsonl".into(),
            size: 10,
            rows: 2,
            sha256: "0".repeat(64),
            order: Some(qoq_data::manifest::RowOrder {
                preshuffle_seed: Some(42),
                shuffle: false,
            }),
        }],
        early_stopping: Some(qoq_rl::early_stopping::EarlyStoppingState {
            metric: "val/f1".into(),
            best_value: Some(0.5),
            best_step: Some(step.saturating_sub(1)),
            bad_validations: 1,
            stopped_at: None,
        }),
        init_from: Some(checkpoint::InitSource {
            checkpoint: "/runs/stage1/checkpoint_step_3".into(),
            chosen: "best".into(),
            step: 3,
            model_sha256: "1".repeat(64),
            manifest_sha256: "2".repeat(64),
        }),
        world_size: Some(2),
    };
    checkpoint::save(
        root,
        &CheckpointData {
            model: &run.model,
            optimizer: Some(&run.opt),
            estimator: &run.estimator,
            rng: &rng,
            cursor: Cursor {
                epoch: 1,
                position: 17 + step,
            },
            trainer_state: &state,
            config_toml: &cfg.to_toml_string().unwrap(),
            processor: &cfg.processor_options().unwrap(),
            critic: None,
            peft: None,
            model_folder: None,
        },
    )
    .unwrap()
}

#[test]
fn checkpoint_round_trips_every_part() {
    let tmp = tempfile::tempdir().unwrap();
    let mut run = run_two_steps();
    let dir = save(tmp.path(), &run, 30);
    assert_eq!(dir, checkpoint_dir(tmp.path(), 30));
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.step(), 30);
    assert_eq!(ck.manifest().files.len(), 8);
    // The run's processor settings travel with the checkpoint, as qoq infer/serve/eval read them.
    let settings = qoq_processor::ProcessorSettings::read(&dir)
        .unwrap()
        .unwrap();
    let want = RunConfig::default().processor_options().unwrap();
    let got = settings.into_options();
    assert_eq!(
        (
            got.dataset_min_pixels,
            got.dataset_max_pixels,
            got.max_prompt_length
        ),
        (
            want.dataset_min_pixels,
            want.dataset_max_pixels,
            want.max_prompt_length
        )
    );
    assert_eq!(got.image_load, want.image_load);
    assert!(!got.missing_files_as_placeholders);

    let model = ck.model(&Device::Cpu).unwrap();
    for (k, t) in &run.model {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = model[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{k}");
    }

    // a fresh optimiser restored from the checkpoint takes the same next step
    let fresh_vars: Vec<Var> = run
        .vars
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap())
        .collect();
    let mut opt2 = AdamW::new(
        vec![
            ("model.layers.0.mlp.weight".into(), fresh_vars[0].clone()),
            ("model.layers.0.mlp.bias".into(), fresh_vars[1].clone()),
        ],
        AdamWConfig::default(),
    )
    .unwrap();
    assert!(ck.has_optimizer());
    ck.load_optimizer(&mut opt2).unwrap();
    assert_eq!(opt2.steps(), run.opt.steps());
    let g = vec![
        Some(Tensor::full(0.3f32, (2, 3), &Device::Cpu).unwrap()),
        Some(Tensor::new(&[0.5f32, 0.5], &Device::Cpu).unwrap()),
    ];
    run.opt.step(&g).unwrap();
    opt2.step(&g).unwrap();
    for (a, b) in run.vars.iter().zip(&fresh_vars) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
    }

    // the DRPO history continues: same advantages at the next step
    let mut restored = Estimator::load_state(&ck.estimator_json().unwrap()).unwrap();
    let next = rows(2);
    assert_eq!(
        restored.step(&next).unwrap().advantages,
        run.estimator.step(&next).unwrap().advantages
    );

    let mut r = ck.rng().unwrap().restore("sampler").unwrap();
    assert_eq!(r.next_u64(), run.rng.next_u64());
    assert_eq!(
        ck.cursor().unwrap(),
        Cursor {
            epoch: 1,
            position: 47
        }
    );
    let st = ck.trainer_state().unwrap();
    assert_eq!((st.step, st.episode, st.optimizer_steps), (30, 1, 2));
    // Early stopping's record, the --init-from source and the row order come back as saved.
    let es = st.early_stopping.as_ref().unwrap();
    assert_eq!((es.best_step, es.bad_validations), (Some(29), 1));
    assert_eq!(st.init_from.as_ref().unwrap().chosen, "best");
    assert_eq!(st.data[0].order.unwrap().preshuffle_seed, Some(42));
    assert_eq!(st.metrics.get("reward/overall"), Some(&0.42));
    assert!(!st.metrics.contains_key("actor/grad_norm"), "NaN dropped");
    assert!(st.sft);
    assert_eq!(
        st.kl_controller,
        Some(qoq_rl::loss::KlController::Adaptive {
            kl_coef: 0.01,
            target: 0.1,
            horizon: 1000.0
        })
    );
    let cfg = RunConfig::from_toml_str(&ck.config_toml().unwrap(), "config.toml").unwrap();
    assert_eq!(cfg.trainer.save_limit, 2);
}

#[test]
fn a_writer_killed_mid_save_leaves_nothing_that_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let run = run_two_steps();
    save(tmp.path(), &run, 30);
    // a writer killed while writing step 60: a .tmp dir with some files, no manifest
    let partial = tmp.path().join("checkpoint_step_60.tmp-99999");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join(files::MODEL), b"half a file").unwrap();
    let latest = checkpoint::latest(tmp.path()).unwrap().unwrap();
    assert_eq!(latest.0, 30, "the .tmp dir is not a checkpoint");
    // the next save cleans it
    save(tmp.path(), &run, 90);
    assert!(!partial.exists());
    assert_eq!(checkpoint::latest(tmp.path()).unwrap().unwrap().0, 90);
    let removed = checkpoint::remove_stale_tmp(tmp.path()).unwrap();
    assert!(removed.is_empty());
}

#[test]
fn truncated_or_altered_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let run = run_two_steps();
    let d30 = save(tmp.path(), &run, 30);
    let d60 = save(tmp.path(), &run, 60);
    // truncate step 60's optimizer state
    let opt = d60.join(files::OPTIMIZER);
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let e = Checkpoint::open(&d60).unwrap_err();
    assert!(matches!(e, CheckpointError::Incomplete { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("optimizer.safetensors"), "{msg}");
    // latest skips it and finds step 30
    assert_eq!(checkpoint::latest(tmp.path()).unwrap().unwrap().0, 30);
    // same size, one byte changed: only the hash catches it
    let est = d30.join(files::ESTIMATOR);
    let mut b = std::fs::read(&est).unwrap();
    b[0] = if b[0] == b'{' { b' ' } else { b'{' };
    std::fs::write(&est, &b).unwrap();
    let msg = Checkpoint::open(&d30).unwrap_err().to_string();
    assert!(
        msg.contains("estimator.json") && msg.contains("sha256"),
        "{msg}"
    );
    assert!(
        Checkpoint::open_with(&d30, false).is_ok(),
        "sizes alone match"
    );
    // a checkpoint whose manifest is gone (killed before the last write) names the manifest
    std::fs::remove_file(d30.join(files::MANIFEST)).unwrap();
    let msg = Checkpoint::open(&d30).unwrap_err().to_string();
    assert!(msg.contains("manifest.json"), "{msg}");
    assert!(checkpoint::latest(tmp.path()).unwrap().is_none());
}

#[test]
fn pruning_keeps_the_newest_n() {
    let tmp = tempfile::tempdir().unwrap();
    let run = run_two_steps();
    for step in [5, 10, 15, 20, 100] {
        save(tmp.path(), &run, step);
    }
    // an unrelated directory and file are left alone
    std::fs::create_dir_all(tmp.path().join("tensorboard")).unwrap();
    std::fs::write(tmp.path().join("metrics.jsonl"), b"").unwrap();
    assert!(checkpoint::prune(tmp.path(), None).unwrap().is_empty());
    let removed = checkpoint::prune(tmp.path(), Some(2)).unwrap();
    assert_eq!(removed.len(), 3);
    let left: Vec<u64> = checkpoint::list(tmp.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(left, vec![20, 100], "numeric, not lexicographic order");
    assert!(tmp.path().join("tensorboard").exists());
    assert!(tmp.path().join("metrics.jsonl").exists());
}
