"""Figures of the probing chapter (chapter 5): tables and arrays in, a matplotlib `Figure` out. No torch here: the
chapter converts tensors to numpy before it calls these.

- `plot_volcano`: odds ratio against adjusted p per feature (the spatial selection).
- `plot_auroc_groups`: best relation AUROC of the final features against random ones (the ground-truth check).
- `draw_feature_panel`, `plot_auto_interp_panels`: a sample's image with the patches where a feature fires, and its
  prompt with the activating tokens (data: `lib.kernels.probing.feature_trace`).

Shape key: y / x = patch-grid rows / columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# ---------------------------------------------------------------------------------------------------------------
# The selection and the ground-truth check


def plot_volcano(table: pd.DataFrame, min_odds: float, min_delta: float) -> Figure:
    """log2 odds ratio vs -log10 BH-adjusted p per feature; spatial candidates (OR and delta thresholds) in
    colour, adapted ones outlined."""
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


def plot_auroc_groups(per_feature: pd.DataFrame) -> Figure:
    """Best relation AUROC of the final features vs random adapted and random features (strip + box)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Panels: a sample's image with activating patches, its prompt with activating tokens


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


def plot_auto_interp_panels(rows: Sequence[tuple[str, Sequence[tuple]]], n_ex: int = 3) -> Figure:
    """One pair of panel rows per feature (`draw_feature_panel`), up to `n_ex` samples side by side, one colour scale
    per feature. `rows`: per feature, its title (drawn over its first sample) and its traces, each a tuple
    (image, patch_acts_yx, tokens, token_acts) of arrays (`lib.kernels.probing.Trace`, tensors converted to numpy)."""
    fig, axes = plt.subplots(
        2 * len(rows), n_ex, figsize=(3.2 * n_ex, 4.6 * len(rows)), gridspec_kw={"height_ratios": [3, 1.2] * len(rows)}
    )
    axes = np.atleast_2d(axes)
    for r, (title, traces) in enumerate(rows):
        vmax = max([np.nanmax(np.r_[patch_yx.ravel(), acts]) for _, patch_yx, _, acts in traces] + [1e-6])
        for c in range(n_ex):
            ax_i, ax_t = axes[2 * r, c], axes[2 * r + 1, c]
            if c < len(traces):
                image, patch_yx, tokens, acts = traces[c]
                draw_feature_panel(
                    ax_i, ax_t, image, patch_yx, tokens, acts, title="" if c else title, vmax=vmax, fontsize=7
                )
            else:
                ax_i.axis("off"), ax_t.axis("off")
    fig.tight_layout()
    return fig
