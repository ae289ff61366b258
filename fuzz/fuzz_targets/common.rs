//! Shared by the reader targets: inputs are written to a per-process scratch folder (the readers
//! take paths, as `qoq data check` does), and a contained panic is judged by where it happened.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// A scratch folder for this process (tmpfs when there is one).
pub fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("qoq-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// Write `data` to `name` in the scratch folder.
pub fn write(name: &str, data: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// A reader's result: Ok, or an error. A panic of our own code (contained by the boundary, so it
/// is an `Error::DecoderPanic` whose location is in `crates/qoq-*`) is a finding: re-raise it so
/// libFuzzer saves the input. A contained panic of a dependency is printed once per location.
pub fn judge<T>(r: &Result<T, qoq_data::Error>) {
    if let Err(qoq_data::Error::DecoderPanic { message, decoder, .. }) = r {
        if message.contains("crates/qoq-") {
            panic!("a qoq reader panicked ({decoder}): {message}");
        }
        static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
        let at = message.rsplit(" (at ").next().unwrap_or(message).to_string();
        let mut seen = SEEN.lock().unwrap();
        if seen.get_or_insert_with(HashSet::new).insert(at) {
            eprintln!("contained upstream panic ({decoder}): {message}");
        }
    }
}
