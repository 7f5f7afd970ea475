"""Step 4: attribution of the final features to attention heads, its validation against exhaustive patching, and
the causal checks (ablations) on the statement benchmark and the control task."""

from __future__ import annotations

import time
from typing import NamedTuple

import pandas as pd

from lib.io.cache import load_json, load_table, save_table
from lib.steps.data import data_reads
from lib.steps.registry import step


class Attributed(NamedTuple):
    table: pd.DataFrame  # the features attributed: layer, feature, ... (rows of the selection table)
    fallback: bool  # True: the final set was empty and the adapted features with the highest visual energy stand in


def attributed_features(selection: pd.DataFrame, n_fallback: int = 3) -> Attributed:
    """The final features above layer 0 (layer 0 has no head below it). If there are none, the `n_fallback` adapted
    features with the highest visual energy, so that the method still runs (chapters say so loudly)."""
    final = selection[selection.final & (selection.layer >= 1)]
    if not final.empty:
        return Attributed(final, False)
    return Attributed(selection[selection.adapted & (selection.layer >= 1)].nlargest(n_fallback, "visual_energy"), True)


def features_of(adapted, variant: str, keys) -> list:
    """lib.kernels.attribution.Feature for each (layer, feature): the decoder row of the adapted SAE (layer 0 has
    no head below it and is left out)."""
    from lib.kernels.attribution import Feature
    from lib.kernels.probing import feature_keys

    saes = adapted.saes[variant]
    return [
        Feature(int(layer), saes[int(layer)].W_dec[int(f)].detach().float(), f"L{int(layer)}F{int(f)}")
        for layer, f in feature_keys(keys)
        if int(layer) >= 1
    ]


def mean_image(vlm, heldout, batch_size: int):
    """The corrupted run's image embedding: the mean projected image token over held-out images (never the images
    being corrupted: attribution runs on the statement benchmark)."""
    from lib.kernels.attribution import mean_image_embedding

    n = min(len(heldout), 256)
    return mean_image_embedding(vlm, [heldout[i][0] for i in range(n)], batch_size)


class HeadScores(NamedTuple):
    table: pd.DataFrame  # per feature x layer x head: attr_clean, attr_corrupt, exhaustive (the paper's score), *_total
    timing: dict  # wall seconds of attribution (both gradients) and of exhaustive patching, forwards counted


HEAD_READS = ("threads", "diffing.variant", "attribution.n_samples", "attribution.batch_size")


def validation_table(scores: HeadScores) -> pd.DataFrame:
    """Attribution against exhaustive patching: Spearman's rho over every (feature, head) pair for the paper's score
    with the clean and the corrupted gradient, and for the total effect; with the wall seconds of each method."""
    from scipy import stats

    H, t = scores.table, scores.timing
    pairs = [("attr_clean", "exhaustive"), ("attr_corrupt", "exhaustive"), ("attr_clean_total", "exhaustive_total")]
    table = pd.DataFrame(
        [
            dict(attribution=a, exhaustive=e, n_heads=len(H), spearman=stats.spearmanr(H[a], H[e]).statistic)
            for a, e in pairs
        ]
    )
    table["exhaustive_s"], table["attribution_s_per_variant"] = t["exhaustive_s"], t["attribution_s"] / 2
    return table


@step(
    "head-scores",
    after=("models", "adapted-saes", "selection"),
    reads=(*data_reads("statements", "heldout"), *HEAD_READS),
)
def head_scores(ctx) -> HeadScores:
    """Attribution patching (gradient at the clean and at the corrupted run) and exhaustive activation patching
    (one forward per head and per head x post-image position) of every attributed feature, on the first
    `n_samples` statements. Scores are means over samples; NaN at layers >= the feature's."""
    import torch

    from lib.kernels import attribution as AT
    from lib.kernels.adapter import iter_batches

    P, vlm, D, adapted = ctx.P, ctx.up("models"), ctx.data, ctx.up("adapted-saes")
    feats = features_of(adapted, P.diffing.variant, attributed_features(ctx.up("selection").table).table)
    A_ = P.attribution
    items = D.statements[: A_.n_samples]
    images, questions = [s.image for s in items], [s.question for s in items]

    def build(out):
        mean_d = mean_image(vlm, D.heldout, A_.batch_size)
        sums: dict[str, torch.Tensor] = {}
        timing = {"attribution_s": 0.0, "exhaustive_s": 0.0, "n_samples": len(items)}

        def add(name, t_flh):
            sums[name] = t_flh if name not in sums else sums[name] + t_flh

        for batch in iter_batches(vlm, images, questions, A_.batch_size):
            t = time.perf_counter()
            for grad_at in ("clean", "corrupt"):
                eff = AT.attribute(vlm, batch, feats, mean_d, gradient_at=grad_at)
                add(f"attr_{grad_at}", torch.stack([e.score_blh.double().sum(0) for e in eff]))
                add(f"attr_{grad_at}_total", torch.stack([e.total_blh.double().sum(0) for e in eff]))
                if grad_at == "clean":
                    add("resid_attr", torch.stack([e.resid_score_bl.double().sum(0) for e in eff]))
            timing["attribution_s"] += time.perf_counter() - t
            t = time.perf_counter()
            eff = AT.activation_patching(vlm, batch, feats, mean_d, per_position=True)
            add("exhaustive", torch.stack([e.score_blh.double().sum(0) for e in eff]))
            add("exhaustive_total", torch.stack([e.total_blh.double().sum(0) for e in eff]))
            timing["exhaustive_s"] += time.perf_counter() - t
        rows = []
        n = len(items)
        for fi, f in enumerate(feats):
            for layer in range(f.layer):
                for head in range(vlm.n_heads):
                    row = dict(feature=f.name, feature_layer=f.layer, layer=layer, head=head)
                    row.update({k: float(v[fi, layer, head]) / n for k, v in sums.items() if k != "resid_attr"})
                    rows.append(row)
        save_table(out / "heads.parquet", pd.DataFrame(rows))
        resid = [
            dict(feature=f.name, feature_layer=f.layer, layer=layer, score=float(sums["resid_attr"][fi, layer]) / n)
            for fi, f in enumerate(feats)
            for layer in range(f.layer)
        ]
        save_table(out / "resid.parquet", pd.DataFrame(resid))
        return timing

    art = ctx.cached(build)
    return HeadScores(
        load_table(art / "heads.parquet"), {**load_json(art / "info.json"), "resid": load_table(art / "resid.parquet")}
    )


