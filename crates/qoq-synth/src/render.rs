//! Renderers of the toy clinical images. In every domain the class is decided by visible
//! structure (a lesion's presence, shape, border, count, texture, intensity or position), and every
//! abnormal finding comes with the mask of exactly the painted structure.
//!
//! Sizes are in units of the image side `s`, so any resolution works.

use crate::canvas::{Canvas, Mask, Shape};
use rand::Rng;
use std::f32::consts::PI;

/// A rendered 2-D case: the image and, for abnormal findings, the finding's mask.
pub type Rendered = (Canvas, Option<Mask>);

fn lesion_mask(s: usize, shapes: &[Shape]) -> Option<Mask> {
    let mut m = Mask::new(s, s);
    for sh in shapes {
        m.add(sh);
    }
    (m.count() > 0).then_some(m)
}

/// Chest radiograph. Classes: 0 "No Finding", 1 "Nodule", 2 "Pleural Effusion",
/// 3 "Cardiomegaly". `site` 1 is a second acquisition site (brighter, noisier, shifted).
pub fn chest_xray<R: Rng>(rng: &mut R, s: usize, class: usize, site: u8) -> Rendered {
    let f = s as f32;
    let (bg, body, lung) = if site == 0 {
        (0.08, 0.55, 0.18)
    } else {
        (0.15, 0.62, 0.28)
    };
    let dx = if site == 0 { 0.0 } else { 0.03 * f };
    let mut c = Canvas::new(s, s, 1, [bg; 3]);
    c.paint(
        &Shape::Ellipse {
            cx: 0.5 * f + dx,
            cy: 0.58 * f,
            rx: 0.46 * f,
            ry: 0.52 * f,
            angle: 0.0,
        },
        [body; 3],
        1.0,
    );
    let jitter = |rng: &mut R| rng.random_range(-0.02..0.02) * f;
    let lungs: Vec<Shape> = [0.31f32, 0.69]
        .iter()
        .map(|&x| Shape::Ellipse {
            cx: x * f + dx + jitter(rng),
            cy: 0.5 * f + jitter(rng),
            rx: 0.14 * f,
            ry: 0.31 * f,
            angle: 0.0,
        })
        .collect();
    for l in &lungs {
        c.paint(l, [lung; 3], 1.0);
    }
    // Ribs: faint arcs approximated by slanted segments across each lung.
    for k in 0..5 {
        let y = (0.28 + 0.1 * k as f32) * f;
        for side in [-1.0f32, 1.0] {
            let x0 = 0.5 * f + dx + side * 0.05 * f;
            let x1 = 0.5 * f + dx + side * 0.45 * f;
            c.paint(
                &Shape::Segment {
                    x0,
                    y0: y,
                    x1,
                    y1: y + 0.06 * f,
                    width: 0.02 * f,
                },
                [0.6; 3],
                0.35,
            );
        }
    }
    // Mediastinum and heart.
    c.paint(
        &Shape::Ellipse {
            cx: 0.5 * f + dx,
            cy: 0.45 * f,
            rx: 0.05 * f,
            ry: 0.3 * f,
            angle: 0.0,
        },
        [0.7; 3],
        1.0,
    );
    let heart_r = if class == 3 {
        rng.random_range(0.19..0.23)
    } else {
        rng.random_range(0.11..0.13)
    };
    let heart = Shape::Ellipse {
        cx: 0.55 * f + dx,
        cy: 0.66 * f,
        rx: heart_r * f,
        ry: 0.8 * heart_r * f,
        angle: 0.15,
    };
    c.paint(&heart, [0.65; 3], 1.0);
    let mut finding = Vec::new();
    match class {
        1 => {
            let lung = &lungs[rng.random_range(0..2)];
            let (cx, cy) = match lung {
                Shape::Ellipse { cx, cy, .. } => (*cx, *cy),
                _ => unreachable!("lungs are ellipses"),
            };
            let n = Shape::circle(
                cx + rng.random_range(-0.06..0.06) * f,
                cy + rng.random_range(-0.15..0.1) * f,
                rng.random_range(0.045..0.07) * f,
            );
            c.paint(&n, [0.8; 3], 0.9);
            finding.push(n);
        }
        2 => {
            let lung = lungs[rng.random_range(0..2)].clone();
            let level = rng.random_range(0.58..0.68) * f;
            let e = Shape::Below {
                inner: Box::new(lung),
                level,
            };
            c.paint(&e, [0.62; 3], 1.0);
            finding.push(e);
        }
        3 => finding.push(heart),
        _ => {}
    }
    c.texture(rng, 0.03, 2);
    c.noise(rng, if site == 0 { 0.015 } else { 0.03 });
    (c, lesion_mask(s, &finding))
}

