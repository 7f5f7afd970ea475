"""Attribution of spatial features to attention heads, its validation, and the causal checks (METHOD.md, step 4).

Everything here is a plain function over a `lib.adapter.VLM` and a `lib.adapter.Batch`, built on the adapter's hooks
(`capture`, `patch_heads`, `project_out`, `replace_image_embeddings`); nothing here touches the model's modules
except through them, apart from the attention-pattern read-out (`attention_patterns`), which recomputes q and k from the
attention module's own inputs and checks itself against the adapter's hook_z.

1. The metric of a feature f with unit decoder direction d_f at layer L_f: m_b = sum over post-image text positions
   t of <h_t(L_f), d_f>, h = `blocks.{L_f}.hook_resid_post`.
2. The corrupted run: every image embedding replaced by one mean image-token embedding of other samples.
3. Attribution patching (Nanda; Syed et al. 2023): per head (l < L_f, h) and position t, the first-order estimate
   of the effect of patching the corrupted z in, effect = sum_k (z_corr - z_clean) * dm/dz, with the gradient on
   the clean run (default) or on the corrupted one. The paper's head score is the mean over post-image positions of
   |effect|. One clean forward, one corrupted forward and one backward per feature give every head at once.
4. Exhaustive activation patching (the validation): the same quantities measured by running the model once per
   head (or per head and position) with that head's z replaced by its corrupted-run value.
5. Aggregation over a feature set, top-k heads; causal checks on a yes/no statement benchmark (head ablation, random
   heads, feature projection, a non-spatial multiple-choice control) and the attention-overlay data.

Choices this module makes (the book states them):
- Heads of layer L_f itself are not scored (they write into h(L_f) too): the source scores l < L_f only.
- A "not defined" entry is NaN, never 0: layers l >= L_f, heads or positions an exhaustive run did not patch, and
  aggregated heads with no feature above them.
- Per-sample scores: the mean over that sample's post-image positions; a batch or data set score is the mean over
  samples (so a long question does not weigh more than a short one).
- Aggregation normalises each feature's head scores by their total (each feature has unit mass), see `aggregate`.
- Ablations act at every position; mean ablation uses the head's mean z over the real non-BOS tokens (image and
  text alike) of a reference set. Feature projection acts at post-image positions only (the positions the metric
  reads, the answer position included).

Shape key (suffixes of tensor names; the adapter's key plus f and q):
    b  sequences in a batch        s  token positions (padded)      d  residual width (d_model)
    l  layers                      h  attention heads               k  head width (d_head)
    n  image tokens per image      y, x  patch-grid rows, columns   v  vocabulary
    f  features                    q  query positions
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lib.kernels.adapter import (
    VLM,
    Batch,
    HeadPatch,
    capture,
    decoder,
    image_embeddings,
    iter_batches,
    next_token_logits,
    patch_heads,
    project_out,
    replace_image_embeddings,
    resid_name,
    z_name,
)

Head = tuple[int, int]  # (layer, head)
Intervention = Callable[[Batch], AbstractContextManager]  # a context manager to run one batch under


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
        e_bnd = image_embeddings(vlm, vlm.preprocess(chunk))
        part_d = e_bnd.double().sum((0, 1))
        total_d = part_d if total_d is None else total_d + part_d
        count += e_bnd.shape[0] * e_bnd.shape[1]
    return (total_d / count).to(e_bnd.dtype)


def _run(vlm: VLM, batch: Batch, resid_layers, z_layers, *, corrupt_d: Tensor | None, grad: bool):
    ctx = replace_image_embeddings(vlm, corrupt_d) if corrupt_d is not None else nullcontext()
    with ctx:
        return capture(vlm, batch, resid_layers=resid_layers, z_layers=z_layers, grad=grad)


def _check_batch(vlm: VLM, batch: Batch, features: Sequence[Feature]) -> None:
    assert batch.pixel_values_bcyx is not None, "attribution needs a VLM batch with images (adapter.prepare)"
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


# ---------------------------------------------------------------------------------------------------------------
# 6. Causal checks


@torch.no_grad()
def mean_z(vlm: VLM, batches: Iterable[Batch], layers: Sequence[int] | None = None) -> Tensor:
    """z_mean_lhk: each head's mean hook_z over the real non-BOS tokens of `batches` (mean ablation's value).
    Layers not asked for are NaN."""
    layers = list(range(vlm.n_layers)) if layers is None else [int(x) for x in layers]
    total = torch.zeros(vlm.n_layers, vlm.n_heads, vlm.d_head, dtype=torch.float64)
    n = 0
    for batch in batches:
        z = capture(vlm, batch, z_layers=layers).z
        keep_bs = batch.keep_bs
        for l in layers:
            total[l] += z[z_name(l)][keep_bs].double().sum(0).cpu()
        n += int(keep_bs.sum())
    assert n > 0, "mean_z got no tokens"
    out = total / n
    out[[l for l in range(vlm.n_layers) if l not in layers]] = torch.nan
    return out


def ablate_heads(vlm: VLM, heads: Sequence[Head], z_mean_lhk: Tensor | None = None) -> Intervention:
    """Mean ablation of `heads` at every position (`z_mean_lhk` from `mean_z`), or zero ablation when it is None."""
    patches = []
    for l, h in heads:
        if z_mean_lhk is None:
            value = torch.zeros(vlm.d_head)
        else:
            value = z_mean_lhk[l, h]
            assert torch.isfinite(value).all(), f"no mean z for L{l}H{h}: compute mean_z over its layer"
        patches.append(HeadPatch(int(l), int(h), value))
    return lambda _batch: patch_heads(vlm, patches)


def project_feature(vlm: VLM, feature: Feature, where: Literal["post_image", "all"] = "post_image") -> Intervention:
    """The feature's direction projected out of `blocks.{layer}.hook_resid_post` at the post-image positions
    (default) or at every position."""
    assert where in ("post_image", "all"), f"where must be 'post_image' or 'all', got {where!r}"
    return lambda batch: project_out(
        vlm, feature.layer, feature.direction_d, positions_bs=batch.post_image_bs if where == "post_image" else None
    )


class Statement(NamedTuple):
    """One true/false item: the model should answer yes iff `label`."""

    image: Any
    question: str
    label: bool
    relation: str = ""


class Choice(NamedTuple):
    """One multiple-choice item of the control task: `answer` is one of the candidate words."""

    image: Any
    question: str
    answer: str
    group: str = ""


def single_token_id(tokenizer, text: str) -> int:
    """The id of `text` if the tokenizer makes exactly one token of it (answer words must be single tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"answer word {text!r} is {len(ids)} tokens {ids} for this tokenizer; expected exactly one")
    return int(ids[0])


