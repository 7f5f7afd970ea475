"""Chapter 7's head steps (issue 17, items 6 and 7): the ground truth referees the attribution to heads.

- `head-sweep`: every head mean-ablated alone, per question type (lib.kernels.head_sweep).
- `head-sets`: the random control as a distribution over head sets of the eligible layers, with the paper's top-k
  set and the null-corrected top-k set placed in it.
- `head-sufficiency`: one head's output patched from the object-swapped scene; how often the answer flips.
- `head-counterfactual`: attribution with the object swap as the corrupted run, beside the mean image.
- `steering`: the best reference feature's decoder direction added and subtracted (lib.kernels.steering).

`null_ranking` (the paper's aggregate over its uniform-spread null) is computed from `head-scores` on the fly.
Organism only: each step returns None on a profile without the generated world's ground truth.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import pandas as pd

from lib.io.cache import load_json, load_table, save_json, save_table
from lib.steps.data import data_reads
from lib.steps.heads import attributed_features, features_of, head_ranking, mean_image
from lib.steps.registry import step

# The random-set distribution is evaluated on the first third of the sweep's items (the types cycle, so every
# type keeps a third of its items): every set costs one pass over them, and there are C(heads of the eligible layers,
# k) sets or `referee.n_head_draws` (v1: 66, the pairs of layers 0-2's 12 heads; v2 seed 0: 496 of layers 0-3's 32),
# against 1 + heads passes for the single-head sweep on all items. The all-position-mean sweep,
# shown only to justify the matched means, runs on the same third.
SET_SHARE = 3


class HeadSweep(NamedTuple):
    table: pd.DataFrame  # ablation, layer, head, qtype, family, accuracy, p_correct, n (clean: layer = head = -1)
    info: dict  # items, the means' templates and counts, fallbacks, seconds


class NullRanking(NamedTuple):
    table: pd.DataFrame  # layer, head, score, null, corrected, rank_raw, rank_corrected (best corrected first)
    top: list  # the top-k heads by the corrected score


def null_ranking(scores: pd.DataFrame, n_layers: int, n_heads: int, top_k: int, column="attr_clean") -> NullRanking:
    """The paper's aggregation (lib.steps.heads.head_ranking) beside its uniform-spread null and the ratio."""
    import torch

    from lib.kernels import head_sweep as HS

    ranking = head_ranking(scores, n_layers, n_heads, top_k, column)
    layers_f = torch.tensor(ranking.feature_layers.to_numpy())
    null_lh = HS.uniform_null(layers_f, n_layers, n_heads)
    corrected_lh = HS.null_corrected(ranking.aggregate.score_lh, layers_f)
    t = ranking.table.copy()
    t["null"] = [float(null_lh[r.layer, r.head]) for r in t.itertuples()]
    t["corrected"] = [float(corrected_lh[r.layer, r.head]) for r in t.itertuples()]
    t["rank_raw"] = t.score.rank(ascending=False, method="min").astype(int)
    t["rank_corrected"] = t.corrected.rank(ascending=False, method="min").astype(int)
    t = t.sort_values("corrected", ascending=False).reset_index(drop=True)
    return NullRanking(t, [(int(r.layer), int(r.head)) for r in t.head(len(ranking.top)).itertuples()])


def _all_heads(vlm) -> list[tuple[int, int]]:
    return [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]


