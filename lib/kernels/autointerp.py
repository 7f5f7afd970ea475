"""Spatial probing, auto-interp from ground truth (METHOD.md, step 3): each feature is described by the ground-truth
attribute that best explains its top samples (`describe_feature`), and the description is scored by F1 on held-out
top samples against random negatives (`score_description`, `auto_interp`). This is the authors' protocol with world
attributes in place of an LLM; the LLM explainer and classifier are in `lib.kernels.llm_client`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from lib.kernels.ground_truth import describe_attribute
from lib.kernels.probing import TopSamples, feature_keys


class Description(NamedTuple):
    attribute: str | None
    text: str
    precision: float  # share of the description samples with the attribute
    base_rate: float  # share of all samples with the attribute
    expected_f1: float  # 2p / (1 + p + q): the F1 the scoring rule gives in expectation (see describe_feature)
    described: list[int]  # sample indices the description was made from
    heldout: list[int]  # the held-out positives, never looked at


def describe_feature(
    attributes: pd.DataFrame, top_indices: Sequence[int], n_heldout: int = 5, candidates: Sequence[str] | None = None
) -> Description:
    """A one-sentence description of a feature from its top samples (descending order), the last `n_heldout` of
    them held out for scoring (the authors describe from ranks 1-5 and score on ranks 6-10).

    The attribute chosen maximises 2p / (1 + p + q), p its share among the description samples, q its share among
    all samples (<NA> counts as absent): with n held-out positives at rate p and n random negatives at rate q, the
    expected counts are TP = np, FN = n(1 - p), FP = nq, so this is the F1 the scoring rule expects. It prefers
    attributes that are common among the top samples and rare elsewhere. Ties: the lower base rate, then the
    column order."""
    top = [int(i) for i in top_indices]
    if len(top) <= n_heldout:
        raise ValueError(f"describe_feature needs more than n_heldout = {n_heldout} top samples, got {len(top)}")
    described, heldout = top[: len(top) - n_heldout], top[len(top) - n_heldout :]
    cols = list(candidates) if candidates is not None else list(attributes.columns)
    label = attributes[cols].fillna(False).astype(bool)
    p = label.iloc[described].mean().to_numpy()
    q = label.mean().to_numpy()
    score = 2 * p / (1 + p + q)
    best = np.lexsort((np.arange(len(cols)), q, -score))[0]
    return Description(
        cols[best],
        describe_attribute(cols[best]),
        float(p[best]),
        float(q[best]),
        float(score[best]),
        described,
        heldout,
    )


def f1_score(pred: Sequence[int], label: Sequence[int]) -> float:
    """F1 = 2 TP / (2 TP + FP + FN); 0 when there is nothing to score (no positive predicted or present)."""
    pred, label = np.asarray(pred, dtype=bool), np.asarray(label, dtype=bool)
    tp, fp, fn = (pred & label).sum(), (pred & ~label).sum(), (~pred & label).sum()
    return float(2 * tp / (2 * tp + fp + fn)) if (2 * tp + fp + fn) else 0.0


def random_negatives(n_samples: int, exclude: Sequence[int], n: int, seed: int | Sequence[int]) -> list[int]:
    """`n` distinct random samples outside `exclude` (the feature's top samples), as the authors draw negatives:
    random data-set rows, labelled negative whatever the feature does on them."""
    pool = np.setdiff1d(np.arange(n_samples), np.asarray(list(exclude), dtype=int))
    assert len(pool) >= n, f"only {len(pool)} samples outside the top samples; {n} negatives asked"
    return sorted(int(i) for i in np.random.default_rng(seed).choice(pool, size=n, replace=False))


class Score(NamedTuple):
    f1: float
    tp: int
    fp: int
    fn: int
    tn: int


def score_description(
    attributes: pd.DataFrame, attribute: str, positives: Sequence[int], negatives: Sequence[int]
) -> Score:
    """The description predicts a sample positive if the sample has the attribute (<NA>: absent). Positives are the
    held-out top samples, negatives the random samples."""
    has = attributes[attribute].fillna(False).astype(bool).to_numpy()
    pred = np.concatenate([has[list(positives)], has[list(negatives)]])
    label = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    return Score(
        f1_score(pred, label),
        int((pred & label).sum()),
        int((pred & ~label).sum()),
        int((~pred & label).sum()),
        int((~pred & ~label).sum()),
    )


def auto_interp(
    top: TopSamples,
    attributes: pd.DataFrame,
    features=None,
    n_heldout: int = 5,
    n_negatives: int = 5,
    seed: int = 0,
    candidates: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Describe and score each feature (default: every feature of `top`). Negatives are drawn per feature from a
    generator seeded with (seed, layer, feature), so a feature's score does not depend on which others ran.
    A feature with too few top samples gets no description (NaN F1)."""
    keys = top.keys if features is None else feature_keys(features)
    rows = []
    for layer, feature in keys:
        idx = top.indices((layer, feature))
        row: dict[str, Any] = {"layer": layer, "feature": feature, "n_top": len(idx)}
        if len(idx) > n_heldout:
            d = describe_feature(attributes, idx, n_heldout, candidates)
            neg = random_negatives(len(attributes), idx, n_negatives, seed=[seed, layer, feature])
            s = score_description(attributes, d.attribute, d.heldout, neg)
            row.update(
                attribute=d.attribute,
                description=d.text,
                precision=d.precision,
                base_rate=d.base_rate,
                expected_f1=d.expected_f1,
                **s._asdict(),
                heldout=d.heldout,
                negatives=neg,
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=_AUTO_INTERP_COLUMNS)


_AUTO_INTERP_COLUMNS = [
    "layer", "feature", "n_top", "attribute", "description", "precision", "base_rate", "expected_f1",
    "f1", "tp", "fp", "fn", "tn", "heldout", "negatives",
]  # fmt: skip
