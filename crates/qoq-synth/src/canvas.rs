//! A tiny anti-aliased raster: shapes with soft edges painted onto a float canvas, and the binary
//! masks of the same shapes. Written by hand because the drawing crates (`imageproc`, `tiny-skia`)
//! give no per-shape coverage function that we can also threshold into a segmentation mask, and
//! the mask must be exactly the painted structure for IoU rewards to mean something.

use rand::Rng;
use rand_distr::{Distribution, Normal};

/// A closed 2-D shape, described by an approximate signed distance in pixels (negative inside).
#[derive(Debug, Clone)]
pub enum Shape {
    /// Rotated ellipse centred at (cx, cy) with radii (rx, ry) and rotation `angle` (radians).
    Ellipse {
        cx: f32,
        cy: f32,
        rx: f32,
        ry: f32,
        angle: f32,
    },
    /// A star-shaped blob: radius `r * (1 + sum_k a_k cos(k theta + phi_k))` around (cx, cy).
    /// Low harmonics give irregular borders, high ones spicules.
    Blob {
        cx: f32,
        cy: f32,
        r: f32,
        harmonics: Vec<(u32, f32, f32)>,
    },
    /// A line segment of the given full width.
    Segment {
        x0: f32,
        y0: f32,
        x1: f32,
        y1: f32,
        width: f32,
    },
    /// The part of `inner` below the horizontal line `y = level` (image rows grow downwards).
    Below { inner: Box<Shape>, level: f32 },
}

impl Shape {
    /// Circle shorthand.
    pub fn circle(cx: f32, cy: f32, r: f32) -> Shape {
        Shape::Ellipse {
            cx,
            cy,
            rx: r,
            ry: r,
            angle: 0.0,
        }
    }

    /// A blob with `n` random harmonics of relative amplitude up to `irregularity`.
    pub fn random_blob<R: Rng>(
        rng: &mut R,
        cx: f32,
        cy: f32,
        r: f32,
        irregularity: f32,
        orders: std::ops::RangeInclusive<u32>,
        n: usize,
    ) -> Shape {
        let harmonics = (0..n)
            .map(|_| {
                (
                    rng.random_range(orders.clone()),
                    rng.random_range(0.0..irregularity),
                    rng.random_range(0.0..std::f32::consts::TAU),
                )
            })
            .collect();
        Shape::Blob {
            cx,
            cy,
            r,
            harmonics,
        }
    }

    /// Approximate signed distance (pixels) from (x, y) to the border; negative inside.
    pub fn sdf(&self, x: f32, y: f32) -> f32 {
        match self {
            Shape::Ellipse {
                cx,
                cy,
                rx,
                ry,
                angle,
            } => {
                let (s, c) = angle.sin_cos();
                let dx = x - cx;
                let dy = y - cy;
                let u = (dx * c + dy * s) / rx.max(1e-3);
                let v = (-dx * s + dy * c) / ry.max(1e-3);
                ((u * u + v * v).sqrt() - 1.0) * rx.min(*ry)
            }
            Shape::Blob {
                cx,
                cy,
                r,
                harmonics,
            } => {
                let dx = x - cx;
                let dy = y - cy;
                let theta = dy.atan2(dx);
                let k: f32 = harmonics
                    .iter()
                    .map(|&(o, a, p)| a * (o as f32 * theta + p).cos())
                    .sum();
                (dx * dx + dy * dy).sqrt() - r * (1.0 + k).max(0.2)
            }
            Shape::Segment {
                x0,
                y0,
                x1,
                y1,
                width,
            } => {
                let (vx, vy) = (x1 - x0, y1 - y0);
                let len2 = (vx * vx + vy * vy).max(1e-6);
                let t = (((x - x0) * vx + (y - y0) * vy) / len2).clamp(0.0, 1.0);
                let (px, py) = (x0 + t * vx, y0 + t * vy);
                ((x - px).powi(2) + (y - py).powi(2)).sqrt() - width / 2.0
            }
            Shape::Below { inner, level } => inner.sdf(x, y).max(level - y),
        }
    }

