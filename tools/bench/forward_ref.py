"""Reference timing for `cargo bench -p qoq-model --bench prefill`: HF transformers (4.51.3 or 5.x)
`Qwen2_5_VLForConditionalGeneration` prefill on CPU, f32, random weights.

Config (0.5B-class text model, Qwen2.5-0.5B dims): hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied embeddings, mrope_section [8, 12, 12]; vision tower of the
7B's width with depth 2 (full attention in block 1). One 392x392 image (grid 1x28x28 -> 196 tokens)
in a 512-token prompt. Prints one JSON line: {"tokens": 512, "seconds": median, "tokens_per_s": ...}.

Usage: python3 tools/bench/forward_ref.py [--runs N] [--threads T]
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

SEQ = 512
GRID = (1, 28, 28)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
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
        vision_config=dict(
            depth=2,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=896,
            fullatt_block_indexes=[1],
            window_size=112,
        ),
        attn_implementation="sdpa",
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval().float()
    n_img = GRID[0] * GRID[1] * GRID[2] // 4
    text = SEQ - n_img - 2
    ids = (
        torch.randint(0, 150000, (text // 2,)).tolist()
        + [cfg.vision_start_token_id]
        + [cfg.image_token_id] * n_img
        + [cfg.vision_end_token_id]
        + torch.randint(0, 150000, (text - text // 2,)).tolist()
    )
    input_ids = torch.tensor([ids])
    grid = torch.tensor([GRID])
    pixel_values = torch.randn(GRID[0] * GRID[1] * GRID[2], 1176)
    times = []
    with torch.no_grad():
        for i in range(a.runs + 1):
            t0 = time.perf_counter()
            model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid)
            if i > 0:  # the first run warms up
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({"tokens": SEQ, "seconds": med, "tokens_per_s": SEQ / med, "threads": torch.get_num_threads(), "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
