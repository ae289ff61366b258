#!/usr/bin/env bash
# The one check to run on a GPU machine (no Rust, no network there; PyTorch and transformers
# are): parity, generation throughput and one RL step of the CUDA build of qoq against
# transformers / PyTorch on the same GPU, in under 8 minutes, each part under its own timeout.
#
#   scripts/gpu-check.sh [--device cuda|cpu] [--tiny] [--qoq BIN] [--python PY] [--budget S] OUT_DIR
#
#   --device  where both sides run (default cuda; `cpu` with --tiny is the smoke test for machines
#             without a GPU)
#   --tiny    the tiny model only: its checkpoint, f32 parity, generation and train step
#   --qoq     the qoq binary, or its .xz (default target/cuda/bin/qoq, else target/cuda/bin/qoq.xz,
#             both from scripts/build-cuda.sh; the .xz is what travels to a GPU machine)
#   --python  python with torch + transformers (default python3)
#   --budget  seconds for all parts together (default 450); a part gets at most its own timeout and
#             what is left of the budget
#
# Parts: random-weight checkpoints written by transformers' save_pretrained (tiny f32, 0.5B-class
# bf16, 7B-shaped bf16 with QoQ-Med-VL-7B's dims; tools/bench/gpu_check.py); parity of
# `qoq logits` with transformers (tiny f32: max |diff| <= 1e-4; 0.5B bf16: top-1 agreement >= 99 %
# or transformers' own bf16-vs-f32 agreement if lower); generation tokens/s of `qoq bench generate`
# vs transformers' generate (0.5B and 7B, 1x1 and 64 prompts x 8 rollouts, 256 new tokens, prefill
# and decode apart); one RL step with `qoq bench train-step` (0.5B full fine-tune in f32 with the
# same step in PyTorch on the same device; 7B-shape LoRA r=64 with activation checkpointing in
# bf16); the tiny step with its gradients through NCCL (`--all-reduce nccl`, one rank; a binary
# built with `--features nccl`) against PyTorch's. OUT_DIR receives gpu-check.md (the table), gpu-check.json and gpu-check.log (every
# part's output): three files, so it fits what comes back from the GPU machine. Exit 1 if a
# parity check failed or did not run; other parts that fail or time out show in the table.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

device=cuda tiny=0 qoq="" py=python3 budget=450 out=""
usage() { sed -n '6,13p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="${2:?--device needs cuda or cpu}"; shift 2 ;;
    --tiny) tiny=1; shift ;;
    --qoq) qoq="${2:?--qoq needs a path}"; shift 2 ;;
    --python) py="${2:?--python needs an interpreter}"; shift 2 ;;
    --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu-check: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "gpu-check: one OUT_DIR only ('$out', '$1')" >&2; exit 2; }
       out="$1"; shift ;;
  esac
done
[ -n "$out" ] || { echo "gpu-check: OUT_DIR missing" >&2; usage >&2; exit 2; }
case "$device" in cuda|cuda:[0-9]*|cpu) ;; *) echo "gpu-check: --device must be cuda, cuda:N or cpu, not '$device'" >&2; exit 2 ;; esac
case "$budget" in ''|*[!0-9]*) echo "gpu-check: --budget must be whole seconds, not '$budget'" >&2; exit 2 ;; esac
if [ "$device" = cpu ] && [ "$tiny" = 0 ]; then
  echo "gpu-check: --device cpu runs the tiny model only: add --tiny" >&2; exit 2
fi
if [ -z "$qoq" ]; then
  qoq="$ROOT/target/cuda/bin/qoq"
  [ -x "$qoq" ] || qoq="$qoq.xz"
fi
[ -f "$qoq" ] || { echo "gpu-check: no qoq binary at $qoq (scripts/build-cuda.sh builds it; --qoq picks another)" >&2; exit 2; }
command -v "$py" >/dev/null || { echo "gpu-check: python '$py' not found" >&2; exit 2; }
mkdir -p "$out"
out="$(cd "$out" && pwd)"
log="$out/gpu-check.log"
: > "$log"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
if [ "${qoq%.xz}" != "$qoq" ]; then
  "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$qoq" "$work/qoq" || { echo "gpu-check: cannot unpack $qoq" >&2; exit 2; }
  chmod +x "$work/qoq"
  qoq="$work/qoq"
fi
[ -x "$qoq" ] || { echo "gpu-check: $qoq is not executable" >&2; exit 2; }
export QOQ_REPO="$ROOT" PYTHONUNBUFFERED=1
if [ "$device" != cpu ]; then
  # shellcheck source=scripts/cuda-common.sh
  . "$ROOT/scripts/cuda-common.sh"
  libdir="$(qoq_cuda_lib_dir "$py")"
  [ -n "$libdir" ] || echo "gpu-check: no nvidia/cu13/lib beside $py's packages; relying on the system's libraries" | tee -a "$log"
  export LD_LIBRARY_PATH="${libdir:+$libdir:}${LD_LIBRARY_PATH:-}"
fi

start=$(date +%s)
# The binary's libraries as this machine resolves them (a missing one fails every qoq part).
{ echo "== ldd $qoq"; ldd "$qoq"; } >> "$log" 2>&1
"$py" - "$device" > "$work/env.json" 2>>"$log" <<'PY'
import json, subprocess, sys, time, torch, transformers
d = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": sys.argv[1],
     "torch": torch.__version__, "transformers": transformers.__version__, "gpu": "none (CPU)", "driver": "-"}
if sys.argv[1] != "cpu":
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
        name, drv, mem = [x.strip() for x in q.split(",")]
        d.update(gpu=f"{name} ({mem})", driver=drv)
    except Exception as e:  # noqa: BLE001
        d["gpu"] = f"unknown ({e})"
