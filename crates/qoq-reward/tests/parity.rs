//! Parity with the reference reward: tools/fixtures/reward.py runs our port of the released
//! `medical_compute_score` (torch float32 tensors in the mask branch, as released) on 400
//! seeded cases; every component must match to 1e-12 in `compat = "reference"` mode.

use qoq_core::SegMask;
use qoq_reward::{MaskIndex, MedicalConfig, QoqMedicalReward};
use serde_json::Value;

fn mask_of(v: &Value) -> MaskIndex {
    let w = v["width"].as_u64().unwrap() as usize;
    let h = v["height"].as_u64().unwrap() as usize;
    let mut data = Vec::with_capacity(w * h);
    for row in v["rows"].as_array().unwrap() {
        data.extend(row.as_str().unwrap().bytes().map(|b| (b == b'1') as u8));
    }
    MaskIndex::new(&SegMask::new(w, h, data).unwrap())
}

fn check_cases(text: &str) -> usize {
    let reward = QoqMedicalReward::new(MedicalConfig::reference()).unwrap();
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let case: Value = serde_json::from_str(line).unwrap();
        let mask = case.get("mask").map(mask_of);
        let bbox = case.get("bbox").map(|b| {
            let v: Vec<f64> = serde_json::from_value(b.clone()).unwrap();
            [v[0], v[1], v[2], v[3]]
        });
        let got = reward.score_parts(
            case["response"].as_str().unwrap(),
            case["answer"].as_str().unwrap(),
            mask.as_ref(),
            bbox,
        );
        let exp = &case["expected"];
        for (name, g) in [
            ("overall", got.overall),
            ("standard_score", got.standard_score),
            ("iou_score", got.iou_score),
            ("format_score", got.format_score),
            ("length_score", got.length_score),
        ] {
            let e = exp[name].as_f64().unwrap();
            assert!(
                (g - e).abs() <= 1e-12,
                "case {} (line {}): {name} = {g}, reference {e}\nresponse: {:?}",
                i,
                i + 1,
                case["response"].as_str().unwrap()
            );
        }
        n += 1;
    }
    n
}

#[test]
fn reference_mode_matches_the_released_function_on_every_fixture_case() {
    assert_eq!(
        check_cases(include_str!("fixtures/reward_cases.jsonl")),
        400
    );
}

/// A larger differential run on demand: `python3 tools/fixtures/reward.py --n 20000 --mutate 0.5
/// --out /tmp/cases.jsonl` then `QOQ_REWARD_CASES=/tmp/cases.jsonl cargo test -p qoq-reward
/// --test parity`.
#[test]
fn reference_mode_matches_an_extra_case_file_when_given() {
    let Ok(path) = std::env::var("QOQ_REWARD_CASES") else {
        eprintln!("QOQ_REWARD_CASES not set: extra differential cases skipped");
        return;
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let n = check_cases(&text);
    eprintln!("{n} extra cases from {path} match");
    assert!(n > 0);
}
