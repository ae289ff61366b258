"""Reference timing for `cargo bench -p qoq-engine --bench generate`: HF transformers 4.51.3
`Qwen2_5_VLForConditionalGeneration.generate` on CPU, f32, random weights, text-only prompts.

Config: the 0.5B-class text model of tools/bench/forward_ref.py (Qwen2.5-0.5B dims) with a 2-layer
vision tower (unused by text prompts). Prompts of PROMPT tokens; every sequence decodes exactly
NEW tokens (min_new_tokens = max_new_tokens, so EOS cannot end it early), sampled with
temperature 1 and top_p 0.99 as the reference's rollouts. Cases: 1 prompt x 1 sequence, and
16 prompts x 5 sequences (num_return_sequences=5). Prints one JSON line per case:
{"case", "rows", "prefill_tokens_per_s", "decode_tokens_per_s", "seconds"}.

Prefill time is measured as generate with max_new_tokens=1; decode tokens/s is
rows * (NEW - 1) / (t(NEW) - t(1)).

Usage: python3 tools/bench/generate_ref.py [--prompt 64] [--new 16] [--threads T]
"""

import argparse
import json
import time

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
        tie_word_embeddings=True,
        vision_config=dict(depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=896, fullatt_block_indexes=[1], window_size=112),
        attn_implementation="sdpa",
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval().float()
    for case, prompts, n in [("1x1", 1, 1), ("16x5", 16, 5)]:
        ids = torch.randint(0, 150000, (prompts, a.prompt))

        def run(new):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=1.0,
                    top_p=0.99,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    num_return_sequences=n,
                    pad_token_id=0,
                )
            assert out.shape == (prompts * n, a.prompt + new), out.shape
            return time.perf_counter() - t0

        run(2)  # warm-up
        t1 = run(1)
        tn = run(a.new)
        rows = prompts * n
        print(json.dumps({
            "case": case,
            "rows": rows,
            "prefill_tokens_per_s": prompts * a.prompt / t1,
            "decode_tokens_per_s": rows * (a.new - 1) / max(tn - t1, 1e-9),
            "seconds": tn,
            "threads": torch.get_num_threads(),
        }), flush=True)


if __name__ == "__main__":
    main()
