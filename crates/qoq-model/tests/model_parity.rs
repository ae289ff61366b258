//! ClinicalVlm logits against HF transformers 4.51.3 (`tools/fixtures/model.py`): text only,
//! image + text, two images of different sizes, ECG + image + text (with left padding).

mod support;

use candle_core::{DType, Device};
use qoq_model::ForwardMode;
use qoq_model::loading::load_model;
use support::*;

#[test]
fn logits_match_transformers_for_every_case_in_both_modes() {
    let (_, model) = load_model(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let all = cases();
    for name in CASES {
        let (inputs, expected) = case_inputs(&all, name);
        let inf = model.forward(&inputs, ForwardMode::Inference).unwrap();
        let train = model.forward(&inputs, ForwardMode::Train).unwrap();
        assert_eq!(inf.dims(), expected.dims(), "{name}");
        let d = max_abs(&inf, &expected);
        eprintln!("{name}: max abs diff to HF {d:e}");
        assert!(d < 1e-4, "{name}: inference logits differ from HF by {d}");
        let d = max_abs(&train, &expected);
        assert!(d < 1e-4, "{name}: train logits differ from HF by {d}");
        let d = max_abs(&train, &inf);
        assert!(
            d < 1e-5,
            "{name}: train and inference forwards differ by {d}"
        );
    }
}

#[test]
fn forward_hidden_then_lm_head_equals_forward() {
    let (_, model) = load_model(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let (inputs, _) = case_inputs(&cases(), "ecg_image_text");
    let h = model
        .forward_hidden(&inputs, ForwardMode::Inference)
        .unwrap();
    assert_eq!(h.dims(), &[2, 12, 64]);
    let last = h.narrow(1, 11, 1).unwrap();
    let l1 = model.logits_from_hidden(&last).unwrap();
    let l2 = model
        .forward(&inputs, ForwardMode::Inference)
        .unwrap()
        .narrow(1, 11, 1)
        .unwrap();
    // The same projection over 2 rows (one pass over the weights per row, qoq_model::linear) and
    // over 24 (a blocked product) sums in another order: f32 rounding apart.
    let d = max_abs(&l1, &l2);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn wrong_feature_count_is_a_clear_error() {
    let (_, model) = load_model(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let (mut inputs, _) = case_inputs(&cases(), "image_text");
    // 4x12 patches -> 12 merged tokens; a 4x8 grid gives 8 features for 12 placeholders.
    inputs.image_grid_thw = vec![[1, 4, 8]];
    inputs.pixel_values = Some(pixel_pool(32));
    let err = model
        .forward(&inputs, ForwardMode::Inference)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("image") && err.contains("8 features") && err.contains("12"),
        "{err}"
    );
}

#[test]
fn video_placeholders_take_video_features() {
    // A one-frame video through the same tower gives the image's features; with the video pad id in
    // place of the image pad id the logits must equal the image case's.
    let (_, model) = load_model(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let cfg = model.config().clone();
    let (mut inputs, expected) = case_inputs(&cases(), "image_text");
    let ids: Vec<Vec<i64>> = inputs.input_ids.to_vec2().unwrap();
    let swapped: Vec<i64> = ids[0]
        .iter()
        .map(|&t| {
            if t == i64::from(cfg.image_token_id) {
                i64::from(cfg.video_token_id)
            } else {
                t
            }
        })
        .collect();
    let n = swapped.len();
    inputs.input_ids = candle_core::Tensor::from_vec(swapped, (1, n), &Device::Cpu).unwrap();
    inputs.pixel_values_videos = inputs.pixel_values.take();
    inputs.video_grid_thw = std::mem::take(&mut inputs.image_grid_thw);
    let got = model.forward(&inputs, ForwardMode::Inference).unwrap();
    let d = max_abs(&got, &expected);
    assert!(d < 1e-4, "video path differs by {d}");
}
