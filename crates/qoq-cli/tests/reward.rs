//! End-to-end tests of `qoq reward` (spec §8.8 golden vectors through the CLI contract).

use std::process::Command;

fn qoq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
}

/// The §8.8 mask: 40x40 with ones in [10:30, 10:30].
fn write_golden_mask(path: &std::path::Path) {
    let img = image::GrayImage::from_fn(40, 40, |x, y| {
        image::Luma([if (10..30).contains(&x) && (10..30).contains(&y) {
            255
        } else {
            0
        }])
    });
    img.save(path).unwrap();
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = qoq().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn reward_reproduces_the_golden_vectors_in_reference_mode() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("masks")).unwrap();
    write_golden_mask(&dir.path().join("masks/m.png"));
    let cases = [
        serde_json::json!({"response": "<think>The heart is enlarged.</think>\n```json\n[{\"bbox_2d\": [10, 10, 29, 29], \"label\": \"Cardiomegaly\"}]\n```\nFinal: \\boxed{Cardiomegaly}", "answer": "Cardiomegaly", "segmentation_path": "masks/m.png"}),
        serde_json::json!({"response": "<think>x</think> \\boxed{Edema, Pneumonia, Fracture}", "answer": "Pneumonia, Edema", "segmentation_path": "masks/m.png"}),
        serde_json::json!({"response": "I think it is Pneumonia.", "answer": "Pneumonia"}),
        serde_json::json!({"response": "\\boxed{Edema, Pneumonia and Fracture}", "answer": "Edema, Pneumonia"}),
        serde_json::json!({"response": "```json\n[{'bbox_2d': [0, 0, 9, 9], 'label': 'x'}]\n```\\boxed{No Finding}", "answer": "No Finding", "segmentation_path": "masks/m.png"}),
        serde_json::json!({"response": "```json\n[{\"bbox_2d\": [5, 5, 15, 15], \"label\": \"x\"}]\n```", "answer": "x", "bbox": [0, 0, 10, 10]}),
        serde_json::json!({"response": "```json\n[{\"bbox_2d\": [0, 0, 10, 10], \"label\": \"x\"}, {\"bbox_2d\": [5, 5, 15, 15], \"label\": \"x\"}]\n```", "answer": "x", "bbox": [0, 0, 10, 10]}),
    ];
    let text: String = cases.iter().map(|c| format!("{c}\n")).collect();
    let input = dir.path().join("cases.jsonl");
    std::fs::write(&input, text).unwrap();
    let (ok, stdout, stderr) = run(&[
        "reward",
        "--compat",
        "reference",
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 7);
    // (overall, F1, IoU, format, length); §8.8 rounds overall to 4 decimals
    let golden = [
        (0.9134, 1.0, 1.0, 1.0, 0.134),
        (0.4051, 0.8, 0.0, 0.0, 0.051),
        (0.0024, 0.0, 0.0, 0.0, 0.024),
        (0.2537, 0.5, 0.0, 0.0, 0.037),
        (0.5971, 1.0, 0.0, 0.9, 0.071),
    ];
    for (i, (row, g)) in rows.iter().zip(golden).enumerate() {
        let f = |k: &str| row[k].as_f64().unwrap();
        assert!((f("overall") - g.0).abs() < 1e-6, "case {i}: {row}");
        assert!((f("standard_score") - g.1).abs() < 1e-12, "case {i}: {row}");
        assert!((f("iou_score") - g.2).abs() < 1e-12, "case {i}: {row}");
        assert!((f("format_score") - g.3).abs() < 1e-12, "case {i}: {row}");
        assert!((f("length_score") - g.4).abs() < 1e-12, "case {i}: {row}");
    }
    // the mask branch runs in float32 in the released code: 0.9134000539779663, not 0.9134
    assert_eq!(rows[0]["overall"].as_f64().unwrap(), 0.9134000539779663);
    assert!((rows[5]["iou_score"].as_f64().unwrap() - 25.0 / 175.0).abs() < 1e-15);
    // two boxes without a mask: the released `gt_bbox.tolist()` defect gives IoU 0
    assert_eq!(rows[6]["iou_score"].as_f64().unwrap(), 0.0);

    // the fixed mode scores both boxes (mean of 1 and 1/7)
    let (ok, stdout, stderr) = run(&["reward", "--input", input.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let iou = last["iou_score"].as_f64().unwrap();
    assert!((iou - (1.0 + 25.0 / 175.0) / 2.0).abs() < 1e-15, "{last}");
    let (ok, stdout, _) = run(&[
        "reward",
        "--iou-reduce",
        "max",
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["iou_score"].as_f64().unwrap(), 1.0);
}

#[test]
fn reward_names_the_file_and_line_of_a_malformed_case() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cases.jsonl");
    std::fs::write(
        &input,
        "{\"response\": \"\\\\boxed{A}\", \"answer\": \"A\"}\n{\"response\": 3}\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = run(&["reward", "--input", input.to_str().unwrap()]);
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("cases.jsonl:2"), "{stderr}");
    std::fs::write(
        &input,
        "{\"response\": \"x\", \"answer\": \"A\", \"segmentation_path\": \"nope.png\"}\n",
    )
    .unwrap();
    let (ok, _, stderr) = run(&["reward", "--input", input.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("cases.jsonl:1") && stderr.contains("nope.png"),
        "{stderr}"
    );
}

/// `qoq reward` on the golden files of `crates/qoq-reward/tests/fixtures` (hand-computed
/// expectations beside each case): every expected component must match.
fn check_golden(file: &str, flags: &[&str]) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../qoq-reward/tests/fixtures")
        .join(file);
    let mut args = vec!["reward", "--input", path.to_str().unwrap()];
    args.extend_from_slice(flags);
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{stderr}");
    let cases: Vec<serde_json::Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), cases.len(), "{stdout}");
    for (i, (row, case)) in rows.iter().zip(&cases).enumerate() {
        for (k, want) in case["expect"].as_object().unwrap() {
            let got = row[k].as_f64().unwrap_or(f64::NAN);
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-12,
                "{file} case {i} {k}: {got} != {want} ({})",
                case["why"]
            );
        }
    }
}