@step("head-sweep", after=("models",), reads=(*data_reads("sweep", "heldout"), "threads"))
def head_sweep(ctx) -> HeadSweep | None:
    """Every head mean-ablated alone (position-matched means of the held-out split, BOS never patched) on every
    question type of the sweep split; on its first third, also with the all-position mean (the comparison)."""
    from lib.kernels import head_sweep as HS

    D = ctx.data
    if D.samples is None:
        return None
    vlm = ctx.up("models")

    def build(out):
        t0 = time.perf_counter()
        model, tok = vlm.model, vlm.tokenizer
        items = HS.encode_items(model, tok, D.sweep)
        means = HS.matched_means(model, HS.encode_items(model, tok, D.samples["heldout"]))
        heads = _all_heads(vlm)
        table = HS.head_sweep(model, items, means, heads)
        third = HS.encode_items(model, tok, D.sweep[: len(D.sweep) // SET_SHARE])
        glob = HS.head_sweep(model, third, means, heads, ablations=("matched", "global")).assign(subset="first third")
        save_table(out / "sweep.parquet", pd.concat([table.assign(subset="all"), glob], ignore_index=True))
        info = dict(
            n_items=len(items),
            n_reference=sum(means.n_per_template.values()),
            templates=means.n_per_template,
            n_fallback=HS.n_fallback(means, items),
            seconds=time.perf_counter() - t0,
        )
        save_json(out / "info.json", info)

    art = ctx.cached(build)
    return HeadSweep(load_table(art / "sweep.parquet"), load_json(art / "info.json"))


def sweep_costs(sweep: HeadSweep, ablation: str = "matched", subset: str = "all") -> pd.DataFrame:
    """lib.kernels.head_sweep.head_costs of one ablation on one subset of items ("all": matched means only; "first
    third": matched and all-position means, each against the clean run on the same items)."""
    from lib.kernels import head_sweep as HS

    t = sweep.table
    rows = t[(t.subset == subset) & t.ablation.isin(["none", ablation])]
    assert (rows.ablation == ablation).any(), f"no {ablation!r} ablation on the {subset!r} items"
    return HS.head_costs(rows, ablation)


class HeadSets(NamedTuple):
    table: pd.DataFrame  # heads, *_cost (points), draw (in the control distribution), paper_top, null_top
    info: dict  # k, eligible heads, exhaustive, items, seconds


@step(
    "head-sets",
    after=("models", "head-scores"),
    reads=(*data_reads("sweep", "heldout"), "threads", "seed", "attribution.top_k", "referee.n_head_draws"),
)
def head_sets(ctx) -> HeadSets | None:
    """The random-head control as a distribution: every k-set of the eligible heads (the layers the attribution
    scores) when there are at most `n_head_draws` of them, otherwise that many random draws, each ablated together
    (matched means); the paper's top-k set and the null-corrected top-k set evaluated alike."""
    from lib.kernels import head_sweep as HS

    P, D = ctx.P, ctx.data
    if D.samples is None:
        return None
    vlm = ctx.up("models")
    scores = ctx.up("head-scores").table
    k = P.attribution.top_k
    paper = head_ranking(scores, vlm.n_layers, vlm.n_heads, k)
    null = null_ranking(scores, vlm.n_layers, vlm.n_heads, k)
    eligible = sorted((int(r.layer), int(r.head)) for r in paper.table.itertuples())
    k = len(paper.top)  # head_ranking caps k at the number of scored heads

    def build(out):
        t0 = time.perf_counter()
        model, tok = vlm.model, vlm.tokenizer
        items = HS.encode_items(model, tok, D.sweep[: len(D.sweep) // SET_SHARE])
        means = HS.matched_means(model, HS.encode_items(model, tok, D.samples["heldout"]))
        sets, exhaustive = HS.head_sets(eligible, k, P.referee.n_head_draws, P.seed)
        names = [HS.head_set_name(s) for s in sets]
        extra = [s for s in (paper.top, null.top) if HS.head_set_name(s) not in names]
        table = HS.set_costs(model, items, means, [*sets, *extra])
        table["draw"] = [True] * len(sets) + [False] * len(extra)
        table["paper_top"] = table.heads == HS.head_set_name(paper.top)
        table["null_top"] = table.heads == HS.head_set_name(null.top)
        save_table(out / "sets.parquet", table)
        info = dict(
            k=k,
            eligible=[f"L{l}H{h}" for l, h in eligible],
            exhaustive=exhaustive,
            n_sets=len(sets),
            n_items=len(items),
            seconds=time.perf_counter() - t0,
        )
        save_json(out / "info.json", info)

    art = ctx.cached(build)
    return HeadSets(load_table(art / "sets.parquet"), load_json(art / "info.json"))


class Sufficiency(NamedTuple):
    table: pd.DataFrame  # layer, head, positions, n, flip_rate, recovered
    check: pd.DataFrame  # per item: relation, qtype, truth and model answer on the clean and the swapped scene


@step("head-sufficiency", after=("models",), reads=(*data_reads("counterfactual"), "threads"))
def head_sufficiency(ctx) -> Sufficiency | None:
    """Every head's hook_z from the object-swapped run patched into the clean run at the post-image positions, on
    the counterfactual relation questions (lib.kernels.head_checks.sufficiency), and the swap's answer check."""
    from lib.kernels import head_checks as HC
    from lib.kernels.causal import single_token_id
    from lib.kernels.counterfactual import object_twin

    D = ctx.data
    if D.samples is None:
        return None
    vlm = ctx.up("models")

    def build(out):
        clean = D.counterfactual
        swapped = [object_twin(s) for s in clean]
        yes, no = (single_token_id(vlm.tokenizer, w) for w in ("yes", "no"))
        table, check = HC.sufficiency(vlm, clean, swapped, _all_heads(vlm), yes, no)
        save_table(out / "sufficiency.parquet", table)
        save_table(out / "check.parquet", check)

    art = ctx.cached(build)
    return Sufficiency(load_table(art / "sufficiency.parquet"), load_table(art / "check.parquet"))


@step(
    "head-counterfactual",
    after=("models", "adapted-saes", "selection"),
    reads=(
        *data_reads("counterfactual", "heldout"),
        "threads",
        "diffing.variant",
        "attribution.n_samples",
        "attribution.batch_size",
    ),
)
def head_counterfactual(ctx) -> pd.DataFrame | None:
    """The paper's attribution score of every attributed feature to every head below it, on the first `n_samples`
    counterfactual questions whose answer the swap flips, with two corrupted runs: the mean image and the swapped
    scene. Long table: feature, feature_layer, layer, head, corruption, score (the head-scores layout)."""
    from lib.kernels import head_checks as HC
    from lib.kernels.counterfactual import object_twin

    P, D = ctx.P, ctx.data
    if D.samples is None:
        return None
    vlm, adapted = ctx.up("models"), ctx.up("adapted-saes")
    feats = features_of(adapted, P.diffing.variant, attributed_features(ctx.up("selection").table).table)

    def build(out):
        pairs = [(s, object_twin(s)) for s in D.counterfactual]
        pairs = [(c, s) for c, s in pairs if s.answer != c.answer][: P.attribution.n_samples]
        if not pairs:  # no question whose answer the swap flips (a tiny split): nothing to attribute
            save_table(
                out / "scores.parquet",
                pd.DataFrame(columns=["feature", "feature_layer", "layer", "head", "corruption", "score"]),
            )
            return
        mean_d = mean_image(vlm, D.heldout, P.attribution.batch_size)
        scores = HC.attribution_by_corruption(
            vlm, [c for c, _ in pairs], [s for _, s in pairs], feats, mean_d, batch_size=4 * P.attribution.batch_size
        )
        rows = [
            dict(feature=f.name, feature_layer=f.layer, layer=l, head=h, corruption=name, score=float(t[i, l, h]))
            for name, t in scores.items()
            for i, f in enumerate(feats)
            for l in range(f.layer)
            for h in range(vlm.n_heads)
        ]
        save_table(out / "scores.parquet", pd.DataFrame(rows))

    return load_table(ctx.cached(build) / "scores.parquet")


def best_references(truth: pd.DataFrame) -> pd.DataFrame:
    """The reference features to steer: the best of each layer (highest relation score, then truth score where the
    table has it, then the lowest index), `best` marking the best overall. Without any reference feature, the
    top-scored feature of each layer stands in (its `reference` is False: say so)."""
    pool = truth[truth.reference] if truth.reference.any() else truth
    by = ["relation_score", "truth_score"] if "truth_score" in pool else ["relation_score"]
    order = pool.sort_values([*by, "layer", "feature"], ascending=[*[False] * len(by), True, True])
    picked = order.groupby("layer", sort=False).head(1).reset_index(drop=True)
    picked = picked[["layer", "feature", *by, "best_relation", "reference"]]
    picked["best"] = picked.index == 0
    return picked.sort_values("layer").reset_index(drop=True)


# Steering runs at these multiples of `referee.steer_scale`: at the profile's 4x a reference feature barely moves the
# answer while at 16x it flips it every time (measured), so one scale alone would hide the dose-response; random
# directions get the same norms. (Only the blocks after the steered one run per vector: the sweep is cheap.)
STEER_MULTIPLES = (1, 2, 4)


class Steering(NamedTuple):
    flips: pd.DataFrame  # one row per (feature, scale, vector, subset): flip_rate, to_yes, to_no, delta_p_yes
    features: pd.DataFrame  # the steered features: layer, feature, ..., sign (+1: activation means 'holds'), norm


@step(
    "steering",
    after=("models", "adapted-saes", "truth-features"),
    reads=(
        *data_reads("counterfactual"),
        "threads",
        "seed",
        "diffing.variant",
        "referee.steer_scale",
        "referee.n_steer_random",
    ),
)
def steering(ctx) -> Steering | None:
    """The best reference feature of each layer steered on the counterfactual relation questions (held out from
    the relation questions that chose it): ± steer_scale x its mean activation when active x its decoder row, added
    after its layer at the post-image positions, against `n_steer_random` random directions of the same norm."""
    P, D = ctx.P, ctx.data
    truth = ctx.up("truth-features")
    if D.samples is None or truth is None:
        return None
    vlm, adapted = ctx.up("models"), ctx.up("adapted-saes")
    chosen = best_references(truth)

    def build(out):
        from lib.kernels import steering as ST
        from lib.kernels.causal import single_token_id

        yes, no = (single_token_id(vlm.tokenizer, w) for w in ("yes", "no"))
        flips, feats = ST.steer_features(
            vlm,
            adapted.saes[P.diffing.variant],
            chosen,
            D.counterfactual,
            yes,
            no,
            scales=[m * P.referee.steer_scale for m in STEER_MULTIPLES],
            n_random=P.referee.n_steer_random,
            seed=P.seed,
        )
        save_table(out / "flips.parquet", flips)
        save_table(out / "features.parquet", feats)

    art = ctx.cached(build)
    return Steering(load_table(art / "flips.parquet"), load_table(art / "features.parquet"))


# ---------------------------------------------------------------------------------------------------------------
# Read-outs for the chapter (tables in, tables out)

# Issue 17's goal for the best head: at least this many points of accuracy lost on the spatial types, at most this
# many on the control types.
ABLATION_GOAL = (20.0, 2.0)


def corruption_ranking(scores: pd.DataFrame, n_layers: int, n_heads: int, top_k: int) -> pd.DataFrame:
    """Per head: the null-corrected attribution under each corruption of `head-counterfactual` (one column each)
    and its rank under each (rank_<corruption>)."""
    cols = []
    for corruption, g in scores.groupby("corruption", sort=False):
        t = null_ranking(g.rename(columns={"score": "attr_clean"}), n_layers, n_heads, top_k).table
        t = t.set_index(["layer", "head"])
        cols += [t.corrected.rename(corruption), t.rank_corrected.rename(f"rank_{corruption}")]
    return pd.concat(cols, axis=1).reset_index().sort_values(["layer", "head"]).reset_index(drop=True)


def most_specific_head(costs: pd.DataFrame) -> pd.Series:
    """The row of `sweep_costs` whose single ablation costs the spatial types most beyond the control types."""
    return costs.loc[costs.rank_specific.idxmin()]


# A top-k set is "spatial-specific" among the random sets of its layers when its spatial cost is at or above this
# percentile of theirs and its control cost at or below this one (chapter 7's claims table).
SPECIFIC_PERCENTILES = (0.95, 0.5)


def head_claim(costs: pd.DataFrame, placement: pd.DataFrame, sets: HeadSets, paper_top, null_top) -> dict:
    """Chapter 7's row for the paper's head claim: what the single-head sweep and the set distribution say
    (`ground_truth`), and which of the pipeline's choices explain where they differ from its top heads (`why`),
    each part stated only where the numbers show it."""
    name = lambda hs: ", ".join(f"L{l}H{h}" for l, h in hs)  # noqa: E731
    by_set = placement.set_index("set")
    best, paper = most_specific_head(costs), by_set.loc["paper's top k"]
    best_name = f"L{int(best.layer)}H{int(best['head'])}"
    specific = (
        paper.spatial_percentile >= SPECIFIC_PERCENTILES[0] and paper.control_percentile <= SPECIFIC_PERCENTILES[1]
    )
    ground_truth = (
        f"most spatial-specific single head {best_name}: {best.spatial_accuracy_cost:.1f} points on spatial types, "
        f"{best.control_accuracy_cost:.1f} on control; the paper's top set ranks {int(paper.spatial_rank)} / "
        f"{int(paper.n_draws)} on spatial cost (percentile {paper.spatial_percentile:.2f}) and "
        f"{int(paper.control_rank)} on control cost (percentile {paper.control_percentile:.2f}) among sets of its "
        "layers"
    )
    scored = sorted({int(h.split("H")[0][1:]) for h in sets.info["eligible"]})
    if specific:
        why = ["the paper's top set is spatial-specific among sets of its layers"]
    else:
        why = []
        if paper.spatial_percentile < SPECIFIC_PERCENTILES[0]:
            why.append("the paper's top set costs space no more than random sets of its layers often do")
        if paper.control_percentile > SPECIFIC_PERCENTILES[1]:
            why.append(
                "the paper's top set costs the control types too: the mean image credits any head that reads the image"
            )
    if int(best.layer) > scored[-1]:
        why.append(
            f"{best_name} is in layer {int(best.layer)}, above every layer the attribution scores ({scored[0]}-"
            f"{scored[-1]}: heads below the deepest final feature)"
        )
    if set(map(tuple, paper_top)) != set(map(tuple, null_top)):
        null = by_set.loc["null-corrected top k"]
        why.append(
            f"over the uniform-spread null the top set becomes {name(null_top)} (spatial percentile "
            f"{null.spatial_percentile:.2f}, control {null.control_percentile:.2f})"
        )
    return dict(
        claim="a few attention heads drive the spatial features",
        pipeline=f"top heads {name(paper_top)}",
        ground_truth=ground_truth,
        why="; ".join(why),
    )


def set_placement(sets: HeadSets) -> pd.DataFrame:
    """The paper's and the null-corrected top-k sets: their costs, and their rank and percentile among the random
    sets of the control (spatial and control cost)."""
    from lib.kernels.head_sweep import place

    t, draws = sets.table, sets.table[sets.table.draw]
    rows = []
    for flag, name in (("paper_top", "paper's top k"), ("null_top", "null-corrected top k")):
        for r in t[t[flag]].itertuples():
            row = dict(set=name, heads=r.heads, n_draws=len(draws))
            for group in ("spatial", "control"):
                value = getattr(r, f"{group}_accuracy_cost")
                p = place(value, getattr(draws, f"{group}_accuracy_cost"))
                row.update({f"{group}_cost": value, f"{group}_rank": p.rank, f"{group}_percentile": p.percentile})
            rows.append(row)
    return pd.DataFrame(rows)


def steering_summary(steer: Steering, subset: str = "all relations") -> pd.DataFrame:
    """Per steered feature and scale: the share of clean-"no" answers the + push turns to yes and of clean-"yes"
    answers the - push turns to no, both pushes' flip rates over all items, and the random directions' flip rate
    (mean and max over directions; same norm)."""
    f = steer.flips[steer.flips.subset == subset]
    rows = []
    for (name, scale), g in f.groupby(["feature", "scale"], sort=False):
        feat = g[g.kind == "feature"].set_index("vector")
        rand = g[g.kind == "random"].flip_rate
        plus, minus = feat.loc["+ (toward yes)"], feat.loc["- (toward no)"]
        rows.append(
            dict(
                feature=name,
                scale=scale,
                norm=float(g.norm.iloc[0]),
                plus_to_yes=plus.to_yes,
                minus_to_no=minus.to_no,
                plus_flip_rate=plus.flip_rate,
                minus_flip_rate=minus.flip_rate,
                random_mean=float(rand.mean()),
                random_max=float(rand.max()),
                n=int(plus.n),
            )
        )
    return pd.DataFrame(rows)
