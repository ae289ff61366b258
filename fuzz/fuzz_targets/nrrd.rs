//! Fuzz target: NRRD volumes (raw, gzip, ascii) through `qoq_data::volume::read_volume_frames`.
//! Seeds: `.testdata/volumes/lung1_label.nrrd` (and `lung1_image.nrrd`, cut with -max_len).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = common::write("v.nrrd", data);
    common::judge(&qoq_data::volume::read_volume_frames(&p, 4));
});
