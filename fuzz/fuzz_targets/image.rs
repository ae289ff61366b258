//! Fuzz target: 2D images through `qoq_data::vision::load_images` and `load_mask`; the first
//! byte picks the extension (PNG, JPEG, BMP, TIFF, WebP, GIF), the rest is the file.
//! Seeds: `.testdata/images/retina.jpg` and PNGs of the DICOM frames (see fuzz/README.md).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use qoq_data::vision::{ImageLoadOptions, load_images, load_mask};

const EXT: [&str; 6] = ["png", "jpg", "bmp", "tiff", "webp", "gif"];

fuzz_target!(|data: &[u8]| {
    let Some((&k, file)) = data.split_first() else {
        return;
    };
    let p = common::write(&format!("i.{}", EXT[k as usize % EXT.len()]), file);
    let r = load_images(&p, &ImageLoadOptions::default());
    common::judge(&r);
    if k >= 128 {
        let m = load_mask(&p, (16, 12), false);
        common::judge(&m);
    }
});