#[test]
fn reward_preset_paper_matches_the_golden_cases() {
    check_golden("paper_golden.jsonl", &["--preset", "paper"]);
    // the preset is the same as its flags spelled out
    check_golden(
        "paper_golden.jsonl",
        &[
            "--weights",
            "paper",
            "--iou-reduce",
            "max",
            "--format",
            "box-per-label",
        ],
    );
    // the preset excludes the flags it sets
    let (ok, _, stderr) = run(&[
        "reward",
        "--preset",
        "paper",
        "--weights",
        "code",
        "--input",
        "x.jsonl",
    ]);
    assert!(!ok && stderr.contains("--weights"), "{stderr}");
}

#[test]
fn reward_coherence_weight_matches_the_golden_cases() {
    check_golden(
        "coherence_golden.jsonl",
        &[
            "--weights",
            "0.6,0.2,0.1,0",
            "--format",
            "box-per-label",
            "--iou-reduce",
            "max",
            "--coherence-weight",
            "0.1",
        ],
    );
    // weights that would leave [0, 1] and the reference mode are refused by name
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../qoq-reward/tests/fixtures/coherence_golden.jsonl");
    let input = path.to_str().unwrap();
    let (ok, _, stderr) = run(&[
        "reward",
        "--weights",
        "paper",
        "--coherence-weight",
        "0.1",
        "--input",
        input,
    ]);
    assert!(!ok && stderr.contains("sum to"), "{stderr}");
    let (ok, _, stderr) = run(&[
        "reward",
        "--compat",
        "reference",
        "--format",
        "box-per-label",
        "--input",
        input,
    ]);
    assert!(!ok && stderr.contains("box_per_label"), "{stderr}");
    let (ok, _, stderr) = run(&["reward", "--weights", "0.5,0.5", "--input", input]);
    assert!(!ok && stderr.contains("four weights"), "{stderr}");
}
