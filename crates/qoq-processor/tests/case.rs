//! The case builder: a case given directly (as `qoq infer` gives it: files; as `qoq serve`
//! gives it: decoded images and an ECG signal) is processed exactly as the equivalent manifest
//! row is on the trainer's path (`parse_row` then `Processor::process_sample`): same input ids,
//! pixel values and ECG input, for an image, a volume, a multi-frame DICOM, an ECG alone, an
//! image with an ECG, and text alone. Inputs: `examples/mini/` and the test-data cache (the
//! multi-frame DICOM; `scripts/fetch-testdata.sh`).

use qoq_core::{ClinicalSample, Domain};
use qoq_data::manifest::{ManifestConfig, parse_row};
use qoq_processor::{
    Case, CaseEcg, CaseImage, ProcessedSample, Processor, ProcessorOptions, QoqTokenizer,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mini() -> PathBuf {
    repo().join("examples/mini")
}

fn cache(rel: &str) -> PathBuf {
    let root = std::env::var_os("QOQ_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".testdata"));
    let p = root.join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-testdata.sh first",
        p.display()
    );
    p
}

fn processor(opts: ProcessorOptions) -> Processor {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_model");
    let tok = QoqTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let cfg = qoq_core::hf_config::QwenVlConfig::from_file(&dir.join("config.json")).unwrap();
    assert!(cfg.has_time_series());
    let opts = ProcessorOptions {
        missing_files_as_placeholders: false,
        ..opts
    };
    Processor::new(tok, &cfg, Default::default(), opts).unwrap()
}

/// The trainer's path: a manifest row (paths relative to `base`) decoded by `parse_row`, then
/// `process_sample`.
fn manifest_path(p: &Processor, row: Value, base: &Path) -> (ClinicalSample, ProcessedSample) {
    let cfg = ManifestConfig {
        video_frames: p.opts.image_load.video_frames,
        ..ManifestConfig::default()
    };
    let s = parse_row(row, &cfg, base, "m", 1).unwrap();
    let out = p.process_sample(&s).unwrap();
    (s, out)
}

fn assert_same(a: &ProcessedSample, b: &ProcessedSample, what: &str) {
    assert_eq!(a.input_ids, b.input_ids, "{what}: input ids");
    assert_eq!(a.raw_prompt_ids, b.raw_prompt_ids, "{what}: raw prompt ids");
    assert_eq!(a.image_grid_thw, b.image_grid_thw, "{what}: grids");
    assert!(a.pixel_values == b.pixel_values, "{what}: pixel values");
    assert!(a.time_series == b.time_series, "{what}: ECG input");
    assert_eq!(a.prompt, b.prompt, "{what}: prompt");
}

fn pads(p: &Processor, s: &ProcessedSample) -> (usize, usize) {
    let ids = p.tokenizer.ids;
    let count = |t: u32| s.raw_prompt_ids.iter().filter(|&&x| x == t).count();
    (count(ids.image_pad), count(ids.time_series_pad))
}

fn file_case(question: &str, images: &[PathBuf], ecg: Option<&Path>) -> Case {
    Case {
        id: "m:1".into(),
        question: question.into(),
        images: images.iter().cloned().map(CaseImage::File).collect(),
        ecg: ecg.map(|p| CaseEcg::File(p.to_path_buf())),
        ..Case::default()
    }
}

/// The same case with every input in memory, as the server holds it.
fn in_memory(case: &Case, p: &Processor) -> Case {
    let mut c = case.clone();
    c.images = case
        .images
        .iter()
        .map(|i| match i {
            CaseImage::File(path) => CaseImage::Decoded(image::open(path).unwrap()),
            other => other.clone(),
        })
        .collect();
    c.ecg = case.ecg.as_ref().map(|e| match e {
        CaseEcg::File(path) => {
            CaseEcg::Signal(qoq_data::ecg_io::load_ecg(path, &p.opts.ecg_load).unwrap())
        }
        other => other.clone(),
    });
    c
}

#[test]
fn an_image_case_is_processed_as_its_manifest_row_from_files_and_from_memory() {
    let p = processor(ProcessorOptions::default());
    let rel = "chest_xray/demo-cxr/case_000.png";
    let (sample, want) = manifest_path(
        &p,
        json!({"problem": "What is the diagnosis?", "answer": "", "images": [rel]}),
        &mini(),
    );
    let case = file_case("What is the diagnosis?", &[mini().join(rel)], None);
    let built = case.to_sample(2).unwrap();
    assert_eq!(
        (&built.problem, &built.images, &built.system),
        (&sample.problem, &sample.images, &sample.system)
    );
    assert_same(&p.process_case(&case).unwrap(), &want, "image from a file");
    assert_same(
        &p.process_case(&in_memory(&case, &p)).unwrap(),
        &want,
        "decoded image",
    );
    assert_eq!(pads(&p, &want), (1, 1));
}

#[test]
fn an_ecg_only_case_gets_the_placeholder_image_and_the_time_series_token_as_training_does() {
    let p = processor(ProcessorOptions::default());
    let rel = "ecg/demo-ecg/rec_003.hea";
    let (sample, want) = manifest_path(
        &p,
        json!({"problem": "What is the rhythm?", "answer": "", "images": [],
            "time-series": [rel], "dataset": "demo-ecg"}),
        &mini(),
    );
    assert_eq!(sample.data_source, Domain::Ecg);
    let case = file_case("What is the rhythm?", &[], Some(&mini().join(rel)));
    let built = case.to_sample(2).unwrap();
    assert_eq!(built.problem, "<image> What is the rhythm?");
    assert_eq!(built.problem, sample.problem);
    assert_eq!(built.data_source, Domain::Ecg);
    let got = p.process_case(&case).unwrap();
    assert_same(&got, &want, "ECG file");
    assert_same(
        &p.process_case(&in_memory(&case, &p)).unwrap(),
        &want,
        "ECG signal",
    );
    // One placeholder image of 224 x 224 (not resized), one time-series token, a real ECG.
    assert_eq!(pads(&p, &got), (1, 1));
    assert_eq!(got.image_sizes, vec![(224, 224)]);
    assert!(got.time_series.as_ref().unwrap().iter().any(|&v| v != 0.0));
}

#[test]
fn the_real_dicom_ecg_alone_is_processed_as_its_manifest_row() {
    let p = processor(ProcessorOptions::default());
    let ecg = cache("ecg/waveform_ecg.dcm");
    let (_, want) = manifest_path(
        &p,
        json!({"problem": "Rhythm?", "answer": "", "time-series": [ecg], "dataset": "d"}),
        Path::new("/"),
    );
    let case = file_case("Rhythm?", &[], Some(&ecg));
    assert_same(&p.process_case(&case).unwrap(), &want, "DICOM ECG");
    assert_same(
        &p.process_case(&in_memory(&case, &p)).unwrap(),
        &want,
        "DICOM ECG signal",
    );
}

#[test]
fn an_image_with_an_ecg_is_processed_as_its_manifest_row() {
    let p = processor(ProcessorOptions::default());
    let (img, ecg) = (
        "chest_xray/demo-cxr/case_000.png",
        "ecg/demo-ecg/rec_003.hea",
    );
    let (_, want) = manifest_path(
        &p,
        json!({"problem": "<image>\nFindings?", "answer": "", "images": [img],
            "time-series": [ecg]}),
        &mini(),
    );
    let case = file_case(
        "<image>\nFindings?",
        &[mini().join(img)],
        Some(&mini().join(ecg)),
    );
    assert_same(&p.process_case(&case).unwrap(), &want, "image + ECG");
    assert_same(
        &p.process_case(&in_memory(&case, &p)).unwrap(),
        &want,
        "decoded image + ECG signal",
    );
}

#[test]
fn a_volume_becomes_its_frames_with_one_placeholder_each() {
    for frames in [2, 4] {
        let mut opts = ProcessorOptions::default();
        opts.image_load.video_frames = frames;
        let p = processor(opts);
        let rel = "ct/demo-ct/vol_002.nii.gz";
        let (sample, want) = manifest_path(
            &p,
            json!({"problem": "Is there a lesion?", "answer": "", "images": [],
                "videos": [rel]}),
            &mini(),
        );
        // `qoq infer --image vol.nii.gz` lists the volume as training manifests do.
        let case = file_case("Is there a lesion?", &[mini().join(rel)], None);
        let built = case.to_sample(frames).unwrap();
        assert_eq!(built.videos, sample.videos);
        assert!(built.images.is_empty());
        let got = p.process_case(&case).unwrap();
        assert_same(&got, &want, "volume");
        assert_eq!(pads(&p, &got), (frames, 1), "{frames} frames");
        assert_eq!(got.image_grid_thw.len(), frames);
    }
}

#[test]
fn a_multi_frame_dicom_gets_one_placeholder_per_frame_on_every_path() {
    let p = processor(ProcessorOptions::default());
    let dcm = cache("dicom/SC_rgb_2frame.dcm");
    let n = qoq_data::vision::load_images(&dcm, &p.opts.image_load)
        .unwrap()
        .len();
    assert_eq!(n, 2);
    // The manifest path counted one image per path and the processor refused the second frame
    // before the builder; now the frames read set the placeholders on every path.
    let (_, want) = manifest_path(
        &p,
        json!({"problem": "What is shown?", "answer": "", "images": [dcm],
            "data_source": "case", "dataset": "case"}),
        Path::new("/"),
    );
    assert_eq!(pads(&p, &want), (2, 1));
    let case = file_case("What is shown?", std::slice::from_ref(&dcm), None);
    assert_same(&p.process_case(&case).unwrap(), &want, "multi-frame DICOM");
}

#[test]
fn a_text_only_case_has_the_shape_of_an_ecg_only_row_with_a_zero_ecg() {
    let p = processor(ProcessorOptions::default());
    let text = p.process_case(&Case::new("t", "What is QoQ?")).unwrap();
    assert_eq!(pads(&p, &text), (1, 1));
    assert_eq!(text.image_sizes, vec![(224, 224)]);
    assert!(text.time_series.as_ref().unwrap().iter().all(|&v| v == 0.0));
    // The same prompt and placeholder image as the ECG-only manifest row of that question.
    let (_, ecg_row) = manifest_path(
        &p,
        json!({"problem": "What is QoQ?", "answer": "", "time-series": ["ecg/demo-ecg/rec_003.hea"],
            "dataset": "d"}),
        &mini(),
    );
    assert_eq!(text.input_ids, ecg_row.input_ids);
    assert!(text.pixel_values == ecg_row.pixel_values);
    // A manifest refuses such a row, as the reference does; the builder does not.
    assert_eq!(
        parse_row(
            json!({"problem": "q", "answer": ""}),
            &ManifestConfig::default(),
            Path::new("."),
            "m",
            1
        )
        .unwrap_err(),
        "No modality found."
    );
}

#[test]
fn options_and_a_system_message_are_those_of_the_equivalent_row() {
    let p = processor(ProcessorOptions::default());
    let rel = "derm/demo-derm/case_001.png";
    let (sample, want) = manifest_path(
        &p,
        json!({"problem": "What is the diagnosis?Answer with one of the following:\nbenign\nmalignant",
            "answer": "", "images": [rel], "system": "You are a dermatologist."}),
        &mini(),
    );
    assert_eq!(sample.system.as_deref(), Some("You are a dermatologist."));
    let mut case = file_case("What is the diagnosis?", &[mini().join(rel)], None);
    case.options = vec!["benign".into(), "malignant".into()];
    case.system = Some("You are a dermatologist.".into());
    let got = p.process_case(&case).unwrap();
    assert_same(&got, &want, "options + system");
    assert!(got.prompt.contains("You are a dermatologist."));
    assert!(!got.prompt.contains("helpful assistant"));
}

#[test]
fn a_case_in_memory_has_no_manifest_row_and_bad_placeholders_are_named() {
    let p = processor(ProcessorOptions::default());
    let mut case = Case::new("c7", "<image><image> two?");
    case.images = vec![CaseImage::Decoded(image::DynamicImage::new_rgb8(64, 64))];
    let e = case.to_sample(2).unwrap_err().to_string();
    assert!(
        e.contains("case c7") && e.contains("no manifest row"),
        "{e}"
    );
    let e = p.process_case(&case).unwrap_err().to_string();
    assert!(
        e.contains("case c7") && e.contains("2 <image> placeholders"),
        "{e}"
    );
}
