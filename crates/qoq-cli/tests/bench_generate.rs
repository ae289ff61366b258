//! `qoq bench generate` on a tiny stock model: the engine's prefill and decode throughput as the
//! JSON that scripts/gpu-check.sh reads, and its arguments' refusals.

mod support;

use std::process::Command;

fn qoq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
}

#[test]
fn generate_bench_reports_prefill_and_decode_rates() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::tiny_model_with(dir.path(), false);
    let out = dir.path().join("gen.json");
    let o = qoq()
        .args(["bench", "generate", "--model"])
        .arg(&model)
        .args([
            "--prompts",
            "2",
            "--n",
            "3",
            "--prompt-len",
            "8",
            "--new",
            "5",
            "--json",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("prefill") && stdout.contains("decode"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["rows"], 6);
    assert_eq!(v["new"], 5);
    assert_eq!(v["dtype"], "f32");
    assert_eq!(v["device"], "cpu");
    let (t1, tn) = (
        v["prefill_seconds"].as_f64().unwrap(),
        v["seconds"].as_f64().unwrap(),
    );
    assert!(t1 > 0.0 && tn > 0.0, "{v}");
    for k in ["prefill_tokens_per_s", "decode_tokens_per_s"] {
        let r = v[k].as_f64().unwrap();
        assert!(r.is_finite() && r > 0.0, "{k}: {r}");
    }
    // The rates are the documented ratios of the timings.
    let prefill = v["prefill_tokens_per_s"].as_f64().unwrap();
    assert!((prefill - 2.0 * 8.0 / t1).abs() <= 1e-9 * prefill);
}

#[test]
fn generate_bench_refuses_fewer_than_two_new_tokens() {
    let o = qoq()
        .args(["bench", "generate", "--model", "missing", "--new", "1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--new must be at least 2"), "{err}");
}