/// Mammogram (one breast, MLO-like). Classes: 0 "BI-RADS 1" (negative), 1 "BI-RADS 2" (benign:
/// round circumscribed mass), 2 "BI-RADS 5" (highly suspicious: spiculated mass). The masses are
/// 18-30 % of the side across (a mass of 10-18 % was 3-5 pixels in the demo's 56-pixel image, a
/// quarter of one merged vision token: the demo's SFT model classified it but copied its box from
/// training positions, IoU about 10 % even where the class was right).
pub fn mammography<R: Rng>(rng: &mut R, s: usize, class: usize) -> Rendered {
    let f = s as f32;
    let mut c = Canvas::new(s, s, 1, [0.03; 3]);
    let breast = Shape::Ellipse {
        cx: 0.0,
        cy: 0.5 * f,
        rx: rng.random_range(0.75..0.9) * f,
        ry: 0.47 * f,
        angle: 0.0,
    };
    c.paint(&breast, [0.35; 3], 1.0);
    // Fibroglandular texture, only inside the breast.
    let mut tex = Canvas::new(s, s, 1, [0.0; 3]);
    tex.texture(rng, 0.08, 2);
    let inside: Vec<f32> = (0..s * s).map(|i| breast.coverage(i % s, i / s)).collect();
    c.add_field(|x, y| tex.data[y * s + x] * inside[y * s + x]);
    let cx = rng.random_range(0.25..0.5) * f;
    let cy = rng.random_range(0.3..0.7) * f;
    let mut finding = Vec::new();
    match class {
        1 => {
            let m = Shape::Ellipse {
                cx,
                cy,
                rx: rng.random_range(0.11..0.15) * f,
                ry: rng.random_range(0.09..0.13) * f,
                angle: rng.random_range(0.0..PI),
            };
            c.paint(&m, [0.7; 3], 0.95);
            finding.push(m);
        }
        2 => {
            let r = rng.random_range(0.09..0.12) * f;
            let m = Shape::random_blob(rng, cx, cy, r, 0.35, 7..=12, 3);
            c.paint(&m, [0.75; 3], 0.95);
            for k in 0..rng.random_range(6..10) {
                let a = k as f32 * 2.0 * PI / 8.0 + rng.random_range(-0.3..0.3);
                let len = rng.random_range(1.5..2.1) * r;
                c.paint(
                    &Shape::Segment {
                        x0: cx,
                        y0: cy,
                        x1: cx + a.cos() * len,
                        y1: cy + a.sin() * len,
                        width: 0.012 * f,
                    },
                    [0.7; 3],
                    0.9,
                );
            }
            finding.push(m);
        }
        _ => {}
    }
    c.noise(rng, 0.015);
    (c, lesion_mask(s, &finding))
}

