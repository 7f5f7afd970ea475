"""Figures of the diffing chapter (chapter 4): the per-feature table (`lib.kernels.diffing.feature_table`, one row per
layer x variant x feature) and tables made from it in, a matplotlib `Figure` out. No torch here.

- `plot_cosine_by_layer`: median decoder cosine, base vs adapted, per layer and variant.
- `plot_cosine_histograms`: per layer, the cosine distribution of one variant with the selection threshold.
- `plot_central_scatter`: visual energy against decoder cosine, adapted features highlighted (chapter 5 overlays its
  own selections on it).
- `plot_adapted_per_layer`: adapted features per layer.
- `plot_robustness`: the selection over a grid of thresholds.
- `plot_ratio_by_layer`: image / text activation ratio of the adapted features per layer.
- `plot_image_dependence`: the organism's ground truth, adapted features against the rest.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lib.figures.style import variant_color
from lib.names import ADAPTED_COLOR, VARIANT_COLORS


def plot_cosine_by_layer(table: pd.DataFrame) -> Figure:
    """Median decoder cosine (base vs adapted) per layer, one line per variant, band = interquartile range."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for variant, rows in table.groupby("variant", sort=False):
        q = rows.groupby("layer").dec_cos.quantile([0.25, 0.5, 0.75]).unstack()
        color = variant_color(variant)
        ax.plot(q.index, q[0.5], marker="o", ms=3, label=variant, color=color)
        ax.fill_between(q.index, q[0.25], q[0.75], alpha=0.15, color=color)
    ax.set_xlabel("layer")
    ax.set_ylabel("decoder cosine, base vs adapted")
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    ax.set_ylim(-0.1, 1.05)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_cosine_histograms(table: pd.DataFrame, cos_max: float) -> Figure:
    """Per layer, the distribution of decoder cosine of one variant (drawn in the text-only variant's colour, the
    variant the book follows), with the pooled percentile threshold."""
    layers = sorted(table.layer.unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(2.4 * len(layers), 2.6), sharey=True, squeeze=False)
    bins = np.linspace(min(table.dec_cos.min(), 0), 1, 41)
    for ax, layer in zip(axes[0], layers, strict=True):
        ax.hist(table[table.layer == layer].dec_cos, bins=bins, color=VARIANT_COLORS["text-only"], alpha=0.8)
        ax.axvline(cos_max, color="k", ls="--", lw=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("decoder cosine")
    axes[0, 0].set_ylabel("features")
    fig.tight_layout()
    return fig


def plot_central_scatter(table: pd.DataFrame, eps: float, cos_max: float, overlays: dict | None = None) -> Figure:
    """Every feature of one variant: x visual energy (log scale), y decoder cosine. Grey: all; orange: adapted;
    `overlays` {label: (boolean mask over the table's rows, colour, marker)} drawn on top in order."""
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    x = table.visual_energy.clip(lower=1e-6)
    ax.scatter(x, table.dec_cos, s=4, color="0.75", label="all features", rasterized=True)
    adapted = table.adapted.astype(bool)
    ax.scatter(x[adapted], table.dec_cos[adapted], s=9, color=ADAPTED_COLOR, label="adapted")
    for label, (mask, color, marker) in (overlays or {}).items():
        mask = np.asarray(mask, dtype=bool)
        ax.scatter(
            x[mask],
            table.dec_cos[mask],
            s=40,
            color=color,
            marker=marker,
            label=label,
            edgecolor="k",
            linewidth=0.5,
            zorder=3,
        )
    ax.axvline(eps, color="k", ls=":", lw=1)
    ax.axhline(cos_max, color="k", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("visual energy $E_v$ (share of squared activation on image tokens)")
    ax.set_ylabel("decoder cosine, base vs adapted")
    ax.legend(frameon=False, fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def plot_adapted_per_layer(per_layer: pd.DataFrame) -> Figure:
    """Adapted features per layer, from a table with columns `layer` and `adapted` (counts)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(per_layer.layer, per_layer.adapted, color=ADAPTED_COLOR)
    ax.set_xlabel("layer")
    ax.set_ylabel("adapted features")
    ax.set_xticks(per_layer.layer)
    fig.tight_layout()
    return fig


def plot_robustness(sweep: pd.DataFrame) -> Figure:
    """Heatmaps over eps x q of the selected count, the Jaccard index with the default set and the correlation of
    per-layer counts."""
    import seaborn as sns

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (col, fmt, title) in zip(
        axes,
        [
            ("selected", "d", "features selected"),
            ("jaccard", ".2f", "Jaccard with default"),
            ("layer_corr", ".2f", "corr. of per-layer counts"),
        ],
        strict=True,
    ):
        grid = sweep.pivot(index="eps", columns="q", values=col)
        sns.heatmap(grid, annot=True, fmt=fmt, cmap="viridis", ax=ax, cbar=False, annot_kws={"fontsize": 8})
        ax.set_title(title)
        ax.set_xlabel("q (cosine percentile)")
        ax.set_ylabel("ε (visual energy)")
    fig.tight_layout()
    return fig


def plot_ratio_by_layer(table: pd.DataFrame) -> Figure:
    """Image / text mean |z| ratio of the adapted (rotated, visual) features per layer, log scale."""
    rows = table[table.adapted.astype(bool)]
    layers = sorted(table.layer.unique())
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    data = [rows[rows.layer == layer].img_txt_ratio.clip(lower=1e-3).to_numpy() for layer in layers]
    ax.boxplot([d if len(d) else [np.nan] for d in data], positions=layers, widths=0.5)
    ax.axhline(1, color="k", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean |z| image / text")
    fig.tight_layout()
    return fig


def plot_image_dependence(table: pd.DataFrame) -> Figure:
    """Image dependence of adapted vs other features (cumulative distributions)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for label, mask, color in (("adapted", table.adapted, ADAPTED_COLOR), ("not adapted", ~table.adapted, "0.5")):
        v = np.sort(table.image_dependence[mask.astype(bool)].to_numpy())
        if len(v):
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=f"{label} ({len(v)})", color=color)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("image dependence: Σ|z − z(mean image)| / Σ|z|")
    ax.set_ylabel("share of features ≤ x")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
