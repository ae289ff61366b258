//! Small files written by numpy and nibabel (`tools/fixtures/data.py`, seeded) read back by the
//! hand-written `.npy` / `.npz` reader and the NIfTI-2 path; expected values in
//! tests/fixtures/synthetic.json.

use qoq_data::ecg_io::{self, EcgLoadOptions, Orientation};
use qoq_data::npy;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("synthetic.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn npy_files_written_by_numpy_read_back() {
    let fx = expected();
    // f4 C order (v1 header), i2 Fortran order (v2 header), f8 big endian
    for (name, tol) in [
        ("ecg_f4_c.npy", 0.0),
        ("ecg_i2_fortran_v2.npy", 0.0),
        ("ecg_f8_be.npy", 1e-6),
    ] {
        let a = npy::read_npy(&fixture(name)).unwrap();
        assert_eq!(a.shape, shape(&fx[name]["shape"]), "{name}");
        let want = floats(&fx[name]["data"]);
        assert_eq!(a.data.len(), want.len());
        for (i, (g, w)) in a.data.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= tol * w.abs().max(1.0),
                "{name}[{i}]: {g} vs {w}"
            );
        }
    }
    // npz (deflate-compressed by np.savez_compressed): arrays by name
    let z = fixture("ecg_two.npz");
    let sig = npy::read_npz(&z, Some("signal")).unwrap();
    assert_eq!(sig, npy::read_npy(&fixture("ecg_f4_c.npy")).unwrap());
    let extra = npy::read_npz(&z, Some("extra")).unwrap();
    assert_eq!(extra.data, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    let e = npy::read_npz(&z, None).unwrap_err().to_string();
    assert!(e.contains("name the array"), "{e}");
    assert!(npy::read_npz(&z, Some("nope")).is_err());
}

#[test]
fn both_orientations_become_twelve_leads() {
    let opts = EcgLoadOptions {
        fs: Some(500.0),
        ..EcgLoadOptions::default()
    };
    let a = ecg_io::load_ecg(&fixture("ecg_f4_c.npy"), &opts).unwrap();
    assert_eq!(a.leads, ecg_io::STANDARD_LEADS.to_vec());
    assert_eq!((a.data.len(), a.data[0].len()), (12, 40));
    let b = ecg_io::load_ecg(&fixture("ecg_i2_fortran_v2.npy"), &opts).unwrap();
    assert_eq!((b.data.len(), b.data[0].len()), (12, 40));
    let raw = npy::read_npy(&fixture("ecg_i2_fortran_v2.npy")).unwrap();
    // lead 5, sample 17 of a (40, 12) samples x leads array
    assert_eq!(b.data[5][17], raw.data[17 * 12 + 5]);
    // the explicit orientation agrees with the automatic one
    let forced = EcgLoadOptions {
        orientation: Orientation::SamplesByLeads,
        ..opts.clone()
    };
    assert_eq!(
        ecg_io::load_ecg(&fixture("ecg_i2_fortran_v2.npy"), &forced).unwrap(),
        b
    );
    // 8 rows are named as the model's leads and go straight to the model input
    let c = ecg_io::load_ecg(&fixture("ecg_f8_be.npy"), &opts).unwrap();
    assert_eq!(c.leads, qoq_data::ecg::MODEL_LEADS.to_vec());
    let x =
        qoq_data::ecg::to_model_input(&c, qoq_data::ecg::EcgConvention::Reference, true).unwrap();
    assert_eq!(x.len(), 8 * 2500);
}

#[test]
fn nifti2_reads_with_its_scaling() {
    let fx = &expected()["tiny_nifti2.nii"];
    let vol = qoq_data::volume::read_volume(&fixture("tiny_nifti2.nii")).unwrap();
    assert_eq!(vol.dims.to_vec(), shape(&fx["dims"]));
    let want = floats(&fx["data"]);
    for (i, (g, w)) in vol.data.iter().zip(&want).enumerate() {
        assert!((*g as f64 - w).abs() < 1e-3, "voxel {i}: {g} vs {w}");
    }
    let frames = qoq_data::volume::volume_frames(&vol, 4);
    assert_eq!(frames.len(), 4);
    assert_eq!(frames[0].dimensions(), (4, 3));
}
