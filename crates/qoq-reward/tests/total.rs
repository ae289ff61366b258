//! Totality: every reward component is finite and in [0, 1] for any UTF-8 response, however
//! malformed, and nothing panics or overflows the stack (proptest plus hand-made extremes).

use proptest::prelude::*;
use qoq_core::SegMask;
use qoq_reward::pyvalue::{json_loads, literal_eval};
use qoq_reward::{
    Compat, FormatReward, IouReduce, MaskIndex, MedicalConfig, QoqMedicalReward, Weights,
    WeightsConfig, parse_conditions,
};

fn rewards() -> Vec<QoqMedicalReward> {
    // the paper's reward, and the paper's terms with a coherence weight
    let paper = [
        MedicalConfig::paper(),
        MedicalConfig {
            weights: WeightsConfig::Explicit(Weights {
                accuracy: 0.5,
                iou: 0.2,
                format: 0.1,
                length: 0.0,
            }),
            format: FormatReward::BoxPerLabel,
            coherence_weight: 0.2,
            ..MedicalConfig::paper()
        },
    ]
    .map(|c| QoqMedicalReward::new(c).unwrap());
    [
        (Compat::Reference, IouReduce::Mean),
        (Compat::Fixed, IouReduce::Mean),
        (Compat::Fixed, IouReduce::Max),
    ]
    .into_iter()
    .map(|(compat, iou_reduce)| {
        QoqMedicalReward::new(MedicalConfig {
            compat,
            iou_reduce,
            ..MedicalConfig::default()
        })
        .unwrap()
    })
    .chain(paper)
    .collect()
}

fn mask() -> MaskIndex {
    let mut d = vec![0u8; 32 * 24];
    for y in 5..20 {
        for x in 3..17 {
            d[y * 32 + x] = 9;
        }
    }
    MaskIndex::new(&SegMask::new(32, 24, d).unwrap())
}

fn check_total(text: &str) {
    let m = mask();
    for r in rewards() {
        for (mk, gt) in [
            (Some(&m), None),
            (None, Some([1.0, 2.0, 20.5, 18.0])),
            (None, None),
        ] {
            // views 3: the coherence reward runs where it is weighted
            let s = r.score_parts_views(text, "Cardiomegaly, Edema", mk, gt, 3);
            for v in [
                s.overall,
                s.standard_score,
                s.iou_score,
                s.format_score,
                s.length_score,
            ]
            .into_iter()
            .chain(s.extra.values().copied())
            {
                assert!(
                    v.is_finite() && (0.0..=1.0).contains(&v),
                    "{v} for {text:?}"
                );
            }
        }
    }
}

/// Fragments that steer random text towards the parsers' interesting paths.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("```json\n".to_string()),
        Just("```".to_string()),
        Just("\n".to_string()),
        Just("\\boxed{".to_string()),
        Just("}".to_string()),
        Just("{\"bbox_2d\": ".to_string()),
        Just("'label': 'x'".to_string()),
        Just("\"objects_of_interest\": [".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(", ".to_string()),
        Just("NaN".to_string()),
        Just("-Infinity".to_string()),
        Just("1e999".to_string()),
        Just("True".to_string()),
        Just("None".to_string()),
        Just("(".to_string()),
        Just(")".to_string()),
        Just("\"".to_string()),
        Just("'".to_string()),
        Just("-".to_string()),
        Just("2j".to_string()),
        (-100_000i64..100_000).prop_map(|v| v.to_string()),
        (-1.0e6f64..1.0e6).prop_map(|v| v.to_string()),
        "[a-zA-Z ,&]{0,12}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_text_scores_finite_in_unit_interval(text in any::<String>()) {
        check_total(&text);
    }

    #[test]
    fn structured_garbage_scores_finite_in_unit_interval(
        parts in proptest::collection::vec(fragment(), 0..40)
    ) {
        check_total(&parts.concat());
    }

    #[test]
    fn boxes_with_any_numbers_score_finite(
        coords in proptest::collection::vec(
            prop_oneof![any::<f64>().prop_map(|v| format!("{v:?}")), any::<i64>().prop_map(|v| v.to_string())],
            0..9,
        ),
        quote in any::<bool>(),
    ) {
        let body = format!("[{{\"bbox_2d\": [{}], \"label\": \"x\"}}]", coords.join(", "));
        let body = if quote { body.replace('"', "'") } else { body };
        check_total(&format!("```json\n{body}\n```\n\\boxed{{Edema}}"));
    }

    #[test]
    fn conditions_are_sorted_and_unique(text in any::<String>()) {
        let c = parse_conditions(&text);
        prop_assert!(c.windows(2).all(|w| w[0] < w[1]));
        prop_assert!(!c.is_empty());
    }

    #[test]
    fn mask_box_counts_equal_brute_force(
        bits in proptest::collection::vec(any::<bool>(), 12 * 9),
        b in proptest::array::uniform4(-3i128..15),
    ) {
        let data: Vec<u8> = bits.iter().map(|&v| v as u8).collect();
        let m = SegMask::new(12, 9, data).unwrap();
        let idx = MaskIndex::new(&m);
        let (inter, union) = idx.box_counts(b);
        let clip = |v: i128, n: i128| v.clamp(0, n - 1);
        let (mut x1, mut y1, mut x2, mut y2) = (clip(b[0], 12), clip(b[1], 9), clip(b[2], 12), clip(b[3], 9));
        if x1 > x2 { std::mem::swap(&mut x1, &mut x2); }
        if y1 > y2 { std::mem::swap(&mut y1, &mut y2); }
        let (mut i_n, mut u_n) = (0u64, 0u64);
        for y in 0..9 {
            for x in 0..12 {
                let inb = x1 < x2 && y1 < y2 && (x1..=x2).contains(&(x as i128)) && (y1..=y2).contains(&(y as i128));
                let inm = m.get(x, y) > 0;
                i_n += (inb && inm) as u64;
                u_n += (inb || inm) as u64;
            }
        }
        prop_assert_eq!((inter, union), (i_n, u_n));
    }
}

#[test]
fn extreme_inputs_stay_total() {
    let deep_json = format!("```json\n{}\n```", "[".repeat(200_000));
    let deep_lit = format!(
        "```json\n{}1{}\n```",
        "(".repeat(100_000),
        ")".repeat(100_000)
    );
    let signs = format!("```\n{}1\n```", "-".repeat(300_000));
    let sums = format!("```\n1{}\n```", "+1".repeat(300_000));
    let fences = "```json\n```json\n```\n".repeat(50_000);
    let long = format!(
        "<think>{}</think>```json\n[{{\"bbox_2d\": [1e308, -1e308, NaN, Infinity], \"label\": \"x\"}}]\n```\\boxed{{{}}}",
        "a".repeat(1 << 20),
        "{".repeat(1000)
    );
    let huge_int = format!(
        "```json\n[{{\"bbox_2d\": [{}, 0, 5, 5], \"label\": \"x\"}}]\n```",
        "9".repeat(5000)
    );
    let boxes = format!(
        "```json\n[{}]\n```",
        vec!["{\"bbox_2d\": [1, 2, 30, 20], \"label\": \"a\"}"; 20_000].join(",")
    );
    for t in [
        &deep_json, &deep_lit, &signs, &sums, &fences, &long, &huge_int, &boxes,
    ] {
        check_total(t);
        let _ = json_loads(t);
        let _ = literal_eval(t);
    }
}
