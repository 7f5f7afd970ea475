"""Attention read-outs for the overlays of the attribution chapter (METHOD.md, step 4).

`attention_patterns`: the softmax attention weights of chosen heads. HF's fast attention kernels never materialise
them, so they are recomputed from the attention module's own inputs and checked against the adapter's hook_z of the
same forward pass (this is the one place that reads the model's modules other than through the adapter's hooks).
`image_attention`: their mean from the query positions (default: post-image; `last_token_bs`: the answer position)
to the image tokens, also on the patch grid. `attention_mass`: the attention on given patches, e.g. those of a
scene's named objects (`scene_patches`).

Shape key (the adapter's key plus q): b sequences in a batch, s (key) token positions, q query positions,
k head width (d_head), h heads (of the list asked for), n image tokens per image, y, x patch-grid rows, columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lib.kernels.adapter import VLM, Batch, capture, decoder, z_name
from lib.kernels.attribution import Head, _acc_dtype


@torch.no_grad()
def attention_patterns(vlm: VLM, batch: Batch, heads: Sequence[Head]) -> dict[Head, Tensor]:
    """pattern_bqs of each head: the softmax attention weights from every query position to every key position.

    HF's fast attention kernels never materialise the weights, so they are recomputed from the attention module's
    own inputs (q and k projections, HF's rotary embedding, grouped queries, the causal and padding mask, softmax in
    float32 as the eager kernel does); then pattern @ v is checked against the adapter's hook_z of the same forward
    pass, so a model whose attention this recomputation does not describe fails loudly instead of drawing wrong
    overlays. Padding query rows are zero."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads = [(int(l), int(h)) for l, h in heads]
    assert heads, "no heads given"
    layers = sorted({l for l, _ in heads})
    assert 0 <= layers[0] and layers[-1] < vlm.n_layers, f"heads {heads} outside the model's {vlm.n_layers} layers"
    n_heads, d_head = vlm.n_heads, vlm.d_head
    n_kv = vlm.text_config.num_key_value_heads
    real_bs = batch.attention_mask_bs
    n_s = real_bs.shape[1]
    allowed_bqs = torch.ones(n_s, n_s, dtype=torch.bool, device=real_bs.device).tril()[None] & real_bs[:, None, :]
    patterns: dict[Head, Tensor] = {}
    values: dict[Head, Tensor] = {}

    def hook(layer: int):
        def pre_hook(module, args, kwargs):
            x_bsd = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            shape = (*x_bsd.shape[:-1], -1, d_head)
            q = module.q_proj(x_bsd).view(shape).transpose(1, 2)
            k = module.k_proj(x_bsd).view(shape).transpose(1, 2)
            v = module.v_proj(x_bsd).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            for l, h in heads:
                if l != layer:
                    continue
                kv = h // (n_heads // n_kv)  # HF's repeat_kv: each kv head serves consecutive query heads
                dtype = _acc_dtype(q)
                scores_bqs = (q[:, h].to(dtype) @ k[:, kv].to(dtype).transpose(-1, -2)) * module.scaling
                scores_bqs = scores_bqs.masked_fill(~allowed_bqs, -math.inf)
                pattern = scores_bqs.softmax(-1).nan_to_num(0.0)  # a padding row of all -inf gives NaN
                patterns[(l, h)] = pattern * real_bs[:, :, None]
                values[(l, h)] = v[:, kv]

        return pre_hook

    layers_mod = decoder(vlm.model).layers
    handles = [layers_mod[l].self_attn.register_forward_pre_hook(hook(l), with_kwargs=True) for l in layers]
    try:
        z = capture(vlm, batch, z_layers=layers).z
    finally:
        for handle in handles:
            handle.remove()
    for (l, h), pattern in patterns.items():
        z_bsk = z[z_name(l)][:, :, h]
        rebuilt_bsk = pattern @ values[(l, h)].to(pattern.dtype)
        err = (rebuilt_bsk - z_bsk.to(pattern.dtype))[real_bs].abs().max().item()
        scale = z_bsk[real_bs].abs().max().item() + 1e-6
        tol = 1e-6 if pattern.dtype == torch.float64 else 2e-2 if z_bsk.dtype != torch.float32 else 1e-4
        assert err <= tol * scale, (
            f"L{l}H{h}: the recomputed attention pattern does not reproduce hook_z (max error {err:.3g}, scale "
            f"{scale:.3g}); this model's attention is not the HF Llama attention this function recomputes"
        )
    return patterns


