//! `qoq bench train-step` end to end on the tiny model without the PyTorch reference: every phase
//! is timed and measured, the losses are finite, and bad arguments are refused.

mod support;

use std::process::Command;

fn qoq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
}

#[test]
fn tiny_train_step_reports_every_phase() {
    let (stdout, v) = tiny_run(&["--no-reference"]);
    assert!(
        stdout.contains("PyTorch reference not run: --no-reference"),
        "{stdout}"
    );
    // The dry run's memory estimate beside the measured peak, with its parts.
    assert!(
        stdout.contains("memory estimate (as `qoq train --dry-run` computes it")
            && stdout.contains("estimate/measured")
            && stdout.contains("activations"),
        "{stdout}"
    );
    assert_eq!(v["size"], "tiny");
    assert!(v["torch"].is_null());
    assert_eq!(v["reference_absent"], "--no-reference");
    assert!(v["qoq"]["estimate"]["peak_mib"].as_f64().unwrap() > 0.0);
    let phases = &v["qoq"]["phases"];
    for p in ["process", "generate", "ref_logprobs", "update", "total"] {
        let secs = phases[p]["seconds"].as_f64().unwrap_or(-1.0);
        let mib = phases[p]["peak_mib"].as_f64().unwrap_or(-1.0);
        assert!(secs > 0.0, "{p}: seconds {secs}");
        assert!(mib > 0.0, "{p}: peak MiB {mib}");
        if p != "total" {
            assert!(
                secs <= phases["total"]["seconds"].as_f64().unwrap(),
                "{p} longer than the step"
            );
        }
    }
    let step = &v["qoq"]["steps"][0];
    // 2 prompts x 2 rollouts in micro-batches of 2: two micro-batch losses.
    let losses = step["losses"].as_array().unwrap();
    assert_eq!(losses.len(), 2, "{step}");
    assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite()));
    let norm = step["grad_norm"].as_f64().unwrap();
    // The benchmark reward gives the rollouts of a group distinct rewards: the gradient is not 0.
    assert!(norm.is_finite() && norm > 1e-3, "grad norm {norm}");
}

/// `qoq bench train-step --size tiny` (one step, 2 prompts x 2 rollouts x 4 tokens) with
/// `extra` arguments, which must succeed: its standard output and JSON report.
fn tiny_run(extra: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.json");
    let o = qoq()
        .current_dir(support::repo())
        .args([
            "bench",
            "train-step",
            "--size",
            "tiny",
            "--prompts",
            "2",
            "--n",
            "2",
            "--response-len",
            "4",
            "--steps",
            "1",
        ])
        .args(extra)
        .arg("--json")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let v = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    (stdout, v)
}

/// [`tiny_run`] without the PyTorch reference: its JSON report.
fn tiny_step(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--no-reference"];
    args.extend_from_slice(extra);
    tiny_run(&args).1
}

#[test]
fn gradient_checkpointing_flag_recomputes_the_layers_and_keeps_the_step() {
    let plain = tiny_step(&[]);
    let ckpt = tiny_step(&["--gradient-checkpointing"]);
    assert_eq!(plain["gradient_checkpointing"], false);
    assert_eq!(ckpt["gradient_checkpointing"], true);
    assert_eq!(plain["qoq"]["recomputed_segments"], 0);
    assert!(ckpt["qoq"]["recomputed_segments"].as_u64().unwrap() > 0);
    let (a, b) = (&plain["qoq"]["steps"][0], &ckpt["qoq"]["steps"][0]);
    assert_eq!(a["losses"], b["losses"], "the same forward");
    let (na, nb) = (
        a["grad_norm"].as_f64().unwrap(),
        b["grad_norm"].as_f64().unwrap(),
    );
    assert!((na - nb).abs() <= 1e-5 * na, "grad norm {na} vs {nb}");
}

