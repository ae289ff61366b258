//! Helpers shared by the CLI tests: the repository root, the fetched test-data cache, and a tiny
//! random model folder built from the processor fixture (config, preprocessor config, tokenizer).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A file of the test-data cache (`$QOQ_TESTDATA` or `<repo>/.testdata`); fails, naming the
/// fetch script, when it is missing.
pub fn cache(rel: &str) -> PathBuf {
    let root = match std::env::var_os("QOQ_TESTDATA") {
        Some(p) => PathBuf::from(p),
        None => repo().join(".testdata"),
    };
    let p = root.join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-testdata.sh first",
        p.display()
    );
    p
}

/// `dir/model`: the processor fixture's files plus deterministic random weights for its config.
pub fn tiny_model(dir: &Path) -> PathBuf {
    tiny_model_with(dir, true)
}

/// As [`tiny_model`]; without `ecg` the config loses its `time_series_token_id` (a stock
/// Qwen2.5-VL checkpoint: no ECG encoder).
pub fn tiny_model_with(dir: &Path, ecg: bool) -> PathBuf {
    let src = repo().join("crates/qoq-processor/tests/fixtures/tiny_model");
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    if !ecg {
        cfg.as_object_mut().unwrap().remove("time_series_token_id");
    }
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    let parsed = qoq_core::hf_config::QwenVlConfig::from_file(&m.join("config.json")).unwrap();
    assert_eq!(parsed.has_time_series(), ecg);
    qoq_model::train::write_random_checkpoint(&parsed, &m).unwrap();
    // The weights writer saves the parsed config; keep the fixture's own text.
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    for f in ["preprocessor_config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), m.join(f)).unwrap();
    }
    m
}
