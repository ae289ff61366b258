//! Fuzz target: DICOM images (every transfer syntax this build decodes: native, deflate, RLE,
//! JPEG baseline / extended / lossless, JPEG 2000) through `qoq_data::dicom::read_image`, the
//! path `qoq data check`, the processor and the trainer take. Seeds: `.testdata/dicom/*.dcm`.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use qoq_data::dicom::{Windowing, read_image};

fuzz_target!(|data: &[u8]| {
    let p = common::write("f.dcm", data);
    let r = read_image(&p, Windowing::FromFile);
    common::judge(&r);
});
