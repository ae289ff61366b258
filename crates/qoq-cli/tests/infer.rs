//! `qoq infer` end to end on a tiny random checkpoint (the processor fixture's tiny config and
//! tokenizer): a PNG chest X-ray with a WFDB ECG, and the real fundus photograph with the real
//! DICOM 12-lead ECG from the test-data cache.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cache(rel: &str) -> PathBuf {
    let root = match std::env::var_os("QOQ_TESTDATA") {
        Some(p) => PathBuf::from(p),
        None => repo().join(".testdata"),
    };
    let p = root.join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-testdata.sh first",
        p.display()
    );
    p
}

/// A model folder: the processor fixture's files plus random weights for its config.
fn tiny_model(dir: &Path) -> PathBuf {
    let src = repo().join("crates/qoq-processor/tests/fixtures/tiny_model");
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    let cfg = qoq_core::hf_config::QwenVlConfig::from_file(&src.join("config.json")).unwrap();
    qoq_model::train::write_random_checkpoint(&cfg, &m).unwrap();
    for f in ["config.json", "preprocessor_config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), m.join(f)).unwrap();
    }
    m
}

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
