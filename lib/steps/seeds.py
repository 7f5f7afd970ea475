"""Findings across seeds (issue 20). The seed is a profile value that every step from the organism on reads, so
each seed of a profile is the whole pipeline again: `Study.with_seed(n)` is that pipeline on the same cache.

Each chapter that states a finding about the organism, its features or its heads declares it here with
`@findings(chapter, after=...)`: a function of one seed's pipeline that returns the chapter's headline numbers. Each
becomes a cached step, `seeds-<chapter>`, whose result is one small row (committed to artifacts/ with its provenance,
a seed's row is read where CI cannot afford that seed's pipeline: the step reads its upstream steps only when it
builds). `across_seeds` gathers a chapter's rows over the profile's `referee.seeds` with their mean and range, and
`report` is the chapter's "Across seeds" cell."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from lib.io.cache import load_table, save_table
from lib.sources.world import BINDING_QTYPES, QTYPES
from lib.steps.registry import step

NUMBERS: dict[str, tuple[str, ...]] = {}  # chapter: its numbers, in the order it prints them
LABELS: dict[str, tuple[str, ...]] = {}  # chapter: the text columns shown beside its numbers


def findings(
    chapter: str, *, after: tuple[str, ...], numbers: tuple[str, ...], labels: tuple[str, ...] = (), version: int = 1
):
    """Register `fn(ctx) -> dict` (the numbers and labels of one seed) as the step `seeds-<chapter>`, organism
    only (None elsewhere: a model without a seed to vary). A new number is a new `version` (committed rows of
    extra seeds are then found missing, and `make seed` recomputes them)."""

    def register(fn: Callable) -> Callable:
        NUMBERS[chapter], LABELS[chapter] = numbers, labels

        @step(f"seeds-{chapter}", after=after, reads=("seed",), version=version)
        def summary(ctx) -> pd.DataFrame | None:
            if ctx.P.lm is None:
                return None

            def build(out):
                row = fn(ctx)
                assert set(row) == set(numbers) | set(labels), f"seeds-{chapter}: {sorted(row)}"
                save_table(out / "summary.parquet", pd.DataFrame([{"seed": ctx.P.seed, **row}]))

            return load_table(ctx.cached(build) / "summary.parquet")

        summary.__doc__ = fn.__doc__
        return fn

    return register


STAGES = ("lm", "tower", "vlm_stage1", "vlm_stage2")
PLACES = ("last_place", "earlier_places")  # the binding check's summary (lib.sources.organism.binding)


@findings(
    "accuracy",
    after=("organism", "heldout-accuracy"),
    numbers=(
        *(f"lm:{q}" for q in QTYPES),
        *(f"vlm:{q}" for q in QTYPES),
        "mean_image_above_prior",
        *(f"lm_{q}_{place}" for q in BINDING_QTYPES for place in PLACES),
        *(f"{stage}_s" for stage in STAGES),
        "total_s",
    ),
    labels=("targets_missed",),
    version=3,  # 3: shape questions beside colour ones in the binding numbers (lm_color_*, lm_shape_*)
)
def _accuracy(ctx) -> dict:
    """Chapter 2: held-out accuracy per question type of the base LM on captions and of the VLM on images; the
    targets it misses ("" when it meets them all); the largest margin of the mean-image VLM over the best guess
    from the question's text (near 0 or below: the image is needed); the base LM's colour and shape accuracy on
    three-object captions when the asked object is described last and earlier (lib.sources.organism.binding:
    alike when it binds colour to shape); and the wall seconds of each training stage and their total."""
    from lib.sources.organism import against_targets, binding
    from lib.steps.organism import training_seconds

    models = ctx.up("organism")
    seconds = training_seconds(models.artifacts)
    _, bound = binding(models.lm, models.tokenizer, ctx.P.seed)
    acc = against_targets(ctx.up("heldout-accuracy")).set_index("qtype")
    columns = {"lm": "lm_text", "vlm": "vlm_image"}
    missed = [f"{m}:{q}" for m, c in columns.items() for q in QTYPES if not acc.loc[q, f"{m}_met"]]
    return {
        **{f"{m}:{q}": acc.loc[q, c] for m, c in columns.items() for q in QTYPES},
        "mean_image_above_prior": float((acc.vlm_mean_image - acc.question_prior).max()),
        **{f"lm_{q}_{place}": bound[q][place] for q in BINDING_QTYPES for place in PLACES},
        **{f"{stage}_s": seconds[stage] for stage in STAGES},
        "total_s": sum(seconds.values()),
        "targets_missed": ", ".join(missed),
    }


@findings(
    "adaptation",
    after=("reconstruction",),
    numbers=("fvu_base_image", "fvu_full_image", "fvu_base_text", "fvu_text_only_text"),
)
def _adaptation(ctx) -> dict:
    """Chapter 3's Table 1, condensed: held-out FVU (mean over layers) on the VLM's image and text tokens of the base
    SAE, of the full adaptation (image tokens) and of the text-only adaptation (text tokens)."""
    from lib.kernels.adaptation import summary_table

    fvu = summary_table(ctx.up("reconstruction")).set_index(["sae", "split"]).fvu_mean
    return {
        "fvu_base_image": fvu["base", "image"],
        "fvu_full_image": fvu["full", "image"],
        "fvu_base_text": fvu["base", "text"],
        "fvu_text_only_text": fvu["text-only", "text"],
    }


@findings("diffing", after=("selection",), numbers=("adapted", "adapted_share"))
def _diffing(ctx) -> dict:
    """Chapter 4: the followed variant's adapted features, and their share of all its features."""
    adapted = ctx.up("selection").table.adapted
    return {"adapted": int(adapted.sum()), "adapted_share": float(adapted.mean())}


