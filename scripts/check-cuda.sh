#!/usr/bin/env bash
# Compile-checks and lints the CUDA build on a machine without a CUDA toolkit, so that code behind
# `#[cfg(feature = "cuda")]` / `"nccl"` cannot rot unnoticed on our CPU-only machines and CI: the
# `nccl` feature (which includes `cuda`: the GPUs' gradient all-reduce, qoq_rl::dist::nccl), with
# `mpi` as well where OpenMPI is installed (the data-parallel launch NCCL is bootstrapped over),
# clippy with warnings as errors.
#
# `cargo check` runs build scripts: cudarc's asks `nvcc --version`, candle-kernels' compiles its
# kernels with nvcc. A stand-in `nvcc` (below, on PATH first) answers the version of the CUDA we
# target (13.0, scripts/cuda-common.sh) and writes empty outputs; nothing is compiled for a GPU
# and nothing can be linked, which `check` does not need. The real build is scripts/build-cuda.sh.
# Own target folder (target/cuda-check): the CPU build's artifacts stay untouched.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/cuda-common.sh
. "$ROOT/scripts/cuda-common.sh"
FAKE="$ROOT/target/cuda-check/fake-nvcc"
mkdir -p "$FAKE"
cat > "$FAKE/nvcc" <<'NVCC'
#!/usr/bin/env bash
# Stand-in nvcc for `cargo check` only (scripts/check-cuda.sh).
out=""; outdir=""; lib=0; prev=""; src=""
for a in "$@"; do
  case "$prev" in
    -o|--output-file) out="$a" ;;
    --output-directory|-odir) outdir="$a" ;;
  esac
  case "$a" in
    --version)
      printf 'nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) NVIDIA Corporation\nBuilt on stand-in\nCuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0/compiler.0\n'
      exit 0 ;;
    --lib|-lib) lib=1 ;;
    *.cu) src="$a" ;;
  esac
  prev="$a"
done
if [ -n "$outdir" ] && [ -n "$src" ]; then
  b=$(basename "$src" .cu); mkdir -p "$outdir"; : > "$outdir/$b.ptx"; exit 0
fi
if [ -n "$out" ]; then
  mkdir -p "$(dirname "$out")"
  if [ "$lib" = 1 ]; then rm -f "$out"; ar rc "$out"; else : > "$out"; fi
fi
exit 0
NVCC
chmod +x "$FAKE/nvcc"
export PATH="$FAKE:$PATH"
features=qoq-cli/nccl
if command -v mpicc >/dev/null 2>&1; then
  features="$features,qoq-cli/mpi"
fi
cargo clippy --workspace --all-targets --features "$features" --target-dir target/cuda-check "$@" -- -D warnings
echo "features $features (cuda included): cargo clippy passed (compile-only: nothing was built for a GPU)"
