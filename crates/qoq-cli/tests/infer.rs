//! `qoq infer` end to end on a tiny random checkpoint (the processor fixture's tiny config and
//! tokenizer): a PNG chest X-ray with a WFDB ECG, and the real fundus photograph with the real
//! DICOM 12-lead ECG from the test-data cache.

use std::path::Path;
use std::process::Command;

mod support;

use support::{cache, repo, tiny_model};

fn infer(model: &Path, extra: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
        .arg("infer")
        .arg("--model")
        .arg(model)
        .args(["--max-new-tokens", "12", "--temperature", "0"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn infer_runs_an_image_and_ecg_case_and_draws_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mini = repo().join("examples/mini");
    let overlay = dir.path().join("overlay.png");
    let o = infer(
        &model,
        &[
            "--image".as_ref(),
            mini.join("chest_xray/demo-cxr/case_000.png").as_os_str(),
            "--ecg".as_ref(),
            mini.join("ecg/demo-ecg/rec_003.hea").as_os_str(),
            "--overlay".as_ref(),
            overlay.as_os_str(),
            "What is the diagnosis?".as_ref(),
        ],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for section in [
        "=== reasoning ===",
        "=== boxes",
        "=== answer ===",
        "12 tokens",
    ] {
        assert!(stdout.contains(section), "missing {section}:\n{stdout}");
    }
    let img = image::open(&overlay).unwrap();
    assert!(img.width() > 0);
    // Greedy decoding is deterministic: a second run prints the same.
    let o2 = infer(
        &model,
        &[
            "--image".as_ref(),
            mini.join("chest_xray/demo-cxr/case_000.png").as_os_str(),
            "--ecg".as_ref(),
            mini.join("ecg/demo-ecg/rec_003.hea").as_os_str(),
            "What is the diagnosis?".as_ref(),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&o2.stdout).lines().next(),
        stdout.lines().next()
    );
}

#[test]
fn infer_reads_the_real_fundus_photo_and_the_real_dicom_ecg() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let o = infer(
        &model,
        &[
            "--image".as_ref(),
            cache("images/retina.jpg").as_os_str(),
            "--ecg".as_ref(),
            cache("ecg/waveform_ecg.dcm").as_os_str(),
            "--quiet".as_ref(),
            "Describe the findings.".as_ref(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("=== answer ==="));
}

#[test]
fn a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let o = infer(
        &model,
        &["--image".as_ref(), "nope.png".as_ref(), "q".as_ref()],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.png"));
}

#[test]
fn model_init_writes_a_folder_that_infer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fresh");
    let tokenizer = repo().join("crates/qoq-processor/tests/fixtures/tiny_model/tokenizer.json");
    let init = |out: &Path, seed: &str| {
        Command::new(env!("CARGO_BIN_EXE_qoq"))
            .args(["model", "init", "--preset", "tiny", "--tokenizer"])
            .arg(&tokenizer)
            .arg("--out")
            .arg(out)
            .args(["--seed", seed])
            .output()
            .unwrap()
    };
    let o = init(&out, "3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let mini = repo().join("examples/mini");
    let o = infer(
        &out,
        &[
            "--image".as_ref(),
            mini.join("chest_xray/demo-cxr/case_000.png").as_os_str(),
            "--ecg".as_ref(),
            mini.join("ecg/demo-ecg/rec_003.hea").as_os_str(),
            "What is the diagnosis?".as_ref(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("=== answer ==="));
    // An existing model folder is never overwritten.
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let o = init(&out, "4");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        before
    );
}
