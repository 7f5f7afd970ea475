"""Spatial probing, the lexical filter (METHOD.md, step 3): does a candidate feature read the image, or only the
spatial words of the question?

Each top sample's image is run again with its question replaced by each direction-free prompt. Per (sample, prompt)
the feature's maximum activation is taken over two position sets, the two readings of the source: "all" (every real
token but BOS: image and prompt text) and "image" (the image tokens only). Rule (the authors' code): for each top
sample take the best prompt; the feature survives if that best activation exceeds the threshold (0.01) for EVERY top
sample. `prompt_rule="every"` asks for every prompt instead (stricter; the wording of `lexical_survivors`'
docstring). The book uses the "all" reading, which is what the authors' code tests (their pass flag reads
`max_all`); the "image" reading is shown beside it: it keeps only features that fire on image tokens, so it drops
features that respond to the image only at text positions. A third reading, "post_image" (the prompt text after
the image), is computed when asked for (`readings=ALL_READINGS`): under causal attention the image tokens never see
the prompt, so it is the only reading in which the swapped words can change anything (chapter 7).

Shape key: s = top samples (by rank), p = prompts, b = sequences of a batch, f = (layer, feature) columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

import pandas as pd
import torch

from lib.kernels.adapter import VLM, prepare
from lib.kernels.probing import (
    ALL_READINGS,
    READINGS,
    FeatureKey,
    Reading,
    SampleSet,
    TopSamples,
    feature_keys,
    sequence_max,
    top_samples,
)
from lib.sources import world as W


def lexical_survivors(max_act_sp: torch.Tensor, threshold: float) -> torch.Tensor:
    """The lexical filter's rule. `max_act_sp[s, p]`: a feature's maximum activation on top sample s when its
    question is replaced by direction-free prompt p. The feature survives only if it still fires (> threshold)
    for every top sample under every prompt, i.e. it does not merely read spatial words."""
    assert max_act_sp.ndim == 2 and max_act_sp.numel() > 0, "need at least one top sample and one prompt"
    return bool((max_act_sp > threshold).all())


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
    readings: Sequence[Reading] = READINGS,
) -> LexicalResult:
    """The lexical filter under both readings (module docstring).

    `prompts` are question texts: each goes through `vlm.prompt` exactly as a question does, so the organism gets
    `lib.sources.world.vlm_prompt(prompt)` and the paper's VLM its own chat template (pass `PAPER_GENERIC_PROMPTS`
    there).
    `top`: top samples computed earlier (default: `top_samples(..., top_n, positions="text")`).
    Each distinct (top sample, prompt) pair runs once, whatever the number of features sharing the sample.
    `readings`: the position sets read (default the paper's two; `ALL_READINGS` adds "post_image"). Every reading is a
    subset of "all", so adding one changes neither the forward pass nor the other readings' values."""
    readings = tuple(readings)
    if any(r not in ALL_READINGS for r in readings) or not set(READINGS) <= set(readings):
        raise ValueError(f"readings = {readings!r}: expected {READINGS} and any of {ALL_READINGS}")
    if reading not in readings:
        raise ValueError(f"reading = {reading!r}: expected one of {readings}")
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
    max_sp = {r: {key: torch.zeros(len(lists[key]), len(prompts)) for key in keys} for r in readings}
    unique = sorted(owners)
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        images = [samples.images[i] for i in chunk]
        for p, prompt in enumerate(prompts):
            batch = prepare(vlm, images, [prompt] * len(chunk))
            max_bf = sequence_max(vlm, encode_by_layer, keys, batch, readings)
            for b, i in enumerate(chunk):
                for col, rank in owners[i]:
                    for r in readings:
                        max_sp[r][keys[col]][rank, p] = max_bf[r][b, col]

    def survives(m_sp: torch.Tensor) -> bool:
        if m_sp.shape[0] == 0:  # never fired on its own questions: nothing to keep
            return False
        return lexical_survivors(m_sp.amax(1, keepdim=True) if prompt_rule == "best" else m_sp, threshold)

    rows = []
    for layer, feature in keys:
        row = {"layer": layer, "feature": feature, "n_top": len(lists[(layer, feature)])}
        for r in readings:
            m_sp = max_sp[r][(layer, feature)]
            row[f"min_best_{r}"] = float(m_sp.amax(1).min()) if len(m_sp) else math.nan
            row[f"lexical_{r}"] = survives(m_sp)
        rows.append(row)
    extra = [c for r in readings if r not in READINGS for c in (f"min_best_{r}", f"lexical_{r}")]
    table = pd.DataFrame(rows, columns=[*_LEXICAL_COLUMNS, *extra])
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
