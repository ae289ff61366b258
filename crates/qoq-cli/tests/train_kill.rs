//! `qoq train` killed with SIGKILL in the middle of a step, then `--resume`d, ends with the same
//! weights (byte for byte) and the same metrics log as an uninterrupted run (issue 8).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::{repo, tiny_model};

/// A run file for 5 DRPO steps on 6 image questions in two datasets, validating every 2 steps
/// and checkpointing after every step.
fn run_file(dir: &Path, model: &Path, out: &Path) -> PathBuf {
    let algorithm = "estimator = \"drpo\"\n\n[algorithm.drpo]\nengine = \"exact\"\nk_max = 3";
    run_file_with(dir, model, out, algorithm, 5, 2, "")
}

/// [`run_file`] with another `[algorithm]` body, length and validation frequency, and `extra`
/// TOML appended at the end (after `[trainer]`).
fn run_file_with(
    dir: &Path,
    model: &Path,
    out: &Path,
    algorithm: &str,
    max_steps: u64,
    val_freq: u64,
    extra: &str,
) -> PathBuf {
    let manifest = dir.join("train.jsonl");
    if !manifest.exists() {
        let img = repo().join("examples/mini/derm/demo-derm/case_001.png");
        let mut rows = String::new();
        for i in 0..6 {
            let ds = if i % 2 == 0 { "alpha" } else { "beta" };
            std::fs::create_dir_all(dir.join("derm").join(ds)).unwrap();
            std::fs::copy(&img, dir.join("derm").join(ds).join("case.png")).unwrap();
            rows.push_str(&format!(
                "{{\"problem\": \"<image>Case {i}. What is the diagnosis?Answer with one of the following:\\nbenign\\nmalignant\", \"answer\": \"benign\", \"images\": [\"derm/{ds}/case.png\"], \"dataset\": \"{ds}\"}}\n"
            ));
        }
        std::fs::write(&manifest, rows).unwrap();
    }
    let path = out.with_extension("toml");
    std::fs::write(
        &path,
        format!(
            r#"
[data]
train_files = "{m}"
val_files = "{m}"
max_prompt_length = 512
max_response_length = 12
rollout_batch_size = 4
val_batch_size = 4
max_pixels = 12544
min_pixels = 3136

[model]
model_path = "{model}"

[rollout]
n = 4
top_p = 1.0

[algorithm]
{algorithm}

[actor]
global_batch_size = 2
micro_batch_size_per_device_for_update = 4
micro_batch_size_per_device_for_experience = 4

[actor.optim]
lr = 1e-3

[trainer]
max_steps = {max_steps}
val_freq = {val_freq}
val_before_train = false
save_freq = 1
save_limit = 2
n_gpus_per_node = 1
tensorboard = true
out_dir = "{out}"
{extra}
"#,
            m = manifest.display(),
            model = model.display(),
            out = out.display(),
        ),
    )
    .unwrap();
    path
}

