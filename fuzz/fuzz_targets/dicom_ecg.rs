//! Fuzz target: DICOM 12-lead ECG waveforms through `qoq_data::dicom::read_ecg`.
//! Seed: `.testdata/ecg/waveform_ecg.dcm`.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = common::write("w.dcm", data);
    let r = qoq_data::dicom::read_ecg(&p, 0);
    common::judge(&r);
});
