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
    // The `--quick` preset, as a newcomer would run it (300 SFT steps; 82-99 s in a release build),
    // with the phases the full preset runs before SFT (none in --quick) for 5 steps each: the
    // ECG encoder's pre-training and the ECG warm-up.
    let o = Command::new(env!("CARGO_BIN_EXE_qoq"))
        .args([
            "demo",
            "--quick",
            "--ecg-steps",
            "5",
            "--ecg-sft-steps",
            "5",
            "--out",
        ])
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
    for m in [
        "model_init",
        "model_ecg",
        "sft_model",
        "grpo_model",
        "drpo_model",
    ] {
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
        // Every model is evaluated as it was trained: without the format prompt.
        let (opts, found) = qoq_processor::ProcessorOptions::for_model_dir(&d).unwrap();
        assert!(found, "{m}: no qoq_processor.json");
        assert_eq!(opts.format_prompt, None, "{m}");
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
    // The label-prior baseline (each dataset's most frequent training class) is scored on the
    // same test rows and is the table's first column group (the bold best F1 per row is
    // qoq-eval's paper_table test).
    let prior = &m["models"]["label_prior"];
    // The SFT model reads its inputs: its macro-F1 over the nine domains beats the prior's by
    // more than 5 points (seed 0, these arguments, release build: 29.2 against 15.7).
    assert!(
        overall("sft", "f1") > overall("label_prior", "f1") + 0.05,
        "SFT macro-F1 {} is not 5 points above the label prior's {}",
        m["models"]["sft"]["overall"],
        prior["overall"]
    );
    for d in DOMAINS {
        let f1 = prior["domains"][d]["f1"].as_f64().unwrap();
        // One class always answered: 2 / (k (k + 1)) for k in 2..=4 classes, averaged over the
        // domain's datasets.
        assert!((0.09..=0.34).contains(&f1), "label prior {d}: {f1}");
    }
    // RL does not lose to SFT: each RL model's mean reward on the test split (greedy decoding,
    // so fixed per seed) is at least the SFT model's less 0.02, about two of the 72 test answers
    // turning from right to wrong. Release build, these arguments: SFT 0.320, GRPO 0.316, DRPO
    // 0.332 (before the RL prompts were class-balanced, an earlier world: 0.294 and 0.350; the
    // full demo's seed 0 now 0.529, 0.544, 0.545).
    let reward = |model: &str| {
        m["models"][model]["reward"]["mean"]
            .as_f64()
            .unwrap_or_else(|| panic!("{model}: no mean reward"))
    };
    for rl in ["grpo", "drpo"] {
        assert!(
            reward(rl) >= reward("sft") - 0.02,
            "{rl} loses to SFT on the test reward: {} vs {}",
            reward(rl),
            reward("sft")
        );
        for d in DOMAINS {
            assert!(
                m["models"][rl]["reward"]["domains"][d].is_f64(),
                "{rl}/{d}: no mean reward"
            );
        }
    }
    assert!(stdout.contains("Mean reward on the test split"), "{stdout}");
    assert!(stdout.contains("| Label prior F1 |"), "{stdout}");
    assert!(!stdout.contains("Untrained"), "{stdout}");
    assert!(m["training"]["sft"].as_array().unwrap().len() >= 2);
    assert!(m["wall_s"].as_f64().unwrap() > 0.0);

    run_files_rerun_and_extend_the_phases(&out, dir.path());
}

/// Steps of a phase's curve in `demo_metrics.json`.
fn m_training_len(out: &Path, phase: &str) -> usize {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("demo_metrics.json")).unwrap())
            .unwrap();
    m["training"][phase].as_array().map_or(0, Vec::len)
}

