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
