#!/usr/bin/env python3
"""The Python half of scripts/gpu-check.sh (run that; it calls these steps with their timeouts).

Steps (each a subcommand):

* `models OUT SIZE...`: random-weight Qwen2.5-VL checkpoints written with transformers'
  `save_pretrained` into OUT/SIZE: `tiny` (f32: the processor fixture's dims), `0.5b` (bf16:
  Qwen2.5-0.5B text dims with a 2-layer vision tower of the 7B's width, as `qoq bench train-step
  --size 0.5b`), `7b` (bf16: the dimensions of QoQ-Med-VL-7B's config, embedded below). All use the
  special-token ids of the processor fixture's tokenizer, which is copied beside the weights (with
  its preprocessor config) so that `qoq bench train-step --model` can train them. Stock
  Qwen2.5-VL: no ECG encoder (transformers has no class for it, so there is nothing to compare).
* `parity --model M --dtype D --qoq BIN --device DEV --out J`: one batch of two rows (text and an
  image; the second row left-padded) through `qoq logits` and through transformers; max and mean
  |diff| of the logits over the real tokens and the top-1 (next-token) agreement.
* `generate --model M --dtype D --device DEV --prompts P --n N --prompt-len L --new T --out J`:
  transformers `generate` timed as `qoq bench generate` times the engine (same prompts, same
  sampling, prefill = t(1 token), decode = rows * (T - 1) / (t(T) - t(1))).
* `report WORK OUT`: the parts' JSON into OUT/gpu-check.json and a Markdown table
  OUT/gpu-check.md; exits 1 if a parity check failed or did not run.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
FIXTURE = os.path.join(REPO, "crates", "qoq-processor", "tests", "fixtures", "tiny_model")
sys.path.insert(0, HERE)

# Special-token ids of the processor fixture's tokenizer (its config.json).
TOKENS = dict(image_token_id=3012, video_token_id=3013, vision_start_token_id=3009,
              vision_end_token_id=3010, vision_token_id=3011, bos_token_id=3000, eos_token_id=3002)
VISION_COMMON = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                     window_size=112, hidden_act="silu", in_chans=3)
CONFIGS = {
    # The processor fixture's tiny model (crates/qoq-processor/tests/fixtures/tiny_model).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=3023, max_position_embeddings=4096,
                 mrope_section=[2, 3, 3], tie_word_embeddings=False,
                 vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                             out_hidden_size=64, fullatt_block_indexes=[1])),
    # `qoq bench train-step --size 0.5b` (Qwen2.5-0.5B text dims).
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                 mrope_section=[8, 12, 12], tie_word_embeddings=True,
                 vision=dict(depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16,
                             out_hidden_size=896, fullatt_block_indexes=[1])),
    # QoQ-Med-VL-7B's config.json (Qwen2.5-VL-7B dims), without the ECG path.
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
               mrope_section=[16, 24, 24], tie_word_embeddings=False,
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31])),
}
DTYPES = {"tiny": "f32", "0.5b": "bf16", "7b": "bf16"}


def hf_config_dict(size):
    """config.json of a stock Qwen2.5-VL: the text keys both at the top (4.51 layout, which
    transformers 5 still reads) and, for transformers 5, under `text_config` too (4.51 cannot
    take a `text_config`)."""
    import hf_compat
    c = CONFIGS[size]
    text = dict(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                num_key_value_heads=c["num_key_value_heads"], vocab_size=c["vocab_size"],
                max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=1e-6,
                rope_theta=1000000.0, hidden_act="silu", use_sliding_window=False,
                rope_scaling={"type": "mrope", "mrope_section": c["mrope_section"]},
                bos_token_id=TOKENS["bos_token_id"], eos_token_id=TOKENS["eos_token_id"])
    vision = dict(VISION_COMMON, **c["vision"])
    d = dict(text, model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
             tie_word_embeddings=c["tie_word_embeddings"], vision_config=vision,
             **{k: v for k, v in TOKENS.items() if k not in text})
    if hf_compat.MAJOR >= 5:
        d["text_config"] = dict(text, tie_word_embeddings=c["tie_word_embeddings"])
    return d


def torch_dtype(name):
    import torch
    return {"f32": torch.float32, "bf16": torch.bfloat16}[name]


def load_on(device):
    """`from_pretrained` straight onto a GPU (the 7B's 16 GB need not pass through host memory)."""
    return {"device_map": device} if str(device).startswith("cuda") else {}


def setup_torch(device):
    import torch
    torch.manual_seed(0)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch


def cmd_models(a):
    torch = setup_torch(a.device)
    import hf_compat
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    for size in a.sizes:
        t0 = time.perf_counter()
        out = os.path.join(a.out, size)
        os.makedirs(out, exist_ok=True)
        cfg = Qwen2_5_VLConfig.from_dict(hf_config_dict(size))
        dtype = torch_dtype(DTYPES[size])
        torch.manual_seed(0)
        with torch.device(a.device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, **hf_compat.dtype_kw(dtype))
        model.save_pretrained(out, safe_serialization=True)
        n = sum(p.numel() for p in model.parameters())
        del model
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
        for f in ("tokenizer.json", "preprocessor_config.json"):
            shutil.copy(os.path.join(FIXTURE, f), os.path.join(out, f))
        print(json.dumps({"size": size, "dtype": DTYPES[size], "params": n,
                          "seconds": time.perf_counter() - t0}), flush=True)


def parity_inputs(cfg, torch):
    """Two rows: text, an image of 8x8 patches (16 merged tokens), text; row 2 left-padded by 3."""
    g = torch.Generator().manual_seed(1)
    vocab = hf_compat_cfg(cfg, "vocab_size")
    special = set(TOKENS.values())
    def text(n):
        ids = torch.randint(0, min(vocab, 3000), (n,), generator=g).tolist()
        return [i for i in ids if i not in special][:n]
    grid = [1, 8, 8]
    img_tokens = grid[0] * grid[1] * grid[2] // 4
    row = text(12) + [cfg.vision_start_token_id] + [cfg.image_token_id] * img_tokens + \
        [cfg.vision_end_token_id] + text(20)
    rows = [row, row[:len(row) - 3]]
    width = max(len(r) for r in rows)
    ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    patches = 2 * grid[0] * grid[1] * grid[2]
    pv = torch.randn((patches, 3 * 2 * 14 * 14), generator=g)
    return ids, mask, pv, torch.tensor([grid, grid], dtype=torch.long)


def hf_compat_cfg(cfg, name):
    import hf_compat
    return hf_compat.cfg_get(cfg, name)


def hf_logits(model_dir, dtype, device, ids, mask, pv, grid, torch):
    import hf_compat
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, **hf_compat.dtype_kw(torch_dtype(dtype)), **load_on(device)).to(device).eval()
    ids, mask, grid = ids.to(device), mask.to(device), grid.to(device)
    pos = hf_compat.rope_index(model, ids, grid, mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                    pixel_values=pv.to(device, torch_dtype(dtype)), image_grid_thw=grid,
                    **hf_compat.mm_kwargs(ids, model.config))
    logits = out.logits.float().cpu()
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return logits


