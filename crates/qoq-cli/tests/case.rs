//! Inference sees what training saw (issue 17). For the same case (an image, a volume, a
//! multi-frame DICOM, an ECG alone, an image with an ECG, text alone), the manifest path
//! (`qoq process`, the trainer's `process_sample` call on the equivalent row), `qoq infer`,
//! `qoq serve` and `qoq eval --model` produce identical input ids, pixel values and ECG inputs,
//! compared as processed tensors (each command's hidden `--dump-inputs`). The model folder
//! carries non-default processor settings (`qoq_processor.json`), so the tensors agree only if
//! every command uses them. And `qoq infer --ecg` alone answers on a WFDB record and on the real
//! DICOM ECG.

use base64::Engine as _;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod support;

use support::{cache, repo, tiny_model};

fn qoq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
}

fn ok(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn mini(rel: &str) -> PathBuf {
    repo().join("examples/mini").join(rel)
}

/// Dataset-side pixel limits unlike the defaults (65,536 / 524,288): the 160 x 128 chest X-ray
/// is upscaled to 223 x 178 with them and to 286 x 228 with the defaults.
const MIN_PX: u64 = 40_000;
const MAX_PX: u64 = 90_000;

/// The tiny model with `qoq_processor.json` holding [`MIN_PX`] / [`MAX_PX`].
fn model_with_settings(dir: &Path) -> PathBuf {
    let model = tiny_model(dir);
    let opts = qoq_processor::ProcessorOptions {
        dataset_min_pixels: MIN_PX,
        dataset_max_pixels: MAX_PX,
        missing_files_as_placeholders: false,
        ..Default::default()
    };
    opts.write_to_model_dir(&model).unwrap();
    model
}

/// The tensors compared, by name, from a `qoq process`-layout safetensors file.
fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    [
        "input_ids",
        "position_ids",
        "pixel_values",
        "image_grid_thw",
        "time_series_data",
    ]
    .iter()
    .map(|n| {
        let t = st
            .tensor(n)
            .unwrap_or_else(|e| panic!("{}: {n}: {e}", path.display()));
        (n.to_string(), t.shape().to_vec(), t.data().to_vec())
    })
    .collect()
}

fn assert_same_tensors(a: &Path, b: &Path, what: &str) {
    for ((name, sa, da), (_, sb, db)) in tensors(a).into_iter().zip(tensors(b)) {
        assert_eq!(sa, sb, "{what}: {name} shape");
        assert!(da == db, "{what}: {name} values differ");
    }
}

fn image_pads(path: &Path) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("image_grid_thw").unwrap().shape()[0]
}

fn serve(model: &Path, dump: &Path) -> support::Server {
    let args: [&std::ffi::OsStr; 4] = [
        "--max-tokens-cap".as_ref(),
        "1".as_ref(),
        "--dump-inputs".as_ref(),
        dump.as_os_str(),
    ];
    support::spawn_serve(model, &args, Stdio::inherit())
}

fn post(addr: &str, body: &Value) -> u16 {
    support::post_chat(addr, body).0
}

fn data_uri(path: &Path) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
    )
}

/// The WFDB record as the `.npy` (12 x samples, f4, standard lead order) a client would send.
fn npy_of_record(hea: &Path) -> (Vec<u8>, f64) {
    let sig = qoq_data::ecg_io::load_ecg(hea, &Default::default()).unwrap();
    let standard: Vec<String> = qoq_data::ecg_io::STANDARD_LEADS
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        sig.leads, standard,
        "the record must hold the 12 standard leads in order"
    );
    let (leads, n) = (sig.data.len(), sig.data[0].len());
    let values: Vec<f32> = sig.data.iter().flatten().copied().collect();
    let out = qoq_data::npy::encode_f32(&[leads, n], &values);
    (out, sig.fs)
}

/// One case: its manifest row (absolute paths), the infer arguments, the serve content parts.
struct Case {
    name: &'static str,
    row: Option<Value>,
    infer: Vec<std::ffi::OsString>,
    serve: Option<Value>,
    /// Image placeholders the prompt must hold.
    images: usize,
}

