#!/usr/bin/env python3
"""Check a running `qoq serve` with the official `openai` Python client (pip install openai).

Exercises: the API key (missing, wrong, right), /v1/models, a plain completion, a streamed one,
an image part (PNG data URI), an ECG part (the `input_ecg` extension, a .npy array), multi-turn
history with a system message, a stop string inside a longer greedy answer (streamed and not),
logprobs / top_logprobs (streamed and not), presence / frequency penalties, n + seed, max_completion_tokens, temperature /
top_p, the refusals (remote image URL, unsupported ECG format, n out of range, unknown model,
too many pixels, unimplemented parameters), disconnect cancellation (closed streams leave the
batch at once: /health shows nothing running) and concurrent requests (counts of 200 / 429;
429 needs a small --queue-size). Prints one line per check and exits non-zero when one fails.

    QOQ_TINY_MODEL_OUT=/tmp/tiny cargo test -p qoq-cli --test serve -- --ignored write_the
    qoq serve --model /tmp/tiny/model --port 8000 --max-running 2 --queue-size 1 \
        --max-tokens-cap 4096 --api-key test-key &
    python3 tools/serve_check.py --base-url http://127.0.0.1:8000/v1 --api-key test-key

CI never runs this script.
"""

import argparse
import base64
import concurrent.futures as cf
import io
import json
import sys
import time
import urllib.error
import urllib.request

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
    ap.add_argument("--api-key", default=None, help="the server's --api-key (checks 401s too)")
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key or "unused", max_retries=0,
                           timeout=120)
    root = a.base_url.rsplit("/v1", 1)[0]

    def health():
        with urllib.request.urlopen(root + "/health", timeout=10) as f:
            return json.load(f)

    if a.api_key:
        # The client always sends a key: the missing-key request goes without it.
        try:
            urllib.request.urlopen(a.base_url + "/models", timeout=10)
            check("api key missing", False, "no error")
        except urllib.error.HTTPError as e:
            code = json.load(e).get("error", {}).get("code")
            check("api key missing", e.code == 401 and code == "invalid_api_key", f"HTTP {e.code}, code {code!r}")
        bad = openai.OpenAI(base_url=a.base_url, api_key=a.api_key + "x", max_retries=0, timeout=30)
        expect_error("api key wrong", lambda: bad.models.list(), 401, "invalid_api_key")
        check("api key: /health needs none", health().get("status") == "ok")

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

    # Multi-turn history with a system message: the earlier turns and the system message are
    # rendered (the prompt grows by them).
    sys_msg = {"role": "system", "content": "You are a cardiologist reading twelve-lead ECGs for an emergency department."}
    single = client.chat.completions.create(model=name, max_tokens=1, messages=[sys_msg] + q)
    multi = client.chat.completions.create(model=name, max_tokens=1, messages=[
        sys_msg, {"role": "user", "content": "What is the rhythm?"},
        {"role": "assistant", "content": "Sinus rhythm."}] + q)
    plain_q = client.chat.completions.create(model=name, max_tokens=1, messages=q)
    check("multi-turn + system", multi.usage.prompt_tokens > single.usage.prompt_tokens
          and single.usage.prompt_tokens != plain_q.usage.prompt_tokens,
          f"prompt tokens: {plain_q.usage.prompt_tokens} plain, {single.usage.prompt_tokens} "
          f"with system, {multi.usage.prompt_tokens} with two earlier turns")

    # A stop string inside a longer greedy answer.
    greedy = dict(model=name, messages=q, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**greedy).choices[0].message.content
    mid = len(full) // 2
    stop = full[mid:mid + 3]
    want = full[:full.find(stop)]
    r = client.chat.completions.create(stop=[stop], **greedy)
    check("stop", r.choices[0].message.content == want and r.choices[0].finish_reason == "stop",
          f"stop {stop!r}: {len(want)} of {len(full)} characters kept, finish {r.choices[0].finish_reason}")
    got, fin = "", None
    for chunk in client.chat.completions.create(stop=stop, stream=True, **greedy):
        for c in chunk.choices:
            got += c.delta.content or ""
            fin = c.finish_reason or fin
    check("stop (streamed)", got == want and fin == "stop", f"{len(got)} characters, finish {fin}")

    # logprobs + top_logprobs, unstreamed and streamed.
    r = client.chat.completions.create(logprobs=True, top_logprobs=3, **greedy)
    lp = r.choices[0].logprobs.content
    check("logprobs", len(lp) == r.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in lp)
          and all(e.top_logprobs[0].token == e.token for e in lp) and all(e.logprob <= 0 for e in lp),
          f"{len(lp)} entries, first {lp[0].token!r} {lp[0].logprob:.3f}")
    slp = []
    for chunk in client.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **greedy):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                slp.extend(c.logprobs.content)
    check("logprobs (streamed)", [(e.token, e.logprob) for e in slp] == [(e.token, e.logprob) for e in lp],
          f"{len(slp)} entries, same as unstreamed")

    # n + seed, max_completion_tokens, temperature / top_p.
    kw = dict(model=name, messages=q, n=3, seed=7, temperature=1.0, top_p=0.9,
              max_completion_tokens=6, extra_body={"ignore_eos": True})
    r1 = client.chat.completions.create(**kw)
    r2 = client.chat.completions.create(**kw)
    check("n + seed", [c.message.content for c in r1.choices] == [c.message.content for c in r2.choices]
          and len(r1.choices) == 3 and r1.usage.completion_tokens == 18,
          f"3 choices reproduced, {r1.usage.completion_tokens} tokens")
    pen = client.chat.completions.create(frequency_penalty=2.0, presence_penalty=0.5, logprobs=True, **greedy)
    toks = [e.token for e in pen.choices[0].logprobs.content]
    check("presence/frequency penalty", len(set(toks)) == len(toks),
          f"{len(toks)} tokens, none repeated under frequency_penalty 2")
    expect_error("refuse frequency_penalty=3", lambda: client.chat.completions.create(
        model=name, messages=q, frequency_penalty=3), 400, "invalid_penalty")
    expect_error("refuse tools", lambda: client.chat.completions.create(
        model=name, messages=q, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        400, "unsupported_parameter")
    expect_error("refuse top_logprobs=21", lambda: client.chat.completions.create(
        model=name, messages=q, logprobs=True, top_logprobs=21), 400, "invalid_top_logprobs")

    # Disconnect: long streams closed after their first chunks leave the batch at once.
    long = dict(model=name, messages=q, max_tokens=4096, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
    streams = [client.chat.completions.create(**long) for _ in range(2)]
    for st in streams:
        for i, _ in enumerate(st):
            if i >= 2:
                break
    for st in streams:
        st.close()
    t = time.perf_counter()
    while health().get("running", 1) != 0 and time.perf_counter() - t < 5:
        time.sleep(0.02)
    gone = time.perf_counter() - t
    r = client.chat.completions.create(model=name, messages=q, max_tokens=2)
    check("disconnect", gone < 5 and r.usage.completion_tokens >= 1,
          f"closed streams left the batch in {gone * 1e3:.0f} ms; the next request ran")

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
