//! The reference's dataset-side image handling (spec §4.1, §4.3): the `process_image` resize,
//! segmentation masks at that resolution, and ground-truth box rescaling.
//!
//! Nearest-neighbour resampling is written here (not `image::imageops`) to follow PIL's
//! `Image.resize(..., NEAREST)` sampling rule, `src = floor((dst + 0.5) * in / out)`, which the
//! reference uses for both images and masks; the parity test pins it against PIL output.
//!
//! [`load_images`] opens what one manifest path yields: a PIL-readable image, every frame of a
//! DICOM image ([`crate::dicom`]), or the sampled frames of a volume ([`crate::volume`]).

use crate::error::{Error, Result};
use image::{DynamicImage, GrayImage, RgbImage};
use qoq_core::SegMask;
use std::path::Path;

/// What decides how non-8-bit sources become images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageLoadOptions {
    /// DICOM VOI windowing.
    pub windowing: crate::dicom::Windowing,
    /// Frames sampled from a volume (the manifest's `video_frames`).
    pub video_frames: usize,
}

impl Default for ImageLoadOptions {
    fn default() -> Self {
        Self {
            windowing: crate::dicom::Windowing::FromFile,
            video_frames: 2,
        }
    }
}

/// Load the images one path yields: DICOM (`.dcm`, or the `DICM` magic) gives every frame,
/// NIfTI / NRRD volumes give `video_frames` sampled slices, anything else is one image decoded
/// by the `image` crate (PNG, JPEG, BMP, TIFF, WebP, GIF, PGM).
///
/// An image with no pixels (a damaged header giving 0 rows, a volume with a size of 0) is an
/// error naming the file, so that later stages never resize an empty image.
pub fn load_images(path: &Path, opts: &ImageLoadOptions) -> Result<Vec<DynamicImage>> {
    let images = load_images_any(path, opts)?;
    if let Some(img) = images.iter().find(|i| i.width() == 0 || i.height() == 0) {
        return Err(Error::file(
            path,
            format!(
                "the image has no pixels ({} x {})",
                img.width(),
                img.height()
            ),
        ));
    }
    Ok(images)
}

fn load_images_any(path: &Path, opts: &ImageLoadOptions) -> Result<Vec<DynamicImage>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if crate::volume::is_volume(path) {
        return crate::volume::read_volume_frames(path, opts.video_frames);
    }
    if ext == "dcm" || ext == "dicom" || crate::dicom::has_dicm_magic(path) {
        return crate::dicom::read_image(path, opts.windowing);
    }
    let img = crate::guard::contain(path, "image", || {
        image::open(path).map_err(|e| Error::file(path, format!("cannot decode image: {e}")))
    })?;
    Ok(vec![img])
}

/// Target size of the reference's `process_image` for a `w x h` image: scale down when above
/// `max_pixels`, then up when below `min_pixels`, truncating with `int()` each time.
pub fn dataset_resize_dims(w: u32, h: u32, min_pixels: u64, max_pixels: u64) -> (u32, u32) {
    let (mut w, mut h) = (w, h);
    let area = |w: u32, h: u32| w as u64 * h as u64;
    if area(w, h) > max_pixels {
        let f = (max_pixels as f64 / area(w, h) as f64).sqrt();
        (w, h) = ((w as f64 * f) as u32, (h as f64 * f) as u32);
    }
    if area(w, h) < min_pixels && area(w, h) > 0 {
        let f = (min_pixels as f64 / area(w, h) as f64).sqrt();
        (w, h) = ((w as f64 * f) as u32, (h as f64 * f) as u32);
    }
    (w.max(1), h.max(1))
}

fn nearest_index(dst: u32, src_len: u32, dst_len: u32) -> u32 {
    let x = ((dst as f64 + 0.5) * src_len as f64 / dst_len as f64).floor() as u32;
    x.min(src_len - 1)
}

/// Nearest-neighbour resize of a single-channel image with PIL's sampling rule.
pub fn resize_nearest_gray(img: &GrayImage, w: u32, h: u32) -> GrayImage {
    let (sw, sh) = img.dimensions();
    GrayImage::from_fn(w, h, |x, y| {
        *img.get_pixel(nearest_index(x, sw, w), nearest_index(y, sh, h))
    })
}

/// Nearest-neighbour resize of an RGB image with PIL's sampling rule.
pub fn resize_nearest_rgb(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (sw, sh) = img.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        *img.get_pixel(nearest_index(x, sw, w), nearest_index(y, sh, h))
    })
}

/// The reference's `process_image`: resize into `[min_pixels, max_pixels]` (NEAREST), then RGB.
pub fn process_image(img: &DynamicImage, min_pixels: u64, max_pixels: u64) -> RgbImage {
    let rgb = img.to_rgb8();
    let (w, h) = dataset_resize_dims(rgb.width(), rgb.height(), min_pixels, max_pixels);
    if (w, h) == rgb.dimensions() {
        rgb
    } else {
        resize_nearest_rgb(&rgb, w, h)
    }
}

