//! TensorBoard event files: our records equal, byte for byte, what tensorboard's own protobuf
//! classes and RecordWriter produce (fixture from `tools/fixtures/tensorboard_read.py fixture`),
//! and files we write read back with every CRC checked.
//!
//! Set `QOQ_TB_KEEP_DIR=/some/dir` to keep the written run (event file plus `expected.json`) for
//! `python tools/fixtures/tensorboard_read.py read /some/dir --expect /some/dir/expected.json`.

use qoq_rl::tensorboard::{
    EventWriter, TensorboardError, encode_file_version_event, encode_scalar_event,
    encode_session_start_event, frame_record, read_events,
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
    let ss = &f["session_start"];
    assert_eq!(
        hex(&frame_record(&encode_session_start_event(
            ss["wall_time"].as_f64().unwrap(),
            ss["step"].as_i64().unwrap()
        ))),
        ss["record_hex"].as_str().unwrap()
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
    // a run killed after step 20 and resumed from its step-15 checkpoint: a new file starts
    // with a session-start marker at 16 and re-logs 16..=20; TensorBoard shows the new values
    let mut w2 = EventWriter::create(&dir).unwrap();
    assert_ne!(w2.path(), path.as_path());
    w2.add_session_start(16).unwrap();
    for step in 16..=20i64 {
        let v = -(step as f64);
        w2.add_scalars(step, [("actor/pg_loss", v)]).unwrap();
        expected.get_mut("actor/pg_loss").unwrap()[(step - 1) as usize] = (step, v);
    }
    drop(w2);
    for tag in [
        "actor/kl_loss",
        "reward/overall",
        "val/test_score/chest_xray",
    ] {
        expected.get_mut(tag).unwrap().truncate(15);
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

proptest::proptest! {
    #[test]
    fn any_scalar_event_reads_back(
        step in proptest::num::i64::ANY,
        wall in 0.0f64..4.0e9,
        values in proptest::collection::vec(("[a-z_/ ]{0,24}", proptest::num::f32::ANY), 0..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.out.tfevents.prop");
        let mut w = EventWriter::create_file(&path, wall).unwrap();
        w.add_scalars_at(wall, step, values.iter().map(|(t, v)| (t.as_str(), *v as f64))).unwrap();
        drop(w);
        let back = read_events(&path).unwrap();
        proptest::prop_assert_eq!(back.scalars.len(), values.len());
        for (e, (t, v)) in back.scalars.iter().zip(&values) {
            proptest::prop_assert_eq!(e.step, step);
            proptest::prop_assert_eq!(e.wall_time, wall);
            proptest::prop_assert_eq!(&e.tag, t);
            proptest::prop_assert_eq!(e.value.to_bits(), v.to_bits());
        }
    }
}