/// Dermoscopy (RGB). Classes: 0 "Nevus" (small round uniform brown), 1 "Melanoma" (large,
/// irregular border, black and blue-grey blotches), 2 "Basal cell carcinoma" (pink pearly with
/// red branching vessels). Every case has its lesion mask.
pub fn dermoscopy<R: Rng>(rng: &mut R, s: usize, class: usize) -> Rendered {
    let f = s as f32;
    let tone = rng.random_range(0.75..0.92);
    let mut c = Canvas::new(s, s, 3, [tone, tone * 0.8, tone * 0.68]);
    c.texture(rng, 0.02, 3);
    let cx = rng.random_range(0.4..0.6) * f;
    let cy = rng.random_range(0.4..0.6) * f;
    let lesion = match class {
        1 => {
            let r = rng.random_range(0.2..0.28) * f;
            let l = Shape::random_blob(rng, cx, cy, r, 0.22, 2..=5, 4);
            c.paint(&l, [0.32, 0.2, 0.13], 1.0);
            for _ in 0..rng.random_range(2..4) {
                let (bx, by, br) = (
                    cx + rng.random_range(-0.4..0.4) * r,
                    cy + rng.random_range(-0.4..0.4) * r,
                    rng.random_range(0.2..0.35) * r,
                );
                let b = Shape::random_blob(rng, bx, by, br, 0.3, 2..=4, 2);
                let col = if rng.random_bool(0.5) {
                    [0.08, 0.06, 0.06]
                } else {
                    [0.42, 0.46, 0.56]
                };
                c.paint(&b, col, 0.85);
            }
            l
        }
        2 => {
            let r = rng.random_range(0.14..0.2) * f;
            let l = Shape::random_blob(rng, cx, cy, r, 0.08, 2..=3, 2);
            c.paint(&l, [0.9, 0.45, 0.55], 1.0);
            for _ in 0..rng.random_range(3..6) {
                let a: f32 = rng.random_range(0.0..2.0 * PI);
                let (x0, y0) = (
                    cx + rng.random_range(-0.5..0.5) * r,
                    cy + rng.random_range(-0.5..0.5) * r,
                );
                c.paint(
                    &Shape::Segment {
                        x0,
                        y0,
                        x1: x0 + a.cos() * 0.6 * r,
                        y1: y0 + a.sin() * 0.6 * r,
                        width: 0.012 * f,
                    },
                    [0.75, 0.12, 0.18],
                    0.9,
                );
            }
            l
        }
        _ => {
            let r = rng.random_range(0.09..0.13) * f;
            let l = Shape::Ellipse {
                cx,
                cy,
                rx: r,
                ry: r * rng.random_range(0.85..1.0),
                angle: rng.random_range(0.0..PI),
            };
            c.paint(&l, [0.45, 0.3, 0.2], 1.0);
            l
        }
    };
    // Hairs.
    for _ in 0..rng.random_range(0..3) {
        let (x0, y0) = (rng.random_range(0.0..f), rng.random_range(0.0..f));
        let a: f32 = rng.random_range(0.0..2.0 * PI);
        c.paint(
            &Shape::Segment {
                x0,
                y0,
                x1: x0 + a.cos() * 0.5 * f,
                y1: y0 + a.sin() * 0.5 * f,
                width: 0.008 * f,
            },
            [0.15, 0.1, 0.08],
            0.8,
        );
    }
    c.noise(rng, 0.01);
    (c, lesion_mask(s, &[lesion]))
}

