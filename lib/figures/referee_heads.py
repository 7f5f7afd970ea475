"""Figures of chapter 7's head checks (issue 17, items 6 and 7): tables in, a matplotlib `Figure` out, no torch.

- `plot_null_correction`: the paper's aggregate, its uniform-spread null and their ratio, layer x head.
- `plot_sweep_heatmap`: every head's single-head mean-ablation cost on every question type, in points.
- `plot_cost_scatter`: each head's spatial against its control cost, the paper's top k and the null-corrected best
  marked.
- `plot_set_distribution`: the random head-set control as a distribution, with the top-k sets placed in it.
- `plot_sufficiency`: per head, how often patching it from the object-swapped run flips the answer, beside its
  attribution score under each corruption.
- `plot_steering`: flip rate of the answer against the steering norm, the feature against random directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

Head = tuple[int, int]
PAPER, NULL, OTHER, RANDOM = "#d62728", "#1f77b4", "0.55", "0.7"
FAMILY_ORDER = ("lookup", "absolute", "relational")


def _name(layer, head) -> str:
    return f"L{int(layer)}H{int(head)}"


def plot_null_correction(ranking: pd.DataFrame, n_layers: int, n_heads: int) -> Figure:
    """Three layer x head panels from `ranking` (layer, head, score, null, corrected): the paper's aggregate, the
    aggregate a uniformly spread feature set would get, and their ratio (1 = no preference; white where unscored)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, column, title, cmap in zip(
        axes,
        ("score", "null", "corrected"),
        ("paper's aggregate", "uniform-spread null", "aggregate / null"),
        ("viridis", "viridis", "RdBu_r"),
        strict=True,
    ):
        grid_lh = np.full((n_layers, n_heads), np.nan)
        for r in ranking.itertuples():
            grid_lh[int(r.layer), int(r.head)] = getattr(r, column)
        if column == "corrected":
            span = max(np.nanmax(np.abs(grid_lh - 1)), 1e-9)
            im = ax.imshow(grid_lh, aspect="auto", cmap=cmap, vmin=1 - span, vmax=1 + span)
        else:
            im = ax.imshow(grid_lh, aspect="auto", cmap=cmap)
        for (l, h), v in np.ndenumerate(grid_lh):
            if np.isfinite(v):
                ax.text(
                    h, l, f"{v:.2f}", ha="center", va="center", fontsize=8, color="k" if column == "corrected" else "w"
                )
        ax.set(title=title, xlabel="head", ylabel="layer", xticks=range(n_heads), yticks=range(n_layers))
        ax.grid(False)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def _cost_grid(sweep: pd.DataFrame, column: str) -> pd.DataFrame:
    """Heads (rows, 'LxHy') x question types (columns, by family): clean minus ablated, in points."""
    clean = sweep[sweep.ablation == "none"].set_index("qtype")[column]
    abl = sweep[sweep.ablation != "none"]
    cost = abl.assign(
        cost=100 * (abl.qtype.map(clean) - abl[column]),
        name=[_name(*x) for x in zip(abl.layer, abl["head"], strict=True)],
    )
    grid = cost.pivot_table(index="name", columns="qtype", values="cost", sort=False)
    families = sweep.drop_duplicates("qtype").set_index("qtype").family
    order = sorted(grid.columns, key=lambda q: FAMILY_ORDER.index(families[q]) if families[q] in FAMILY_ORDER else 9)
    return grid[order], families


