//! `qoq demo --quick` end to end: every artefact exists and parses, the metrics
//! cover every model and domain, and training beats the untrained model (seeded, so the
//! comparison is fixed).

use std::path::Path;
use std::process::Command;

const MODELS: [&str; 4] = ["untrained", "sft", "grpo", "drpo"];
const DOMAINS: [&str; 9] = [
    "ecg",
    "chest_xray",
    "mammo",
    "derm",
    "ct",
    "fundus",
    "ultrasound",
    "mri",
    "pathology",
];

fn png_size(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn demo_writes_every_artefact_and_training_beats_the_untrained_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    // The `--quick` preset, as a newcomer would run it (about a minute in the test build).
    let o = Command::new(env!("CARGO_BIN_EXE_qoq"))
        .args(["demo", "--quick", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("demo finished in"), "{stderr}");
    // The table: a row per domain and the overall means.
    for d in DOMAINS {
        assert!(stdout.contains(&format!("| {d} |")), "{d}: {stdout}");
    }
    assert!(stdout.contains("overall, 9 domains"), "{stdout}");
    assert!(stdout.contains("DRPO F1"), "{stdout}");

    // Model folders load as models.
    for m in ["model_init", "sft_model", "grpo_model", "drpo_model"] {
        let d = out.join(m);
        for f in [
            "config.json",
            "preprocessor_config.json",
            "tokenizer.json",
            "model.safetensors",
        ] {
            assert!(d.join(f).is_file(), "{}", d.join(f).display());
        }
        qoq_processor::tokenizer::QoqTokenizer::from_file(&d.join("tokenizer.json")).unwrap();
        qoq_core::hf_config::QwenVlConfig::from_file(&d.join("config.json")).unwrap();
    }
    // Training logs.
    let sft = qoq_rl::metrics_log::read_records(&out.join("sft/metrics.jsonl")).unwrap();
    assert!(!sft.is_empty());
    assert!(sft.iter().all(|r| r.metrics["sft/loss"].is_finite()));
    assert!(
        sft.last().unwrap().metrics["sft/loss"] < sft[0].metrics["sft/loss"],
        "the SFT loss does not fall"
    );
    for rl in ["grpo", "drpo"] {
        let recs = qoq_rl::metrics_log::read_records(&out.join(rl).join("metrics.jsonl")).unwrap();
        assert!(!recs.is_empty(), "{rl}");
        assert!(recs.iter().all(|r| r.metrics["reward/overall"].is_finite()));
    }

    // Every evaluation keeps a trace per test row.
    let test_rows = std::fs::read_to_string(out.join("world/test.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(test_rows >= 9);
    for m in MODELS {
        let e = out.join("eval").join(m);
        let traces = qoq_eval::run::read_traces(&e.join("traces.jsonl")).unwrap();
        assert_eq!(traces.len(), test_rows, "{m}");
        assert!(e.join("metrics.json").is_file(), "{m}");
        assert!(e.join("report.md").is_file(), "{m}");
    }

    // The report files.
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| pathology |"), "{report}");
    let (w, h) = png_size(&out.join("curves.png"));
    assert!(w > 100 && h > 100);
    let boxes: Vec<_> = std::fs::read_dir(out.join("boxes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!boxes.is_empty());
    for b in &boxes {
        png_size(b);
    }

    // demo_metrics.json: every model and domain, and training beats the untrained model.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("demo_metrics.json")).unwrap())
            .unwrap();
    for model in MODELS {
        let entry = &m["models"][model];
        for d in DOMAINS {
            let s = &entry["domains"][d];
            assert!(s["accuracy"].is_f64(), "{model}/{d}: {s}");
            assert!(s["f1"].is_f64(), "{model}/{d}: {s}");
            assert!(s["count"].as_u64().unwrap() > 0, "{model}/{d}");
        }
        assert!(entry["overall"]["f1"].is_f64(), "{model}");
    }
    let overall =
        |model: &str, metric: &str| m["models"][model]["overall"][metric].as_f64().unwrap();
    for trained in ["sft", "grpo", "drpo"] {
        assert!(
            overall(trained, "accuracy") > overall("untrained", "accuracy")
                || overall(trained, "f1") > overall("untrained", "f1"),
            "{trained} does not beat the untrained model: {} vs {}",
            m["models"][trained]["overall"],
            m["models"]["untrained"]["overall"]
        );
    }
    assert!(m["training"]["sft"].as_array().unwrap().len() >= 2);
    assert!(m["wall_s"].as_f64().unwrap() > 0.0);
}
