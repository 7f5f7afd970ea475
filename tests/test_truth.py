"""Chapter 7's statistics recover planted answers (lib/kernels/truth.py, lib/kernels/referee.py): a feature built to
carry a relation is found, the occupancy control explains a code built from occupancy, shuffled labels sit at
chance, and the referee's precision and recall count what they should."""

import numpy as np
import pandas as pd
import pytest

from lib.kernels import referee as R
from lib.kernels import truth as T
from lib.sources import world as W


@pytest.fixture(scope="module")
def samples():
    return W.make_samples(0, "test-truth", 320, ("relation", "statement"), 16, (2,))


def test_labels_follow_the_scene(samples):
    labels = T.relation_labels(samples)
    assert len(labels) == len(samples) and set(labels.template) == {"relation", "statement"}
    for s, row in zip(samples, labels.itertuples(), strict=True):
        a = s.scene.by_shape(s.subject)
        assert (row.subject_row, row.subject_col) == (a.row, a.col)
        assert row.truth == ((s.subject, s.relation, s.obj) in s.scene.relations)
    occ = T.occupancy_code(samples)
    assert occ.shape == (len(samples), 15) and (occ[:, 6:].sum(1) == 2).all()  # two objects, two cells


def test_a_feature_built_to_carry_a_relation_is_found(samples):
    labels = T.relation_labels(samples)
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.normal(size=(len(samples), 6)), 0)  # noise features
    left = (labels.relation == "left of").to_numpy()
    acts[:, 2] = np.where(left & labels.truth.to_numpy(), 3.0, 0.0)  # fires when "left of" holds
    acts[:, 4] = np.where(labels.truth.to_numpy(), 0.0, 2.0) + 0.01 * rng.normal(size=len(samples))  # "it fails"
    scores = T.relation_scores(acts, labels)
    assert scores.relation_score[2] == pytest.approx(1.0) and scores.best_relation[2] == "left of"
    assert scores.relation_score[4] > 0.99 and scores.truth_score[4] > 0.99  # two-sided: firing on "false" counts
    assert scores.relation_score[[0, 1, 3, 5]].max() < 0.8
    matched = T.matched_random(scores.assign(layer=0), scores.index.isin([2]), n=1, seed=0)
    assert len(matched) == 1 and matched.index[0] != 2


def test_the_occupancy_control_explains_a_code_built_from_occupancy(samples):
    labels = T.relation_labels(samples)
    occ = T.occupancy_code(samples)
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(occ.shape[1], 24))
    states = {"from occupancy": (occ @ mix + 0.01 * rng.normal(size=(len(samples), 24)))[:, None, :]}
    table = T.probe_table(states, labels, occ, folds=4, seed=0, variables=("subject_row", "truth"))
    for row in table.itertuples():
        # a linear image of the occupancy code reads no more than the occupancy code itself
        assert row.auroc <= row.occupancy + 0.03, row
        assert abs(row.shuffled - 0.5) < 0.1
    # and a code that carries the truth itself beats the control
    carries = {"truth": labels.truth.to_numpy(float)[:, None, None] + 0.1 * rng.normal(size=(len(samples), 1, 1))}
    t = T.probe_table(carries, labels, occ, folds=4, seed=0, variables=("truth",)).iloc[0]
    assert t.auroc > 0.95 > t.occupancy


def test_the_referee_counts_precision_and_recall():
    table = pd.DataFrame(
        dict(
            layer=[0] * 6,
            feature=range(6),
            variant="text-only",
            visual_energy=[0.5, 0.5, 0.5, 0.0, 0.5, 0.5],
            visual_energy_raw=[0.5] * 6,
            dec_cos=[0.1, 0.1, 0.9, 0.1, 0.15, 0.1],
            odds_ratio=[5.0, 5.0, 5.0, 5.0, 1.0, 5.0],
            delta_freq=[0.1] * 6,
        )
    )
    rows = R.choices(0.01, 50.0, [0.01], [50.0], "all")
    cands = R.selection_rows(table, rows, 0.01, 50.0, 3.0, 0.005)
    first = next(iter(cands.values()))
    assert first.tolist() == [True, True, False, False, False, True]  # rotated, visual and spatial
    every = R.union_candidates(table, cands)  # what the lexical filter must see: feature 3 too (raw-energy row)
    assert every.feature.tolist() == [0, 1, 3, 5]
    lexical = every.assign(lexical_all=[True, False, True, True], lexical_image=True)
    reference = pd.Series([True, True, True, False, False, False])
    out = R.referee_table(table, rows, cands, lexical, reference).set_index("choice")
    paper = out.iloc[0]
    assert (paper.final, paper.found, paper.precision, paper.recall) == (2, 1, 0.5, pytest.approx(1 / 3))
    assert out.loc["lexical filter"].final == 3
    dropped = R.dropped_by(table.assign(lexical=[True, False, True, True, True, True]), 0.01, 0.2, 3.0, 0.005)
    passes = [x if isinstance(x, str) else None for x in dropped]  # None (passes every filter) may read back as NaN
    assert passes == [None, "lexical", "dec_cos", "visual_energy", "odds_ratio", None]
