"""The referee of the head attribution (issue 17, item 6): what each attention head of the organism does to its
answers, measured head by head against ground truth, and the statistics that place the attribution's heads in it.

1. `uniform_null`, `null_corrected`: the paper's aggregation (`lib.kernels.attribution.aggregate`) gives a feature's
   unit mass to the heads below it and divides each head by the features above its layer, so a feature that spreads
   its mass uniformly gives 1 / (L_f x n_heads) to each head: shallow heads, below every feature, score more for
   that alone. The null is that spread; a head's corrected score is its aggregate over the null.
2. `encode_items`, `evaluate`: teacher-forced answers of world samples (the organism's scoring,
   `lib.sources.organism._correct`: every answer token argmax-correct) and P(correct) of the first answer token,
   under any set of head patches.
3. `matched_means`, `ablation_patches`: mean ablation with position-matched means (below), BOS never patched.
4. `head_sweep`: every head ablated alone, per question type; `head_costs` and `place` read it.
5. `head_sets`, `set_costs`: the random control as a distribution over head sets of the eligible layers.

The counterfactual corruption, sufficiency and the within-feature Spearman are lib/kernels/head_checks.py; steering
is lib/kernels/steering.py.

Choices this module makes (the book states them):
- Null correction is a ratio, not a z-score: under the null the aggregate of a head is one number (no spread to
  divide by without inventing a distribution of features' spreads); the ratio reads "this many times the share a
  uniform spread would give", 1 meaning no preference, on one scale at every layer.
- Mean ablation replaces a head's hook_z at every position but BOS by its mean over held-out samples *of the same
  template* (question type and token count, so each position holds the same token role) *at the same position*.
  The all-position mean (`lib.kernels.causal.mean_z`) puts at the answer position a vector the head never writes
  there, an off-distribution input that costs every question type alike; the matched mean removes only what varies
  between scenes and questions of one template. A template missing from the held-out set falls back to the
  all-position mean (counted in `MatchedMeans.n_fallback`). BOS attends only to itself, so its z is one constant.
- Costs are in points of accuracy (or P(correct)) pooled over the items of a family group: spatial = the absolute
  and relational families, control = lookup (colour, shape, exist, count).

Shape key: b items in a batch, s positions (padded), n image tokens, d model width, l layers, h heads, k head width,
v vocabulary, g templates (position-matching keys), i items of a data set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import combinations
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lib.kernels.adapter import HeadPatch, patch_heads
from lib.kernels.attribution import Head, aggregate
from lib.sources import organism as O
from lib.sources import world as W

SPATIAL = "spatial"  # the absolute and relational families
CONTROL = "control"  # the lookup family
GROUP_OF_FAMILY = {**{f: SPATIAL for f in W.SPATIAL_FAMILIES}, "lookup": CONTROL}

# ---------------------------------------------------------------------------------------------------------------
# 1. The uniform-spread null of the paper's aggregation


def uniform_null(feature_layers: Sequence[int] | Tensor, n_layers: int, n_heads: int) -> Tensor:
    """null_lh: the aggregate every head would get if each feature spread its mass uniformly over the heads below
    its layer (NaN at layers with no feature above). Computed by the aggregation itself, so it is its null exactly;
    in closed form null[l] = mean over features with L_f > l of 1 / (L_f x n_heads)."""
    layers_f = torch.as_tensor(feature_layers).long()
    ones_flh = torch.ones(len(layers_f), n_layers, n_heads, dtype=torch.float64)
    return aggregate(ones_flh, layers_f).score_lh


def null_corrected(score_lh: Tensor, feature_layers: Sequence[int] | Tensor) -> Tensor:
    """The aggregate over its uniform-spread null (module docstring: why a ratio). 1 = no preference."""
    score_lh = torch.as_tensor(score_lh).double()
    return score_lh / uniform_null(feature_layers, *score_lh.shape)


# ---------------------------------------------------------------------------------------------------------------
# 2. Teacher-forced items and their evaluation


class Items(NamedTuple):
    """World samples encoded once for teacher-forced scoring: prompt + answer + <eos>, right-padded."""

    text: O.TextBatch
    embeds_ind: Tensor  # projected image tokens the language model reads
    qtype_i: np.ndarray  # question type of each item
    template_i: np.ndarray  # (question type, token count) as one string: the position-matching key
    answer_i: np.ndarray

    def __len__(self) -> int:
        return len(self.qtype_i)

    @property
    def group_i(self) -> np.ndarray:
        return np.array([GROUP_OF_FAMILY[W.QTYPES[q]] for q in self.qtype_i])


@torch.no_grad()
def encode_items(model, tokenizer, samples: Sequence[W.Sample], batch_size: int = 256) -> Items:
    """Items of `samples` for the organism `model` (a LlavaForConditionalGeneration): its own prompt and
    tokenization (`lib.sources.organism.encode`), its projected image tokens."""
    assert samples, "no samples to encode"
    model.eval()
    n_img = model.config.image_seq_length
    text = O.encode(tokenizer, [O.vlm_text(s.question, n_img) for s in samples], [s.answer for s in samples])
    embeds = [
        model.model.multi_modal_projector(O.image_features(model, list(samples[i : i + batch_size])))
        for i in range(0, len(samples), batch_size)
    ]
    lengths_i = text.attention_mask_bs.sum(1).numpy()
    return Items(
        text,
        torch.cat(embeds),
        np.array([s.qtype for s in samples]),
        np.array([f"{s.qtype}/{n}" for s, n in zip(samples, lengths_i, strict=True)]),
        np.array([s.answer for s in samples]),
    )


def _chunk(items: Items, lo: int, hi: int) -> tuple[O.TextBatch, Tensor]:
    t = items.text
    n_s = int(t.attention_mask_bs[lo:hi].sum(1).max())  # trim the padding this chunk does not need
    return O.TextBatch(*(x[lo:hi, :n_s] for x in t)), items.embeds_ind[lo:hi]


PatchesFor = Callable[[slice, O.TextBatch], Sequence[HeadPatch]]  # the patches for items[lo:hi] (given as a slice)


class Scores(NamedTuple):
    correct_i: np.ndarray  # every answer token argmax-correct under teacher forcing
    p_correct_i: np.ndarray  # P(first answer token), softmax over the vocabulary


@torch.no_grad()
def evaluate(model, items: Items, patches_for: PatchesFor | None = None, batch_size: int = 256) -> Scores:
    """Teacher-forced scores of every item, under the head patches `patches_for(slice, text)` returns."""
    correct, p = [], []
    for lo in range(0, len(items), batch_size):
        hi = min(lo + batch_size, len(items))
        text, embeds_bnd = _chunk(items, lo, hi)
        patches = patches_for(slice(lo, hi), text) if patches_for is not None else ()
        with patch_heads(model, patches):
            logits_bsv = O.vlm_forward(model, text, embeds_bnd).logits.float()
        correct.append(O._correct(logits_bsv, text).numpy())
        first_b = text.answer_mask_bs.int().argmax(1)  # the first answer token; predicted at the position before
        rows_b = torch.arange(hi - lo)
        prob_bv = logits_bsv[rows_b, first_b - 1].softmax(-1)
        p.append(prob_bv[rows_b, text.input_ids_bs[rows_b, first_b]].numpy())
    return Scores(np.concatenate(correct), np.concatenate(p).astype(np.float64))


# ---------------------------------------------------------------------------------------------------------------
# 3. Position-matched mean ablation


class MatchedMeans(NamedTuple):
    z_glshk: Tensor  # mean hook_z per template and position (padded to the longest template; NaN where unseen)
    templates: tuple[str, ...]
    z_global_lhk: Tensor  # the all-position mean over non-BOS tokens (the fallback, and causal.mean_z's value)
    n_per_template: dict  # held-out items behind each template's mean


@torch.no_grad()
def _z_of(model, items: Items, batch_size: int):
    """Yields (slice, z_lbshk stacked over layers) for chunks of `items`."""
    from lib.kernels.adapter import decoder

    layers = decoder(model).layers
    n_heads = model.config.get_text_config().num_attention_heads
    for lo in range(0, len(items), batch_size):
        hi = min(lo + batch_size, len(items))
        text, embeds_bnd = _chunk(items, lo, hi)
        z: dict[int, Tensor] = {}

        def hook(layer, into=z):
            return lambda _m, args: into.__setitem__(layer, args[0].unflatten(-1, (n_heads, -1)).detach())

        handles = [layers[l].self_attn.o_proj.register_forward_pre_hook(hook(l)) for l in range(len(layers))]
        try:
            O.vlm_forward(model, text, embeds_bnd)
        finally:
            for h in handles:
                h.remove()
        yield slice(lo, hi), text, torch.stack([z[l] for l in range(len(layers))]).double()


def matched_means(model, reference: Items, batch_size: int = 256) -> MatchedMeans:
    """Each head's mean hook_z over `reference` (held-out items) per template and position, and over all non-BOS
    tokens (the fallback). BOS is position 0 of every item."""
    templates = tuple(sorted(set(reference.template_i)))
    n_s = reference.text.input_ids_bs.shape[1]
    total = count_g = total_global = None
    n_global = 0
    for sl, text, z_lbshk in _z_of(model, reference, batch_size):
        n_l, _, s, n_h, n_k = z_lbshk.shape
        if total is None:
            total = torch.zeros(len(templates), n_l, n_s, n_h, n_k, dtype=torch.float64)
            count_g = torch.zeros(len(templates), dtype=torch.float64)
            total_global = torch.zeros(n_l, n_h, n_k, dtype=torch.float64)
        g_b = torch.tensor([templates.index(t) for t in reference.template_i[sl]])
        total[:, :, :s].index_add_(0, g_b, z_lbshk.transpose(0, 1))
        count_g.index_add_(0, g_b, torch.ones(len(g_b), dtype=torch.float64))
        keep_bs = text.attention_mask_bs.bool().clone()
        keep_bs[:, 0] = False
        total_global += z_lbshk[:, keep_bs].sum(1)
        n_global += int(keep_bs.sum())
    mean = total / count_g[:, None, None, None, None]
    # Positions past a template's length hold padding in every item: mark them unseen.
    for g, t in enumerate(templates):
        mean[g, :, int(t.rsplit("/", 1)[1]) :] = torch.nan
    n_per = {t: int(c) for t, c in zip(templates, count_g.tolist(), strict=True)}
    return MatchedMeans(mean, templates, total_global / n_global, n_per)


def ablation_values(means: MatchedMeans, items: Items, sl: slice, n_s: int, layer: int, head: int) -> Tensor:
    """value_bsk: the mean each item of items[sl] gets at `layer`, `head` (matched, or the global mean where its
    template was not in the reference set)."""
    out = []
    for t in items.template_i[sl]:
        if t in means.n_per_template:
            out.append(means.z_glshk[means.templates.index(t), layer, :n_s, head])
        else:
            out.append(means.z_global_lhk[layer, head].expand(n_s, -1))
    v_bsk = torch.stack(out)
    return torch.nan_to_num(v_bsk, nan=0.0)  # padding positions only (never read)


def n_fallback(means: MatchedMeans, items: Items) -> int:
    """Items whose template the reference set lacks (they are ablated with the all-position mean)."""
    return int(sum(t not in means.n_per_template for t in items.template_i))


def ablation_patches(means: MatchedMeans, items: Items, heads: Sequence[Head], matched: bool = True) -> PatchesFor:
    """Mean ablation of `heads` at every position but BOS: position-matched means, or the all-position mean."""

    def patches(sl: slice, text: O.TextBatch) -> list[HeadPatch]:
        n_s = text.input_ids_bs.shape[1]
        not_bos_bs = text.attention_mask_bs.bool().clone()
        not_bos_bs[:, 0] = False
        out = []
        for l, h in heads:
            if matched:
                value = ablation_values(means, items, sl, n_s, l, h)
            else:
                value = means.z_global_lhk[l, h]
            out.append(HeadPatch(int(l), int(h), value.float(), positions_bs=not_bos_bs))
        return out

    return patches


# ---------------------------------------------------------------------------------------------------------------
# 4. The single-head sweep


def _rows(scores: Scores, items: Items, **condition) -> list[dict]:
    df = pd.DataFrame({"qtype": items.qtype_i, "correct": scores.correct_i, "p": scores.p_correct_i})
    g = df.groupby("qtype", sort=False).agg(accuracy=("correct", "mean"), p_correct=("p", "mean"), n=("p", "size"))
    return [
        dict(**condition, qtype=q, family=W.QTYPES[q], accuracy=float(r.accuracy), p_correct=float(r.p_correct), n=r.n)
        for q, r in g.iterrows()
    ]


def head_sweep(
    model,
    items: Items,
    means: MatchedMeans,
    heads: Sequence[Head],
    ablations: Sequence[str] = ("matched",),
    batch_size: int = 256,
) -> pd.DataFrame:
    """Every head of `heads` mean-ablated alone, per question type: the tidy table (ablation, layer, head, qtype,
    family, accuracy, p_correct, n), with the clean run as layer = head = -1 (ablation "none"). `ablations`:
    "matched" (position-matched means) and/or "global" (the all-position mean)."""
    assert set(ablations) <= {"matched", "global"}, f"ablations must be 'matched' or 'global', got {ablations}"
    rows = _rows(evaluate(model, items, batch_size=batch_size), items, ablation="none", layer=-1, head=-1)
    for ablation in ablations:
        for l, h in heads:
            patches = ablation_patches(means, items, [(l, h)], matched=ablation == "matched")
            scores = evaluate(model, items, patches, batch_size)
            rows += _rows(scores, items, ablation=ablation, layer=int(l), head=int(h))
    order = {q: i for i, q in enumerate(W.QTYPES)}
    table = pd.DataFrame(rows)
    return table.sort_values(
        ["ablation", "layer", "head", "qtype"], key=lambda c: c.map(order) if c.name == "qtype" else c, kind="stable"
    ).reset_index(drop=True)


def head_costs(sweep: pd.DataFrame, ablation: str = "matched") -> pd.DataFrame:
    """Per head: the cost of its ablation in points (clean - ablated, x 100) of accuracy and of P(correct), pooled
    over the items of the spatial and of the control group; `specific` = spatial - control accuracy cost; the head's
    rank (1 = largest spatial accuracy cost) and percentile among all heads of the sweep, and its rank by the
    specific cost. `sweep` holds one item set (one `subset`, where the table has the column)."""
    assert "subset" not in sweep or sweep.subset.nunique() == 1, "pass the rows of one subset of items"
    t = sweep.assign(group=sweep.family.map(GROUP_OF_FAMILY))

    def pooled(df):
        w = df.n / df.n.sum()
        return pd.Series({"accuracy": (df.accuracy * w).sum(), "p_correct": (df.p_correct * w).sum()})

    clean = t[t.ablation == "none"].groupby("group").apply(pooled, include_groups=False)
    abl = t[t.ablation == ablation].groupby(["layer", "head", "group"]).apply(pooled, include_groups=False)
    cost = (clean - abl) * 100  # aligns on group
    out = cost.unstack("group")
    out.columns = [f"{g}_{m}_cost" for m, g in out.columns]
    out = out.reset_index()
    out["specific_cost"] = out.spatial_accuracy_cost - out.control_accuracy_cost
    dist = out.spatial_accuracy_cost.to_numpy()
    placed = [place(v, dist) for v in dist]
    out["rank"] = [p.rank for p in placed]
    out["percentile"] = [p.percentile for p in placed]
    out["rank_specific"] = [place(v, out.specific_cost).rank for v in out.specific_cost]
    return out.sort_values("rank", kind="stable").reset_index(drop=True)


class Placement(NamedTuple):
    rank: int  # 1 + how many values of the distribution exceed it
    percentile: float  # mid-rank share of the distribution below it (ties count half), in [0, 1]
    n: int


def place(value: float, distribution: Sequence[float]) -> Placement:
    """Where `value` falls in `distribution` (larger = more extreme)."""
    d = np.asarray(distribution, dtype=np.float64)
    assert d.size > 0, "an empty distribution"
    above, equal = int((d > value).sum()), int((d == value).sum())
    return Placement(1 + above, float(((d < value).sum() + 0.5 * equal) / d.size), int(d.size))


# ---------------------------------------------------------------------------------------------------------------
# 5. The random control as a distribution


def head_sets(heads: Sequence[Head], k: int, n_draws: int, seed: int) -> tuple[list[tuple[Head, ...]], bool]:
    """The control's head sets: every k-subset of `heads` when there are at most `n_draws` of them (the exact
    distribution, each set once), otherwise `n_draws` sets drawn uniformly (k distinct heads each). Returns the sets
    and whether they are exhaustive."""
    heads = [(int(l), int(h)) for l, h in heads]
    assert 0 < k <= len(heads), f"cannot draw {k} of {len(heads)} heads"
    if math.comb(len(heads), k) <= n_draws:
        return [tuple(c) for c in combinations(heads, k)], True
    rng = np.random.default_rng(seed)
    return [
        tuple(heads[i] for i in sorted(rng.choice(len(heads), size=k, replace=False))) for _ in range(n_draws)
    ], False


def group_scores(scores: Scores, items: Items) -> dict:
    """Accuracy and mean P(correct) pooled over each group's items."""
    g_i = items.group_i
    return {
        f"{g}_{m}": float(v[g_i == g].mean())
        for g in (SPATIAL, CONTROL)
        if (g_i == g).any()
        for m, v in (("accuracy", scores.correct_i), ("p_correct", scores.p_correct_i))
    }


def set_costs(
    model, items: Items, means: MatchedMeans, sets: Sequence[Sequence[Head]], batch_size: int = 256
) -> pd.DataFrame:
    """Each head set ablated together (matched means): its cost in points on the spatial and the control group.
    One row per set (heads as 'L1H2+L2H0')."""
    clean = group_scores(evaluate(model, items, batch_size=batch_size), items)
    rows = []
    for s in sets:
        ablated = group_scores(evaluate(model, items, ablation_patches(means, items, s), batch_size), items)
        row = {"heads": head_set_name(s)}
        row.update({f"{k}_cost": 100 * (clean[k] - ablated[k]) for k in clean})
        rows.append(row)
    return pd.DataFrame(rows)


def head_set_name(heads: Sequence[Head]) -> str:
    return "+".join(f"L{l}H{h}" for l, h in sorted((int(l), int(h)) for l, h in heads))