/// Width and height of an image file, from its header (no pixel decoding); the error names the
/// file.
pub fn image_dims(path: &Path) -> Result<(u32, u32)> {
    crate::guard::contain(path, "image header", || {
        image::image_dimensions(path)
            .map_err(|e| Error::file(path, format!("cannot read the image size: {e}")))
    })
}

/// Rescale a box given in pixels of a `from = (w0, h0)` image to a `to = (w, h)` image.
pub fn rescale_bbox(bbox: [f64; 4], from: (u32, u32), to: (u32, u32)) -> [f64; 4] {
    let sx = to.0 as f64 / from.0 as f64;
    let sy = to.1 as f64 / from.1 as f64;
    [bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy]
}

/// Load a mask image at the processed image's size `(w, h)`. Colour masks are averaged over
/// their channels (truncated to u8), as the reference does. With `wh_swap_bug` the mask is
/// resized to `(h, w)` instead, reproducing the reference's defect for non-square images
/// (spec §4.3); leave it off unless reproducing the released code.
pub fn load_mask(path: &Path, size: (u32, u32), wh_swap_bug: bool) -> Result<SegMask> {
    let img = crate::guard::contain(path, "mask image", || {
        image::open(path).map_err(|e| Error::file(path, format!("cannot decode mask image: {e}")))
    })?;
    let gray = match &img {
        DynamicImage::ImageLuma8(g) => g.clone(),
        other => {
            let rgb = other.to_rgb8();
            GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                let p = rgb.get_pixel(x, y).0;
                image::Luma([((p[0] as u32 + p[1] as u32 + p[2] as u32) / 3) as u8])
            })
        }
    };
    if gray.width() == 0 || gray.height() == 0 || size.0 == 0 || size.1 == 0 {
        return Err(Error::file(
            path,
            format!(
                "cannot resize a {} x {} mask to {} x {}",
                gray.width(),
                gray.height(),
                size.0,
                size.1
            ),
        ));
    }
    let (w, h) = if wh_swap_bug { (size.1, size.0) } else { size };
    let resized = resize_nearest_gray(&gray, w, h);
    let (w, h) = resized.dimensions();
    SegMask::new(w as usize, h as usize, resized.into_raw())
        .map_err(|e| Error::file(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_dims_follow_the_reference_examples() {
        // CLIMB config: max 524288, min 65536 (spec §4.1)
        assert_eq!(dataset_resize_dims(224, 224, 65_536, 524_288), (256, 256));
        assert_eq!(dataset_resize_dims(1411, 1411, 65_536, 524_288), (724, 724));
        assert_eq!(dataset_resize_dims(512, 512, 65_536, 524_288), (512, 512));
        let (w, h) = dataset_resize_dims(2000, 1000, 65_536, 524_288);
        // Python: int(2000 * sqrt(524288 / 2e6)), int(1000 * ...) = (1024, 512)
        assert_eq!((w, h), (1024, 512));
    }

    #[test]
    fn nearest_resize_matches_pil_sampling() {
        // PIL: Image.fromarray(np.arange(5, dtype=np.uint8)[None] * 10).resize((3, 1), NEAREST)
        // -> [0, 20, 40]; upscaling [0, 10, 20] from 3 to 7 gives [0, 0, 10, 10, 10, 20, 20]
        // (both values printed by Pillow).
        let row = GrayImage::from_raw(5, 1, vec![0, 10, 20, 30, 40]).unwrap();
        assert_eq!(resize_nearest_gray(&row, 3, 1).into_raw(), vec![0, 20, 40]);
        let row = GrayImage::from_raw(3, 1, vec![0, 10, 20]).unwrap();
        assert_eq!(
            resize_nearest_gray(&row, 7, 1).into_raw(),
            vec![0, 0, 10, 10, 10, 20, 20]
        );
    }

    #[test]
    fn masks_load_at_the_processed_size_and_the_swap_is_opt_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.png");
        let mut m = image::RgbImage::new(40, 20);
        for y in 5..10 {
            for x in 10..30 {
                m.put_pixel(x, y, image::Rgb([255, 255, 0]));
            }
        }
        m.save(&path).unwrap();
        let mask = load_mask(&path, (80, 40), false).unwrap();
        assert_eq!((mask.width(), mask.height()), (80, 40));
        assert_eq!(mask.get(40, 15), 170); // (255 + 255 + 0) / 3
        assert_eq!(mask.bbox(), Some([20, 10, 59, 19]));
        let swapped = load_mask(&path, (80, 40), true).unwrap();
        assert_eq!((swapped.width(), swapped.height()), (40, 80));
        assert_eq!(
            rescale_bbox([10.0, 5.0, 30.0, 10.0], (40, 20), (80, 40)),
            [20.0, 10.0, 60.0, 20.0]
        );
        assert!(load_mask(&dir.path().join("none.png"), (4, 4), false).is_err());
    }
}