print(json.dumps(d))
PY

# part NAME TIMEOUT CMD...: runs CMD under min(TIMEOUT, budget left), output into the log, a
# row (name, exit status, seconds, peak GPU MiB) into parts.tsv.
part() {
  local name="$1" limit="$2"; shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  [ "$left" -lt "$limit" ] && limit="$left"
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, the budget of ${budget}s is spent" | tee -a "$log"
    printf '%s\t%s\t%s\t%s\n' "$name" 125 0 "" >> "$work/parts.tsv"
    return 0
  fi
  echo "== $name (timeout ${limit}s): $*" | tee -a "$log"
  local smi="" mon=""
  if [ "$device" != cpu ] && command -v nvidia-smi >/dev/null; then
    smi="$work/$name.smi"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$smi" 2>/dev/null &
    mon=$!
  fi
  local t0 rc
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local secs peak=""
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ -n "$mon" ]; then
    kill "$mon" 2>/dev/null; wait "$mon" 2>/dev/null
    peak=$(awk 'BEGIN { m = "" } $1 ~ /^[0-9]+$/ { if (m == "" || $1 > m) m = $1 } END { print m }' "$smi")
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$peak" >> "$work/parts.tsv"
  echo "== $name: exit $rc after ${secs}s${peak:+, GPU peak ${peak} MiB}" | tee -a "$log"
}

gc=("$py" "$ROOT/tools/bench/gpu_check.py")
gen() { # gen SIZE CASE DTYPE PROMPTS N TIMEOUT: qoq's engine, then transformers
  local size="$1" case="$2" dtype="$3" p="$4" n="$5" t="$6"
  part "gen-$size-$case-qoq" "$t" "$qoq" bench generate --model "$work/$size" --dtype "$dtype" \
    --device "$device" --prompts "$p" --n "$n" --prompt-len 64 --new "$new" --json "$work/gen-$size-$case-qoq.json"
  part "gen-$size-$case-hf" "$t" "${gc[@]}" generate --model "$work/$size" --dtype "$dtype" --device "$device" \
    --prompts "$p" --n "$n" --prompt-len 64 --new "$new" --out "$work/gen-$size-$case-hf.json"
}

# The NCCL path with one rank (`trainer.all_reduce = "nccl"`; a binary built with
# `scripts/build-cuda.sh --features nccl`, else the part fails with the refusal): the tiny step
# with its gradients summed by NCCL must still agree with PyTorch's.
nccl_tiny() {
  part train-tiny-nccl "$1" "$qoq" bench train-step --size tiny --prompts 2 --n 2 --response-len 8 --steps 2 \
    --all-reduce nccl --device "$device" --python "$py" --reference-device "$device" --json "$work/train-tiny-nccl.json"
}

if [ "$tiny" = 1 ]; then
  new=16
  part models-tiny 60 "${gc[@]}" models "$work" tiny --device "$device"
  part parity-tiny 60 "${gc[@]}" parity --model "$work/tiny" --dtype f32 --qoq "$qoq" --device "$device" --out "$work/parity-tiny.json"
  gen tiny 2x2 f32 2 2 60
  part train-tiny 120 "$qoq" bench train-step --size tiny --prompts 2 --n 2 --response-len 8 --steps 2 \
    --device "$device" --python "$py" --reference-device "$device" --json "$work/train-tiny.json"
  report=(--parity tiny --gen tiny:2x2 --train tiny:tiny)
  if [ "$device" != cpu ]; then
    nccl_tiny 120
    report+=(tiny-nccl:tiny)
  fi
else
  new=256
  # In order of what the issue needs most: parity, the 0.5B step against PyTorch, the 7B decode
  # and LoRA step; the budget cuts the tail first.
  part models-small 60 "${gc[@]}" models "$work" tiny 0.5b --device "$device"
  part parity-tiny 30 "${gc[@]}" parity --model "$work/tiny" --dtype f32 --qoq "$qoq" --device "$device" --out "$work/parity-tiny.json"
  part parity-0.5b 45 "${gc[@]}" parity --model "$work/0.5b" --dtype bf16 --qoq "$qoq" --device "$device" --out "$work/parity-0.5b.json"
  nccl_tiny 60
  part train-0.5b 90 "$qoq" bench train-step --size 0.5b --prompts 8 --n 5 --response-len 512 --micro-batch 8 \
    --steps 2 --device "$device" --python "$py" --reference-device "$device" --json "$work/train-0.5b.json"
  part models-7b 75 "${gc[@]}" models "$work" 7b --device "$device"
  gen 7b 64x8 bf16 64 8 50
  part train-7b-lora 100 "$qoq" bench train-step --model "$work/7b" --lora-rank 64 --gradient-checkpointing \
    --compute-dtype bf16 --prompts 8 --n 5 --response-len 512 --micro-batch 8 --steps 1 \
    --device "$device" --no-reference --json "$work/train-7b-lora.json"
  gen 0.5b 64x8 bf16 64 8 30
  gen 0.5b 1x1 bf16 1 1 25
  gen 7b 1x1 bf16 1 1 30
  report=(--parity tiny 0.5b --gen 0.5b:1x1 0.5b:64x8 7b:1x1 7b:64x8 --train tiny-nccl:tiny 0.5b:0.5b 7b-lora:7b)
fi

"${gc[@]}" report "$work" "$out" "${report[@]}" 2>>"$log"
rc=$?
echo "gpu-check: $(( $(date +%s) - start )) s; results in $out (gpu-check.md, gpu-check.json, gpu-check.log)"
exit "$rc"