def plot_sweep_heatmap(sweep: pd.DataFrame, column: str = "accuracy") -> Figure:
    """Single-head mean-ablation cost (clean minus ablated `column`, in points) of every head on every question
    type; `sweep` is one ablation's rows of the head-sweep table with its clean rows (ablation 'none')."""
    grid, families = _cost_grid(sweep, column)
    fig, ax = plt.subplots(figsize=(1.6 + 0.85 * grid.shape[1], 1.2 + 0.32 * grid.shape[0]))
    span = max(float(np.nanmax(np.abs(grid.to_numpy()))), 1.0)
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-span, vmax=span)
    for (i, j), v in np.ndenumerate(grid.to_numpy()):
        if abs(v) >= 0.5:
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if abs(v) > 0.6 * span else "k")
    ax.set_xticks(range(grid.shape[1]), [f"{q}\n({families[q]})" for q in grid.columns], fontsize=7, rotation=45)
    ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=8)
    fam = [families[q] for q in grid.columns]
    for j in range(1, len(fam)):
        if fam[j] != fam[j - 1]:
            ax.axvline(j - 0.5, color="k", lw=1)
    ax.grid(False)
    label = "accuracy" if column == "accuracy" else "P(correct)"
    fig.colorbar(im, ax=ax, label=f"cost in points of {label}")
    ax.set_title("single-head mean ablation: cost per question type")
    fig.tight_layout()
    return fig


