//! The synthetic world: reproducible, in the training schema, imbalanced as configured, and with
//! classes that are visible in the data.

use qoq_core::Domain;
use qoq_data::manifest::{Manifest, ManifestConfig};
use qoq_synth::canvas::{Canvas, Mask};
use qoq_synth::{WorldConfig, generate, render};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

fn tiny() -> WorldConfig {
    WorldConfig {
        image_size: 28,
        volume_slices: 3,
        largest_domain_rows: 30,
        domain_imbalance: 10.0,
        test_per_class: 1,
        ecg_seconds: 2.0,
        ..WorldConfig::default()
    }
}

fn tree_hashes(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                let h = Sha256::digest(std::fs::read(&p).unwrap());
                out.insert(rel, format!("{h:x}"));
            }
        }
    }
    out
}

#[test]
fn the_world_is_byte_reproducible_and_depends_on_the_seed() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    generate(&tiny(), a.path()).unwrap();
    generate(&tiny(), b.path()).unwrap();
    let other = WorldConfig { seed: 1, ..tiny() };
    generate(&other, c.path()).unwrap();
    let (ha, hb, hc) = (
        tree_hashes(a.path()),
        tree_hashes(b.path()),
        tree_hashes(c.path()),
    );
    assert!(ha.len() > 50, "only {} files", ha.len());
    assert_eq!(ha, hb);
    assert_ne!(ha.get("train.jsonl"), hc.get("train.jsonl"));
}

#[test]
fn manifests_read_back_in_the_training_schema_with_the_configured_imbalance() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WorldConfig {
        largest_domain_rows: 100,
        ..tiny()
    };
    let summary = generate(&cfg, dir.path()).unwrap();
    let m = Manifest::open(&dir.path().join("train.jsonl"), ManifestConfig::default()).unwrap();
    let mut per_domain: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_answer: BTreeMap<(String, String), usize> = BTreeMap::new();
    for row in m.rows().unwrap() {
        let s = row.unwrap();
        *per_domain
            .entry(s.data_source.as_source().to_string())
            .or_default() += 1;
        *per_answer
            .entry((s.dataset.clone(), s.answer.clone()))
            .or_default() += 1;
        for p in s.images.iter().chain(&s.videos).chain(&s.time_series) {
            assert!(p.exists(), "{} is missing", p.display());
        }
        if let Some(seg) = &s.segmentation_path {
            assert!(seg.exists());
            let b = s.bbox.expect("a mask comes with its box");
            assert!(b[0] <= b[2] && b[1] <= b[3] && b[2] < 28.0 && b[3] < 28.0);
        }
        if s.data_source == Domain::Ecg {
            assert!(s.images.is_empty() && s.time_series.len() == 1);
        }
    }
    assert_eq!(per_domain.len(), 9, "{per_domain:?}");
    // Counts per domain equal the summary, and they fall with the size rank.
    let ranked = summary.train_rows_per_domain();
    for (src, n) in &ranked {
        assert_eq!(per_domain[src], *n, "{src}");
    }
    assert_eq!(ranked[0].1, 100);
    assert_eq!(ranked[8].1, 10);
    assert!(ranked.windows(2).all(|w| w[0].1 >= w[1].1), "{ranked:?}");
    // Class imbalance inside the largest dataset.
    let ct: Vec<usize> = ["No finding", "Lung nodule", "Lung mass"]
        .iter()
        .map(|l| per_answer[&("synth-chest-ct".to_string(), l.to_string())])
        .collect();
    assert!(ct[0] > 2 * ct[2], "{ct:?}");
    // The test split is balanced.
    let t = Manifest::open(&dir.path().join("test.jsonl"), ManifestConfig::default()).unwrap();
    assert_eq!(
        t.len(),
        summary
            .datasets
            .iter()
            .map(|d| d.test.counts.len())
            .sum::<usize>()
    );
}

#[test]
fn ecg_records_read_back_as_12_leads_at_the_configured_rate() {
    let dir = tempfile::tempdir().unwrap();
    generate(&tiny(), dir.path()).unwrap();
    let m = Manifest::open(&dir.path().join("test.jsonl"), ManifestConfig::default()).unwrap();
    let ecg = m
        .rows()
        .unwrap()
        .map(|r| r.unwrap())
        .find(|s| s.data_source == Domain::Ecg)
        .unwrap();
    let rec = qoq_data::wfdb::read_record(&ecg.time_series[0]).unwrap();
    let sig = rec.to_signal();
    assert_eq!(sig.fs, 250.0);
    assert_eq!(sig.leads.len(), 12);
    assert_eq!(sig.data[0].len(), 500);
    let leads = qoq_data::ecg::select_leads(&sig).unwrap();
    assert_eq!(leads.len(), 8);
    let peak = leads[1].iter().cloned().fold(f32::MIN, f32::max);
    assert!((0.5..2.0).contains(&peak), "lead II peak {peak} mV");
}

