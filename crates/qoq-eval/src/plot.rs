//! PNG charts for reports: confusion matrices, per-domain bars, line curves.
//!
//! Drawn on a plain RGB raster with the public-domain 8x8 glyphs of the `font8x8` crate. Written by
//! hand instead of with `plotters` because plotters' bitmap backend needs a TrueType font file at
//! run time (none is guaranteed on a fresh machine or CI) and we would rather not ship one; three
//! chart kinds on a raster are a few hundred lines and render the same everywhere.

use font8x8::UnicodeFonts;
use std::path::Path;

/// An RGB raster.
#[derive(Debug, Clone)]
pub struct Raster {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// A colour.
pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [200, 200, 200];
/// A colour-blind-safe palette (Okabe-Ito) for series.
pub const PALETTE: [Rgb; 7] = [
    [0, 114, 178],
    [230, 159, 0],
    [0, 158, 115],
    [204, 121, 167],
    [86, 180, 233],
    [213, 94, 0],
    [240, 228, 66],
];

impl Raster {
    /// A white raster.
    pub fn new(width: u32, height: u32) -> Raster {
        Raster {
            width,
            height,
            data: vec![255; (width * height * 3) as usize],
        }
    }

    /// Set one pixel (ignored outside the raster).
    pub fn put(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as u32) < self.width && (y as u32) < self.height {
            let i = ((y as u32 * self.width + x as u32) * 3) as usize;
            self.data[i..i + 3].copy_from_slice(&c);
        }
    }

    /// The colour at (x, y).
    pub fn get(&self, x: u32, y: u32) -> Rgb {
        let i = ((y * self.width + x) * 3) as usize;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    /// Fill the rectangle [x0, x1) x [y0, y1).
    pub fn fill_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.put(x, y, c);
            }
        }
    }

    /// Outline of a rectangle, inclusive corners.
    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for x in x0..=x1 {
            self.put(x, y0, c);
            self.put(x, y1, c);
        }
        for y in y0..=y1 {
            self.put(x0, y, c);
            self.put(x1, y, c);
        }
    }

    /// A line (Bresenham), `thick` pixels wide.
    pub fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb, thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for t in 0..thick {
                self.put(x, y + t - thick / 2, c);
                self.put(x + t - thick / 2, y, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with 8x8 glyphs at an integer `scale`; characters without a glyph draw as '?'.
    /// Returns the width drawn in pixels.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) -> i64 {
        let mut cx = x;
        for ch in s.chars() {
            let glyph = font8x8::BASIC_FONTS
                .get(ch)
                .or_else(|| font8x8::LATIN_FONTS.get(ch))
                .or_else(|| font8x8::BASIC_FONTS.get('?'))
                .unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.fill_rect(
                            cx + col * scale,
                            y + row as i64 * scale,
                            cx + (col + 1) * scale,
                            y + (row as i64 + 1) * scale,
                            c,
                        );
                    }
                }
            }
            cx += 8 * scale;
        }
        cx - x
    }

    /// Write as PNG.
    pub fn save_png(&self, path: &Path) -> image::ImageResult<()> {
        image::save_buffer(
            path,
            &self.data,
            self.width,
            self.height,
            image::ExtendedColorType::Rgb8,
        )
    }
}

/// Text width in pixels at `scale`.
pub fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 8 * scale
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('~');
        t
    }
}

/// White-to-blue ramp for a fraction in [0, 1].
fn ramp(f: f64) -> Rgb {
    let f = f.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    [lerp(247.0, 8.0), lerp(251.0, 48.0), lerp(255.0, 107.0)]
}

