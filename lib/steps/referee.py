"""Chapter 7's steps: what the organism computes and where (probes), which SAE features carry it (the reference
set), and how much of that the paper's selection finds under each of its open choices (the referee).
Organism only: each step returns None on a profile without the generated world's ground truth."""

from __future__ import annotations

import pandas as pd

from lib.io.cache import load_table, save_table
from lib.steps.data import data_reads
from lib.steps.features import FLAG_READS, LEXICAL_READS, run_lexical_filter
from lib.steps.registry import step

TRUTH_READS = (*data_reads("relation"), "threads", "sae.batch_size")


@step("truth-probes", after=("models",), reads=(*TRUTH_READS, "referee.cv_folds"))
def truth_probes(ctx) -> pd.DataFrame | None:
    """Cross-validated probes of each ground-truth variable at each layer and position class, with the occupancy
    and shuffled-label controls (lib.kernels.truth.probe_table)."""
    from lib.kernels import truth as T

    P, D = ctx.P, ctx.data
    if D.samples is None:
        return None
    vlm = ctx.up("models")

    def build(out):
        samples = D.relation
        states = T.position_states(vlm, samples, batch_size=4 * P.sae.batch_size)
        table = T.probe_table(states, T.relation_labels(samples), T.occupancy_code(samples), P.referee.cv_folds, P.seed)
        save_table(out / "probes.parquet", table)

    return load_table(ctx.cached(build) / "probes.parquet")


@step("truth-scores", after=("models", "adapted-saes"), reads=TRUTH_READS)
def truth_scores(ctx) -> pd.DataFrame | None:
    """Every feature of every variant and layer at the answer position of the relation questions: its two-sided
    AUROC for "the asked relation holds" in each (relation, template) cell, its best relation's score, its firing
    rate (lib.kernels.truth.relation_scores)."""
    from lib.kernels import truth as T

    P, D = ctx.P, ctx.data
    if D.samples is None:
        return None
    vlm, adapted = ctx.up("models"), ctx.up("adapted-saes")

    def build(out):
        samples = D.relation
        labels = T.relation_labels(samples)
        saes = {(v, layer): sae for v, by_layer in adapted.saes.items() for layer, sae in by_layer.items()}
        codes = T.answer_codes(vlm, saes, samples, batch_size=4 * P.sae.batch_size)
        frames = []
        for (variant, layer), acts_nf in codes.items():
            scores = T.relation_scores(acts_nf, labels)
            scores.insert(0, "feature", range(len(scores)))
            scores.insert(0, "layer", layer)
            scores.insert(0, "variant", variant)
            frames.append(scores)
        save_table(out / "scores.parquet", pd.concat(frames, ignore_index=True))

    return load_table(ctx.cached(build) / "scores.parquet")


@step("truth-features", after=("truth-scores",), reads=("diffing.variant", "referee.min_auroc"), cached=False)
def truth_features(ctx) -> pd.DataFrame | None:
    """The followed variant's features with the `reference` flag: relation score >= referee.min_auroc."""
    scores = ctx.up("truth-scores")
    if scores is None:
        return None
    P = ctx.P
    rows = scores[scores.variant == P.diffing.variant].sort_values(["layer", "feature"]).reset_index(drop=True)
    rows["reference"] = rows.relation_score >= P.referee.min_auroc
    return rows


REFEREE_READS = (*FLAG_READS, "diffing.eps_grid", "diffing.q_grid", "probing.reading")


def _candidates(P, selection: pd.DataFrame):
    from lib.kernels import referee as R

    rows = R.choices(P.diffing.eps, P.diffing.q, P.diffing.eps_grid, P.diffing.q_grid, P.probing.reading)
    cands = R.selection_rows(selection, rows, P.diffing.eps, P.diffing.q, P.probing.min_odds, P.probing.min_delta)
    return rows, cands


@step(
    "referee-lexical",
    after=("models", "adapted-saes", "selection"),
    reads=(*REFEREE_READS, *LEXICAL_READS),
)
def referee_lexical(ctx) -> pd.DataFrame:
    """The paper's lexical filter (both readings) on every candidate of every referee row, so that each row's
    final set is the one the paper's pipeline would give under that choice."""
    from lib.kernels import referee as R
    from lib.kernels.probing import feature_keys

    P, vlm, adapted = ctx.P, ctx.up("models"), ctx.up("adapted-saes")
    table = ctx.up("selection").table
    keys = feature_keys(R.union_candidates(table, _candidates(P, table)[1]))

    def build(out):
        res = run_lexical_filter(ctx, vlm, adapted, keys, P.probing.reading)
        save_table(out / "lexical.parquet", res.table[["layer", "feature", "lexical_all", "lexical_image"]])

    return load_table(ctx.cached(build) / "lexical.parquet")


@step(
    "referee",
    after=("selection", "truth-features", "referee-lexical"),
    reads=(*REFEREE_READS, "referee.min_auroc"),
    cached=False,
)
def referee(ctx) -> dict | None:
    """{"rows": precision and recall of the final set under each choice against the reference set;
    "reference": the reference features with the pipeline's flags and the first filter that dropped each}."""
    from lib.kernels import referee as R

    truth = ctx.up("truth-features")
    if truth is None:
        return None
    P = ctx.P
    sel = ctx.up("selection")
    table = sel.table.merge(
        truth[["layer", "feature", "best_relation", "relation_score", "firing_rate", "reference"]],
        on=["layer", "feature"],
        how="left",
        validate="one_to_one",
    )
    rows, cands = _candidates(P, sel.table)
    summary = R.referee_table(table, rows, cands, ctx.up("referee-lexical"), table.reference)
    ref = table[table.reference].copy()
    ref["dropped_by"] = R.dropped_by(ref, P.diffing.eps, sel.cos_max, P.probing.min_odds, P.probing.min_delta)
    return {"rows": summary, "reference": ref.reset_index(drop=True), "table": table}