/// How different the masked pixels look from a ring of pixels just outside the mask.
fn contrast(img: &Canvas, mask: &Mask) -> f32 {
    let (w, h) = (mask.width, mask.height);
    let mut ring = Mask::new(w, h);
    for y in 0..h {
        for x in 0..w {
            if mask.data[y * w + x] {
                continue;
            }
            let near = (y.saturating_sub(3)..(y + 4).min(h))
                .any(|yy| (x.saturating_sub(3)..(x + 4).min(w)).any(|xx| mask.data[yy * w + xx]));
            ring.data[y * w + x] = near;
        }
    }
    // Mean colour of the ring, then the mean L1 distance of the mask's pixels to it.
    let ch = img.channels;
    let ring_mean: Vec<f32> = (0..ch)
        .map(|c| {
            let v: Vec<f32> = (0..w * h)
                .filter(|&i| ring.data[i])
                .map(|i| img.data[i * ch + c])
                .collect();
            v.iter().sum::<f32>() / v.len() as f32
        })
        .collect();
    let inside: Vec<usize> = (0..w * h).filter(|&i| mask.data[i]).collect();
    inside
        .iter()
        .map(|&i| {
            (0..ch)
                .map(|c| (img.data[i * ch + c] - ring_mean[c]).abs())
                .sum::<f32>()
                / ch as f32
        })
        .sum::<f32>()
        / inside.len() as f32
}

#[test]
fn findings_are_visible_structures_with_exact_masks() {
    let s = 64;
    type R = fn(&mut ChaCha8Rng, usize, usize) -> render::Rendered;
    let cases: Vec<(&str, R, Vec<usize>)> = vec![
        ("cxr", |r, s, c| render::chest_xray(r, s, c, 0), vec![1, 2]),
        ("mammo", render::mammography, vec![1, 2]),
        ("derm", render::dermoscopy, vec![0, 1, 2]),
        ("fundus", render::fundus, vec![1, 2]),
        ("path", render::pathology, vec![1, 2]),
        ("us", render::ultrasound, vec![1, 2]),
    ];
    for (name, f, abnormal) in cases {
        for class in 0..3 {
            for seed in 0..4 {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let (img, mask) = f(&mut rng, s, class);
                assert_eq!((img.width, img.height), (s, s));
                if abnormal.contains(&class) {
                    let m = mask.unwrap_or_else(|| panic!("{name} class {class} has no mask"));
                    assert!(m.count() > 10, "{name} {class}");
                    let c = contrast(&img, &m);
                    assert!(c > 0.08, "{name} class {class} seed {seed}: contrast {c}");
                } else if name != "derm" {
                    assert!(
                        mask.is_none(),
                        "{name} class {class} is normal but has a mask"
                    );
                }
            }
        }
    }
}

/// Side of the demo's images, in pixels.
const DEMO_SIDE: usize = 56;

/// The findings of classes 1 and 2 of `render` at [`DEMO_SIDE`] pixels, seeds 0 to 31: `(class,
/// seed, mask pixels, box width, box height)`.
fn demo_findings(
    render: fn(&mut ChaCha8Rng, usize, usize) -> render::Rendered,
) -> Vec<(usize, u64, usize, usize, usize)> {
    let mut out = Vec::new();
    for class in [1, 2] {
        for seed in 0..32 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (_, mask) = render(&mut rng, DEMO_SIDE, class);
            let m = mask.unwrap_or_else(|| panic!("class {class} seed {seed}: no mask"));
            let [x0, y0, x1, y1] = m.bbox().expect("a finding's mask has pixels");
            out.push((class, seed, m.count(), x1 - x0 + 1, y1 - y0 + 1));
        }
    }
    out
}

#[test]
fn mammography_masses_span_more_than_a_quarter_of_a_merged_token() {
    // At the demo's 56 pixels a merged vision token covers 28 x 28: a mass of 3-5 pixels could be
    // classified but not boxed. Both masses are at least 15 % of the side across, at most 40 %.
    for (class, seed, _, w, h) in demo_findings(render::mammography) {
        for side in [w, h] {
            assert!(
                side * 100 >= 15 * DEMO_SIDE && side * 100 <= 40 * DEMO_SIDE,
                "class {class} seed {seed}: mass {w} x {h} pixels in {DEMO_SIDE}"
            );
        }
    }
}

#[test]
fn fundus_findings_can_be_boxed_at_the_demo_resolution() {
    // A box covers a finding only where its mask fills the box: retinopathy's mask is the lesion
    // cluster's region (its dots alone filled about 5 % of their bounding box), glaucoma's the
    // optic disc; both at least 20 % of the 56-pixel side across and filling at least 60 % of
    // their bounding box.
    for (class, seed, pixels, w, h) in demo_findings(render::fundus) {
        assert!(
            w.min(h) * 100 >= 20 * DEMO_SIDE,
            "class {class} seed {seed}: finding {w} x {h} pixels in {DEMO_SIDE}"
        );
        let fill = pixels as f64 / (w * h) as f64;
        assert!(
            fill >= 0.6,
            "class {class} seed {seed}: mask fills {fill:.2} of its box"
        );
    }
}

#[test]
fn glaucoma_has_a_larger_cup_and_retinopathy_has_lesions() {
    // Brightest (cup) area in the disc region grows with glaucoma.
    let cup_area = |class| {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (img, _) = render::fundus(&mut rng, 64, class);
        img.data
            .chunks(3)
            .filter(|p| p[0] > 0.85 && p[1] > 0.8 && p[2] > 0.6)
            .count()
    };
    assert!(
        cup_area(2) > 2 * cup_area(0),
        "{} {}",
        cup_area(2),
        cup_area(0)
    );
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (_, dr) = render::fundus(&mut rng, 64, 1);
    assert!(dr.unwrap().count() > 20);
}

#[test]
fn bad_configs_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let e = generate(
        &WorldConfig {
            image_size: 8,
            ..tiny()
        },
        dir.path(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("image_size"), "{e}");
    let e = generate(
        &WorldConfig {
            domain_imbalance: f64::NAN,
            ..tiny()
        },
        dir.path(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("imbalance"), "{e}");
}
