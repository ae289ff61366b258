#!/usr/bin/env bash
# Builds the CUDA binary of qoq (`-p qoq-cli --features cuda`) on a CPU-only machine: no GPU, no
# system CUDA. The CUDA 13.0 toolkit comes from PyPI wheels (`cuda-toolkit==13.0.2`) installed into
# .cuda-toolkit/ (git-ignored, about 1.2 GB); the driver library libcuda.so.1, which no wheel ships,
# is replaced at link time by a stub generated from cudarc's list of driver functions. The stub sits in
# lib/stubs/ as libcuda.so, so no loader ever picks it up: never copy it to a GPU machine.
#
#   scripts/build-cuda.sh [--features LIST]
#
#   --features LIST   more qoq-cli features, comma-separated, built beside `cuda`: `nccl` (the
#                     GPUs' gradient all-reduce; links libnccl.so.2, which the GPU machine's
#                     PyTorch ships), `mpi` (needs OpenMPI where it runs), `mkl`; not `cudnn`
#   CUDA_COMPUTE_CAP  target GPU generation, default 90 (H100/H200); 80 for A100 etc.
#   PYTHON            python with pip for the toolkit install, default python3
#
# Output: target/cuda/bin/qoq, stripped (80 MB on 2026-12-05), and target/cuda/bin/qoq.xz (12 MB):
# the compressed copy is the one to carry to the GPU machine, whose transfers hold 64 MiB at most;
# scripts/gpu-check.sh unpacks it.
# Own target folder (target/cuda): the CPU build stays untouched. A clean build takes about 11 minutes
# on 2 cores, most of it candle-kernels' nvcc work. The binary links libcuda.so.1, libcublas.so.13,
# libcurand.so.10 and libcudart.so.13 dynamically: it cannot start without an NVIDIA driver. On the GPU
# machine the cu13 libraries come with PyTorch; the script ends by printing the line that finds them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/cuda-common.sh
. "$ROOT/scripts/cuda-common.sh"

features=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --features) [ $# -ge 2 ] || { echo "--features needs a comma-separated list" >&2; exit 2; }
      features="cuda,$2"; shift 2 ;;
    --features=*) features="cuda,${1#--features=}"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument '$1' (usage: scripts/build-cuda.sh [--features LIST])" >&2; exit 2 ;;
  esac
done
case ",$features," in
  *,cudnn,*)
    echo "--features cudnn: not supported by this script: cuDNN is not part of the cuda-toolkit" >&2
    echo "wheels it installs (it needs nvidia-cudnn-cu13 and its library path). Build it by hand with" >&2
    echo "CUDNN_PATH set, or leave it out." >&2
    exit 2 ;;
esac
nccl=0
case ",$features," in *,nccl,*) nccl=1 ;; esac

PY="${PYTHON:-python3}"
TK="$ROOT/.cuda-toolkit"
CH="$TK/wheels/nvidia/cu13"   # a CUDA_HOME-like tree: bin/ include/ lib/ nvvm/
stamp="$TK/installed-$QOQ_CUDA_TOOLKIT_VERSION"
start=$(date +%s)

if [ ! -f "$stamp" ]; then
  echo "== installing the CUDA $QOQ_CUDA_TOOLKIT_VERSION toolkit wheels into $TK (about 1.2 GB)"
  rm -rf "$TK"
  # --no-cache-dir: the 1.2 GB of downloads are not kept twice (disk is scarce on our machines).
  "$PY" -m pip install --quiet --no-cache-dir --target "$TK/wheels" \
    "cuda-toolkit[nvcc,nvvm,crt,cudart,cccl,cublas,curand,nvrtc]==$QOQ_CUDA_TOOLKIT_VERSION"
  ln -sfn lib "$CH/lib64"   # nvcc.profile uses lib64
  # The wheels ship only versioned sonames; -lcublas etc. need the plain names.
  ( cd "$CH/lib"
    for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done
    ln -sf libcurand.so.10 libcurand.so )
  touch "$stamp"
fi
[ -x "$CH/bin/nvcc" ] || { echo "no nvcc at $CH/bin/nvcc: remove $TK and run again" >&2; exit 1; }
"$CH/bin/nvcc" --version | grep -q "release 13.0," \
  || { echo "$CH/bin/nvcc is not CUDA 13.0: remove $TK and run again" >&2; exit 1; }

# Link-time stub of libcuda (driver API): every cu* function cudarc declares, returning
# CUDA_ERROR_STUB_LIBRARY (34). Generated from the cudarc version in Cargo.lock.
cargo fetch --locked
cudarc_version=$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
[ -n "$cudarc_version" ] || { echo "cudarc not found in Cargo.lock" >&2; exit 1; }
sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_version"/src/driver/sys/mod.rs | tail -1)
mkdir -p "$CH/lib/stubs"
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | awk '{print $4}' | sort -u \
  | awk '{print "int " $1 "(void){return 34;}"}' > "$TK/libcuda_stub.c"
[ -s "$TK/libcuda_stub.c" ] || { echo "no driver functions found in $sys" >&2; exit 1; }
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CH/lib/stubs/libcuda.so" "$TK/libcuda_stub.c"
if [ "$nccl" = 1 ]; then
  # NCCL (the GPUs' gradient all-reduce) likewise: a link-time stub of libnccl.so.2 with every
  # nccl* function cudarc declares (returning ncclUnhandledCudaError); the real library comes with
  # the GPU machine's PyTorch (site-packages/nvidia/nccl/lib, found by qoq_cuda_lib_dir).
  nsys=$(dirname "$(dirname "$(dirname "$sys")")")/nccl/sys/mod.rs
  grep -oE '^ *pub unsafe fn nccl[A-Za-z0-9_]+' "$nsys" | awk '{print $4}' | sort -u \
    | awk '{print "int " $1 "(void){return 1;}"}' > "$TK/libnccl_stub.c"
  [ -s "$TK/libnccl_stub.c" ] || { echo "no NCCL functions found in $nsys" >&2; exit 1; }
  gcc -shared -fPIC -Wl,-soname,libnccl.so.2 -o "$CH/lib/stubs/libnccl.so" "$TK/libnccl_stub.c"
fi

export CUDA_HOME="$CH"
export PATH="$CH/bin:$PATH"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"   # kernel build: all cores, not half
echo "== cargo build --release -p qoq-cli --features $features (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
cargo build --release --locked -p qoq-cli --features "$features" --target-dir target/cuda

mkdir -p target/cuda/bin
strip -o target/cuda/bin/qoq target/cuda/release/qoq
echo "== compressing for the GPU machine's 64 MiB transfers: target/cuda/bin/qoq.xz"
xz -T0 -6 -f -k target/cuda/bin/qoq
end=$(date +%s)
echo "== built target/cuda/bin/qoq (stripped) and qoq.xz in $((end - start)) s"
ls -l target/cuda/bin/qoq target/cuda/bin/qoq.xz
echo "size: $(( $(stat -c %s target/cuda/bin/qoq) / 1000000 )) MB stripped, $(( $(stat -c %s target/cuda/bin/qoq.xz) / 1000000 )) MB as qoq.xz"
echo "== ldd (libcuda.so.1 is 'not found' here: it comes with the GPU machine's driver)"
ldd target/cuda/bin/qoq || true
echo "== on the GPU machine, before running it:"
echo '  export LD_LIBRARY_PATH="$(. scripts/cuda-common.sh && qoq_cuda_lib_dir):${LD_LIBRARY_PATH:-}"'
echo "  (the cu13 libraries of its PyTorch, site-packages/nvidia/cu13/lib; scripts/gpu-check.sh does this itself)"
