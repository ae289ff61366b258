//! No input file can crash a run (issue 24), the processor's part: seeded damaged copies of the
//! cached real files ([`qoq_data::damage`]) through `Processor::process_sample`, the path the
//! trainer and `qoq process` take. Each must end in a processed sample or an error naming the
//! file, within a time bound per file. Without the test-data cache the test prints a notice
//! and passes.

use qoq_core::hf_config::{PreprocessorConfig, QwenVlConfig};
use qoq_data::damage;
use qoq_data::manifest::{Manifest, ManifestConfig};
use qoq_processor::{Processor, ProcessorOptions, QoqTokenizer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

const TIME_LIMIT: Duration = Duration::from_secs(60);

/// The test-data cache, or `None` (with a notice) when it is absent.
fn cache() -> Option<PathBuf> {
    damage::testdata_cache(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

fn processor() -> Processor {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_model");
    let tok = QoqTokenizer::from_file(&tiny.join("tokenizer.json")).unwrap();
    let cfg: QwenVlConfig =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    let mut opts = ProcessorOptions {
        // a damaged file must be an error, not a placeholder
        missing_files_as_placeholders: false,
        ..ProcessorOptions::default()
    };
    // arrays and CSV without a time column carry no sampling frequency: the MIT-BIH rate
    opts.ecg_load.fs = Some(360.0);
    Processor::new(tok, &cfg, PreprocessorConfig::default(), opts).unwrap()
}

#[test]
fn every_damaged_real_file_is_processed_or_refused_naming_it() {
    let Some(cache) = cache() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (files, manifest) = damage::build_corpus(&cache, dir.path(), 12, 24).unwrap();
    let p = Arc::new(processor());
    let m = Manifest::open(&manifest, ManifestConfig::default()).unwrap();
    let (mut ok, mut refused) = (0, 0);
    let started = Instant::now();
    for (row, file) in m.rows().unwrap().zip(&files) {
        let sample = row.unwrap();
        let id = sample.id.to_string();
        let what = format!("{} ({})", file.path.display(), file.damage);
        let (tx, rx) = mpsc::channel();
        let p2 = Arc::clone(&p);
        std::thread::spawn(move || {
            let _ = tx.send(p2.process_sample(&sample).map(|s| s.image_sizes.len()));
        });
        match rx.recv_timeout(TIME_LIMIT) {
            Ok(Ok(n)) => {
                assert!(n > 0, "{what}: processed without an image");
                ok += 1;
            }
            Ok(Err(e)) => {
                let name = file.path.file_name().unwrap().to_string_lossy().to_string();
                // a decoding error names the file; a prompt error (a multi-frame DICOM gives more
                // images than the row's placeholders) names the row
                let e = e.to_string();
                assert!(
                    e.contains(&name) || e.contains(&format!("sample {id}:")),
                    "{what}: the error names neither the file nor the row: {e}"
                );
                refused += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no answer in {TIME_LIMIT:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the processor panicked"),
        }
    }
    eprintln!(
        "{} damaged files through the processor: {ok} processed, {refused} refused naming the file (or, for a prompt error, the row), in {:.1?}",
        files.len(),
        started.elapsed()
    );
    assert!(refused > files.len() / 4);
}
