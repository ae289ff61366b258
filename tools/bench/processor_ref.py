#!/usr/bin/env python3
"""Throughput of the reference processor path on the workload of
crates/qoq-processor/benches/processor.rs, printed (and written with --out) as one JSON line.

* images: PIL open, the dataset-side resize (`process_image`, 65,536..524,288 pixels, NEAREST;
  written from spec §4.1), then, per sample as `RLHFDataset.__getitem__` does it, the format
  prompt (jinja2), `apply_chat_template` and `Qwen2_5_VLProcessor(images=[img], text=[prompt])`
  with `Qwen2VLImageProcessorFast` (the reference's choice; torchvision) and the real Qwen
  tokenizer with the Qwen2.5-VL / QoQ added tokens; files: .testdata/images/retina.jpg and the
  three PNGs of crates/qoq-processor/tests/fixtures/images, cycled;
* ECGs: `wfdb.rdrecord` of examples/mini/ecg/demo-ecg/rec_003, the 8 model leads, the first
  10 s `scipy.signal.resample`d to 2500 samples (the ECG-JEPA convention).

Usage: python3 tools/bench/processor_ref.py [--rounds 25] [--threads N] [--out /tmp/ref.json]
(needs transformers==4.51.3, torch, torchvision, pillow, wfdb, scipy, jinja2).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import wfdb
from jinja2 import Template
from PIL import Image
from scipy.signal import resample
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorFast

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from processor import hf_tokenizer  # noqa: E402  (tools/fixtures/processor.py)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRATE = os.path.join(ROOT, "crates", "qoq-processor")
CACHE = os.environ.get("QOQ_TESTDATA", os.path.join(ROOT, ".testdata"))
QUESTION = ("<image>\nAbove is a fundus photograph of a patient. What is the diagnosis?"
            "Answer with one of the following:\nNormal\nGlaucoma")
LEADS = [0, 1, 6, 7, 8, 9, 10, 11]


def process_image(img, min_pixels=65536, max_pixels=524288):
    if img.width * img.height > max_pixels:
        f = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((int(img.width * f), int(img.height * f)), resample=Image.Resampling.NEAREST)
    if img.width * img.height < min_pixels:
        f = math.sqrt(min_pixels / (img.width * img.height))
        img = img.resize((int(img.width * f), int(img.height * f)), resample=Image.Resampling.NEAREST)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with open(os.path.join(CACHE, "tokenizer", "tokenizer.json"), encoding="utf-8") as f:
        tok = hf_tokenizer(json.load(f), "/tmp/qoq_bench_tokenizer.json")
    with open(os.path.join(CRATE, "templates", "chat_template.jinja"), encoding="utf-8") as f:
        chat = f.read()
    with open(os.path.join(CRATE, "templates", "medical_format.jinja"), encoding="utf-8") as f:
        fmt = Template(f.read().strip())
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorFast(), tokenizer=tok,
                               chat_template=chat)
    files = [os.path.join(CACHE, "images", "retina.jpg")] + [
        os.path.join(CRATE, "tests", "fixtures", "images", n)
        for n in ("gen_70x50.png", "noise_30x100.png", "fundus_60x60.png")]

    def one(path):
        img = process_image(Image.open(path))
        text = fmt.render(content=QUESTION)
        content = []
        for i, chunk in enumerate(text.split("<image>")):
            if i:
                content.append({"type": "image"})
            if chunk:
                content.append({"type": "text", "text": chunk})
        content.append({"type": "time-series"})
        prompt = proc.apply_chat_template([{"role": "user", "content": content}],
                                          add_generation_prompt=True, tokenize=False)
        out = proc(images=[img], text=[prompt], return_tensors="pt")
        return out["input_ids"].shape[1]

    for p in files:
        one(p)
    t0 = time.perf_counter()
    tokens = sum(one(p) for _ in range(a.rounds) for p in files)
    img_s = time.perf_counter() - t0

    rec = os.path.join(ROOT, "examples", "mini", "ecg", "demo-ecg", "rec_003")
    n_ecg = a.rounds * 20
    t0 = time.perf_counter()
    for _ in range(n_ecg):
        r = wfdb.rdrecord(rec)
        x = r.p_signal[: int(10 * r.fs)].T[LEADS]
        x = resample(x, 2500, axis=1).astype(np.float32)
        assert x.shape == (8, 2500)
    ecg_s = time.perf_counter() - t0
    n_img = a.rounds * len(files)
    res = dict(threads=torch.get_num_threads(), images=n_img, image_seconds=img_s,
               images_per_s=n_img / img_s, tokens=tokens, ecgs=n_ecg, ecg_seconds=ecg_s,
               ecgs_per_s=n_ecg / ecg_s)
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