/// A confusion matrix: rows are gold labels, columns predicted labels (`cols` may hold an extra
/// "(none)" or "(other)" column), cells are counts; each row is coloured by its own fraction.
pub fn confusion_matrix(
    title: &str,
    rows: &[String],
    cols: &[String],
    counts: &[Vec<u64>],
) -> Raster {
    let label_w = rows
        .iter()
        .map(|r| text_width(&truncate(r, 22), 1))
        .max()
        .unwrap_or(0)
        + 16;
    let cell = 44i64;
    let top = 40
        + cols
            .iter()
            .map(|c| truncate(c, 14).chars().count() as i64)
            .max()
            .unwrap_or(0)
            * 8;
    let footer = "rows: ground truth, columns: prediction";
    let width = (label_w + cell * cols.len() as i64 + 20)
        .max(text_width(title, 2) + 20)
        .max(label_w + text_width(footer, 1) + 10);
    let height = top + cell * rows.len() as i64 + 40;
    let mut r = Raster::new(width as u32, height as u32);
    r.text(10, 8, title, 2, BLACK);
    // Column labels written vertically, one character per line.
    for (j, c) in cols.iter().enumerate() {
        let x = label_w + j as i64 * cell + cell / 2 - 4;
        for (k, ch) in truncate(c, 14).chars().enumerate() {
            r.text(x, 36 + k as i64 * 8, &ch.to_string(), 1, BLACK);
        }
    }
    for (i, name) in rows.iter().enumerate() {
        let y = top + i as i64 * cell;
        r.text(8, y + cell / 2 - 4, &truncate(name, 22), 1, BLACK);
        let total: u64 = counts[i].iter().sum();
        for (j, &n) in counts[i].iter().enumerate() {
            let x = label_w + j as i64 * cell;
            let f = if total == 0 {
                0.0
            } else {
                n as f64 / total as f64
            };
            let col = ramp(f);
            r.fill_rect(x, y, x + cell, y + cell, col);
            r.rect(x, y, x + cell, y + cell, GREY);
            let s = n.to_string();
            let fg = if f > 0.5 { WHITE } else { BLACK };
            r.text(
                x + (cell - text_width(&s, 1)) / 2,
                y + cell / 2 - 4,
                &s,
                1,
                fg,
            );
        }
    }
    r.text(label_w, height - 20, footer, 1, BLACK);
    r
}

/// Grouped horizontal bars: one group per category, one bar per series (values in [0, 1]).
pub fn grouped_bars(title: &str, categories: &[String], series: &[(String, Vec<f64>)]) -> Raster {
    let label_w = categories
        .iter()
        .map(|c| text_width(&truncate(c, 18), 1))
        .max()
        .unwrap_or(0)
        + 16;
    let bar_h = 12i64;
    let group_h = bar_h * series.len() as i64 + 10;
    let plot_w = 400i64;
    let top = 40 + 14 * series.len() as i64;
    let width = label_w + plot_w + 80;
    let height = top + group_h * categories.len() as i64 + 30;
    let mut r = Raster::new(width as u32, height as u32);
    r.text(10, 8, title, 2, BLACK);
    for (k, (name, _)) in series.iter().enumerate() {
        let y = 32 + 14 * k as i64;
        r.fill_rect(10, y, 20, y + 10, PALETTE[k % PALETTE.len()]);
        r.text(26, y + 1, name, 1, BLACK);
    }
    for t in 0..=4 {
        let x = label_w + plot_w * t / 4;
        r.line(x, top - 4, x, height - 26, GREY, 1);
        let s = format!("{:.2}", t as f64 / 4.0);
        r.text(x - text_width(&s, 1) / 2, height - 20, &s, 1, BLACK);
    }
    for (i, cat) in categories.iter().enumerate() {
        let y0 = top + i as i64 * group_h;
        r.text(8, y0 + group_h / 2 - 6, &truncate(cat, 18), 1, BLACK);
        for (k, (_, vals)) in series.iter().enumerate() {
            let v = vals.get(i).copied().unwrap_or(f64::NAN);
            let y = y0 + k as i64 * bar_h;
            if v.is_finite() {
                let w = (v.clamp(0.0, 1.0) * plot_w as f64).round() as i64;
                r.fill_rect(
                    label_w,
                    y,
                    label_w + w,
                    y + bar_h - 2,
                    PALETTE[k % PALETTE.len()],
                );
                r.text(label_w + w + 4, y + 2, &format!("{v:.2}"), 1, BLACK);
            } else {
                r.text(label_w + 4, y + 2, "n/a", 1, BLACK);
            }
        }
    }
    r
}

