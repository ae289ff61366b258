//! qoq-data on real clinical files (../shared/reference/REAL_DATA.md), fetched with pinned sha256
//! by `scripts/fetch-testdata.sh` into `$QOQ_TESTDATA` or `<repo>/.testdata`. Expected values come
//! from pydicom / nibabel / pynrrd through `tools/fixtures/data.py` (tests/fixtures/data_real.json).
//! A missing cache file fails the test with a message naming the fetch script.

use image::GenericImageView;
use qoq_data::dicom::{self, Windowing};
use qoq_data::ecg_io::{self, EcgLoadOptions};
use qoq_data::vision::{self, ImageLoadOptions};
use qoq_data::volume;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn cache() -> PathBuf {
    match std::env::var_os("QOQ_TESTDATA") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.testdata"),
    }
}

fn need(rel: &str) -> PathBuf {
    let p = cache().join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-testdata.sh first (cache: $QOQ_TESTDATA or <repo>/.testdata)",
        p.display()
    );
    p
}

fn fixtures() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data_real.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

fn points(v: &Value) -> Vec<(usize, usize)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_u64().unwrap() as usize,
                p[1].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

/// R-peak sample indices: high-pass by removing a 200 ms moving average, then local maxima above
/// half the largest deflection, at least 250 ms apart.
fn r_peaks(x: &[f32], fs: f64) -> Vec<usize> {
    let half = (0.1 * fs) as usize;
    let hp: Vec<f32> = (0..x.len())
        .map(|i| {
            let (a, b) = (i.saturating_sub(half), (i + half + 1).min(x.len()));
            x[i] - x[a..b].iter().sum::<f32>() / (b - a) as f32
        })
        .collect();
    let max = hp.iter().cloned().fold(f32::MIN, f32::max);
    let refractory = (0.25 * fs) as usize;
    let mut peaks: Vec<usize> = Vec::new();
    for i in 1..hp.len() - 1 {
        let (a, b) = (i.saturating_sub(refractory), (i + refractory).min(hp.len()));
        let is_max = hp[a..b].iter().all(|&v| v <= hp[i]);
        if hp[i] > 0.5 * max && is_max && peaks.last().is_none_or(|&p| i - p >= refractory) {
            peaks.push(i);
        }
    }
    peaks
}

#[test]
fn dicom_ecg_waveform_decodes_to_twelve_named_leads_in_mv() {
    let fx = &fixtures()["waveform_ecg"];
    let path = need("ecg/waveform_ecg.dcm");
    let sig = ecg_io::load_ecg(&path, &EcgLoadOptions::default()).unwrap();
    assert_eq!(sig.fs, 1000.0);
    assert_eq!(sig.leads, ecg_io::STANDARD_LEADS.to_vec());
    assert_eq!(sig.data.len(), 12);
    assert!(sig.data.iter().all(|l| l.len() == 10_000));
    for (i, v) in fx["lead_ii_mv"].as_object().unwrap() {
        let i: usize = i.parse().unwrap();
        assert!((sig.data[1][i] as f64 - f(v)).abs() < 1e-6, "II[{i}]");
    }
    for (i, v) in fx["lead_v6_mv"].as_object().unwrap() {
        let i: usize = i.parse().unwrap();
        assert!((sig.data[11][i] as f64 - f(v)).abs() < 1e-6, "V6[{i}]");
    }
    // Sinus rhythm at RR 982 ms (the device's reading): detected R peaks of lead II agree.
    let peaks = r_peaks(&sig.data[1], sig.fs);
    assert!((9..=11).contains(&peaks.len()), "{peaks:?}");
    let rr: Vec<f64> = peaks.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
    let mean_rr = rr.iter().sum::<f64>() / rr.len() as f64;
    assert!(
        (mean_rr - f(&fx["rr_ms_annotation"])).abs() <= 40.0,
        "mean RR {mean_rr} ms"
    );
    assert!(rr.iter().all(|r| (r - mean_rr).abs() < 100.0), "{rr:?}");
    // and the signal feeds the model path
    let input =
        qoq_data::ecg::to_model_input(&sig, qoq_data::ecg::EcgConvention::EcgJepa, false).unwrap();
    assert_eq!(input.len(), 8 * 2500);
    // the median-beat item is readable too
    let median = dicom::read_ecg(&path, 1).unwrap();
    assert_eq!((median.data.len(), median.data[0].len()), (12, 1200));
    assert!(dicom::read_ecg(&path, 2).is_err());
}

