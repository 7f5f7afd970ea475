"""Where each supported model class keeps what the adapter (lib/kernels/adapter.py) needs, in one table.

Two Hugging Face VLM classes are supported, and the causal LMs they were fine-tuned from (for the text stream):

what the adapter needs          LlavaForConditionalGeneration        Qwen2VLForConditionalGeneration
decoder blocks                  model.model.language_model.layers    the same
image encoder                   model.model.vision_tower             model.model.visual
image embeddings leave          model.model.multi_modal_projector    model.model.visual.merger
pixel input                     pixel_values (b, c, y, x)            pixel_values (patches, c*t*p*p) and
                                                                     image_grid_thw (b, 3)
image tokens per image          (image_size / patch)^2, + CLS under  (y / m) x (x / m) from image_grid_thw, m the
                                the "full" strategy: fixed           spatial_merge_size: each image its own count
positions                       1-D, 0..len-1                        M-RoPE: (3, b, s) temporal/row/column ids, from
                                                                     the model's own get_rope_index

A causal LM (`LlamaForCausalLM`, `Qwen2ForCausalLM`, ...) keeps its blocks at `model.model.layers`. In every class
the attention output projection is `self_attn.o_proj`, whose input is n_heads x d_head wide whatever the number of
key-value heads (grouped-query attention repeats each KV head for its group of query heads before `o_proj`), so
`hook_z` is that input reshaped to (n_heads, d_head) in every class.

Shape key: b sequences, s positions, n image tokens (of all images of a batch, concatenated), d model width,
p patches (of all images), t/y/x the temporal/row/column sizes of an image grid.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

LLAVA, QWEN2_VL = "llava", "qwen2-vl"


class Pixels(NamedTuple):
    """A preprocessed image batch, as the model's forward takes it."""

    values: Tensor  # LLaVA: (b, c, y, x); Qwen2-VL: (p, c * t * patch * patch), the patches of every image in order
    grid_thw_b3: Tensor | None = None  # Qwen2-VL: per image the (t, y, x) patch grid; None for LLaVA

    def to(self, device) -> Pixels:
        return Pixels(self.values.to(device), None if self.grid_thw_b3 is None else self.grid_thw_b3.to(device))


def as_pixels(x) -> Pixels:
    """`VLM.preprocess`'s result as Pixels: a tensor (LLaVA) or a (pixel_values, image_grid_thw) pair (Qwen2-VL)."""
    if isinstance(x, Pixels):
        return x
    if isinstance(x, Tensor):
        return Pixels(x)
    values, grid = x
    return Pixels(values, grid)


def kind(model: nn.Module) -> str:
    """LLAVA or QWEN2_VL, from the modules the model has; any other VLM class is refused with its name."""
    inner = getattr(model, "model", None)
    if hasattr(inner, "multi_modal_projector") and hasattr(inner, "vision_tower"):
        return LLAVA
    if hasattr(inner, "visual") and hasattr(inner.visual, "merger"):
        return QWEN2_VL
    raise TypeError(
        f"{type(model).__name__} is not a supported VLM: expected a LlavaForConditionalGeneration or a "
        "Qwen2VLForConditionalGeneration (lib/kernels/architectures.py)"
    )


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (`.layers`, `.norm`) of a VLM or of a causal LM."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def image_encoder(model: nn.Module) -> nn.Module:
    inner = model.model
    return inner.vision_tower if kind(model) == LLAVA else inner.visual


def projector(model: nn.Module) -> nn.Module:
    """The module whose output is the image embeddings the language model receives (LLaVA: (b, n, d); Qwen2-VL:
    (n, d), every image's tokens concatenated)."""
    inner = model.model
    return inner.multi_modal_projector if kind(model) == LLAVA else inner.visual.merger


def _encoder_param(model: nn.Module) -> Tensor:
    return next(image_encoder(model).parameters())


def image_token_grids(model: nn.Module, pixels: Pixels) -> tuple[list[int], Tensor]:
    """Per image, its number of image tokens and the (rows, columns) grid they cover (a CLS token, which LLaVA's
    "full" strategy puts first, is counted but is not on the grid)."""
    config = model.config
    if kind(model) == LLAVA:
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        n = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
        n_b = pixels.values.shape[0]
        return [n] * n_b, torch.tensor([[side, side]] * n_b)
    assert pixels.grid_thw_b3 is not None, "a Qwen2-VL batch needs image_grid_thw (preprocess returns it)"
    m = config.vision_config.spatial_merge_size
    thw_b3 = pixels.grid_thw_b3.cpu().long()
    assert (thw_b3[:, 0] == 1).all(), f"images have one temporal patch; got image_grid_thw {thw_b3.tolist()}"
    grid_b2 = thw_b3[:, 1:] // m
    return grid_b2.prod(-1).tolist(), grid_b2


def forward_kwargs(model: nn.Module, pixels: Pixels) -> dict:
    """The image inputs of the model's forward, in the image encoder's dtype."""
    values = pixels.values.to(_encoder_param(model).dtype)
    if kind(model) == LLAVA:
        return {"pixel_values": values}
    return {"pixel_values": values, "image_grid_thw": pixels.grid_thw_b3}


def rope_positions(model: nn.Module, input_ids_bs: Tensor, image_mask_bs: Tensor, attention_mask_bs: Tensor, pixels):
    """Qwen2-VL's M-RoPE position ids (3, b, s) from the model's own `get_rope_index` (image tokens get their row and
    column on the merged grid, text continues after the image's largest id); None for a 1-D model."""
    if kind(model) != QWEN2_VL:
        return None
    positions_3bs, _ = model.model.get_rope_index(
        input_ids_bs,
        mm_token_type_ids=image_mask_bs.int(),
        image_grid_thw=pixels.grid_thw_b3,
        attention_mask=attention_mask_bs.long(),
    )
    return positions_3bs


@torch.no_grad()
def image_features(model: nn.Module, pixels: Pixels) -> Tensor:
    """e_nd: every image token the language model receives for these images (encoder -> projector), concatenated
    in order."""
    param = _encoder_param(model)
    pixels = Pixels(pixels.values.to(param.device, param.dtype), pixels.grid_thw_b3)
    if kind(model) == LLAVA:
        out = model.model.get_image_features(pixel_values=pixels.values)
    else:
        out = model.model.get_image_features(
            pixel_values=pixels.values, image_grid_thw=pixels.grid_thw_b3.to(param.device)
        )
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1])