/// Fundus photograph (RGB). Classes: 0 "Normal", 1 "Diabetic retinopathy" (a cluster of
/// haemorrhages and hard exudates left of the disc; the mask is the cluster's region, so that a box
/// can cover it: the union of the lesions alone fills about 5 % of its bounding box, which caps a
/// box's IoU there), 2 "Glaucoma" (cup-to-disc ratio about 0.8; the mask is the optic disc). The
/// disc is 22 % of the side across, so that at the demo's 56 pixels the glaucoma cup is 9-10
/// pixels across against 3-5 (with a disc of 17 %: 7-8 against 2-4).
pub fn fundus<R: Rng>(rng: &mut R, s: usize, class: usize) -> Rendered {
    let f = s as f32;
    let mut c = Canvas::new(s, s, 3, [0.0; 3]);
    let retina = Shape::circle(0.5 * f, 0.5 * f, 0.47 * f);
    c.paint(&retina, [0.78, 0.32, 0.12], 1.0);
    let (dcx, dcy) = (
        rng.random_range(0.66..0.74) * f,
        rng.random_range(0.45..0.55) * f,
    );
    let disc_r = 0.11 * f;
    // Vessels leave the disc in four arcades.
    for k in 0..4 {
        let a = PI + (k as f32 - 1.5) * 0.5 + rng.random_range(-0.15..0.15);
        c.paint(
            &Shape::Segment {
                x0: dcx,
                y0: dcy,
                x1: dcx + a.cos() * 0.55 * f,
                y1: dcy + a.sin() * 0.4 * f,
                width: 0.018 * f,
            },
            [0.5, 0.08, 0.05],
            0.9,
        );
    }
    let disc = Shape::circle(dcx, dcy, disc_r);
    c.paint(&disc, [0.96, 0.8, 0.5], 1.0);
    let cup_ratio = if class == 2 {
        rng.random_range(0.75..0.85)
    } else {
        rng.random_range(0.25..0.4)
    };
    c.paint(
        &Shape::circle(dcx, dcy, disc_r * cup_ratio),
        [1.0, 0.95, 0.8],
        1.0,
    );
    let mut finding = Vec::new();
    match class {
        1 => {
            // The cluster: a region 22-30 % of the side across, its lesions inside it.
            let (cx, cy, rc) = (
                rng.random_range(0.28..0.4) * f,
                rng.random_range(0.35..0.65) * f,
                rng.random_range(0.11..0.15) * f,
            );
            for k in 0..rng.random_range(8..15) {
                let (col, r) = if k % 3 == 2 {
                    ([0.96, 0.88, 0.3], 0.04 * f)
                } else {
                    ([0.4, 0.03, 0.03], 0.03 * f)
                };
                let a: f32 = rng.random_range(0.0..2.0 * PI);
                let d = rng.random_range(0.0f32..1.0).sqrt() * (rc - r);
                c.paint(
                    &Shape::circle(cx + a.cos() * d, cy + a.sin() * d, r),
                    col,
                    1.0,
                );
            }
            finding.push(Shape::circle(cx, cy, rc));
        }
        2 => finding.push(disc),
        _ => {}
    }
    // Vignetting and noise.
    c.mul_field(|x, y| {
        let d = ((x as f32 - 0.5 * f).powi(2) + (y as f32 - 0.5 * f).powi(2)).sqrt() / (0.5 * f);
        (1.0 - 0.35 * d * d).max(0.0)
    });
    c.noise(rng, 0.01);
    (c, lesion_mask(s, &finding))
}

