//! Segmentation masks in pixel coordinates.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// A 2D segmentation mask, row-major, one byte per pixel; a pixel is foreground when `> 0`
/// (the reference's `seg > 0`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegMask {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl SegMask {
    /// Build a mask; `data.len()` must equal `width * height`.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height {
            return Err(Error::MaskSize {
                width,
                height,
                len: data.len(),
            });
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// An all-background mask.
    pub fn zeros(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0; width * height],
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// Row-major pixel values.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Value at `(x, y)`.
    pub fn get(&self, x: usize, y: usize) -> u8 {
        self.data[y * self.width + x]
    }

    /// Number of foreground pixels.
    pub fn foreground(&self) -> usize {
        self.data.iter().filter(|&&v| v > 0).count()
    }

    /// Whether any pixel is foreground (the reference's `seg.sum() > 0`).
    pub fn any(&self) -> bool {
        self.data.iter().any(|&v| v > 0)
    }

    /// Tight bounding box `[x_min, y_min, x_max, y_max]` (inclusive pixels) of the foreground.
    pub fn bbox(&self) -> Option<[usize; 4]> {
        let mut b: Option<[usize; 4]> = None;
        for y in 0..self.height {
            for x in 0..self.width {
                if self.get(x, y) > 0 {
                    b = Some(match b {
                        None => [x, y, x, y],
                        Some([x0, y0, x1, y1]) => [x0.min(x), y0.min(y), x1.max(x), y1.max(y)],
                    });
                }
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_rejects_wrong_buffer_size_and_finds_its_box() {
        assert!(SegMask::new(3, 3, vec![0; 8]).is_err());
        let mut d = vec![0u8; 40 * 40];
        for y in 10..30 {
            for x in 12..25 {
                d[y * 40 + x] = 255;
            }
        }
        let m = SegMask::new(40, 40, d).unwrap();
        assert_eq!(m.foreground(), 20 * 13);
        assert_eq!(m.bbox(), Some([12, 10, 24, 29]));
        assert!(!SegMask::zeros(4, 4).any());
    }
}
