"""Spatial probing, ground truth (METHOD.md, step 3, beyond the paper; organism only): do the selected features
encode what the world says is in the image?

- `scene_attributes`, `sample_attributes`: boolean attributes of each sample's scene (and question);
  `describe_attribute`: the sentence an attribute stands for (the vocabulary of `lib.kernels.autointerp`).
- `feature_activations_under_prompts`: each feature's activation on each sample under the direction-free prompts
  (so the prompt names no relation); `auroc_table`: AUROC of every feature for every attribute on them;
  `relation_probe`: a linear probe over many features.
- `ground_truth_check`: final features against random ones, and the features the pipeline missed, each with the
  first filter that dropped it (`first_failed_filter`, under the selection's `Thresholds`).

Shape key: s = samples (data-set rows), f = features (columns of an activation matrix), a = attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from scipy import stats

from lib.kernels.adapter import VLM, prepare
from lib.kernels.probing import FeatureKey, FeatureMatrix, SampleSet, feature_keys, sequence_max
from lib.kernels.spatial_stats import final_set
from lib.sources import world as W

# ---------------------------------------------------------------------------------------------------------------
# Ground-truth attributes

# Relations between the two objects of a two-object scene, the pair taken in reading order (a = the object whose
# cell comes first, row by row, then column by column; b = the other). The order uses positions only, never
# identities, so a label is a fact about the image alone, which is all a direction-free prompt leaves the model.
# Under it "a below b" is impossible by construction (a's row is never lower), so "below" has no column; the two
# alignments are listed because, in reading order, "same row" is exactly "not above" and would otherwise only show
# up as an AUROC far below 0.5.
PAIR_RELATIONS = ("left of", "right of", "above", "same row", "same column")
_NUMBER_WORDS = dict(enumerate(W.NUMBERS))


def _pair_label(a: W.Obj, b: W.Obj, relation: str) -> bool:
    if relation == "same row":
        return a.row == b.row
    if relation == "same column":
        return a.col == b.col
    return W.holds(a, b, relation)


def scene_attributes(scenes: Sequence[W.Scene]) -> pd.DataFrame:
    """One row per scene, boolean attribute columns:

    - `relation:<r>` for r in PAIR_RELATIONS: two-object scenes only (pandas' nullable boolean, <NA> for other
      counts), a and b in reading order, label = holds(a, b, r) (lib.sources.world's strict comparison of grid cells);
    - `row:<top|middle|bottom>`, `column:<left|center|right>`: some object lies in that row / column;
    - `color:<c>`, `shape:<s>`: some object has that colour / shape;
    - `count:<k>`: the scene has exactly k objects (one column per count that occurs).
    """
    rows = []
    for scene in scenes:
        objs = sorted(scene.objects, key=lambda o: (o.row, o.col))
        row: dict[str, Any] = {}
        for r in PAIR_RELATIONS:
            row[f"relation:{r}"] = _pair_label(objs[0], objs[1], r) if len(objs) == 2 else pd.NA
        for i, name in enumerate(W.ROWS):
            row[f"row:{name}"] = any(o.row == i for o in objs)
        for i, name in enumerate(W.COLS):
            row[f"column:{name}"] = any(o.col == i for o in objs)
        for c in W.COLORS:
            row[f"color:{c}"] = any(o.color == c for o in objs)
        for s in W.SHAPES:
            row[f"shape:{s}"] = any(o.shape == s for o in objs)
        row["_count"] = len(objs)
        rows.append(row)
    df = pd.DataFrame(rows)
    for k in sorted(df["_count"].unique()) if len(df) else []:
        df[f"count:{k}"] = df["_count"] == k
    df = df.drop(columns="_count", errors="ignore")
    rel = [c for c in df.columns if c.startswith("relation:")]
    df[rel] = df[rel].astype("boolean")
    other = [c for c in df.columns if c not in rel]
    df[other] = df[other].astype(bool)
    return df


def sample_attributes(samples: Sequence[W.Sample], question: bool = False) -> pd.DataFrame:
    """`scene_attributes` of each sample's scene; with `question=True` also attributes of the sample's question,
    for describing top samples read with their own questions:
    `question:names <r>` (the question names relation r) and `question:<r> holds` (it names r and r holds for the
    pair it names: a yes answer of a relation / statement question, every what-is-<r> question)."""
    df = scene_attributes([s.scene for s in samples])
    if question:
        for r in W.RELATIONS:
            names = [s.relation == r for s in samples]
            holds = [s.relation == r and (s.qtype == "what_rel" or s.answer == "yes") for s in samples]
            df[f"question:names {r}"] = names
            df[f"question:{r} holds"] = holds
    return df


def describe_attribute(name: str) -> str:
    """The one-sentence description a ground-truth attribute stands for."""
    kind, _, value = name.partition(":")
    if kind == "relation":
        if value.startswith("same"):
            return f"fires on two-object scenes with both objects in the {value.removeprefix('same ')}"
        return (
            f"fires on two-object scenes where the first object in reading order (by row, then column) "
            f"is {value} the second"
        )
    if kind == "row":
        return f"fires on images with an object in the {value} row"
    if kind == "column":
        return f"fires on images with an object in the {value} column"
    if kind == "color":
        return f"fires on images with a {value} object"
    if kind == "shape":
        return f"fires on images with a {value}"
    if kind == "count":
        return f"fires on images with {_NUMBER_WORDS.get(int(value), value)} objects"
    if kind == "question":
        if value.startswith("names "):
            return f"fires on questions that name the relation '{value.removeprefix('names ')}'"
        return f"fires on questions about '{value.removesuffix(' holds')}' where the relation holds"
    raise ValueError(
        f"unknown attribute {name!r}; expected <kind>:<value> with kind in relation, row, column, "
        "color, shape, count, question"
    )


def _as_bool_matrix(attributes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(label_sa, valid_sa): nullable booleans to a label matrix and a mask of defined entries."""
    valid = ~attributes.isna().to_numpy()
    label = attributes.fillna(False).astype(bool).to_numpy()
    return label, valid


# ---------------------------------------------------------------------------------------------------------------
# Activations under the direction-free prompts, AUROC, linear probe


@torch.no_grad()
def feature_activations_under_prompts(
    vlm: VLM,
    encode_by_layer: Mapping[int, Callable],
    features,
    samples: SampleSet,
    prompts: Sequence[str] = W.GENERIC_PROMPTS,
    batch_size: int = 8,
) -> FeatureMatrix:
    """Per sample and feature: the MAXIMUM activation over the post-image positions (the prompt text after the
    image and the answer position), one value per direction-free prompt, then the MEAN over prompts.

    Max rather than mean over positions: a feature that reads the scene may fire at one position only (the last,
    where an answer would be formed), and the mean would dilute that by the prompt's length, which differs between
    prompts. Mean rather than max over prompts: it rewards a feature that fires under every wording, not under one.
    Memory: samples x features floats (4,000 x 8,000 is 128 MB); streaming over samples."""
    keys = feature_keys(features)
    prompts = tuple(prompts)
    acts_sf = torch.zeros(len(samples), len(keys))
    for start in range(0, len(samples), batch_size):
        stop = min(start + batch_size, len(samples))
        images = [samples.images[i] for i in range(start, stop)]
        for prompt in prompts:
            batch = prepare(vlm, images, [prompt] * (stop - start))
            acts_sf[start:stop] += sequence_max(vlm, encode_by_layer, keys, batch, ["post_image"])["post_image"]
    return FeatureMatrix(keys, acts_sf / len(prompts), prompts)


def auroc_table(acts_sf, attributes: pd.DataFrame, keys: Sequence[FeatureKey] | None = None, chunk: int = 2048):
    """AUROC of each feature's activation (column of acts_sf) as a score for each attribute (column of
    `attributes`, rows aligned with samples; <NA> entries are left out of that attribute's AUROC).

    Vectorised Mann-Whitney form: AUROC = (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0), ranks with
    ties averaged (scipy.stats.rankdata), which is what sklearn's roc_auc_score computes. NaN when an attribute has
    no positive or no negative sample. Returns one row per feature: layer and feature (when `keys` is given), one
    column per attribute, `best_attribute` / `best_auroc` (largest AUROC), and `best_relation` /
    `best_relation_auroc` over the `relation:` columns when there are any."""
    acts = acts_sf.numpy() if isinstance(acts_sf, torch.Tensor) else np.asarray(acts_sf)
    assert acts.ndim == 2 and acts.shape[0] == len(attributes), (
        f"acts_sf has {acts.shape[0] if acts.ndim == 2 else acts.shape} samples, attributes {len(attributes)} rows"
    )
    label_sa, valid_sa = _as_bool_matrix(attributes)
    n_f, names = acts.shape[1], list(attributes.columns)
    auc_fa = np.full((n_f, len(names)), np.nan)
    # Attributes that share a pattern of defined entries share one ranking (relations: the two-object scenes).
    groups: dict[bytes, list[int]] = {}
    for a in range(len(names)):
        groups.setdefault(np.packbits(valid_sa[:, a]).tobytes(), []).append(a)
    for cols in groups.values():
        valid = valid_sa[:, cols[0]]
        y_as = label_sa[valid][:, cols].T.astype(np.float64)
        n1 = y_as.sum(1)
        n0 = valid.sum() - n1
        for start in range(0, n_f, chunk):
            ranks_sf = stats.rankdata(acts[valid, start : start + chunk].astype(np.float64), axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                auc = (y_as @ ranks_sf - (n1 * (n1 + 1) / 2)[:, None]) / (n1 * n0)[:, None]
            auc[(n1 == 0) | (n0 == 0)] = np.nan
            auc_fa[start : start + chunk, cols] = auc.T
    table = pd.DataFrame(auc_fa, columns=names)
    _add_best(table, names, "best_attribute", "best_auroc")
    relations = [c for c in names if c.startswith("relation:")]
    if relations:
        _add_best(table, relations, "best_relation", "best_relation_auroc")
    if keys is not None:
        keys = feature_keys(keys)
        assert len(keys) == n_f, f"{len(keys)} keys for {n_f} feature columns"
        table.insert(0, "feature", [f for _, f in keys])
        table.insert(0, "layer", [layer for layer, _ in keys])
    return table


def relation_probe(
    inputs: Mapping[str, np.ndarray], attributes: pd.DataFrame, n_splits: int = 5, seed: int = 0, C: float = 0.1
) -> pd.DataFrame:
    """Cross-validated AUROC of a linear probe for each `relation:` attribute, from each named input matrix (rows
    aligned with `attributes`): standardised inputs, L2 logistic regression (inverse strength C), out-of-fold
    probabilities from stratified k-fold (scikit-learn). `auroc_table` asks whether one feature tracks a relation;
    this asks whether a set of them does jointly. Samples whose attribute is <NA> are left out; NaN where either
    class has fewer than `n_splits` samples. One row per input, one column per relation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    relations = [c for c in attributes.columns if c.startswith("relation:")]
    label_sa, valid_sa = _as_bool_matrix(attributes[relations])
    folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
    rows = {}
    for name, x in inputs.items():
        x = np.asarray(x, dtype=np.float64)
        assert x.shape[0] == len(attributes), f"{name}: {x.shape[0]} samples, attributes {len(attributes)} rows"
        row = {}
        for a, rel in enumerate(relations):
            valid = valid_sa[:, a]
            y = label_sa[valid, a].astype(int)
            if min(y.sum(), len(y) - y.sum()) < n_splits:
                row[rel] = np.nan
                continue
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
            p = cross_val_predict(probe, x[valid], y, cv=folds, method="predict_proba")[:, 1]
            row[rel] = roc_auc_score(y, p)
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index", columns=relations)


def _add_best(table: pd.DataFrame, columns: list[str], name_col: str, value_col: str) -> None:
    values = table[columns].to_numpy(dtype=float)
    defined = ~np.isnan(values).all(1)
    best = np.zeros(len(values), dtype=int)
    best[defined] = np.nanargmax(values[defined], axis=1)
    table[name_col] = [columns[b] if d else None for b, d in zip(best, defined, strict=True)]
    table[value_col] = np.where(defined, values[np.arange(len(values)), best], np.nan)


# ---------------------------------------------------------------------------------------------------------------
# Ground-truth check


class Thresholds(NamedTuple):
    """The selection's thresholds, to tell which filter dropped a feature. `cos_max`: the pooled percentile of
    decoder cosine (lib.kernels.diffing.pooled_percentile), a number or one value per row of the table."""

    eps: float
    cos_max: float | np.ndarray
    min_odds: float
    min_delta: float


FILTERS = ("visual_energy", "dec_cos", "odds_ratio", "delta_freq", "lexical")
_TABLE_COLUMNS = ("layer", "feature", "visual_energy", "dec_cos", "adapted", "odds_ratio", "delta_freq", "spatial")


def first_failed_filter(table: pd.DataFrame, th: Thresholds) -> pd.Series:
    """For each row, the first filter (in pipeline order, FILTERS) the feature fails, or None if it passes all.
    visual_energy: E_v <= eps; dec_cos: cos > cos_max; odds_ratio: OR < min_odds (NaN fails); delta_freq:
    delta < min_delta; lexical: the lexical flag is False or missing (the filter never ran on it)."""
    fails = {
        "visual_energy": ~(table["visual_energy"].to_numpy() > th.eps),
        "dec_cos": ~(table["dec_cos"].to_numpy() <= np.asarray(th.cos_max)),
        "odds_ratio": ~(table["odds_ratio"].fillna(0).to_numpy() >= th.min_odds),
        "delta_freq": ~(table["delta_freq"].to_numpy() >= th.min_delta),
        "lexical": ~table["lexical"].fillna(False).astype(bool).to_numpy(),
    }
    out = np.full(len(table), None, dtype=object)
    for name in reversed(FILTERS):  # the earliest failing filter is written last
        out[fails[name]] = name
    return pd.Series(out, index=table.index, name="dropped_by")


def _check_flags(table: pd.DataFrame, th: Thresholds) -> None:
    """The table's flags must be what the thresholds say, or the reasons would be wrong."""
    adapted = (table["visual_energy"].to_numpy() > th.eps) & (table["dec_cos"].to_numpy() <= np.asarray(th.cos_max))
    spatial = (table["odds_ratio"].fillna(0).to_numpy() >= th.min_odds) & (
        table["delta_freq"].to_numpy() >= th.min_delta
    )
    for col, expected in (("adapted", adapted), ("spatial", spatial)):
        bad = table[table[col].astype(bool).to_numpy() != expected]
        if len(bad):
            first = bad.iloc[0]
            raise ValueError(
                f"feature table column `{col}` disagrees with the thresholds {th} for {len(bad)} features "
                f"(e.g. layer {int(first.layer)} feature {int(first.feature)}); pass the thresholds that made it"
            )


class GroundTruthCheck(NamedTuple):
    per_feature: pd.DataFrame  # the table joined with the AUROC table, plus `final`, `group`, `dropped_by`
    summary: pd.DataFrame  # per group: n, mean / median / min / max best relation AUROC, share >= min_auroc
    missed: pd.DataFrame  # non-final features whose best relation AUROC >= min_auroc, with `dropped_by`
    missed_by_filter: pd.Series  # counts of `missed.dropped_by` over FILTERS


def ground_truth_check(
    table: pd.DataFrame,
    auroc: pd.DataFrame,
    th: Thresholds,
    n_random: int = 50,
    seed: int = 0,
    min_auroc: float = 0.9,
) -> GroundTruthCheck:
    """Does the selection find features that predict the true relation (METHOD.md, step 3, beyond the paper)?

    `table`: the per-feature table of one variant (columns `_TABLE_COLUMNS` and `lexical`); `auroc`: an
    `auroc_table` with layer and feature columns and `relation:` attributes, over the features to compare (only
    features in both take part). A feature's score is its best relation AUROC. Groups: `final` (adapted, spatial,
    lexical), `random adapted` (n_random adapted features outside the final set) and `random` (n_random features
    outside the final set), drawn with a fixed seed. `missed`: features outside the final set with score >=
    min_auroc, each with the first filter it failed."""
    missing = [c for c in (*_TABLE_COLUMNS, "lexical") if c not in table.columns]
    if missing:
        raise ValueError(f"ground_truth_check: the feature table lacks the columns {missing}")
    if "best_relation_auroc" not in auroc.columns or "layer" not in auroc.columns:
        raise ValueError("ground_truth_check: `auroc` must be an auroc_table with keys and `relation:` attributes")
    _check_flags(table, th)
    merged = table.merge(auroc, on=["layer", "feature"], how="inner", validate="one_to_one")
    merged["final"] = final_set(merged)
    merged["dropped_by"] = first_failed_filter(merged, th)
    assert (merged["dropped_by"].isna() == merged["final"]).all(), "final flag disagrees with the filters"
    rng = np.random.default_rng(seed)
    pools = {
        "final": merged.index[merged["final"]],
        "random adapted": merged.index[merged["adapted"].astype(bool) & ~merged["final"]],
        "random": merged.index[~merged["final"]],
    }
    merged["group"] = None
    picked = {}
    for group, pool in pools.items():
        if group != "final" and len(pool) > n_random:
            pool = pd.Index(np.sort(rng.choice(pool, size=n_random, replace=False)))
        picked[group] = pool
    relations = [c for c in auroc.columns if c.startswith("relation:")]
    rows = []
    for group, idx in picked.items():
        score = merged.loc[idx, "best_relation_auroc"]
        rows.append(
            {
                "group": group,
                "n": len(idx),
                "mean": score.mean(),
                "median": score.median(),
                "min": score.min(),
                "max": score.max(),
                f"share >= {min_auroc}": (score >= min_auroc).mean() if len(idx) else np.nan,
                **{f"mean {c}": merged.loc[idx, c].mean() for c in relations},
            }
        )
    for group in ("random", "random adapted", "final"):  # a feature in several pools is labelled by the narrowest
        merged.loc[picked[group], "group"] = group
    missed = merged[~merged["final"] & (merged["best_relation_auroc"] >= min_auroc)]
    counts = missed["dropped_by"].value_counts().reindex(list(FILTERS), fill_value=0)
    return GroundTruthCheck(merged, pd.DataFrame(rows), missed.reset_index(drop=True), counts)