fn cases() -> Vec<Case> {
    let png = mini("chest_xray/demo-cxr/case_000.png");
    let vol = mini("ct/demo-ct/vol_002.nii.gz");
    let dcm = cache("dicom/SC_rgb_2frame.dcm");
    let hea = mini("ecg/demo-ecg/rec_003.hea");
    let (npy, fs) = npy_of_record(&hea);
    let ecg_part = json!({"type": "input_ecg", "input_ecg": {
        "data": base64::engine::general_purpose::STANDARD.encode(npy), "format": "npy", "fs": fs}});
    let img_part = json!({"type": "image_url", "image_url": {"url": data_uri(&png)}});
    let text = |t: &str| json!({"type": "text", "text": t});
    let os = |v: &[&dyn AsRef<std::ffi::OsStr>]| -> Vec<std::ffi::OsString> {
        v.iter().map(|s| s.as_ref().to_os_string()).collect()
    };
    let q = "What is the diagnosis?";
    vec![
        Case {
            name: "image",
            row: Some(json!({"problem": q, "answer": "x", "images": [png]})),
            infer: os(&[&"--image", &png, &q]),
            serve: Some(json!([img_part, text(q)])),
            images: 1,
        },
        Case {
            name: "volume",
            row: Some(json!({"problem": q, "answer": "x", "images": [], "videos": [vol]})),
            infer: os(&[&"--image", &vol, &q]),
            serve: None,
            images: 2,
        },
        Case {
            name: "multi-frame DICOM",
            row: Some(json!({"problem": q, "answer": "x", "images": [dcm]})),
            infer: os(&[&"--dicom", &dcm, &q]),
            serve: None,
            images: 2,
        },
        Case {
            name: "ECG alone",
            row: Some(json!({"problem": q, "answer": "x", "images": [],
                "time-series": [hea], "dataset": "demo-ecg"})),
            infer: os(&[&"--ecg", &hea, &q]),
            serve: Some(json!([text(q), ecg_part])),
            images: 1,
        },
        Case {
            name: "image + ECG",
            row: Some(json!({"problem": q, "answer": "x", "images": [png],
                "time-series": [hea]})),
            infer: os(&[&"--image", &png, &"--ecg", &hea, &q]),
            serve: Some(json!([img_part, text(q), ecg_part])),
            images: 1,
        },
        Case {
            name: "text alone",
            // A manifest refuses a row without any input ("No modality found.").
            row: None,
            infer: os(&[&q]),
            serve: Some(json!([text(q)])),
            images: 1,
        },
    ]
}

#[test]
fn every_command_builds_the_inputs_the_manifest_path_builds() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_with_settings(dir.path());
    let serve_dump = dir.path().join("serve");
    let srv = serve(&model, &serve_dump);
    let mut served = 0;
    for (k, c) in cases().into_iter().enumerate() {
        let case_dir = dir.path().join(format!("case{k}"));
        std::fs::create_dir_all(&case_dir).unwrap();
        // qoq infer
        let infer = case_dir.join("infer.safetensors");
        ok(
            qoq()
                .arg("infer")
                .arg("--model")
                .arg(&model)
                .arg("--dump-inputs")
                .arg(&infer)
                .args(&c.infer)
                .output()
                .unwrap(),
            &format!("{}: qoq infer", c.name),
        );
        assert_eq!(image_pads(&infer), c.images, "{}: images", c.name);
        // qoq serve
        if let Some(parts) = &c.serve {
            let st = post(
                &srv.addr,
                &json!({"messages": [{"role": "user", "content": parts}], "temperature": 0}),
            );
            assert_eq!(st, 200, "{}: qoq serve", c.name);
            let dumped = serve_dump.join(format!("request-{served}.safetensors"));
            served += 1;
            assert_same_tensors(&infer, &dumped, &format!("{}: serve vs infer", c.name));
        }
        let Some(row) = &c.row else { continue };
        let manifest = case_dir.join("m.jsonl");
        // absolute paths name no domain: the row carries its keys (docs/manifest.md)
        let mut row = row.clone();
        for key in ["data_source", "dataset"] {
            if row.get(key).is_none() {
                row[key] = Value::from("case");
            }
        }
        std::fs::write(&manifest, format!("{row}\n")).unwrap();
        // The manifest path with the settings given as flags.
        let processed = case_dir.join("process.safetensors");
        ok(
            qoq()
                .arg("process")
                .arg("--model")
                .arg(&model)
                .arg("--input")
                .arg(&manifest)
                .arg("--out")
                .arg(&processed)
                .args(["--strict-files", "--min-pixels"])
                .arg(MIN_PX.to_string())
                .arg("--max-pixels")
                .arg(MAX_PX.to_string())
                .output()
                .unwrap(),
            &format!("{}: qoq process", c.name),
        );
        assert_same_tensors(
            &processed,
            &infer,
            &format!("{}: infer vs manifest", c.name),
        );
        // qoq eval --model
        let eval_dump = case_dir.join("eval");
        ok(
            qoq()
                .arg("eval")
                .arg("--model")
                .arg(&model)
                .arg("--data")
                .arg(&manifest)
                .arg("--out")
                .arg(case_dir.join("run"))
                .args(["--max-new-tokens", "1", "--temperature", "0"])
                .arg("--dump-inputs")
                .arg(&eval_dump)
                .output()
                .unwrap(),
            &format!("{}: qoq eval", c.name),
        );
        assert_same_tensors(
            &processed,
            &eval_dump.join("m:1.safetensors"),
            &format!("{}: eval vs manifest", c.name),
        );
    }
    assert_eq!(served, 4);
}

