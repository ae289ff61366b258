#!/usr/bin/env python3
"""Check a running `qoq serve` with the official `openai` Python client (pip install openai).

Exercises: /v1/models, a plain completion, a streamed one, an image part (PNG data URI), an
ECG part (the `input_ecg` extension, a .npy array), the refusals (remote image URL, unsupported
ECG format, n out of range, unknown model, too many pixels when the server's limit is small)
and concurrent requests (counts of 200 / 429; 429 needs a small --queue-size).
Prints one line per check and exits non-zero when a check fails.

    QOQ_TINY_MODEL_OUT=/tmp/tiny cargo test -p qoq-cli --test serve -- --ignored write_the
    qoq serve --model /tmp/tiny/model --port 8000 --queue-size 1 --max-tokens-cap 32 &
    python3 tools/serve_check.py --base-url http://127.0.0.1:8000/v1

CI never runs this script.
"""

import argparse
import base64
import concurrent.futures as cf
import io
import sys
import time

import numpy as np
import openai
from PIL import Image

FAILED = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        FAILED.append(name)


def png_uri(w, h):
    x = np.arange(w, dtype=np.uint8)[None, :, None] * 3
    y = np.arange(h, dtype=np.uint8)[:, None, None] * 5
    arr = np.broadcast_to(x + y, (h, w, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def npy_ecg_b64():
    t = np.arange(5000, dtype=np.float32) / 500.0
    sig = np.stack([0.5 * np.sin(2 * np.pi * (1 + k * 0.1) * t) for k in range(12)]).astype("<f4")
    buf = io.BytesIO()
    np.save(buf, sig)
    return base64.b64encode(buf.getvalue()).decode()


def expect_error(name, fn, status, code):
    try:
        fn()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        got = body.get("code") or (body.get("error") or {}).get("code")
        check(name, e.status_code == status and got == code,
              f"HTTP {e.status_code}, code {got!r}: {e.message[:110]}")
        return
    check(name, False, "no error raised")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--concurrent", type=int, default=8)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key="unused", max_retries=0, timeout=120)

    models = client.models.list()
    name = models.data[0].id
    check("models", len(models.data) == 1, f"serving {name!r}")

    q = [{"role": "user", "content": "What is the diagnosis?"}]
    t = time.perf_counter()
    r = client.chat.completions.create(model=name, messages=q, max_tokens=16, temperature=0, seed=1)
    ms = (time.perf_counter() - t) * 1e3
    text = r.choices[0].message.content
    check("plain", r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length"),
          f"{ms:.0f} ms, usage {r.usage.prompt_tokens}+{r.usage.completion_tokens}, "
          f"finish {r.choices[0].finish_reason}, text {text[:50]!r}")

    stream = client.chat.completions.create(model=name, messages=q, max_tokens=16, temperature=0,
                                            seed=1, stream=True, stream_options={"include_usage": True})
    parts, finishes, usage, n_chunks = [], [], None, 0
    for chunk in stream:
        n_chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            if c.finish_reason:
                finishes.append(c.finish_reason)
    streamed = "".join(parts)
    check("stream", streamed == text and len(finishes) == 1 and usage is not None
          and usage.completion_tokens == r.usage.completion_tokens,
          f"{n_chunks} chunks, same text as unstreamed: {streamed == text}, usage {usage and usage.total_tokens}")

    r = client.chat.completions.create(model=name, max_tokens=8, n=2, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": png_uri(64, 48)}}]}])
    check("image", len(r.choices) == 2, f"usage {r.usage.prompt_tokens}+{r.usage.completion_tokens}, 2 choices")

    r = client.chat.completions.create(model=name, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What does the ECG show?"},
        {"type": "input_ecg", "input_ecg": {"data": npy_ecg_b64(), "format": "npy", "fs": 500}}]}])
    check("ecg (npy)", r.usage.completion_tokens >= 1, f"usage {r.usage.prompt_tokens}+{r.usage.completion_tokens}")

    expect_error("refuse remote image URL", lambda: client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cxr.png"}}]}]),
        400, "remote_url_refused")
    expect_error("refuse wfdb ECG", lambda: client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": [
            {"type": "input_ecg", "input_ecg": {"data": "AAAA", "format": "wfdb"}}]}]),
        400, "unsupported_ecg_format")
    expect_error("refuse n=9", lambda: client.chat.completions.create(model=name, messages=q, n=9), 400, "invalid_n")
    expect_error("refuse unknown model", lambda: client.chat.completions.create(model="gpt-4o", messages=q),
                 404, "model_not_found")
    expect_error("refuse 6500x6500 image", lambda: client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_uri(6500, 6500)}}]}]),
        413, "image_too_large")

    def one(_):
        try:
            client.chat.completions.create(model=name, messages=q, max_tokens=32, n=8, temperature=1.0)
            return 200
        except openai.RateLimitError:
            return 429

    with cf.ThreadPoolExecutor(a.concurrent) as ex:
        statuses = list(ex.map(one, range(a.concurrent)))
    check("concurrent", all(s in (200, 429) for s in statuses),
          f"{statuses.count(200)} x 200, {statuses.count(429)} x 429 of {a.concurrent}")

    print("all checks passed" if not FAILED else f"FAILED: {FAILED}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
