//! Evaluation runs: artefacts, resume after an interruption (never redo, never lose), compare.

use qoq_core::{ClinicalSample, Domain, FinishReason, SampleId, SegMask};
use qoq_eval::Extraction;
use qoq_eval::run::{EvalOptions, Generation, Responder, compare_runs, read_traces, run_eval};
use qoq_reward::{MedicalConfig, QoqMedicalReward};
use std::collections::BTreeSet;

fn sample(i: usize) -> ClinicalSample {
    let (src, ds, labels) = if i.is_multiple_of(3) {
        (Domain::Ecg, "ecg-a", ["Normal", "AF"])
    } else {
        (Domain::ChestXray, "cxr-a", ["No Finding", "Nodule"])
    };
    ClinicalSample {
        id: SampleId(format!("s{i:03}")),
        line: i as u64 + 1,
        problem: format!("question {i}"),
        system: None,
        answer: labels[i % 2].to_string(),
        images: vec![],
        videos: vec![],
        time_series: vec![],
        segmentation_path: None,
        bbox: (i % 2 == 1 && src == Domain::ChestXray).then_some([10.0, 10.0, 19.0, 19.0]),
        dataset: ds.to_string(),
        data_source: src,
        extra: Default::default(),
    }
}

/// Answers correctly except every fourth sample; fails after `fail_after` calls when set.
struct Oracle {
    calls: usize,
    fail_after: Option<usize>,
    seen: Vec<String>,
}

impl Responder for Oracle {
    fn respond(&mut self, batch: &[ClinicalSample]) -> qoq_eval::Result<Vec<Generation>> {
        if self.fail_after.is_some_and(|k| self.calls >= k) {
            return Err(qoq_eval::Error::Other("the engine died".into()));
        }
        self.calls += 1;
        Ok(batch
            .iter()
            .map(|s| {
                self.seen.push(s.id.to_string());
                let i: usize = s.id.0[1..].parse().unwrap();
                let ans = if i % 4 == 3 { "wrong" } else { s.answer.as_str() };
                Generation {
                    text: format!(
                        "<think>looking at case {i}</think>\n```json\n[{{\"bbox_2d\": [10, 10, 19, 19], \"label\": \"x\"}}]\n```\n\\boxed{{{ans}}}"
                    ),
                    tokens: 12,
                    finish: FinishReason::Stop,
                }
            })
            .collect())
    }
}

fn mask_of(s: &ClinicalSample) -> Option<SegMask> {
    // A 32x32 mask with the box [10, 10, 19, 19] for the nodule cases.
    (s.answer == "Nodule").then(|| {
        let mut d = vec![0u8; 32 * 32];
        for y in 10..20 {
            for x in 10..20 {
                d[y * 32 + x] = 1;
            }
        }
        SegMask::new(32, 32, d).unwrap()
    })
}

fn reward() -> QoqMedicalReward {
    QoqMedicalReward::new(MedicalConfig::default()).unwrap()
}

fn opts() -> EvalOptions {
    EvalOptions {
        batch_size: 4,
        extraction: Extraction::Evaluation,
        limit: None,
        charts: true,
    }
}

#[test]
fn a_run_writes_traces_metrics_report_and_charts() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Oracle {
        calls: 0,
        fail_after: None,
        seen: vec![],
    };
    let samples: Vec<_> = (0..12).map(|i| Ok(sample(i))).collect();
    let out = run_eval(samples, &mut o, &reward(), &mask_of, dir.path(), &opts()).unwrap();
    assert_eq!((out.resumed, out.generated), (0, 12));
    let traces = read_traces(&dir.path().join("traces.jsonl")).unwrap();
    assert_eq!(traces.len(), 12);
    let t = &traces[1];
    assert_eq!(t.reasoning, "looking at case 1");
    assert_eq!(t.boxes, vec![[10.0, 10.0, 19.0, 19.0]]);
    assert_eq!(t.predicted, vec!["Nodule".to_string()]);
    assert!(t.exact_match && !t.parse_failure);
    assert_eq!(t.iou, Some(1.0), "the box equals the mask");
    assert_eq!(traces[0].iou, None, "ECG has no mask or box");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out.metrics_path).unwrap()).unwrap();
    assert!(metrics["val/accuracy"].as_f64().unwrap() < 1.0);
    assert_eq!(metrics["val/parse_failure_rate"], 0.0);
    assert!(
        metrics["chest_xray/cxr-a/mean_response_chars"]
            .as_f64()
            .unwrap()
            > 50.0
    );
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("cxr-a") && md.contains("parse_failure_rate"));
    for f in [
        "confusion/chest_xray__cxr-a.png",
        "confusion/ecg__ecg-a.png",
        "domains.png",
    ] {
        let img = image::open(dir.path().join(f)).unwrap();
        assert!(img.width() > 100, "{f}");
    }
}

#[test]
fn an_interrupted_run_resumes_without_redoing_or_losing_rows() {
    let dir = tempfile::tempdir().unwrap();
    let samples = || (0..10).map(|i| Ok(sample(i))).collect::<Vec<_>>();
    let mut dying = Oracle {
        calls: 0,
        fail_after: Some(2),
        seen: vec![],
    };
    let err = run_eval(
        samples(),
        &mut dying,
        &reward(),
        &mask_of,
        dir.path(),
        &opts(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("engine died"));
    // Simulate a kill in the middle of writing the next line.
    let path = dir.path().join("traces.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"id\": \"s008\", \"line\": 9, \"data_so");
    std::fs::write(&path, text).unwrap();

    let mut o = Oracle {
        calls: 0,
        fail_after: None,
        seen: vec![],
    };
    let out = run_eval(samples(), &mut o, &reward(), &mask_of, dir.path(), &opts()).unwrap();
    assert_eq!(out.resumed, 8);
    assert_eq!(out.generated, 2);
    assert_eq!(o.seen, vec!["s008".to_string(), "s009".to_string()]);
    let traces = read_traces(&path).unwrap();
    let ids: BTreeSet<_> = traces.iter().map(|t| t.id.clone()).collect();
    assert_eq!(traces.len(), 10);
    assert_eq!(ids.len(), 10);
    // The outcome carries every trace, the resumed ones included, as the file holds them.
    assert_eq!(out.traces, traces);

    // A resumed run's metrics equal an uninterrupted run's.
    let fresh = tempfile::tempdir().unwrap();
    let mut o2 = Oracle {
        calls: 0,
        fail_after: None,
        seen: vec![],
    };
    run_eval(
        samples(),
        &mut o2,
        &reward(),
        &mask_of,
        fresh.path(),
        &opts(),
    )
    .unwrap();
    let a = std::fs::read_to_string(dir.path().join("metrics.json")).unwrap();
    let b = std::fs::read_to_string(fresh.path().join("metrics.json")).unwrap();
    assert_eq!(a, b);
}

#[test]
fn a_corrupt_middle_line_is_refused_with_its_line_number() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("traces.jsonl"), "garbage\n").unwrap();
    let mut o = Oracle {
        calls: 0,
        fail_after: None,
        seen: vec![],
    };
    let e = run_eval(
        vec![Ok(sample(0))],
        &mut o,
        &reward(),
        &mask_of,
        dir.path(),
        &opts(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");
}

#[test]
fn compare_lists_both_runs_and_the_difference() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    std::fs::write(
        a.path().join("metrics.json"),
        r#"{"val/f1": 0.5, "x/f1": 0.1}"#,
    )
    .unwrap();
    std::fs::write(b.path().join("metrics.json"), r#"{"val/f1": 0.75}"#).unwrap();
    let t = compare_runs(a.path(), b.path(), None).unwrap();
    let lines: Vec<&str> = t.lines().collect();
    assert!(
        lines[2].starts_with("| val/f1 | 0.5000 | 0.7500 | +0.2500 |"),
        "{t}"
    );
    assert!(t.contains("| x/f1 | 0.1000 | - | - |"));
    assert!(compare_runs(a.path(), &a.path().join("missing"), None).is_err());
}
