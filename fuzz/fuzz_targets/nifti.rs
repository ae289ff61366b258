//! Fuzz target: NIfTI-1/2 volumes (`.nii`; `.nii.gz` when the first byte is odd) through
//! `qoq_data::volume::read_volume_frames` and `read_label_frames`.
//! Seeds: `.testdata/volumes/anatomical.nii`, `example4d.nii.gz` (byte 0 prepended).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use qoq_data::volume::{read_label_frames, read_volume_frames};

fuzz_target!(|data: &[u8]| {
    let Some((&k, file)) = data.split_first() else {
        return;
    };
    let name = if k % 2 == 1 { "v.nii.gz" } else { "v.nii" };
    let p = common::write(name, file);
    common::judge(&read_volume_frames(&p, 4));
    common::judge(&read_label_frames(&p, 2));
});
