"""Chapter 7, items 4 and 5 of the referee (organism only; on the paper's data each step returns None):

- `referee-lexical-vocab`: the paper's lexical filter on the same candidates and top samples, re-run with
  direction-free prompts in the organism's own words (`lib.kernels.counterfactual.IN_VOCAB_PROMPTS`) and read over
  the prompt text after the image as well (`post_image`), beside the paper's two readings.
- `referee-counterfactual`: every feature of the followed variant at every layer, on relation questions and their
  object-swap and word-swap twins (lib.kernels.counterfactual): how far each swap moves it, its class under the
  corrected lexical rule, and the organism's own answers on the twins.
- `base-relation-scores`: every feature of the base SAE on the base LM, with the layout stated in words, scored by
  the relation statistic of the reference set (lib.kernels.emergence).
- `emergence`: per reference feature (the step "truth-features"), its score beside the same-index base feature's,
  and the verdict: new in fine-tuning, or reused.

This module follows lib/steps/referee.py (STEP_MODULES): `emergence` follows its step "truth-features".
"""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd

from lib.io.cache import load_table, save_table
from lib.steps.data import data_reads
from lib.steps.features import FLAG_READS, LEXICAL_READS, run_lexical_filter, selection_table
from lib.steps.registry import step
from lib.steps.saes import encoders


class LexicalVocab(NamedTuple):
    table: pd.DataFrame  # per candidate: min_best_* and lexical_* of the readings all, image and post_image
    max_sp: pd.DataFrame  # per candidate, top sample, prompt and reading: the maximum activation
    prompts: tuple[str, ...]


@step(
    "referee-lexical-vocab",
    after=("models", "adapted-saes", "feature-table", "spatial-stats", "lexical"),
    reads=(*LEXICAL_READS, *FLAG_READS),
)
def lexical_vocab(ctx) -> LexicalVocab | None:
    """The lexical filter with in-vocabulary prompts and the post-image reading, on the lexical step's candidates
    and top samples (so only the prompts and the reading differ from the paper's filter)."""
    from lib.kernels import counterfactual as CF
    from lib.kernels.probing import ALL_READINGS, TopSamples, feature_keys

    P, D = ctx.P, ctx.data
    if D.samples is None:
        return None
    vlm, adapted, lex = ctx.up("models"), ctx.up("adapted-saes"), ctx.up("lexical")
    table, _ = selection_table(P, ctx.up("feature-table"), ctx.up("spatial-stats"))
    keys = feature_keys(table[table.adapted & table.spatial][["layer", "feature"]])

    def build(out):
        res = run_lexical_filter(
            ctx,
            vlm,
            adapted,
            keys,
            "post_image",
            CF.IN_VOCAB_PROMPTS,
            top=TopSamples.from_frame(lex.top, keys, "text"),
            readings=ALL_READINGS,
        )
        save_table(out / "lexical.parquet", res.table)
        acts = [
            dict(layer=k[0], feature=k[1], reading=r, rank=s, prompt=p, max_act=float(m[s, p]))
            for r, by_key in res.max_sp.items()
            for k, m in by_key.items()
            for s in range(m.shape[0])
            for p in range(m.shape[1])
        ]
        cols = ["layer", "feature", "reading", "rank", "prompt", "max_act"]
        save_table(out / "max_sp.parquet", pd.DataFrame(acts, columns=cols))

    art = ctx.cached(build)
    return LexicalVocab(load_table(art / "lexical.parquet"), load_table(art / "max_sp.parquet"), CF.IN_VOCAB_PROMPTS)


class Counterfactual(NamedTuple):
    table: pd.DataFrame  # per position (answer, post_image), layer and feature: sensitivities and class
    pairs: pd.DataFrame  # per relation and template: questions asked, pairs kept (the truth flips)
    answers: pd.DataFrame  # the organism's accuracy on originals and twins, and how often its answer flips


@step(
    "referee-counterfactual",
    after=("models", "adapted-saes"),
    reads=(*data_reads("counterfactual"), "threads", "sae.batch_size", "diffing.variant"),
)
def counterfactual(ctx) -> Counterfactual | None:
    """Every feature of the followed variant on the relation questions of the counterfactual split and their twins;
    the sensitivities are cached, the classes follow from them under `LexicalRule()` (lib.kernels.counterfactual)."""
    from lib.kernels import counterfactual as CF

    P, D = ctx.P, ctx.data
    if D.samples is None:
        return None
    vlm, adapted = ctx.up("models"), ctx.up("adapted-saes")

    def build(out):
        twins = CF.make_twins(D.counterfactual)
        n = len(twins.original)
        readout = CF.twin_readout(
            vlm,
            encoders(adapted.saes[P.diffing.variant]),
            [*twins.original, *twins.image, *twins.word],
            batch_size=P.sae.batch_size,
        )
        parts = CF.split_readout(readout, n)
        save_table(out / "sensitivity.parquet", CF.sensitivity_table(parts, twins.direction_n))
        save_table(out / "pairs.parquet", twins.summary)
        save_table(out / "answers.parquet", CF.answer_follow(parts, twins))

    art = ctx.cached(build)
    table = CF.classify(load_table(art / "sensitivity.parquet"))
    return Counterfactual(table, load_table(art / "pairs.parquet"), load_table(art / "answers.parquet"))


@step(
    "base-relation-scores",
    after=("models", "base-saes"),
    reads=(*data_reads("relation"), "threads", "sae.batch_size"),
)
def base_relation_scores(ctx) -> pd.DataFrame | None:
    """Every feature of the base SAE at the answer position of the base LM on `lm_prompt(caption, question)` for the
    referee's relation questions, scored per relation as the reference set is (lib.kernels.emergence)."""
    from lib.kernels import emergence as EM
    from lib.kernels.truth import relation_labels

    P, D = ctx.P, ctx.data
    if D.samples is None:
        return None
    vlm, base = ctx.up("models"), ctx.up("base-saes")

    def build(out):
        samples = D.relation
        codes = EM.text_answer_codes(vlm, encoders(base.saes), samples, batch_size=P.sae.batch_size)
        save_table(out / "scores.parquet", EM.relation_table(codes, relation_labels(samples)))

    return load_table(ctx.cached(build) / "scores.parquet")


@step("emergence", after=("base-relation-scores", "truth-features"), reads=("referee.min_auroc",), cached=False)
def emergence(ctx) -> pd.DataFrame | None:
    """Per reference feature: adapted score, the base feature's score for the same relation, verdict (reused if
    it reaches referee.min_auroc, the bar of the reference set; lib.kernels.emergence.emergence)."""
    from lib.kernels import emergence as EM

    truth, base = ctx.up("truth-features"), ctx.up("base-relation-scores")
    if truth is None or base is None:
        return None
    return EM.emergence(truth[truth.reference], base, ctx.P.referee.min_auroc)
