//! The paper's recipe in the trainer (issue 23): early stopping on a validation metric (the
//! right validation, the best checkpoint kept through rotation, the count carried across a
//! resume), the pre-shuffled unshuffled row order, `model.trainable` groups, and `--init-from`.

use qoq_data::manifest::{Manifest, ManifestConfig, RowOrder};
use qoq_rl::config::RunConfig;
use qoq_rl::early_stopping::{EarlyStoppingConfig, StopMode};
use qoq_rl::trainer::{BEST_CHECKPOINT_FILE, ResumeOptions, Trainer, TrainerError};
use std::path::Path;

mod support;

use support::{Vowels, config, repo, text_manifest, tiny_model, val_manifest, weights};

/// Six steps of 4 prompts × 4 rollouts, validating after every step on 4 held-out rows,
/// checkpointing every step and keeping one checkpoint.
fn es_config(dir: &Path, model: &Path, out: &Path) -> RunConfig {
    let manifest = text_manifest(dir, 8);
    let val = val_manifest(dir, 4);
    let mut cfg = config(model, &manifest, out, 4, 4, 6, 1e-2, 6, 1, false);
    cfg.data.val_files = val.display().to_string();
    cfg.trainer.val_freq = 1;
    cfg.trainer.val_before_train = false;
    cfg.trainer.save_limit = 1;
    cfg
}

fn val_scores(t: &Trainer) -> Vec<(u64, f64)> {
    t.records()
        .iter()
        .filter_map(|r| r.metrics.get("val/reward_score").map(|v| (r.step, *v)))
        .collect()
}

fn checkpoint_steps(out: &Path) -> Vec<u64> {
    qoq_rl::checkpoint::list(out)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

fn events(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join(qoq_rl::run_dir::EVENTS_FILE))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn early_stopping_stops_at_the_validation_the_rule_names_and_keeps_the_best_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // The reference: the same run without early stopping (the run is deterministic).
    let out_ref = dir.path().join("ref");
    let mut r =
        Trainer::with_reward(es_config(dir.path(), &model, &out_ref), Box::new(Vowels)).unwrap();
    r.run().unwrap();
    let scores = val_scores(&r);
    assert_eq!(scores.len(), 6);
    // The rule with patience 1, worked out here: the first validation that does not beat the
    // best so far stops the run. With 6 values one of the two modes stops within the run.
    let stop_of = |mode: StopMode| {
        let mut best = scores[0];
        for &(step, v) in &scores[1..] {
            let better = match mode {
                StopMode::Max => v > best.1,
                StopMode::Min => v < best.1,
            };
            if !better {
                return Some((step, best.0));
            }
            best = (step, v);
        }
        None
    };
    let (mode, (stop, best)) = [StopMode::Max, StopMode::Min]
        .into_iter()
        .find_map(|m| stop_of(m).map(|s| (m, s)))
        .unwrap();
    eprintln!("validation rewards {scores:?}: {mode:?} stops at {stop}, best at {best}");

    let out = dir.path().join("es");
    let mut cfg = es_config(dir.path(), &model, &out);
    cfg.trainer.early_stopping = Some(EarlyStoppingConfig {
        metric: "val/reward_score".into(),
        mode,
        patience: 1,
        min_delta: 0.0,
    });
    let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    t.run().unwrap();
    assert!(t.is_finished());
    assert_eq!(t.step_count(), stop);
    assert_eq!(val_scores(&t), scores[..stop as usize].to_vec());
    let reason = t.stop_reason().unwrap();
    assert!(reason.contains("val/reward_score"), "{reason}");
    // The best checkpoint survives save_limit = 1 beside the last one, and is named.
    let best_dir = qoq_rl::checkpoint::checkpoint_dir(&out, best);
    assert_eq!(t.best_checkpoint(), Some(best_dir.clone()));
    let mut want = vec![best, stop];
    want.dedup();
    assert_eq!(checkpoint_steps(&out), want);
    let pointer = qoq_rl::trainer::read_best(&out).unwrap().unwrap();
    assert_eq!(
        (pointer.step, pointer.checkpoint.as_str()),
        (best, best_dir.file_name().unwrap().to_str().unwrap())
    );
    assert!(out.join(BEST_CHECKPOINT_FILE).is_file());
    // The stop is an event with its reason; the metrics log ends at the stop.
    let ev = events(&out);
    let stop_ev = ev.iter().find(|e| e["event"] == "early_stop").unwrap();
    assert_eq!(stop_ev["step"], stop);
    assert!(ev.iter().any(|e| e["event"] == "best_checkpoint"));
    let logged = qoq_rl::metrics_log::read_records(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(logged.last().unwrap().step, stop);
    assert_eq!(
        logged.last().unwrap().metrics["early_stopping/best_step"],
        best as f64
    );
    // Resuming a stopped run has nothing left to do.
    let again = Trainer::resume_with_reward(
        &qoq_rl::checkpoint::checkpoint_dir(&out, stop),
        Box::new(Vowels),
    )
    .unwrap();
    assert!(again.is_finished());
}

#[test]
fn a_resume_continues_the_patience_count() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // min_delta 10 on a reward in [0, 1]: the first validation is the best, every later one is
    // bad, so patience 2 stops after step 3, and only if step 2's bad count survives a resume.
    let out = dir.path().join("es");
    let mut cfg = es_config(dir.path(), &model, &out);
    cfg.trainer.early_stopping = Some(EarlyStoppingConfig {
        metric: "val/reward_score".into(),
        mode: StopMode::Max,
        patience: 2,
        min_delta: 10.0,
    });
    let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    t.train_step().unwrap();
    let o = t.train_step().unwrap();
    assert_eq!(t.early_stopping().unwrap().bad_validations, 1);
    let ck = o.checkpoint.unwrap();
    drop(t);
    let mut t = Trainer::resume_with_reward(&ck, Box::new(Vowels)).unwrap();
    assert_eq!(t.early_stopping().unwrap().bad_validations, 1);
    t.run().unwrap();
    assert_eq!(t.step_count(), 3);
    assert_eq!(t.early_stopping().unwrap().stopped_at, Some(3));
    assert_eq!(checkpoint_steps(&out), vec![1, 3]);
}