#[test]
fn scipy_mit_bih_record_reads_as_an_npz_ecg() {
    let fx = &fixtures()["scipy_ecg"];
    let path = need("ecg/ecg.dat");
    let arr = qoq_data::npy::read_npz(&path, Some("ecg")).unwrap();
    assert_eq!(arr.shape, vec![fx["len"].as_u64().unwrap() as usize]);
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("208.npz");
    std::fs::copy(&path, &npz).unwrap();
    let opts = EcgLoadOptions {
        fs: Some(360.0),
        offset: 1024.0,
        gain: 200.0,
        npz_key: Some("ecg".into()),
        leads: Some(vec!["MLII".into()]),
        ..EcgLoadOptions::default()
    };
    let sig = ecg_io::load_ecg(&npz, &opts).unwrap();
    assert_eq!(sig.leads, vec!["MLII"]);
    for (i, v) in fx["mv"].as_object().unwrap() {
        let i: usize = i.parse().unwrap();
        assert!((sig.data[0][i] as f64 - f(v)).abs() < 1e-6, "sample {i}");
    }
    // 5 minutes of a ~70-100 bpm rhythm with PVCs: a plausible beat count.
    let beats = r_peaks(&sig.data[0][..360 * 60], 360.0).len();
    assert!(
        (40..=130).contains(&beats),
        "{beats} beats in the first minute"
    );
}