@findings(
    "probing",
    after=("selection", "ground-truth-check"),
    numbers=("candidates", "final", "final_auroc", "random_auroc"),
)
def _probing(ctx) -> dict:
    """Chapter 5: the adapted spatial candidates, the final set, and the mean best-relation AUROC of the final set
    and of random features (the ground-truth check)."""
    table, truth = ctx.up("selection").table, ctx.up("ground-truth-check")
    groups = truth.check.summary.set_index("group")["mean"] if truth is not None else pd.Series(dtype=float)
    return {
        "candidates": int((table.adapted & table.spatial).sum()),
        "final": int(table.final.sum()),
        "final_auroc": groups.get("final", float("nan")),
        "random_auroc": groups.get("random", float("nan")),
    }


@findings(
    "attribution",
    after=("head-scores", "causal-checks"),
    numbers=("spearman", "top_heads_statement", "random_heads_statement"),
)
def _attribution(ctx) -> dict:
    """Chapter 6: Spearman's rho of the paper's score against exhaustive patching, and statement accuracy with the
    top heads mean-ablated against random heads from the same layers (Table 2)."""
    from lib.kernels.causal import ablation_table
    from lib.steps.heads import validation_table

    table2 = ablation_table(ctx.up("causal-checks")).set_index(["condition", "ablation"])["statement: accuracy"]
    return {
        "spearman": validation_table(ctx.up("head-scores")).spearman.iloc[0],
        "top_heads_statement": table2.get(("top heads", "mean"), float("nan")),
        "random_heads_statement": table2.get(("random heads", "mean"), float("nan")),
    }


@findings(
    "ground-truth",
    after=("referee", "head-sweep"),
    numbers=("reference", "final", "found", "precision", "recall", "spatial_cost", "control_cost"),
    labels=("best_head",),
)
def _ground_truth(ctx) -> dict:
    """Chapter 7: the reference set's size; the paper's final set, how many of it are in the reference set, its
    precision and recall (the referee's first row); the most spatial-specific head (its single ablation costs the
    spatial question types most beyond what it costs the control types) and its cost on each (points of accuracy,
    the head sweep's matched means)."""
    from lib.steps.referee_heads import most_specific_head, sweep_costs

    paper = ctx.up("referee")["rows"].iloc[0]
    best = most_specific_head(sweep_costs(ctx.up("head-sweep")))
    return {
        **{n: paper[n] for n in ("reference", "final", "found", "precision", "recall")},
        "best_head": f"L{int(best.layer)}H{int(best['head'])}",
        "spatial_cost": best.spatial_accuracy_cost,
        "control_cost": best.control_accuracy_cost,
    }


def across_seeds(S, chapter: str) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """One chapter's findings on every seed of the profile's `referee.seeds` (each its own pipeline on S's cache),
    and the mean, minimum and maximum of each number over them. None off the organism."""
    summaries = [S.with_seed(seed).run(f"seeds-{chapter}") for seed in S.P.referee.seeds]
    if any(s is None for s in summaries):
        return None
    rows = pd.concat(summaries, ignore_index=True)
    spread = rows[list(NUMBERS[chapter])].astype(float).agg(["mean", "min", "max"]).T
    return rows, spread.rename_axis("number").reset_index()


def report(S, out, chapter: str) -> None:
    """A chapter's "Across seeds" cell: its findings on every seed (table `seeds`; shown one seed per column when
    there are many numbers) and their mean and range (table `seeds_spread`)."""
    found = across_seeds(S, chapter)
    if found is None:
        print(f"profile {S.P.name!r} has no organism, so no seeds: the findings above are its one model's")
        return
    per_seed, spread = found
    out.table(per_seed, "seeds", show=len(per_seed.columns) <= 10)
    if len(per_seed.columns) > 10:
        print(per_seed.set_index("seed").T.rename_axis("seed").to_string())
    out.table(spread, "seeds_spread")
    if len(per_seed) == 1:
        print(f"one seed ({int(per_seed.seed[0])}): no range yet; the findings above rest on a single organism")
