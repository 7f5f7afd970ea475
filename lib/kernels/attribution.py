"""Attribution of spatial features to attention heads and its validation (METHOD.md, step 4).

Everything here is a plain function over a `lib.kernels.adapter.VLM` and a `lib.kernels.adapter.Batch`, built on the
adapter's hooks (`capture`, `patch_heads`, `replace_image_embeddings`); nothing here touches the model's modules
except through them.

1. The metric of a feature f with unit decoder direction d_f at layer L_f: m_b = sum over post-image text positions
   t of <h_t(L_f), d_f>, h = `blocks.{L_f}.hook_resid_post`.
2. The corrupted run: every image embedding replaced by one mean image-token embedding of other samples.
3. Attribution patching (Nanda; Syed et al. 2023): per head (l < L_f, h) and position t, the first-order estimate
   of the effect of patching the corrupted z in, effect = sum_k (z_corr - z_clean) * dm/dz, with the gradient on
   the clean run (default) or on the corrupted one. The paper's head score is the mean over post-image positions of
   |effect|. One clean forward, one corrupted forward and one backward per feature give every head at once.
4. Exhaustive activation patching (the validation): the same quantities measured by running the model once per
   head (or per head and position) with that head's z replaced by its corrupted-run value.
5. Aggregation over a feature set, the top-k heads, and random heads from the same layers (the control).

The causal checks of the heads and features found here are in `lib.kernels.causal`, the attention read-outs of the
overlays in `lib.kernels.attention`; the figures in `lib.figures.attribution`.

Choices this module makes (the book states them):
- Heads of layer L_f itself are not scored (they write into h(L_f) too): the source scores l < L_f only.
- A "not defined" entry is NaN, never 0: layers l >= L_f, heads or positions an exhaustive run did not patch, and
  aggregated heads with no feature above them.
- Per-sample scores: the mean over that sample's post-image positions; a batch or data set score is the mean over
  samples (so a long question does not weigh more than a short one).
- Aggregation normalises each feature's head scores by their total (each feature has unit mass), see `aggregate`.

Shape key (suffixes of tensor names; the adapter's key plus f and q):
    b  sequences in a batch        s  token positions (padded)      d  residual width (d_model)
    l  layers                      h  attention heads               k  head width (d_head)
    n  image tokens per image      y, x  patch-grid rows, columns   v  vocabulary
    f  features                    q  query positions
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lib.kernels.adapter import (
    VLM,
    Batch,
    HeadPatch,
    capture,
    image_embeddings,
    patch_heads,
    replace_image_embeddings,
    resid_name,
    z_name,
)

Head = tuple[int, int]  # (layer, head)


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulate in float32, or float64 when the model runs in float64 (the tests' exact checks)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# 1-2. Features, the metric, the corrupted run


@dataclass(frozen=True)
class Feature:
    """A feature to attribute: the residual-stream layer its SAE reads and its decoder direction (made unit length
    here, so that metrics of different features are on one scale; SAE decoder rows need not be unit norm)."""

    layer: int
    direction_d: Tensor
    name: str = ""

    def __post_init__(self):
        d = self.direction_d.detach()
        assert d.ndim == 1, f"feature {self.name!r}: direction must be one vector (d,), got shape {tuple(d.shape)}"
        norm = float(d.double().norm())
        assert math.isfinite(norm) and norm > 0, f"feature {self.name!r}: direction has norm {norm}"
        assert self.layer >= 1, f"feature {self.name!r} at layer {self.layer}: no attention head lies below layer 0"
        object.__setattr__(self, "direction_d", d / norm)


def feature_metric(x_bsd: Tensor, direction_d: Tensor, positions_bs: Tensor) -> Tensor:
    """m_b = sum over `positions_bs` of <x_t, d> (differentiable; float32 or float64)."""
    assert x_bsd.shape[:2] == positions_bs.shape, f"residual {tuple(x_bsd.shape)} vs mask {tuple(positions_bs.shape)}"
    dtype = _acc_dtype(x_bsd)
    proj_bs = x_bsd.to(dtype) @ direction_d.to(x_bsd.device, dtype)
    return (proj_bs * positions_bs.to(proj_bs.device)).sum(1)


@torch.no_grad()
def mean_image_embedding(vlm: VLM, images: Sequence[Any], batch_size: int = 16) -> Tensor:
    """mean_d: the mean projected image-token embedding over every image position of `images` (pass images that are
    not in the batches to be corrupted, e.g. a held-out reference set)."""
    assert len(images) > 0, "mean_image_embedding needs at least one reference image"
    total_d, count = None, 0
    for start in range(0, len(images), batch_size):
        chunk = [images[i] for i in range(start, min(start + batch_size, len(images)))]
        e_nd = image_embeddings(vlm, vlm.preprocess(chunk))  # every image's tokens, whatever their count
        part_d = e_nd.double().sum(0)
        total_d = part_d if total_d is None else total_d + part_d
        count += e_nd.shape[0]
    return (total_d / count).to(e_nd.dtype)


def _run(vlm: VLM, batch: Batch, resid_layers, z_layers, *, corrupt_d: Tensor | None, grad: bool):
    ctx = replace_image_embeddings(vlm, corrupt_d) if corrupt_d is not None else nullcontext()
    with ctx:
        return capture(vlm, batch, resid_layers=resid_layers, z_layers=z_layers, grad=grad)


def _check_batch(vlm: VLM, batch: Batch, features: Sequence[Feature]) -> None:
    assert batch.pixels is not None, "attribution needs a VLM batch with images (adapter.prepare)"
    assert batch.post_image_bs.any(1).all(), "every sequence needs at least one post-image text token"
    assert features, "no features given"
    bad = [f.name or f.layer for f in features if f.layer >= vlm.n_layers]
    assert not bad, f"features {bad} lie at layers >= n_layers = {vlm.n_layers}"
    assert all(f.direction_d.shape == (vlm.d_model,) for f in features), f"directions must have d_model = {vlm.d_model}"


# ---------------------------------------------------------------------------------------------------------------
# 3-4. Per-head effects: attribution patching and exhaustive activation patching


class HeadEffects(NamedTuple):
    """One feature's head effects on one batch, from attribution patching or from exhaustive activation patching.

    Effects are signed changes of the metric when the corrupted z is patched into the clean run (for attribution:
    their first-order estimates). Layers >= `feature_layer`, and whatever an exhaustive run did not patch, are NaN.
    """

    feature_layer: int
    total_blh: Tensor  # patching the head at all positions
    effect_bslh: Tensor | None  # patching the head at one position (None: not computed)
    positions_bs: Tensor  # the positions the paper's score averages over (post-image, or those patched)
    m_clean_b: Tensor
    m_corrupt_b: Tensor
    resid_effect_bsl: Tensor | None = None  # hook_resid_post of layers < feature_layer (attribution only)

    @property
    def score_blh(self) -> Tensor:
        """The paper's head score per sample: mean over `positions_bs` of |effect at that position|."""
        assert self.effect_bslh is not None, "per-position effects were not computed (per_position=False)"
        return _mean_abs_over(self.effect_bslh, self.positions_bs)

    @property
    def resid_score_bl(self) -> Tensor:
        assert self.resid_effect_bsl is not None, "residual effects exist for attribution patching only"
        return _mean_abs_over(self.resid_effect_bsl, self.positions_bs)