/// H&E pathology tile (RGB). Classes: 0 "Benign tissue" (glands lined by small regular nuclei),
/// 1 "Adenocarcinoma" (a dense sheet of large irregular nuclei; the mask is the sheet),
/// 2 "Squamous cell carcinoma" (a keratin pearl; the mask is the pearl).
pub fn pathology<R: Rng>(rng: &mut R, s: usize, class: usize) -> Rendered {
    let f = s as f32;
    let mut c = Canvas::new(s, s, 3, [0.93, 0.7, 0.82]);
    c.texture(rng, 0.03, 2);
    let nucleus = [0.35, 0.18, 0.55];
    for _ in 0..(s * s / 120) {
        let n = Shape::circle(
            rng.random_range(0.0..f),
            rng.random_range(0.0..f),
            0.012 * f,
        );
        c.paint(&n, nucleus, 0.8);
    }
    let mut finding = Vec::new();
    match class {
        1 => {
            let (cx, cy) = (
                rng.random_range(0.35..0.65) * f,
                rng.random_range(0.35..0.65) * f,
            );
            let r = rng.random_range(0.2..0.28) * f;
            let sheet = Shape::random_blob(rng, cx, cy, r, 0.15, 2..=4, 3);
            c.paint(&sheet, [0.78, 0.55, 0.75], 1.0);
            for _ in 0..(r * r / (0.0009 * f * f)) as usize {
                let a: f32 = rng.random_range(0.0..2.0 * PI);
                let d = rng.random_range(0.0..1.0f32).sqrt() * r;
                let nr = rng.random_range(0.02..0.032) * f;
                let n =
                    Shape::random_blob(rng, cx + a.cos() * d, cy + a.sin() * d, nr, 0.25, 2..=3, 2);
                if sheet.sdf(cx + a.cos() * d, cy + a.sin() * d) < 0.0 {
                    c.paint(&n, [0.25, 0.1, 0.45], 0.9);
                }
            }
            finding.push(sheet);
        }
        2 => {
            let (cx, cy) = (
                rng.random_range(0.35..0.65) * f,
                rng.random_range(0.35..0.65) * f,
            );
            let r = rng.random_range(0.12..0.17) * f;
            let pearl = Shape::circle(cx, cy, r);
            for k in 0..4 {
                let rr = r * (1.0 - k as f32 * 0.22);
                let col = if k % 2 == 0 {
                    [0.97, 0.58, 0.48]
                } else {
                    [0.99, 0.8, 0.7]
                };
                c.paint(&Shape::circle(cx, cy, rr), col, 1.0);
            }
            finding.push(pearl);
        }
        _ => {
            for _ in 0..rng.random_range(2..4) {
                let (gx, gy) = (
                    rng.random_range(0.2..0.8) * f,
                    rng.random_range(0.2..0.8) * f,
                );
                let gr = rng.random_range(0.08..0.12) * f;
                c.paint(&Shape::circle(gx, gy, gr), [0.98, 0.95, 0.97], 1.0);
                for k in 0..12 {
                    let a = k as f32 * 2.0 * PI / 12.0;
                    c.paint(
                        &Shape::circle(
                            gx + a.cos() * gr * 1.15,
                            gy + a.sin() * gr * 1.15,
                            0.014 * f,
                        ),
                        nucleus,
                        0.9,
                    );
                }
            }
        }
    }
    c.noise(rng, 0.01);
    (c, lesion_mask(s, &finding))
}

/// Breast ultrasound (a fan of speckle). Classes: 0 "Normal", 1 "Benign" (oval, wider than tall,
/// anechoic, smooth, posterior enhancement), 2 "Malignant" (irregular, taller than wide,
/// hypoechoic, posterior shadow).
pub fn ultrasound<R: Rng>(rng: &mut R, s: usize, class: usize) -> Rendered {
    let f = s as f32;
    let mut c = Canvas::new(s, s, 1, [0.45; 3]);
    c.texture(rng, 0.06, 1);
    let (cx, cy) = (
        rng.random_range(0.4..0.6) * f,
        rng.random_range(0.4..0.55) * f,
    );
    let mut finding = Vec::new();
    match class {
        1 => {
            let (rx, ry) = (
                rng.random_range(0.13..0.18) * f,
                rng.random_range(0.07..0.1) * f,
            );
            let l = Shape::Ellipse {
                cx,
                cy,
                rx,
                ry,
                angle: rng.random_range(-0.2..0.2),
            };
            // Posterior acoustic enhancement: brighter column below.
            let below = Shape::Ellipse {
                cx,
                cy: cy + 2.2 * ry,
                rx: 0.9 * rx,
                ry: 1.5 * ry,
                angle: 0.0,
            };
            c.paint(&below, [0.7; 3], 0.6);
            c.paint(&l, [0.05; 3], 1.0);
            finding.push(l);
        }
        2 => {
            let r = rng.random_range(0.09..0.12) * f;
            let l = match Shape::random_blob(rng, cx, cy, r, 0.25, 3..=6, 4) {
                Shape::Blob {
                    cx, cy, harmonics, ..
                } => {
                    // Taller than wide: stretch vertically through the second harmonic.
                    let mut h = harmonics;
                    h.push((2, 0.3, PI));
                    Shape::Blob {
                        cx,
                        cy,
                        r,
                        harmonics: h,
                    }
                }
                other => other,
            };
            let shadow = Shape::Segment {
                x0: cx,
                y0: cy,
                x1: cx,
                y1: f,
                width: 1.6 * r,
            };
            c.paint(&shadow, [0.12; 3], 0.8);
            c.paint(&l, [0.15; 3], 1.0);
            finding.push(l);
        }
        _ => {}
    }
    c.speckle(rng);
    c.blur(1);
    // Fan-shaped field of view with its apex at the top centre.
    c.mul_field(|x, y| {
        let dx = x as f32 + 0.5 - 0.5 * f;
        let dy = y as f32 + 0.5 + 0.1 * f;
        let ang = dx.atan2(dy).abs();
        let r = (dx * dx + dy * dy).sqrt();
        if ang < 0.7 && r < 1.05 * f { 1.0 } else { 0.0 }
    });
    (c, lesion_mask(s, &finding))
}

