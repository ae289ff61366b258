"""What differs between the transformers versions the bench scripts meet: 4.51.3 (our CPU
machines, the reference's pin) and 5.x (the GPU machine: 5.17). One place for each difference:

* loading dtype: `torch_dtype=` (4.x) vs `dtype=` (5.x);
* module layout: 4.51 has `model.model` = the text decoder and `model.visual`; >= 4.52 has
  `model.model.language_model` and `model.model.visual`;
* the vision tower returns a tensor (4.x) or an output with `pooler_output` (5.x);
* `get_rope_index`: on the outer model with (ids, image_grid, video_grid, second_per_grid_ts,
  mask) in 4.51; on `model.model` with `mm_token_type_ids` (0 text, 1 image, 2 video) in 5.x,
  where `forward` and `generate` also need `mm_token_type_ids` to build M-RoPE positions (without
  them a multimodal prompt silently gets 1-D positions).
"""

import torch
import transformers

MAJOR = int(transformers.__version__.split(".")[0])


def dtype_kw(dtype):
    """The keyword `from_pretrained` / `_from_config` take the dtype by."""
    return {"dtype": dtype} if MAJOR >= 5 else {"torch_dtype": dtype}


def cfg_get(cfg, name):
    """A text-model setting of a Qwen2.5-VL config (top level in 4.51, `text_config` later)."""
    text = getattr(cfg, "text_config", None)
    if text is not None and hasattr(text, name):
        return getattr(text, name)
    return getattr(cfg, name)


def text_model(model):
    inner = model.model
    return getattr(inner, "language_model", inner)


def visual(model):
    v = getattr(model.model, "visual", None)
    return v if v is not None else model.visual


def image_features(model, pixel_values, grid_thw):
    out = visual(model)(pixel_values, grid_thw=grid_thw)
    return out if torch.is_tensor(out) else out.pooler_output


def mm_token_type_ids(ids, cfg):
    t = torch.zeros_like(ids, dtype=torch.int32)
    t[ids == cfg.image_token_id] = 1
    t[ids == cfg.video_token_id] = 2
    return t


def mm_kwargs(ids, cfg):
    """Extra keyword arguments `forward` / `generate` need for multimodal positions."""
    return {"mm_token_type_ids": mm_token_type_ids(ids, cfg)} if MAJOR >= 5 else {}


def rope_index(model, ids, image_grid_thw, attention_mask):
    """HF's M-RoPE position ids `[3, b, s]` of a left-padded batch."""
    if MAJOR >= 5:
        pos, _ = model.model.get_rope_index(
            ids, mm_token_type_ids=mm_token_type_ids(ids, model.config),
            image_grid_thw=image_grid_thw, video_grid_thw=None, attention_mask=attention_mask)
    else:
        get = getattr(model, "get_rope_index", None) or model.model.get_rope_index
        pos, _ = get(ids, image_grid_thw=image_grid_thw, video_grid_thw=None,
                     attention_mask=attention_mask)
    return pos