def _mean_abs_over(effect_bs_: Tensor, positions_bs: Tensor) -> Tensor:
    w_bs = positions_bs.to(effect_bs_.device, effect_bs_.dtype)
    w_bs_ = w_bs.reshape(*w_bs.shape, *([1] * (effect_bs_.ndim - 2)))
    # A position outside the mask may hold NaN (not measured): zero it before weighting, so it cannot leak.
    masked = torch.where(w_bs_ > 0, effect_bs_.abs(), torch.zeros_like(effect_bs_))
    return masked.sum(1) / w_bs.sum(1).reshape(-1, *([1] * (effect_bs_.ndim - 2)))


def _vjp(m_f: Tensor, inputs: list[Tensor], stacked: bool) -> list[list[Tensor]]:
    """d m_f / d inputs for every feature f: one backward each, or one vmapped backward over the stacked unit
    cotangents (`is_grads_batched`: exact, same numbers, more memory)."""
    kw = dict(allow_unused=True, materialize_grads=True)
    if stacked:
        eye_ff = torch.eye(len(m_f), dtype=m_f.dtype, device=m_f.device)
        g = torch.autograd.grad(m_f, inputs, grad_outputs=eye_ff, is_grads_batched=True, **kw)
        return [[gi[f] for gi in g] for f in range(len(m_f))]
    return [list(torch.autograd.grad(m, inputs, retain_graph=True, **kw)) for m in m_f]


# What one attribution pass costs, in forward passes: a clean and a corrupted forward and one backward (counted as
# two), whatever the number of heads. Exhaustive patching costs one forward per head (or per head and position).
ATTRIBUTION_FORWARDS = 4