/// The demo's run files (`<out>/configs/*.toml`) load as `qoq train` reads them, say where each
/// phase starts (the RL phases from the exported SFT model), and `qoq train --config` on them
/// reproduces the demo's first steps; `qoq train --resume` continues a phase.
fn run_files_rerun_and_extend_the_phases(out: &Path, tmp: &Path) {
    use qoq_rl::config::{EstimatorKind, RunConfig};
    let load = |name: &str| {
        let p = out.join("configs").join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("# Run file of `qoq demo`"), "{text}");
        let c = RunConfig::from_toml_str(&text, &p.display().to_string()).unwrap();
        assert_eq!(RunConfig::load(&p, &[]).unwrap(), c);
        c
    };
    let sft = load("sft");
    assert!(sft.trainer.sft);
    assert_eq!(sft.data.format_prompt, "none");
    // SFT starts from the ECG warm-up's model, which started from the model whose ECG encoder
    // the demo pre-trained; the run files say how.
    assert_eq!(Path::new(&sft.model.model_path), out.join("sft_ecg_model"));
    let warm = load("sft_ecg");
    assert!(warm.trainer.sft);
    assert_eq!(Path::new(&warm.model.model_path), out.join("model_ecg"));
    assert_eq!(warm.trainer.max_steps, Some(5));
    assert_eq!(Path::new(&warm.trainer.out_dir), out.join("sft_ecg"));
    let ecg_rows = std::fs::read_to_string(&warm.data.train_files).unwrap();
    assert!(ecg_rows.lines().count() > 0);
    assert!(
        ecg_rows.lines().all(|l| l.contains(".hea")),
        "only ECG rows: {ecg_rows}"
    );
    for name in ["sft", "sft_ecg"] {
        let header = std::fs::read_to_string(out.join(format!("configs/{name}.toml"))).unwrap();
        assert!(
            header.contains("qoq model pretrain-ecg --model"),
            "{name}: {header}"
        );
    }
    assert_eq!(m_training_len(out, "sft_ecg"), 5);
    assert_eq!(Path::new(&sft.trainer.out_dir), out.join("sft"));
    for (name, kind) in [("grpo", EstimatorKind::Grpo), ("drpo", EstimatorKind::Drpo)] {
        let c = load(name);
        assert!(!c.trainer.sft, "{name}");
        assert_eq!(c.algorithm.estimator, kind);
        // The RL phases start from the SFT phase's weights: the run file says so.
        assert_eq!(
            Path::new(&c.model.model_path),
            out.join("sft_model"),
            "{name}"
        );
        // ... on the training split with each dataset's answers equally frequent.
        assert_eq!(
            Path::new(&c.data.train_files),
            out.join("world/train_rl.jsonl"),
            "{name}"
        );
    }
    let rl_rows = std::fs::read_to_string(out.join("world/train_rl.jsonl")).unwrap();
    let split = std::fs::read_to_string(&sft.data.train_files).unwrap();
    let split: std::collections::HashSet<&str> = split.lines().collect();
    assert!(rl_rows.lines().all(|l| split.contains(l)));
    let n = (rl_rows.lines().count(), split.len());
    assert!(
        n.0.abs_diff(n.1) * 10 < n.1,
        "{n:?}: about the split's size"
    );

    let train = |args: &[&std::ffi::OsStr]| {
        let o = Command::new(env!("CARGO_BIN_EXE_qoq"))
            .arg("train")
            .args(args)
            .arg("--no-plot")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let metric = |run: &Path, step: u64, key: &str| -> f64 {
        let recs = qoq_rl::metrics_log::read_records(&run.join("metrics.jsonl")).unwrap();
        let r = recs
            .iter()
            .find(|r| r.step == step)
            .unwrap_or_else(|| panic!("{}: no step {step}", run.display()));
        r.metrics[key]
    };
    // A rerun of a phase from its run file takes the demo's steps again (same weights, data
    // order and sampling seeds).
    for (name, key) in [("sft", "sft/loss"), ("drpo", "reward/overall")] {
        let rerun = tmp.join(format!("rerun_{name}"));
        let mut out_dir = std::ffi::OsString::from("trainer.out_dir=");
        out_dir.push(&rerun);
        train(&[
            "--config".as_ref(),
            out.join("configs").join(format!("{name}.toml")).as_os_str(),
            "--set".as_ref(),
            "trainer.max_steps=1".as_ref(),
            "--set".as_ref(),
            &out_dir,
        ]);
        let (a, b) = (metric(&rerun, 1, key), metric(&out.join(name), 1, key));
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{name} {key}: {a} vs {b}"
        );
    }
    // The demo's DRPO run continues from its last checkpoint for one more step.
    let drpo = out.join("drpo");
    let last = qoq_rl::metrics_log::read_records(&drpo.join("metrics.jsonl"))
        .unwrap()
        .last()
        .unwrap()
        .step;
    let steps = format!("trainer.max_steps={}", last + 1);
    train(&[
        "--resume".as_ref(),
        drpo.as_os_str(),
        "--set".as_ref(),
        steps.as_ref(),
    ]);
    assert!(metric(&drpo, last + 1, "reward/overall").is_finite());
}
