"""Spatial probing, firing statistics (METHOD.md, step 3): which features fire more often on spatial questions than
on general ones, and the selection flags built on that.

Per feature, how often it fires (z > 0) on the text positions of spatial questions against general ones
(`FiringCounts`, `firing_counts`, `spatial_table`): a one-sided Fisher exact test on
[[c_sp, n_sp - c_sp], [c_gen, n_gen - c_gen]], the odds ratio, delta frequency and Benjamini-Hochberg p-values
(`fisher_table`). `select_spatial` flags the spatial candidates, `final_set` the final features (adapted, spatial and
lexical), and `per_layer_counts` counts each flag per layer.

Shape key: n = tokens, f = SAE features. Masks taken from a `lib.kernels.adapter.Batch` keep the adapter's suffixes
(`text_bs`: b sequences x s positions); `spatial_s` has one flag per sample s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from lib.kernels.adapter import VLM, iter_batches, resid_stream
from lib.kernels.probing import SampleSet

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
