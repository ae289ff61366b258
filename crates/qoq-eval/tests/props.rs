//! Properties of the metrics over random predictions.

use proptest::prelude::*;
use qoq_eval::{Extraction, MetricsAccumulator, Prediction};

fn prediction() -> impl Strategy<Value = Prediction> {
    let label = prop::sample::select(vec!["A", "B", "C", "D", "None", ""]);
    let sep = prop::sample::select(vec![", ", " and ", ","]);
    (
        prop::collection::vec(label.clone(), 0..3),
        prop::collection::vec(label, 1..3),
        sep,
        0..2usize,
        0..3usize,
        prop::option::of(0.0..=1.0f64),
        any::<bool>(),
    )
        .prop_map(|(p, g, sep, src, ds, iou, boxed)| {
            let joined = p.join(sep);
            Prediction {
                response: if boxed {
                    format!("<think>t</think> \\boxed{{{joined}}}")
                } else {
                    joined
                },
                answer: g.join(", "),
                data_source: format!("s{src}"),
                dataset: format!("d{ds}"),
                iou,
            }
        })
}

proptest! {
    #[test]
    fn metrics_lie_in_the_unit_interval(preds in prop::collection::vec(prediction(), 1..60)) {
        let mut acc = MetricsAccumulator::new(Extraction::Evaluation);
        preds.iter().for_each(|p| acc.push(p));
        for (k, v) in acc.finish().to_flat() {
            if !(k.ends_with("count") || k.ends_with("num_classes")) {
                prop_assert!((0.0..=1.0).contains(&v), "{k} = {v}");
            }
        }
    }

    #[test]
    fn order_of_predictions_does_not_change_the_metrics(
        preds in prop::collection::vec(prediction(), 1..60),
        seed in any::<u64>(),
    ) {
        let mut shuffled = preds.clone();
        // deterministic Fisher-Yates from the seed
        let mut s = seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let run = |ps: &[Prediction]| {
            let mut acc = MetricsAccumulator::new(Extraction::Evaluation);
            ps.iter().for_each(|p| acc.push(p));
            let mut flat = acc.finish().to_flat();
            flat.sort_by(|a, b| a.0.cmp(&b.0));
            flat
        };
        let (a, b) = (run(&preds), run(&shuffled));
        prop_assert_eq!(a.len(), b.len());
        for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
            prop_assert_eq!(ka, kb);
            prop_assert!((va - vb).abs() < 1e-12, "{} {} {}", ka, va, vb);
        }
    }

    #[test]
    fn all_correct_predictions_score_one(preds in prop::collection::vec(prediction(), 1..40)) {
        let mut acc = MetricsAccumulator::new(Extraction::Evaluation);
        for p in &preds {
            acc.push(&Prediction { response: format!("\\boxed{{{}}}", p.answer), ..p.clone() });
        }
        let r = acc.finish();
        // a gold "None" answer is a class that a boxed "None" cannot predict
        if !preds.iter().any(|p| p.answer.split(", ").any(|c| c == "None")) {
            let o = r.overall.unwrap();
            prop_assert!((o.metrics.f1 - 1.0).abs() < 1e-12);
            prop_assert!((o.metrics.accuracy - 1.0).abs() < 1e-12);
            prop_assert!((o.exact_match - 1.0).abs() < 1e-12);
        }
    }
}
