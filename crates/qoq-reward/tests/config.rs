//! The reward plugin surface: `#[serde(tag = "type")]` configs, presets, the `weighted`
//! combinator, the `RewardFn` trait over whole samples, batch scoring order.

use qoq_core::{ClinicalSample, Domain, SampleId, SegMask};
use qoq_reward::{
    Compat, IouReduce, MaskIndex, MedicalConfig, QoqMedicalReward, RewardConfig, RewardInput,
    Weights,
};

fn sample(answer: &str, bbox: Option<[f64; 4]>) -> ClinicalSample {
    ClinicalSample {
        id: SampleId("t:1".into()),
        line: 1,
        problem: "<image>\nWhat is shown?".into(),
        system: None,
        answer: answer.into(),
        images: vec![],
        videos: vec![],
        time_series: vec![],
        segmentation_path: None,
        bbox,
        dataset: "vindr".into(),
        data_source: Domain::ChestXray,
        extra: Default::default(),
    }
}

const A: &str = "<think>The heart is enlarged.</think>\n```json\n[{\"bbox_2d\": [10, 10, 29, 29], \"label\": \"Cardiomegaly\"}]\n```\nFinal: \\boxed{Cardiomegaly}";

fn golden_mask() -> SegMask {
    let mut d = vec![0u8; 40 * 40];
    for y in 10..30 {
        for x in 10..30 {
            d[y * 40 + x] = 1;
        }
    }
    SegMask::new(40, 40, d).unwrap()
}

#[test]
fn configs_deserialize_from_tagged_json_and_toml() {
    let c: RewardConfig = serde_json::from_str(
        r#"{"type": "qoq_medical", "compat": "reference", "weights": "code"}"#,
    )
    .unwrap();
    assert_eq!(c, RewardConfig::QoqMedical(MedicalConfig::reference()));
    let c: RewardConfig =
        toml::from_str("type = \"qoq_medical\"\niou_reduce = \"max\"\nweights = \"paper\"\n")
            .unwrap();
    let RewardConfig::QoqMedical(m) = &c else {
        panic!("{c:?}")
    };
    assert_eq!(m.weights.resolve(), Weights::PAPER);
    assert_eq!(m.iou_reduce, IouReduce::Max);
    assert_eq!(m.compat, Compat::Fixed);
    let c: RewardConfig = serde_json::from_str(
        r#"{"type": "qoq_medical", "weights": {"accuracy": 0.7, "iou": 0.1, "format": 0.1, "length": 0.1}}"#,
    )
    .unwrap();
    assert!(c.build().is_ok());
    assert!(
        serde_json::from_str::<RewardConfig>(r#"{"type": "qoq_medical", "compat": "x"}"#).is_err()
    );
    assert!(
        serde_json::from_str::<RewardConfig>(r#"{"type": "qoq_medical", "colour": 1}"#).is_err()
    );
    assert!(serde_json::from_str::<RewardConfig>(r#"{"type": "nope"}"#).is_err());
}

#[test]
fn invalid_weights_and_modes_are_config_errors() {
    let too_much: RewardConfig = serde_json::from_str(
        r#"{"type": "qoq_medical", "weights": {"accuracy": 0.9, "iou": 0.3, "format": 0.1, "length": 0.1}}"#,
    )
    .unwrap();
    assert!(too_much.build().is_err());
    let max_ref: RewardConfig = serde_json::from_str(
        r#"{"type": "qoq_medical", "compat": "reference", "iou_reduce": "max"}"#,
    )
    .unwrap();
    let err = max_ref.build().err().unwrap().to_string();
    assert!(err.contains("iou_reduce"), "{err}");
    let neg: RewardConfig = serde_json::from_str(
        r#"{"type": "weighted", "parts": [{"weight": -0.5, "reward": {"type": "medical_standard"}}]}"#,
    )
    .unwrap();
    assert!(neg.build().is_err());
}

#[test]
fn weighted_sums_parts_and_reports_each_part() {
    let c: RewardConfig = serde_json::from_str(
        r#"{"type": "weighted", "parts": [
            {"weight": 0.5, "name": "ref", "reward": {"type": "qoq_medical", "compat": "reference"}},
            {"weight": 0.5, "reward": {"type": "medical_standard"}}
        ]}"#,
    )
    .unwrap();
    let r = c.build().unwrap();
    let s = sample("Cardiomegaly", None);
    let m = MaskIndex::new(&golden_mask());
    let out = r.score(&RewardInput {
        response: A,
        sample: &s,
        mask: Some(&m),
    });
    let ref_overall = out.extra["ref/overall"];
    assert!((ref_overall - 0.9134).abs() < 1e-6);
    assert_eq!(out.extra["1_medical_standard/overall"], 0.5);
    assert!((out.overall - (0.5 * ref_overall + 0.5 * 0.5)).abs() < 1e-15);
    assert_eq!(out.standard_score, 1.0);
}

#[test]
fn trait_sees_the_whole_sample_and_batches_keep_order() {
    let r = QoqMedicalReward::new(MedicalConfig::default()).unwrap();
    let with_box = sample("Cardiomegaly", Some([10.0, 10.0, 29.0, 29.0]));
    let no_box = sample("Edema", None);
    // through the convenience API with a raw mask
    let s = r.score(A, &with_box, Some(&golden_mask()));
    assert_eq!(s.iou_score, 1.0);
    // the sample's own bbox is used when there is no mask
    let s = r.score(A, &with_box, None);
    assert_eq!(s.iou_score, 1.0);
    let s = r.score(A, &no_box, None);
    assert_eq!((s.iou_score, s.standard_score), (0.0, 0.0));
    let samples = [&with_box, &no_box];
    let inputs: Vec<RewardInput> = (0..64)
        .map(|i| RewardInput {
            response: A,
            sample: samples[i % 2],
            mask: None,
        })
        .collect();
    let rf: &dyn qoq_reward::RewardFn = &r;
    let batch = rf.score_batch(&inputs);
    for (i, s) in batch.iter().enumerate() {
        assert_eq!(s, &rf.score(&inputs[i]));
        assert_eq!(s.standard_score, if i % 2 == 0 { 1.0 } else { 0.0 });
    }
}