#[test]
fn the_preshuffled_unshuffled_order_is_the_one_drawn_and_a_resume_refuses_another_seed() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // Rows alpha, alpha, beta, beta (text_manifest alternates: reorder its lines).
    let manifest = text_manifest(dir.path(), 4);
    let lines: Vec<String> = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let reordered = [0, 2, 1, 3].map(|i| lines[i].clone()).join("\n") + "\n";
    std::fs::write(&manifest, reordered).unwrap();
    let domains_of_step_one = |seed: Option<u64>, name: &str| {
        let out = dir.path().join(name);
        let mut cfg = config(&model, &manifest, &out, 2, 2, 4, 1e-3, 2, 1, false);
        cfg.data.shuffle = false;
        cfg.data.preshuffle_seed = seed;
        let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
        let o = t.step().unwrap();
        let got: Vec<String> = o
            .metrics
            .keys()
            .filter_map(|k| k.strip_prefix("reward_by_domain/").map(String::from))
            .collect();
        (got, t)
    };
    // File order: the first two rows, both alpha.
    let (d, _) = domains_of_step_one(None, "plain");
    assert_eq!(d, vec!["alpha"]);
    // Pre-shuffled with 42: the first two rows of that permutation.
    let m = Manifest::open(&manifest, ManifestConfig::default())
        .unwrap()
        .with_row_order(RowOrder {
            preshuffle_seed: Some(42),
            shuffle: false,
        });
    let order = m.epoch_order(1, 0);
    let mut want: Vec<String> = order[..2]
        .iter()
        .map(|&i| if i < 2 { "alpha" } else { "beta" }.to_string())
        .collect();
    want.sort();
    want.dedup();
    let (d, t) = domains_of_step_one(Some(42), "pre42");
    assert_eq!(d, want, "order {order:?}");
    // The resume refuses another pre-shuffle seed as changed data.
    let ck = t.save_checkpoint().unwrap();
    drop(t);
    let opts = ResumeOptions {
        overrides: vec!["data.preshuffle_seed=43".into()],
        ..ResumeOptions::default()
    };
    let err = Trainer::resume_with(&ck, &opts).err().unwrap();
    assert!(matches!(err, TrainerError::DataChanged { .. }), "{err}");
    assert!(err.to_string().contains("preshuffle_seed 42"), "{err}");
    Trainer::resume(&ck).unwrap();
}

#[test]
fn trainable_groups_update_only_their_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = repo().join("examples/mini/manifest.jsonl");
    let out = dir.path().join("run");
    let mut cfg = config(&model, &manifest, &out, 4, 2, 6, 1e-3, 1, 1, false);
    cfg.model.trainable = Some(vec!["merger".into(), "ecg".into()]);
    let mut t = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    let before = weights(&t);
    t.step().unwrap();
    assert_eq!(t.optimizer().skipped(), 0);
    let after = weights(&t);
    let mut moved = std::collections::BTreeMap::<&str, usize>::new();
    for (k, v) in &before {
        let group = qoq_rl::trainable::group_of(k).unwrap();
        let same = after[k]
            .iter()
            .zip(v)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        if group == "merger" || group == "ecg" {
            if !same {
                *moved.entry(group).or_default() += 1;
            }
        } else {
            assert!(same, "{k} ({group}) is frozen but changed");
        }
    }
    for g in ["merger", "ecg"] {
        assert!(
            moved.get(g).copied().unwrap_or(0) > 0,
            "{g}: nothing moved ({moved:?})"
        );
    }
}

