"""Figures of chapter 7's lexical test and emergence (lib.kernels.counterfactual, lib.kernels.emergence): tables in,
a matplotlib `Figure` out.

- `plot_prompt_spread`: per reading of the lexical filter, how much the prompt changes a feature's activation.
- `plot_swap_sensitivity`: per feature, how far the object swap and the word swap move it, by class, with the
  paper's final set and the reference set marked.
- `plot_emergence`: per reference feature, its score in the VLM against the same-index base feature's on the base LM.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

CLASS_COLORS = {"spatial": "#1f77b4", "lexical": "#d62728", "insensitive": "#999999", "silent": "#dddddd"}
VERDICT_COLORS = {"reused": "#2ca02c", "new": "#ff7f0e"}
READING_LABELS = {"all": "all (image + text)", "image": "image tokens", "post_image": "text after the image"}


def plot_prompt_spread(spread: pd.DataFrame, title: str = "") -> Figure:
    """Box and strip of the spread (max - min over prompts) per reading (`prompt_spread`'s first table)."""
    readings = [r for r in READING_LABELS if r in set(spread.reading)]
    data = [spread.loc[spread.reading == r, "spread"].to_numpy() for r in readings]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.boxplot([d if len(d) else [np.nan] for d in data], widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=4, alpha=0.35, color="#1f77b4", rasterized=True)
    labels = [f"{READING_LABELS[r]}\n{(d > 0).mean():.0%} > 0" for r, d in zip(readings, data, strict=True)]
    ax.set_xticks(range(1, len(readings) + 1), labels)
    ax.set_ylabel("spread of max activation over prompts")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_swap_sensitivity(
    classified: pd.DataFrame, marks: Mapping[str, pd.DataFrame], ratio: float, min_sensitivity: float
) -> Figure:
    """One panel per position: s_image (x) against s_word (y) of every feature that fires there, coloured by class;
    `marks` {label: a table with `layer` and `feature`} mark a set (e.g. the paper's final set, the reference set);
    the dashed line is the lexical rule's s_word = ratio x s_image, the dotted lines its minimum sensitivity."""
    pairs = pd.MultiIndex.from_arrays([classified.layer, classified.feature])
    positions = list(dict.fromkeys(classified.position))
    fig, axes = plt.subplots(1, len(positions), figsize=(5.4 * len(positions), 5.2), squeeze=False)
    floor = 1e-3
    ring_styles = [("*", "k", 70), ("o", "#9467bd", 60), ("s", "#8c564b", 50)]
    for ax, position in zip(axes[0], positions, strict=True):
        rows = (classified.position == position) & (classified["class"] != "silent")
        t = classified[rows]
        x, y = t.s_image.fillna(0).clip(lower=floor), t.s_word.fillna(0).clip(lower=floor)
        for cls, color in CLASS_COLORS.items():
            m = (t["class"] == cls).to_numpy()
            if m.any():
                ax.scatter(x[m], y[m], s=6, color=color, alpha=0.6, label=f"{cls} ({m.sum()})", rasterized=True)
        for (label, members), (marker, color, size) in zip(marks.items(), ring_styles, strict=False):
            inside = pairs.isin(pd.MultiIndex.from_arrays([members.layer, members.feature]))
            m = inside[rows.to_numpy()]
            if m.any():
                face = color if marker == "*" else "none"
                ax.scatter(
                    x[m],
                    y[m],
                    s=size,
                    marker=marker,
                    facecolor=face,
                    edgecolor=color,
                    lw=1,
                    label=f"{label} ({m.sum()})",
                )
        grid = np.logspace(np.log10(floor), np.log10(3), 50)
        ax.plot(grid, np.clip(ratio * grid, floor, None), "k--", lw=1, label=f"s_word = {ratio:g} × s_image")
        ax.axvline(min_sensitivity, color="0.4", ls=":", lw=1)
        ax.axhline(min_sensitivity, color="0.4", ls=":", lw=1)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlim(floor * 0.8, 3.5), ax.set_ylim(floor * 0.8, 3.5)
        ax.set_xlabel("object swap: mean |Δz| / mean z")
        ax.set_ylabel("word swap: mean |Δz| / mean z")
        n_silent = int(((classified.position == position) & (classified["class"] == "silent")).sum())
        ax.set_title(f"{position} ({n_silent} silent features not shown; 0 drawn at {floor:g})", fontsize=10)
        ax.legend(frameon=False, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    return fig


def plot_emergence(table: pd.DataFrame, threshold: float) -> Figure:
    """Per reference feature: base score for the same relation (x) against its score in the VLM (y), coloured by
    verdict, labelled L{layer}F{feature}; the dotted line is the threshold of both."""
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for verdict, color in VERDICT_COLORS.items():
        t = table[table.verdict == verdict]
        ax.scatter(t.base_score, t.adapted_score, s=30, color=color, label=f"{verdict} ({len(t)})", zorder=3)
    # One label per point drawn: features at the same place share it.
    names = table.assign(name=[f"L{r.layer}F{r.feature}" for r in table.itertuples()])
    for _, group in names.groupby([names.base_score.round(2), names.adapted_score.round(2)]):
        n = list(group.name)
        label = "\n".join(", ".join(n[i : i + 3]) for i in range(0, len(n), 3))
        at = (group.base_score.iloc[0], group.adapted_score.iloc[0])
        ax.annotate(label, at, fontsize=6, alpha=0.8, xytext=(5, 0), textcoords="offset points", va="center")
    ax.axvline(threshold, color="k", ls=":", lw=1)
    ax.axhline(threshold, color="k", ls=":", lw=1)
    ax.set_xlim(0.45, 1.25)
    ax.set_ylim(min(threshold, float(table.adapted_score.min()) if len(table) else threshold) - 0.01, 1.005)
    ax.set_xlabel("base SAE on the base LM, caption in words (same feature, same relation)")
    ax.set_ylabel("adapted SAE on the VLM (relation score)")
    ax.legend(frameon=False, fontsize=8, loc="center right")
    fig.tight_layout()
    return fig
