//! Parity with transformers 4.51.3 (`Qwen2_5_VLProcessor`, `Qwen2VLImageProcessorFast`,
//! `get_rope_index`): fixtures written by tools/fixtures/processor.py.
//!
//! * `image_parity`, `tiny_*`: committed fixtures only.
//! * `real_*`, `llama_cpp_*`: need the real Qwen tokenizer files that scripts/fetch-testdata.sh
//!   puts in `.testdata/tokenizer/` (or `$QOQ_TESTDATA/tokenizer/`); they fail, naming that
//!   script, when the files are absent.

use image::RgbImage;
use qoq_core::hf_config::{PreprocessorConfig, QwenVlConfig};
use qoq_processor::image::ImageProcessor;
use qoq_processor::tokenizer::QoqTokenizer;
use qoq_processor::{ProcessedSample, Processor, ProcessorOptions};
use safetensors::SafeTensors;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cache_file(rel: &str) -> PathBuf {
    let base = std::env::var_os("QOQ_TESTDATA").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.testdata"),
        PathBuf::from,
    );
    let p = base.join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-testdata.sh first (it fetches the Qwen tokenizer files)",
        p.display()
    );
    p
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn i64s(st: &SafeTensors, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap();
    t.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn load_png(name: &str) -> RgbImage {
    image::open(fixtures().join("images").join(name))
        .unwrap()
        .to_rgb8()
}

/// (max abs, mean abs) difference.
fn diff(a: &[f32], b: &[f32]) -> (f32, f64) {
    assert_eq!(a.len(), b.len());
    let mut max = 0f32;
    let mut sum = 0f64;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        max = max.max(d);
        sum += d as f64;
    }
    (max, sum / a.len() as f64)
}

/// Against the Fast processor (the reference's): our resize is torch's uint8 arithmetic, so only
/// float rounding of the normalisation may differ.
const FAST_TOL: f32 = 1e-6;
/// Against PIL (the slow processor): one grey level after normalisation is 1 / (255 · std)
/// <= 0.0151, and PIL's 22-bit weights differ from torch's int16 ones by at most one level.
const MAX_TOL: f32 = 0.02;
const MEAN_TOL: f64 = 1e-3;

const IMAGES: [&str; 3] = ["gen_70x50", "noise_30x100", "fundus_60x60"];

#[test]
fn image_processor_matches_hf_fast_and_slow() {
    let bytes = std::fs::read(fixtures().join("image_parity.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let proc = ImageProcessor::new(
        PreprocessorConfig::from_file(&fixtures().join("tiny_model/preprocessor_config.json"))
            .unwrap(),
    );
    for name in IMAGES {
        let v = proc
            .preprocess_image(&load_png(&format!("{name}.png")))
            .unwrap();
        let grid: Vec<usize> = i64s(&st, &format!("{name}.grid"))
            .iter()
            .map(|&g| g as usize)
            .collect();
        assert_eq!(v.grid_thw.to_vec(), grid, "{name}");
        let (max, mean) = diff(&v.pixel_values, &f32s(&st, &format!("{name}.fast")));
        eprintln!("{name}: vs HF fast: max {max:.5}, mean {mean:.2e}");
        assert!(max < FAST_TOL, "{name}: max {max}, mean {mean}");
        if let Ok(slow) = st.tensor(&format!("{name}.slow")) {
            let slow: Vec<f32> = slow
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let (max, mean) = diff(&v.pixel_values, &slow);
            eprintln!("{name}: vs HF slow (PIL): max {max:.5}, mean {mean:.2e}");
            assert!(
                max < MAX_TOL && mean < MEAN_TOL,
                "{name} slow: max {max}, mean {mean}"
            );
        }
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn grids(v: &Value) -> Vec<[usize; 3]> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let g = u32s(g);
            [g[0] as usize, g[1] as usize, g[2] as usize]
        })
        .collect()
}