fn modality(rel: &str) -> dicom::DicomPixels {
    dicom::read_pixels(&need(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn compressed_dicom_equals_its_uncompressed_twin() {
    let twins = [
        ("dicom/MR_small.dcm", "dicom/MR_small_RLE.dcm"),
        ("dicom/MR_small.dcm", "dicom/MR_small_jp2klossless.dcm"),
        ("dicom/MR_small.dcm", "dicom/MR_small_bigendian.dcm"),
        ("dicom/MR_small.dcm", "dicom/MR_small_implicit.dcm"),
        ("dicom/emri_small.dcm", "dicom/emri_small_RLE.dcm"),
        (
            "dicom/emri_small.dcm",
            "dicom/emri_small_jpeg_2k_lossless.dcm",
        ),
        ("dicom/RG3_UNCR.dcm", "dicom/RG3_J2KR.dcm"),
        ("dicom/SC_rgb_2frame.dcm", "dicom/SC_rgb_rle_2frame.dcm"),
    ];
    for (plain, packed) in twins {
        let (a, b) = (modality(plain), modality(packed));
        assert_ne!(a.transfer_syntax, b.transfer_syntax);
        assert_eq!((a.width, a.height), (b.width, b.height), "{packed}");
        assert_eq!(a.frames.len(), b.frames.len(), "{packed}");
        assert!(a.frames == b.frames, "{packed} differs from {plain}");
        let (ia, ib) = (
            a.to_images(Windowing::FromFile).unwrap(),
            b.to_images(Windowing::FromFile).unwrap(),
        );
        assert!(ia == ib, "{packed}: 8-bit images differ");
    }
    let rgb = modality("dicom/SC_rgb_rle_2frame.dcm")
        .to_images(Windowing::FromFile)
        .unwrap();
    assert_eq!(rgb.len(), 2);
    assert!(matches!(rgb[0], image::DynamicImage::ImageRgb8(_)));
}

#[test]
fn jpeg_ls_is_reported_as_an_unsupported_transfer_syntax() {
    let path = need("dicom/MR_small_jpeg_ls_lossless.dcm");
    let e = dicom::read_image(&path, Windowing::FromFile).unwrap_err();
    assert!(
        matches!(&e, qoq_data::Error::UnsupportedTransferSyntax { uid, .. } if uid == "1.2.840.10008.1.2.4.80"),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("unsupported transfer syntax 1.2.840.10008.1.2.4.80")
            && msg.contains("JPEG-LS"),
        "{msg}"
    );
}

#[test]
fn dicom_pixels_and_windows_match_pydicom() {
    let fx = &fixtures()["dicom"];
    for name in [
        "CT_small.dcm",
        "MR_small.dcm",
        "emri_small.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "RG1_UNCR.dcm",
    ] {
        let c = &fx[name];
        let px = modality(&format!("dicom/{name}"));
        assert_eq!(px.transfer_syntax, c["transfer_syntax"].as_str().unwrap());
        assert_eq!(
            px.frames.len() as u64,
            c["frames"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            (px.width as u64, px.height as u64),
            (c["width"].as_u64().unwrap(), c["height"].as_u64().unwrap())
        );
        let sum: f64 = px.frames[0].iter().map(|&v| v as f64).sum();
        assert!(
            (sum - f(&c["modality_sum"])).abs() < 1e-6 * f(&c["modality_sum"]).abs().max(1.0),
            "{name}: sum {sum}"
        );
        let img = px
            .to_images(Windowing::FromFile)
            .unwrap()
            .remove(0)
            .to_luma8();
        for (k, (x, y)) in points(&c["points"]).into_iter().enumerate() {
            let m = px.frames[0][y * px.width as usize + x] as f64;
            assert_eq!(m, f(&c["modality_at"][k]), "{name} modality at ({x}, {y})");
            let u = img.get_pixel(x as u32, y as u32).0[0] as i64;
            assert_eq!(
                u,
                c["u8_at"][k].as_i64().unwrap(),
                "{name} u8 at ({x}, {y})"
            );
        }
    }
    // a fixed window overrides the file's; min-max spans the full range
    let ct = modality("dicom/CT_small.dcm");
    let lung = ct
        .to_images(Windowing::Fixed {
            center: -600.0,
            width: 1500.0,
        })
        .unwrap()
        .remove(0)
        .to_luma8();
    let mm = ct
        .to_images(Windowing::MinMax)
        .unwrap()
        .remove(0)
        .to_luma8();
    assert_ne!(lung, mm);
    assert_eq!(mm.iter().copied().min(), Some(0));
    assert_eq!(mm.iter().copied().max(), Some(255));
}

#[test]
fn monochrome1_chest_radiograph_is_inverted() {
    let c = &fixtures()["dicom"]["RG1_UNCR.dcm"];
    let px = modality("dicom/RG1_UNCR.dcm");
    assert_eq!(px.photometric, "MONOCHROME1");
    let img = px
        .to_images(Windowing::FromFile)
        .unwrap()
        .remove(0)
        .to_luma8();
    let mean = |roi: &Value| {
        let r: Vec<u32> = roi
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut s = 0f64;
        for y in r[1]..r[3] {
            for x in r[0]..r[2] {
                s += img.get_pixel(x, y).0[0] as f64;
            }
        }
        s / ((r[2] - r[0]) * (r[3] - r[1])) as f64
    };
    let (lung, mediastinum) = (mean(&c["lung_roi"]), mean(&c["mediastinum_roi"]));
    // air-filled lung is dark, the mediastinum and spine bright, as on a film
    assert!(
        lung + 50.0 < mediastinum,
        "lung {lung} vs mediastinum {mediastinum}"
    );
    assert!((lung - f(&c["lung_mean_u8"])).abs() < 1e-6);
    assert!((mediastinum - f(&c["mediastinum_mean_u8"])).abs() < 1e-6);
}

#[test]
fn jpeg_dicom_matches_pydicom_and_goes_through_the_image_path() {
    let fx = &fixtures()["dicom"];
    // baseline YBR colour (lossy) may differ from libjpeg by IDCT rounding; lossless RGB must
    // not differ at all.
    for (name, tol) in [
        ("SC_rgb_jpeg_dcmtk.dcm", 3.0),
        ("SC_rgb_jpeg_gdcm.dcm", 0.0),
    ] {
        let c = &fx[name];
        let px = modality(&format!("dicom/{name}"));
        assert_eq!(px.transfer_syntax, c["transfer_syntax"].as_str().unwrap());
        assert_eq!(
            (px.width as u64, px.height as u64),
            (c["width"].as_u64().unwrap(), c["height"].as_u64().unwrap())
        );
        let frame = &px.frames[0];
        let mean = frame.iter().map(|&v| v as f64).sum::<f64>() / frame.len() as f64;
        assert!(
            (mean - f(&c["mean"])).abs() < 0.05 + tol / 10.0,
            "{name}: mean {mean}"
        );
        let spp = px.samples_per_pixel as usize;
        let images = px.to_images(Windowing::FromFile).unwrap();
        for (k, (x, y)) in points(&c["points"]).into_iter().enumerate() {
            let want = c["values_at"][k].as_array().unwrap();
            let at = (y * px.width as usize + x) * spp;
            for (ch, w) in want.iter().enumerate() {
                let got = frame[at + ch] as f64;
                assert!(
                    (got - f(w)).abs() <= tol,
                    "{name} ({x},{y})[{ch}]: {got} vs {w}"
                );
                if spp == 3 {
                    // colour frames are already RGB 8-bit: the image holds the same values
                    let p = images[0].to_rgb8().get_pixel(x as u32, y as u32).0[ch] as f64;
                    assert_eq!(p, got, "{name}: image vs samples");
                }
            }
        }
    }
    let jpeg = need("dicom/SC_rgb_jpeg_dcmtk.dcm");
    let frames = vision::load_images(&jpeg, &ImageLoadOptions::default()).unwrap();
    assert_eq!(frames[0].dimensions(), (100, 100));
    // 12-bit extended JPEG: jpeg-decoder has no 12-bit path; the error says so.
    let e = dicom::read_pixels(&need("dicom/JPGExtended.dcm"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("JPGExtended.dcm") && e.contains("SamplePrecision(12)"),
        "{e}"
    );
    // DICM magic without the extension
    let dir = tempfile::tempdir().unwrap();
    let renamed = dir.path().join("mr_slice");
    std::fs::copy(need("dicom/emri_small.dcm"), &renamed).unwrap();
    let frames = vision::load_images(&renamed, &ImageLoadOptions::default()).unwrap();
    assert_eq!(frames.len(), 10);
    let rgb = vision::process_image(&frames[3], 65_536, 524_288);
    assert_eq!(rgb.dimensions(), (256, 256));
}

#[test]
fn fundus_jpeg_decodes_like_pillow() {
    let c = &fixtures()["retina"];
    let img = vision::load_images(&need("images/retina.jpg"), &ImageLoadOptions::default())
        .unwrap()
        .remove(0)
        .to_rgb8();
    assert_eq!(img.dimensions(), (1411, 1411));
    for ch in 0..3 {
        let m = img.pixels().map(|p| p.0[ch] as f64).sum::<f64>() / (1411.0 * 1411.0);
        // different JPEG decoders (libjpeg vs zune-jpeg) differ by rounding only
        assert!(
            (m - f(&c["channel_means"][ch])).abs() < 0.5,
            "channel {ch}: {m}"
        );
    }
    assert_eq!(
        vision::process_image(&img.into(), 65_536, 524_288).dimensions(),
        (724, 724)
    );
}

#[test]
fn nifti_frames_match_nibabel() {
    let fx = &fixtures()["nifti"];
    for name in ["anatomical.nii", "example4d.nii.gz"] {
        let c = &fx[name];
        let path = need(&format!("volumes/{name}"));
        let vol = volume::read_volume(&path).unwrap();
        let dims: Vec<usize> = c["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(vol.dims.to_vec(), dims, "{name}");
        let num = c["num"].as_u64().unwrap() as usize;
        let idx: Vec<usize> = c["indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(volume::frame_indices(vol.slices(), num), idx);
        let frames = volume::volume_frames(&vol, num);
        let images = vision::load_images(
            &path,
            &ImageLoadOptions {
                video_frames: num,
                ..ImageLoadOptions::default()
            },
        )
        .unwrap();
        assert_eq!(images.len(), num);
        for (k, &z) in idx.iter().enumerate() {
            assert_eq!(images[k].to_luma8(), frames[k]);
            for (p, (x, y)) in points(&c["points"]).into_iter().enumerate() {
                let v = vol.slice(z)[y * dims[0] + x] as f64;
                assert!(
                    (v - f(&c["values"][k][p])).abs() < 1e-3,
                    "{name} z={z} ({x},{y}): {v}"
                );
                let u = frames[k].get_pixel(x as u32, y as u32).0[0] as i64;
                assert_eq!(u, c["u8"][k][p].as_i64().unwrap(), "{name} z={z} ({x},{y})");
            }
        }
    }
}

#[test]
fn lung_ct_nrrd_and_its_lesion_mask() {
    let c = &fixtures()["lung1"];
    let img = volume::read_volume(&need("volumes/lung1_image.nrrd")).unwrap();
    let label = volume::read_volume(&need("volumes/lung1_label.nrrd")).unwrap();
    assert_eq!(img.dims, [512, 512, 48]);
    assert_eq!(label.dims, img.dims);
    let voxels = label.data.iter().filter(|&&v| v > 0.0).count();
    assert_eq!(voxels as u64, c["label_voxels"].as_u64().unwrap());
    let lesion: Vec<u64> = (0..label.slices())
        .filter(|&z| label.slice(z).iter().any(|&v| v > 0.0))
        .map(|z| z as u64)
        .collect();
    let want: Vec<u64> = c["lesion_slices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(lesion, want);
    // the paper's 4 frames miss this small lesion; every slice as a frame finds all of it
    let four = volume::read_label_frames(&need("volumes/lung1_label.nrrd"), 4).unwrap();
    let counts: Vec<u64> = four
        .iter()
        .map(|m| m.data().iter().filter(|&&v| v > 0).count() as u64)
        .collect();
    let want: Vec<u64> = c["label_frame_counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(counts, want);
    let all = volume::label_frames(&label, 48);
    let total: usize = all
        .iter()
        .map(|m| m.data().iter().filter(|&&v| v > 0).count())
        .sum();
    assert_eq!(total, voxels);
    let b = all[33].bbox().expect("slice 33 holds the lesion");
    assert!(b[0] < b[2] && b[1] < b[3]);
    let frames = volume::volume_frames(&img, 4);
    for (k, z) in [0usize, 15, 31, 47].into_iter().enumerate() {
        for (p, (x, y)) in points(&c["points"]).into_iter().enumerate() {
            assert_eq!(
                img.slice(z)[y * 512 + x] as f64,
                f(&c["image_values"][k][p])
            );
            let u = frames[k].get_pixel(x as u32, y as u32).0[0] as i64;
            assert_eq!(u, c["image_u8"][k][p].as_i64().unwrap(), "z={z} ({x},{y})");
        }
    }
}

#[test]
fn check_decodes_every_real_format_in_parallel_and_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let link = |rel: &str, to: &str| {
        let dst = dir.path().join(to);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(need(rel), &dst).unwrap();
    };
    link("dicom/CT_small.dcm", "ct/demo/ct.dcm");
    link("dicom/MR_small_jpeg_ls_lossless.dcm", "mri/demo/jls.dcm");
    link("dicom/RG1_UNCR.dcm", "chest_xray/demo/rg1.dcm");
    link("images/retina.jpg", "fundus/demo/retina.jpg");
    link("volumes/anatomical.nii", "mri/brain/anatomical.nii");
    link("volumes/lung1_image.nrrd", "ct/lung/img.nrrd");
    link("volumes/lung1_label.nrrd", "ct/lung/label.nrrd");
    link("ecg/waveform_ecg.dcm", "ecg/demo/ecg.dcm");
    let rows = [
        r#"{"problem": "q", "answer": "a", "images": ["ct/demo/ct.dcm"]}"#,
        r#"{"problem": "q", "answer": "a", "images": ["mri/demo/jls.dcm"]}"#,
        r#"{"problem": "q", "answer": "a", "images": ["chest_xray/demo/rg1.dcm"]}"#,
        r#"{"problem": "q", "answer": "a", "images": ["fundus/demo/retina.jpg"]}"#,
        r#"{"problem": "q", "answer": "a", "videos": ["mri/brain/anatomical.nii"]}"#,
        r#"{"problem": "q", "answer": "a", "videos": ["ct/lung/img.nrrd"], "segmentation_path": "ct/lung/label.nrrd"}"#,
        r#"{"problem": "q", "answer": "Normal", "time-series": ["ecg/demo/ecg.dcm"], "dataset": "demo"}"#,
        r#"{"problem": "q", "answer": "a", "time-series": ["ct/demo/ct.dcm"], "dataset": "demo"}"#,
    ];
    let manifest = dir.path().join("m.jsonl");
    std::fs::write(&manifest, rows.join("\n")).unwrap();
    let report = qoq_data::check::check_manifest(
        &manifest,
        qoq_data::manifest::ManifestConfig::default(),
        |_, _| {},
    )
    .unwrap();
    let bad: Vec<u64> = report.bad.iter().map(|b| b.line).collect();
    assert_eq!(bad, vec![2, 8], "{report}");
    assert!(
        report.bad[0].reason.contains("unsupported transfer syntax"),
        "{report}"
    );
    assert!(
        report.bad[1].reason.contains("WaveformSequence"),
        "{report}"
    );
    assert_eq!(
        report.groups[&("ct".to_string(), "lung".to_string())].rows,
        1
    );
}
