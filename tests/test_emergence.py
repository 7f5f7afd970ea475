"""Emergence (lib/kernels/emergence.py): the base LM's codes at the answer position against a direct computation,
the relation statistic per relation, and the verdicts on constructed scores."""

import fakes
import numpy as np
import pandas as pd
import pytest
import torch

from lib.kernels import adapter as A
from lib.kernels import emergence as EM
from lib.kernels import truth as T
from lib.sources import world as W

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def samples():
    return W.make_samples(0, "em-test", 64, ("relation", "statement"), 16, n_objects=(2,))


def test_text_answer_codes_equal_a_direct_computation(samples):
    vlm = fakes.world_vlm(seed=0, n_layers=2, with_base_lm=True)
    g = torch.Generator().manual_seed(0)
    W_df = torch.randn(32, 12, generator=g)
    encoders = {0: lambda x: (x @ W_df).relu(), 1: lambda x: (x @ W_df + 0.1).relu()}
    codes = EM.text_answer_codes(vlm, encoders, samples[:5], batch_size=2)
    assert set(codes) == {0, 1} and codes[0].shape == (5, 12)
    for i, s in enumerate(samples[:5]):
        batch = A.prepare_text(vlm, [s.scene.caption()], [s.question])
        resid = A.resid_stream(vlm, batch, [0, 1])  # runs the base LM: a text-only batch
        for layer, encode in encoders.items():
            want = encode(resid[A.resid_name(layer)][0, -1])
            np.testing.assert_allclose(codes[layer][i], want.numpy(), atol=1e-5, rtol=1e-5)


def test_relation_table_scores_a_planted_feature_on_its_relation(samples):
    labels = T.relation_labels(samples)
    truth = labels.truth.to_numpy(float)
    is_left = (labels.relation == "left of").to_numpy()
    # 0: the truth of "left of" questions (and noise elsewhere); 1: never fires; 2: the truth of every question.
    rng = np.random.default_rng(0)
    z = np.stack([np.where(is_left, truth, rng.random(len(labels))), np.zeros(len(labels)), 2 * truth], 1)
    table = EM.relation_table({3: z}, labels)  # scored by lib.kernels.truth.relation_scores
    assert table.layer.tolist() == [3, 3, 3] and table.feature.tolist() == [0, 1, 2]
    assert table.loc[0, "score:left of"] == 1.0 and table.loc[0, "best_relation"] == "left of"
    assert table.loc[0, "score:above"] < 0.9
    assert table.loc[1, "relation_score"] == 0.5  # a silent feature is at chance
    assert (table.loc[2, [f"score:{r}" for r in W.RELATIONS]] == 1.0).all()
    per_rel = EM.relation_columns(table)
    np.testing.assert_array_equal(per_rel["left of"], table["score:left of"])
    assert (table.relation_score == per_rel.max(axis=1)).all(), "relation_score is the best relation's score"


def test_emergence_verdicts_on_constructed_scores():
    base = pd.DataFrame(
        {
            "layer": [2, 2, 3, 3],
            "feature": [0, 1, 0, 1],
            "score:left of": [0.95, 0.50, 0.90, 0.99],
            "score:right of": [0.50, 0.50, 0.50, 0.50],
            "score:above": [0.50, 0.97, 0.50, 0.50],
            "score:below": [0.50, 0.50, 0.89, 0.50],
            "best_relation": ["left of", "above", "left of", "left of"],
            "relation_score": [0.95, 0.97, 0.90, 0.99],
            "firing_rate": [0.5, 0.2, 0.3, 0.4],
        }
    )
    reference = pd.DataFrame(
        dict(
            layer=[2, 2, 3, 3],
            feature=[0, 1, 0, 1],
            best_relation=["left of", "left of", "below", "right of"],
            relation_score=[0.99, 0.95, 0.93, 1.0],
        )
    )
    em = EM.emergence(reference, base, threshold=0.9)
    # (2, 0): the base feature carries the same relation -> reused; (2, 1): the base feature carries another relation
    # only -> new; (3, 0): just below the bar -> new; (3, 1): strong in base, but for another relation -> new.
    assert em.verdict.tolist() == ["reused", "new", "new", "new"]
    assert em.base_score.tolist() == [0.95, 0.50, 0.89, 0.50]
    assert em.base_best_relation.tolist() == ["left of", "above", "left of", "left of"]
    assert em.adapted_score.tolist() == [0.99, 0.95, 0.93, 1.0]
    at_bar = EM.emergence(reference.iloc[[2]].assign(best_relation="left of"), base, threshold=0.9)
    assert at_bar.verdict.item() == "reused", "a base score equal to the threshold clears it"
    assert set(em.verdict) <= set(EM.VERDICTS)
    with pytest.raises(AssertionError, match="not in the base table"):
        EM.emergence(reference.assign(feature=7), base, 0.9)