/// `--no-pack` computes each rollout as its own row (the reference's layout); by default the
/// rollouts of a prompt in a micro-batch share one row: the same losses and gradient norm up to
/// rounding.
#[test]
fn no_pack_flag_computes_one_rollout_per_row_and_keeps_the_step() {
    let packed = tiny_step(&[]);
    let plain = tiny_step(&["--no-pack"]);
    assert_eq!(packed["pack_rollouts"], true);
    assert_eq!(plain["pack_rollouts"], false);
    assert_eq!(plain["qoq"]["packed_micro_batches"], 0);
    assert!(packed["qoq"]["packed_micro_batches"].as_u64().unwrap() > 0);
    let (a, b) = (&plain["qoq"]["steps"][0], &packed["qoq"]["steps"][0]);
    let losses = |v: &serde_json::Value| -> Vec<f64> {
        v["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    for (x, y) in losses(a).iter().zip(losses(b)) {
        assert!((x - y).abs() <= 1e-6, "loss {x} vs {y}");
    }
    let (na, nb) = (
        a["grad_norm"].as_f64().unwrap(),
        b["grad_norm"].as_f64().unwrap(),
    );
    assert!((na - nb).abs() <= 1e-4 * na, "grad norm {na} vs {nb}");
}

/// `--all-reduce host` is the one-process step unchanged (recorded in the report); `nccl` on
/// the CPU (or in a build without the feature) is refused naming the key and the way out. The
/// NCCL run itself needs a GPU: scripts/gpu-check.sh.
#[test]
fn all_reduce_flag_reaches_the_run_and_nccl_is_refused_off_the_gpu() {
    let auto = tiny_step(&[]);
    let host = tiny_step(&["--all-reduce", "host"]);
    assert_eq!(auto["all_reduce"], "auto");
    assert_eq!(host["all_reduce"], "host");
    let (a, b) = (&auto["qoq"]["steps"][0], &host["qoq"]["steps"][0]);
    assert_eq!(a["losses"], b["losses"]);
    assert_eq!(a["grad_norm"], b["grad_norm"]);
    let err = refused(&["--no-reference", "--steps", "1", "--all-reduce", "nccl"]);
    assert!(
        err.contains("trainer.all_reduce") && err.contains("nccl"),
        "{err}"
    );
    assert!(
        err.contains("without the `nccl` feature") || err.contains("needs a CUDA model.device"),
        "{err}"
    );
}

/// `qoq bench train-step ARGS`, which must fail: its standard error.
fn refused(args: &[&str]) -> String {
    let o = qoq()
        .current_dir(support::repo())
        .args(["bench", "train-step"])
        .args(args)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn zero_rollouts_are_refused() {
    let err = refused(&["--n", "0", "--no-reference", "--steps", "1"]);
    assert!(err.contains("--n"), "{err}");
}

/// The first step of a report: finite micro-batch losses and a finite, non-zero gradient norm.
fn first_step_is_finite(v: &serde_json::Value) {
    let step = &v["qoq"]["steps"][0];
    let losses = step["losses"].as_array().unwrap();
    assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite()));
    let norm = step["grad_norm"].as_f64().unwrap();
    assert!(norm.is_finite() && norm > 0.0, "grad norm {norm}");
}

#[test]
fn bf16_compute_and_lora_rows_run_and_skip_the_f32_reference() {
    let (stdout, v) = tiny_run(&["--compute-dtype", "bf16", "--lora-rank", "2"]);
    assert!(
        stdout.contains("bf16 compute over f32 masters, LoRA r=2"),
        "{stdout}"
    );
    assert_eq!(v["compute_dtype"], "bf16");
    assert_eq!(v["lora_rank"], 2);
    let absent = v["reference_absent"].as_str().unwrap();
    assert!(
        absent.contains("--compute-dtype bf16") && absent.contains("--lora-rank"),
        "{absent}"
    );
    first_step_is_finite(&v);
}

#[test]
fn bf16_masters_with_adamw_bf16_run_and_mixed_pairing_is_refused() {
    let (stdout, v) = tiny_run(&[
        "--compute-dtype",
        "bf16",
        "--master-dtype",
        "bf16",
        "--strategy",
        "adamw_bf16",
        "--gradient-checkpointing",
    ]);
    assert!(
        stdout.contains("bf16 masters and compute, adamw_bf16 (bf16 moments, Kahan)"),
        "{stdout}"
    );
    // The estimate prices the optimiser the run file asked for.
    assert!(
        stdout.contains("two bf16 moments + bf16 compensation"),
        "{stdout}"
    );
    assert_eq!(v["master_dtype"], "bf16");
    assert_eq!(v["strategy"], "adamw_bf16");
    let absent = v["reference_absent"].as_str().unwrap();
    assert!(
        absent.contains("--master-dtype bf16") && absent.contains("--strategy adamw_bf16"),
        "{absent}"
    );
    first_step_is_finite(&v);
    // bf16 masters under f32 compute is no mixed precision the trainer has: refused by key.
    let err = refused(&["--master-dtype", "bf16", "--no-reference", "--steps", "1"]);
    assert!(err.contains("model.compute_dtype"), "{err}");
}

#[test]
fn model_flag_trains_the_given_folder_and_counts_the_update_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::tiny_model_with(dir.path(), false);
    let out = dir.path().join("out.json");
    let o = qoq()
        .current_dir(support::repo())
        .args(["bench", "train-step", "--model"])
        .arg(&model)
        .args([
            "--prompts",
            "2",
            "--n",
            "2",
            "--response-len",
            "4",
            "--steps",
            "1",
            "--no-reference",
            "--json",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    // The report names the folder, not a --size.
    assert_eq!(v["size"], model.display().to_string());
    assert_eq!(v["reference_device"], "cpu");
    let step = &v["qoq"]["steps"][0];
    assert!(step["grad_norm"].as_f64().unwrap().is_finite());
    // 4 rollouts of (prompt + 4 response tokens): more than 4 x 4 tokens, and a whole number of
    // rows of one width per micro-batch.
    let tokens = step["update_tokens"].as_u64().unwrap();
    assert!(tokens > 16, "update tokens {tokens}");
    assert_eq!(tokens % 2, 0, "two rows per micro-batch: {tokens}");

    // --model and --size together are refused, naming both.
    let o = qoq()
        .args(["bench", "train-step", "--size", "tiny", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("--model") && err.contains("--size"), "{err}");
}
