//! TensorBoard event files: our records equal, byte for byte, what tensorboard's own protobuf
//! classes and RecordWriter produce (fixture from `tools/fixtures/tensorboard_read.py fixture`),
//! and files we write read back with every CRC checked.
//!
//! Set `QOQ_TB_KEEP_DIR=/some/dir` to keep the written run (event file plus `expected.json`) for
//! `python tools/fixtures/tensorboard_read.py read /some/dir --expect /some/dir/expected.json`.

use qoq_rl::tensorboard::{
    EventWriter, TensorboardError, encode_file_version_event, encode_scalar_event, frame_record,
    read_events,
};
use serde_json::Value;
use std::collections::BTreeMap;

fn fixture() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tensorboard_records.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn scalar_record(case: &Value) -> Vec<u8> {
    let scalars: Vec<(String, f32)> = case["scalars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_f64().unwrap() as f32,
            )
        })
        .collect();
    let refs: Vec<(&str, f32)> = scalars.iter().map(|(t, v)| (t.as_str(), *v)).collect();
    frame_record(&encode_scalar_event(
        case["wall_time"].as_f64().unwrap(),
        case["step"].as_i64().unwrap(),
        &refs,
    ))
}

#[test]
fn records_match_tensorboards_own_writer_byte_for_byte() {
    let f = fixture();
    let fv = &f["file_version"];
    assert_eq!(
        hex(&frame_record(&encode_file_version_event(
            fv["wall_time"].as_f64().unwrap()
        ))),
        fv["record_hex"].as_str().unwrap()
    );
    for case in ["scalar", "negative_step"] {
        assert_eq!(
            hex(&scalar_record(&f[case])),
            f[case]["record_hex"].as_str().unwrap(),
            "{case}"
        );
    }
}

#[test]
fn written_files_read_back_and_corruption_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("QOQ_TB_KEEP_DIR").map(std::path::PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let mut w = EventWriter::create(&dir).unwrap();
    let mut expected: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for step in 1..=20i64 {
        let s = step as f64;
        let scalars = [
            ("actor/pg_loss", 0.5 / s),
            ("actor/kl_loss", 1e-3 * s),
            ("reward/overall", 0.2 + 0.03 * s),
            ("val/test_score/chest_xray", (s / 7.0).sin()),
        ];
        w.add_scalars(step, scalars.iter().copied()).unwrap();
        for (t, v) in scalars {
            expected.entry(t.to_string()).or_default().push((step, v));
        }
    }
    w.flush().unwrap();
    let path = w.path().to_path_buf();
    drop(w);
    assert!(
        path.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents.")
    );
    let file = read_events(&path).unwrap();
    assert_eq!(file.file_version.as_deref(), Some("brain.Event:2"));
    assert_eq!(file.scalars.len(), 80);
    for e in &file.scalars {
        let want = expected[&e.tag][(e.step - 1) as usize];
        assert_eq!(e.value, want.1 as f32, "{} @ {}", e.tag, e.step);
    }
    if let Some(k) = keep {
        std::fs::write(
            k.join("expected.json"),
            serde_json::to_string(&expected).unwrap(),
        )
        .unwrap();
    }

    // flip one data byte of the last record: its CRC no longer matches
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 6] ^= 0x40;
    let bad = tmp.path().join("events.out.tfevents.corrupt");
    std::fs::write(&bad, &bytes).unwrap();
    match read_events(&bad) {
        Err(TensorboardError::Corrupt { record, reason, .. }) => {
            assert_eq!(record, 20);
            assert!(reason.contains("data CRC"), "{reason}");
        }
        other => panic!("expected a CRC error, got {other:?}"),
    }
    // a truncated tail (killed writer) is reported with its record index
    std::fs::write(&bad, &std::fs::read(&path).unwrap()[..n - 3]).unwrap();
    let e = read_events(&bad).unwrap_err().to_string();
    assert!(e.contains("record 20") && e.contains("corrupt"), "{e}");
}