#[test]
fn without_the_settings_file_the_defaults_apply_and_the_inputs_differ() {
    let dir = tempfile::tempdir().unwrap();
    let with = model_with_settings(&dir.path().join("a"));
    let without = tiny_model(&dir.path().join("b"));
    let png = mini("chest_xray/demo-cxr/case_000.png");
    let dump = |model: &Path, out: &str| {
        let p = dir.path().join(out);
        ok(
            qoq()
                .arg("infer")
                .arg("--model")
                .arg(model)
                .arg("--dump-inputs")
                .arg(&p)
                .arg("--image")
                .arg(&png)
                .arg("q")
                .output()
                .unwrap(),
            "qoq infer",
        );
        tensors(&p)
    };
    let (a, b) = (dump(&with, "a.st"), dump(&without, "b.st"));
    // pixel_values: the 223 x 178 image (the model's settings) vs the 286 x 228 one (defaults).
    assert_ne!(a[2].1, b[2].1, "pixel_values shapes");
}

fn infer_answers(extra: &[&std::ffi::OsStr]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let o = ok(
        qoq()
            .arg("infer")
            .arg("--model")
            .arg(&model)
            .args(["--max-new-tokens", "4", "--temperature", "0", "--quiet"])
            .args(extra)
            .output()
            .unwrap(),
        "qoq infer",
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("=== answer ==="), "{out}");
    out
}

#[test]
fn infer_answers_an_ecg_alone_from_a_wfdb_record() {
    // Failed before the case builder: "the prompt has 0 image placeholders but the sample has
    // 1 images".
    let hea = mini("ecg/demo-ecg/rec_003.hea");
    let out = infer_answers(&[
        "--ecg".as_ref(),
        hea.as_os_str(),
        "What is the rhythm?".as_ref(),
    ]);
    // The placeholder image is the one the model saw.
    assert!(out.contains("in the 224x224 image the model saw"), "{out}");
}

#[test]
fn infer_answers_an_ecg_alone_from_the_real_dicom_ecg() {
    let dcm = cache("ecg/waveform_ecg.dcm");
    infer_answers(&[
        "--ecg".as_ref(),
        dcm.as_os_str(),
        "What is the rhythm?".as_ref(),
    ]);
}

#[test]
fn infer_answers_on_a_volume_given_as_an_image() {
    // Failed before: "the prompt has 1 image placeholders but the sample has 2 images".
    let vol = mini("ct/demo-ct/vol_002.nii.gz");
    infer_answers(&[
        "--image".as_ref(),
        vol.as_os_str(),
        "What abnormality is present in the chest CT?".as_ref(),
    ]);
}
