//! Reading a segmentation mask image: a pixel is foreground when any channel is non-zero.

use crate::error::{Error, Result};
use qoq_core::SegMask;
use std::path::Path;

/// Load an image file as a mask (non-zero pixels, any channel, are foreground).
pub fn load_mask_image(path: &Path) -> Result<SegMask> {
    let img = image::open(path).map_err(|e| Error::Mask {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let rgba = img.to_rgba16();
    let (w, h) = rgba.dimensions();
    let data = rgba
        .pixels()
        .map(|p| u8::from(p.0[..3].iter().any(|&c| c > 0)))
        .collect();
    SegMask::new(w as usize, h as usize, data).map_err(|e| Error::Mask {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
