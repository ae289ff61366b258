//! No input file can crash a run (issue 24), the binary's part: seeded damaged copies of the
//! cached real files ([`qoq_data::damage`]) through `qoq data check` (exit 1 with every bad row
//! named, no panic message, no exit 101) and through `qoq serve`'s image path (each damaged
//! image answers 200 or a 400 JSON error, and the server keeps serving). Without the test-data
//! cache the tests print a notice and pass.

use base64::Engine as _;
use qoq_data::damage::{self, Role};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Command, Stdio};

mod support;

/// The test-data cache, or `None` (with a notice) when it is absent.
fn cache() -> Option<PathBuf> {
    damage::testdata_cache(&support::repo())
}

#[test]
fn data_check_reports_every_damaged_file_and_never_panics() {
    let Some(cache) = cache() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (files, manifest) = damage::build_corpus(&cache, dir.path(), 12, 24).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qoq"))
        .args(["data", "check", "--quiet"])
        .arg(&manifest)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "a panic message reached stderr:\n{stderr}"
    );
    let bad: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("  line "))
        .collect();
    assert!(bad.len() > files.len() / 4, "{stdout}");
    for l in &bad {
        let line: usize = l["  line ".len()..]
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let name = files[line - 1]
            .path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        assert!(l.contains(&name), "line {line} does not name {name}: {l}");
    }
    assert!(
        stdout.contains(&format!("rows: {}, bad rows: {}", files.len(), bad.len())),
        "{stdout}"
    );
}

#[test]
fn serve_answers_400_for_damaged_images_and_keeps_serving() {
    let Some(cache) = cache() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sources = damage::corpus_sources(&cache, &dir.path().join("derived")).unwrap();
    // the image sources (DICOM files included: the server reads PNG / JPEG / ..., so a DICOM
    // is refused with a 400 as well)
    let images: Vec<_> = sources
        .into_iter()
        .filter(|(_, r)| *r == Role::Image)
        .collect();
    let files = damage::write_corpus(&images, &dir.path().join("damaged"), 8, 24).unwrap();
    let model = support::tiny_model_with(dir.path(), false);
    // stderr to a file: a pipe nobody reads would fill and stall the server
    let log = dir.path().join("serve.log");
    let srv = support::spawn_serve(
        &model,
        &[] as &[&str],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let addr = srv.addr.clone();
    let (mut answered, mut refused) = (0, 0);
    for f in &files {
        let bytes = std::fs::read(&f.path).unwrap();
        let uri = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        );
        let body = json!({
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is shown?"},
                {"type": "image_url", "image_url": {"url": uri}},
            ]}],
            "max_tokens": 1,
            "seed": 1,
        });
        let (status, v) = support::post_chat(&addr, &body);
        let what = format!("{} ({})", f.path.display(), f.damage);
        match status {
            200 => answered += 1,
            400 | 413 => {
                let msg = v["error"]["message"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: {v}"));
                let code = v["error"]["code"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: {v}"));
                // a decoding error names the image (an image that decodes may still be refused
                // for its prompt, e.g. too many tokens)
                if code.contains("image") {
                    assert!(msg.contains("image 0"), "{what}: {msg}");
                }
                refused += 1;
            }
            s => panic!("{what}: status {s}: {v}"),
        }
    }
    let (status, health) = support::http(&addr, "GET", "/health", b"");
    let health: Value = serde_json::from_slice(&health).unwrap_or(Value::Null);
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    drop(srv);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        !stderr.contains("panicked"),
        "a panic message reached stderr:\n{stderr}"
    );
    eprintln!(
        "{} damaged images sent to qoq serve: {answered} answered, {refused} refused with a 400",
        files.len()
    );
    assert!(refused > files.len() / 4);
}
