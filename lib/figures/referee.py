"""Figures of chapter 7 (the referee): tables in, a Figure out."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lib.names import ADAPTED_COLOR

FINAL_COLOR = "#d62728"


def plot_probes(probes: pd.DataFrame) -> Figure:
    """One heatmap per position class: probe AUROC of each variable (rows) at each layer (columns), the occupancy
    control and the shuffled-label mean as the last two columns."""
    positions = list(dict.fromkeys(probes.position))
    variables = list(dict.fromkeys(probes.variable))
    layers = sorted(probes.layer.unique())
    fig, axes = plt.subplots(1, len(positions), figsize=(4.2 * len(positions), 0.45 * len(variables) + 1.6))
    for ax, pos in zip(np.atleast_1d(axes), positions, strict=True):
        rows = probes[probes.position == pos]
        grid = rows.pivot_table(index="variable", columns="layer", values="auroc").reindex(variables)[layers]
        extra = rows.groupby("variable")[["occupancy", "shuffled"]].mean().reindex(variables)
        values = np.column_stack([grid.to_numpy(), extra.to_numpy()])
        ax.imshow(values, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.8 else "k")
        ax.set_xticks(range(values.shape[1]), [f"L{layer}" for layer in layers] + ["occ.", "shuf."], fontsize=8)
        ax.set_yticks(range(len(variables)), variables, fontsize=8)
        ax.axvline(len(layers) - 0.5, color="w", lw=2)
        ax.set_title(f"{pos} positions", fontsize=10)
        ax.grid(False)
    fig.suptitle("linear probe AUROC (cross-validated); occ.: occupancy-code control, shuf.: shuffled labels")
    fig.tight_layout()
    return fig


def plot_reference(table: pd.DataFrame, min_auroc: float) -> Figure:
    """Left: every feature's relation score against its decoder cosine, the reference set above the line and the
    paper's final set marked. Right: reference features per layer, and how many the final set holds."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
    ax.scatter(table.dec_cos, table.relation_score, s=5, c="0.7", label="feature")
    adapted = table[table.adapted]
    ax.scatter(adapted.dec_cos, adapted.relation_score, s=8, c=ADAPTED_COLOR, label="adapted")
    final = table[table.final]
    ax.scatter(final.dec_cos, final.relation_score, s=40, marker="*", c=FINAL_COLOR, label="final set")
    ax.axhline(min_auroc, ls="--", c="k", lw=1)
    ax.set(xlabel="decoder cosine (base vs adapted)", ylabel="relation score (two-sided AUROC)")
    ax.legend(frameon=False, fontsize=8, loc="lower left")
    layers = sorted(table.layer.unique())
    ref = table[table.reference].groupby("layer").size().reindex(layers, fill_value=0)
    both = table[table.reference & table.final].groupby("layer").size().reindex(layers, fill_value=0)
    bx.bar(layers, ref.to_numpy(), color="#1f77b4", label="reference set")
    bx.bar(layers, both.to_numpy(), color=FINAL_COLOR, label="... in the final set")
    bx.set(xlabel="layer", ylabel="features", xticks=layers)
    bx.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_referee(rows: pd.DataFrame) -> Figure:
    """Precision and recall of the final set against the reference set, one bar pair per choice."""
    labels = [f"{c}: {v}" if i else c for i, (c, v) in enumerate(zip(rows.choice, rows.value, strict=True))]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    ax.barh(y - 0.2, rows.precision.fillna(0), height=0.4, label="precision", color="#1f77b4")
    ax.barh(y + 0.2, rows.recall.fillna(0), height=0.4, label="recall", color="#ff7f0e")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="against the reference set")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