fn qoq() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qoq"));
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// `qoq train --no-plot <flag> <path>` to its end; asserts success and returns its stderr.
fn train_to_end(flag: &str, path: &Path) -> String {
    let o = qoq()
        .args(["train", "--no-plot", flag])
        .arg(path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{stderr}");
    stderr
}

/// `qoq train --config cfg` SIGKILLed as soon as `out` logs step 2, then resumed to its end;
/// returns the resume's stderr.
fn killed_at_step_2_then_resumed(cfg: &Path, out: &Path) -> String {
    let mut first = qoq();
    first.args(["train", "--no-plot", "--config"]).arg(cfg);
    kill_when_logged(first, out, 2, 0);
    train_to_end("--resume", out)
}

/// `files` of `checkpoint_step_{step}` are byte-identical in the two runs.
fn assert_same_checkpoint_files(a: &Path, b: &Path, step: u64, files: &[&str]) {
    let ck = format!("checkpoint_step_{step}");
    for file in files {
        let x = std::fs::read(a.join(&ck).join(file)).unwrap();
        let y = std::fs::read(b.join(&ck).join(file)).unwrap();
        assert!(x == y, "{file} differs after kill and resume");
    }
}

/// Metrics lines without the wall-clock fields (times differ between runs).
fn comparable_log(out: &Path) -> Vec<(u64, Vec<(String, u64)>)> {
    qoq_rl::metrics_log::read_records(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| {
            let m = r
                .metrics
                .into_iter()
                .filter(|(k, _)| !k.starts_with("perf/") && !k.starts_with("timing_s/"))
                .map(|(k, v)| (k, v.to_bits()))
                .collect();
            (r.step, m)
        })
        .collect()
}

fn lines_of(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Spawns `cmd` and SIGKILLs it `delay_ms` after `out/metrics.jsonl` holds `lines` lines.
fn kill_when_logged(mut cmd: Command, out: &Path, lines: usize, delay_ms: u64) {
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    while lines_of(&out.join("metrics.jsonl")) < lines {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended before it could be killed: {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{lines} steps not logged in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(delay_ms));
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run finished before the kill");
    let logged = lines_of(&out.join("metrics.jsonl"));
    let checkpoints = qoq_rl::checkpoint::list(out).unwrap();
    eprintln!(
        "killed with {logged} steps logged; complete checkpoints: {:?}",
        checkpoints.iter().map(|(s, _)| *s).collect::<Vec<_>>()
    );
    assert!(logged < 5, "killed too late: {logged} steps logged");
}

#[test]
fn sigkill_mid_step_then_resume_matches_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());

    // The uninterrupted run.
    let out_a = dir.path().join("a");
    let cfg_a = run_file(dir.path(), &model, &out_a);
    train_to_end("--config", &cfg_a);

    // The killed run, twice: first SIGKILL as soon as the log holds step 2 (while checkpoint 2
    // is being written, or just after), then, resumed, SIGKILL 300 ms after the log holds
    // step 4 (inside step 5 or its checkpoint). Either way the resume must land on the same result.
    let out_b = dir.path().join("b");
    let cfg_b = run_file(dir.path(), &model, &out_b);
    let mut first = qoq();
    first.args(["train", "--no-plot", "--config"]).arg(&cfg_b);
    kill_when_logged(first, &out_b, 2, 0);
    // The killed run's lock is left behind; its process is gone, so the resume takes it over.
    assert!(out_b.join(qoq_rl::run_dir::LOCK_FILE).is_file());
    let mut second = qoq();
    second.args(["train", "--no-plot", "--resume"]).arg(&out_b);
    kill_when_logged(second, &out_b, 4, 300);
    let events = std::fs::read_to_string(out_b.join(qoq_rl::run_dir::EVENTS_FILE)).unwrap();
    assert!(events.contains("stale_lock_taken_over"), "{events}");

    let stderr = train_to_end("--resume", &out_b);
    assert!(stderr.contains("step 5/5"), "{stderr}");

    // The same final weights, byte for byte, and the same optimiser state.
    assert_same_checkpoint_files(
        &out_a,
        &out_b,
        5,
        &["model.safetensors", "optimizer.safetensors"],
    );
    // The same metrics log (every step once, validation included), bit for bit.
    let (la, lb) = (comparable_log(&out_a), comparable_log(&out_b));
    assert_eq!(
        lb.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(la, lb, "metrics differ after kill and resume");
    assert!(la[1].1.iter().any(|(k, _)| k == "val/reward_score"));
    // The validation generations of the resumed steps are identical too.
    for step in [2, 4, 5] {
        let name = format!("val_generations_{step}.jsonl");
        assert_eq!(
            std::fs::read_to_string(out_a.join(&name)).unwrap(),
            std::fs::read_to_string(out_b.join(&name)).unwrap(),
            "{name}"
        );
    }
    // No half-written checkpoint is left behind, and pruning kept the last two.
    let names: Vec<String> = std::fs::read_dir(&out_b)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint") || n.contains("tmp"))
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec!["checkpoint_step_4", "checkpoint_step_5"],
        "{names:?}"
    );
}

#[test]
fn ppo_with_gae_resumes_after_sigkill_with_the_same_policy_and_critic() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let algorithm = "estimator = \"gae\"\nlam = 0.95\n\n[critic]\ncliprange_value = 0.2\n\n[critic.optim]\nlr = 1e-3";
    let out_a = dir.path().join("a");
    let cfg_a = run_file_with(dir.path(), &model, &out_a, algorithm, 3, 0, "");
    train_to_end("--config", &cfg_a);
    let out_b = dir.path().join("b");
    let cfg_b = run_file_with(dir.path(), &model, &out_b, algorithm, 3, 0, "");
    killed_at_step_2_then_resumed(&cfg_b, &out_b);
    assert_same_checkpoint_files(
        &out_a,
        &out_b,
        3,
        &[
            "model.safetensors",
            "optimizer.safetensors",
            "critic.safetensors",
            "critic_optimizer.safetensors",
        ],
    );
    let (la, lb) = (comparable_log(&out_a), comparable_log(&out_b));
    assert_eq!(la, lb, "metrics differ after kill and resume");
    assert!(la[0].1.iter().any(|(k, _)| k == "critic/vf_loss"));
}

#[test]
fn early_stopping_after_sigkill_and_resume_stops_at_the_same_step_with_the_same_best() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // min_delta 10 on a reward in [0, 1]: step 1's validation is the best, every later one is
    // bad, so patience 3 stops after step 4 of 5, if the bad count survives the kill.
    let algorithm = "estimator = \"drpo\"\n\n[algorithm.drpo]\nengine = \"exact\"\nk_max = 3";
    let es =
        "[trainer.early_stopping]\nmetric = \"val/reward_score\"\npatience = 3\nmin_delta = 10.0";
    let out_a = dir.path().join("a");
    let cfg_a = run_file_with(dir.path(), &model, &out_a, algorithm, 5, 1, es);
    let stderr = train_to_end("--config", &cfg_a);
    assert!(
        stderr.contains("stopped after step 4: early stopping: val/reward_score"),
        "{stderr}"
    );

    let out_b = dir.path().join("b");
    let cfg_b = run_file_with(dir.path(), &model, &out_b, algorithm, 5, 1, es);
    let stderr = killed_at_step_2_then_resumed(&cfg_b, &out_b);
    assert!(stderr.contains("stopped after step 4"), "{stderr}");

    // The same stop, the same best, the same weights and log.
    let (la, lb) = (comparable_log(&out_a), comparable_log(&out_b));
    assert_eq!(lb.last().unwrap().0, 4);
    assert_eq!(la, lb, "metrics differ after kill and resume");
    for out in [&out_a, &out_b] {
        let best: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(qoq_rl::trainer::BEST_CHECKPOINT_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(best["checkpoint"], "checkpoint_step_1");
        // save_limit 2 keeps the last two; the best is kept beside them.
        let steps: Vec<u64> = qoq_rl::checkpoint::list(out)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![1, 3, 4]);
        let events = std::fs::read_to_string(out.join(qoq_rl::run_dir::EVENTS_FILE)).unwrap();
        assert!(events.contains("\"early_stop\""), "{events}");
    }
    assert_same_checkpoint_files(&out_a, &out_b, 4, &["model.safetensors"]);
}
