"""Writes examples/mini: a tiny manifest in the released training schema (spec §2.1) with one row
per input kind (2D image + mask, 3D volume, WFDB ECG, DICOM-free), used by the README's first
command until `qoq demo` lands. Seeded and deterministic. Run: python3 tools/examples/make_mini.py
"""
import json
import os

import numpy as np
from PIL import Image

rng = np.random.default_rng(7)
ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "mini")


def blob_image(path, mask_path, size=(160, 128), centre=(60, 50), radius=18, bright=200):
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 60 + 20 * rng.standard_normal((h, w))
    m = ((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) <= radius**2
    base[m] = bright + 10 * rng.standard_normal(m.sum())
    img = np.clip(base, 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img, "L").save(path)
    if mask_path:
        os.makedirs(os.path.dirname(mask_path), exist_ok=True)
        Image.fromarray((m * 255).astype(np.uint8), "L").save(mask_path)
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def write_nifti(path):
    import nibabel as nib

    vol = (40 + 10 * rng.standard_normal((48, 48, 6))).astype(np.int16)
    vol[20:30, 18:28, 2:5] = 300
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)


def write_ecg(dirpath, name):
    import wfdb

    fs = 500
    t = np.arange(0, 10, 1 / fs)
    beat = np.zeros_like(t)
    for c in np.arange(0.4, 10, 0.8):  # 75 bpm
        beat += 1.2 * np.exp(-((t - c) ** 2) / (2 * 0.012**2))
        beat += 0.25 * np.exp(-((t - c + 0.16) ** 2) / (2 * 0.03**2))
        beat += 0.35 * np.exp(-((t - c - 0.28) ** 2) / (2 * 0.06**2))
    leads = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    gains = [0.6, 1.0, 0.4, -0.8, 0.3, 0.7, -0.5, 0.2, 0.6, 1.1, 1.0, 0.8]
    sig = np.stack([g * beat + 0.02 * rng.standard_normal(t.size) for g in gains], axis=1)
    os.makedirs(dirpath, exist_ok=True)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * 12, sig_name=leads, p_signal=sig, fmt=["16"] * 12,
                write_dir=dirpath)


rows = []
box = blob_image(f"{ROOT}/chest_xray/demo-cxr/case_000.png", f"{ROOT}/masks/case_000.png")
rows.append({"problem": "<image>\nAbove is a chest X-ray image of a patient. What is the diagnosis of the patient in the X-ray image?Answer with one of the following:\nNo Finding\nNodule",
             "answer": "Nodule", "images": ["chest_xray/demo-cxr/case_000.png"],
             "segmentation_path": "masks/case_000.png", "bbox": box, "dataset": "demo-cxr"})
blob_image(f"{ROOT}/derm/demo-derm/case_001.png", None, centre=(80, 64), radius=30, bright=120)
rows.append({"problem": "Above is a dermoscopy image of a patient. What is the diagnosis?Answer with one of the following:\nbenign\nmalignant",
             "answer": "benign", "images": ["derm/demo-derm/case_001.png"], "dataset": "demo-derm"})
write_nifti(f"{ROOT}/ct/demo-ct/vol_002.nii.gz")
rows.append({"problem": "<video>\nAbove is a CT scan of a patient. Is there a lesion?Answer with one of the following:\nlesion\nno lesion",
             "answer": "lesion", "images": [], "videos": ["ct/demo-ct/vol_002.nii.gz"], "dataset": "demo-ct"})
write_ecg(f"{ROOT}/ecg/demo-ecg", "rec_003")
rows.append({"problem": "Above is an ECG of a patient. What is the diagnosis?Answer with one of the following:\nNormal\nA.Fib/Aflutter\nMI",
             "answer": "Normal", "images": [], "time-series": ["ecg/demo-ecg/rec_003.hea"], "dataset": "demo-ecg"})
with open(f"{ROOT}/manifest.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
print("wrote", len(rows), "rows to", os.path.normpath(ROOT))