def ideal_speedups(n_heads: int, n_positions: int) -> dict[str, float]:
    """Speed-up of attribution over exhaustive patching if every pass cost the same: per head, per head and
    position (the bar the chapter and `bench/bench_attribution.py` compare their timings with)."""
    return {
        "per head": n_heads / ATTRIBUTION_FORWARDS,
        "per head and position": n_heads * n_positions / ATTRIBUTION_FORWARDS,
    }


def attribute(
    vlm: VLM,
    batch: Batch,
    features: Sequence[Feature],
    mean_embedding_d: Tensor,
    *,
    gradient_at: Literal["clean", "corrupt"] = "clean",
    stacked: bool = False,
) -> list[HeadEffects]:
    """Attribution patching of each feature's metric to every head (hook_z) and every residual stream
    (hook_resid_post) below its layer, at every position, for one batch.

    Cost: one clean forward, one corrupted forward (only the one at `gradient_at` keeps a graph) and one backward
    per feature, or a single vmapped backward for all features with `stacked=True`. The forward passes stop at the
    deepest feature layer. effect = sum_k (z_corr - z_clean) * dm/dz evaluated at `gradient_at`: with the clean
    gradient it estimates m(clean run, head patched to corrupted) - m(clean); with the corrupted gradient it
    estimates the same difference from the other end (m(corrupt) - m(corrupt run, head restored to clean)).
    """
    assert gradient_at in ("clean", "corrupt"), f"gradient_at must be 'clean' or 'corrupt', got {gradient_at!r}"
    _check_batch(vlm, batch, features)
    top = max(f.layer for f in features)
    z_layers = list(range(top))
    resid_layers = sorted(set(range(top)) | {f.layer for f in features})
    clean = _run(vlm, batch, resid_layers, z_layers, corrupt_d=None, grad=gradient_at == "clean")
    corrupt = _run(vlm, batch, resid_layers, z_layers, corrupt_d=mean_embedding_d, grad=gradient_at == "corrupt")
    at = clean if gradient_at == "clean" else corrupt
    post_bs = batch.post_image_bs

    m_fb = torch.stack([feature_metric(at.resid[resid_name(f.layer)], f.direction_d, post_bs) for f in features])
    inputs = [at.z[z_name(l)] for l in z_layers] + [at.resid[resid_name(l)] for l in z_layers]
    # Samples never interact in a forward pass, so the gradient of the batch sum is every sample's own gradient.
    grads = _vjp(m_fb.sum(1), inputs, stacked)
    dtype = _acc_dtype(m_fb)
    dz = [(corrupt.z[z_name(l)] - clean.z[z_name(l)]).detach().to(dtype) for l in z_layers]
    dx = [(corrupt.resid[resid_name(l)] - clean.resid[resid_name(l)]).detach().to(dtype) for l in z_layers]
    with torch.no_grad():
        m_clean_fb = torch.stack(
            [feature_metric(clean.resid[resid_name(f.layer)], f.direction_d, post_bs) for f in features]
        )
        m_corrupt_fb = torch.stack(
            [feature_metric(corrupt.resid[resid_name(f.layer)], f.direction_d, post_bs) for f in features]
        )

    n_b, n_s = post_bs.shape
    out = []
    for i, f in enumerate(features):
        g_z, g_x = grads[i][: len(z_layers)], grads[i][len(z_layers) :]
        effect_bslh = torch.full((n_b, n_s, vlm.n_layers, vlm.n_heads), torch.nan, dtype=dtype, device=post_bs.device)
        resid_bsl = torch.full((n_b, n_s, vlm.n_layers), torch.nan, dtype=dtype, device=post_bs.device)
        # Padding gets no gradient, but its activations are never read and may be anything in a half-precision
        # model (0 * inf = NaN): zero it by selection, not by multiplication.
        real_bs1 = batch.attention_mask_bs[:, :, None]
        for l in range(f.layer):
            effect_bslh[:, :, l] = torch.where(real_bs1, (dz[l] * g_z[l].to(dtype)).sum(-1), 0.0)
            resid_bsl[:, :, l] = torch.where(real_bs1[..., 0], (dx[l] * g_x[l].to(dtype)).sum(-1), 0.0)
        out.append(
            HeadEffects(
                feature_layer=f.layer,
                total_blh=effect_bslh.sum(1),  # positions before the image have z_corr = z_clean exactly
                effect_bslh=effect_bslh,
                positions_bs=post_bs,
                m_clean_b=m_clean_fb[i].detach(),
                m_corrupt_b=m_corrupt_fb[i].detach(),
                resid_effect_bsl=resid_bsl,
            )
        )
    return out