    /// Pixel coverage in [0, 1] of the pixel centred at (x + 0.5, y + 0.5), with a one-pixel ramp.
    pub fn coverage(&self, x: usize, y: usize) -> f32 {
        (0.5 - self.sdf(x as f32 + 0.5, y as f32 + 0.5)).clamp(0.0, 1.0)
    }
}

/// A `width x height` canvas of `channels` (1 or 3) floats in [0, 1], row-major, interleaved.
#[derive(Debug, Clone, PartialEq)]
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl Canvas {
    /// A canvas filled with `color` (its first `channels` entries are used).
    pub fn new(width: usize, height: usize, channels: usize, color: [f32; 3]) -> Canvas {
        let mut data = Vec::with_capacity(width * height * channels);
        for _ in 0..width * height {
            data.extend_from_slice(&color[..channels]);
        }
        Canvas {
            width,
            height,
            channels,
            data,
        }
    }

    /// Blend `color` over the shape with opacity `alpha` times the pixel coverage.
    pub fn paint(&mut self, shape: &Shape, color: [f32; 3], alpha: f32) {
        for y in 0..self.height {
            for x in 0..self.width {
                let a = shape.coverage(x, y) * alpha;
                if a > 0.0 {
                    let i = (y * self.width + x) * self.channels;
                    for c in 0..self.channels {
                        self.data[i + c] = self.data[i + c] * (1.0 - a) + color[c] * a;
                    }
                }
            }
        }
    }

    /// Add `f(x, y)` (same value on every channel) to every pixel.
    pub fn add_field(&mut self, f: impl Fn(usize, usize) -> f32) {
        for y in 0..self.height {
            for x in 0..self.width {
                let v = f(x, y);
                let i = (y * self.width + x) * self.channels;
                for c in 0..self.channels {
                    self.data[i + c] += v;
                }
            }
        }
    }

    /// Multiply every pixel by `f(x, y)`.
    pub fn mul_field(&mut self, f: impl Fn(usize, usize) -> f32) {
        for y in 0..self.height {
            for x in 0..self.width {
                let v = f(x, y);
                let i = (y * self.width + x) * self.channels;
                for c in 0..self.channels {
                    self.data[i + c] *= v;
                }
            }
        }
    }

    /// Independent Gaussian noise of standard deviation `sigma` on every sample.
    pub fn noise<R: Rng>(&mut self, rng: &mut R, sigma: f32) {
        let n = Normal::new(0.0f32, sigma.max(0.0)).expect("finite sigma");
        for v in &mut self.data {
            *v += n.sample(rng);
        }
    }

    /// Speckle: multiply by Rayleigh-distributed factors of mean 1 (ultrasound's texture).
    pub fn speckle<R: Rng>(&mut self, rng: &mut R) {
        // Rayleigh with sigma s has mean s * sqrt(pi / 2); pick s so the mean is 1.
        let s = (2.0 / std::f32::consts::PI).sqrt();
        for v in &mut self.data {
            let u: f32 = rng.random_range(1e-6f32..1.0);
            *v *= s * (-2.0 * u.ln()).sqrt();
        }
    }

    /// Box blur of the given radius (separable, edges clamped).
    pub fn blur(&mut self, radius: usize) {
        if radius == 0 {
            return;
        }
        let (w, h, ch) = (self.width, self.height, self.channels);
        let k = (2 * radius + 1) as f32;
        let mut tmp = self.data.clone();
        for y in 0..h {
            for x in 0..w {
                for c in 0..ch {
                    let mut s = 0.0;
                    for d in 0..=2 * radius {
                        let xx = (x + d).saturating_sub(radius).min(w - 1);
                        s += self.data[(y * w + xx) * ch + c];
                    }
                    tmp[(y * w + x) * ch + c] = s / k;
                }
            }
        }
        for y in 0..h {
            for x in 0..w {
                for c in 0..ch {
                    let mut s = 0.0;
                    for d in 0..=2 * radius {
                        let yy = (y + d).saturating_sub(radius).min(h - 1);
                        s += tmp[(yy * w + x) * ch + c];
                    }
                    self.data[(y * w + x) * ch + c] = s / k;
                }
            }
        }
    }

    /// Smooth random texture: white noise blurred, scaled to amplitude `amp`, added.
    pub fn texture<R: Rng>(&mut self, rng: &mut R, amp: f32, grain: usize) {
        let mut t = Canvas::new(self.width, self.height, 1, [0.0; 3]);
        t.noise(rng, 1.0);
        t.blur(grain);
        // A box blur of radius g divides the std of white noise by (2g+1).
        let scale = amp * (2 * grain + 1) as f32;
        let w = self.width;
        self.add_field(|x, y| t.data[y * w + x] * scale);
    }

    /// 8-bit samples, clamped.
    pub fn to_u8(&self) -> Vec<u8> {
        self.data
            .iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect()
    }

    /// Mean of channel 0 over the pixels where `mask` is set (NaN if none).
    pub fn mean_where(&self, mask: &Mask, inside: bool) -> f32 {
        let (mut s, mut n) = (0.0f64, 0usize);
        for (i, &m) in mask.data.iter().enumerate() {
            if m == inside {
                s += self.data[i * self.channels] as f64;
                n += 1;
            }
        }
        (s / n as f64) as f32
    }
}