/// Run every case of a fixture file through `make(format_prompt)`'s processors and compare
/// prompts, ids, grids, then the collated batch. Returns the samples.
fn check_cases(
    cases: &Value,
    make: &dyn Fn(bool) -> Processor,
    dataset_resize: Option<(u64, u64)>,
) -> (Vec<ProcessedSample>, Processor) {
    let with_fmt = make(true);
    let plain = make(false);
    let mut samples = Vec::new();
    for c in cases["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let images: Vec<RgbImage> = c["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| match n.as_str().unwrap() {
                "white224" => RgbImage::from_pixel(224, 224, image::Rgb([255, 255, 255])),
                file => {
                    let img = load_png(file);
                    match dataset_resize {
                        Some((mn, mx)) => qoq_data::vision::process_image(
                            &image::DynamicImage::ImageRgb8(img),
                            mn,
                            mx,
                        ),
                        None => img,
                    }
                }
            })
            .collect();
        let sizes: Vec<(u32, u32)> = c["image_sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s[0].as_u64().unwrap() as u32, s[1].as_u64().unwrap() as u32))
            .collect();
        let p = if c["format_prompt"].as_bool().unwrap() {
            &with_fmt
        } else {
            &plain
        };
        let s = p
            .process_parts(name, c["question"].as_str().unwrap(), &images, None)
            .unwrap();
        assert_eq!(s.image_sizes, sizes, "{name}: dataset-side sizes");
        assert_eq!(
            s.prompt,
            c["prompt"].as_str().unwrap(),
            "{name}: prompt text"
        );
        assert_eq!(
            s.raw_prompt_ids,
            u32s(&c["raw_prompt_ids"]),
            "{name}: raw ids"
        );
        assert_eq!(s.input_ids, u32s(&c["input_ids"]), "{name}: input ids");
        assert_eq!(
            s.image_grid_thw,
            grids(&c["image_grid_thw"]),
            "{name}: grids"
        );
        assert_eq!(s.time_series.as_ref().map(Vec::len), Some(8 * 2500));
        samples.push(s);
    }
    let batch = with_fmt.collate(&samples, None).unwrap();
    let want = &cases["batch"];
    let ids: Vec<Vec<u32>> = want["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(u32s)
        .collect();
    assert_eq!(batch.input_ids, ids, "batch input ids (left padding)");
    let mask: Vec<Vec<u32>> = want["attention_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(u32s)
        .collect();
    assert_eq!(batch.attention_mask, mask);
    assert_eq!(batch.image_grid_thw, grids(&want["image_grid_thw"]));
    let pos: Vec<i64> = want["position_ids"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|axis| axis.as_array().unwrap().iter())
        .flat_map(|row| row.as_array().unwrap().iter())
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(batch.position_ids, pos, "position ids [3][b][s]");
    let deltas: Vec<i64> = want["rope_deltas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(batch.rope_deltas, deltas);
    let shape: Vec<usize> = u32s(&want["pixel_values_shape"])
        .iter()
        .map(|&v| v as usize)
        .collect();
    assert_eq!(batch.pixel_values_shape.to_vec(), shape);
    let sum: f64 = batch.pixel_values.iter().map(|&v| v as f64).sum();
    let abs: f64 = batch.pixel_values.iter().map(|&v| v.abs() as f64).sum();
    let n = batch.pixel_values.len() as f64;
    let (want_sum, want_abs) = (
        want["pixel_values_sum"].as_f64().unwrap(),
        want["pixel_values_abs_sum"].as_f64().unwrap(),
    );
    eprintln!(
        "batch pixel sums: ours {sum:.3} / {abs:.3}, HF {want_sum:.3} / {want_abs:.3} over {n} values"
    );
    assert!(
        (sum - want_sum).abs() / n < MEAN_TOL,
        "pixel sum {sum} vs {want_sum}"
    );
    assert!(
        (abs - want_abs).abs() / n < MEAN_TOL,
        "pixel abs sum {abs} vs {want_abs}"
    );
    assert_eq!(batch.time_series_data.len(), 3 * 8 * 2500);
    assert!(batch.time_series_data.iter().all(|&v| v == 0.0));
    (samples, with_fmt)
}

fn tiny_processor(format_prompt: bool) -> Processor {
    let opts = ProcessorOptions {
        format_prompt: format_prompt.then(|| ProcessorOptions::default().format_prompt.unwrap()),
        ..ProcessorOptions::default()
    };
    Processor::from_model_dir(&fixtures().join("tiny_model"), None, opts).unwrap()
}

#[test]
fn tiny_tokenizer_cases_match_hf_processor_and_rope_index() {
    let cases = read_json(&fixtures().join("tiny_cases.json"));
    let (samples, p) = check_cases(&cases, &tiny_processor, None);
    let want_ids = &cases["special_ids"];
    assert_eq!(
        p.tokenizer.ids.time_series_pad as u64,
        want_ids["time_series_token_id"].as_u64().unwrap()
    );
    // The pixel values of the file images are the image-parity inputs: compare them exactly
    // there, and the white placeholder's rows against the normalised constant.
    let bytes = std::fs::read(fixtures().join("image_parity.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut hf = f32s(&st, "gen_70x50.fast");
    hf.extend(f32s(&st, "fundus_60x60.fast"));
    hf.extend(f32s(&st, "noise_30x100.fast"));
    let batch = p.collate(&samples, None).unwrap();
    let (max, mean) = diff(&batch.pixel_values[..hf.len()], &hf);
    assert!(max < FAST_TOL, "max {max} mean {mean}");
    let cfg = &p.image.cfg;
    for (i, v) in batch.pixel_values[hf.len()..].iter().enumerate() {
        let c = (i % 1176) / 392;
        let want = (1.0 - cfg.image_mean[c]) / cfg.image_std[c];
        assert!(
            (v - want).abs() < 1e-5,
            "white row value {i}: {v} vs {want}"
        );
    }
}

fn real_tokenizer() -> QoqTokenizer {
    QoqTokenizer::from_file(&cache_file("tokenizer/tokenizer.json")).unwrap()
}

fn real_config() -> QwenVlConfig {
    // Token ids of a QoQ-Med config.json are the defaults plus time_series_token_id (spec §3.3).
    let mut v = read_json(&fixtures().join("tiny_model/config.json"));
    let obj = v.as_object_mut().unwrap();
    for k in [
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "vision_token_id",
        "bos_token_id",
        "eos_token_id",
    ] {
        obj.remove(k);
    }
    obj.insert("time_series_token_id".into(), 151665.into());
    serde_json::from_value(v).unwrap()
}

#[test]
fn real_tokenizer_has_the_qwen25_vl_and_qoq_ids() {
    let t = real_tokenizer();
    let ids = t.ids;
    assert_eq!(
        (ids.endoftext, ids.im_start, ids.im_end),
        (151643, 151644, 151645)
    );
    assert_eq!((ids.vision_start, ids.vision_end), (151652, 151653));
    assert_eq!((ids.image_pad, ids.video_pad), (151655, 151656));
    assert_eq!(t.token_to_id("<|file_sep|>"), Some(151664));
    assert_eq!(ids.time_series_pad, 151665);
    // Qwen3's own 151665+ tokens are gone.
    assert_eq!(t.token_to_id("<think>"), None);
    // Spec §3.3 regression prefix ([DEV] tests/test_dataset.py).
    let p = qoq_processor::prompt::PromptBuilder::with_defaults(false).unwrap();
    let ids = t
        .encode(&p.prompt("<image>\nAbove", true).unwrap())
        .unwrap();
    assert_eq!(
        ids[..16],
        [
            151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198,
            151652, 151655
        ]
    );
}

#[test]
fn real_tokenizer_cases_match_hf_processor_and_rope_index() {
    let cases = read_json(&fixtures().join("real_cases.json"));
    let make = |fmt: bool| {
        let opts = ProcessorOptions {
            format_prompt: fmt.then(|| ProcessorOptions::default().format_prompt.unwrap()),
            ..ProcessorOptions::default()
        };
        let pp =
            PreprocessorConfig::from_file(&fixtures().join("tiny_model/preprocessor_config.json"))
                .unwrap();
        Processor::new(real_tokenizer(), &real_config(), pp, opts).unwrap()
    };
    let r = &cases["dataset_resize"];
    let resize = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
    check_cases(&cases, &make, Some(resize));
}

#[test]
fn llama_cpp_qwen2_vocab_strings_tokenize_to_their_ids() {
    let t = real_tokenizer();
    let inp = std::fs::read_to_string(cache_file("tokenizer/ggml-vocab-qwen2.gguf.inp")).unwrap();
    let out = std::fs::read_to_string(cache_file("tokenizer/ggml-vocab-qwen2.gguf.out")).unwrap();
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    assert_eq!(texts.pop(), Some(""), "the input ends with a separator");
    let want: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), want.len());
    assert!(texts.len() >= 40);
    for (i, (text, ids)) in texts.iter().zip(&want).enumerate() {
        assert_eq!(&t.encode(text).unwrap(), ids, "string {i}: {text:?}");
    }
}

#[test]
fn video_frames_pair_up_as_in_hf_video_path() {
    let bytes = std::fs::read(fixtures().join("image_parity.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let proc = ImageProcessor::new(PreprocessorConfig::default());
    let g = load_png("gen_70x50.png");
    let frames = [
        g.clone(),
        image::imageops::flip_horizontal(&g),
        image::imageops::flip_vertical(&g),
    ];
    let v = proc.preprocess_frames(&frames).unwrap();
    let grid: Vec<usize> = i64s(&st, "video3.grid")
        .iter()
        .map(|&x| x as usize)
        .collect();
    assert_eq!(v.grid_thw.to_vec(), grid);
    let (max, _) = diff(&v.pixel_values, &f32s(&st, "video3.fast"));
    assert!(max < FAST_TOL, "max {max}");
}

#[test]
fn rope_index_matches_hf_with_videos_seconds_and_left_padding() {
    use qoq_processor::rope::{RopeIndexConfig, get_rope_index};
    let case = &read_json(&fixtures().join("real_cases.json"))["rope_video"];
    let rows =
        |k: &str| -> Vec<Vec<u32>> { case[k].as_array().unwrap().iter().map(u32s).collect() };
    let cfg = RopeIndexConfig {
        image_token_id: 151655,
        video_token_id: 151656,
        vision_start_token_id: 151652,
        spatial_merge_size: 2,
        tokens_per_second: 2.0,
    };
    let secs: Vec<f64> = case["second_per_grid_ts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let r = get_rope_index(
        &cfg,
        &rows("input_ids"),
        Some(&rows("attention_mask")),
        &grids(&case["image_grid_thw"]),
        &grids(&case["video_grid_thw"]),
        &secs,
    )
    .unwrap();
    let want: Vec<i64> = case["position_ids"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|axis| axis.as_array().unwrap().iter())
        .flat_map(|row| row.as_array().unwrap().iter())
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(r.to_axis_major(), want);
    let deltas: Vec<i64> = case["rope_deltas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(r.deltas, deltas);
}