def compare(a, b, mask):
    sel = mask.bool()
    x, y = a[sel], b[sel]
    d = (x - y).abs()
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "top1_agreement": float((x.argmax(-1) == y.argmax(-1)).float().mean()),
            "positions": int(sel.sum())}


def cmd_parity(a):
    import subprocess
    torch = setup_torch(a.device)
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5_VLConfig
    cfg = Qwen2_5_VLConfig.from_pretrained(a.model)
    ids, mask, pv, grid = parity_inputs(cfg, torch)
    work = os.path.dirname(os.path.abspath(a.out))
    inp = os.path.join(work, f"parity-{os.path.basename(a.model)}-inputs.safetensors")
    outp = os.path.join(work, f"parity-{os.path.basename(a.model)}-qoq.safetensors")
    save_file({"input_ids": ids, "attention_mask": mask, "pixel_values": pv,
               "image_grid_thw": grid}, inp)
    t0 = time.perf_counter()
    subprocess.run([a.qoq, "logits", "--model", a.model, "--inputs", inp, "--out", outp,
                    "--dtype", a.dtype, "--device", a.device], check=True)
    qoq_s = time.perf_counter() - t0
    ours = load_file(outp)["logits"]
    theirs = hf_logits(a.model, a.dtype, a.device, ids, mask, pv, grid, torch)
    res = {"model": os.path.basename(a.model), "dtype": a.dtype, "device": a.device,
           "qoq_seconds": qoq_s, **compare(ours, theirs, mask)}
    if a.dtype == "f32":
        res["tolerance_max_abs"] = a.tol
        res["pass"] = res["max_abs_diff"] <= a.tol
    else:
        # The noise floor: transformers' own bf16 against its f32 on the same inputs. A random
        # model's logits are flat, so near-ties flip under bf16 rounding on either side.
        f32 = hf_logits(a.model, "f32", a.device, ids, mask, pv, grid, torch)
        floor = compare(theirs, f32, mask)
        res["hf_bf16_vs_hf_f32"] = floor
        res["qoq_bf16_vs_hf_f32"] = compare(ours, f32, mask)
        need = min(0.99, floor["top1_agreement"])
        res["top1_required"] = need
        res["pass"] = res["top1_agreement"] >= need
    print(json.dumps(res), flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


def prompt_ids(p, length, vocab):
    """`qoq bench generate`'s prompts (crates/qoq-cli/src/cmd/bench_generate.rs)."""
    bound = max(1, min(vocab, 150_000))
    return [(p * 7919 + i * 104_729) % bound for i in range(length)]


def cmd_generate(a):
    torch = setup_torch(a.device)
    import hf_compat
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        a.model, **hf_compat.dtype_kw(torch_dtype(a.dtype)), **load_on(a.device)).to(a.device).eval()
    vocab = hf_compat.cfg_get(model.config, "vocab_size")
    ids = torch.tensor([prompt_ids(p, a.prompt_len, vocab) for p in range(a.prompts)],
                       device=a.device)
    cuda = a.device.startswith("cuda")

    def run(new):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_p=0.99, top_k=0, max_new_tokens=new,
                                 min_new_tokens=new, num_return_sequences=a.n, pad_token_id=0)
        if cuda:
            torch.cuda.synchronize()
        assert out.shape == (a.prompts * a.n, a.prompt_len + new), out.shape
        return time.perf_counter() - t0

    run(2)  # warm-up
    t1 = run(1)
    tn = run(a.new)
    rows = a.prompts * a.n
    res = {"prompts": a.prompts, "n": a.n, "rows": rows, "prompt_len": a.prompt_len, "new": a.new,
           "dtype": a.dtype, "device": a.device, "prefill_seconds": t1, "seconds": tn,
           "prefill_tokens_per_s": a.prompts * a.prompt_len / t1,
           "decode_tokens_per_s": rows * (a.new - 1) / max(tn - t1, 1e-9)}
    print(json.dumps(res), flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


# ---- report -------------------------------------------------------------------------------

PEAK_TFLOPS = 989.0  # dense bf16, H100/H200 SXM


def decoder_params(size):
    """Parameters of the decoder layers (attention with q/k/v biases, MLP), the N of 6·N·T."""
    c = CONFIGS[size]
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    return L * (h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i)


def load(work, name):
    p = os.path.join(work, name)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


def fmt(x, spec=".1f"):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def cmd_report(a):
    parts = []
    if os.path.isfile(os.path.join(a.work, "parts.tsv")):
        with open(os.path.join(a.work, "parts.tsv")) as f:
            for line in f:
                name, rc, secs, peak = line.rstrip("\n").split("\t")
                parts.append({"part": name, "rc": int(rc), "seconds": float(secs),
                              "gpu_peak_mib": float(peak) if peak else None})
    status = {p["part"]: p for p in parts}
    env = load(a.work, "env.json") or {}
    out = {"env": env, "parts": parts, "parity": {}, "generate": {}, "train": {}}
    md = [f"# gpu-check, {env.get('date', '?')}", "",
          f"GPU: {env.get('gpu', '?')}; driver {env.get('driver', '?')}; torch {env.get('torch', '?')}; "
          f"transformers {env.get('transformers', '?')}; qoq device `{env.get('device', '?')}`", ""]

    md += ["## Parity (`qoq logits` vs transformers)", "",
           "| model | dtype | max abs diff | mean abs diff | top-1 agreement | required | pass |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    ok = True
    for size in a.parity:
        r = load(a.work, f"parity-{size}.json")
        out["parity"][size] = r
        if r is None:
            ok = False
            st = status.get(f"parity-{size}", {})
            md.append(f"| {size} | - | - | - | - | - | NOT RUN (rc {st.get('rc', '?')}) |")
            continue
        ok &= bool(r["pass"])
        req = f"max abs <= {r['tolerance_max_abs']:g}" if "tolerance_max_abs" in r else \
            f">= {r['top1_required']:.4f} (HF bf16 vs f32: {r['hf_bf16_vs_hf_f32']['top1_agreement']:.4f})"
        md.append(f"| {size} | {r['dtype']} | {r['max_abs_diff']:.3e} | {r['mean_abs_diff']:.3e} | "
                  f"{r['top1_agreement']:.4f} | {req} | {'yes' if r['pass'] else 'NO'} |")

    md += ["", "## Generation (text prompts of 64 tokens, exactly N new tokens, temperature 1, top-p 0.99)", "",
           "| model | case | new | qoq prefill tok/s | HF prefill tok/s | qoq decode tok/s | HF decode tok/s | decode qoq/HF | GPU peak MiB qoq / HF |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in a.gen:
        size, case = key.split(":")
        q, h = load(a.work, f"gen-{size}-{case}-qoq.json"), load(a.work, f"gen-{size}-{case}-hf.json")
        out["generate"][key] = {"qoq": q, "hf": h}
        g = lambda r, k: r[k] if r else None  # noqa: E731
        ratio = g(q, "decode_tokens_per_s") / g(h, "decode_tokens_per_s") if q and h else None
        pk = lambda n: fmt(status.get(n, {}).get("gpu_peak_mib"), ".0f")  # noqa: E731
        new = (q or h or {}).get("new")
        md.append(f"| {size} | {case} | {fmt(new, 'd') if new else '-'} | {fmt(g(q, 'prefill_tokens_per_s'))} | "
                  f"{fmt(g(h, 'prefill_tokens_per_s'))} | {fmt(g(q, 'decode_tokens_per_s'))} | "
                  f"{fmt(g(h, 'decode_tokens_per_s'))} | {fmt(ratio, '.2f')} | "
                  f"{pk(f'gen-{size}-{case}-qoq')} / {pk(f'gen-{size}-{case}-hf')} |")

    md += ["", "## One RL step (`qoq bench train-step`)", "",
           "| run | process s | generate s | ref s | update s | total s | torch total s | torch/qoq | gen tok/s | update tok/s | update MFU | GPU peak MiB | agree with torch |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, size in a.train:
        r = load(a.work, f"train-{name}.json")
        out["train"][name] = r
        st = status.get(f"train-{name}", {})
        if r is None:
            md.append(f"| {name} | NOT RUN or failed (rc {st.get('rc', '?')}) |" + " |" * 12)
            continue
        ph = r["qoq"]["phases"]
        s = lambda p: ph[p]["seconds"]  # noqa: E731
        rows = r["prompts"] * r["n"]
        step = r["qoq"]["steps"][-1]
        tokens = step.get("update_tokens")
        factor = 4 if r.get("lora_rank") else 6  # LoRA: no weight gradients of the frozen base
        mfu = factor * decoder_params(size) * tokens / s("update") / (PEAK_TFLOPS * 1e12) \
            if tokens and s("update") > 0 and env.get("device") != "cpu" else None
        t = r.get("torch")
        tt = t["phases"]["total"]["seconds"] if t else None
        agree = r["check"]["agree"] if r.get("check") else None
        r["update_mfu"] = mfu
        md.append(f"| {name} | {s('process'):.2f} | {s('generate'):.2f} | {s('ref_logprobs'):.2f} | "
                  f"{s('update'):.2f} | {s('total'):.2f} | {fmt(tt, '.2f')} | "
                  f"{fmt(tt / s('total') if tt else None, '.2f')} | "
                  f"{rows * r['response_len'] / s('generate'):.0f} | {fmt(tokens / s('update') if tokens else None, '.0f')} | "
                  f"{fmt(100 * mfu, '.1f') + ' %' if mfu is not None else '-'} | {fmt(st.get('gpu_peak_mib'), '.0f')} | "
                  f"{'-' if agree is None else ('yes' if agree else 'NO')} |")
    md += ["", "## Parts", "", "| part | exit | seconds | GPU peak MiB |", "| --- | --- | --- | --- |"]
    for p in parts:
        md.append(f"| {p['part']} | {p['rc']}{' (timed out)' if p['rc'] == 124 else ''} | "
                  f"{p['seconds']:.1f} | {fmt(p['gpu_peak_mib'], '.0f')} |")
    md += ["", f"Update MFU: {{6 full, 4 LoRA}} x decoder-layer parameters x update tokens / update seconds / "
           f"{PEAK_TFLOPS:g} TFLOP/s (dense bf16); recomputation not counted. GPU peak: nvidia-smi's "
           "device memory in use, sampled every 200 ms during the part (all processes)."]
    out["parity_pass"] = ok
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu-check.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(a.out, "gpu-check.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nparity: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models")
    m.add_argument("out")
    m.add_argument("sizes", nargs="+", choices=sorted(CONFIGS))
    m.add_argument("--device", default="cpu")
    p = sub.add_parser("parity")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", choices=["f32", "bf16"], required=True)
    p.add_argument("--qoq", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tol", type=float, default=1e-4, help="f32: largest |diff| allowed")
    p.add_argument("--out", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--model", required=True)
    g.add_argument("--dtype", choices=["f32", "bf16"], required=True)
    g.add_argument("--device", default="cpu")
    g.add_argument("--prompts", type=int, default=1)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--prompt-len", type=int, default=64)
    g.add_argument("--new", type=int, default=256)
    g.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("work")
    r.add_argument("out")
    r.add_argument("--parity", nargs="*", default=[], help="sizes whose parity must pass")
    r.add_argument("--gen", nargs="*", default=[], help="SIZE:CASE generation rows")
    r.add_argument("--train", nargs="*", default=[], help="NAME:SIZE train-step rows")
    a = ap.parse_args()
    if a.cmd == "report":
        a.train = [tuple(x.split(":")) for x in a.train]
    {"models": cmd_models, "parity": cmd_parity, "generate": cmd_generate, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
