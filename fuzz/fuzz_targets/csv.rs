//! Fuzz target: CSV ECGs through `qoq_data::ecg_io::load_ecg` and the model input.
//! Seed: a CSV written from `.testdata/ecg/ecg.dat` (see fuzz/README.md).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use qoq_data::ecg::{EcgConvention, to_model_input};
use qoq_data::ecg_io::{EcgLoadOptions, load_ecg};

fuzz_target!(|data: &[u8]| {
    let p = common::write("e.csv", data);
    let r = load_ecg(&p, &EcgLoadOptions::default());
    common::judge(&r);
    if let Ok(sig) = r {
        for c in [EcgConvention::EcgJepa, EcgConvention::Reference] {
            let _ = to_model_input(&sig, c, true);
        }
    }
});
