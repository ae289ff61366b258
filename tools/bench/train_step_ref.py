#!/usr/bin/env python3
"""PyTorch reference of `qoq bench train-step`: the identical RL training step with transformers
4.51.3's `Qwen2_5_VLForConditionalGeneration` (f32; CPU, or `--device cuda`), timed by phase.
Version differences (transformers 5 on the GPU machine) are handled in tools/bench/hf_compat.py.

`qoq bench train-step` writes `batch.json` (settings, this side's losses) and `batch.safetensors`
(the exact tensors it used) and runs `python3 tools/bench/train_step_ref.py --batch batch.json`.
This script loads the same random checkpoint twice (the policy and the frozen KL reference), uses
the thread count of the Rust side, and for every step of the batch runs:

* `process`: the dataset-side resize (PIL, NEAREST, the reference's `process_image`), HF's
  `Qwen2VLImageProcessor` (the slow, PIL one: the fast one the Rust side matches bit for bit
  needs torchvision), the tokenizer (with the Qwen2.5-VL added-token table) on the rendered prompt with every `<|image_pad|>`
  expanded, `get_rope_index` and left-padded collation; the result is compared with the Rust
  processor's (ids equal, largest pixel difference) in `process_check`;
* `generate`: `model.generate(do_sample=True, temperature=1, top_p=1, top_k=0,
  max_new_tokens=min_new_tokens=L, num_return_sequences=n)` on the Rust side's prompts, with the
  same -100 bias on the image/video placeholders, and the sampled tokens' log-probs;
* `ref_logprobs`: the update's micro-batches built from the Rust tensors and a `no_grad` forward
  of the reference model with the given M-RoPE position ids;
* `update`: per micro-batch a forward with the given position ids, the clipped surrogate
  (clip-higher, dual clip, token-mean) plus `kl_coef` times the token-mean k3 KL to the
  reference log-probs, `(loss / micro-batches).backward()`; then `clip_grad_norm_` and one
  `torch.optim.AdamW` step (skipped on a non-finite norm, as verl does);
* `total`; `update_optimizer` is the part of `update` spent in `clip_grad_norm_` and AdamW.

The forward takes the hidden states and applies `lm_head` to the response positions only, as the
Rust side does. Peak memory per phase: "5" into /proc/self/clear_refs before, VmHWM after; on a
GPU, torch's peak allocated GPU memory instead (the device is synchronised before a phase ends).

Prints one JSON line: {"threads", "phases": {phase: {"seconds", "peak_mib"}}, "steps": [{"losses",
"grad_norm", "ref_logprob_max_abs_diff", "phases"}], "process_check"}. With several steps the
first is a warm-up: "phases" holds the median over the others (largest peak).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_compat  # noqa: E402  (tools/bench/hf_compat.py)
from added_tokens import with_added_table  # noqa: E402  (tools/fixtures/added_tokens.py)

DEVICE = torch.device("cpu")

PHASES = ["process", "generate", "ref_logprobs", "update", "total"]


def reset_peak():
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        return torch.cuda.max_memory_allocated(DEVICE) / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class Phase:
    def __init__(self, out, name):
        self.out, self.name = out, name

    def __enter__(self):
        reset_peak()
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        peak = peak_mib()  # synchronises a GPU first
        self.out[self.name] = {"seconds": time.perf_counter() - self.t, "peak_mib": peak}


def process_image(img, min_pixels, max_pixels):
    """The reference's dataset-side resize (spec §4.1)."""
    if img.width * img.height > max_pixels:
        f = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((int(img.width * f), int(img.height * f)), resample=Image.Resampling.NEAREST)
    if img.width * img.height < min_pixels:
        f = math.sqrt(min_pixels / (img.width * img.height))
        img = img.resize((int(img.width * f), int(img.height * f)), resample=Image.Resampling.NEAREST)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def left_pad(rows, pad):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def response_log_probs(model, mb, s):
    """Log-probs of `labels` at positions s-1 .. s-1+r, lm_head on those positions only."""
    ids = mb["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if "pixel_values" in mb:
        img = hf_compat.image_features(model, mb["pixel_values"], mb["image_grid_thw"])
        sel = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(sel, img.to(embeds.dtype))
    out = hf_compat.text_model(model)(input_ids=None, attention_mask=mb["attention_mask"],
                      position_ids=mb["position_ids"], inputs_embeds=embeds, use_cache=False,
                      return_dict=True)
    r = mb["labels"].shape[1]
    logits = model.lm_head(out.last_hidden_state[:, s - 1:s - 1 + r]).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, mb["labels"].unsqueeze(-1)).squeeze(-1)