/// A binary segmentation mask, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub data: Vec<bool>,
}

impl Mask {
    /// An empty mask.
    pub fn new(width: usize, height: usize) -> Mask {
        Mask {
            width,
            height,
            data: vec![false; width * height],
        }
    }

    /// Set every pixel whose centre lies inside the shape (coverage of at least one half).
    pub fn add(&mut self, shape: &Shape) {
        for y in 0..self.height {
            for x in 0..self.width {
                if shape.coverage(x, y) >= 0.5 {
                    self.data[y * self.width + x] = true;
                }
            }
        }
    }

    /// Number of foreground pixels.
    pub fn count(&self) -> usize {
        self.data.iter().filter(|&&m| m).count()
    }

    /// Tight box `[x_min, y_min, x_max, y_max]` (inclusive pixels) of the foreground.
    pub fn bbox(&self) -> Option<[usize; 4]> {
        let mut b: Option<[usize; 4]> = None;
        for y in 0..self.height {
            for x in 0..self.width {
                if self.data[y * self.width + x] {
                    b = Some(match b {
                        None => [x, y, x, y],
                        Some([a, c, d, e]) => [a.min(x), c.min(y), d.max(x), e.max(y)],
                    });
                }
            }
        }
        b
    }

    /// 0 / 255 bytes.
    pub fn to_u8(&self) -> Vec<u8> {
        self.data.iter().map(|&m| if m { 255 } else { 0 }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ellipse_mask_area_matches_pi_r_squared() {
        let mut m = Mask::new(64, 64);
        m.add(&Shape::circle(32.0, 32.0, 10.0));
        let area = m.count() as f32;
        let want = std::f32::consts::PI * 100.0;
        assert!((area - want).abs() / want < 0.05, "area {area} vs {want}");
        assert_eq!(m.bbox(), Some([22, 22, 41, 41]));
    }

    #[test]
    fn painting_changes_only_the_shape_and_its_rim() {
        let mut c = Canvas::new(32, 32, 1, [0.0; 3]);
        let s = Shape::circle(16.0, 16.0, 5.0);
        c.paint(&s, [1.0; 3], 1.0);
        assert_eq!(c.data[16 * 32 + 16], 1.0);
        assert_eq!(c.data[0], 0.0);
        let mut m = Mask::new(32, 32);
        m.add(&s);
        assert!(c.mean_where(&m, true) > 0.9);
        assert!(c.mean_where(&m, false) < 0.05);
    }

    #[test]
    fn below_cuts_the_shape_at_the_level() {
        let s = Shape::Below {
            inner: Box::new(Shape::circle(16.0, 16.0, 10.0)),
            level: 20.0,
        };
        let mut m = Mask::new(32, 32);
        m.add(&s);
        let b = m.bbox().unwrap();
        assert!(b[1] >= 19 && b[3] <= 26, "{b:?}");
    }

    #[test]
    fn blur_preserves_the_mean_of_a_constant() {
        let mut c = Canvas::new(8, 8, 3, [0.25, 0.5, 0.75]);
        c.blur(2);
        assert!(c.data.iter().step_by(3).all(|v| (v - 0.25).abs() < 1e-6));
    }
}
