//! `qoq model pretrain-ecg`: the ECG encoder of a fresh model trained on a synthetic world's
//! labelled ECGs, written to a new folder with every other tensor unchanged; bad input refused
//! by name.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

mod support;

use support::{derm_manifest, repo};

fn qoq(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
        .args(args)
        .output()
        .unwrap()
}

fn tensors(dir: &Path) -> HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
}

fn same(a: &candle_core::Tensor, b: &candle_core::Tensor) -> bool {
    let f = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    f(a) == f(b)
}

#[test]
fn pretrain_ecg_trains_the_encoder_only_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let synth = dir.path().join("synth");
    let o = qoq(&[
        "synth".as_ref(),
        "--out".as_ref(),
        synth.as_os_str(),
        "--largest-domain-rows".as_ref(),
        "60".as_ref(),
        "--test-per-class".as_ref(),
        "1".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let model = dir.path().join("init");
    let tok = repo().join("crates/qoq-processor/tests/fixtures/tiny_model/tokenizer.json");
    let o = qoq(&[
        "model".as_ref(),
        "init".as_ref(),
        "--preset".as_ref(),
        "tiny".as_ref(),
        "--tokenizer".as_ref(),
        tok.as_os_str(),
        "--out".as_ref(),
        model.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let train = synth.join("train.jsonl");
    let test = synth.join("test.jsonl");
    let out = dir.path().join("ecg");
    let pretrain = |data: &Path, out: &Path, steps: &str| {
        qoq(&[
            "model".as_ref(),
            "pretrain-ecg".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--data".as_ref(),
            data.as_os_str(),
            "--val".as_ref(),
            test.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--steps".as_ref(),
            steps.as_ref(),
            "--batch-size".as_ref(),
            "8".as_ref(),
        ])
    };
    let o = pretrain(&train, &out, "30");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("ECG encoder: 30 steps"), "{stderr}");

    // The report: every ECG row of the manifest, both ECG datasets, the loss fell.
    let ecg_rows = std::fs::read_to_string(&train)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"time-series\":[\""))
        .count();
    assert!(ecg_rows >= 8, "the world has {ecg_rows} ECG rows");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ecg_pretrain.json")).unwrap())
            .unwrap();
    assert_eq!(r["train_rows"], ecg_rows);
    let labels = r["labels"].as_object().unwrap();
    assert_eq!(
        labels.keys().collect::<Vec<_>>(),
        ["synth-ecg-rhythm", "synth-ecg-st"]
    );
    assert!(r["last_loss"].as_f64().unwrap() < r["first_loss"].as_f64().unwrap());
    assert!(r["val_accuracy"].as_f64().unwrap() >= 0.0 && r["val_rows"].as_u64().unwrap() > 0);

    // The new folder: the encoder's weights changed, nothing else did, and it loads.
    let (before, after) = (tensors(&model), tensors(&out));
    assert_eq!(
        before.keys().collect::<std::collections::BTreeSet<_>>(),
        after.keys().collect()
    );
    let mut changed = 0;
    for (name, t) in &before {
        let trained =
            name.starts_with("time_series_embedding.encoder.") && !name.ends_with("pos_embed");
        assert_eq!(!same(t, &after[name]), trained, "{name}");
        changed += usize::from(trained);
    }
    assert!(changed > 10, "{changed} encoder tensors");
    qoq_model::loading::load_model(&out, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    assert!(out.join("qoq_processor.json").is_file() && out.join("tokenizer.json").is_file());

    // A second run into the same folder is refused and leaves it as it was.
    let o = pretrain(&train, &out, "2");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains(&out.display().to_string()) && stderr.contains("not empty"),
        "{stderr}"
    );
    assert!(same(
        &tensors(&out)["time_series_embedding.encoder.W_P.weight"],
        &after["time_series_embedding.encoder.W_P.weight"]
    ));
    // A manifest without ECGs names itself; zero steps are refused.
    let derm = derm_manifest(dir.path(), 3, "What is the diagnosis?");
    let o = pretrain(&derm, &dir.path().join("none"), "2");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains(&derm.display().to_string()) && stderr.contains("no row has a time series"),
        "{stderr}"
    );
    let o = pretrain(&train, &dir.path().join("zero"), "0");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 1"));
}
