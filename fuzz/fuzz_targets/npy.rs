//! Fuzz target: NumPy arrays (`.npy`; a `.npz` archive when the first byte is odd) through
//! `qoq_data::ecg_io::load_ecg` and the model input.
//! Seeds: crates/qoq-data/tests/fixtures/*.npy / *.npz and `.testdata/ecg/ecg.dat` (an npz).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use qoq_data::ecg::{EcgConvention, to_model_input};
use qoq_data::ecg_io::{EcgLoadOptions, load_ecg};

fuzz_target!(|data: &[u8]| {
    let Some((&k, file)) = data.split_first() else {
        return;
    };
    let name = if k % 2 == 1 { "a.npz" } else { "a.npy" };
    let p = common::write(name, file);
    let opts = EcgLoadOptions {
        fs: Some(if k & 2 == 0 { 500.0 } else { 1e-3 }),
        ..EcgLoadOptions::default()
    };
    let r = load_ecg(&p, &opts);
    common::judge(&r);
    if let Ok(sig) = r {
        for c in [EcgConvention::EcgJepa, EcgConvention::Reference] {
            let _ = to_model_input(&sig, c, false);
        }
    }
});