class HeadRanking(NamedTuple):
    aggregate: object  # lib.kernels.attribution.Aggregate of the paper's score (clean gradient)
    top: list  # the top-k heads, best first
    table: pd.DataFrame  # layer, head, score: every scored head, best first
    feature_layers: pd.Series  # feature name -> its layer


def head_ranking(scores: pd.DataFrame, n_layers: int, n_heads: int, top_k: int, column="attr_clean") -> HeadRanking:
    """The paper's aggregation of one score column over features (lib.kernels.attribution.aggregate) and its top k."""
    import torch

    from lib.kernels import attribution as AT

    feature_layers = scores.groupby("feature").feature_layer.first()
    names = list(feature_layers.index)
    t = torch.full((len(names), n_layers, n_heads), float("nan"), dtype=torch.float64)
    for r in scores.itertuples():
        t[names.index(r.feature), r.layer, r.head] = getattr(r, column)
    agg = AT.aggregate(torch.nan_to_num(t, nan=0.0), torch.tensor(feature_layers.to_numpy()))
    k = min(top_k, int(torch.isfinite(agg.score_lh).sum()))
    top = AT.top_heads(agg.score_lh, k)
    table = (
        pd.DataFrame(
            [dict(layer=l, head=h, score=float(agg.score_lh[l, h])) for l in range(n_layers) for h in range(n_heads)]
        )
        .dropna()
        .sort_values("score", ascending=False)
    )
    return HeadRanking(agg, top, table, feature_layers)


def random_feature_keys(selection: pd.DataFrame, n_final: int, seed: int, most: int = 5) -> list:
    """The random-feature control: adapted features outside the final set, as many as the final set (at most 5)."""
    others = selection[selection.adapted & ~selection.final & (selection.layer >= 1)]
    picked = others.sample(min(n_final, len(others), most), random_state=seed)
    return list(picked[["layer", "feature"]].itertuples(index=False, name=None))


def answer_words(P) -> tuple[str, str]:
    return ("Yes", "No") if P.paper is not None else ("yes", "no")


@step(
    "causal-checks",
    after=("models", "adapted-saes", "selection", "head-scores"),
    reads=(
        *data_reads("statements", "controls", "heldout"),
        *HEAD_READS,
        "seed",
        "attribution.top_k",
        "attribution.n_random",
    ),
)
def causal_checks(ctx) -> pd.DataFrame:
    """The ablation table (lib.kernels.causal.causal_checks) on the statement benchmark and the control task: the
    top-k heads of the paper's score, each attributed feature projected out, and their random controls."""
    from lib.kernels import causal as CA
    from lib.kernels.adapter import iter_batches
    from lib.sources import world as W

    P, vlm, D, adapted = ctx.P, ctx.up("models"), ctx.data, ctx.up("adapted-saes")
    A_ = P.attribution
    sel = ctx.up("selection").table
    final = attributed_features(sel).table
    heads = head_ranking(ctx.up("head-scores").table, vlm.n_layers, vlm.n_heads, A_.top_k).top
    feats = features_of(adapted, P.diffing.variant, final)
    random_feats = features_of(adapted, P.diffing.variant, random_feature_keys(sel, len(final), P.seed))
    yes, no = answer_words(P)

    def build(out):
        ref = [D.heldout[i] for i in range(min(len(D.heldout), 256))]
        z_mean = CA.mean_z(vlm, iter_batches(vlm, [r[0] for r in ref], [r[1] for r in ref], A_.batch_size))
        # Control answers are scored among every colour and shape word (the organism's control task).
        candidates = {w: CA.single_token_id(vlm.tokenizer, w) for w in [*W.COLORS, *W.SHAPES]} if D.controls else None
        table = CA.causal_checks(
            vlm,
            D.statements,
            yes_id=CA.single_token_id(vlm.tokenizer, yes),
            no_id=CA.single_token_id(vlm.tokenizer, no),
            heads=heads,
            z_mean_lhk=z_mean,
            features=feats,
            random_features=random_feats,
            controls=D.controls,
            candidate_ids=candidates,
            n_random=A_.n_random,
            seed=P.seed,
            batch_size=A_.batch_size,
        )
        save_table(out / "causal.parquet", table)

    return load_table(ctx.cached(build) / "causal.parquet")
