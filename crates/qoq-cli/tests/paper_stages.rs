//! The paper's two stages chained on the demo's synthetic world with the shipped run files
//! (`configs/qoq_med_paper_stage{1,2}.toml`, sizes shrunk with `--set`): Stage 1 trains the
//! merger and the ECG encoder/projector only, Stage 2 starts from Stage 1's best checkpoint with
//! `--init-from` and trains everything.

use std::path::Path;
use std::process::Command;

mod support;

use support::{repo, tiny_model};

fn train(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
        .arg("train")
        .arg("--no-plot")
        .args(args)
        .output()
        .unwrap()
}

/// `--set` overrides that shrink a paper run file to the tiny model and a few world rows.
fn small(model: &Path, train: &Path, val: &Path, out: &Path) -> Vec<String> {
    [
        format!("data.train_files={}", train.display()),
        format!("data.val_files={}", val.display()),
        "data.max_prompt_length=1024".into(),
        "data.max_response_length=8".into(),
        "data.rollout_batch_size=4".into(),
        "data.val_batch_size=4".into(),
        "data.max_pixels=12544".into(),
        "data.min_pixels=3136".into(),
        format!("model.model_path={}", model.display()),
        "model.compute_dtype=f32".into(),
        "rollout.n=2".into(),
        "actor.global_batch_size=2".into(),
        "actor.micro_batch_size_per_device_for_update=2".into(),
        "actor.micro_batch_size_per_device_for_experience=2".into(),
        "actor.optim.lr=1e-3".into(),
        "trainer.n_gpus_per_node=1".into(),
        "trainer.max_steps=2".into(),
        "trainer.val_freq=1".into(),
        "trainer.save_freq=1".into(),
        "trainer.val_before_train=false".into(),
        "trainer.tensorboard=false".into(),
        format!("trainer.out_dir={}", out.display()),
    ]
    .into()
}

fn args_of<'a>(config: &'a Path, sets: &'a [String]) -> Vec<&'a std::ffi::OsStr> {
    let mut a: Vec<&std::ffi::OsStr> = vec!["--config".as_ref(), config.as_os_str()];
    for s in sets {
        a.push("--set".as_ref());
        a.push(s.as_ref());
    }
    a
}

fn tensors(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

fn same(a: &candle_core::Tensor, b: &candle_core::Tensor) -> bool {
    let f = |t: &candle_core::Tensor| {
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    f(a) == f(b)
}

#[test]
fn stage_one_then_init_from_stage_two_runs_on_the_demo_world() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let world = dir.path().join("world");
    let cfg = qoq_synth::WorldConfig {
        image_size: 28,
        volume_slices: 4,
        largest_domain_rows: 6,
        domain_imbalance: 3.0,
        test_per_class: 1,
        ecg_seconds: 1.0,
        ..Default::default()
    };
    qoq_synth::generate(&cfg, &world).unwrap();
    // Four held-out rows validate (paths are relative to the world folder: keep the file there).
    let val = world.join("val.jsonl");
    let test = std::fs::read_to_string(world.join("test.jsonl")).unwrap();
    let rows: Vec<&str> = test.lines().take(4).collect();
    std::fs::write(&val, rows.join("\n") + "\n").unwrap();
    let train_rows = world.join("train.jsonl");

    let out1 = dir.path().join("stage1");
    let stage1 = repo().join("configs/qoq_med_paper_stage1.toml");
    let sets1 = small(&model, &train_rows, &val, &out1);
    let o = train(&args_of(&stage1, &sets1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("step 2/2"), "{stderr}");
    // Stage 1 moved the merger and left the language model as it was.
    let init = tensors(&model.join("model.safetensors"));
    let s1 = tensors(&out1.join("checkpoint_step_2/model.safetensors"));
    let embed = "model.embed_tokens.weight";
    assert!(same(&init[embed], &s1[embed]), "{embed} changed in stage 1");
    assert!(
        s1.iter()
            .filter(|(k, _)| k.starts_with("visual.merger."))
            .any(|(k, v)| !same(&init[k], v)),
        "the merger did not move"
    );
    // Early stopping named a best checkpoint; Stage 2 starts from it.
    let best = qoq_rl::trainer::read_best(&out1).unwrap().unwrap();

    let out2 = dir.path().join("stage2");
    let stage2 = repo().join("configs/qoq_med_paper_stage2.toml");
    let sets2 = small(&model, &train_rows, &val, &out2);
    let mut a = args_of(&stage2, &sets2);
    a.push("--init-from".as_ref());
    a.push(out1.as_os_str());
    let o = train(&a);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("(step {}, the best checkpoint", best.step)),
        "{stderr}"
    );
    let events = std::fs::read_to_string(out2.join(qoq_rl::run_dir::EVENTS_FILE)).unwrap();
    let ev: serde_json::Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert_eq!(ev["event"], "init_from");
    assert_eq!(ev["source"]["chosen"], "best");
    assert_eq!(ev["source"]["step"], best.step);
    let st = qoq_rl::checkpoint::Checkpoint::open(&out2.join("checkpoint_step_2"))
        .unwrap()
        .trainer_state()
        .unwrap();
    assert_eq!(st.step, 2);
    assert_eq!(st.init_from.unwrap().step, best.step);
    // Stage 2 trains the language model too.
    let s2 = tensors(&out2.join("checkpoint_step_2/model.safetensors"));
    assert!(
        s2.iter()
            .filter(|(k, _)| k.starts_with("model.layers."))
            .any(|(k, v)| !same(&s1[k], v)),
        "stage 2 did not train the language model"
    );

    // --init-from and --resume do not go together.
    let mut a = args_of(&stage2, &sets2);
    a.extend([
        "--resume".as_ref(),
        out2.as_os_str(),
        "--init-from".as_ref(),
        out1.as_os_str(),
    ]);
    let o = train(&a);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("give one of them"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
