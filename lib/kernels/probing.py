"""Spatial probing: which adapted features fire more on spatial questions than on general ones, which of them read
the image rather than spatial words, what they encode, and how well the selection finds what the world's ground
truth says is there (METHOD.md, step 3).

1. Firing statistics (`FiringCounts`, `fisher_table`, `select_spatial`): per feature, how often it fires (z > 0) on
   the text positions of spatial questions against general ones: a one-sided Fisher exact test on
   [[c_sp, n_sp - c_sp], [c_gen, n_gen - c_gen]], the odds ratio, delta frequency and Benjamini-Hochberg p-values.
2. Top samples (`top_samples`): per feature, the N samples with the highest maximum activation over the TEXT
   positions of their own question (real non-image tokens, BOS excluded), as the authors' sample extraction does
   for the text-only SAE. Streaming: a running top-N per feature, never the activations of the whole data set.
   Only samples on which the feature fires (max > 0) count; a feature that fires on fewer has a shorter list.
3. Lexical filter (`lexical_filter`): each top sample's image is run again with its question replaced by each
   direction-free prompt. Per (sample, prompt) the feature's maximum activation is taken over two position sets,
   the two readings of the source: "all" (every real token but BOS: image and prompt text) and "image" (the image
   tokens only). Rule (the authors' code): for each top sample take the best prompt; the feature survives if that
   best activation exceeds the threshold (0.01) for EVERY top sample. `prompt_rule="every"` asks for every prompt
   instead (stricter; the wording of `lexical_survivors`' docstring). The book uses the "all" reading, which is
   what the authors' code tests (their pass flag reads `max_all`); the "image" reading is shown beside it: it keeps
   only features that fire on image tokens, so it drops features that respond to the image only at text positions.
4. Ground truth (`scene_attributes`, `feature_activations_under_prompts`, `auroc_table`, `ground_truth_check`):
   boolean attributes of each sample's scene, each feature's activation under the direction-free prompts, AUROC of
   every feature for every attribute, final features against random ones, and the features the pipeline missed,
   each with the first filter that dropped it.
5. Auto-interp (`describe_feature`, `score_description`, `auto_interp`; optional `llm_explainer`) and the panels
   of the chapter (`feature_trace`, `draw_feature_panel`).

Shape key: n = tokens, f = SAE features (or (layer, feature) columns), s = samples (data-set rows), p = prompts,
k = top-N rank, y / x = patch-grid rows / columns. Masks taken from a `lib.adapter.Batch` keep the adapter's
suffixes there (`keep_bs`: b sequences x s positions); everywhere else in this module s is a sample.

An SAE enters as one encode callable per layer, `encode(x_nd) -> z_nf` (SAELens' `SAE.encode` has this signature),
applied to `blocks.{L}.hook_resid_post`. Activations are non-negative (ReLU, TopK and JumpReLU SAEs all are), so a
maximum starts at 0 and "fires" means > 0.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import stats

from lib.kernels.adapter import VLM, Batch, capture, iter_batches, prepare, resid_name, resid_stream
from lib.sources import world as W

# ---------------------------------------------------------------------------------------------------------------
# Firing statistics and the selection rules


class FiringCounts:
    """Streaming counts of tokens on which each feature fires, for spatial and for general questions."""

    def __init__(self, n_features: int):
        self.c_sp = torch.zeros(n_features, dtype=torch.int64)
        self.c_gen = torch.zeros(n_features, dtype=torch.int64)
        self.n_sp = self.n_gen = 0

    @torch.no_grad()
    def update(self, z_nf: torch.Tensor, spatial_n: torch.Tensor) -> None:
        """`z_nf` on text positions only; `spatial_n` marks tokens that belong to a spatial question."""
        fires = z_nf > 0
        self.c_sp += fires[spatial_n].sum(0)
        self.c_gen += fires[~spatial_n].sum(0)
        self.n_sp += int(spatial_n.sum())
        self.n_gen += int((~spatial_n).sum())


@torch.no_grad()
def firing_counts(
    vlm: VLM, encode_by_layer: Mapping[int, Callable], samples: SampleSet, spatial_s, batch_size: int = 8
) -> dict[int, FiringCounts]:
    """Per layer, how often each feature fires on the text positions (real, non-image, non-BOS tokens) of spatial
    and of general questions; `spatial_s[i]` is the keyword split of sample i. One forward per batch, all layers."""
    spatial_s = torch.as_tensor(np.asarray(spatial_s, dtype=bool))
    assert len(spatial_s) == len(samples), f"{len(spatial_s)} spatial flags for {len(samples)} samples"
    layers = sorted(encode_by_layer)
    counts: dict[int, FiringCounts] = {}
    for start, batch in zip(
        range(0, len(samples), batch_size),
        iter_batches(vlm, samples.images, samples.questions, batch_size),
        strict=True,
    ):
        text_bs = batch.text_bs.cpu()
        sp_bs = spatial_s[start : start + text_bs.shape[0], None].expand_as(text_bs)

        def on_layer(name: str, x_bsd: torch.Tensor, text_bs=text_bs, sp_bs=sp_bs) -> None:
            layer = int(name.split(".")[1])
            z_nf = encode_by_layer[layer](x_bsd[text_bs.to(x_bsd.device)]).float().cpu()
            counts.setdefault(layer, FiringCounts(z_nf.shape[1])).update(z_nf, sp_bs[text_bs])

        resid_stream(vlm, batch, layers=layers, on_layer=on_layer)
    return counts


def spatial_table(counts: Mapping[int, FiringCounts]) -> pd.DataFrame:
    """`fisher_table` of every layer's counts, with layer and feature columns (BH adjustment per layer, as the
    authors test each layer's SAE separately)."""
    frames = []
    for layer, c in sorted(counts.items()):
        t = fisher_table(c.c_sp.numpy(), c.n_sp, c.c_gen.numpy(), c.n_gen)
        t.insert(0, "feature", np.arange(len(t)))
        t.insert(0, "layer", layer)
        t["n_spatial_tokens"], t["n_general_tokens"] = c.n_sp, c.n_gen
        frames.append(t)
    return pd.concat(frames, ignore_index=True)


def fisher_table(c_sp: np.ndarray, n_sp: int, c_gen: np.ndarray, n_gen: int) -> pd.DataFrame:
    """One-sided (greater) Fisher exact test per feature with scipy, odds ratio, delta frequency, BH-adjusted p.

    The odds ratio is scipy's sample odds ratio (c_sp (n_gen - c_gen)) / ((n_sp - c_sp) c_gen): infinite when the
    feature never fires on general questions but does on spatial ones, undefined (NaN) when it never fires at all;
    such features get p = 1 and never pass the OR threshold."""
    c_sp, c_gen = np.asarray(c_sp, dtype=np.int64), np.asarray(c_gen, dtype=np.int64)
    assert c_sp.shape == c_gen.shape and (c_sp <= n_sp).all() and (c_gen <= n_gen).all(), "counts exceed totals"
    odds, p = np.empty(len(c_sp)), np.empty(len(c_sp))
    for i, (a, c) in enumerate(zip(c_sp, c_gen, strict=True)):
        if a == 0 and c == 0:
            odds[i], p[i] = np.nan, 1.0
            continue
        res = stats.fisher_exact([[a, n_sp - a], [c, n_gen - c]], alternative="greater")
        odds[i], p[i] = res.statistic, res.pvalue
    freq_sp, freq_gen = c_sp / max(n_sp, 1), c_gen / max(n_gen, 1)
    return pd.DataFrame(
        {
            "c_spatial": c_sp,
            "c_general": c_gen,
            "freq_spatial": freq_sp,
            "freq_general": freq_gen,
            "delta_freq": freq_sp - freq_gen,
            "odds_ratio": odds,
            "p_value": p,
            "p_adj": stats.false_discovery_control(p, method="bh"),
        }
    )


