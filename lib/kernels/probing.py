"""Spatial probing, shared part (METHOD.md, step 3): the types the probing modules share (feature keys, sample sets,
top samples, activation matrices) and the streamed read-outs of SAE features over samples.

- `SampleSet`, `FeatureKey`, `feature_keys`, `all_features`: what is probed, and on which rows.
- `position_mask`, `sequence_max`: per sequence, each feature's maximum activation over a named set of positions.
- `RunningTopN`, `top_samples`, `TopSamples`: per feature, the N samples with the highest maximum activation over
  the TEXT positions of their own question (real non-image tokens, BOS excluded), as the authors' sample extraction
  does for the text-only SAE. Streaming: a running top-N per feature, never the activations of the whole data set.
  Only samples on which the feature fires (max > 0) count; a feature that fires on fewer has a shorter list.
- `FeatureMatrix`: one activation per sample and feature (made by
  `lib.kernels.ground_truth.feature_activations_under_prompts`); `top_from_matrix` reads top samples from one.
- `feature_trace`: one feature over every position of one sample (the data of the auto-interp panels).

The step's other concerns each have a module beside this one: `spatial_stats` (firing counts, the Fisher test, the
selection flags), `lexical` (the lexical filter), `ground_truth` (scene attributes, AUROC, the ground-truth check),
`autointerp` (descriptions and their F1) and `llm_client` (the optional LLM explainer). Figures: `lib.figures.probing`.

Shape key: n = tokens, f = SAE features (or (layer, feature) columns), s = samples (data-set rows), p = prompts,
k = top-N rank, y / x = patch-grid rows / columns. Masks taken from a `lib.kernels.adapter.Batch` keep the adapter's
suffixes there (`keep_bs`: b sequences x s positions); everywhere else in this module s is a sample.

An SAE enters as one encode callable per layer, `encode(x_nd) -> z_nf` (SAELens' `SAE.encode` has this signature),
applied to `blocks.{L}.hook_resid_post`. Activations are non-negative (ReLU, TopK and JumpReLU SAEs all are), so a
maximum starts at 0 and "fires" means > 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import pandas as pd
import torch

from lib.kernels.adapter import VLM, Batch, capture, iter_batches, prepare, resid_name, resid_stream
from lib.sources import world as W

# ---------------------------------------------------------------------------------------------------------------
# Samples and feature keys

FeatureKey = tuple[int, int]  # (layer, feature)
Positions = Literal["text", "all", "image", "post_image"]
Reading = Literal["all", "image", "post_image"]
READINGS: tuple[Reading, ...] = ("all", "image")  # the paper's two readings: what the lexical step computes
# A third reading, asked for by name (lib.kernels.lexical.lexical_filter's `readings`): the prompt text after the
# image, the only positions that can see the swapped prompt's words (chapter 7).
ALL_READINGS: tuple[Reading, ...] = ("all", "image", "post_image")


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
# A feature x sample matrix (`lib.kernels.ground_truth.feature_activations_under_prompts` makes one)


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


# ---------------------------------------------------------------------------------------------------------------
# One feature over every position of one sample (the data of the panels in lib.figures.probing)


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
    rows, cols = (int(v) for v in batch.image_grid_b2[0])
    patch_n = patch_n[len(patch_n) - rows * cols :]  # a leading CLS token ("full" strategy) is not on the grid
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
    return Trace(image, patch_n.reshape(rows, cols), tokens, torch.tensor(acts))
