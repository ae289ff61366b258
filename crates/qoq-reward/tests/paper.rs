//! Golden cases of the paper's reward (spec §8.7 end, §14 item 7): the binary box-per-label
//! format reward, the visual-coherence reward and `MedicalConfig::paper()` (0.6 F1 + 0.2 IoU of
//! the best box + 0.2 binary format, no length term). The cases live in
//! `tests/fixtures/paper_golden.jsonl` and `coherence_golden.jsonl`, each with its expected
//! components and the hand computation (`why`); `crates/qoq-cli/tests/reward.rs` runs
//! `qoq reward --preset paper` on the same files.

use qoq_core::{ClinicalSample, Domain, SampleId};
use qoq_reward::{
    Compat, FormatReward, IouReduce, MaskIndex, MedicalConfig, QoqMedicalReward, RewardConfig,
    RewardInput, Weights, WeightsConfig, coherence_views, load_mask_image,
};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
struct Golden {
    response: String,
    answer: String,
    #[serde(default)]
    segmentation_path: Option<String>,
    #[serde(default)]
    bbox: Option<[f64; 4]>,
    #[serde(default)]
    views: usize,
    expect: std::collections::BTreeMap<String, f64>,
    why: String,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden(name: &str) -> Vec<Golden> {
    std::fs::read_to_string(fixtures().join(name))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Score every case and compare each expected component.
fn check(reward: &QoqMedicalReward, cases: &[Golden]) {
    for (i, c) in cases.iter().enumerate() {
        let mask = c
            .segmentation_path
            .as_ref()
            .map(|p| MaskIndex::new(&load_mask_image(&fixtures().join(p)).unwrap()));
        let s = reward.score_parts_views(&c.response, &c.answer, mask.as_ref(), c.bbox, c.views);
        let got: std::collections::BTreeMap<String, f64> = s.components().into_iter().collect();
        for (k, want) in &c.expect {
            let v = got.get(k).copied().unwrap_or(f64::NAN);
            assert!(
                (v - want).abs() < 1e-12,
                "case {i} {k}: {v} != {want} ({})",
                c.why
            );
        }
    }
}

#[test]
fn paper_preset_golden_cases() {
    let cases = golden("paper_golden.jsonl");
    assert_eq!(cases.len(), 6);
    let r = QoqMedicalReward::new(MedicalConfig::paper()).unwrap();
    check(&r, &cases);
    // no coherence term unless asked for
    let s = r.score_parts(&cases[0].response, &cases[0].answer, None, None);
    assert!(s.extra.is_empty(), "{s:?}");
}

#[test]
fn paper_preset_is_the_papers_weights_best_box_and_binary_format() {
    let c = MedicalConfig::paper();
    assert_eq!(c.weights.resolve(), Weights::PAPER);
    assert_eq!(
        (c.weights.resolve().accuracy, c.weights.resolve().iou),
        (0.6, 0.2)
    );
    assert_eq!(
        (c.weights.resolve().format, c.weights.resolve().length),
        (0.2, 0.0)
    );
    assert_eq!(
        (c.compat, c.iou_reduce, c.format, c.coherence_weight),
        (
            Compat::Fixed,
            IouReduce::Max,
            FormatReward::BoxPerLabel,
            0.0
        )
    );
    // the same from a TOML run file section
    let t: RewardConfig = toml::from_str(
        "type = \"qoq_medical\"\niou_reduce = \"max\"\nweights = \"paper\"\nformat = \"box_per_label\"\n",
    )
    .unwrap();
    assert_eq!(t, RewardConfig::QoqMedical(MedicalConfig::paper()));
}

/// The binary format against the graded one on the same response (only the format differs).
#[test]
fn box_per_label_replaces_only_the_format_component() {
    let graded = QoqMedicalReward::new(MedicalConfig::default()).unwrap();
    let binary = QoqMedicalReward::new(MedicalConfig {
        format: FormatReward::BoxPerLabel,
        ..MedicalConfig::default()
    })
    .unwrap();
    // §8.8 E with code weights: graded 0.5 + 0.1·0.9 + 0.1·0.071 = 0.5971; binary 0.5071
    let e = &golden("paper_golden.jsonl")[2];
    let m = MaskIndex::new(&load_mask_image(&fixtures().join("golden_mask.png")).unwrap());
    let g = graded.score_parts(&e.response, &e.answer, Some(&m), None);
    let b = binary.score_parts(&e.response, &e.answer, Some(&m), None);
    assert!((g.overall - 0.5971).abs() < 1e-12, "{g:?}");
    assert!((b.overall - 0.5071).abs() < 1e-12, "{b:?}");
    assert!((g.format_score - 0.9).abs() < 1e-12, "{g:?}");
    assert_eq!(b.format_score, 0.0);
    assert_eq!(g.length_score, b.length_score);
}

/// A two-frame response (boxes [0,0,10,10] and [5,5,15,15], label "lesion").
const COH_TWO: &str = "```json\n[{\"bbox_2d\": [0, 0, 10, 10], \"label\": \"lesion\"}, {\"bbox_2d\": [5, 5, 15, 15], \"label\": \"lesion\"}]\n```\n\\boxed{lesion}";

/// Weights 0.6 / 0.2 / 0.1 / 0, box_per_label, best box, coherence_weight 0.1 (the CLI's
/// `--weights 0.6,0.2,0.1,0 --format box-per-label --iou-reduce max --coherence-weight 0.1`).
fn coherence_reward() -> QoqMedicalReward {
    QoqMedicalReward::new(MedicalConfig {
        compat: Compat::Fixed,
        iou_reduce: IouReduce::Max,
        weights: WeightsConfig::Explicit(Weights {
            accuracy: 0.6,
            iou: 0.2,
            format: 0.1,
            length: 0.0,
        }),
        format: FormatReward::BoxPerLabel,
        coherence_weight: 0.1,
    })
    .unwrap()
}

#[test]
fn coherence_golden_cases() {
    let cases = golden("coherence_golden.jsonl");
    assert_eq!(cases.len(), 4);
    assert_eq!(cases[0].response, COH_TWO);
    check(&coherence_reward(), &cases);
}

fn volume_sample(problem: &str, videos: usize, images: usize) -> ClinicalSample {
    ClinicalSample {
        id: SampleId("t:1".into()),
        line: 1,
        problem: problem.into(),
        system: None,
        answer: "lesion".into(),
        images: vec![PathBuf::from("a.png"); images],
        videos: vec![PathBuf::from("ct/x/v.nii.gz"); videos],
        time_series: vec![],
        segmentation_path: None,
        bbox: Some([0.0, 0.0, 10.0, 10.0]),
        dataset: "x".into(),
        data_source: Domain::Ct,
        extra: Default::default(),
    }
}

/// Through the `RewardFn` trait the views are the frames of the sample's one volume (the
/// normalised question's placeholders); views of one study (several images) get none.
#[test]
fn coherence_views_are_the_frames_of_one_volume() {
    use qoq_reward::RewardFn;
    let volume = volume_sample("<image> <image>  Is there a lesion?", 1, 0);
    assert_eq!(coherence_views(&volume), 2);
    let study = volume_sample("<image> <image>  Is there a lesion?", 0, 2);
    assert_eq!(coherence_views(&study), 0);
    let mixed = volume_sample("<image> <image> <image>   q", 1, 1);
    assert_eq!(coherence_views(&mixed), 0);
    let r = coherence_reward();
    let s = RewardFn::score(
        &r,
        &RewardInput {
            response: COH_TWO,
            sample: &volume,
            mask: None,
        },
    );
    assert!((s.overall - (0.9 + 0.1 / 7.0)).abs() < 1e-12, "{s:?}");
    let s = RewardFn::score(
        &r,
        &RewardInput {
            response: COH_TWO,
            sample: &study,
            mask: None,
        },
    );
    assert!((s.overall - 0.9).abs() < 1e-12, "{s:?}");
}

#[test]
fn paper_options_are_refused_where_they_cannot_work() {
    let err = |c: MedicalConfig| QoqMedicalReward::new(c).unwrap_err().to_string();
    let e = err(MedicalConfig {
        format: FormatReward::BoxPerLabel,
        ..MedicalConfig::reference()
    });
    assert!(e.contains("box_per_label") && e.contains("fixed"), "{e}");
    let e = err(MedicalConfig {
        coherence_weight: 0.1,
        ..MedicalConfig::reference()
    });
    assert!(e.contains("coherence_weight"), "{e}");
    // the paper's weights already sum to 1: a coherence weight on top would leave [0, 1]
    let e = err(MedicalConfig {
        coherence_weight: 0.1,
        ..MedicalConfig::paper()
    });
    assert!(e.contains("sum to"), "{e}");
    let e = err(MedicalConfig {
        coherence_weight: f64::NAN,
        ..MedicalConfig::default()
    });
    assert!(e.contains("coherence_weight"), "{e}");
    // unknown format names are refused by serde, naming the variants
    let e = serde_json::from_str::<RewardConfig>(r#"{"type": "qoq_medical", "format": "binary"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("box_per_label"), "{e}");
}
