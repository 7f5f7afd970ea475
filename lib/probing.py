"""Spatial probing: which adapted features fire more on spatial questions than on general ones (METHOD.md, step 3).

Shape key: n = tokens, f = SAE features, s = samples.

The controlled shift compares, per feature, how often it fires (z > 0) on the text positions of spatial questions
against general ones: a one-sided Fisher exact test on [[c_sp, n_sp - c_sp], [c_gen, n_gen - c_gen]], the odds
ratio, delta frequency and Benjamini-Hochberg adjusted p-values.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats


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
