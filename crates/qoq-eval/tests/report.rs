//! The golden example of spec §8.9, the aggregation levels, and the Markdown report.

use qoq_eval::{Extraction, MetricsAccumulator, MetricsReport, Prediction};

fn pred(response: &str, answer: &str, source: &str, dataset: &str, iou: Option<f64>) -> Prediction {
    Prediction {
        response: response.into(),
        answer: answer.into(),
        data_source: source.into(),
        dataset: dataset.into(),
        iou,
    }
}

fn report(preds: &[Prediction]) -> MetricsReport {
    let mut acc = MetricsAccumulator::new(Extraction::Evaluation);
    preds.iter().for_each(|p| acc.push(p));
    acc.finish()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn spec_8_9_golden_example() {
    // preds \boxed{A},\boxed{B},\boxed{A, B},\boxed{C}, GT A,B,A,A in one dataset:
    // precision 0.75, recall 0.8333, F1 0.7333, accuracy 0.75.
    let preds: Vec<_> = [("A", "A"), ("B", "B"), ("A, B", "A"), ("C", "A")]
        .iter()
        .map(|(p, g)| pred(&format!("\\boxed{{{p}}}"), g, "src", "ds", None))
        .collect();
    let r = report(&preds);
    let js = r.to_flat_json();
    for prefix in ["src/ds", "src", "val"] {
        assert!(close(
            js[format!("{prefix}/precision")].as_f64().unwrap(),
            0.75
        ));
        assert!(close(
            js[format!("{prefix}/recall")].as_f64().unwrap(),
            5.0 / 6.0
        ));
        assert!(close(
            js[format!("{prefix}/sensitivity")].as_f64().unwrap(),
            5.0 / 6.0
        ));
        assert!(close(
            js[format!("{prefix}/f1")].as_f64().unwrap(),
            11.0 / 15.0
        ));
        assert!(close(
            js[format!("{prefix}/accuracy")].as_f64().unwrap(),
            0.75
        ));
        // specificity: A 1/1, B 2/3 (C has no gold sample and is not averaged)
        assert!(close(
            js[format!("{prefix}/specificity")].as_f64().unwrap(),
            5.0 / 6.0
        ));
    }
    assert_eq!(js["src/ds/num_classes"], 2);
    assert_eq!(js["val/count"], 4);
    let ds = &r.sources[0].datasets[0];
    assert_eq!(ds.labels, 3);
    assert!(!ds.classes.contains_key("C"));
    assert_eq!(ds.classes["B"].confusion.fp, 1);
    assert_eq!(ds.classes["B"].confusion.tn, 2);
}

#[test]
fn datasets_weigh_equally_in_a_source_and_sources_equally_overall() {
    let mut preds = vec![pred(r"\boxed{A}", "A", "s1", "big", Some(1.0)); 9];
    preds.push(pred(r"\boxed{B}", "A", "s1", "big", Some(0.0)));
    preds.push(pred(r"\boxed{X}", "Y", "s1", "small", None));
    preds.push(pred(r"\boxed{Z}", "Z", "s2", "only", Some(0.5)));
    let js = report(&preds).to_flat_json();
    // big: class A only (B has no gold): precision 1, recall 0.9 -> s1 recall (0.9 + 0) / 2.
    assert!(close(js["s1/big/recall"].as_f64().unwrap(), 0.9));
    assert!(close(js["s1/small/recall"].as_f64().unwrap(), 0.0));
    assert!(close(js["s1/recall"].as_f64().unwrap(), 0.45));
    assert!(close(
        js["val/recall"].as_f64().unwrap(),
        (0.45 + 1.0) / 2.0
    ));
    // exact match: big 0.9, small 0 -> s1 0.45; s2 1 -> val 0.725
    assert!(close(js["s1/exact_match"].as_f64().unwrap(), 0.45));
    assert!(close(js["val/exact_match"].as_f64().unwrap(), 0.725));
    // mean IoU only over samples/datasets that have one
    assert!(close(js["s1/big/mean_iou"].as_f64().unwrap(), 0.9));
    assert!(js.get("s1/small/mean_iou").is_none());
    assert!(close(js["s1/mean_iou"].as_f64().unwrap(), 0.9));
    assert!(close(js["val/mean_iou"].as_f64().unwrap(), 0.7));
    assert_eq!(js["s1/count"], 11);
    assert_eq!(js["val/iou_count"], 11);
}

#[test]
fn empty_accumulator_reports_nothing() {
    let r = MetricsAccumulator::default().finish();
    assert!(r.to_flat().is_empty());
    assert!(r.overall.is_none());
}

#[test]
fn markdown_snapshot_lists_domains_in_the_paper_order() {
    let preds = vec![
        pred(r"\boxed{A}", "A", "chest_xray", "mimic", Some(0.5)),
        pred(r"\boxed{B}", "B", "chest_xray", "mimic", None),
        pred(r"\boxed{A, B}", "A", "chest_xray", "mimic", Some(1.0)),
        pred(r"\boxed{C}", "A", "chest_xray", "mimic", None),
        pred("no answer", "x|y", "chest_xray", "odd|name", None),
        pred(r"\boxed{NORM}", "NORM", "ecg", "ptb-xl", None),
    ];
    let md = report(&preds).to_markdown();
    let expected = "\
| Domain | Dataset | N | Classes | Acc | Sens | Spec | F1 | Prec | Exact | mIoU | N(IoU) |
|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|
| ecg | ptb-xl | 1 | 1 | 1.0000 | 1.0000 | 0.0000 | 1.0000 | 1.0000 | 1.0000 | - | 0 |
| **ecg** | (mean) | 1 |  | 1.0000 | 1.0000 | 0.0000 | 1.0000 | 1.0000 | 1.0000 | - | 0 |
| chest_xray | mimic | 4 | 2 | 0.7500 | 0.8333 | 0.8333 | 0.7333 | 0.7500 | 0.5000 | 0.7500 | 2 |
| chest_xray | odd\\|name | 1 | 1 | 0.0000 | 0.0000 | 0.0000 | 0.0000 | 0.0000 | 0.0000 | - | 0 |
| **chest_xray** | (mean) | 5 |  | 0.3750 | 0.4167 | 0.4167 | 0.3667 | 0.3750 | 0.2500 | 0.7500 | 2 |
| **val** | (mean of domains) | 6 |  | 0.6875 | 0.7083 | 0.2083 | 0.6833 | 0.6875 | 0.6250 | 0.7500 | 2 |
| **Overall (vision)** | (mean of vision domains) | 5 |  | 0.3750 | 0.4167 | 0.4167 | 0.3667 | 0.3750 | 0.2500 | 0.7500 | 2 |
";
    assert_eq!(md, expected, "\n{md}");
}

#[test]
fn paper_overall_leaves_out_ecg_and_fusion_domains() {
    let preds = vec![
        pred(r"\boxed{A}", "A", "chest_xray", "d", None),
        pred(r"\boxed{B}", "A", "mri", "d", None),
        pred(r"\boxed{A}", "A", "ecg", "d", None),
        pred(r"\boxed{A}", "A", "multimodal", "los", None),
    ];
    let r = report(&preds);
    let all = r.overall.unwrap();
    let vision = r.overall_vision().unwrap();
    assert!(close(all.metrics.recall, 0.75));
    assert!(close(vision.metrics.recall, 0.5));
    assert_eq!(vision.count, 2);
    assert!(r.overall_where(|s| s == "nothing").is_none());
    // only vision domains: no extra Markdown row
    let md = report(&preds[..2]).to_markdown();
    assert!(!md.contains("Overall (vision)"), "{md}");
    assert!(report(&preds).to_markdown().contains("Overall (vision)"));
}
