"""lib/kernels/head_sweep.py and head_checks.py: every statistic of chapter 7's head checks recovers a planted answer.

Synthetic score tensors (the null and its correction), constructed tables (placement, within-feature Spearman) and
a tiny organism-shaped LLaVA (tests/fakes.py) with one head built to dominate: its output is scaled up, so it
decides the answers, and the sweep, the set control and sufficiency must all put it first.
"""

import dataclasses
import math

import fakes
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from lib.kernels import adapter as A
from lib.kernels import attribution as AT
from lib.kernels import head_checks as HC
from lib.kernels import head_sweep as HS
from lib.sources import organism as O
from lib.sources import world

torch.set_num_threads(1)
PLANTED = (0, 2)  # (layer, head) built to decide the fake's answers (layer 0: no head upstream of it)
QTYPES = ("color", "count", "where", "relation")  # two control types, two spatial ones, one template each


# ---------------------------------------------------------------------------------------------------------------
# The uniform-spread null


def test_uniform_null_equals_the_closed_form():
    layers_f = [1, 2, 2, 3, 3, 3]
    null = HS.uniform_null(layers_f, n_layers=4, n_heads=4)
    for l in range(4):
        above = [L for L in layers_f if L > l]
        expect = np.mean([1 / (L * 4) for L in above]) if above else np.nan
        np.testing.assert_allclose(null[l].numpy(), expect, rtol=1e-12)
    # The review's numbers: the organism's 33 features (14 at layer 1, 14 at layer 2, 5 at layer 3) spread uniformly
    # give 0.172 per head at layer 0 and 1 / 12 = 0.083 at layer 2.
    organism = HS.uniform_null([1] * 14 + [2] * 14 + [3] * 5, 4, 4)
    assert round(organism[0, 0].item(), 3) == 0.172 and round(organism[2, 0].item(), 3) == 0.083


def test_null_correction_puts_a_planted_deep_head_first():
    gen = torch.Generator().manual_seed(0)
    layers_f = torch.tensor([1] * 5 + [2] * 5 + [3] * 5)
    score_flh = torch.zeros(15, 4, 4, dtype=torch.float64)
    for i, L in enumerate(layers_f.tolist()):
        score_flh[i, :L] = 1 + 0.05 * torch.rand(L, 4, generator=gen, dtype=torch.float64)  # about uniform
        if L == 3:
            score_flh[i, 2, 1] += 0.6  # the planted head routes the deep features
    agg = AT.aggregate(score_flh, layers_f)
    assert AT.top_heads(agg.score_lh, 1)[0][0] == 0, "the raw aggregate favours layer 0 for its depth alone"
    corrected = HS.null_corrected(agg.score_lh, layers_f)
    assert AT.top_heads(corrected, 1) == [(2, 1)]
    # A set of uniformly spread features scores exactly its null.
    uniform = AT.aggregate(torch.ones(15, 4, 4, dtype=torch.float64), layers_f).score_lh
    np.testing.assert_allclose(HS.null_corrected(uniform, layers_f)[:3].numpy(), 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Placement and the random-set distribution


def test_place_gives_rank_and_mid_rank_percentile():
    dist = [0.0, 1.0, 1.0, 2.0, 5.0]
    assert HS.place(5.0, dist) == HS.Placement(1, 0.9, 5)
    assert HS.place(1.0, dist) == HS.Placement(3, 0.4, 5)
    assert HS.place(9.0, dist).rank == 1 and HS.place(9.0, dist).percentile == 1.0
    assert HS.place(-1.0, dist) == HS.Placement(6, 0.0, 5)


@pytest.mark.parametrize("specific", [True, False])
def test_the_head_claim_states_only_what_the_numbers_show(specific):
    """Chapter 7's head row: the paper's top set is called spatial-specific only where it sits high on spatial cost
    and low on control cost among random sets; a best head above the scored layers, and a null-corrected set that
    differs from the paper's, are named only when they are so."""
    from lib.steps import referee_heads as RH

    costs = pd.DataFrame(
        dict(
            layer=[0, 0, 3],
            head=[0, 1, 1],
            spatial_accuracy_cost=[9.0, 2.0, 16.0],
            control_accuracy_cost=[0.0, 0.0, 0.0],
        )
    )
    costs["rank_specific"] = [2, 3, 1]
    row = lambda name, sp, cp: dict(  # noqa: E731
        set=name, n_draws=100, spatial_rank=1, spatial_percentile=sp, control_rank=50, control_percentile=cp
    )
    paper = row("paper's top k", 0.99, 0.2) if specific else row("paper's top k", 0.99, 0.9)
    placement = pd.DataFrame([paper, row("null-corrected top k", 0.7, 0.2)])
    sets = RH.HeadSets(table=pd.DataFrame(), info={"eligible": ["L0H0", "L0H1", "L1H0", "L1H1"]})
    claim = RH.head_claim(costs, placement, sets, [(0, 0), (0, 1)], [(0, 0), (1, 1)])
    assert "most spatial-specific single head L3H1" in claim["ground_truth"]
    assert ("is spatial-specific" in claim["why"]) == specific
    assert ("costs the control types too" in claim["why"]) == (not specific)
    assert "L3H1 is in layer 3, above every layer the attribution scores (0-1" in claim["why"]
    assert "becomes L0H0, L1H1" in claim["why"]
    same = RH.head_claim(costs[costs.layer == 0], placement, sets, [(0, 0), (0, 1)], [(0, 1), (0, 0)])
    assert "above every layer" not in same["why"] and "becomes" not in same["why"]


def test_head_sets_are_exhaustive_when_few_and_drawn_otherwise():
    heads = [(l, h) for l in range(3) for h in range(4)]
    sets, exhaustive = HS.head_sets(heads, 2, n_draws=500, seed=0)
    assert exhaustive and len(sets) == math.comb(12, 2) == len(set(sets))
    heads = [(l, h) for l in range(4) for h in range(4)]
    drawn, exhaustive = HS.head_sets(heads, 4, n_draws=1500, seed=1)  # of 1,820 sets
    assert not exhaustive and len(drawn) == 1500
    assert all(len(set(s)) == 4 and set(s) <= set(heads) for s in drawn)
    # With additive costs, the drawn distribution's quantiles approach the exact ones over all 1,820 sets.
    cost = {h: float(i) for i, h in enumerate(heads)}
    exact = [sum(cost[h] for h in s) for s in HS.head_sets(heads, 4, n_draws=10**6, seed=0)[0]]
    assert len(exact) == math.comb(16, 4)
    approx = [sum(cost[h] for h in s) for s in drawn]
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(approx, q) - np.quantile(exact, q)) <= 1.0
    # The top set of the exact distribution ranks first, the bottom one last.
    top = max(exact)
    assert HS.place(top, exact).rank == 1 and HS.place(min(exact), exact).percentile < 0.01


# ---------------------------------------------------------------------------------------------------------------
# Within-feature Spearman


def test_within_feature_spearman_on_a_constructed_table():
    rows = []
    for name, a, b, scale in (
        ("agree", [1, 2, 3, 4], [1, 2, 3, 4], 100.0),
        ("reversed", [1, 2, 3, 4], [4, 3, 2, 1], 1.0),
        ("partly", [1, 2, 3, 4], [2, 1, 4, 3], 0.01),
    ):
        rows += [
            dict(feature=name, feature_layer=1, attr_clean=scale * x, exhaustive=scale * y)
            for x, y in zip(a, b, strict=True)
        ]
    table = pd.DataFrame(rows)
    per = HC.within_feature_spearman(table).set_index("feature").spearman
    assert per.to_dict() == pytest.approx({"agree": 1.0, "reversed": -1.0, "partly": 0.6})
    summary = HC.spearman_summary(HC.within_feature_spearman(table))
    assert summary == pytest.approx(dict(n_features=3, median=0.6, min=-1.0, max=1.0))
    # Pooled over features of different magnitudes, the same table looks far better than it is.
    assert stats.spearmanr(table.attr_clean, table.exhaustive).statistic > 0.8


# ---------------------------------------------------------------------------------------------------------------
# The model-level statistics on a fake with a planted dominant head


def image_direction(v_nk: torch.Tensor, groups) -> torch.Tensor:
    """The unit direction of largest variance of `v_nk` within groups, orthogonal to every group's mean (so that the
    projection on it is zero on average in each group, and varies with the image only)."""
    groups = np.asarray(groups)
    means = torch.stack([v_nk[torch.as_tensor(groups == g)].mean(0) for g in sorted(set(groups))])
    basis = torch.linalg.qr(means.T).Q
    within = torch.cat(
        [v_nk[torch.as_tensor(groups == g)] - v_nk[torch.as_tensor(groups == g)].mean(0) for g in set(groups)]
    )
    within = within - (within @ basis) @ basis.T
    return torch.linalg.svd(within, full_matrices=False).Vh[0]


def plant(vlm, samples, layer, head, gain=60.0):
    """Make head (`layer`, `head`) decide yes / no: its output map becomes c u w^T, with w the image-driven direction
    of its z at the answer position, and the unembeddings of yes and no become +u and -u."""
    batch = A.prepare(vlm, [s.scene.render() for s in samples], [s.question for s in samples])
    z_bk = A.capture(vlm, batch, z_layers=[layer]).z[A.z_name(layer)][
        torch.arange(len(samples)), batch.lengths_b - 1, head
    ]
    templates = [f"{s.qtype}/{int(n)}" for s, n in zip(samples, batch.lengths_b, strict=True)]
    w_k = image_direction(z_bk.double(), templates).float()
    u_d = torch.nn.functional.normalize(torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(7)), dim=0)
    c = gain / float((z_bk @ w_k).std())
    d_head = vlm.d_head
    yes, no = (vlm.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    with torch.no_grad():
        A.decoder(vlm.model).layers[layer].self_attn.o_proj.weight[:, head * d_head : (head + 1) * d_head] = (
            c * torch.outer(u_d, w_k)
        )
        vlm.model.lm_head.weight[yes] = 5 * u_d
        vlm.model.lm_head.weight[no] = -5 * u_d
    return vlm


@pytest.fixture(scope="module")
def planted():
    vlm = fakes.world_vlm(seed=3, n_layers=3, with_base_lm=False)
    samples = world.make_samples(0, "plant", 96, qtypes=QTYPES) + world.make_samples(
        0, "plant-rel", 32, qtypes=("relation",), n_objects=(2,)
    )
    return plant(vlm, samples, *PLANTED)


def own_answers(vlm, samples):
    """The samples with each answer replaced by the fake's own first-token prediction (one word), so the clean
    accuracy is 1 and every cost is the ablation's."""
    items = HS.encode_items(vlm.model, vlm.tokenizer, samples)
    with torch.no_grad():
        logits = O.vlm_forward(vlm.model, items.text, items.embeds_ind).logits
    first_b = items.text.answer_mask_bs.int().argmax(1)
    pred = logits[torch.arange(len(samples)), first_b - 1].argmax(-1)
    words = vlm.tokenizer.convert_ids_to_tokens(pred.tolist())
    # An answer is a word: items whose prediction is a special token are left out.
    return [
        dataclasses.replace(s, answer=w)
        for s, w in zip(samples, words, strict=True)
        if w in world.VOCAB[len(world.SPECIAL_TOKENS) :]
    ]


def test_matched_means_of_the_items_themselves_are_a_no_op(planted):
    # One item per template: its matched mean is its own z at every position, so no head's ablation costs anything.
    samples = own_answers(planted, world.make_samples(0, "sweep", len(QTYPES), qtypes=QTYPES))
    items = HS.encode_items(planted.model, planted.tokenizer, samples)
    assert len(set(items.template_i)) == len(samples)
    means = HS.matched_means(planted.model, items)
    sweep = HS.head_sweep(planted.model, items, means, [(0, 0), PLANTED])
    assert (sweep.accuracy == 1.0).all()
    np.testing.assert_allclose(
        sweep.p_correct.to_numpy(), sweep.p_correct.iloc[0 : len(QTYPES)].tolist() * 3, rtol=1e-5
    )


def test_bos_is_never_patched_and_a_missing_template_falls_back(planted):
    samples = world.make_samples(0, "sweep", 8, qtypes=QTYPES)
    items = HS.encode_items(planted.model, planted.tokenizer, samples)
    reference = HS.encode_items(planted.model, planted.tokenizer, [s for s in samples if s.qtype != "count"])
    means = HS.matched_means(planted.model, reference)
    assert HS.n_fallback(means, items) == sum(s.qtype == "count" for s in samples)
    text = items.text
    (patch,) = HS.ablation_patches(means, items, [PLANTED])(slice(0, len(items)), text)
    assert not patch.positions_bs[:, 0].any() and patch.positions_bs[:, 1:].sum() == text.attention_mask_bs[:, 1:].sum()
    counts = [i for i, t in enumerate(items.template_i) if t.startswith("count")]
    torch.testing.assert_close(patch.value[counts[0], 5].double(), means.z_global_lhk[PLANTED[0], PLANTED[1]])


@pytest.fixture(scope="module")
def sweep_items(planted):
    samples = own_answers(planted, world.make_samples(0, "sweep", 48, qtypes=QTYPES))
    reference = world.make_samples(0, "reference", 48, qtypes=QTYPES)
    items = HS.encode_items(planted.model, planted.tokenizer, samples)
    means = HS.matched_means(planted.model, HS.encode_items(planted.model, planted.tokenizer, reference))
    return items, means


def test_the_sweep_ranks_the_planted_head_first(planted, sweep_items):
    items, means = sweep_items
    heads = [(l, h) for l in range(3) for h in range(4)]
    sweep = HS.head_sweep(planted.model, items, means, heads, ablations=("matched", "global"))
    clean = sweep[sweep.ablation == "none"]
    assert (clean.accuracy == 1.0).all() and set(clean.qtype) == set(QTYPES)
    assert set(sweep.columns) >= {"ablation", "layer", "head", "qtype", "family", "accuracy", "p_correct", "n"}
    for ablation in ("matched", "global"):
        costs = HS.head_costs(sweep[sweep.ablation.isin(["none", ablation])], ablation)
        assert len(costs) == len(heads)
        best = costs.iloc[0]
        assert (best.layer, best["head"]) == PLANTED and best["rank"] == 1 and best.percentile > 0.9
        assert best.spatial_accuracy_cost > 30


def test_the_set_control_places_a_set_with_the_planted_head_on_top(planted, sweep_items):
    items, means = sweep_items
    eligible = [(l, h) for l in range(2) for h in range(4)]
    sets, exhaustive = HS.head_sets(eligible, 2, n_draws=100, seed=0)
    table = HS.set_costs(planted.model, items, means, sets)
    assert exhaustive and len(table) == 28
    with_planted = table.heads.str.contains(HS.head_set_name([PLANTED]))
    worst_without = table[~with_planted].spatial_accuracy_cost.max()
    assert table[with_planted].spatial_accuracy_cost.min() > worst_without
    top = table.sort_values("spatial_accuracy_cost", ascending=False).iloc[0]
    assert HS.place(top.spatial_accuracy_cost, table.spatial_accuracy_cost).rank == 1


def test_sufficiency_flips_answers_through_the_planted_head(planted):
    clean = world.make_samples(0, "suff", 32, qtypes=("relation",), n_objects=(2,))
    # Every item's twin asks the same question of another scene, so many answers differ.
    others = world.make_samples(1, "suff", 32, qtypes=("relation",), n_objects=(2,))
    swapped = [dataclasses.replace(c, scene=o.scene) for c, o in zip(clean, others, strict=True)]
    yes, no = (planted.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    heads = [(l, h) for l in range(3) for h in range(4)]
    table, check = HC.sufficiency(planted, clean, swapped, heads, yes, no, positions=("post_image", "all"))
    assert (table.n > 0).all() and len(check) == 32
    for positions, t in table.groupby("positions"):
        best = t.sort_values("flip_rate", ascending=False).iloc[0]
        assert (best.layer, best["head"]) == PLANTED, positions
        assert best.flip_rate > 0.9 and t.flip_rate.drop(best.name).max() < 0.1


def test_patching_from_the_clean_run_itself_flips_nothing(planted):
    clean = world.make_samples(0, "suff", 8, qtypes=("relation",), n_objects=(2,))
    yes, no = (planted.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    table, check = HC.sufficiency(planted, clean, clean, [PLANTED], yes, no)
    assert (table.n == 0).all() and (check.model_clean == check.model_swapped).all()


def test_object_swap_flips_the_truth_unless_the_objects_share_the_axis():
    samples = world.make_samples(0, "cf", 40, qtypes=("relation", "statement"), n_objects=(2,))
    for s in samples:
        a, b = s.scene.by_shape(s.subject), s.scene.by_shape(s.obj)
        axis_differs = a.col != b.col if s.relation in ("left of", "right of") else a.row != b.row
        assert HC.answer_flips(s) == axis_differs


def test_counterfactual_attribution_with_the_clean_scene_is_zero_and_mean_image_matches(planted):
    samples = world.make_samples(0, "cf", 4, qtypes=("statement",), n_objects=(2,))
    gen = torch.Generator().manual_seed(0)
    feats = [AT.Feature(2, torch.randn(planted.d_model, generator=gen), "f")]
    mean_d = AT.mean_image_embedding(planted, [s.scene.render() for s in samples])
    scores = HC.attribution_by_corruption(planted, samples, samples, feats, mean_d, batch_size=2)
    assert (scores["swap"][0, :2] == 0).all() and scores["swap"][0, 2:].isnan().all()
    batch = A.prepare(planted, [s.scene.render() for s in samples], [s.question for s in samples])
    (e,) = AT.attribute(planted, batch, feats, mean_d)
    torch.testing.assert_close(scores["mean image"][0, :2], e.score_blh.double().mean(0)[:2], rtol=1e-5, atol=1e-7)


def test_every_figure_draws_from_tables():
    from lib.figures import referee_heads as FH

    heads = [(l, h) for l in range(2) for h in range(2)]
    ranking = pd.DataFrame([dict(layer=l, head=h, score=0.1 + l, null=0.2, corrected=0.5 + l) for l, h in heads])
    sweep = pd.DataFrame(
        [
            dict(ablation=a, layer=l, head=h, qtype=q, family=world.QTYPES[q], accuracy=acc, p_correct=acc, n=10)
            for q in ("color", "where", "relation")
            for a, l, h, acc in [("none", -1, -1, 1.0)] + [("matched", l, h, 0.5 + 0.1 * h) for l, h in heads]
        ]
    )
    costs = HS.head_costs(sweep)
    sets = pd.DataFrame(
        dict(
            heads=["L0H0+L0H1", "L0H0+L1H0", "L1H0+L1H1"],
            spatial_accuracy_cost=[10.0, 30.0, 5.0],
            control_accuracy_cost=[1.0, 2.0, 0.0],
            draw=True,
            paper_top=[True, False, False],
            null_top=[False, True, False],
        )
    )
    suff = pd.DataFrame([dict(layer=l, head=h, positions="post_image", n=5, flip_rate=0.2 * h) for l, h in heads])
    attr = pd.DataFrame([{"layer": l, "head": h, "mean image": 1.0, "swap": 1.5} for l, h in heads])
    flips = pd.DataFrame(
        [
            dict(feature="L1F3", layer=1, subset="all relations", scale=s, kind=k, vector=v, index=i, flip_rate=f)
            for s in (4.0, 8.0)
            for k, v, i, f in [("feature", "+ (toward yes)", -1, 0.4), ("feature", "- (toward no)", -1, 0.3)]
            + [("random", "random", j, 0.05) for j in range(3)]
        ]
    )
    figs = [
        FH.plot_null_correction(ranking, 3, 2),
        FH.plot_sweep_heatmap(sweep),
        FH.plot_cost_scatter(costs, [(0, 0)], (1, 1), goal=(20, 2)),
        FH.plot_set_distribution(sets, 2),
        FH.plot_sufficiency(suff, attr),
        FH.plot_steering(flips),
    ]
    assert all(len(f.axes) >= 1 for f in figs)