/// One slice of a 3-D study: `z` in [0, 1] is the slice position, `geometry` fixed per volume.
#[derive(Debug, Clone)]
pub struct VolumeGeometry {
    pub cx: f32,
    pub cy: f32,
    pub r: f32,
    pub blob: Option<Shape>,
}

/// Chest CT slice. Classes: 0 "No finding", 1 "Lung nodule" (small round, solid), 2 "Lung mass"
/// (large, irregular). The lesion is an elongated body present on every slice, widest mid-volume.
pub fn ct_slice<R: Rng>(
    rng: &mut R,
    s: usize,
    class: usize,
    z: f32,
    g: &VolumeGeometry,
) -> Rendered {
    let f = s as f32;
    let mut c = Canvas::new(s, s, 1, [0.0; 3]);
    c.paint(
        &Shape::Ellipse {
            cx: 0.5 * f,
            cy: 0.52 * f,
            rx: 0.46 * f,
            ry: 0.36 * f,
            angle: 0.0,
        },
        [0.45; 3],
        1.0,
    );
    let lung_scale = 0.85 + 0.15 * (PI * z).sin();
    for x in [0.32f32, 0.68] {
        c.paint(
            &Shape::Ellipse {
                cx: x * f,
                cy: 0.5 * f,
                rx: 0.15 * f * lung_scale,
                ry: 0.25 * f * lung_scale,
                angle: 0.0,
            },
            [0.08; 3],
            1.0,
        );
    }
    c.paint(&Shape::circle(0.5 * f, 0.8 * f, 0.06 * f), [0.95; 3], 1.0);
    c.paint(&Shape::circle(0.52 * f, 0.5 * f, 0.07 * f), [0.6; 3], 1.0);
    // Pulmonary vessels: small bright dots in the lungs.
    for _ in 0..8 {
        let side = if rng.random_bool(0.5) { 0.32 } else { 0.68 };
        c.paint(
            &Shape::circle(
                (side + rng.random_range(-0.08..0.08)) * f,
                (0.5 + rng.random_range(-0.15..0.15)) * f,
                0.01 * f,
            ),
            [0.5; 3],
            0.8,
        );
    }
    let taper = 0.65 + 0.35 * (PI * z).sin();
    let lesion = match (class, &g.blob) {
        (1, _) => Some(Shape::circle(g.cx, g.cy, g.r * taper)),
        (2, Some(Shape::Blob { harmonics, .. })) => Some(Shape::Blob {
            cx: g.cx,
            cy: g.cy,
            r: g.r * taper,
            harmonics: harmonics.clone(),
        }),
        _ => None,
    };
    if let Some(l) = &lesion {
        c.paint(l, [0.55; 3], 1.0);
    }
    c.noise(rng, 0.02);
    (c, lesion.and_then(|l| lesion_mask(s, &[l])))
}

