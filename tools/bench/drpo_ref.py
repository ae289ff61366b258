"""Faithful Python port of the released DRPO advantage (QoQ-Med `verl/trainer/core_algos.py::
compute_drpo_outcome_advantage`, spec §9.6) and its timing on a synthetic run.

The port keeps the released structure: module-global per-domain history, float32 reward vectors,
`_select_k_elbow` (k_max 10, tol 0.10) with `KMeans(n_init="auto", random_state=0)` fits for
k = 1..k_cap on the *whole* history of *every* domain on every step, `q_ids.index(q)` lookups,
`T_d = max(sqrt(N_d) mu_d, eps)`, no eps floor on the cluster term, final batch-std division.
torch float32 ops are replaced by numpy float32 ones (mean, unbiased std).

Usage (timing; pre-fills the history to each size, then times one step):
    python3 tools/bench/drpo_ref.py --sizes 1000 10000 100000 --repeat 3 --out /tmp/drpo_ref.json
The synthetic run (`synth_step`) is reproduced bit-for-bit by crates/qoq-rl/benches/drpo.rs
(numpy `RandomState`, which the Rust crate re-implements).
"""

import argparse
import copy
import json
import time
from collections import defaultdict

import numpy as np
from sklearn.cluster import KMeans

# --- the released function ------------------------------------------------------------------

domain_qstats = defaultdict(lambda: {"vectors": [], "q_ids": [], "count": 0})
global_running_stats = {"q_count": 0}


def reset():
    domain_qstats.clear()
    global_running_stats["q_count"] = 0


def _select_k_elbow(X, k_max=10, tol=0.10):
    k_cap = min(k_max, len(np.unique(X, axis=0)))
    inertias = []
    for k in range(1, k_cap + 1):
        inertias.append(KMeans(n_clusters=k, n_init="auto", random_state=0).fit(X).inertia_)
    if k_cap == 1:
        return 1, inertias
    drops = [inertias[j] - inertias[j + 1] for j in range(k_cap - 1)]
    for i in range(1, len(drops)):
        if drops[i] < tol * drops[i - 1]:
            return i + 1, inertias
    return k_cap, inertias


def _cluster_info_question(X):
    k, inertias = _select_k_elbow(X)
    km = KMeans(n_clusters=k, n_init="auto", random_state=0).fit(X)
    labels = km.labels_
    _, counts = np.unique(labels, return_counts=True)
    counts = counts.astype(np.float64)
    cent_means = km.cluster_centers_.mean(axis=1)
    mu_d = float((cent_means / counts).sum() / (1.0 / counts).sum())
    return labels, counts, cent_means, mu_d, k, inertias


def compute_drpo_outcome_advantage(scores, index, domain_info, eps=1e-6, info=None):
    """scores: float32 (B,) sequence rewards; index: uid per rollout; domain_info: domain per rollout."""
    scores = np.asarray(scores, dtype=np.float32)
    B = scores.shape[0]
    id2score = defaultdict(list)
    id2rows = defaultdict(list)
    q2domain = {}
    for i in range(B):
        id2score[index[i]].append(scores[i])
        id2rows[index[i]].append(i)
        q2domain[index[i]] = domain_info[i]
    sizes = {len(v) for v in id2score.values()}
    assert len(sizes) == 1, "all groups must have the same size"
    for q, v in id2score.items():
        st = domain_qstats[q2domain[q]]
        st["vectors"].append(np.array(v, dtype=np.float32))
        st["q_ids"].append(q)
        st["count"] += 1
        global_running_stats["q_count"] += 1
    s = np.zeros(B, dtype=np.float32)
    for q, rows in id2rows.items():
        v = np.array(id2score[q], dtype=np.float32)
        mean = v.mean(dtype=np.float32)
        std = v.std(ddof=1, dtype=np.float32) if len(v) > 1 else np.float32(np.nan)
        for i in rows:
            s[i] = (scores[i] - mean) / (std + np.float32(eps))
    cache = {}
    for d, st in domain_qstats.items():
        X = np.stack(st["vectors"])
        cache[d] = _cluster_info_question(X)
    s = s.astype(np.float64)
    for i in range(B):
        q = index[i]
        d = q2domain[q]
        labels, counts, cent_means, mu_d, _, _ = cache[d]
        st = domain_qstats[d]
        c = labels[st["q_ids"].index(q)]
        T_d = max(np.sqrt(st["count"]) * mu_d, eps)
        f = T_d * np.sqrt(counts[c]) * float(cent_means[c])
        with np.errstate(divide="ignore", invalid="ignore"):
            s[i] = s[i] / f
    with np.errstate(invalid="ignore"):
        sigma = s.std(ddof=1) if B > 1 else np.nan
        adv = s / (sigma + eps)
    if info is not None:
        for d in sorted(set(q2domain.values())):
            labels, counts, cent_means, mu_d, k, inertias = cache[d]
            info[d] = {"k": int(k), "mu_d": mu_d, "inertias": [float(x) for x in inertias]}
    return adv