/// Line curves over a shared x axis (e.g. training step); non-finite points break the line.
pub fn line_chart(title: &str, x_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> Raster {
    let (w, h) = (640i64, 400i64);
    let (left, right, top, bottom) = (70i64, 20i64, 40 + 14 * series.len() as i64, 40i64);
    let mut r = Raster::new(w as u32, h as u32);
    r.text(10, 8, title, 2, BLACK);
    let pts = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        r.text(left, h / 2, "no data", 2, BLACK);
        return r;
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let pw = w - left - right;
    let ph = h - top - bottom;
    let px = |x: f64| left + ((x - x0) / (x1 - x0) * pw as f64).round() as i64;
    let py = |y: f64| top + ph - ((y - y0) / (y1 - y0) * ph as f64).round() as i64;
    r.rect(left, top, left + pw, top + ph, GREY);
    for t in 0..=4 {
        let yv = y0 + (y1 - y0) * t as f64 / 4.0;
        let s = format!("{yv:.3}");
        r.text(left - text_width(&s, 1) - 4, py(yv) - 4, &s, 1, BLACK);
        let xv = x0 + (x1 - x0) * t as f64 / 4.0;
        let s = format!("{xv:.0}");
        r.text(px(xv) - text_width(&s, 1) / 2, top + ph + 6, &s, 1, BLACK);
    }
    r.text(
        left + pw / 2 - text_width(x_label, 1) / 2,
        h - 16,
        x_label,
        1,
        BLACK,
    );
    for (k, (name, p)) in series.iter().enumerate() {
        let c = PALETTE[k % PALETTE.len()];
        let y = 32 + 14 * k as i64;
        r.fill_rect(10, y, 20, y + 10, c);
        r.text(26, y + 1, name, 1, BLACK);
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in p {
            if !(x.is_finite() && y.is_finite()) {
                prev = None;
                continue;
            }
            let q = (px(x), py(y));
            if let Some(a) = prev {
                r.line(a.0, a.1, q.0, q.1, c, 2);
            } else {
                r.put(q.0, q.1, c);
            }
            prev = Some(q);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(r: &Raster, c: Rgb) -> usize {
        r.data.chunks(3).filter(|p| *p == c).count()
    }

    #[test]
    fn text_draws_glyph_pixels() {
        let mut r = Raster::new(40, 10);
        assert_eq!(r.text(0, 0, "AB", 1, BLACK), 16);
        assert!(count(&r, BLACK) > 20);
        let mut blank = Raster::new(40, 10);
        blank.text(0, 0, "  ", 1, BLACK);
        assert_eq!(count(&blank, BLACK), 0);
    }

    #[test]
    fn confusion_cells_are_shaded_by_row_fraction() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let r = confusion_matrix("cm", &labels, &labels, &[vec![9, 1], vec![0, 5]]);
        // The darkest ramp colour appears (row b is all in one cell), and the palest too.
        assert!(count(&r, ramp(1.0)) > 100);
        assert!(count(&r, ramp(0.0)) > 100);
    }

    #[test]
    fn bars_have_lengths_proportional_to_values() {
        let cats = vec!["x".to_string()];
        let r = grouped_bars("b", &cats, &[("s".into(), vec![0.5])]);
        let c = PALETTE[0];
        let row: Vec<u32> = (0..r.width)
            .filter(|&x| r.get(x, 40 + 14 + 4) == c)
            .collect();
        // 0.5 of a 400-pixel axis.
        assert_eq!(row.len(), 200, "{row:?}");
    }

    #[test]
    fn line_chart_survives_empty_and_constant_series() {
        let r = line_chart("t", "step", &[("a".into(), vec![])]);
        assert_eq!(r.width, 640);
        let r = line_chart(
            "t",
            "step",
            &[("a".into(), vec![(0.0, 1.0), (1.0, 1.0), (2.0, f64::NAN)])],
        );
        assert!(count(&r, PALETTE[0]) > 100);
    }
}
