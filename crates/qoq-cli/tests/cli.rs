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

/// The issue's cases: keys win, the path layout otherwise, an absolute path without keys is a
/// bad row naming the fix; `--rows` shows where each row's domain came from.
#[test]
fn data_check_shows_where_each_rows_domain_came_from() {
    let manifest = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/mini/manifest.jsonl"
    );
    let out = qoq()
        .args(["data", "check", "--quiet", "--rows", manifest])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // the bundled rows carry a dataset key equal to their folder; the ECG row has no image
    assert!(stdout.contains("domain from"), "{stdout}");
    assert!(
        stdout.contains("line 1: chest_xray/demo-cxr from path+key"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 4: ecg/demo-ecg from ecg+key"),
        "{stdout}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("abs.jsonl");
    std::fs::write(
        &path,
        "{\"problem\": \"q\", \"answer\": \"a\", \"images\": [\"/tmp/x/derm/a.png\"]}\n",
    )
    .unwrap();
    let out = qoq()
        .args(["data", "check", "--quiet"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("line 1: path `/tmp/x/derm/a.png` is absolute")
            && stdout.contains("add \"data_source\" and \"dataset\" to the row"),
        "{stdout}"
    );
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
    assert!(
        stdout.contains("line 1: ") && stdout.contains("a.png: cannot decode image"),
        "{stdout}"
    );
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

/// A real file from the test-data cache (`scripts/fetch-testdata.sh`); fails when absent.
fn testdata(rel: &str) -> std::path::PathBuf {
    let root = match std::env::var_os("QOQ_TESTDATA") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.testdata"),
    };
    let p = root.join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-testdata.sh first",
        p.display()
    );
    p
}

#[test]
fn data_check_decodes_dicom_volumes_and_ecg_files() {
    let dir = tempfile::tempdir().unwrap();
    let put = |to: &str, from: &std::path::Path| {
        let dst = dir.path().join(to);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(from, dst).unwrap();
    };
    put("ct/small/ct.dcm", &testdata("dicom/CT_small.dcm"));
    put("mri/emri/multi.dcm", &testdata("dicom/emri_small_RLE.dcm"));
    put("mri/brain/t1.nii.gz", &testdata("volumes/example4d.nii.gz"));
    put("ecg/dicom/ecg.dcm", &testdata("ecg/waveform_ecg.dcm"));
    std::fs::create_dir_all(dir.path().join("ecg/arr")).unwrap();
    let samples: Vec<f32> = (0..12 * 100).map(|i| (i as f32 * 0.01).sin()).collect();
    std::fs::write(
        dir.path().join("ecg/arr/x.npy"),
        qoq_data::npy::encode_f32(&[100, 12], &samples),
    )
    .unwrap();
    std::fs::write(dir.path().join("ecg/arr/x.csv"), "I,II\n0.1,0.2\n0.3,0.4\n").unwrap();
    let rows = [
        r#"{"problem": "q", "answer": "a", "images": ["ct/small/ct.dcm"]}"#,
        r#"{"problem": "q", "answer": "b", "images": ["mri/emri/multi.dcm"]}"#,
        r#"{"problem": "q", "answer": "b", "videos": ["mri/brain/t1.nii.gz"]}"#,
        r#"{"problem": "q", "answer": "Normal", "time-series": ["ecg/dicom/ecg.dcm"], "dataset": "dcm"}"#,
        r#"{"problem": "q", "answer": "MI", "time-series": ["ecg/arr/x.npy"], "dataset": "arr"}"#,
        r#"{"problem": "q", "answer": "MI", "time-series": ["ecg/arr/x.csv"], "dataset": "arr"}"#,
    ];
    let manifest = dir.path().join("m.jsonl");
    std::fs::write(&manifest, rows.join("\n")).unwrap();
    let out = qoq()
        .args(["data", "check", "--quiet", "--window", "-600,1500"])
        .args(["--ecg", r#"{"fs": 500, "orientation": "samples_by_leads"}"#])
        .arg(&manifest)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rows: 6, bad rows: 0"), "{stdout}");
    assert!(
        stdout.contains("mri") && stdout.contains("emri"),
        "{stdout}"
    );

    // a corrupt volume and a CSV with a non-number are named by line
    std::fs::write(dir.path().join("mri/brain/t1.nii.gz"), b"junk").unwrap();
    std::fs::write(dir.path().join("ecg/arr/x.csv"), "I,II\n0.1,zz\n").unwrap();
    let out = qoq()
        .args(["data", "check", "--quiet", "--ecg", r#"{"fs": 500}"#])
        .arg(&manifest)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("line 3:") && stdout.contains("NIfTI"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 6:") && stdout.contains("not a number"),
        "{stdout}"
    );
}

#[test]
fn data_check_rejects_a_bad_window() {
    let manifest = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/mini/manifest.jsonl"
    );
    let out = qoq()
        .args(["data", "check", "--quiet", "--window", "40", manifest])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--window"));
}