def masked_mean(x, mask):
    return (x * mask).sum() / (mask.sum() + 1e-8)


def actor_loss(lp, mb, ref_lp, cfg):
    """qoq_rl::loss::compute_actor_loss (verl compute_policy_loss + k3 KL), token-mean."""
    old, adv, mask = mb["old_log_probs"], mb["advantages"], mb["response_mask"]
    low, high, dual = cfg["clip_ratio_low"], cfg["clip_ratio_high"], cfg["clip_ratio_dual"]
    delta = lp - old
    cap = max(20.0, math.log(dual) + 1.0, math.log(1.0 + high) + 1.0)
    ratio = torch.exp(torch.clamp(delta, max=cap))
    clipped = torch.exp(torch.clamp(delta, math.log(1.0 - low), math.log(1.0 + high)))
    l1, l2, l3 = -adv * ratio, -adv * clipped, -adv * dual
    l_hi = torch.maximum(l1, l2)
    l_lo = torch.minimum(l_hi, l3)
    loss = masked_mean(torch.where(adv < 0, l_lo, l_hi), mask)
    if cfg["kl_in_loss"]:
        x = torch.clamp(ref_lp - lp, -20.0, 20.0)
        kld = torch.clamp(torch.exp(x) - x - 1.0, -10.0, 10.0)
        loss = loss + cfg["kl_coef"] * masked_mean(kld, mask)
    return loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", required=True, help="batch.json written by qoq bench train-step")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
    a = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(a.device)
    if DEVICE.type == "cuda":
        # f32 means f32: no TF32 in matrix products or the vision tower's convolution.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with open(a.batch) as f:
        meta = json.load(f)
    torch.set_num_threads(int(meta["threads"]))
    torch.manual_seed(0)
    if meta["loss"]["loss_agg_mode"] != "token-mean" or meta["loss"]["kl_penalty"] != "low_var_kl":
        raise SystemExit("only token-mean with the low_var_kl KL is implemented")
    model_dir = meta["model_dir"]
    tensors = load_file(meta["tensors"], device=str(DEVICE))
    f32 = hf_compat.dtype_kw(torch.float32)
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, **f32).to(DEVICE)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, **f32).to(DEVICE)
    ref.eval().requires_grad_(False)
    cfg = policy.config
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        pp = json.load(f)
    image_proc = Qwen2VLImageProcessor(**{k: pp[k] for k in (
        "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
        "image_mean", "image_std")})
    # The tiny tokenizer with the Qwen2.5-VL added-token table, as the Rust tokenizer builds it.
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = Tokenizer.from_str(json.dumps(with_added_table(json.load(f))))
    o = meta["optim"]
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                            weight_decay=o["weight_decay"])
    pad = int(meta["pad_token_id"])
    n, L = int(meta["n"]), int(meta["response_len"])
    prompts = meta["prompts"]
    merge = pp["merge_size"] ** 2

    # The Rust side's generation requests.
    req_ids = [tensors[f"p{i}.input_ids"][0].tolist() for i in range(len(prompts))]
    gen_ids, gen_mask = (t.to(DEVICE) for t in left_pad(req_ids, pad))
    gen_pv = [tensors[f"p{i}.pixel_values"] for i in range(len(prompts)) if f"p{i}.pixel_values" in tensors]
    gen_grid = [tensors[f"p{i}.image_grid_thw"] for i in range(len(prompts)) if f"p{i}.image_grid_thw" in tensors]
    gen_kwargs = {}
    if gen_pv:
        gen_kwargs = {"pixel_values": torch.cat(gen_pv), "image_grid_thw": torch.cat(gen_grid),
                      **hf_compat.mm_kwargs(gen_ids, cfg)}
    bias = {(cfg.image_token_id,): meta["placeholder_bias"], (cfg.video_token_id,): meta["placeholder_bias"]}

    steps_out = []
    process_check = None
    for si, step in enumerate(meta["steps"]):
        ph = {}
        t_total = time.perf_counter()
        with Phase(ph, "process"):
            rows, pvs, grids = [], [], []
            for p in prompts:
                imgs = [process_image(Image.open(f), meta["dataset_min_pixels"], meta["dataset_max_pixels"])
                        for f in p["images"]]
                out = image_proc(images=imgs, return_tensors="pt")
                grid = out["image_grid_thw"]
                text = p["prompt"]
                parts = text.split("<|image_pad|>")
                if len(parts) - 1 != len(imgs):
                    raise SystemExit(f"prompt has {len(parts) - 1} <|image_pad|> for {len(imgs)} images")
                text = parts[0] + "".join("<|image_pad|>" * (int(g.prod()) // merge) + rest
                                          for g, rest in zip(grid, parts[1:]))
                rows.append(tok.encode(text, add_special_tokens=False).ids)
                pvs.append(out["pixel_values"])
                grids.append(grid)
            ids, mask = left_pad(rows, pad)
            grid_all = torch.cat(grids)
            pos = hf_compat.rope_index(policy, ids.to(DEVICE), grid_all.to(DEVICE), mask.to(DEVICE))
        if process_check is None:
            ids_equal = all(r == q for r, q in zip(rows, req_ids))
            diff = max((float((pv - rp.cpu()).abs().max()) for pv, rp in zip(pvs, gen_pv)
                        if pv.shape == rp.shape), default=float("nan"))
            shapes = all(pv.shape == rp.shape for pv, rp in zip(pvs, gen_pv))
            process_check = {"input_ids_equal": ids_equal, "pixel_shapes_equal": shapes,
                             "pixel_max_abs_diff": diff}

        with Phase(ph, "generate"):
            policy.eval()
            with torch.no_grad():
                g = policy.generate(input_ids=gen_ids, attention_mask=gen_mask, do_sample=True,
                                    temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=L,
                                    min_new_tokens=L, num_return_sequences=n, pad_token_id=pad,
                                    sequence_bias=bias, output_logits=True,
                                    return_dict_in_generate=True, **gen_kwargs)
                new = g.sequences[:, gen_ids.shape[1]:]
                logits = torch.stack(g.logits, dim=1).float()
                lps = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            assert new.shape == (len(prompts) * n, L), new.shape
            assert lps.shape == new.shape
            del g, logits

        with Phase(ph, "ref_logprobs"):
            micros, refs = [], []
            for k, s in enumerate(step["prompt_lens"]):
                key = f"s{si}.m{k}."
                mb = {name[len(key):]: t for name, t in tensors.items() if name.startswith(key)}
                if "attention_mask" not in mb:
                    mb["attention_mask"] = torch.ones_like(mb["input_ids"])
                with torch.no_grad():
                    refs.append(response_log_probs(ref, mb, s))
                micros.append((mb, s))
        ref_diff = max(float((r - mb["ref_log_probs"]).abs().max()) for r, (mb, _) in zip(refs, micros))

        with Phase(ph, "update"):
            policy.train()
            opt.zero_grad(set_to_none=True)
            losses = []
            for (mb, s), r in zip(micros, refs):
                lp = response_log_probs(policy, mb, s)
                loss = actor_loss(lp, mb, r, meta["loss"])
                losses.append(float(loss.detach()))
                (loss / len(micros)).backward()
            t_opt = time.perf_counter()
            max_norm = o["max_grad_norm"]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
            norm = float(norm)
            if math.isfinite(norm):
                opt.step()
            opt_s = time.perf_counter() - t_opt
        ph["update_optimizer"] = {"seconds": opt_s, "peak_mib": ph["update"]["peak_mib"]}
        ph["total"] = {"seconds": time.perf_counter() - t_total,
                       "peak_mib": max(ph[p]["peak_mib"] for p in PHASES[:-1])}
        steps_out.append({"phases": ph, "losses": losses, "grad_norm": norm,
                          "ref_logprob_max_abs_diff": ref_diff})

    reported = steps_out[1:] if len(steps_out) > 1 else steps_out
    phases = {p: {"seconds": statistics.median(s["phases"][p]["seconds"] for s in reported),
                  "peak_mib": max(s["phases"][p]["peak_mib"] for s in reported)}
              for p in PHASES + ["update_optimizer"]}
    print(json.dumps({"threads": torch.get_num_threads(), "phases": phases, "steps": steps_out,
                      "process_check": process_check}))


if __name__ == "__main__":
    main()