def _logits(vlm: VLM, images, questions, batch_size: int, intervention: Intervention | None) -> Tensor:
    out = []
    for batch in iter_batches(vlm, images, questions, batch_size):
        with intervention(batch) if intervention is not None else nullcontext():
            out.append(next_token_logits(vlm, batch).double().cpu())
    return torch.cat(out)


def yes_no_eval(
    vlm: VLM,
    statements: Sequence[Statement],
    yes_id: int,
    no_id: int,
    *,
    batch_size: int = 16,
    intervention: Intervention | None = None,
) -> pd.DataFrame:
    """Per item: P(yes) normalised over {yes, no} at the answer position, the answer (yes iff P(yes) > P(no)),
    whether it is correct and P(correct)."""
    assert statements, "no statements given"
    logits_bv = _logits(vlm, [s.image for s in statements], [s.question for s in statements], batch_size, intervention)
    p_yes = torch.softmax(logits_bv[:, [yes_id, no_id]], -1)[:, 0].numpy()
    label = np.array([bool(s.label) for s in statements])
    pred = p_yes > 0.5
    return pd.DataFrame(
        {
            "relation": [s.relation for s in statements],
            "label": label,
            "p_yes": p_yes,
            "answer_yes": pred,
            "correct": pred == label,
            "p_correct": np.where(label, p_yes, 1 - p_yes),
        }
    )


def choice_eval(
    vlm: VLM,
    choices: Sequence[Choice],
    candidate_ids: Mapping[str, int],
    *,
    batch_size: int = 16,
    intervention: Intervention | None = None,
) -> pd.DataFrame:
    """Per item of the control task: the candidate with the highest next-token logit, whether it is the answer, and
    P(answer) normalised over the candidates."""
    assert choices, "no control items given"
    words = list(candidate_ids)
    missing = sorted({c.answer for c in choices} - set(words))
    assert not missing, f"answers {missing} are not among the candidate words {words}"
    logits_bv = _logits(vlm, [c.image for c in choices], [c.question for c in choices], batch_size, intervention)
    p_bc = torch.softmax(logits_bv[:, [candidate_ids[w] for w in words]], -1).numpy()
    answer = np.array([words.index(c.answer) for c in choices])
    pred = p_bc.argmax(1)
    return pd.DataFrame(
        {
            "relation": [c.group for c in choices],
            "answer": [c.answer for c in choices],
            "predicted": [words[i] for i in pred],
            "correct": pred == answer,
            "p_correct": p_bc[np.arange(len(choices)), answer],
        }
    )


def summarise(per_item: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and mean P(correct) per relation (or control group), plus an 'all' row."""
    groups = per_item.groupby("relation", sort=True)[["correct", "p_correct"]].agg(["count", "mean"])
    table = pd.DataFrame(
        {
            "n": groups[("correct", "count")],
            "accuracy": groups[("correct", "mean")],
            "mean_p_correct": groups[("p_correct", "mean")],
        }
    )
    table.loc["all"] = [len(per_item), per_item["correct"].mean(), per_item["p_correct"].mean()]
    table["n"] = table["n"].astype(int)
    return table.rename_axis("relation").reset_index()


def causal_checks(
    vlm: VLM,
    statements: Sequence[Statement],
    *,
    yes_id: int,
    no_id: int,
    heads: Sequence[Head],
    z_mean_lhk: Tensor,
    features: Sequence[Feature] = (),
    random_features: Sequence[Feature] = (),
    controls: Sequence[Choice] = (),
    candidate_ids: Mapping[str, int] | None = None,
    n_random: int = 3,
    seed: int = 0,
    batch_size: int = 16,
    feature_positions: Literal["post_image", "all"] = "post_image",
) -> pd.DataFrame:
    """The ablation table: accuracy and mean P(correct) per relation on the statement benchmark (and per group on
    the control task) for each condition:

    clean; `heads` mean- and zero-ablated; `n_random` draws of random heads from the same layers (seeds seed..,
    both ablations); each of `features` and of `random_features` projected out of the residual stream at its layer.

    One row per (condition, ablation, seed, task, relation). Seed is -1 where no randomness is involved.
    """
    assert not controls or candidate_ids is not None, "control items need candidate_ids (word -> token id)"
    conditions: list[tuple[str, str, int, Intervention | None]] = [("clean", "", -1, None)]
    for name, z in (("mean", z_mean_lhk), ("zero", None)):
        conditions.append(("top heads", name, -1, ablate_heads(vlm, heads, z)))
        for r in range(n_random):
            conditions.append(
                ("random heads", name, seed + r, ablate_heads(vlm, random_heads_like(heads, vlm.n_heads, seed + r), z))
            )
    for kind, group in (("feature", features), ("random feature", random_features)):
        for i, f in enumerate(group):
            conditions.append(
                (
                    f"{kind} {f.name or i}",
                    f"project {feature_positions}",
                    -1,
                    project_feature(vlm, f, feature_positions),
                )
            )
    rows = []
    for condition, ablation, s, intervention in conditions:
        tasks = [
            ("statement", yes_no_eval(vlm, statements, yes_id, no_id, batch_size=batch_size, intervention=intervention))
        ]
        if controls:
            tasks.append(
                ("control", choice_eval(vlm, controls, candidate_ids, batch_size=batch_size, intervention=intervention))
            )
        for task, per_item in tasks:
            table = summarise(per_item)
            table.insert(0, "task", task)
            table.insert(0, "seed", s)
            table.insert(0, "ablation", ablation)
            table.insert(0, "condition", condition)
            rows.append(table)
    return pd.concat(rows, ignore_index=True)


def statements_from_samples(samples) -> list[Statement]:
    """lib.world samples with a yes/no relation question as benchmark items (label: the answer is yes)."""
    bad = [s.index for s in samples if s.answer not in ("yes", "no") or not s.relation]
    assert not bad, f"samples {bad[:5]} are not yes/no relation questions"
    return [Statement(s.scene.render(), s.question, s.answer == "yes", s.relation) for s in samples]


def choices_from_samples(samples) -> list[Choice]:
    """lib.world samples as control items, grouped by question type (e.g. colour questions)."""
    return [Choice(s.scene.render(), s.question, s.answer, s.qtype) for s in samples]


# ---------------------------------------------------------------------------------------------------------------
# 7. Attention overlays


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
    heads: list[Head]
    to_image_bhn: Tensor  # mean over the query positions of the attention to each image token
    grid_bhyx: Tensor  # the same on the patch grid (a CLS token, if the model keeps one, dropped)
    image_mass_bh: Tensor  # total attention on the image tokens (of 1 over all keys)


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
    n = vlm.n_image_tokens
    img_idx_bn = torch.stack([row.nonzero().flatten() for row in batch.image_mask_bs])
    assert img_idx_bn.shape[1] == n, f"expected {n} image tokens per sequence, found {img_idx_bn.shape[1]}"
    w_bq = query_bs.to(next(iter(patterns.values())).dtype)
    to_image = []
    for head in heads:
        mean_bs = (patterns[tuple(head)] * w_bq[:, :, None]).sum(1) / w_bq.sum(1, keepdim=True)
        to_image.append(mean_bs.gather(1, img_idx_bn))
    to_image_bhn = torch.stack(to_image, 1)
    side = math.isqrt(n)
    grid_bhn = to_image_bhn[..., 1:] if side * side != n else to_image_bhn  # LLaVA's "full": CLS first
    side = math.isqrt(grid_bhn.shape[-1])
    assert side * side == grid_bhn.shape[-1], f"{n} image tokens do not form a square patch grid"
    return ImageAttention(
        [tuple(h) for h in heads], to_image_bhn, grid_bhn.unflatten(-1, (side, side)), to_image_bhn.sum(-1)
    )


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
    return (grid_bhn * mask_bn[:, None]).sum(-1)


def scene_patches(scene, shapes: Sequence[str], grid_side: int) -> list[int]:
    """Patch indices covered by the named objects of a lib.world scene, on a grid_side x grid_side patch grid."""
    assert scene.size_px % grid_side == 0, f"a {scene.size_px} px image does not split into {grid_side} patches"
    patch_px = scene.size_px // grid_side
    return sorted({p for s in shapes for p in scene.by_shape(s).patches(scene.cell_px, patch_px)})


# ---------------------------------------------------------------------------------------------------------------
# Convenience: several interventions at once


def combine(*interventions: Intervention) -> Intervention:
    """One intervention that runs all of `interventions` (they compose: each installs its own hooks)."""

    @contextmanager
    def run(batch: Batch):
        with ExitStack() as stack:
            for make in interventions:
                stack.enter_context(make(batch))
            yield

    return run
