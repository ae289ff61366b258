//! `qoq metrics` end to end: the spec §8.9 golden example, the parity fixture, Markdown, errors.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

fn qoq_metrics(input: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
        .args(["metrics", "--input"])
        .arg(input)
        .args(extra)
        .output()
        .unwrap()
}

fn write_lines(dir: &Path, lines: &[Value]) -> std::path::PathBuf {
    let path = dir.join("predictions.jsonl");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn golden_lines() -> Vec<Value> {
    [("A", "A"), ("B", "B"), ("A, B", "A"), ("C", "A")]
        .iter()
        .map(|(p, g)| {
            serde_json::json!({"response": format!("\\boxed{{{p}}}"), "answer": g,
                               "data_source": "src", "dataset": "ds"})
        })
        .collect()
}

#[test]
fn metrics_prints_the_spec_8_9_golden_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_lines(dir.path(), &golden_lines());
    let js = stdout_json(&qoq_metrics(&path, &[]));
    for prefix in ["src/ds", "src", "val"] {
        let get = |m: &str| js[format!("{prefix}/{m}")].as_f64().unwrap();
        assert!((get("precision") - 0.75).abs() < 1e-12);
        assert!((get("recall") - 5.0 / 6.0).abs() < 1e-12);
        assert!((get("f1") - 11.0 / 15.0).abs() < 1e-12);
        assert!((get("accuracy") - 0.75).abs() < 1e-12);
    }
}

#[test]
fn metrics_matches_the_reference_port_fixture() {
    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        predictions: Vec<Value>,
        expected: BTreeMap<String, f64>,
    }
    #[derive(serde::Deserialize)]
    struct Fixture {
        tolerance: f64,
        cases: Vec<Case>,
    }
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../qoq-eval/tests/fixtures/metrics_cases.json"
    ))
    .unwrap();
    let fx: Fixture = serde_json::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for case in &fx.cases {
        let path = write_lines(dir.path(), &case.predictions);
        let js = stdout_json(&qoq_metrics(&path, &["--format", "json"]));
        let obj = js.as_object().unwrap();
        assert_eq!(obj.len(), case.expected.len(), "{}", case.name);
        for (k, want) in &case.expected {
            let have = obj[k].as_f64().unwrap();
            assert!(
                (have - want).abs() <= fx.tolerance,
                "{}: {k} = {have}, reference {want}",
                case.name
            );
        }
    }
}

#[test]
fn metrics_markdown_has_dataset_domain_and_overall_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_lines(dir.path(), &golden_lines());
    let out = qoq_metrics(&path, &["--format", "markdown"]);
    assert!(out.status.success());
    let md = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines.len(), 5, "{md}");
    assert!(lines[0].starts_with("| Domain | Dataset | N |"), "{md}");
    assert_eq!(
        lines[2],
        "| src | ds | 4 | 2 | 0.7500 | 0.8333 | 0.8333 | 0.7333 | 0.7500 | 0.5000 | - | 0 |"
    );
    assert!(lines[3].starts_with("| **src** | (mean) | 4 |"), "{md}");
    assert!(lines[4].starts_with("| **val** |"), "{md}");
}

#[test]
fn metrics_report_format_includes_per_class_confusion() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_lines(dir.path(), &golden_lines());
    let js = stdout_json(&qoq_metrics(&path, &["--format", "report"]));
    let classes = &js["sources"][0]["datasets"][0]["classes"];
    assert_eq!(classes["B"]["confusion"]["fp"], 1);
    assert_eq!(classes["A"]["confusion"]["fn"], 1);
    assert!(classes.get("C").is_none());
}

#[test]
fn metrics_reward_extraction_uses_the_last_box() {
    let dir = tempfile::tempdir().unwrap();
    let line = serde_json::json!({"response": "\\boxed{B} no: \\boxed{A}", "answer": "A",
                                  "data_source": "s", "dataset": "d"});
    let path = write_lines(dir.path(), &[line]);
    let eval = stdout_json(&qoq_metrics(&path, &[]));
    let reward = stdout_json(&qoq_metrics(&path, &["--extraction", "reward"]));
    assert_eq!(eval["val/exact_match"], 0.0);
    assert_eq!(reward["val/exact_match"], 1.0);
}

#[test]
fn metrics_malformed_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("predictions.jsonl");
    let good = &golden_lines()[0];
    std::fs::write(&path, format!("{good}\n{good}\n{{\"response\": \"x\"\n")).unwrap();
    let out = qoq_metrics(&path, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("predictions.jsonl line 3"), "{err}");
    let missing = qoq_metrics(&dir.path().join("absent.jsonl"), &[]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("absent.jsonl"));
}
