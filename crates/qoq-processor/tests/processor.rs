//! Processor behaviour on the committed tiny model folder (no download needed): stock vs QoQ
//! configs, placeholder checks, truncation policy, manifest samples, config/tokenizer checks.

use image::RgbImage;
use qoq_core::hf_config::{PreprocessorConfig, QwenVlConfig};
use qoq_data::manifest::{Manifest, ManifestConfig};
use qoq_processor::{Error, Processor, ProcessorOptions, QoqTokenizer, Truncation};
use std::path::{Path, PathBuf};

fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_model")
}

fn tiny_config(time_series: bool) -> QwenVlConfig {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_dir().join("config.json")).unwrap())
            .unwrap();
    if !time_series {
        v.as_object_mut().unwrap().remove("time_series_token_id");
    }
    serde_json::from_value(v).unwrap()
}

fn processor(time_series: bool, opts: ProcessorOptions) -> Processor {
    let tok = QoqTokenizer::from_file(&tiny_dir().join("tokenizer.json")).unwrap();
    Processor::new(
        tok,
        &tiny_config(time_series),
        PreprocessorConfig::default(),
        opts,
    )
    .unwrap()
}

fn img(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 90]))
}

#[test]
fn stock_config_has_no_ecg_token_and_no_ecg_data() {
    let p = processor(false, ProcessorOptions::default());
    let s = p
        .process_parts("s0", "<image>\nWhat is it?", &[img(56, 84)], None)
        .unwrap();
    assert!(!s.prompt.contains("<|time_series_pad|>"));
    assert!(s.time_series.is_none());
    assert!(!s.input_ids.contains(&p.tokenizer.ids.time_series_pad));
    // One pad in the raw ids, 2x3 merged patches in the expanded ids.
    let pad = p.tokenizer.ids.image_pad;
    assert_eq!(s.raw_prompt_ids.iter().filter(|&&t| t == pad).count(), 1);
    assert_eq!(s.input_ids.iter().filter(|&&t| t == pad).count(), 6);
    assert_eq!(s.image_grid_thw, vec![[1, 6, 4]]);
    let b = p.collate(&[s], None).unwrap();
    assert!(b.time_series_data.is_empty());

    let q = processor(true, ProcessorOptions::default());
    let s = q
        .process_parts("s1", "<image>\nWhat is it?", &[img(56, 84)], None)
        .unwrap();
    assert!(
        s.prompt
            .ends_with("<|time_series_pad|><|im_end|>\n<|im_start|>assistant\n")
    );
    assert_eq!(s.time_series.as_ref().unwrap().len(), 8 * 2500);
    assert!(s.time_series.unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn placeholder_and_image_counts_must_agree() {
    let p = processor(true, ProcessorOptions::default());
    let err = p
        .process_parts("row7", "<image> <image> two", &[img(56, 56)], None)
        .unwrap_err();
    assert!(err.to_string().contains("row7"), "{err}");
    assert!(err.to_string().contains("2 image placeholders"), "{err}");
    let err = p
        .process_parts("row8", "<image>", &[img(10, 10)], None)
        .unwrap_err();
    assert!(err.to_string().contains("row8"), "{err}");
}

#[test]
fn overlong_prompts_are_refused_or_cut_only_in_text() {
    let len_of = |p: &Processor| {
        p.process_parts("x", "<image>\nq", &[img(56, 56)], None)
            .unwrap()
            .input_ids
            .len()
    };
    let n = len_of(&processor(false, ProcessorOptions::default()));
    let opts = |max, truncation| ProcessorOptions {
        max_prompt_length: max,
        truncation,
        ..ProcessorOptions::default()
    };
    let err = processor(false, opts(n - 3, Truncation::Error))
        .process_parts("x", "<image>\nq", &[img(56, 56)], None)
        .unwrap_err();
    assert!(matches!(err, Error::TooLong { len, max, .. } if len == n && max == n - 3));
    // Stock config: the last 3 tokens are "<|im_start|>assistant\n"-ish text: a right cut is fine.
    let s = processor(false, opts(n - 3, Truncation::Right))
        .process_parts("x", "<image>\nq", &[img(56, 56)], None)
        .unwrap();
    assert_eq!(s.input_ids.len(), n - 3);
    // QoQ config: the ECG token sits near the end; a cut through it is refused.
    let q = processor(true, ProcessorOptions::default());
    let full = q
        .process_parts("x", "<image>\nq", &[img(56, 56)], None)
        .unwrap();
    let ts_at = full
        .input_ids
        .iter()
        .position(|&t| t == q.tokenizer.ids.time_series_pad)
        .unwrap();
    assert!(ts_at + 3 < full.input_ids.len());
    let err = processor(true, opts(ts_at, Truncation::Right))
        .process_parts("x", "<image>\nq", &[img(56, 56)], None)
        .unwrap_err();
    assert!(err.to_string().contains("image/ECG"), "{err}");
}

#[test]
fn collation_left_pads_and_rope_skips_padding() {
    let p = processor(true, ProcessorOptions::default());
    let a = p
        .process_parts("a", "<image>\nshort", &[img(56, 56)], None)
        .unwrap();
    let b = p
        .process_parts(
            "b",
            "<image> <image>\na much longer question text",
            &[img(84, 56), img(56, 56)],
            Some(vec![0.5; 8 * 2500]),
        )
        .unwrap();
    let batch = p.collate(&[a.clone(), b.clone()], Some(512)).unwrap();
    assert_eq!(batch.seq_len(), 512);
    assert_eq!(batch.image_grid_thw, vec![[1, 4, 4], [1, 4, 6], [1, 4, 4]]);
    assert_eq!(batch.pixel_values_shape, [16 + 24 + 16, 1176]);
    assert_eq!(batch.time_series_data.len(), 2 * 8 * 2500);
    assert_eq!(batch.time_series_data[8 * 2500], 0.5);
    let pad = 512 - a.input_ids.len();
    assert!(
        batch.input_ids[0][..pad]
            .iter()
            .all(|&t| t == p.tokenizer.ids.endoftext)
    );
    assert_eq!(&batch.input_ids[0][pad..], &a.input_ids[..]);
    // Row 0's positions: 1 on padding, then 0.. on the prompt (first token is text).
    let row0_t = &batch.position_ids[..512];
    assert!(row0_t[..pad].iter().all(|&v| v == 1));
    assert_eq!(row0_t[pad], 0);
    // The same sample alone gives the same positions on its tokens.
    let alone = p.collate(std::slice::from_ref(&a), None).unwrap();
    assert_eq!(&row0_t[pad..], &alone.position_ids[..a.input_ids.len()]);
    assert_eq!(batch.raw_prompt_ids[1], b.raw_prompt_ids);
}

fn mini_samples() -> Vec<qoq_core::ClinicalSample> {
    let m = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mini/manifest.jsonl");
    Manifest::open(&m, ManifestConfig::default())
        .unwrap()
        .rows()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn manifest_samples_load_images_volumes_and_ecgs() {
    let p = processor(true, ProcessorOptions::default());
    let rows = mini_samples();
    let out: Vec<_> = rows.iter().map(|s| p.process_sample(s).unwrap()).collect();
    // CT volume: 2 frames, each an image.
    let ct = rows.iter().position(|s| !s.videos.is_empty()).unwrap();
    assert_eq!(out[ct].image_grid_thw.len(), 2);
    // ECG-only row: the white 224 placeholder (64 tokens) and a real signal.
    let ecg = rows.iter().position(|s| !s.time_series.is_empty()).unwrap();
    assert_eq!(out[ecg].image_grid_thw, vec![[1, 16, 16]]);
    assert_eq!(out[ecg].image_sizes, vec![(224, 224)]);
    assert!(
        out[ecg]
            .time_series
            .as_ref()
            .unwrap()
            .iter()
            .any(|&v| v != 0.0)
    );
    // Every image went through the dataset-side resize into [65536, 524288] pixels.
    for s in out.iter().filter(|s| s.id != out[ecg].id) {
        for &(w, h) in &s.image_sizes {
            let a = w as u64 * h as u64;
            assert!((60_000..=524_288).contains(&a), "{} {w}x{h}", s.id);
        }
    }
    let batch = p.collate(&out, None).unwrap();
    assert_eq!(batch.batch_size(), rows.len());

    // A missing image: a white placeholder by default, an error naming the file when strict.
    let mut s = rows[0].clone();
    s.images = vec![PathBuf::from("/nonexistent/x.png")];
    let ok = p.process_sample(&s).unwrap();
    assert_eq!(ok.image_sizes, vec![(256, 256)]);
    let strict = processor(
        true,
        ProcessorOptions {
            missing_files_as_placeholders: false,
            ..ProcessorOptions::default()
        },
    );
    let err = strict.process_sample(&s).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/x.png"), "{err}");
}

#[test]
fn config_and_tokenizer_ids_must_agree() {
    let tok = QoqTokenizer::from_file(&tiny_dir().join("tokenizer.json")).unwrap();
    let mut cfg = tiny_config(true);
    cfg.image_token_id = 151655;
    let err = Processor::new(
        tok,
        &cfg,
        PreprocessorConfig::default(),
        ProcessorOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("image_token_id"), "{err}");
    let err =
        Processor::from_model_dir(Path::new("/nonexistent"), None, ProcessorOptions::default())
            .unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn user_templates_replace_the_defaults() {
    let p = processor(
        true,
        ProcessorOptions {
            format_prompt: Some("Q: {{ content }} Answer in \\boxed{}.".into()),
            ..ProcessorOptions::default()
        },
    );
    let s = p
        .process_parts("t", "<image> What?", &[img(56, 56)], None)
        .unwrap();
    assert!(
        s.prompt
            .contains("Q: <|vision_start|><|image_pad|><|vision_end|> What? Answer in \\boxed{}."),
        "{}",
        s.prompt
    );
}

#[test]
fn options_deserialise_with_defaults_and_refuse_unknown_keys() {
    let o: ProcessorOptions =
        serde_json::from_str(r#"{"max_prompt_length": 100, "truncation": "right"}"#).unwrap();
    assert_eq!(o.max_prompt_length, 100);
    assert_eq!(o.truncation, Truncation::Right);
    assert_eq!(o.dataset_max_pixels, 524_288);
    assert!(o.format_prompt.as_deref().unwrap().contains("list od"));
    let err = serde_json::from_str::<ProcessorOptions>(r#"{"max_prompt_lenght": 1}"#).unwrap_err();
    assert!(err.to_string().contains("max_prompt_lenght"), "{err}");
}
