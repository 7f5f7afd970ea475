"""Figures of the attribution chapter (chapter 6): tables and arrays in, a matplotlib `Figure` out. No torch here: the
chapter converts tensors to numpy before it calls these.

- `plot_layer_profile`: the aggregated head scores summed per layer (with the residual-stream attribution), every
  head, and the best heads ranked; `plot_head_heatmap` and `plot_top_heads` show the last two on their own.
- `plot_validation`: attribution patching against exhaustive activation patching, one panel per pair of columns.
- `plot_attention_overlays`: where chosen heads look in the image, from the answer position.

Shape key: l = layers, h = heads, b = sequences (rows of the overlay figure), y / x = patch-grid rows / columns.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

Head = tuple[int, int]  # (layer, head)


def plot_layer_profile(
    score_lh: np.ndarray,
    layer_profile_l: np.ndarray,
    resid: pd.Series,
    head_table: pd.DataFrame,
    top: Sequence[Head],
    k: int,
) -> Figure:
    """Three panels: per layer, the aggregated head score (bars; NaN layers left out) with the attribution to the
    layer's residual stream (`resid`, indexed by layer) scaled to the same total; the layer x head heatmap of
    `score_lh`; the best max(k, 8) heads of `head_table` (layer, head, score; best first), the `top` ones in red."""
    n_layers, n_heads = score_lh.shape
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), gridspec_kw={"width_ratios": [1, 1.2, 1]})
    valid = np.isfinite(layer_profile_l)
    axes[0].bar(np.arange(n_layers)[valid], layer_profile_l[valid], color="#1f77b4")
    resid_scaled = resid / resid.sum() * np.nansum(layer_profile_l)  # the same total as the bars
    axes[0].plot(resid.index, resid_scaled, "k.--", label="residual stream (scaled)")
    axes[0].set(xlabel="layer", ylabel="aggregated head score", title="layer profile", xticks=range(n_layers))
    axes[0].set_ylim(0, 1.3 * np.nanmax([*layer_profile_l, *resid_scaled]))  # room for the legend
    axes[0].legend(frameon=False, fontsize=8, loc="upper left")
    im = axes[1].imshow(score_lh, aspect="auto", cmap="viridis")
    axes[1].set(xlabel="head", ylabel="layer", title="layer × head", xticks=range(n_heads), yticks=range(n_layers))
    axes[1].grid(False)
    fig.colorbar(im, ax=axes[1])
    best = head_table.head(max(k, 8))
    axes[2].barh(
        [f"L{r.layer}H{r.head}" for r in best.itertuples()][::-1],
        best.score.to_numpy()[::-1],
        color=["#d62728" if (r.layer, r.head) in top else "0.6" for r in best.itertuples()][::-1],
    )
    axes[2].set(xlabel="aggregated score", title=f"top heads (red: the top {k})")
    fig.tight_layout()
    return fig


def plot_head_heatmap(score_lh: np.ndarray) -> Figure:
    """The aggregated attribution score of every head, layers down, heads across (NaN: not scored)."""
    n_layers, n_heads = score_lh.shape
    fig, ax = plt.subplots(figsize=(5, 3.4))
    im = ax.imshow(score_lh, aspect="auto", cmap="viridis")
    ax.set(xlabel="head", ylabel="layer", xticks=range(n_heads), yticks=range(n_layers))
    ax.grid(False)
    fig.colorbar(im, ax=ax, label="aggregated attribution score")
    fig.tight_layout()
    return fig


def plot_top_heads(score_lh: np.ndarray, top: Sequence[Head]) -> Figure:
    """The `top` heads' aggregated scores, best at the top."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.barh([f"L{l}H{h}" for l, h in top][::-1], [float(score_lh[l, h]) for l, h in top][::-1], color="#d62728")
    ax.set_xlabel("aggregated attribution score")
    fig.tight_layout()
    return fig


def plot_validation(heads: pd.DataFrame, validation: pd.DataFrame) -> Figure:
    """One panel per row of `validation` (columns `attribution`, `exhaustive`, `spearman`): the per-(feature, head)
    scores of `heads` in the attribution column (y) against the exhaustive one (x), coloured by the feature's layer,
    with the diagonal and the row's Spearman rho."""
    fig, axes = plt.subplots(1, len(validation), figsize=(5 * len(validation), 3.8), squeeze=False)
    for ax, row in zip(axes[0], validation.itertuples(), strict=True):
        a, e = row.attribution, row.exhaustive
        ax.scatter(heads[e], heads[a], s=12, c=heads.feature_layer, cmap="viridis")
        lim = [0, max(heads[e].max(), heads[a].max()) * 1.05]
        ax.plot(lim, lim, "k:", lw=1)
        ax.set(
            xlabel="exhaustive activation patching",
            ylabel=f"attribution ({a.removeprefix('attr_')} gradient)",
            title=f"Spearman ρ = {row.spearman:.3f}",
        )
    fig.tight_layout()
    return fig


def plot_attention_overlays(
    images: Sequence,
    questions: Sequence[str],
    heads: Sequence[Head],
    labels: Sequence[str],
    grid_bhyx: np.ndarray,
    image_mass_bh: np.ndarray,
) -> Figure:
    """One row per (image, question): the image titled with the question (the statement's fixed wording trimmed,
    wrapped over at most three lines), then per head the image under its attention on the patch grid
    (`grid_bhyx[b, h]`), titled with `labels[h]`, the head and its total attention on the image tokens."""
    n_cols = 1 + len(heads)
    fig, axes = plt.subplots(len(images), n_cols, figsize=(2.3 * n_cols, 2.4 * len(images)), squeeze=False)
    for i, (image, question) in enumerate(zip(images, questions, strict=True)):
        img = np.asarray(image)
        axes[i, 0].imshow(img)
        q = question.replace("statement : ", "").replace(" . is this correct ?", " ?")
        axes[i, 0].set_title("\n".join(textwrap.wrap(q, 30)[:3]), fontsize=7)  # at most three lines
        for j, (head, label) in enumerate(zip(heads, labels, strict=True)):
            ax = axes[i, 1 + j]
            ax.imshow(img)
            grid_yx = grid_bhyx[i, j]  # padded with NaN past a smaller image's grid (lib.kernels.attention)
            grid_yx = grid_yx[~np.isnan(grid_yx).all(1)][:, ~np.isnan(grid_yx).all(0)]
            ax.imshow(
                grid_yx,
                cmap="magma",
                alpha=0.6,
                extent=(0, img.shape[1], img.shape[0], 0),
                interpolation="nearest",
            )
            ax.set_title(
                f"{label} L{head[0]}H{head[1]}\nmass on image {float(image_mass_bh[i, j]):.2f}",
                fontsize=7,
            )
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([]), ax.grid(False)
    fig.tight_layout()
    return fig
