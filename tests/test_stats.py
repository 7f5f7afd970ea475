"""Selection and statistics of the diffing and probing chapters, on hand-made inputs."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from lib.kernels import diffing, lexical, spatial_stats


def _table():
    # two layers x four features of one variant, values chosen by hand
    return pd.DataFrame(
        {
            "layer": [0, 0, 0, 0, 1, 1, 1, 1],
            "feature": [0, 1, 2, 3, 0, 1, 2, 3],
            "dec_cos": [0.10, 0.90, 0.20, 0.95, 0.30, 0.99, 0.15, 0.80],
            "visual_energy": [0.50, 0.90, 0.005, 0.0, 0.02, 0.70, 0.40, 0.009],
        }
    )


def test_pooled_percentile_pools_over_layers():
    t = _table()
    assert diffing.pooled_percentile(t.dec_cos, 25) == pytest.approx(np.percentile(t.dec_cos, 25))
    # pooled 25th percentile of the 8 cosines is 0.1875: per-layer percentiles differ
    assert diffing.pooled_percentile(t.dec_cos, 25) == pytest.approx(0.1875)


def test_selection_rule_on_hand_made_table():
    t = _table()
    sel = diffing.select_adapted(t, eps=0.01, q=25)
    # cos <= 0.1875: (0,0) 0.10, (1,2) 0.15; (0,2) has cos 0.20 > 0.1875. Energies 0.50 and 0.40 > 0.01.
    assert next(iter(t[sel].itertuples(index=False, name=None)))[:2] == (0, 0)
    assert set(zip(t[sel].layer, t[sel].feature, strict=True)) == {(0, 0), (1, 2)}
    # the energy threshold is strict: raise eps above 0.40 and (1,2) drops out
    sel = diffing.select_adapted(t, eps=0.45, q=25)
    assert set(zip(t[sel].layer, t[sel].feature, strict=True)) == {(0, 0)}


def test_per_layer_percentile_differs_from_pooled():
    t = _table()
    per_layer = diffing.select_adapted(t, eps=0.0, q=50, per_layer=True)
    # layer 0 median cos 0.55 -> features 0, 2 (but 2 has energy 0.005 > 0); layer 1 median 0.55 -> 0, 2
    assert set(zip(t[per_layer].layer, t[per_layer].feature, strict=True)) == {(0, 0), (0, 2), (1, 0), (1, 2)}


def test_robustness_sweep_contains_default_with_jaccard_one():
    t = _table()
    sweep = diffing.robustness_sweep(t, [0.001, 0.01, 0.1], [25, 50], eps0=0.01, q0=25)
    row = sweep[(sweep.eps == 0.01) & (sweep.q == 25)].iloc[0]
    assert row.selected == 2 and row.jaccard == 1.0
    assert len(sweep) == 6 and (sweep.jaccard <= 1).all()


def test_feature_stats_visual_energy_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    z = torch.relu(torch.randn(50, 6, generator=g))
    img = torch.rand(50, generator=g) < 0.4
    acc = diffing.FeatureStats(6)
    acc.update(z[:20], img[:20])
    acc.update(z[20:], img[20:])  # streaming over two batches
    frame = acc.frame()
    direct = (z[img] ** 2).sum(0) / ((z**2).sum(0))
    np.testing.assert_allclose(frame.visual_energy, direct.numpy(), rtol=1e-6)
    np.testing.assert_allclose(frame.freq_img, (z[img] > 0).float().mean(0).numpy(), rtol=1e-6)
    # the raw sums in the table give back every derived column
    assert (frame.n_tokens_img == int(img.sum())).all() and (frame.n_tokens_txt == int((~img).sum())).all()
    np.testing.assert_array_equal(frame.visual_energy, frame.sum_sq_img / (frame.sum_sq_img + frame.sum_sq_txt))
    np.testing.assert_array_equal(frame.freq_txt, frame.n_fire_txt / frame.n_tokens_txt)
    np.testing.assert_array_equal(frame.mean_abs_img, frame.sum_abs_img / frame.n_tokens_img)


def test_dead_feature_has_zero_energy_not_nan():
    acc = diffing.FeatureStats(2)
    acc.update(torch.tensor([[0.0, 1.0], [0.0, 2.0]]), torch.tensor([True, False]))
    assert acc.frame().visual_energy.tolist() == [0.0, pytest.approx(0.2)]


def test_weight_diff_identical_and_rotated():
    W = torch.randn(5, 8)
    E = torch.randn(8, 5)
    same = diffing.weight_diff(W, W.clone(), E, E.clone())
    np.testing.assert_allclose(same.dec_cos, 1.0, atol=1e-12)
    np.testing.assert_allclose(same.dec_rel_l2, 0.0, atol=1e-12)
    flipped = diffing.weight_diff(W, -W, E, E)
    np.testing.assert_allclose(flipped.dec_cos, -1.0, atol=1e-12)
    np.testing.assert_allclose(flipped.dec_rel_l2, 2.0, atol=1e-12)


def test_fisher_matches_scipy_on_hand_made_counts():
    c_sp, c_gen, n_sp, n_gen = np.array([30, 5, 0, 12]), np.array([3, 5, 0, 0]), 100, 200
    t = spatial_stats.fisher_table(c_sp, n_sp, c_gen, n_gen)
    for i in range(3):
        if c_sp[i] == 0 and c_gen[i] == 0:
            continue
        ref = stats.fisher_exact([[c_sp[i], n_sp - c_sp[i]], [c_gen[i], n_gen - c_gen[i]]], alternative="greater")
        assert t.odds_ratio[i] == pytest.approx(ref.statistic)
        assert t.p_value[i] == pytest.approx(ref.pvalue)
    assert t.odds_ratio[0] == pytest.approx((30 * 197) / (70 * 3))
    assert np.isnan(t.odds_ratio[2]) and t.p_value[2] == 1.0
    assert np.isinf(t.odds_ratio[3])
    np.testing.assert_allclose(t.p_adj, stats.false_discovery_control(t.p_value, method="bh"))
    assert t.delta_freq[0] == pytest.approx(0.30 - 0.015)
    sel = spatial_stats.select_spatial(t, min_odds=3, min_delta=0.005)
    assert sel.tolist() == [True, False, False, True]


def test_firing_counts_stream():
    z = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 3.0]])
    sp = torch.tensor([True, False, True])
    acc = spatial_stats.FiringCounts(2)
    acc.update(z, sp)
    assert acc.c_sp.tolist() == [2, 1] and acc.c_gen.tolist() == [0, 0] and (acc.n_sp, acc.n_gen) == (2, 1)


def test_lexical_rule():
    assert lexical.lexical_survivors(torch.tensor([[0.5, 0.2], [0.3, 0.02]]), 0.01)
    assert not lexical.lexical_survivors(torch.tensor([[0.5, 0.2], [0.3, 0.0]]), 0.01)