def _heads_below(vlm: VLM, top: int, heads: Sequence[Head] | None) -> list[Head]:
    if heads is None:
        return [(l, h) for l in range(top) for h in range(vlm.n_heads)]
    bad = [x for x in heads if not (0 <= x[0] < top and 0 <= x[1] < vlm.n_heads)]
    assert not bad, f"heads {bad} are not below the deepest feature layer {top} (or not in the model)"
    return [(int(l), int(h)) for l, h in heads]


@torch.no_grad()
def activation_patching(
    vlm: VLM,
    batch: Batch,
    features: Sequence[Feature],
    mean_embedding_d: Tensor,
    *,
    heads: Sequence[Head] | None = None,
    per_position: bool = False,
    positions_bs: Tensor | None = None,
) -> list[HeadEffects]:
    """Exhaustive activation patching: for each head (default: every head below the deepest feature layer), the
    clean run with that head's z replaced by its corrupted-run z, and the metric change m_patched - m_clean of every
    feature (one forward per head serves all features; a feature ignores heads at or above its own layer).

    With `per_position`, also one forward per (head, position) for the positions in `positions_bs` (default: the
    post-image positions, the ones the paper's score averages over; positions of the image span are not patched
    one by one, which would multiply the count by ~n_image_tokens). A position index is patched in all sequences of
    the batch at once (sequences never interact), so the count is heads x distinct position indices.
    """
    _check_batch(vlm, batch, features)
    top = max(f.layer for f in features)
    resid_layers = sorted({f.layer for f in features})
    todo = _heads_below(vlm, top, heads)
    z_layers = sorted({l for l, _ in todo})
    clean = _run(vlm, batch, resid_layers, z_layers, corrupt_d=None, grad=False)
    corrupt = _run(vlm, batch, resid_layers, z_layers, corrupt_d=mean_embedding_d, grad=False)
    post_bs = batch.post_image_bs

    def metrics(run) -> Tensor:
        return torch.stack([feature_metric(run.resid[resid_name(f.layer)], f.direction_d, post_bs) for f in features])

    m_clean_fb, m_corrupt_fb = metrics(clean), metrics(corrupt)
    dtype = m_clean_fb.dtype
    n_b, n_s = post_bs.shape
    total_fblh = torch.full((len(features), n_b, vlm.n_layers, vlm.n_heads), torch.nan, dtype=dtype)
    where_bs = post_bs if positions_bs is None else positions_bs.to(post_bs.device) & batch.attention_mask_bs
    columns = where_bs.any(0).nonzero().flatten().tolist() if per_position else []
    if per_position:
        effect_fbslh = torch.full((len(features), n_b, n_s, vlm.n_layers, vlm.n_heads), torch.nan, dtype=dtype)

    for l, h in todo:
        z_corr_bsk = corrupt.z[z_name(l)][:, :, h]
        with patch_heads(vlm, [HeadPatch(l, h, z_corr_bsk)]):
            total_fblh[:, :, l, h] = (metrics(capture(vlm, batch, resid_layers=resid_layers)) - m_clean_fb).cpu()
        for t in columns:
            one_bs = torch.zeros_like(where_bs)
            one_bs[:, t] = where_bs[:, t]
            with patch_heads(vlm, [HeadPatch(l, h, z_corr_bsk, positions_bs=one_bs)]):
                delta_fb = metrics(capture(vlm, batch, resid_layers=resid_layers)) - m_clean_fb
            rows = where_bs[:, t].cpu()
            effect_fbslh[:, rows, t, l, h] = delta_fb[:, rows.to(delta_fb.device)].cpu()

    out = []
    for i, f in enumerate(features):
        total_blh = total_fblh[i].clone()
        total_blh[:, f.layer :] = torch.nan  # a head at or above the feature's layer is not scored
        effect = None
        if per_position:
            effect = effect_fbslh[i].clone()
            effect[:, :, f.layer :] = torch.nan
        out.append(
            HeadEffects(
                feature_layer=f.layer,
                total_blh=total_blh.to(post_bs.device),
                effect_bslh=None if effect is None else effect.to(post_bs.device),
                positions_bs=where_bs,
                m_clean_b=m_clean_fb[i],
                m_corrupt_b=m_corrupt_fb[i],
            )
        )
    return out


class AttributionScores(NamedTuple):
    """Head and residual scores of features over a data set (means over samples; NaN at layers >= the feature's)."""

    score_flh: Tensor
    resid_score_fl: Tensor
    feature_layers_f: Tensor
    n_samples: int


