"""Findings across seeds (issue 20). The seed is a profile value that every step from the organism on reads, so
each seed of a profile is the whole pipeline again: `Study.with_seed(n)` is that pipeline on the same cache. The
`seed-summary` step condenses one seed's headline numbers of the ground-truth chapter into one row (a small table:
committed to artifacts/ with its provenance, a seed's summary is read where CI cannot afford its pipeline);
`across_seeds` gathers them for the profile's `referee.seeds` with their mean and range."""

from __future__ import annotations

import pandas as pd

from lib.io.cache import load_table, save_table
from lib.steps.referee_heads import sweep_costs
from lib.steps.registry import step

# The numbers the issue asks for on every seed, in the order the chapter prints them.
NUMBERS = ("reference", "final", "found", "precision", "recall", "spatial_cost", "control_cost")


@step("seed-summary", after=("heldout-accuracy", "referee", "head-sweep"), reads=("seed",))
def seed_summary(ctx) -> pd.DataFrame | None:
    """One row: the accuracy targets the seed's organism misses (chapter 2's table; "" when it meets them all); the
    reference set's size; the paper's final set, how many of it are in the reference set, its precision and recall
    (the referee's first row); the most spatial-specific head (its single ablation costs the spatial question types
    most beyond what it costs the control types) and its cost on each (points of accuracy, the head sweep's matched
    means). None off the organism (no ground truth)."""
    referee, sweep = ctx.up("referee"), ctx.up("head-sweep")
    if referee is None or sweep is None:
        return None

    def build(out):
        from lib.sources.organism import TARGETS

        acc = ctx.up("heldout-accuracy").set_index("qtype")
        missed = [
            f"{model}:{q}"
            for model, column in (("lm", "lm_text"), ("vlm", "vlm_image"))
            for q, target in TARGETS[model].items()
            if acc.loc[q, column] < target
        ]
        paper = referee["rows"].iloc[0]
        costs = sweep_costs(sweep)
        best = costs.loc[costs.rank_specific.idxmin()]  # the largest spatial minus control cost
        row = {
            "seed": ctx.P.seed,
            "targets_missed": ", ".join(missed),
            **{n: paper[n] for n in ("reference", "final", "found", "precision", "recall")},
            "best_head": f"L{int(best.layer)}H{int(best['head'])}",
            "spatial_cost": best.spatial_accuracy_cost,
            "control_cost": best.control_accuracy_cost,
        }
        save_table(out / "summary.parquet", pd.DataFrame([row]))

    return load_table(ctx.cached(build) / "summary.parquet")


def across_seeds(S) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every seed's summary row (the profile's `referee.seeds`, each its own pipeline on S's cache), and the mean,
    minimum and maximum of each number over them."""
    rows = pd.concat([S.with_seed(seed).run("seed-summary") for seed in S.P.referee.seeds], ignore_index=True)
    spread = rows[list(NUMBERS)].astype(float).agg(["mean", "min", "max"]).T.rename_axis("number").reset_index()
    return rows, spread
