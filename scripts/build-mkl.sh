#!/usr/bin/env bash
# Builds qoq with Intel MKL's matrix products (`-p qoq-cli --features mkl`: candle's CPU matmul
# calls MKL's sgemm/dgemm instead of the `gemm` crate, and some unary ops MKL's vector maths).
#
# candle's `mkl` feature links MKL statically through the intel-mkl-src crate, whose build script
# looks for an installed MKL ($MKLROOT) and otherwise tries to download one from a container
# registry that our machines cannot reach (and then links nothing: `cargo build --features mkl`
# fails at the link with undefined `sgemm_`). This script takes MKL from PyPI instead (Intel's own
# wheels): mkl-static, mkl-include and intel-openmp, pinned below, unpacked into
# .mkl/ (git-ignored, about 500 MB). Only the static OpenMP runtime is kept there, so the binary
# links it in and runs without LD_LIBRARY_PATH.
#
#   scripts/build-mkl.sh [--features LIST]
#
#   --features LIST   more qoq-cli features, comma-separated, built beside `mkl` (e.g. mpi)
#   PYTHON            python with pip for the downloads, default python3
#
# Output: target/mkl/release/qoq (its own target folder: the default build stays untouched; a
# clean build takes about 10 minutes on 2 cores).
#
# What changes (README, "CPU matrix products"): f32 and f64 products run in MKL, bf16 ones too
# (candle widens them to f32 in either build); MKL's OpenMP threads follow OMP_NUM_THREADS
# (default: the physical cores), candle's own kernels RAYON_NUM_THREADS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MKL_VERSION=2024.2.2
OMP_VERSION=2024.2.1
features=mkl
while [ $# -gt 0 ]; do
  case "$1" in
    --features) [ $# -ge 2 ] || { echo "--features needs a comma-separated list" >&2; exit 2; }
      features="mkl,$2"; shift 2 ;;
    --features=*) features="mkl,${1#--features=}"; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown argument '$1' (usage: scripts/build-mkl.sh [--features LIST])" >&2; exit 2 ;;
  esac
done
case ",$features," in
  *,cuda,*|*,cudnn,*|*,nccl,*)
    echo "--features $features: the GPU features are built by scripts/build-cuda.sh" >&2
    exit 2 ;;
esac

PY="${PYTHON:-python3}"
MK="$ROOT/.mkl"
stamp="$MK/installed-$MKL_VERSION-$OMP_VERSION"
if [ ! -f "$stamp" ]; then
  echo "== downloading MKL $MKL_VERSION (mkl-static, mkl-include) and intel-openmp $OMP_VERSION from PyPI"
  rm -rf "$MK"
  mkdir -p "$MK/wheels"
  "$PY" -m pip download --quiet --no-deps --no-cache-dir --only-binary=:all: \
    --platform manylinux1_x86_64 -d "$MK/wheels" \
    "mkl-static==$MKL_VERSION" "mkl-include==$MKL_VERSION" "intel-openmp==$OMP_VERSION"
  # The wheels keep their files under <name>.data/data/{lib,include}; take what the link needs.
  "$PY" - "$MK" <<'PY'
import glob, os, sys, zipfile
root = sys.argv[1]
keep_lib = {"libmkl_intel_lp64.a", "libmkl_intel_thread.a", "libmkl_core.a", "libiomp5.a"}
os.makedirs(os.path.join(root, "lib"), exist_ok=True)
found = set()
for wheel in glob.glob(os.path.join(root, "wheels", "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            parts = name.split("/")
            if len(parts) >= 4 and parts[1] == "data" and parts[2] == "lib" and parts[-1] in keep_lib:
                with open(os.path.join(root, "lib", parts[-1]), "wb") as f:
                    f.write(z.read(name))
                found.add(parts[-1])
            elif len(parts) >= 4 and parts[1] == "data" and parts[2] == "include" and not name.endswith("/"):
                dest = os.path.join(root, "include", *parts[3:])
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "wb") as f:
                    f.write(z.read(name))
missing = keep_lib - found
if missing or not os.path.exists(os.path.join(root, "include", "mkl.h")):
    sys.exit(f"the MKL wheels lack {sorted(missing) or 'mkl.h'}")
PY
  rm -rf "$MK/wheels"
  touch "$stamp"
fi

export MKLROOT="$MK"
start=$(date +%s)
echo "== cargo build --release -p qoq-cli --features $features (MKLROOT=$MKLROOT, target/mkl)"
cargo build --release -p qoq-cli --features "$features" --target-dir target/mkl
bin="$ROOT/target/mkl/release/qoq"
if ldd "$bin" | grep -q 'iomp5\|mkl'; then
  echo "$bin links MKL or OpenMP dynamically:" >&2
  ldd "$bin" >&2
  exit 1
fi
echo "built $bin in $(( $(date +%s) - start )) s (MKL and its OpenMP runtime linked in statically)"
