//! End-to-end tests of the `qoq` binary.

use std::process::Command;

fn qoq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
}

#[test]
fn data_check_passes_on_the_bundled_manifest() {
    let manifest = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/mini/manifest.jsonl"
    );
    let out = qoq()
        .args(["data", "check", "--quiet", manifest])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("chest_xray") && stdout.contains("demo-ecg"),
        "{stdout}"
    );
    assert!(stdout.contains("rows: 4, bad rows: 0"), "{stdout}");
}

#[test]
fn data_check_exits_non_zero_and_names_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"problem\": \"q\", \"answer\": \"a\", \"images\": [\"ct/x/missing.png\"]}\n{oops\n",
    )
    .unwrap();
    let out = qoq()
        .args(["data", "check", "--quiet"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("line 1: missing file"), "{stdout}");
    assert!(stdout.contains("line 2: malformed JSON"), "{stdout}");
}

#[test]
fn unreadable_manifest_is_a_clear_error() {
    let out = qoq()
        .args(["data", "check", "--quiet", "/nonexistent/m.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/m.jsonl"), "{stderr}");
}

#[test]
fn data_convert_writes_rows_that_data_check_reads() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("derm/ham");
    std::fs::create_dir_all(&img).unwrap();
    std::fs::write(img.join("a.png"), b"").unwrap();
    let ann = dir.path().join("annotation_train.jsonl");
    std::fs::write(
        &ann,
        r#"{"images": ["ham/a.png"], "conversations": [{"from": "human", "value": "q"}], "label": "benign"}"#,
    )
    .unwrap();
    let out_path = dir.path().join("train.jsonl");
    let out = qoq()
        .args(["data", "convert", "--image-prefix", "derm"])
        .arg(&ann)
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = qoq()
        .args(["data", "check", "--quiet"])
        .arg(&out_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    // the row converts and parses; its (empty) image file does not decode, which check reports
    assert!(
        stdout.contains("derm") && stdout.contains("ham"),
        "{stdout}"
    );
    assert!(stdout.contains("line 1: cannot decode image"), "{stdout}");
}

#[test]
fn bench_manifest_reports_rows_per_second() {
    let out = qoq()
        .args(["bench", "manifest", "--rows", "2000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("manifest scan: 2000 rows"), "{stdout}");
}
