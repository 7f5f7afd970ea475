"""Figures of the SAE chapter (chapter 3): the adaptation step's tables in, a matplotlib `Figure` out, each sized for
the book's text width. No torch here.

- `plot_fvu_over_training`: held-out FVU during adaptation (`adaptation.adapt_saes(...).history`).
- `plot_fvu_per_layer`: held-out FVU per layer after adaptation (`adaptation.reconstruction_table`).
- `plot_reconstruction_gap`: normalised MSE of the base and the adapted text-only SAE on both streams (same table).

Every line of an SAE variant has that variant's colour (lib/names.py), in these figures and in chapter 4's.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import pandas as pd
from matplotlib.figure import Figure

from lib.figures.style import variant_color
from lib.names import SPLITS


def plot_fvu_over_training(history: pd.DataFrame, splits: Sequence[str] = ("text", "image")) -> Figure:
    """Mean held-out FVU across layers vs training step, one line per variant, one panel per token split (the band
    is the min..max over layers)."""
    fig, axes = plt.subplots(1, len(splits), figsize=(3.6 * len(splits), 3.0), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        part = history[history.split == split]
        for variant, rows in part.groupby("variant", sort=False):
            by_step = rows.groupby("step").fvu.agg(["mean", "min", "max"])
            ax.plot(by_step.index, by_step["mean"], marker="o", ms=3, label=variant, color=variant_color(variant))
            ax.fill_between(by_step.index, by_step["min"], by_step["max"], alpha=0.15, color=variant_color(variant))
        ax.set_title(f"{split} tokens")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("held-out FVU (mean over layers)")
    axes[0, -1].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_fvu_per_layer(table: pd.DataFrame, stream: str = "vlm", splits: Sequence[str] = SPLITS) -> Figure:
    """Held-out FVU per layer, one line per SAE (base, adapted variants, random), one panel per token split."""
    part = table[table.stream == stream]
    fig, axes = plt.subplots(1, len(splits), figsize=(2.7 * len(splits), 2.9), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        for sae, rows in part[part.split == split].groupby("sae", sort=False):
            rows = rows.sort_values("layer")
            ax.plot(rows.layer, rows.fvu, marker="o", ms=3, label=sae, color=variant_color(sae))
        ax.set_title(f"{split} tokens")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("held-out FVU")
    axes[0, -1].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_reconstruction_gap(table: pd.DataFrame, text_variant: str = "text-only", base: str = "base") -> Figure:
    """Normalised MSE per layer (log scale) for {base SAE, adapted text-only SAE} x {LM text activations, VLM
    activations (all tokens)}: colour is the SAE, line style the stream. `base` is the base SAEs' name in the table's
    `sae` column (`adaptation.reconstruction_table` calls them "base")."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = {"lm": ("-", "LM text"), "vlm": ("--", "VLM")}
    for sae, label in ((base, "base SAE"), (text_variant, f"adapted {text_variant} SAE")):
        for stream, (ls, stream_label) in styles.items():
            rows = table[(table.sae == sae) & (table.stream == stream) & (table.split == "full")].sort_values("layer")
            if len(rows):
                ax.plot(
                    rows.layer,
                    rows.nmse,
                    ls,
                    marker="o",
                    ms=3,
                    color=variant_color(sae),
                    label=f"{label}, {stream_label}",
                )
    ax.set_yscale("log")
    # 0.2, not 2 x 10^-1; minor ticks labelled at 2 and 5 only, which stays readable over two or three decades.
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised MSE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    return fig