def select_spatial(table: pd.DataFrame, min_odds: float, min_delta: float) -> pd.Series:
    """Spatial candidates: OR >= min_odds and delta frequency >= min_delta (NaN odds never pass)."""
    return (table["odds_ratio"].fillna(0) >= min_odds) & (table["delta_freq"] >= min_delta)


def lexical_survivors(max_act_sp: torch.Tensor, threshold: float) -> torch.Tensor:
    """The lexical filter's rule. `max_act_sp[s, p]`: a feature's maximum activation on top sample s when its
    question is replaced by direction-free prompt p. The feature survives only if it still fires (> threshold)
    for every top sample under every prompt, i.e. it does not merely read spatial words."""
    assert max_act_sp.ndim == 2 and max_act_sp.numel() > 0, "need at least one top sample and one prompt"
    return bool((max_act_sp > threshold).all())


# ---------------------------------------------------------------------------------------------------------------
# Samples and feature keys

FeatureKey = tuple[int, int]  # (layer, feature)
Positions = Literal["text", "all", "image", "post_image"]
Reading = Literal["all", "image"]
READINGS: tuple[Reading, ...] = ("all", "image")


class _Rendered(Sequence):
    """Images of world scenes, rendered when indexed (a data set of thousands is never held as pixels)."""

    def __init__(self, scenes: Sequence[W.Scene]):
        self.scenes = tuple(scenes)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.scenes[j].render() for j in range(*i.indices(len(self)))]
        return self.scenes[i].render()


@dataclass(frozen=True)
class SampleSet:
    """The rows probing reads: an image and a question per sample. `images` may be lazy (a dataset column, or
    rendered world scenes); it is indexed one sample at a time, in batches."""

    images: Sequence[Any]
    questions: Sequence[str]

    def __post_init__(self):
        assert len(self.images) == len(self.questions), (
            f"SampleSet: {len(self.images)} images for {len(self.questions)} questions"
        )

    def __len__(self) -> int:
        return len(self.questions)

    @classmethod
    def from_world(cls, samples: Sequence[W.Sample]) -> SampleSet:
        return cls(_Rendered([s.scene for s in samples]), [s.question for s in samples])


def feature_keys(features) -> list[FeatureKey]:
    """(layer, feature) pairs from a table with `layer` and `feature` columns or from an iterable of pairs."""
    if isinstance(features, pd.DataFrame):
        missing = {"layer", "feature"} - set(features.columns)
        assert not missing, f"a feature table needs the columns `layer` and `feature`; missing {sorted(missing)}"
        return [(int(a), int(b)) for a, b in zip(features["layer"], features["feature"], strict=True)]
    return [(int(a), int(b)) for a, b in features]


def all_features(layers: Sequence[int], width: int) -> list[FeatureKey]:
    """Every feature of every layer in `layers` (SAE width `width`)."""
    return [(int(layer), f) for layer in layers for f in range(width)]


