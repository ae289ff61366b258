//! `qoq train` end to end: two steps of tiny_cpu-like settings on a tiny random model, a
//! checkpoint, `--resume`, and one SFT step.

use std::process::Command;

mod support;

use support::{derm_manifest, repo, tiny_model};

fn train(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
        .arg("train")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn train_runs_two_steps_checkpoints_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = derm_manifest(
        dir.path(),
        4,
        "What is the diagnosis?Answer with one of the following:\nbenign\nmalignant",
    );
    let out = dir.path().join("run");
    let run_toml = dir.path().join("run.toml");
    std::fs::write(
        &run_toml,
        format!(
            r#"
[data]
train_files = "{m}"
val_files = "{m}"
max_prompt_length = 512
max_response_length = 8
rollout_batch_size = 2
max_pixels = 12544
min_pixels = 3136

[model]
model_path = "{model}"
master_dtype = "f32"
compute_dtype = "f32"
gradient_checkpointing = false

[rollout]
n = 2

[algorithm]
estimator = "drpo"

[algorithm.drpo]
engine = "exact"
k_max = 3

[actor]
global_batch_size = 1
micro_batch_size_per_device_for_update = 2
micro_batch_size_per_device_for_experience = 2

[actor.optim]
lr = 1e-5

[trainer]
total_episodes = 1
max_steps = 6
save_freq = 2
save_limit = 2
n_gpus_per_node = 1
out_dir = "{out}"
"#,
            m = manifest.display(),
            model = model.display(),
            out = out.display(),
        ),
    )
    .unwrap();
    let o = train(&[
        "--config".as_ref(),
        run_toml.as_os_str(),
        "--set".as_ref(),
        "trainer.max_steps=2".as_ref(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("step 2/2"), "{stderr}");
    let ck = out.join("checkpoint_step_2");
    assert!(ck.join("model.safetensors").is_file(), "{stderr}");
    assert!(ck.join("optimizer.safetensors").is_file());
    let recs = qoq_rl::metrics_log::read_records(&out.join("metrics.jsonl")).unwrap();
    // Validation before training (step 0) and after the last step.
    assert_eq!(
        recs.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let recs = &recs[1..];
    for step in [0, 2] {
        assert!(out.join(format!("val_generations_{step}.jsonl")).is_file());
    }
    assert!(recs[1].metrics["val/reward_score"].is_finite());
    assert!(stderr.contains("val reward"), "{stderr}");
    // The curves are drawn at the end.
    assert!(out.join("curves/reward.png").is_file(), "{stderr}");
    for key in [
        "reward/overall",
        "actor/pg_loss",
        "actor/grad_norm",
        "actor/lr",
    ] {
        assert!(recs[1].metrics[key].is_finite(), "{key}");
    }
    // The metrics of the saved state match the log.
    let state = qoq_rl::checkpoint::Checkpoint::open(&ck)
        .unwrap()
        .trainer_state()
        .unwrap();
    assert_eq!(state.step, 2);
    assert_eq!(
        state.metrics["reward/overall"],
        recs[1].metrics["reward/overall"]
    );

    // Resuming continues with the saved config (max_steps 2): nothing left to do.
    let o = train(&["--resume".as_ref(), out.as_os_str()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recs = qoq_rl::metrics_log::read_records(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(recs.len(), 3);
    // `--set` on top of the checkpoint's config: one more step.
    let o = train(&[
        "--resume".as_ref(),
        out.as_os_str(),
        "--set".as_ref(),
        "trainer.max_steps=3".as_ref(),
        "--no-plot".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recs = qoq_rl::metrics_log::read_records(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        recs.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let o = train(&[
        "--resume".as_ref(),
        out.as_os_str(),
        "--set".as_ref(),
        "model.freeze_llm=true".as_ref(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("model.freeze_llm"));
    // An RL checkpoint cannot be resumed as SFT.
    let o = train(&["--resume".as_ref(), out.as_os_str(), "--sft".as_ref()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("RL run"));

    // The run folder is locked while a run uses it: a finished run leaves no lock, and a lock
    // held by a live process (this test's) stops a second `qoq train` at once, naming it.
    let lock = out.join(qoq_rl::run_dir::LOCK_FILE);
    assert!(!lock.exists());
    let owner = qoq_rl::run_dir::LockOwner {
        pid: std::process::id(),
        host: qoq_rl::run_dir::this_host(),
        started: "2026-12-04T18:00:00Z".into(),
        proc_start: None,
    };
    std::fs::write(&lock, serde_json::to_string(&owner).unwrap()).unwrap();
    let log_before = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let o = train(&["--resume".as_ref(), out.as_os_str()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", std::process::id()))
            && stderr.contains(&owner.host)
            && stderr.contains("2026-12-04T18:00:00Z"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
        log_before,
        "the refused run touched the metrics log"
    );
    std::fs::remove_file(&lock).unwrap();

    // Changed data: the checkpoint's manifest fingerprint no longer matches; --resume refuses,
    // naming the change, unless --allow-changed-data, which events.jsonl records.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let fewer: Vec<&str> = text.lines().take(3).collect();
    std::fs::write(&manifest, fewer.join("\n") + "\n").unwrap();
    let more: [&std::ffi::OsStr; 3] = [
        "--set".as_ref(),
        "trainer.max_steps=4".as_ref(),
        "--no-plot".as_ref(),
    ];
    let mut args = vec!["--resume".as_ref(), out.as_os_str()];
    args.extend(more);
    let o = train(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("rows 4 → 3") && stderr.contains("--allow-changed-data"),
        "{stderr}"
    );
    assert!(!out.join(qoq_rl::run_dir::EVENTS_FILE).exists());
    args.push("--allow-changed-data".as_ref());
    let o = train(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let events = std::fs::read_to_string(out.join(qoq_rl::run_dir::EVENTS_FILE)).unwrap();
    assert!(
        events.contains("resume_with_changed_data") && events.contains("rows 4 → 3"),
        "{events}"
    );
    // The new fingerprint is saved: the next resume on the same data needs no flag.
    let o = train(&[
        "--resume".as_ref(),
        out.as_os_str(),
        "--set".as_ref(),
        "trainer.max_steps=4".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = train(&[
        "--config".as_ref(),
        run_toml.as_os_str(),
        "--allow-changed-data".as_ref(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume only"));

    // The run file again on the same folder: trainer.find_last_checkpoint (default true)
    // continues the run from its newest checkpoint with the file's current values (here one
    // more step), keeping its metrics log.
    let o = train(&[
        "--config".as_ref(),
        run_toml.as_os_str(),
        "--set".as_ref(),
        "trainer.max_steps=5".as_ref(),
        "--no-plot".as_ref(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("checkpoint_step_4") && stderr.contains("trainer.max_steps=5"),
        "{stderr}"
    );
    let recs = qoq_rl::metrics_log::read_records(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        recs.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5]
    );
    // Without it, a new run there would overwrite the old one: refused, nothing touched.
    let log_before = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    for (key, want) in [
        ("trainer.find_last_checkpoint=false", "already holds a run"),
        (
            "trainer.load_checkpoint_path=/nonexistent/checkpoint_step_1",
            "no checkpoint there",
        ),
    ] {
        let o = train(&[
            "--config".as_ref(),
            run_toml.as_os_str(),
            "--set".as_ref(),
            key.as_ref(),
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{key}: {stderr}");
        assert!(stderr.contains(want), "{key}: {stderr}");
    }
    // --sft on this RL run is refused, as with --resume.
    let o = train(&["--config".as_ref(), run_toml.as_os_str(), "--sft".as_ref()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("RL run"));
    // A key the saved run may not change is refused by name, as with --resume.
    let o = train(&[
        "--config".as_ref(),
        run_toml.as_os_str(),
        "--set".as_ref(),
        "model.freeze_llm=true".as_ref(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("model.freeze_llm"));
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
        log_before
    );

    // SFT mode on the same run file.
    let sft_out = dir.path().join("sft");
    let o = train(&[
        "--config".as_ref(),
        run_toml.as_os_str(),
        "--sft".as_ref(),
        "--set".as_ref(),
        "trainer.max_steps=1".as_ref(),
        "--set".as_ref(),
        format!("trainer.out_dir={}", sft_out.display()).as_ref(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("sft loss"), "{stderr}");
    let recs = qoq_rl::metrics_log::read_records(&sft_out.join("metrics.jsonl")).unwrap();
    assert!(recs.last().unwrap().metrics["sft/loss"] > 0.0);

    // Bad invocations fail with a message.
    let o = train(&[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--config"));
}

/// `configs/tiny_cpu.toml` runs after the commands its header (and the README) shows: `qoq
/// synth`, `qoq model init --preset tiny`, then `qoq train` (paths moved to a temporary folder
/// with `--set`, one step, a small world).
#[test]
fn tiny_cpu_config_runs_after_synth_and_model_init() {
    let dir = tempfile::tempdir().unwrap();
    let qoq = || Command::new(env!("CARGO_BIN_EXE_qoq"));
    let synth = dir.path().join("synth");
    let o = qoq()
        .args(["synth", "--out"])
        .arg(&synth)
        .args(["--largest-domain-rows", "12", "--test-per-class", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let model = dir.path().join("tiny_model");
    let o = qoq()
        .args(["model", "init", "--preset", "tiny", "--out"])
        .arg(&model)
        .arg("--tokenizer")
        .arg(repo().join("crates/qoq-processor/tests/fixtures/tiny_model/tokenizer.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = dir.path().join("tiny_cpu");
    let set = |k: &str, v: &std::path::Path| format!("{k}={}", v.display());
    let o = train(&[
        "--config".as_ref(),
        repo().join("configs/tiny_cpu.toml").as_os_str(),
        "--set".as_ref(),
        set("data.train_files", &synth.join("train.jsonl")).as_ref(),
        "--set".as_ref(),
        set("data.val_files", &synth.join("test.jsonl")).as_ref(),
        "--set".as_ref(),
        set("model.model_path", &model).as_ref(),
        "--set".as_ref(),
        set("trainer.out_dir", &run).as_ref(),
        "--set".as_ref(),
        "trainer.max_steps=1".as_ref(),
        "--no-plot".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recs = qoq_rl::metrics_log::read_records(&run.join("metrics.jsonl")).unwrap();
    let step1 = recs.iter().find(|r| r.step == 1).expect("step 1 logged");
    assert!(step1.metrics["reward/overall"].is_finite());
    // A checkpoint is a model folder: `qoq eval --model` evaluates it as it is.
    let ck = run.join("checkpoint_step_1");
    let eval = dir.path().join("eval");
    let o = qoq()
        .args(["eval", "--model"])
        .arg(&ck)
        .arg("--data")
        .arg(synth.join("test.jsonl"))
        .args(["--temperature", "0", "--max-new-tokens", "4", "--out"])
        .arg(&eval)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(eval.join("metrics.json").is_file());
}

/// The real 7B checkpoint's shape (`config.json` of Qwen2.5-VL-7B: dimensions only).
const SEVEN_B_CONFIG: &str = r#"{
  "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
  "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
  "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
  "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
  "hidden_act": "silu", "tie_word_embeddings": false, "image_token_id": 151655,
  "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
  "vision_token_id": 151654, "bos_token_id": 151643, "eos_token_id": 151645,
  "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
  "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
    "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
    "temporal_patch_size": 2, "tokens_per_second": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "out_hidden_size": 3584, "hidden_act": "silu"}
}"#;

/// `--dry-run` loads no weights and writes nothing: on the tiny model it prints the estimate and
/// fits; the 7B recipe on a 7B-shaped model (its config.json only, no weights) does not fit this
/// machine (f32 weights, reference, AdamW moments and gradients: about 200 GiB) and exits 1
/// with the numbers.
#[test]
fn dry_run_prints_the_memory_estimate_and_refuses_a_plan_that_cannot_fit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = derm_manifest(dir.path(), 2, "What is the diagnosis?");
    let out = dir.path().join("run");
    let run_toml = dir.path().join("run.toml");
    std::fs::write(
        &run_toml,
        format!(
            "[data]\ntrain_files = \"{m}\"\nval_files = \"{m}\"\nrollout_batch_size = 2\n\
             [model]\nmodel_path = \"{model}\"\n[actor]\nglobal_batch_size = 2\n\
             micro_batch_size_per_device_for_update = 2\n[trainer]\nn_gpus_per_node = 1\n\
             out_dir = \"{out}\"\n",
            m = manifest.display(),
            model = model.display(),
            out = out.display()
        ),
    )
    .unwrap();
    let o = train(&[
        "--config".as_ref(),
        run_toml.as_os_str(),
        "--dry-run".as_ref(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for part in [
        "parameters",
        "weights",
        "reference",
        "optimiser",
        "kv cache",
        "activations",
        "gradients",
        "peak",
        "the run fits",
        "data-parallel world size 1 (trainer.nnodes 1 × trainer.n_gpus_per_node 1)",
        "one rank: nothing is all-reduced",
    ] {
        assert!(stdout.contains(part), "{part}: {stdout}");
    }
    assert!(!out.exists(), "a dry run wrote {}", out.display());
    // The all-reduce payload: every trained parameter's f32 gradient (and one f64 per tensor).
    let trained: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("parameters "))
        .map_or("", |l| number_after(l, "(", " trained"))
        .parse()
        .unwrap_or_else(|_| panic!("{stdout}"));
    let gradients: u64 = number_after(&stdout, "GiB): ", " f32 gradients")
        .parse()
        .unwrap_or_else(|_| panic!("{stdout}"));
    assert_eq!(gradients, trained, "{stdout}");

    let big = dir.path().join("seven_b");
    std::fs::create_dir_all(&big).unwrap();
    std::fs::write(big.join("config.json"), SEVEN_B_CONFIG).unwrap();
    let recipe = repo().join("configs/qoq_med_7b_drpo.toml");
    let o = train(&[
        "--config".as_ref(),
        recipe.as_os_str(),
        "--set".as_ref(),
        format!("model.model_path={}", big.display()).as_ref(),
        "--set".as_ref(),
        format!("trainer.out_dir={}", out.display()).as_ref(),
        "--dry-run".as_ref(),
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("the run does not fit: it needs about") && stderr.contains("GiB"),
        "{stderr}"
    );
    // 8.3 billion parameters, all trained.
    let params: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("parameters "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!((8_200_000_000..8_400_000_000).contains(&params), "{params}");
    assert!(!out.exists());
    // 1 node × 8 devices; 512 prompts a step in mini-batches of 128: 4 all-reduces of the
    // 8.3 billion f32 gradients (and one f64 per tensor), each rank sending 2·7/8 of them.
    assert!(
        stdout
            .contains("data-parallel world size 8 (trainer.nnodes 1 × trainer.n_gpus_per_node 8)"),
        "{stdout}"
    );
    let payload: u64 = number_after(&stdout, "payload per optimiser step ", " B")
        .parse()
        .unwrap_or_else(|_| panic!("{stdout}"));
    let per_rank: u64 = number_after(&stdout, "per-rank traffic per optimiser step ", " B")
        .parse()
        .unwrap_or_else(|_| panic!("{stdout}"));
    let tensors = (payload - params * 4) / 8;
    assert_eq!(payload, params * 4 + tensors * 8, "{stdout}");
    assert!((300..1000).contains(&tensors), "{tensors}: {stdout}");
    assert_eq!(
        per_rank,
        params * 4 * 14 / 8 + tensors * 8 * 14 / 8,
        "{stdout}"
    );
    assert!(
        stdout.contains("4 optimiser step(s) per training step"),
        "{stdout}"
    );
    assert!(
        stdout.contains("exceed one MPI message (2147483647 values): the MPI all-reduce sends them in 4 messages"),
        "{stdout}"
    );
}

/// The text of `out` between the first `before` and the next `after`, trimmed.
fn number_after<'a>(out: &'a str, before: &str, after: &str) -> &'a str {
    out.split_once(before)
        .and_then(|(_, rest)| rest.split_once(after))
        .map_or("", |(n, _)| n.trim())
}
