//! The Qwen2.5-VL image processor (spec §4.2): transformers 4.51.3
//! `image_processing_qwen2_vl.py::smart_resize` and `Qwen2VLImageProcessor(Fast)._preprocess`.
//!
//! `smart_resize` to multiples of `patch_size * merge_size` (28) inside
//! `[min_pixels, max_pixels]`; antialiased bicubic resize bit-exact with torch's uint8 path that
//! the Fast processor takes ([`resize_bicubic_aa`]; PIL's `BICUBIC` of the slow processor is
//! within one grey level); rescale by 1/255 and CLIP normalisation, fused as
//! `(x - 255·mean) / (255·std)` as the Fast processor does; frames padded to a multiple of
//! `temporal_patch_size` by repeating the last (a single image becomes 2 frames); patches
//! flattened in the order `(t, h/m, w/m, m, m)` × `(C, temporal, patch, patch)`, giving
//! `pixel_values` `[t·h·w, 1176]` and `grid_thw = (t, h, w)` in patches.

use crate::error::{Error, Result};
use image::RgbImage;
use qoq_core::hf_config::PreprocessorConfig;
use rayon::prelude::*;

/// `smart_resize(height, width, factor, min_pixels, max_pixels)`: the `(height, width)` the
/// image is resized to. Python's `round` (ties to even) is reproduced.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height < factor || width < factor {
        return Err(Error::invalid(
            format!("image {width}x{height}"),
            format!("height and width must be at least the factor {factor}"),
        ));
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > 200.0 {
        return Err(Error::invalid(
            format!("image {width}x{height}"),
            format!("absolute aspect ratio must be smaller than 200, got {ratio}"),
        ));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let mut h_bar = (h / f).round_ties_even() as usize * factor;
    let mut w_bar = (w / f).round_ties_even() as usize * factor;
    if h_bar * w_bar > max_pixels {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = (h / beta / f).floor() as usize * factor;
        w_bar = (w / beta / f).floor() as usize * factor;
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    Ok((h_bar, w_bar))
}

/// The antialiased bicubic filter (Keys, a = -0.5) of PIL and torch.
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one axis: per output index, the first input index and its weights.
struct AxisWeights {
    taps: Vec<(usize, Vec<i32>)>,
    precision: u32,
}

/// torch's `_compute_index_ranges_weights` for antialiased bicubic (`align_corners=False`, the
/// same support and centres as PIL's `precompute_coeffs`), then its int16 quantisation: the
/// largest precision (< 22 bits) at which the largest weight still fits in int16.
fn aa_weights(in_size: usize, out_size: usize) -> AxisWeights {
    let scale = in_size as f64 / out_size as f64;
    let (support, invscale) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    let float: Vec<(usize, Vec<f64>)> = (0..out_size)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|j| cubic((j as f64 - center + 0.5) * invscale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (xmin, w)
        })
        .collect();
    let w_max = float
        .iter()
        .flat_map(|(_, w)| w.iter().copied())
        .fold(0f64, f64::max);
    let mut precision = 0u32;
    while precision < 22 {
        if (0.5 + w_max * (1u64 << (precision + 1)) as f64) as i64 >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let one = (1u64 << precision) as f64;
    let taps = float
        .into_iter()
        .map(|(xmin, w)| {
            let q = w
                .iter()
                .map(|&v| {
                    let x = v * one;
                    (if x < 0.0 { x - 0.5 } else { x + 0.5 }) as i32
                })
                .collect();
            (xmin, q)
        })
        .collect();
    AxisWeights { taps, precision }
}

fn clip8(acc: i32, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// Antialiased bicubic resize exactly as torch does it for torchvision's
/// `resize(uint8 image, BICUBIC, antialias=True)` (the Fast processor's path): int16
/// fixed-point weights, the width pass first into a uint8 buffer, then the height pass.
/// PIL's `BICUBIC` (the slow processor) uses 22-bit weights and differs by at most one level.
pub fn resize_bicubic_aa(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (sw, sh) = (img.width() as usize, img.height() as usize);
    let (dw, dh) = (width as usize, height as usize);
    let src = img.as_raw();
    // Width pass: sh rows of dw pixels.
    let wx = aa_weights(sw, dw);
    let half_x = 1i32 << wx.precision.saturating_sub(1);
    let mut tmp = vec![0u8; sh * dw * 3];
    tmp.par_chunks_mut(dw * 3).enumerate().for_each(|(y, row)| {
        let line = &src[y * sw * 3..(y + 1) * sw * 3];
        for ((xmin, w), px) in wx.taps.iter().zip(row.chunks_exact_mut(3)) {
            let (mut a0, mut a1, mut a2) = (half_x, half_x, half_x);
            let window = &line[xmin * 3..(xmin + w.len()) * 3];
            for (p, &wk) in window.chunks_exact(3).zip(w) {
                a0 += p[0] as i32 * wk;
                a1 += p[1] as i32 * wk;
                a2 += p[2] as i32 * wk;
            }
            px[0] = clip8(a0, wx.precision);
            px[1] = clip8(a1, wx.precision);
            px[2] = clip8(a2, wx.precision);
        }
    });
    // Height pass.
    let wy = aa_weights(sh, dh);
    let half_y = 1i32 << wy.precision.saturating_sub(1);
    let mut out = vec![0u8; dh * dw * 3];
    let stride = dw * 3;
    out.par_chunks_mut(stride).enumerate().for_each(|(y, row)| {
        let (ymin, w) = &wy.taps[y];
        let mut acc = vec![half_y; stride];
        for (k, &wk) in w.iter().enumerate() {
            let line = &tmp[(ymin + k) * stride..(ymin + k + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(line) {
                *a += v as i32 * wk;
            }
        }
        for (o, a) in row.iter_mut().zip(acc) {
            *o = clip8(a, wy.precision);
        }
    });
    RgbImage::from_raw(width, height, out).expect("buffer has the image's size")
}

/// One image's (or video's) model input.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionInput {
    /// `[patches, patch_dim]` row-major (`patch_dim` = 3·temporal·patch² = 1176).
    pub pixel_values: Vec<f32>,
    /// `(t, h, w)` in patches.
    pub grid_thw: [usize; 3],
}

impl VisionInput {
    /// Number of patch rows (`t·h·w`).
    pub fn patches(&self) -> usize {
        self.grid_thw.iter().product()
    }
}

/// The Qwen2-VL image processor configured by `preprocessor_config.json`.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    /// The configuration.
    pub cfg: PreprocessorConfig,
}

impl ImageProcessor {
    /// A processor for `cfg`.
    pub fn new(cfg: PreprocessorConfig) -> Self {
        Self { cfg }
    }

    /// `patch_size * merge_size` (28).
    pub fn factor(&self) -> usize {
        self.cfg.patch_size * self.cfg.merge_size
    }

    /// Length of one flattened patch (1176).
    pub fn patch_dim(&self) -> usize {
        3 * self.cfg.temporal_patch_size * self.cfg.patch_size * self.cfg.patch_size
    }

    /// The size `(width, height)` an image of `(width, height)` is resized to.
    pub fn target_size(&self, width: u32, height: u32) -> Result<(u32, u32)> {
        let (h, w) = smart_resize(
            height as usize,
            width as usize,
            self.factor(),
            self.cfg.min_pixels,
            self.cfg.max_pixels,
        )?;
        Ok((w as u32, h as u32))
    }

    /// Bicubic resize of an RGB image to `(width, height)` (unchanged when already that size):
    /// [`resize_bicubic_aa`].
    pub fn resize(&self, img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
        if img.dimensions() == (width, height) {
            return Ok(img.clone());
        }
        if width == 0 || height == 0 || img.width() == 0 || img.height() == 0 {
            return Err(Error::invalid(
                format!(
                    "resize {}x{} to {width}x{height}",
                    img.width(),
                    img.height()
                ),
                "empty image",
            ));
        }
        Ok(resize_bicubic_aa(img, width, height))
    }

    /// One image: resize, normalise, duplicate to `temporal_patch_size` frames, flatten.
    pub fn preprocess_image(&self, img: &RgbImage) -> Result<VisionInput> {
        self.preprocess_frames(std::slice::from_ref(img))
    }

    /// A video (or volume) given as frames: every frame is resized to the first frame's target
    /// size; consecutive frames are grouped in temporal pairs (the last repeated when odd).
    pub fn preprocess_frames(&self, frames: &[RgbImage]) -> Result<VisionInput> {
        let first = frames
            .first()
            .ok_or_else(|| Error::invalid("frames", "no frame to process"))?;
        let (tw, th) = self.target_size(first.width(), first.height())?;
        let resized: Vec<RgbImage> = frames
            .iter()
            .map(|f| self.resize(f, tw, th))
            .collect::<Result<_>>()?;
        Ok(self.flatten(&resized))
    }

    /// Normalise and flatten frames that already have the target size (multiples of 28).
    pub fn flatten(&self, frames: &[RgbImage]) -> VisionInput {
        let (w, h) = frames[0].dimensions();
        let (w, h) = (w as usize, h as usize);
        let tps = self.cfg.temporal_patch_size;
        let p = self.cfg.patch_size;
        let m = self.cfg.merge_size;
        let n_frames = frames.len().div_ceil(tps) * tps;
        let (gt, gh, gw) = (n_frames / tps, h / p, w / p);
        // Lookup table: value of grey level v in channel c after rescale + normalise.
        let mut lut = [[0f32; 256]; 3];
        for c in 0..3 {
            let mean = self.cfg.image_mean[c] * 255.0;
            let std = self.cfg.image_std[c] * 255.0;
            for v in 0..256 {
                lut[c][v] = (v as f32 - mean) / std;
            }
        }
        let dim = 3 * tps * p * p;
        let mut out = vec![0f32; gt * gh * gw * dim];
        let frame = |i: usize| &frames[i.min(frames.len() - 1)];
        let mut row = 0usize;
        for t in 0..gt {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let dst = &mut out[row * dim..(row + 1) * dim];
                            let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                            let mut k = 0;
                            for c in 0..3 {
                                for tp in 0..tps {
                                    let raw = frame(t * tps + tp).as_raw();
                                    for py in 0..p {
                                        let base = ((y0 + py) * w + x0) * 3 + c;
                                        for px in 0..p {
                                            dst[k] = lut[c][raw[base + px * 3] as usize];
                                            k += 1;
                                        }
                                    }
                                }
                            }
                            row += 1;
                        }
                    }
                }
            }
        }
        VisionInput {
            pixel_values: out,
            grid_thw: [gt, gh, gw],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_the_spec_examples() {
        let (mn, mx) = (3136, 12_845_056);
        assert_eq!(smart_resize(256, 256, 28, mn, mx).unwrap(), (252, 252));
        assert_eq!(smart_resize(724, 724, 28, mn, mx).unwrap(), (728, 728));
        assert_eq!(smart_resize(512, 1024, 28, mn, mx).unwrap(), (504, 1036));
        assert_eq!(smart_resize(224, 224, 28, mn, mx).unwrap(), (224, 224));
        // Python rounds ties to even: 70 / 28 = 2.5 -> 2, 42 / 28 = 1.5 -> 2.
        assert_eq!(smart_resize(70, 42, 28, mn, mx).unwrap(), (56, 56));
        // Too many pixels: scaled down under max_pixels.
        let (h, w) = smart_resize(4000, 3000, 28, mn, 1_000_000).unwrap();
        assert!(h * w <= 1_000_000 && h % 28 == 0 && w % 28 == 0);
        // Too few: scaled up over min_pixels.
        assert_eq!(smart_resize(30, 40, 28, 10_000, mx).unwrap(), (112, 140));
        assert!(smart_resize(27, 100, 28, mn, mx).is_err());
        assert!(smart_resize(28, 28 * 201, 28, mn, mx).is_err());
    }

    #[test]
    fn patches_are_flattened_in_hf_order() {
        let proc = ImageProcessor::new(PreprocessorConfig::default());
        // 56x28 image (w=56, h=28): grid (1, 2, 4); pixel value encodes x and y.
        let img = RgbImage::from_fn(56, 28, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let v = proc.flatten(&[img]);
        assert_eq!(v.grid_thw, [1, 2, 4]);
        assert_eq!(v.pixel_values.len(), 8 * 1176);
        let cfg = &proc.cfg;
        let inv = |val: f32, c: usize| {
            (val * cfg.image_std[c] * 255.0 + cfg.image_mean[c] * 255.0).round() as u32
        };
        // Row order: (bh, bw, mh, mw): row 2 is bh=0, bw=0, mh=1, mw=0 -> patch (y=14, x=0).
        let row = &v.pixel_values[2 * 1176..3 * 1176];
        assert_eq!(inv(row[0], 0), 0); // c=0 (x), first pixel x = 0
        assert_eq!(inv(row[2 * 196], 1), 14); // c=1 (y), first pixel y = 14
        // Row 4 is bh=0, bw=1, mh=0, mw=0 -> patch (y=0, x=28); second temporal copy equals first.
        let row = &v.pixel_values[4 * 1176..5 * 1176];
        assert_eq!(inv(row[0], 0), 28);
        assert_eq!(inv(row[196 + 3], 0), 31);
        assert_eq!(inv(row[2 * 196 + 14], 1), 1);
        assert_eq!(row[4 * 196 + 5], row[5 * 196 + 5]);
        assert!((row[4 * 196] - (7.0 / 255.0 - cfg.image_mean[2]) / cfg.image_std[2]).abs() < 1e-5);
    }

    #[test]
    fn frames_pair_up_and_odd_counts_repeat_the_last() {
        let proc = ImageProcessor::new(PreprocessorConfig::default());
        let f = |v: u8| RgbImage::from_pixel(56, 56, image::Rgb([v, v, v]));
        let v = proc.preprocess_frames(&[f(0), f(100), f(200)]).unwrap();
        assert_eq!(v.grid_thw, [2, 4, 4]);
        // t=1 block (rows 16..32): both temporal halves come from frame 2.
        let row = &v.pixel_values[16 * 1176..17 * 1176];
        assert_eq!(row[0], row[196]);
        let row0 = &v.pixel_values[..1176];
        assert_ne!(row0[0], row0[196]);
    }

    #[test]
    fn resize_keeps_flat_images_flat() {
        let proc = ImageProcessor::new(PreprocessorConfig::default());
        let img = RgbImage::from_pixel(300, 200, image::Rgb([10, 128, 250]));
        let v = proc.preprocess_image(&img).unwrap();
        // 200x300 -> (196, 308)
        assert_eq!(v.grid_thw, [1, 14, 22]);
        let r = proc.resize(&img, 308, 196).unwrap();
        assert!(r.pixels().all(|p| p.0 == [10, 128, 250]));
    }
}