class ImageAttention(NamedTuple):
    """Attention from the query positions to each sequence's image tokens. Images whose token count is below the
    batch's largest (Qwen2-VL: each image its own count) are padded with NaN: sequence b's own grid is
    `grid_bhyx[b, :, :rows, :cols]` with (rows, cols) = `grid_b2[b]`."""

    heads: list[Head]
    to_image_bhn: Tensor  # mean over the query positions of the attention to each image token (NaN past the image's)
    grid_bhyx: Tensor  # the same on the patch grid (a CLS token, if the model keeps one, dropped)
    image_mass_bh: Tensor  # total attention on the image tokens (of 1 over all keys)
    grid_b2: Tensor  # rows, columns of each sequence's grid


def last_token_bs(batch: Batch) -> Tensor:
    """The answer position: each sequence's last real token (its next-token logits give the answer)."""
    out = torch.zeros_like(batch.attention_mask_bs)
    out[torch.arange(out.shape[0]), batch.lengths_b.to(out.device) - 1] = True
    return out


def image_attention(vlm: VLM, batch: Batch, heads: Sequence[Head], query_bs: Tensor | None = None) -> ImageAttention:
    """Attention of `heads` from the query positions (default: post-image positions; `last_token_bs(batch)` for the
    answer position) to the image tokens, averaged over the query positions, and reshaped to the patch grid."""
    query_bs = batch.post_image_bs if query_bs is None else query_bs.to(batch.post_image_bs.device)
    assert (query_bs & ~batch.attention_mask_bs).sum() == 0, "query positions must be real tokens"
    assert query_bs.any(1).all(), "every sequence needs at least one query position"
    patterns = attention_patterns(vlm, batch, heads)
    w_bq = query_bs.to(next(iter(patterns.values())).dtype)
    mean_bhs = torch.stack(
        [(patterns[tuple(head)] * w_bq[:, :, None]).sum(1) / w_bq.sum(1, keepdim=True) for head in heads], 1
    )
    grid_b2 = batch.image_grid_b2.cpu()
    n_b = batch.image_mask_bs.sum(1).cpu()
    n_y, n_x = (int(v) for v in grid_b2.amax(0))
    to_image_bhn = mean_bhs.new_full((*mean_bhs.shape[:2], int(n_b.max())), math.nan)
    grid_bhyx = mean_bhs.new_full((*mean_bhs.shape[:2], n_y, n_x), math.nan)
    for b, mask_s in enumerate(batch.image_mask_bs):
        to_image_hn = mean_bhs[b][:, mask_s.nonzero().flatten()]
        rows, cols = (int(v) for v in grid_b2[b])
        cls = int(n_b[b]) - rows * cols  # LLaVA's "full" strategy: CLS first, not on the grid
        assert cls in (0, 1), f"sequence {b}: {int(n_b[b])} image tokens for a {rows} x {cols} grid"
        to_image_bhn[b, :, : to_image_hn.shape[1]] = to_image_hn
        grid_bhyx[b, :, :rows, :cols] = to_image_hn[:, cls:].unflatten(-1, (rows, cols))
    return ImageAttention([tuple(h) for h in heads], to_image_bhn, grid_bhyx, to_image_bhn.nansum(-1), grid_b2)


def attention_mass(att: ImageAttention, patches_b: Sequence[Sequence[int]]) -> Tensor:
    """mass_bh: attention on the given patch indices of each sequence (raster order on the patch grid, as
    `lib.world.Obj.patches`). Divide by `att.image_mass_bh` for the share of the attention on the image."""
    grid_bhn = att.grid_bhyx.flatten(-2)
    assert len(patches_b) == grid_bhn.shape[0], f"{len(patches_b)} patch sets for {grid_bhn.shape[0]} sequences"
    mask_bn = torch.zeros(grid_bhn.shape[0], grid_bhn.shape[-1], dtype=grid_bhn.dtype, device=grid_bhn.device)
    for i, patches in enumerate(patches_b):
        idx = sorted(set(int(p) for p in patches))
        assert all(0 <= p < grid_bhn.shape[-1] for p in idx), f"sequence {i}: patch index outside the grid"
        mask_bn[i, idx] = 1.0
    return (grid_bhn.nan_to_num(0.0) * mask_bn[:, None]).sum(-1)  # NaN: outside a smaller image's grid


def scene_patches(scene, shapes: Sequence[str], grid_side: int) -> list[int]:
    """Patch indices covered by the named objects of a lib.world scene, on a grid_side x grid_side patch grid."""
    assert scene.size_px % grid_side == 0, f"a {scene.size_px} px image does not split into {grid_side} patches"
    patch_px = scene.size_px // grid_side
    return sorted({p for s in shapes for p in scene.by_shape(s).patches(scene.cell_px, patch_px)})
