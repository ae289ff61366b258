#!/usr/bin/env bash
# Seed the corpus of every reader target (corpus/<target>/) from the real files of the test-data
# cache (scripts/fetch-testdata.sh; $QOQ_TESTDATA or <repo>/.testdata) and the repository's
# fixtures. Targets whose first input byte picks a format get that byte prepended.
set -euo pipefail
cd "$(dirname "$0")"
T="${QOQ_TESTDATA:-../.testdata}"
[ -d "$T/dicom" ] || { echo "no test-data cache at $T: run scripts/fetch-testdata.sh" >&2; exit 1; }
dir() { mkdir -p "corpus/$1"; }
# with_byte TARGET BYTE(octal) FILE: BYTE then FILE
with_byte() { dir "$1"; { printf "\\$2"; cat "$3"; } > "corpus/$1/$(basename "$3").$2"; }

dir dicom
find "$T/dicom" -name '*.dcm' -size -1024k -exec cp {} corpus/dicom/ \;
dir dicom_ecg
cp "$T/ecg/waveform_ecg.dcm" corpus/dicom_ecg/
# image: 0 = png, 1 = jpg; >= 128 also reads the file as a mask (128 = png)
with_byte image 001 "$T/images/retina.jpg"
for f in ../examples/mini/*/*/*.png; do with_byte image 000 "$f"; done
with_byte image 200 ../examples/mini/masks/case_000.png
# nifti: even = .nii, odd = .nii.gz
with_byte nifti 000 "$T/volumes/anatomical.nii"
with_byte nifti 001 "$T/volumes/example4d.nii.gz"
with_byte nifti 001 ../examples/mini/ct/demo-ct/vol_002.nii.gz
with_byte nifti 000 ../crates/qoq-data/tests/fixtures/tiny_nifti2.nii
dir nrrd
cp "$T/volumes/lung1_label.nrrd" corpus/nrrd/
# wfdb: header, NUL, signal file
dir wfdb
{ cat ../examples/mini/ecg/demo-ecg/rec_003.hea; printf '\0'; cat ../examples/mini/ecg/demo-ecg/rec_003.dat; } \
  | sed -e '1,20s/rec_003\.dat/r.dat/' > corpus/wfdb/rec_003
# npy: even = .npy, odd = .npz
for f in ../crates/qoq-data/tests/fixtures/*.npy; do with_byte npy 000 "$f"; done
with_byte npy 001 ../crates/qoq-data/tests/fixtures/ecg_two.npz
with_byte npy 001 "$T/ecg/ecg.dat"
# csv: the first 2 s of the MIT-BIH record of ecg.dat (an .npz of int16 ADC values at 360 Hz)
dir csv
python3 - "$T/ecg/ecg.dat" > corpus/csv/mit_bih.csv <<'PY'
import ast, struct, sys, zipfile
raw = zipfile.ZipFile(sys.argv[1]).read("ecg.npy")
hlen = struct.unpack("<H", raw[8:10])[0]
head = ast.literal_eval(raw[10:10 + hlen].decode())
fmt = {"<i2": "h", "<u2": "H", "<f8": "d", "<f4": "f", "<i8": "q"}[head["descr"]]
size = struct.calcsize(fmt)
body = raw[10 + hlen:]
print("time,MLII")
for i in range(720):
    (v,) = struct.unpack("<" + fmt, body[i * size:(i + 1) * size])
    print(f"{i / 360:.6f},{(v - 1024) / 200:.4f}")
PY
ls corpus | while read -r t; do echo "$t: $(ls "corpus/$t" | wc -l) seeds"; done
