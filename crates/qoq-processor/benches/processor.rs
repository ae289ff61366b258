//! Processor throughput (images/s, ECGs/s), the workload of tools/bench/processor_ref.py:
//! * images: decode the file, dataset-side resize (65,536..524,288 pixels, NEAREST), then the
//!   whole sample through the processor (QoQ format prompt, chat template, tokenisation with
//!   the real Qwen tokenizer, smart_resize, bicubic, normalisation, patches); the files are
//!   skimage's retina.jpg (1411×1411, from scripts/fetch-testdata.sh) and the three committed
//!   fixture PNGs, cycled;
//! * ECGs: examples/mini's WFDB record (12 leads, 500 Hz, 10 s) read and turned into the
//!   (8, 2500) input under the ECG-JEPA convention (FFT resampling).
//!
//! Run: `cargo bench -p qoq-processor --bench processor` (`BENCH_ROUNDS`, default 25, rounds
//! over the 4 images; `PROCESSOR_REF_JSON=/tmp/ref.json` adds the ratio to the Python
//! reference's output of `python3 tools/bench/processor_ref.py --out /tmp/ref.json`).
//! `seconds_decode_resize_process` splits the image time into file decoding, the dataset-side
//! resize and the processor; `BENCH_PROBE=1` also times the retina's bicubic resize, patch
//! flattening and prompt + tokenisation separately. Compare single-threaded runs
//! (`RAYON_NUM_THREADS=1` here, `--threads 1` there) as well as default ones: on a small loaded
//! machine torch's thread pool can cost the reference several times its single-thread speed.

use image::DynamicImage;
use qoq_core::hf_config::{PreprocessorConfig, QwenVlConfig};
use qoq_data::ecg::EcgConvention;
use qoq_data::ecg_io::EcgLoadOptions;
use qoq_processor::{Processor, ProcessorOptions, QoqTokenizer};
use std::path::{Path, PathBuf};
use std::time::Instant;

const QUESTION: &str = "<image>\nAbove is a fundus photograph of a patient. What is the diagnosis?\
                        Answer with one of the following:\nNormal\nGlaucoma";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cache(rel: &str) -> PathBuf {
    let base =
        std::env::var_os("QOQ_TESTDATA").map_or_else(|| root().join(".testdata"), PathBuf::from);
    let p = base.join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-testdata.sh first",
        p.display()
    );
    p
}

fn main() {
    let fixtures = root().join("crates/qoq-processor/tests/fixtures");
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("tiny_model/config.json")).unwrap(),
    )
    .unwrap();
    let obj = cfg.as_object_mut().unwrap();
    obj.retain(|k, _| !k.ends_with("token_id"));
    obj.insert("time_series_token_id".into(), 151665.into());
    let model: QwenVlConfig = serde_json::from_value(cfg).unwrap();
    let tok = QoqTokenizer::from_file(&cache("tokenizer/tokenizer.json")).unwrap();
    let pp = PreprocessorConfig::default();
    let p = Processor::new(tok, &model, pp, ProcessorOptions::default()).unwrap();

    let files = [
        cache("images/retina.jpg"),
        fixtures.join("images/gen_70x50.png"),
        fixtures.join("images/noise_30x100.png"),
        fixtures.join("images/fundus_60x60.png"),
    ];
    let (mn, mx) = (p.opts.dataset_min_pixels, p.opts.dataset_max_pixels);
    let stage = std::cell::RefCell::new([0f64; 3]);
    let one = |f: &Path| {
        let t0 = Instant::now();
        let img: DynamicImage = image::open(f).unwrap();
        let t1 = Instant::now();
        let img = qoq_data::vision::process_image(&img, mn, mx);
        let t2 = Instant::now();
        let out = p.process_parts("bench", QUESTION, &[img], None).unwrap();
        let mut st = stage.borrow_mut();
        st[0] += (t1 - t0).as_secs_f64();
        st[1] += (t2 - t1).as_secs_f64();
        st[2] += t2.elapsed().as_secs_f64();
        out
    };
    for f in &files {
        one(f); // warm-up
    }
    let start = Instant::now();
    let mut tokens = 0usize;
    for _ in 0..rounds {
        for f in &files {
            tokens += one(f).input_ids.len();
        }
    }
    let img_s = start.elapsed().as_secs_f64();
    let st = *stage.borrow();
    let n_img = rounds * files.len();

    if std::env::var_os("BENCH_PROBE").is_some() {
        let img = image::open(&files[0]).unwrap();
        let img = qoq_data::vision::process_image(&img, mn, mx);
        let (tw, th) = p.image.target_size(img.width(), img.height()).unwrap();
        let t = Instant::now();
        for _ in 0..20 {
            std::hint::black_box(p.image.resize(&img, tw, th).unwrap());
        }
        let r = p.image.resize(&img, tw, th).unwrap();
        let t_resize = t.elapsed().as_secs_f64() / 20.0;
        let t = Instant::now();
        for _ in 0..20 {
            std::hint::black_box(p.image.flatten(std::slice::from_ref(&r)));
        }
        let t_flatten = t.elapsed().as_secs_f64() / 20.0;
        let t = Instant::now();
        for _ in 0..20 {
            let pr = p.prompt.prompt(QUESTION, true).unwrap();
            std::hint::black_box(p.tokenizer.encode(&pr).unwrap());
        }
        let t_text = t.elapsed().as_secs_f64() / 20.0;
        eprintln!(
            "retina {tw}x{th}: resize {t_resize:.4} s, flatten {t_flatten:.4} s, prompt+encode {t_text:.5} s"
        );
    }
    let rec = root().join("examples/mini/ecg/demo-ecg/rec_003.hea");
    let n_ecg = rounds * 20;
    let start = Instant::now();
    for _ in 0..n_ecg {
        let sig = qoq_data::ecg_io::load_ecg(&rec, &EcgLoadOptions::default()).unwrap();
        let x = qoq_data::ecg::to_model_input(&sig, EcgConvention::EcgJepa, false).unwrap();
        assert_eq!(x.len(), 8 * 2500);
    }
    let ecg_s = start.elapsed().as_secs_f64();
    let threads = rayon::current_num_threads();
    let out = serde_json::json!({
        "threads": threads,
        "images": n_img,
        "image_seconds": img_s,
        "images_per_s": n_img as f64 / img_s,
        "tokens": tokens,
        "seconds_decode_resize_process": [st[0], st[1], st[2]],
        "ecgs": n_ecg,
        "ecg_seconds": ecg_s,
        "ecgs_per_s": n_ecg as f64 / ecg_s,
    });
    println!("{out}");
    if let Some(path) = std::env::var_os("PROCESSOR_REF_JSON") {
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ratio = |k: &str| out[k].as_f64().unwrap() / r[k].as_f64().unwrap();
        println!(
            "vs HF reference ({}): images {:.1}x, ECGs {:.1}x (reference tokens {}, ours {tokens})",
            Path::new(&path).display(),
            ratio("images_per_s"),
            ratio("ecgs_per_s"),
            r["tokens"]
        );
    }
}