#[test]
fn init_from_starts_a_fresh_run_from_another_runs_weights_and_refuses_another_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 4);
    let out_a = dir.path().join("a");
    let cfg = config(&model, &manifest, &out_a, 2, 2, 4, 1e-2, 2, 2, false);
    let mut a = Trainer::with_reward(cfg, Box::new(Vowels)).unwrap();
    a.run().unwrap();
    let out_b = dir.path().join("b");
    let cfg = config(&model, &manifest, &out_b, 2, 2, 4, 1e-2, 2, 2, false);
    let mut b = Trainer::init_from_with_reward(cfg, &out_a, Box::new(Vowels)).unwrap();
    // The source's weights, everything else fresh.
    assert_eq!(weights(&b), weights(&a));
    assert_eq!((b.step_count(), b.optimizer().steps()), (0, 0));
    assert_eq!(b.cursor(), qoq_data::manifest::Cursor::default());
    let src = b.init_source().unwrap().clone();
    assert_eq!((src.chosen.as_str(), src.step), ("latest", 2));
    let ck = qoq_rl::checkpoint::Checkpoint::open(&out_a.join("checkpoint_step_2")).unwrap();
    assert_eq!(src.model_sha256, ck.model_sha256().unwrap());
    let ev = events(&out_b);
    assert_eq!(ev[0]["event"], "init_from");
    assert_eq!(ev[0]["source"]["step"], 2);
    // It trains, and its checkpoints carry the record.
    b.run().unwrap();
    let st = qoq_rl::checkpoint::Checkpoint::open(&out_b.join("checkpoint_step_2"))
        .unwrap()
        .trainer_state()
        .unwrap();
    assert_eq!(st.init_from, Some(src));
    // A checkpoint folder is taken as given.
    let out_c = dir.path().join("c");
    let cfg = config(&model, &manifest, &out_c, 2, 2, 4, 1e-2, 2, 2, false);
    let c = Trainer::init_from_with_reward(cfg, &out_a.join("checkpoint_step_2"), Box::new(Vowels))
        .unwrap();
    assert_eq!(c.init_source().unwrap().chosen, "given");
    // A model without the ECG encoder does not take the source's weights.
    let no_ecg = dir.path().join("no_ecg");
    std::fs::create_dir_all(&no_ecg).unwrap();
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    j.as_object_mut().unwrap().remove("time_series_token_id");
    std::fs::write(no_ecg.join("config.json"), j.to_string()).unwrap();
    for f in [
        "preprocessor_config.json",
        "tokenizer.json",
        "model.safetensors",
    ] {
        std::fs::copy(model.join(f), no_ecg.join(f)).unwrap();
    }
    let out_d = dir.path().join("d");
    let cfg = config(&no_ecg, &manifest, &out_d, 2, 2, 4, 1e-2, 2, 2, false);
    let err = Trainer::init_from_with_reward(cfg, &out_a, Box::new(Vowels))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("not in the run's model") && err.contains("time_series_embedding"),
        "{err}"
    );
}

#[test]
fn an_init_from_run_resumes_with_the_sources_weights_as_its_kl_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 4);
    let out_a = dir.path().join("a");
    let cfg = config(&model, &manifest, &out_a, 2, 2, 4, 1e-2, 2, 2, false);
    Trainer::with_reward(cfg, Box::new(Vowels))
        .unwrap()
        .run()
        .unwrap();
    // With the KL loss to the reference policy: straight, and interrupted after step 1.
    let out_b = dir.path().join("b");
    let cfg = config(&model, &manifest, &out_b, 2, 2, 4, 1e-2, 3, 1, true);
    let mut b = Trainer::init_from_with_reward(cfg, &out_a, Box::new(Vowels)).unwrap();
    b.run().unwrap();
    let out_c = dir.path().join("c");
    let cfg = config(&model, &manifest, &out_c, 2, 2, 4, 1e-2, 3, 1, true);
    let mut c = Trainer::init_from_with_reward(cfg, &out_a, Box::new(Vowels)).unwrap();
    let ck = c.train_step().unwrap().checkpoint.unwrap();
    drop(c);
    let mut c = Trainer::resume_with_reward(&ck, Box::new(Vowels)).unwrap();
    c.run().unwrap();
    assert_eq!(weights(&b), weights(&c), "weights differ after resuming");
    assert_eq!(support::comparable(&b), support::comparable(&c));
    assert!(b.records()[2].metrics["actor/kl_loss"] > 0.0);
    // The init-from event is written once, by the start.
    let n = events(&out_c)
        .iter()
        .filter(|e| e["event"] == "init_from")
        .count();
    assert_eq!(n, 1);
}