/// Brain MRI slice (T1 post-contrast-like). Classes: 0 "No tumor", 1 "Glioma" (irregular
/// enhancing mass with surrounding edema, inside a hemisphere), 2 "Meningioma" (round, bright,
/// against the skull), 3 "Pituitary tumor" (small, midline, skull base).
pub fn mri_slice<R: Rng>(
    rng: &mut R,
    s: usize,
    class: usize,
    z: f32,
    g: &VolumeGeometry,
) -> Rendered {
    let f = s as f32;
    let mut c = Canvas::new(s, s, 1, [0.0; 3]);
    let scale = 0.85 + 0.15 * (PI * z).sin();
    let head = Shape::Ellipse {
        cx: 0.5 * f,
        cy: 0.5 * f,
        rx: 0.4 * f * scale,
        ry: 0.46 * f * scale,
        angle: 0.0,
    };
    c.paint(&head, [0.9; 3], 1.0);
    c.paint(
        &Shape::Ellipse {
            cx: 0.5 * f,
            cy: 0.5 * f,
            rx: 0.36 * f * scale,
            ry: 0.42 * f * scale,
            angle: 0.0,
        },
        [0.42; 3],
        1.0,
    );
    for x in [0.45f32, 0.55] {
        c.paint(
            &Shape::Ellipse {
                cx: x * f,
                cy: 0.47 * f,
                rx: 0.035 * f,
                ry: 0.09 * f * scale,
                angle: if x < 0.5 { 0.3 } else { -0.3 },
            },
            [0.12; 3],
            1.0,
        );
    }
    c.texture(rng, 0.03, 1);
    let taper = 0.65 + 0.35 * (PI * z).sin();
    let lesion = match (class, &g.blob) {
        (1, Some(Shape::Blob { harmonics, .. })) => {
            let core = Shape::Blob {
                cx: g.cx,
                cy: g.cy,
                r: g.r * taper,
                harmonics: harmonics.clone(),
            };
            c.paint(
                &Shape::circle(g.cx, g.cy, 1.6 * g.r * taper),
                [0.62; 3],
                0.8,
            );
            c.paint(&core, [0.85; 3], 1.0);
            Some(core)
        }
        (2 | 3, _) => {
            let l = Shape::circle(g.cx, g.cy, g.r * taper);
            c.paint(&l, [0.8; 3], 1.0);
            Some(l)
        }
        _ => None,
    };
    c.noise(rng, 0.015);
    (c, lesion.and_then(|l| lesion_mask(s, &[l])))
}

/// Fixed per-volume lesion geometry for CT (`domain_ct = true`) or MRI.
pub fn volume_geometry<R: Rng>(
    rng: &mut R,
    s: usize,
    class: usize,
    domain_ct: bool,
) -> VolumeGeometry {
    let f = s as f32;
    if domain_ct {
        let side = if rng.random_bool(0.5) { 0.32 } else { 0.68 };
        let (cx, cy) = (
            (side + rng.random_range(-0.05..0.05)) * f,
            (0.5 + rng.random_range(-0.1..0.1)) * f,
        );
        let r = if class == 2 {
            rng.random_range(0.1..0.13) * f
        } else {
            rng.random_range(0.045..0.06) * f
        };
        let blob = (class == 2).then(|| Shape::random_blob(rng, cx, cy, r, 0.25, 2..=5, 3));
        VolumeGeometry { cx, cy, r, blob }
    } else {
        match class {
            1 => {
                let side = if rng.random_bool(0.5) { 0.36 } else { 0.64 };
                let (cx, cy) = (side * f, rng.random_range(0.35..0.6) * f);
                let r = rng.random_range(0.08..0.11) * f;
                let blob = Some(Shape::random_blob(rng, cx, cy, r, 0.25, 2..=5, 3));
                VolumeGeometry { cx, cy, r, blob }
            }
            2 => {
                // Against the inner table of the skull.
                let a: f32 = rng.random_range(-2.6..-0.5);
                let r = rng.random_range(0.07..0.09) * f;
                let (cx, cy) = (
                    0.5 * f + a.cos() * (0.3 * f),
                    0.5 * f + a.sin() * (0.36 * f),
                );
                VolumeGeometry {
                    cx,
                    cy,
                    r,
                    blob: None,
                }
            }
            3 => VolumeGeometry {
                cx: 0.5 * f,
                cy: 0.66 * f,
                r: rng.random_range(0.045..0.06) * f,
                blob: None,
            },
            _ => VolumeGeometry {
                cx: 0.0,
                cy: 0.0,
                r: 0.0,
                blob: None,
            },
        }
    }
}