def plot_cost_scatter(
    costs: pd.DataFrame,
    paper_top: Sequence[Head],
    null_best: Head,
    goal: tuple[float, float] | None = None,
) -> Figure:
    """Each head's cost on the spatial types (y) against the control types (x), in points of accuracy (`costs`:
    lib.kernels.head_sweep.head_costs). Red rings: the paper's top k; blue star: the null-corrected best head. With
    `goal` = (min spatial, max control), the corner it asks for is shaded."""
    fig, ax = plt.subplots(figsize=(5.4, 4.4))
    x, y = costs.control_accuracy_cost.to_numpy(), costs.spatial_accuracy_cost.to_numpy()
    if goal is not None:
        lo, hi = min(-1.0, x.min() - 1), max(goal[0] + 5, y.max() + 3)
        ax.fill_between([lo, goal[1]], goal[0], hi, color="#2ca02c", alpha=0.12, lw=0, label="goal")
    ax.scatter(x, y, s=28, color=OTHER, zorder=2)
    top = {tuple(map(int, h)) for h in paper_top}
    for i, r in enumerate(costs.itertuples()):
        head = (int(r.layer), int(r.head))
        if max(r.spatial_accuracy_cost, r.control_accuracy_cost) < 3 and head not in top:
            continue  # the crowd near the origin stays unlabelled
        ax.annotate(
            _name(*head),
            (r.control_accuracy_cost, r.spatial_accuracy_cost),
            fontsize=7,
            xytext=(4, 3 if i % 2 == 0 else -9),
            textcoords="offset points",
        )
        if head in top:
            ax.scatter(
                [r.control_accuracy_cost],
                [r.spatial_accuracy_cost],
                s=140,
                facecolors="none",
                edgecolors=PAPER,
                lw=1.6,
                zorder=3,
            )
        if head == tuple(map(int, null_best)):
            ax.scatter([r.control_accuracy_cost], [r.spatial_accuracy_cost], s=160, marker="*", color=NULL, zorder=4)
    ax.scatter([], [], s=140, facecolors="none", edgecolors=PAPER, label=f"paper's top {len(top)}")
    ax.scatter([], [], s=160, marker="*", color=NULL, label="null-corrected best")
    ax.axline((0, 0), slope=1, color="0.8", ls="--", lw=1, zorder=1)
    ax.set(xlabel="control cost (lookup types), points", ylabel="spatial cost (absolute + relational), points")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_set_distribution(sets: pd.DataFrame, k: int) -> Figure:
    """The random-set control (`sets`: one row per head set, *_accuracy_cost in points, `draw` marking the
    control's sets, `paper_top` and `null_top` the two top-k sets): the spatial cost's distribution over the drawn
    sets with the top-k sets marked, and every set's spatial against control cost."""
    d = sets[sets.draw]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].hist(d.spatial_accuracy_cost, bins=min(30, max(8, len(d) // 3)), color=RANDOM)
    for flag, color, label in (("paper_top", PAPER, "paper's top"), ("null_top", NULL, "null-corrected top")):
        for r in sets[sets[flag]].itertuples():
            axes[0].axvline(r.spatial_accuracy_cost, color=color, lw=2, label=f"{label} {k}: {r.heads}")
            axes[1].scatter([r.control_accuracy_cost], [r.spatial_accuracy_cost], s=90, color=color, zorder=3)
    axes[0].set(xlabel="spatial cost of the set, points", ylabel="head sets", title=f"{len(d)} random {k}-head sets")
    axes[0].legend(frameon=False, fontsize=8)
    axes[1].scatter(d.control_accuracy_cost, d.spatial_accuracy_cost, s=14, color=RANDOM, zorder=2)
    axes[1].axline((0, 0), slope=1, color="0.8", ls="--", lw=1, zorder=1)
    axes[1].set(xlabel="control cost, points", ylabel="spatial cost, points", title="each set: spatial vs control")
    fig.tight_layout()
    return fig


def plot_sufficiency(sufficiency: pd.DataFrame, attribution: pd.DataFrame | None = None) -> Figure:
    """Per head: the share of answers that flip to the swapped scene's answer when the head's output is patched
    from the swapped run (bars), and, if given, its null-corrected attribution score under each corruption
    (`attribution`: layer, head, and one column per corruption)."""
    t = sufficiency.sort_values(["layer", "head"])
    names = [_name(l, h) for l, h in zip(t.layer, t["head"], strict=True)]
    n_panels = 1 if attribution is None else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 3.6), squeeze=False)
    axes[0, 0].bar(names, t.flip_rate, color=PAPER)
    axes[0, 0].set(ylabel="answers flipped", ylim=(0, 1), title="patched from the swapped scene")
    axes[0, 0].tick_params(axis="x", rotation=90, labelsize=8)
    if attribution is not None:
        a = attribution.sort_values(["layer", "head"])
        cols = [c for c in a.columns if c not in ("layer", "head")]
        width = 0.8 / len(cols)
        xs = np.arange(len(a))
        for i, c in enumerate(cols):
            axes[0, 1].bar(xs + i * width - 0.4 + width / 2, a[c], width, label=c)
        axes[0, 1].axhline(1, color="k", lw=0.8, ls="--")
        axes[0, 1].set_xticks(
            xs, [_name(l, h) for l, h in zip(a.layer, a["head"], strict=True)], rotation=90, fontsize=8
        )
        axes[0, 1].set(ylabel="attribution / null", title="attribution by corruption")
        axes[0, 1].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_steering(flips: pd.DataFrame, subset: str = "all relations") -> Figure:
    """Per steered feature (one panel each): the share of answers that flip against the steering norm (in multiples
    of the feature's mean activation when active), for the feature's direction (each sign) and for random
    directions of the same norm (each one a thin line; their mean thick)."""
    t = flips[flips.subset == subset]
    features = list(dict.fromkeys(t.feature))
    fig, axes = plt.subplots(1, len(features), figsize=(4.6 * len(features), 3.6), squeeze=False)
    for ax, name in zip(axes[0], features, strict=True):
        f = t[t.feature == name]
        rand = f[f.kind == "random"].pivot_table(index="scale", columns="index", values="flip_rate")
        for col in rand.columns:
            ax.plot(rand.index, rand[col], color=RANDOM, lw=0.7)
        ax.plot(rand.index, rand.mean(axis=1), color="0.3", lw=2, label=f"random ({rand.shape[1]}), mean")
        for vector, color in zip(sorted(set(f[f.kind == "feature"].vector)), (PAPER, NULL), strict=False):
            g = f[(f.kind == "feature") & (f.vector == vector)].sort_values("scale")
            ax.plot(g.scale, g.flip_rate, "o-", color=color, lw=2, label=f"feature {vector}")
        ax.set(xlabel="steering norm / mean activation", ylabel="answers flipped", title=f"{name} ({subset})")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1)
        ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig
