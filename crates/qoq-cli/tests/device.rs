//! `--device` on every command that runs a model, and `model.device` in run files: a CPU build
//! refuses `cuda` naming the cargo feature and the build command, an unknown name lists the
//! accepted ones, and `qoq train --device` overrides the run file, on a fresh run and a resume,
//! with the checkpoint's config recording the device used.

use std::ffi::OsStr;
use std::process::{Command, Output};

mod support;

use support::{derm_manifest, tiny_model};

const FEATURE_MESSAGE: &str = "qoq was built without the `cuda` feature: rebuild with \
                               `cargo build --release -p qoq-cli --features cuda`";

fn qoq<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
        .args(args)
        .output()
        .unwrap()
}

/// Each command's arguments up to `--device` (the files need not exist: the device is refused
/// while the arguments are parsed, before anything is read).
fn commands() -> Vec<Vec<&'static str>> {
    vec![
        vec!["train", "--config", "missing.toml"],
        vec!["infer", "--model", "missing", "What is the diagnosis?"],
        vec!["serve", "--model", "missing"],
        vec![
            "eval", "--data", "t.jsonl", "--model", "missing", "--out", "o",
        ],
        vec!["logits", "--model", "m", "--inputs", "i", "--out", "o"],
        vec!["bench", "train-step", "--no-reference"],
        vec!["bench", "serve"],
        vec!["bench", "generate", "--model", "m"],
    ]
}

#[test]
fn device_cuda_in_a_cpu_build_is_refused_with_the_feature_and_build_command() {
    if cfg!(feature = "cuda") {
        eprintln!("skipped: this build has the `cuda` feature");
        return;
    }
    for cmd in commands() {
        for dev in ["cuda", "cuda:1"] {
            let mut args = cmd.clone();
            args.extend(["--device", dev]);
            let o = qoq(&args);
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{cmd:?} --device {dev}: {stderr}");
            assert_eq!(o.status.code(), Some(2), "{cmd:?}: {stderr}");
            assert!(
                stderr.contains(&format!("device `{dev}`: {FEATURE_MESSAGE}")),
                "{cmd:?} --device {dev}: {stderr}"
            );
        }
    }
}

#[test]
fn an_unknown_device_is_refused_naming_it_and_the_accepted_forms() {
    for cmd in commands() {
        let mut args = cmd.clone();
        args.extend(["--device", "gpu0"]);
        let o = qoq(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{cmd:?}: {stderr}");
        assert!(
            stderr.contains("unknown device `gpu0`")
                && stderr.contains("`cpu`")
                && stderr.contains("`cuda:N`"),
            "{cmd:?}: {stderr}"
        );
        let mut args = cmd.clone();
        args.extend(["--device", "metal"]);
        let stderr = String::from_utf8_lossy(&qoq(&args).stderr).into_owned();
        assert!(
            stderr.contains("Metal is not supported"),
            "{cmd:?}: {stderr}"
        );
    }
}

/// A run file asking for `cuda:0` is refused by a CPU build naming `model.device`; `--device
/// cpu` overrides it, the checkpoint's config records `cpu`, and a resume may name the device
/// again (it is the one `model.*` key a resume may change).
#[test]
fn train_device_overrides_the_run_file_and_the_checkpoint_records_it() {
    if cfg!(feature = "cuda") {
        eprintln!("skipped: this build has the `cuda` feature");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = derm_manifest(dir.path(), 2, "What is the diagnosis?");
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
max_response_length = 4
rollout_batch_size = 2
max_pixels = 12544
min_pixels = 3136

[model]
model_path = "{model}"
device = "cuda:0"

[rollout]
n = 2

[actor]
global_batch_size = 2
micro_batch_size_per_device_for_update = 2
micro_batch_size_per_device_for_experience = 2

[trainer]
max_steps = 1
save_freq = 1
val_freq = 0
val_before_train = false
n_gpus_per_node = 1
out_dir = "{out}"
"#,
            m = manifest.display(),
            model = model.display(),
            out = out.display(),
        ),
    )
    .unwrap();
    let o = qoq(&[
        "train".as_ref(),
        "--config".as_ref(),
        run_toml.as_os_str(),
        "--no-plot".as_ref(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("model.device") && stderr.contains(FEATURE_MESSAGE),
        "{stderr}"
    );
    assert!(!out.join("checkpoint_step_1").exists());

    let o = qoq(&[
        "train".as_ref(),
        "--config".as_ref(),
        run_toml.as_os_str(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--no-plot".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let saved = out.join("checkpoint_step_1/config.toml");
    let cfg = qoq_rl::config::RunConfig::from_toml_str(
        &std::fs::read_to_string(&saved).unwrap(),
        "config.toml",
    )
    .unwrap();
    assert_eq!(cfg.model.device, "cpu");

    // A resume keeps the saved device, or takes --device (not refused like other model.* keys).
    let o = qoq(&[
        "train".as_ref(),
        "--resume".as_ref(),
        out.as_os_str(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--set".as_ref(),
        "trainer.max_steps=2".as_ref(),
        "--no-plot".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("checkpoint_step_2/config.toml").is_file());
    let o = qoq(&[
        "train".as_ref(),
        "--resume".as_ref(),
        out.as_os_str(),
        "--set".as_ref(),
        "model.device=tpu".as_ref(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("model.device") && stderr.contains("unknown device `tpu`"),
        "{stderr}"
    );
}

/// scripts/build-cuda.sh, scripts/gpu-check.sh and what they share parse (`bash -n`) and refuse
/// bad arguments before doing anything: no toolkit download, no Python, no GPU (the GPU run
/// itself happens on a GPU machine: README "CUDA").
#[test]
fn cuda_scripts_parse_and_refuse_bad_arguments_before_any_work() {
    let repo = support::repo();
    for s in [
        "scripts/build-cuda.sh",
        "scripts/gpu-check.sh",
        "scripts/cuda-common.sh",
        "scripts/check-cuda.sh",
    ] {
        let o = Command::new("bash")
            .arg("-n")
            .arg(repo.join(s))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{s}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let cases: [(&str, Vec<&str>, Option<&str>, &str); 8] = [
        (
            "build-cuda.sh",
            vec!["--features", "cuda,cudnn"],
            None,
            "--features cudnn: not supported",
        ),
        (
            "build-cuda.sh",
            vec!["--release"],
            None,
            "unknown argument '--release'",
        ),
        (
            "build-cuda.sh",
            vec![],
            Some("sm_90"),
            "CUDA_COMPUTE_CAP must be a number",
        ),
        ("gpu-check.sh", vec![], None, "OUT_DIR missing"),
        (
            "gpu-check.sh",
            vec!["--device", "cpu", out],
            None,
            "--device cpu runs the tiny model only: add --tiny",
        ),
        (
            "gpu-check.sh",
            vec!["--device", "rocm", "--tiny", out],
            None,
            "--device must be cuda, cuda:N or cpu, not 'rocm'",
        ),
        (
            "gpu-check.sh",
            vec!["--tiny", "--budget", "5m", out],
            None,
            "--budget must be whole seconds",
        ),
        (
            "gpu-check.sh",
            vec![
                "--device",
                "cpu",
                "--tiny",
                "--qoq",
                "/nonexistent/qoq",
                out,
            ],
            None,
            "no qoq binary at /nonexistent/qoq",
        ),
    ];
    for (script, args, cap, want) in cases {
        let mut c = Command::new(repo.join("scripts").join(script));
        c.args(&args).env_remove("CUDA_COMPUTE_CAP");
        if let Some(v) = cap {
            c.env("CUDA_COMPUTE_CAP", v);
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{script} {args:?}: {err}");
        assert!(err.contains(want), "{script} {args:?}: {err}");
    }
    assert!(
        !dir.path().join("out").exists(),
        "a refused gpu-check created its output folder"
    );
}
