//! Fuzz target: WFDB records (`.hea` + `.dat`, formats 16 and 212) through
//! `qoq_data::ecg_io::load_ecg` and the model input. The input is the header, a NUL byte, then
//! the signal file (named `r.dat` in the scratch folder). Seed: examples/mini's rec_003.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use qoq_data::ecg::{EcgConvention, to_model_input};
use qoq_data::ecg_io::{EcgLoadOptions, load_ecg};

fuzz_target!(|data: &[u8]| {
    let (hea, dat) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    common::write("r.dat", dat);
    let p = common::write("r.hea", hea);
    let r = load_ecg(&p, &EcgLoadOptions::default());
    common::judge(&r);
    if let Ok(sig) = r {
        for c in [EcgConvention::EcgJepa, EcgConvention::Reference] {
            let _ = to_model_input(&sig, c, true);
        }
    }
});