def _columns_by_layer(keys: Sequence[FeatureKey]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (feature ids, their column positions in `keys`)."""
    out: dict[int, tuple[list[int], list[int]]] = {}
    for col, (layer, feature) in enumerate(keys):
        feats, cols = out.setdefault(layer, ([], []))
        feats.append(feature)
        cols.append(col)
    return {layer: (torch.tensor(f), torch.tensor(c)) for layer, (f, c) in sorted(out.items())}


# ---------------------------------------------------------------------------------------------------------------
# Streaming maxima over positions


def position_mask(batch: Batch, positions: Positions) -> torch.Tensor:
    """The adapter's mask for a named position set: "text" = real non-image tokens, "all" = every real token,
    "image" = image tokens, "post_image" = text after the image; BOS is never included."""
    masks = {
        "text": batch.text_bs,
        "all": batch.keep_bs,
        "image": batch.image_mask_bs & batch.keep_bs,
        "post_image": batch.post_image_bs & batch.keep_bs,
    }
    if positions not in masks:
        raise ValueError(f"positions = {positions!r}: expected one of {sorted(masks)}")
    return masks[positions]


def _encode_columns(encode: Callable, x_nd: torch.Tensor, feats_f: torch.Tensor, chunk: int) -> torch.Tensor:
    """z_nf of the features `feats_f`, encoding `chunk` tokens at a time (a full-width z of a 576-token image
    batch of the paper's 32k-wide SAEs would not fit), on the CPU in float32."""
    out = []
    for start in range(0, x_nd.shape[0], chunk):
        z_nF = encode(x_nd[start : start + chunk].float())
        assert z_nF.ndim == 2 and z_nF.shape[0] == min(chunk, x_nd.shape[0] - start), (
            f"encode must map x_nd to z_nf; got {tuple(z_nF.shape)} for {min(chunk, x_nd.shape[0] - start)} tokens"
        )
        assert int(feats_f.max()) < z_nF.shape[1], (
            f"feature {int(feats_f.max())} asked of an SAE of width {z_nF.shape[1]}"
        )
        out.append(z_nF[:, feats_f.to(z_nF.device)].float().cpu())
    z_nf = torch.cat(out) if out else torch.zeros(0, len(feats_f))
    assert (z_nf >= 0).all(), "SAE activations must be non-negative (ReLU / TopK / JumpReLU SAEs)"
    return z_nf


@torch.no_grad()
def sequence_max(
    vlm: VLM,
    encode_by_layer: Mapping[int, Callable],
    keys: Sequence[FeatureKey],
    batch: Batch,
    positions: Sequence[Positions],
    chunk: int = 4096,
) -> dict[str, torch.Tensor]:
    """One forward pass; for each position set in `positions`, max_bf[b, j] = the maximum activation of feature
    keys[j] over those positions of sequence b (0 if it never fires there). Every SAE sees the union of the
    position sets once."""
    n_b = batch.input_ids_bs.shape[0]
    if not keys:
        return {p: torch.zeros(n_b, 0) for p in positions}
    cols = _columns_by_layer(keys)
    missing = sorted(set(cols) - set(encode_by_layer))
    if missing:
        raise KeyError(f"no encoder for layers {missing}; encode_by_layer has {sorted(encode_by_layer)}")
    masks = {p: position_mask(batch, p) for p in positions}
    union_bs = torch.stack(list(masks.values())).any(0)
    b_n, s_n = union_bs.nonzero(as_tuple=True)
    member = {p: m[b_n, s_n].cpu() for p, m in masks.items()}
    b_n_cpu = b_n.cpu()
    out = {p: torch.zeros(n_b, len(keys)) for p in positions}
    layer_of = {resid_name(layer): layer for layer in cols}

    def on_layer(name: str, x_bsd: torch.Tensor) -> None:
        feats_f, cols_f = cols[layer_of[name]]
        z_nf = _encode_columns(encode_by_layer[layer_of[name]], x_bsd[b_n, s_n], feats_f, chunk)
        for p, sel_n in member.items():
            z_sel = z_nf[sel_n]
            where_nf = b_n_cpu[sel_n, None].expand_as(z_sel)
            max_bf = torch.zeros(n_b, len(feats_f)).scatter_reduce_(0, where_nf, z_sel, "amax")
            out[p][:, cols_f] = max_bf

    resid_stream(vlm, batch, layers=list(cols), on_layer=on_layer)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Top samples


class RunningTopN:
    """Per feature, the N largest values seen so far and the sample indices they came from, in descending order;
    ties go to the lower sample index (so the result equals one stable sort of all values). Values <= 0 (the
    feature did not fire) never enter. Memory O(f x (N + batch))."""

    def __init__(self, n_features: int, n: int):
        assert n >= 1, f"top-N needs N >= 1, got {n}"
        self.n = n
        self.value_fk = torch.full((n_features, n), -math.inf)
        self.index_fk = torch.full((n_features, n), -1, dtype=torch.long)

    def update(self, value_bf: torch.Tensor, index_b: torch.Tensor) -> None:
        """`value_bf[b, f]`: sample index_b[b]'s value for feature f. Indices must increase across calls (streaming
        in data-set order), which is what makes the tie rule hold."""
        assert value_bf.shape == (len(index_b), self.value_fk.shape[0]), (
            f"values {tuple(value_bf.shape)} for {len(index_b)} samples x {self.value_fk.shape[0]} features"
        )
        value_fb = value_bf.T.float().masked_fill(value_bf.T <= 0, -math.inf)
        values = torch.cat([self.value_fk, value_fb], 1)
        index = torch.cat([self.index_fk, index_b.long().expand(len(value_fb), -1)], 1)
        # Stable descending sort: the buffer (lower indices, already in tie order) precedes the batch, so among
        # -inf entries the buffer's padding (index -1) always wins over a batch sample that did not fire.
        order = values.sort(dim=1, descending=True, stable=True).indices[:, : self.n]
        self.value_fk, self.index_fk = values.gather(1, order), index.gather(1, order)


class TopSamples(NamedTuple):
    """Per feature (row j of keys), the indices of its top samples in descending order of activation (-1 pads a
    feature that fired on fewer than N samples) and the activations."""

    keys: list[FeatureKey]
    index_fk: torch.Tensor
    value_fk: torch.Tensor
    positions: str

    def indices(self, key: FeatureKey) -> list[int]:
        row = self.index_fk[self.keys.index(tuple(key))]
        return [int(i) for i in row if i >= 0]

    @classmethod
    def from_frame(cls, df: pd.DataFrame, keys, positions: str) -> TopSamples:
        """Back from a long table (layer, feature, rank, sample, value or activation) for the features `keys`."""
        keys = feature_keys(keys)
        n = int(df["rank"].max()) + 1 if len(df) else 1
        index_fk = torch.full((len(keys), n), -1, dtype=torch.long)
        value_fk = torch.full((len(keys), n), -math.inf)
        where = {k: j for j, k in enumerate(keys)}
        value = df["value"] if "value" in df else df["activation"]
        for layer, feature, rank, sample, v in zip(df.layer, df.feature, df["rank"], df["sample"], value, strict=True):
            j = where.get((int(layer), int(feature)))
            if j is not None:
                index_fk[j, int(rank)], value_fk[j, int(rank)] = int(sample), float(v)
        return cls(keys, index_fk, value_fk, positions)

    def frame(self) -> pd.DataFrame:
        """Long table: layer, feature, rank, sample, activation."""
        rows = [
            (layer, feature, k, int(i), float(v))
            for (layer, feature), idx, val in zip(self.keys, self.index_fk, self.value_fk, strict=True)
            for k, (i, v) in enumerate(zip(idx, val, strict=True))
            if i >= 0
        ]
        return pd.DataFrame(rows, columns=["layer", "feature", "rank", "sample", "activation"])


def top_samples(
    vlm: VLM,
    encode_by_layer: Mapping[int, Callable],
    features,
    samples: SampleSet,
    n: int,
    positions: Positions = "text",
    batch_size: int = 8,
) -> TopSamples:
    """The `n` samples with the highest maximum activation over `positions` of each feature, each sample read with
    its own question. Default "text": the statistic the spatial selection counts (and the authors' magnitude for
    the text-only SAE). One pass over the data, a running top-N per feature."""
    keys = feature_keys(features)
    top = RunningTopN(len(keys), n)
    start = 0
    for batch in iter_batches(vlm, samples.images, samples.questions, batch_size):
        max_bf = sequence_max(vlm, encode_by_layer, keys, batch, [positions])[positions]
        top.update(max_bf, torch.arange(start, start + len(max_bf)))
        start += len(max_bf)
    return TopSamples(keys, top.index_fk, top.value_fk, positions)


def top_from_matrix(matrix: FeatureMatrix, n: int, features=None) -> TopSamples:
    """Top samples from a `feature_activations_under_prompts` matrix (activation under the direction-free prompts)
    instead of from the samples' own questions."""
    keys = matrix.keys if features is None else feature_keys(features)
    acts_sf = matrix.select(keys)
    top = RunningTopN(len(keys), n)
    top.update(acts_sf, torch.arange(acts_sf.shape[0]))
    return TopSamples(keys, top.index_fk, top.value_fk, "post_image under direction-free prompts")


# ---------------------------------------------------------------------------------------------------------------
# Lexical filter


class LexicalResult(NamedTuple):
    """`table`: one row per candidate: layer, feature, n_top, min_best_all / min_best_image (over top samples, the
    best prompt's max activation), lexical_all, lexical_image (survive flags of the two readings) and `lexical`,
    the flag of the reading in use. `max_sp[reading][key]`: max activation per top sample x prompt."""

    table: pd.DataFrame
    max_sp: dict[str, dict[FeatureKey, torch.Tensor]]
    prompts: tuple[str, ...]
    reading: str
    top: TopSamples


def lexical_filter(
    vlm: VLM,
    encode_by_layer: Mapping[int, Callable],
    candidates,
    samples: SampleSet,
    top_n: int = 5,
    threshold: float = 0.01,
    prompts: Sequence[str] = W.GENERIC_PROMPTS,
    reading: Reading = "all",
    *,
    prompt_rule: Literal["best", "every"] = "best",
    top: TopSamples | None = None,
    batch_size: int = 8,
) -> LexicalResult:
    """The lexical filter under both readings (module docstring, item 3).

    `prompts` are question texts: each goes through `vlm.prompt` exactly as a question does, so the organism gets
    `lib.world.vlm_prompt(prompt)` and the paper's VLM its own chat template (pass `PAPER_GENERIC_PROMPTS` there).
    `top`: top samples computed earlier (default: `top_samples(..., top_n, positions="text")`).
    Each distinct (top sample, prompt) pair runs once, whatever the number of features sharing the sample."""
    if reading not in READINGS:
        raise ValueError(f"reading = {reading!r}: expected one of {READINGS}")
    if prompt_rule not in ("best", "every"):
        raise ValueError(f"prompt_rule = {prompt_rule!r}: expected 'best' or 'every'")
    keys = feature_keys(candidates)
    prompts = tuple(prompts)
    assert prompts, "the lexical filter needs at least one direction-free prompt"
    if top is None:
        top = top_samples(vlm, encode_by_layer, keys, samples, top_n, "text", batch_size)
    lists = {key: top.indices(key)[:top_n] for key in keys}
    owners: dict[int, list[tuple[int, int]]] = {}  # sample -> [(column, rank)]
    for col, key in enumerate(keys):
        for rank, i in enumerate(lists[key]):
            owners.setdefault(i, []).append((col, rank))
    max_sp = {r: {key: torch.zeros(len(lists[key]), len(prompts)) for key in keys} for r in READINGS}
    unique = sorted(owners)
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        images = [samples.images[i] for i in chunk]
        for p, prompt in enumerate(prompts):
            batch = prepare(vlm, images, [prompt] * len(chunk))
            max_bf = sequence_max(vlm, encode_by_layer, keys, batch, READINGS)
            for b, i in enumerate(chunk):
                for col, rank in owners[i]:
                    for r in READINGS:
                        max_sp[r][keys[col]][rank, p] = max_bf[r][b, col]

    def survives(m_sp: torch.Tensor) -> bool:
        if m_sp.shape[0] == 0:  # never fired on its own questions: nothing to keep
            return False
        return lexical_survivors(m_sp.amax(1, keepdim=True) if prompt_rule == "best" else m_sp, threshold)

    rows = []
    for layer, feature in keys:
        row = {"layer": layer, "feature": feature, "n_top": len(lists[(layer, feature)])}
        for r in READINGS:
            m_sp = max_sp[r][(layer, feature)]
            row[f"min_best_{r}"] = float(m_sp.amax(1).min()) if len(m_sp) else math.nan
            row[f"lexical_{r}"] = survives(m_sp)
        rows.append(row)
    table = pd.DataFrame(rows, columns=_LEXICAL_COLUMNS)
    table["lexical"] = table[f"lexical_{reading}"].astype(bool)
    return LexicalResult(table, max_sp, prompts, reading, top)


_LEXICAL_COLUMNS = ["layer", "feature", "n_top", "min_best_all", "lexical_all", "min_best_image", "lexical_image"]

# The authors' direction-free prompts for the paper's VLM (vlm_scope, features/spatial/probe_vqa_spatial_features.py).
PAPER_GENERIC_PROMPTS = (
    "Describe how the items are arranged.",
    "Comment on the overall layout and organization of the scene.",
    "Summarize the structure in terms of grouping or separation.",
    "Explain the relative positioning of objects without naming directions.",
    "Describe patterns of arrangement, such as order or symmetry.",
)


def final_set(table: pd.DataFrame) -> pd.Series:
    """Final spatial features: adapted AND spatial AND lexical (a feature the lexical filter never saw is out)."""
    missing = {"adapted", "spatial", "lexical"} - set(table.columns)
    assert not missing, f"the feature table lacks the columns {sorted(missing)}"
    return table["adapted"].astype(bool) & table["spatial"].astype(bool) & table["lexical"].fillna(False).astype(bool)


def per_layer_counts(table: pd.DataFrame, columns: Sequence[str] = ("adapted", "spatial", "lexical", "final")):
    """Features per layer passing each selection column (boolean columns; NaN counts as False)."""
    present = [c for c in columns if c in table.columns]
    flags = table[present].fillna(False).astype(bool)
    return flags.groupby(table["layer"]).sum().astype(int)


# ---------------------------------------------------------------------------------------------------------------
# Ground-truth attributes

# Relations between the two objects of a two-object scene, the pair taken in reading order (a = the object whose
# cell comes first, row by row, then column by column; b = the other). The order uses positions only, never
# identities, so a label is a fact about the image alone, which is all a direction-free prompt leaves the model.
# Under it "a below b" is impossible by construction (a's row is never lower), so "below" has no column; the two
# alignments are listed because, in reading order, "same row" is exactly "not above" and would otherwise only show
# up as an AUROC far below 0.5.
PAIR_RELATIONS = ("left of", "right of", "above", "same row", "same column")
_NUMBER_WORDS = dict(enumerate(W.NUMBERS))


def _pair_label(a: W.Obj, b: W.Obj, relation: str) -> bool:
    if relation == "same row":
        return a.row == b.row
    if relation == "same column":
        return a.col == b.col
    return W.holds(a, b, relation)


def scene_attributes(scenes: Sequence[W.Scene]) -> pd.DataFrame:
    """One row per scene, boolean attribute columns:

    - `relation:<r>` for r in PAIR_RELATIONS: two-object scenes only (pandas' nullable boolean, <NA> for other
      counts), a and b in reading order, label = holds(a, b, r) (lib.world's strict comparison of grid cells);
    - `row:<top|middle|bottom>`, `column:<left|center|right>`: some object lies in that row / column;
    - `color:<c>`, `shape:<s>`: some object has that colour / shape;
    - `count:<k>`: the scene has exactly k objects (one column per count that occurs).
    """
    rows = []
    for scene in scenes:
        objs = sorted(scene.objects, key=lambda o: (o.row, o.col))
        row: dict[str, Any] = {}
        for r in PAIR_RELATIONS:
            row[f"relation:{r}"] = _pair_label(objs[0], objs[1], r) if len(objs) == 2 else pd.NA
        for i, name in enumerate(W.ROWS):
            row[f"row:{name}"] = any(o.row == i for o in objs)
        for i, name in enumerate(W.COLS):
            row[f"column:{name}"] = any(o.col == i for o in objs)
        for c in W.COLORS:
            row[f"color:{c}"] = any(o.color == c for o in objs)
        for s in W.SHAPES:
            row[f"shape:{s}"] = any(o.shape == s for o in objs)
        row["_count"] = len(objs)
        rows.append(row)
    df = pd.DataFrame(rows)
    for k in sorted(df["_count"].unique()) if len(df) else []:
        df[f"count:{k}"] = df["_count"] == k
    df = df.drop(columns="_count", errors="ignore")
    rel = [c for c in df.columns if c.startswith("relation:")]
    df[rel] = df[rel].astype("boolean")
    other = [c for c in df.columns if c not in rel]
    df[other] = df[other].astype(bool)
    return df


def sample_attributes(samples: Sequence[W.Sample], question: bool = False) -> pd.DataFrame:
    """`scene_attributes` of each sample's scene; with `question=True` also attributes of the sample's question,
    for describing top samples read with their own questions:
    `question:names <r>` (the question names relation r) and `question:<r> holds` (it names r and r holds for the
    pair it names: a yes answer of a relation / statement question, every what-is-<r> question)."""
    df = scene_attributes([s.scene for s in samples])
    if question:
        for r in W.RELATIONS:
            names = [s.relation == r for s in samples]
            holds = [s.relation == r and (s.qtype == "what_rel" or s.answer == "yes") for s in samples]
            df[f"question:names {r}"] = names
            df[f"question:{r} holds"] = holds
    return df


def describe_attribute(name: str) -> str:
    """The one-sentence description a ground-truth attribute stands for."""
    kind, _, value = name.partition(":")
    if kind == "relation":
        if value.startswith("same"):
            return f"fires on two-object scenes with both objects in the {value.removeprefix('same ')}"
        return (
            f"fires on two-object scenes where the first object in reading order (by row, then column) "
            f"is {value} the second"
        )
    if kind == "row":
        return f"fires on images with an object in the {value} row"
    if kind == "column":
        return f"fires on images with an object in the {value} column"
    if kind == "color":
        return f"fires on images with a {value} object"
    if kind == "shape":
        return f"fires on images with a {value}"
    if kind == "count":
        return f"fires on images with {_NUMBER_WORDS.get(int(value), value)} objects"
    if kind == "question":
        if value.startswith("names "):
            return f"fires on questions that name the relation '{value.removeprefix('names ')}'"
        return f"fires on questions about '{value.removesuffix(' holds')}' where the relation holds"
    raise ValueError(
        f"unknown attribute {name!r}; expected <kind>:<value> with kind in relation, row, column, "
        "color, shape, count, question"
    )


def _as_bool_matrix(attributes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(label_sa, valid_sa): nullable booleans to a label matrix and a mask of defined entries."""
    valid = ~attributes.isna().to_numpy()
    label = attributes.fillna(False).astype(bool).to_numpy()
    return label, valid


# ---------------------------------------------------------------------------------------------------------------
# Activations under the direction-free prompts, AUROC


class FeatureMatrix(NamedTuple):
    """acts_sf[s, j]: feature keys[j] on sample s."""

    keys: list[FeatureKey]
    acts_sf: torch.Tensor
    prompts: tuple[str, ...]

    def select(self, features) -> torch.Tensor:
        where = {k: j for j, k in enumerate(self.keys)}
        wanted = feature_keys(features)
        absent = [k for k in wanted if k not in where]
        assert not absent, f"features {absent[:5]} are not in this matrix"
        return self.acts_sf[:, [where[k] for k in wanted]]


@torch.no_grad()
def feature_activations_under_prompts(
    vlm: VLM,
    encode_by_layer: Mapping[int, Callable],
    features,
    samples: SampleSet,
    prompts: Sequence[str] = W.GENERIC_PROMPTS,
    batch_size: int = 8,
) -> FeatureMatrix:
    """Per sample and feature: the MAXIMUM activation over the post-image positions (the prompt text after the
    image and the answer position), one value per direction-free prompt, then the MEAN over prompts.

    Max rather than mean over positions: a feature that reads the scene may fire at one position only (the last,
    where an answer would be formed), and the mean would dilute that by the prompt's length, which differs between
    prompts. Mean rather than max over prompts: it rewards a feature that fires under every wording, not under one.
    Memory: samples x features floats (4,000 x 8,000 is 128 MB); streaming over samples."""
    keys = feature_keys(features)
    prompts = tuple(prompts)
    acts_sf = torch.zeros(len(samples), len(keys))
    for start in range(0, len(samples), batch_size):
        stop = min(start + batch_size, len(samples))
        images = [samples.images[i] for i in range(start, stop)]
        for prompt in prompts:
            batch = prepare(vlm, images, [prompt] * (stop - start))
            acts_sf[start:stop] += sequence_max(vlm, encode_by_layer, keys, batch, ["post_image"])["post_image"]
    return FeatureMatrix(keys, acts_sf / len(prompts), prompts)


def auroc_table(acts_sf, attributes: pd.DataFrame, keys: Sequence[FeatureKey] | None = None, chunk: int = 2048):
    """AUROC of each feature's activation (column of acts_sf) as a score for each attribute (column of
    `attributes`, rows aligned with samples; <NA> entries are left out of that attribute's AUROC).

    Vectorised Mann-Whitney form: AUROC = (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0), ranks with
    ties averaged (scipy.stats.rankdata), which is what sklearn's roc_auc_score computes. NaN when an attribute has
    no positive or no negative sample. Returns one row per feature: layer and feature (when `keys` is given), one
    column per attribute, `best_attribute` / `best_auroc` (largest AUROC), and `best_relation` /
    `best_relation_auroc` over the `relation:` columns when there are any."""
    acts = acts_sf.numpy() if isinstance(acts_sf, torch.Tensor) else np.asarray(acts_sf)
    assert acts.ndim == 2 and acts.shape[0] == len(attributes), (
        f"acts_sf has {acts.shape[0] if acts.ndim == 2 else acts.shape} samples, attributes {len(attributes)} rows"
    )
    label_sa, valid_sa = _as_bool_matrix(attributes)
    n_f, names = acts.shape[1], list(attributes.columns)
    auc_fa = np.full((n_f, len(names)), np.nan)
    # Attributes that share a pattern of defined entries share one ranking (relations: the two-object scenes).
    groups: dict[bytes, list[int]] = {}
    for a in range(len(names)):
        groups.setdefault(np.packbits(valid_sa[:, a]).tobytes(), []).append(a)
    for cols in groups.values():
        valid = valid_sa[:, cols[0]]
        y_as = label_sa[valid][:, cols].T.astype(np.float64)
        n1 = y_as.sum(1)
        n0 = valid.sum() - n1
        for start in range(0, n_f, chunk):
            ranks_sf = stats.rankdata(acts[valid, start : start + chunk].astype(np.float64), axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                auc = (y_as @ ranks_sf - (n1 * (n1 + 1) / 2)[:, None]) / (n1 * n0)[:, None]
            auc[(n1 == 0) | (n0 == 0)] = np.nan
            auc_fa[start : start + chunk, cols] = auc.T
    table = pd.DataFrame(auc_fa, columns=names)
    _add_best(table, names, "best_attribute", "best_auroc")
    relations = [c for c in names if c.startswith("relation:")]
    if relations:
        _add_best(table, relations, "best_relation", "best_relation_auroc")
    if keys is not None:
        keys = feature_keys(keys)
        assert len(keys) == n_f, f"{len(keys)} keys for {n_f} feature columns"
        table.insert(0, "feature", [f for _, f in keys])
        table.insert(0, "layer", [layer for layer, _ in keys])
    return table


def relation_probe(
    inputs: Mapping[str, np.ndarray], attributes: pd.DataFrame, n_splits: int = 5, seed: int = 0, C: float = 0.1
) -> pd.DataFrame:
    """Cross-validated AUROC of a linear probe for each `relation:` attribute, from each named input matrix (rows
    aligned with `attributes`): standardised inputs, L2 logistic regression (inverse strength C), out-of-fold
    probabilities from stratified k-fold (scikit-learn). `auroc_table` asks whether one feature tracks a relation;
    this asks whether a set of them does jointly. Samples whose attribute is <NA> are left out; NaN where either
    class has fewer than `n_splits` samples. One row per input, one column per relation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    relations = [c for c in attributes.columns if c.startswith("relation:")]
    label_sa, valid_sa = _as_bool_matrix(attributes[relations])
    folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
    rows = {}
    for name, x in inputs.items():
        x = np.asarray(x, dtype=np.float64)
        assert x.shape[0] == len(attributes), f"{name}: {x.shape[0]} samples, attributes {len(attributes)} rows"
        row = {}
        for a, rel in enumerate(relations):
            valid = valid_sa[:, a]
            y = label_sa[valid, a].astype(int)
            if min(y.sum(), len(y) - y.sum()) < n_splits:
                row[rel] = np.nan
                continue
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
            p = cross_val_predict(probe, x[valid], y, cv=folds, method="predict_proba")[:, 1]
            row[rel] = roc_auc_score(y, p)
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index", columns=relations)


def _add_best(table: pd.DataFrame, columns: list[str], name_col: str, value_col: str) -> None:
    values = table[columns].to_numpy(dtype=float)
    defined = ~np.isnan(values).all(1)
    best = np.zeros(len(values), dtype=int)
    best[defined] = np.nanargmax(values[defined], axis=1)
    table[name_col] = [columns[b] if d else None for b, d in zip(best, defined, strict=True)]
    table[value_col] = np.where(defined, values[np.arange(len(values)), best], np.nan)


# ---------------------------------------------------------------------------------------------------------------
# Ground-truth check


class Thresholds(NamedTuple):
    """The selection's thresholds, to tell which filter dropped a feature. `cos_max`: the pooled percentile of
    decoder cosine (lib.diffing.pooled_percentile), a number or one value per row of the table."""

    eps: float
    cos_max: float | np.ndarray
    min_odds: float
    min_delta: float


FILTERS = ("visual_energy", "dec_cos", "odds_ratio", "delta_freq", "lexical")
_TABLE_COLUMNS = ("layer", "feature", "visual_energy", "dec_cos", "adapted", "odds_ratio", "delta_freq", "spatial")


def first_failed_filter(table: pd.DataFrame, th: Thresholds) -> pd.Series:
    """For each row, the first filter (in pipeline order, FILTERS) the feature fails, or None if it passes all.
    visual_energy: E_v <= eps; dec_cos: cos > cos_max; odds_ratio: OR < min_odds (NaN fails); delta_freq:
    delta < min_delta; lexical: the lexical flag is False or missing (the filter never ran on it)."""
    fails = {
        "visual_energy": ~(table["visual_energy"].to_numpy() > th.eps),
        "dec_cos": ~(table["dec_cos"].to_numpy() <= np.asarray(th.cos_max)),
        "odds_ratio": ~(table["odds_ratio"].fillna(0).to_numpy() >= th.min_odds),
        "delta_freq": ~(table["delta_freq"].to_numpy() >= th.min_delta),
        "lexical": ~table["lexical"].fillna(False).astype(bool).to_numpy(),
    }
    out = np.full(len(table), None, dtype=object)
    for name in reversed(FILTERS):  # the earliest failing filter is written last
        out[fails[name]] = name
    return pd.Series(out, index=table.index, name="dropped_by")


def _check_flags(table: pd.DataFrame, th: Thresholds) -> None:
    """The table's flags must be what the thresholds say, or the reasons would be wrong."""
    adapted = (table["visual_energy"].to_numpy() > th.eps) & (table["dec_cos"].to_numpy() <= np.asarray(th.cos_max))
    spatial = (table["odds_ratio"].fillna(0).to_numpy() >= th.min_odds) & (
        table["delta_freq"].to_numpy() >= th.min_delta
    )
    for col, expected in (("adapted", adapted), ("spatial", spatial)):
        bad = table[table[col].astype(bool).to_numpy() != expected]
        if len(bad):
            first = bad.iloc[0]
            raise ValueError(
                f"feature table column `{col}` disagrees with the thresholds {th} for {len(bad)} features "
                f"(e.g. layer {int(first.layer)} feature {int(first.feature)}); pass the thresholds that made it"
            )


class GroundTruthCheck(NamedTuple):
    per_feature: pd.DataFrame  # the table joined with the AUROC table, plus `final`, `group`, `dropped_by`
    summary: pd.DataFrame  # per group: n, mean / median / min / max best relation AUROC, share >= min_auroc
    missed: pd.DataFrame  # non-final features whose best relation AUROC >= min_auroc, with `dropped_by`
    missed_by_filter: pd.Series  # counts of `missed.dropped_by` over FILTERS


def ground_truth_check(
    table: pd.DataFrame,
    auroc: pd.DataFrame,
    th: Thresholds,
    n_random: int = 50,
    seed: int = 0,
    min_auroc: float = 0.9,
) -> GroundTruthCheck:
    """Does the selection find features that predict the true relation (METHOD.md, step 3, beyond the paper)?

    `table`: the per-feature table of one variant (columns `_TABLE_COLUMNS` and `lexical`); `auroc`: an
    `auroc_table` with layer and feature columns and `relation:` attributes, over the features to compare (only
    features in both take part). A feature's score is its best relation AUROC. Groups: `final` (adapted, spatial,
    lexical), `random adapted` (n_random adapted features outside the final set) and `random` (n_random features
    outside the final set), drawn with a fixed seed. `missed`: features outside the final set with score >=
    min_auroc, each with the first filter it failed."""
    missing = [c for c in (*_TABLE_COLUMNS, "lexical") if c not in table.columns]
    if missing:
        raise ValueError(f"ground_truth_check: the feature table lacks the columns {missing}")
    if "best_relation_auroc" not in auroc.columns or "layer" not in auroc.columns:
        raise ValueError("ground_truth_check: `auroc` must be an auroc_table with keys and `relation:` attributes")
    _check_flags(table, th)
    merged = table.merge(auroc, on=["layer", "feature"], how="inner", validate="one_to_one")
    merged["final"] = final_set(merged)
    merged["dropped_by"] = first_failed_filter(merged, th)
    assert (merged["dropped_by"].isna() == merged["final"]).all(), "final flag disagrees with the filters"
    rng = np.random.default_rng(seed)
    pools = {
        "final": merged.index[merged["final"]],
        "random adapted": merged.index[merged["adapted"].astype(bool) & ~merged["final"]],
        "random": merged.index[~merged["final"]],
    }
    merged["group"] = None
    picked = {}
    for group, pool in pools.items():
        if group != "final" and len(pool) > n_random:
            pool = pd.Index(np.sort(rng.choice(pool, size=n_random, replace=False)))
        picked[group] = pool
    relations = [c for c in auroc.columns if c.startswith("relation:")]
    rows = []
    for group, idx in picked.items():
        score = merged.loc[idx, "best_relation_auroc"]
        rows.append(
            {
                "group": group,
                "n": len(idx),
                "mean": score.mean(),
                "median": score.median(),
                "min": score.min(),
                "max": score.max(),
                f"share >= {min_auroc}": (score >= min_auroc).mean() if len(idx) else np.nan,
                **{f"mean {c}": merged.loc[idx, c].mean() for c in relations},
            }
        )
    for group in ("random", "random adapted", "final"):  # a feature in several pools is labelled by the narrowest
        merged.loc[picked[group], "group"] = group
    missed = merged[~merged["final"] & (merged["best_relation_auroc"] >= min_auroc)]
    counts = missed["dropped_by"].value_counts().reindex(list(FILTERS), fill_value=0)
    return GroundTruthCheck(merged, pd.DataFrame(rows), missed.reset_index(drop=True), counts)


# ---------------------------------------------------------------------------------------------------------------
# Auto-interp from ground truth


class Description(NamedTuple):
    attribute: str | None
    text: str
    precision: float  # share of the description samples with the attribute
    base_rate: float  # share of all samples with the attribute
    expected_f1: float  # 2p / (1 + p + q): the F1 the scoring rule gives in expectation (see describe_feature)
    described: list[int]  # sample indices the description was made from
    heldout: list[int]  # the held-out positives, never looked at


def describe_feature(
    attributes: pd.DataFrame, top_indices: Sequence[int], n_heldout: int = 5, candidates: Sequence[str] | None = None
) -> Description:
    """A one-sentence description of a feature from its top samples (descending order), the last `n_heldout` of
    them held out for scoring (the authors describe from ranks 1-5 and score on ranks 6-10).

    The attribute chosen maximises 2p / (1 + p + q), p its share among the description samples, q its share among
    all samples (<NA> counts as absent): with n held-out positives at rate p and n random negatives at rate q, the
    expected counts are TP = np, FN = n(1 - p), FP = nq, so this is the F1 the scoring rule expects. It prefers
    attributes that are common among the top samples and rare elsewhere. Ties: the lower base rate, then the
    column order."""
    top = [int(i) for i in top_indices]
    if len(top) <= n_heldout:
        raise ValueError(f"describe_feature needs more than n_heldout = {n_heldout} top samples, got {len(top)}")
    described, heldout = top[: len(top) - n_heldout], top[len(top) - n_heldout :]
    cols = list(candidates) if candidates is not None else list(attributes.columns)
    label = attributes[cols].fillna(False).astype(bool)
    p = label.iloc[described].mean().to_numpy()
    q = label.mean().to_numpy()
    score = 2 * p / (1 + p + q)
    best = np.lexsort((np.arange(len(cols)), q, -score))[0]
    return Description(
        cols[best],
        describe_attribute(cols[best]),
        float(p[best]),
        float(q[best]),
        float(score[best]),
        described,
        heldout,
    )


def f1_score(pred: Sequence[int], label: Sequence[int]) -> float:
    """F1 = 2 TP / (2 TP + FP + FN); 0 when there is nothing to score (no positive predicted or present)."""
    pred, label = np.asarray(pred, dtype=bool), np.asarray(label, dtype=bool)
    tp, fp, fn = (pred & label).sum(), (pred & ~label).sum(), (~pred & label).sum()
    return float(2 * tp / (2 * tp + fp + fn)) if (2 * tp + fp + fn) else 0.0


def random_negatives(n_samples: int, exclude: Sequence[int], n: int, seed: int | Sequence[int]) -> list[int]:
    """`n` distinct random samples outside `exclude` (the feature's top samples), as the authors draw negatives:
    random data-set rows, labelled negative whatever the feature does on them."""
    pool = np.setdiff1d(np.arange(n_samples), np.asarray(list(exclude), dtype=int))
    assert len(pool) >= n, f"only {len(pool)} samples outside the top samples; {n} negatives asked"
    return sorted(int(i) for i in np.random.default_rng(seed).choice(pool, size=n, replace=False))


class Score(NamedTuple):
    f1: float
    tp: int
    fp: int
    fn: int
    tn: int


def score_description(
    attributes: pd.DataFrame, attribute: str, positives: Sequence[int], negatives: Sequence[int]
) -> Score:
    """The description predicts a sample positive if the sample has the attribute (<NA>: absent). Positives are the
    held-out top samples, negatives the random samples."""
    has = attributes[attribute].fillna(False).astype(bool).to_numpy()
    pred = np.concatenate([has[list(positives)], has[list(negatives)]])
    label = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    return Score(
        f1_score(pred, label),
        int((pred & label).sum()),
        int((pred & ~label).sum()),
        int((~pred & label).sum()),
        int((~pred & ~label).sum()),
    )


def auto_interp(
    top: TopSamples,
    attributes: pd.DataFrame,
    features=None,
    n_heldout: int = 5,
    n_negatives: int = 5,
    seed: int = 0,
    candidates: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Describe and score each feature (default: every feature of `top`). Negatives are drawn per feature from a
    generator seeded with (seed, layer, feature), so a feature's score does not depend on which others ran.
    A feature with too few top samples gets no description (NaN F1)."""
    keys = top.keys if features is None else feature_keys(features)
    rows = []
    for layer, feature in keys:
        idx = top.indices((layer, feature))
        row: dict[str, Any] = {"layer": layer, "feature": feature, "n_top": len(idx)}
        if len(idx) > n_heldout:
            d = describe_feature(attributes, idx, n_heldout, candidates)
            neg = random_negatives(len(attributes), idx, n_negatives, seed=[seed, layer, feature])
            s = score_description(attributes, d.attribute, d.heldout, neg)
            row.update(
                attribute=d.attribute,
                description=d.text,
                precision=d.precision,
                base_rate=d.base_rate,
                expected_f1=d.expected_f1,
                **s._asdict(),
                heldout=d.heldout,
                negatives=neg,
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=_AUTO_INTERP_COLUMNS)


_AUTO_INTERP_COLUMNS = [
    "layer", "feature", "n_top", "attribute", "description", "precision", "base_rate", "expected_f1",
    "f1", "tp", "fp", "fn", "tn", "heldout", "negatives",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Optional: an LLM as explainer and classifier (the authors' protocol, for the paper profile). Off by default:
# nothing here runs unless a caller asks for it with a configuration from the environment. No dependency: the
# OpenAI-compatible chat-completions endpoint is called with urllib.

LLM_ENV = {
    "enable": "BOOK_LLM",  # must be "1": the opt-in
    "base_url": "BOOK_LLM_BASE_URL",  # default https://api.openai.com/v1
    "model": "BOOK_LLM_MODEL",  # default gpt-4o-mini (the authors' model)
    "api_key": "BOOK_LLM_API_KEY",  # falls back to OPENAI_API_KEY
}

EXPLAIN_SYSTEM = (
    "You are analyzing a feature of a vision-language model using its top activating samples, each an image and a "
    "prompt; tokens where the feature fires are marked with [[ ]].\n"
    "Task: produce a concise ONE SENTENCE description that completes the phrase 'this feature activates for ...'.\n"
    "Focus on consistent visual-spatial patterns (objects, parts, relations, configurations); be specific; one short "
    'lower-case sentence, no hedging. Return strict JSON only: {"description": "..."}'
)
CLASSIFY_SYSTEM = (
    "You are validating a feature description by reviewing examples, each an image and a prompt.\n"
    "For each sample, output 1 if the description is supported by it, otherwise 0.\n"
    'Return strict JSON only: {"classifications": [<0 or 1 per sample, in order>]}'
)


@dataclass(frozen=True)
class LLMConfig:
    base_url: str
    model: str
    api_key: str
    timeout_s: float = 120.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LLMConfig | None:
        """The configuration if the environment opts in (BOOK_LLM=1 and a key), otherwise None."""
        env = os.environ if environ is None else environ
        if env.get(LLM_ENV["enable"]) != "1":
            return None
        key = env.get(LLM_ENV["api_key"]) or env.get("OPENAI_API_KEY")
        if not key:
            raise ValueError(f"{LLM_ENV['enable']}=1 but neither {LLM_ENV['api_key']} nor OPENAI_API_KEY is set")
        return cls(
            env.get(LLM_ENV["base_url"], "https://api.openai.com/v1").rstrip("/"),
            env.get(LLM_ENV["model"], "gpt-4o-mini"),
            key,
        )


class Example(NamedTuple):
    image: Any  # HxWx3 uint8 array or PIL image
    text: str  # the prompt, activating tokens marked (`mark_tokens`)


def mark_tokens(tokens: Sequence[str], acts: Sequence[float], threshold: float = 0.0) -> str:
    """The prompt as text with every token whose activation exceeds `threshold` marked [[like this]]."""
    marked = [f"[[{t}]]" if float(a) > threshold else t for t, a in zip(tokens, acts, strict=True)]  # NaN: unmarked
    return " ".join(marked)


def _image_url(image) -> str:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _examples_content(examples: Sequence[Example]) -> list[dict]:
    content = []
    for i, ex in enumerate(examples):
        content.append({"type": "text", "text": f"Sample {i + 1}. Prompt: {ex.text}"})
        content.append({"type": "image_url", "image_url": {"url": _image_url(ex.image)}})
    return content


def _urllib_post(url: str, headers: dict, payload: dict, timeout_s: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def _chat(config: LLMConfig, system: str, content: list[dict], transport: Callable | None) -> dict:
    """One chat completion in JSON mode; returns the parsed JSON object of the answer."""
    payload = {
        "model": config.model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
        "temperature": 0.0,
        "max_tokens": 400,
        "response_format": {"type": "json_object"},
    }
    headers = {"Authorization": f"Bearer {config.api_key}", "Content-Type": "application/json"}
    reply = (transport or _urllib_post)(f"{config.base_url}/chat/completions", headers, payload, config.timeout_s)
    try:
        return json.loads(reply["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config.base_url}: not a chat completion holding a JSON object: {str(reply)[:300]}") from e


def llm_explainer(examples: Sequence[Example], config: LLMConfig, transport: Callable | None = None) -> str:
    """A one-sentence description of a feature from its top examples, written by an LLM (opt-in, see LLMConfig)."""
    answer = _chat(config, EXPLAIN_SYSTEM, _examples_content(examples), transport)
    description = str(answer.get("description", "")).strip()
    if not description:
        raise ValueError(f"the LLM returned no description: {answer}")
    return description


def llm_classifier(
    description: str, examples: Sequence[Example], config: LLMConfig, transport: Callable | None = None
) -> list[int]:
    """Per example, 1 if the LLM judges the description to fit it (the scorer of the authors' protocol: feed it the
    held-out positives and random negatives in a shuffled order, then `f1_score`)."""
    content = [{"type": "text", "text": f"Feature description: {description}"}, *_examples_content(examples)]
    labels = [int(x) for x in _chat(config, CLASSIFY_SYSTEM, content, transport).get("classifications", [])]
    if len(labels) != len(examples) or not set(labels) <= {0, 1}:
        raise ValueError(f"the LLM classified {len(labels)} of {len(examples)} examples: {labels}")
    return labels


# ---------------------------------------------------------------------------------------------------------------
# Panels: a sample's image with activating patches, its prompt with activating tokens


class Trace(NamedTuple):
    """One feature on one (image, prompt): `patch_acts_yx` on the patch grid, `token_acts` per prompt token (the
    image span is one "<image>" token with NaN activation; BOS is left out)."""

    image: Any
    patch_acts_yx: torch.Tensor
    tokens: list[str]
    token_acts: torch.Tensor


@torch.no_grad()
def feature_trace(vlm: VLM, encode: Callable, layer: int, feature: int, image, question: str) -> Trace:
    """Activations of feature `feature` of layer `layer` over every position of one sample."""
    batch = prepare(vlm, [image], [question])
    x_sd = capture(vlm, batch, resid_layers=[layer]).resid[resid_name(layer)][0]
    keep_s = batch.keep_bs[0]
    z_s = torch.zeros(x_sd.shape[0])
    z_s[keep_s.cpu()] = _encode_columns(encode, x_sd[keep_s], torch.tensor([feature]), 4096)[:, 0]
    image_s = batch.image_mask_bs[0].cpu()
    patch_n = z_s[image_s]
    side = math.isqrt(len(patch_n))
    if side * side != len(patch_n) and math.isqrt(len(patch_n) - 1) ** 2 == len(patch_n) - 1:
        patch_n, side = patch_n[1:], math.isqrt(len(patch_n) - 1)  # a leading CLS token ("full" strategy)
    assert side * side == len(patch_n), f"{len(patch_n)} image tokens do not form a square patch grid"
    tokens, acts, seen_image = [], [], False
    ids = batch.input_ids_bs[0].cpu()
    for s in range(int(batch.lengths_b[0])):
        if image_s[s]:
            if not seen_image:
                tokens.append("<image>")
                acts.append(math.nan)
                seen_image = True
        elif keep_s[s]:
            tokens.append(vlm.tokenizer.decode([int(ids[s])]).strip() or repr(vlm.tokenizer.decode([int(ids[s])])))
            acts.append(float(z_s[s]))
    return Trace(image, patch_n.reshape(side, side), tokens, torch.tensor(acts))


def draw_feature_panel(
    ax_img,
    ax_txt,
    image,
    patch_acts,
    tokens: Sequence[str],
    token_acts,
    title: str = "",
    vmax: float | None = None,
    cmap: str = "viridis",
    fontsize: float = 9,
):
    """The image with a per-patch overlay (colour and opacity grow with the activation; patches where the feature
    fires are outlined) and the prompt's tokens on backgrounds shaded by activation, wrapped to the axes' width.
    One colour scale (0 to `vmax`, default the largest activation shown) serves both, so image and text compare.
    NaN activations (the image placeholder) get an outline and no shading."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    img = np.asarray(image)
    acts_yx = np.asarray(patch_acts, dtype=float)
    if acts_yx.ndim == 1:
        side = math.isqrt(len(acts_yx))
        assert side * side == len(acts_yx), f"{len(acts_yx)} patch activations do not form a square grid"
        acts_yx = acts_yx.reshape(side, side)
    tok_acts = np.asarray(token_acts, dtype=float)
    assert len(tokens) == len(tok_acts), f"{len(tokens)} tokens, {len(tok_acts)} activations"
    if vmax is None:
        vmax = float(np.nanmax(np.r_[acts_yx.ravel(), tok_acts, 0.0]))
    vmax = vmax if vmax > 0 else 1.0
    cm = colormaps[cmap]
    h, w = img.shape[:2]
    ax_img.imshow(img, extent=(0, w, h, 0), interpolation="nearest")
    level_yx = np.clip(acts_yx / vmax, 0, 1)
    overlay = cm(level_yx)
    overlay[..., 3] = 0.75 * level_yx  # transparent where the feature is silent, so the image shows through
    ax_img.imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
    ph, pw = h / acts_yx.shape[0], w / acts_yx.shape[1]
    for y, x in zip(*np.nonzero(acts_yx > 0), strict=True):
        ax_img.add_patch(Rectangle((x * pw, y * ph), pw, ph, fill=False, lw=0.8, ec="white"))
    ax_img.set_xlim(0, w)
    ax_img.set_ylim(h, 0)
    ax_img.set_xticks([])
    ax_img.set_yticks([])
    if title:
        ax_img.set_title(title, fontsize=fontsize + 1)

    # Token flow layout in points from the axes' top-left corner, each token measured with the figure's renderer:
    # gaps and line height stay fixed when a later tight/constrained layout resizes the axes (only the wrap width,
    # taken now, would then be slightly off).
    ax_txt.set_axis_off()
    fig = ax_txt.figure
    renderer = fig.canvas.get_renderer()
    to_pt = 72.0 / fig.dpi
    width_pt = ax_txt.get_window_extent(renderer).width * to_pt
    gap_pt, line_pt = 0.6 * fontsize, 2.0 * fontsize
    x, y = 0.0, 0.0
    for tok, a in zip(tokens, tok_acts, strict=True):
        style = dict(boxstyle="round,pad=0.2", lw=0.6)
        if a == a:  # not NaN
            level = min(max(a / vmax, 0.0), 1.0)
            fc = cm(level) if a > 0 else (1.0, 1.0, 1.0, 1.0)
            style.update(fc=fc, ec="none")
            color = "black" if 0.299 * fc[0] + 0.587 * fc[1] + 0.114 * fc[2] > 0.5 else "white"  # readable on fc
        else:
            style.update(fc="white", ec="0.5")
            color = "0.3"
        text = ax_txt.annotate(
            tok,
            xy=(0, 1),
            xycoords="axes fraction",
            xytext=(x, -y),
            textcoords="offset points",
            va="top",
            ha="left",
            fontsize=fontsize,
            color=color,
            bbox=style,
        )
        w_pt = text.get_window_extent(renderer).width * to_pt
        if x > 0 and x + w_pt > width_pt:
            x, y = 0.0, y + line_pt
            text.set_position((x, -y))
        x += w_pt + gap_pt
    return ax_img, ax_txt


# ---------------------------------------------------------------------------------------------------------------
# Figures of chapter 5


def plot_volcano(table: pd.DataFrame, min_odds: float, min_delta: float):
    """log2 odds ratio vs -log10 BH-adjusted p per feature; spatial candidates (OR and delta thresholds) in
    colour, adapted ones outlined."""
    import matplotlib.pyplot as plt

    t = table[np.isfinite(table.odds_ratio) & (table.odds_ratio > 0)]
    x = np.log2(t.odds_ratio)
    y = -np.log10(t.p_adj.clip(lower=1e-300))
    fig, ax = plt.subplots(figsize=(6, 4))
    sp = t.spatial.astype(bool).to_numpy()
    ax.scatter(x[~sp], y[~sp], s=5, color="0.7", label="other", rasterized=True)
    ax.scatter(x[sp], y[sp], s=12, color="#9467bd", label=f"spatial (OR ≥ {min_odds:g}, Δfreq ≥ {min_delta:g})")
    both = sp & t.adapted.astype(bool).to_numpy()
    ax.scatter(x[both], y[both], s=40, facecolor="none", edgecolor="#ff7f0e", linewidth=1.2, label="… and adapted")
    ax.axvline(np.log2(min_odds), color="k", ls="--", lw=1)
    n_inf = int((~np.isfinite(table.odds_ratio) & (table.odds_ratio > 0)).sum())
    ax.set_xlabel(
        "log2 odds ratio (spatial vs general questions)" + (f"; {n_inf} with OR = ∞ not shown" if n_inf else "")
    )
    ax.set_ylabel("−log10 BH-adjusted p")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_auroc_groups(per_feature: pd.DataFrame):
    """Best relation AUROC of the final features vs random adapted and random features (strip + box)."""
    import matplotlib.pyplot as plt

    groups = ["final", "random adapted", "random"]
    data = [per_feature.loc[per_feature.group == g, "best_relation_auroc"].dropna().to_numpy() for g in groups]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.boxplot([d if len(d) else [np.nan] for d in data], widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=10, alpha=0.7)
    ax.set_xticks(range(1, len(groups) + 1), [f"{g}\n(n={len(d)})" for g, d in zip(groups, data, strict=True)])
    ax.axhline(0.5, color="k", ls=":", lw=1)
    ax.set_ylabel("best AUROC for the true relation")
    ax.set_ylim(0.3, 1.02)
    fig.tight_layout()
    return fig