def attribution_scores(
    vlm: VLM,
    batches: Iterable[Batch],
    features: Sequence[Feature],
    mean_embedding_d: Tensor,
    *,
    gradient_at: Literal["clean", "corrupt"] = "clean",
    stacked: bool = False,
) -> AttributionScores:
    """`attribute` over many batches, keeping only the per-feature scores (the per-position effects of one batch
    are dropped as soon as they are reduced)."""
    head_sum = resid_sum = None
    n = 0
    for batch in batches:
        effects = attribute(vlm, batch, features, mean_embedding_d, gradient_at=gradient_at, stacked=stacked)
        head_flh = torch.stack([e.score_blh.sum(0) for e in effects]).cpu().double()
        resid_fl = torch.stack([e.resid_score_bl.sum(0) for e in effects]).cpu().double()
        head_sum = head_flh if head_sum is None else head_sum + head_flh
        resid_sum = resid_fl if resid_sum is None else resid_sum + resid_fl
        n += batch.input_ids_bs.shape[0]
    assert n > 0, "attribution_scores got no batches"
    layers_f = torch.tensor([f.layer for f in features])
    return AttributionScores(head_sum / n, resid_sum / n, layers_f, n)


# ---------------------------------------------------------------------------------------------------------------
# 5. Aggregation over a feature set


class Aggregate(NamedTuple):
    score_lh: Tensor  # NaN where no feature lies above the layer
    layer_profile_l: Tensor  # sum over the heads of each layer
    n_features_above_l: Tensor


def aggregate(
    score_flh: Tensor, feature_layers_f: Sequence[int] | Tensor, normalise: Literal["total", "max"] = "total"
) -> Aggregate:
    """The source's aggregation: normalise each feature's head scores (over the heads below its layer) by their
    total (default: every feature carries unit mass, so a feature with large raw effects does not dominate) or by
    their maximum; sum over features; divide each head by the number of features whose layer is above the head's
    layer (so shallow layers, which lie below every feature, are not favoured for that alone)."""
    assert normalise in ("total", "max"), f"normalise must be 'total' or 'max', got {normalise!r}"
    score_flh = torch.as_tensor(score_flh).double()
    layers_f = torch.as_tensor(feature_layers_f).long()
    n_f, n_l, _ = score_flh.shape
    assert layers_f.shape == (n_f,), f"{n_f} score rows but {tuple(layers_f.shape)} feature layers"
    assert ((layers_f >= 1) & (layers_f <= n_l)).all(), f"feature layers must lie in 1..{n_l}"
    below_fl = torch.arange(n_l)[None, :] < layers_f[:, None]
    s_flh = torch.where(below_fl[..., None], score_flh, 0.0)
    assert torch.isfinite(s_flh).all() and (s_flh >= 0).all(), "scores below a feature's layer must be finite, >= 0"
    norm_f = s_flh.sum((1, 2)) if normalise == "total" else s_flh.amax((1, 2))
    s_flh = s_flh / torch.where(norm_f > 0, norm_f, 1.0)[:, None, None]  # an all-zero feature contributes nothing
    count_l = below_fl.sum(0)
    score_lh = s_flh.sum(0) / count_l[:, None]  # 0 / 0 = NaN: no feature above this layer
    return Aggregate(score_lh, score_lh.sum(1), count_l)


def top_heads(score_lh: Tensor, k: int) -> list[Head]:
    """The k heads with the highest score, best first (NaN heads never selected)."""
    flat = torch.nan_to_num(torch.as_tensor(score_lh).double(), nan=-math.inf).flatten()
    n_valid = int(torch.isfinite(flat).sum())
    assert 0 < k <= n_valid, f"asked for the top {k} heads of {n_valid} scored heads"
    n_heads = score_lh.shape[1]
    return [divmod(int(i), n_heads) for i in flat.argsort(descending=True, stable=True)[:k]]


def random_heads_like(heads: Sequence[Head], n_heads: int, seed: int) -> list[Head]:
    """As many random heads per layer as `heads` has in that layer, drawn from the other heads of the same layer
    (the control keeps the layer distribution of the top heads and never overlaps them)."""
    rng = np.random.default_rng(seed)
    chosen = set(map(tuple, heads))
    out = []
    for layer in sorted({l for l, _ in chosen}):
        want = sum(1 for l, _ in chosen if l == layer)
        pool = [h for h in range(n_heads) if (layer, h) not in chosen]
        assert len(pool) >= want, f"layer {layer}: {want} top heads leave only {len(pool)} other heads to draw"
        out += [(layer, int(h)) for h in rng.choice(pool, size=want, replace=False)]
    return out