# --- the synthetic run ----------------------------------------------------------------------

# Records per clinical domain (spec §2.2): ECG, CXR, mammography, dermoscopy, fundus, CT,
# ultrasound, MRI, pathology.
DOMAIN_RECORDS = [88976, 595621, 24697, 45439, 15345, 1822374, 1241, 3517, 24014]
BASES = [0.15, 0.5, 0.85]


def domain_cdf():
    total = float(sum(DOMAIN_RECORDS))
    acc, cdf = 0.0, []
    for r in DOMAIN_RECORDS:
        acc += r / total
        cdf.append(acc)
    return cdf


def synth_step(rs, step, q=512, n=5):
    """One step: q questions, each from a domain drawn by record share and one of three
    difficulty levels; n rollout rewards base + U(-0.05, 0.05). Returns (uids, domains, rewards)."""
    cdf = domain_cdf()
    uids, doms, rewards = [], [], []
    for j in range(q):
        u = rs.random_sample()
        d = next((i for i, c in enumerate(cdf) if u < c), len(cdf) - 1)
        t = min(int(rs.random_sample() * 3.0), 2)
        for _ in range(n):
            x = BASES[t] + 0.1 * (rs.random_sample() - 0.5)
            uids.append(f"s{step}q{j}")
            doms.append(f"d{d}")
            rewards.append(x)
    return uids, doms, rewards


def prefill(rs, n_questions, q=512, n=5):
    """History-only update with the first steps of the synthetic run; returns the next step."""
    step = 0
    while sum(st["count"] for st in domain_qstats.values()) < n_questions:
        uids, doms, rewards = synth_step(rs, step, q, n)
        seen = {}
        for u, d, r in zip(uids, doms, rewards):
            seen.setdefault(u, (d, []))[1].append(r)
        for u, (d, v) in seen.items():
            st = domain_qstats[d]
            st["vectors"].append(np.array(v, dtype=np.float32))
            st["q_ids"].append(u)
            st["count"] += 1
        step += 1
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=1,
                    help="time the step this many times from the same history; report the minimum")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    for size in args.sizes:
        reset()
        rs = np.random.RandomState(args.seed)
        step = prefill(rs, size)
        hist = sum(st["count"] for st in domain_qstats.values())
        uids, doms, rewards = synth_step(rs, step)
        snapshot = copy.deepcopy(dict(domain_qstats))
        dt = float("inf")
        for _ in range(args.repeat):
            domain_qstats.clear()
            domain_qstats.update(copy.deepcopy(snapshot))
            info = {}
            t0 = time.perf_counter()
            adv = compute_drpo_outcome_advantage(rewards, uids, doms, info=info)
            dt = min(dt, time.perf_counter() - t0)
        print(f"history {hist:>8} questions (step {step}): {dt * 1e3:10.1f} ms/step")
        results.append({"size": size, "history": hist, "step": step, "seconds": dt,
                        "advantages": [float(a) for a in adv], "domains": info})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seed": args.seed, "results": results}, f)


if __name__ == "__main__":
    main()
