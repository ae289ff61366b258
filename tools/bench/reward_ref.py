#!/usr/bin/env python3
"""Time the reference QoQ medical reward (our faithful port of the released
`medical_compute_score`, tools/fixtures/reward.py, torch tensors in the mask branch as released)
on a cases file, and print one JSON line: {"responses", "seconds", "responses_per_s"} for the
fastest of --reps passes over the cases.

Usage: python3 tools/bench/reward_ref.py CASES.jsonl [--reps N]
The cases are tools/fixtures/reward.py's format (response, answer, optional inline mask rows,
optional bbox). `cargo run --release -p qoq-reward --example bench_reward` runs this on the same
inputs and reports the ratio.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from reward import medical_compute_score  # noqa: E402


def load(path):
    cases = []
    for line in open(path):
        row = json.loads(line)
        if "mask" in row:
            m = np.array([[c == "1" for c in r] for r in row["mask"]["rows"]], np.uint8)[None]
        else:
            m = np.zeros((1, 8, 8), np.uint8)
        gt = torch.tensor(row.get("bbox", [0.0, 0.0, 0.0, 0.0]), dtype=torch.float64)
        cases.append((row["response"], row["answer"], m, gt))
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = load(args.cases)
    for c in cases[:50]:  # warm-up
        medical_compute_score(*c)
    best = float("inf")  # best of the repetitions: the least disturbed by other load
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for c in cases:
            medical_compute_score(*c)
        best = min(best, time.perf_counter() - t0)
    n = len(cases)
    print(json.dumps({"responses": n, "seconds": best, "responses_per_s": n / best}))


if __name__ == "__main__":
    main()
