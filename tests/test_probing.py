"""Spatial probing, part 2 (lib/kernels/probing.py, spatial_stats.py, lexical.py, ground_truth.py, autointerp.py,
llm_client.py and lib/figures/probing.py): top samples, the lexical filter, ground-truth attributes, AUROC, the
ground-truth check, auto-interp and the panels, on tiny random LLaVAs (tests/fakes.py), synthetic encoders and
hand-made tables."""

import base64
import io
import itertools
import json
import math

import fakes
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score as sk_f1
from sklearn.metrics import roc_auc_score

from lib.figures import probing as FG
from lib.kernels import adapter as A
from lib.kernels import autointerp as AI
from lib.kernels import ground_truth as GT
from lib.kernels import lexical as LX
from lib.kernels import llm_client as LLM
from lib.kernels import probing as P
from lib.kernels import spatial_stats as SS
from lib.sources import world as W

matplotlib.use("Agg")
torch.set_num_threads(1)


def topk_encoder(d: int, width: int, k: int, seed: int):
    """A random TopK SAE encoder, z = relu(topk(x W + b))."""
    g = torch.Generator().manual_seed(seed)
    W_df, b_f = torch.randn(d, width, generator=g), 0.1 * torch.randn(width, generator=g)

    def encode(x_nd):
        pre = x_nd @ W_df + b_f
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    return encode


def reference_top(value_sf: torch.Tensor, n: int):
    """Per feature, a full sort: samples with value > 0 by (-value, index), the first n."""
    out = []
    for f in range(value_sf.shape[1]):
        v = value_sf[:, f].tolist()
        order = sorted((i for i in range(len(v)) if v[i] > 0), key=lambda i: (-v[i], i))[:n]
        out.append(order)
    return out


@pytest.fixture(scope="module")
def vlm():
    return fakes.world_vlm(seed=0, n_layers=2, with_base_lm=False)


@pytest.fixture(scope="module")
def world_samples():
    return W.make_samples(0, "train", 9, ("relation", "color", "where"), 16)


# ---------------------------------------------------------------------------------------------------------------
# Top samples


def test_running_top_n_equals_full_sort():
    g = torch.Generator().manual_seed(0)
    # Values on a coarse grid, so there are many ties, and many zeros (the feature did not fire).
    value_sf = (torch.randint(0, 6, (53, 7), generator=g).float() - 2).clamp_min(0)
    value_sf[:, 6] = 0  # a dead feature
    value_sf[:5, 5], value_sf[5:, 5] = 1.0, 0.0  # fires on fewer samples than N
    top = P.RunningTopN(7, n=8)
    start = 0
    for size in (1, 10, 3, 17, 22):  # uneven batches
        top.update(value_sf[start : start + size], torch.arange(start, start + size))
        start += size
    assert start == 53
    for f, expected in enumerate(reference_top(value_sf, 8)):
        got = [int(i) for i in top.index_fk[f] if i >= 0]
        assert got == expected, f"feature {f}"
        torch.testing.assert_close(top.value_fk[f, : len(got)], value_sf[expected, f])
    assert (top.index_fk[6] == -1).all() and (top.index_fk[5] >= 0).sum() == 5


def test_top_samples_streaming_equals_direct_computation(vlm, world_samples):
    samples = P.SampleSet.from_world(world_samples)
    encoders = {0: topk_encoder(32, 24, 8, seed=1), 1: topk_encoder(32, 24, 8, seed=2)}
    keys = [(1, 3), (0, 5), (0, 0), (1, 20), (0, 17)]
    for positions in ("text", "all"):
        top = P.top_samples(vlm, encoders, keys, samples, n=4, positions=positions, batch_size=4)
        # Directly: the whole set in one batch, every activation kept, one sort.
        batch = A.prepare(vlm, [samples.images[i] for i in range(len(samples))], list(samples.questions))
        resid = A.resid_stream(vlm, batch, [0, 1])
        mask_bs = P.position_mask(batch, positions)
        value_sf = torch.zeros(len(samples), len(keys))
        for j, (layer, f) in enumerate(keys):
            z_bs = encoders[layer](resid[A.resid_name(layer)])[..., f]
            value_sf[:, j] = torch.where(mask_bs, z_bs, torch.zeros_like(z_bs)).amax(1)
        assert ((value_sf > 0).sum(0) >= 2).sum() >= 3, "most test features should fire on several samples"
        for j, expected in enumerate(reference_top(value_sf, 4)):
            got = top.indices(keys[j])
            assert len(got) == len(expected)
            # Equal values, and each returned sample really has its value. (Sample order among ties depends on
            # the last float bit of a batched matmul, so indices are compared through their values.)
            torch.testing.assert_close(top.value_fk[j, : len(got)], value_sf[expected, j], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(top.value_fk[j, : len(got)], value_sf[got, j], atol=1e-5, rtol=1e-5)
    frame = top.frame()
    assert list(frame.columns) == ["layer", "feature", "rank", "sample", "activation"]
    assert frame.groupby(["layer", "feature"]).activation.apply(lambda a: a.is_monotonic_decreasing).all()


# ---------------------------------------------------------------------------------------------------------------
# Lexical filter


@pytest.fixture(scope="module")
def identity_vlm():
    """A LLaVA whose decoder blocks add nothing to the residual stream: at every layer, a text position holds its
    word's embedding exactly and an image position its projected patch. Synthetic features can then read words."""
    vlm = fakes.world_vlm(seed=0, n_layers=2, with_base_lm=False)
    with torch.no_grad():
        for block in A.decoder(vlm.model).layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return vlm


def word_reader(vlm, word: str):
    """z = relu(1 - |x - e_word| / r), r half the distance to the nearest other word: 1 on `word`, 0 elsewhere."""
    E_vd = vlm.model.get_input_embeddings().weight.detach()
    e_d = E_vd[vlm.tokenizer.convert_tokens_to_ids(word)]
    dist_v = (E_vd - e_d).norm(dim=1)
    r = 0.5 * dist_v[dist_v > 1e-6].min()
    return lambda x_nd: (1 - (x_nd - e_d).norm(dim=-1) / r).relu()


def image_reader(vlm):
    """Fires wherever the input is not a word embedding, i.e. on image tokens."""
    E_vd = vlm.model.get_input_embeddings().weight.detach()
    return lambda x_nd: (torch.cdist(x_nd, E_vd).min(-1).values - 0.1).relu()


def test_lexical_filter_drops_word_readers_keeps_image_readers(identity_vlm, world_samples):
    vlm = identity_vlm
    left, assistant, image = word_reader(vlm, "left"), word_reader(vlm, "assistant"), image_reader(vlm)
    describe = word_reader(vlm, "describe")
    assert 0 < sum("describe" in p.split() for p in W.GENERIC_PROMPTS) < len(W.GENERIC_PROMPTS)

    def encode(x_nd):
        return torch.stack(
            [
                left(x_nd),  # 0: reads the word "left" and nothing else
                left(x_nd) + image(x_nd),  # 1: the word "left", and the image
                left(x_nd) + 0.5 * assistant(x_nd),  # 2: "left", and a word every prompt has, but not the image
                torch.zeros(len(x_nd)),  # 3: dead
                left(x_nd) + describe(x_nd),  # 4: "left", and a word only some direction-free prompts have
            ],
            -1,
        )

    qs = W.make_samples(0, "train", 24, ("relation", "side", "color"), 16)
    with_left = [s for s in qs if "left" in s.question.split()]
    assert len(with_left) >= 3, "the fixture needs questions that say 'left'"
    samples = P.SampleSet.from_world(qs)
    candidates = pd.DataFrame({"layer": [1] * 5, "feature": [0, 1, 2, 3, 4]})
    res = LX.lexical_filter(vlm, {1: encode}, candidates, samples, top_n=3, threshold=0.01, batch_size=4)
    t = res.table.set_index("feature")
    # Under its own question, each of features 0-2 fires on "left": its top samples are questions saying "left".
    for f in (0, 1, 2):
        assert all("left" in samples.questions[i].split() for i in res.top.indices((1, f)))
        assert t.loc[f, "n_top"] == 3
    assert t.loc[3, "n_top"] == 0
    assert t.lexical_all.tolist() == [False, True, True, False, True]
    assert t.lexical_image.tolist() == [False, True, False, False, False]
    assert t.lexical.tolist() == t.lexical_all.tolist(), "the book's reading is 'all'"
    # The recorded maxima are the features' values: 0 for the word reader under the direction-free prompts,
    # exactly 0.5 at "assistant" for feature 2, positive on image tokens for feature 1.
    m = res.max_sp
    assert m["all"][(1, 0)].shape == (3, len(W.GENERIC_PROMPTS))
    assert (m["all"][(1, 0)] == 0).all() and (m["image"][(1, 2)] == 0).all()
    torch.testing.assert_close(m["all"][(1, 2)], torch.full((3, len(W.GENERIC_PROMPTS)), 0.5))
    assert (m["image"][(1, 1)] > 0.01).all()
    image_only = LX.lexical_filter(
        vlm, {1: encode}, candidates, samples, top_n=3, reading="image", top=res.top, batch_size=4
    )
    assert image_only.table.lexical.tolist() == [False, True, False, False, False]
    # The strict rule (every prompt, not the best one per sample) drops the feature that needs "describe".
    strict = LX.lexical_filter(vlm, {1: encode}, candidates, samples, top_n=3, prompt_rule="every", top=res.top)
    assert strict.table.lexical.tolist() == [False, True, True, False, False]


def test_lexical_prompt_rules():
    # The authors take the best prompt per top sample; the strict rule asks every prompt.
    best = LX.lexical_survivors(torch.tensor([[0.5, 0.0], [0.0, 0.2]]).amax(1, keepdim=True), 0.01)
    every = LX.lexical_survivors(torch.tensor([[0.5, 0.0], [0.0, 0.2]]), 0.01)
    assert best and not every


def test_final_set_and_layer_counts():
    t = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1, 1],
            "feature": [0, 1, 0, 1, 2],
            "adapted": [True, True, True, False, True],
            "spatial": [True, False, True, True, True],
            "lexical": [True, np.nan, False, True, True],
        }
    )
    t["final"] = SS.final_set(t)
    assert t.final.tolist() == [True, False, False, False, True]
    counts = SS.per_layer_counts(t)
    assert counts.loc[0].tolist() == [2, 1, 1, 1] and counts.loc[1].tolist() == [2, 3, 2, 1]


# ---------------------------------------------------------------------------------------------------------------
# Ground truth


def obj(shape, color, row, col, cell=16):
    x0, y0 = col * cell + 2, row * cell + 2
    return W.Obj(shape, color, row, col, (x0, y0, x0 + 10, y0 + 10))


def test_scene_attributes_agree_with_holds_on_hand_made_scenes():
    a, b = obj("circle", "red", 0, 2), obj("square", "blue", 2, 0)  # a top right, b bottom left
    c, d = obj("triangle", "green", 1, 0), obj("diamond", "yellow", 1, 2)  # one row
    e = obj("square", "purple", 0, 1)
    scenes = [
        W.Scene((b, a), 16),  # stored out of reading order on purpose: the labels must not depend on it
        W.Scene((c, d), 16),
        W.Scene((e, c, d), 16),
    ]
    df = GT.scene_attributes(scenes)
    # Scene 0 in reading order: first = a (row 0), second = b (row 2).
    for r in W.RELATIONS[:3]:
        assert df.loc[0, f"relation:{r}"] == W.holds(a, b, r)
        assert df.loc[1, f"relation:{r}"] == W.holds(c, d, r)
    assert df.loc[0, ["relation:left of", "relation:right of", "relation:above"]].tolist() == [False, True, True]
    assert df.loc[1, ["relation:left of", "relation:right of", "relation:above"]].tolist() == [True, False, False]
    assert df.loc[1, "relation:same row"] and not df.loc[0, "relation:same row"]
    assert not df.loc[0, "relation:same column"] and not df.loc[1, "relation:same column"]
    assert "relation:below" not in df.columns, "impossible in reading order"
    assert df[[c for c in df.columns if c.startswith("relation:")]].loc[2].isna().all(), "three objects: undefined"
    assert df.loc[0, ["row:top", "row:middle", "row:bottom"]].tolist() == [True, False, True]
    assert df.loc[1, ["column:left", "column:center", "column:right"]].tolist() == [True, False, True]
    assert df.loc[2, ["column:left", "column:center", "column:right"]].tolist() == [True, True, True]
    assert df.loc[0, "color:red"] and df.loc[0, "color:blue"] and not df.loc[0, "color:green"]
    assert df.loc[2, "shape:triangle"] and df.loc[2, "shape:diamond"] and not df.loc[2, "shape:circle"]
    assert df["count:2"].tolist() == [True, True, False] and df["count:3"].tolist() == [False, False, True]


def test_sample_attributes_question_columns_agree_with_answers():
    samples = W.make_samples(0, "train", 36, ("relation", "what_rel", "color"), 16)
    df = GT.sample_attributes(samples, question=True)
    for i, s in enumerate(samples):
        for r in W.RELATIONS:
            assert df.loc[i, f"question:names {r}"] == (s.relation == r)
            if s.relation == r:
                assert df.loc[i, f"question:{r} holds"] == ((s.subject, r, s.obj) in s.scene.relations)


def test_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    n = 200
    acts = rng.integers(0, 5, (n, 6)).astype(float)  # heavy ties
    acts[:, 1] = 0.0  # a dead feature: AUROC 0.5
    attrs = pd.DataFrame(
        {
            "relation:left of": pd.array(rng.random(n) < 0.4, dtype="boolean"),
            "relation:above": pd.array(rng.random(n) < 0.6, dtype="boolean"),
            "color:red": rng.random(n) < 0.3,
            "never": np.zeros(n, bool),
        }
    )
    attrs.loc[rng.random(n) < 0.5, ["relation:left of", "relation:above"]] = pd.NA
    acts[:, 2] += 3 * attrs["color:red"].to_numpy()  # one informative feature
    keys = [(3, f) for f in range(6)]
    table = GT.auroc_table(torch.tensor(acts), attrs, keys, chunk=4)  # chunked over features
    for col in ["relation:left of", "relation:above", "color:red"]:
        valid = attrs[col].notna().to_numpy()
        y = attrs[col].fillna(False).to_numpy(bool)[valid]
        for f in range(6):
            assert table.loc[f, col] == pytest.approx(roc_auc_score(y, acts[valid, f]), abs=1e-12)
    assert table["never"].isna().all(), "no positive sample: undefined"
    assert table.loc[1, "color:red"] == 0.5
    assert table.loc[2, "best_attribute"] == "color:red" and table.loc[2, "best_auroc"] > 0.9
    rel = table[["relation:left of", "relation:above"]].to_numpy()
    np.testing.assert_allclose(table.best_relation_auroc, rel.max(1))
    assert table.layer.tolist() == [3] * 6 and table.feature.tolist() == list(range(6))


def test_relation_probe_reads_a_relation_no_single_feature_carries():
    """XOR-like code: the relation is the sum of two features, each alone uninformative; a probe on both finds it,
    a probe on noise does not, <NA> rows are left out and a class too small to split is NaN."""
    rng = np.random.default_rng(0)
    n = 400
    y = rng.random(n) < 0.5
    a = 4 * rng.normal(size=n)
    b = np.where(y, 1.0, -1.0) - a + 0.1 * rng.normal(size=n)  # a + b tracks y; a and b alone barely do
    attrs = pd.DataFrame(
        {
            "relation:left of": pd.array(y, dtype="boolean"),
            "relation:same row": pd.array(np.arange(n) < 3, dtype="boolean"),  # 3 positives: too few for 5 folds
            "color:red": rng.random(n) < 0.5,  # not a relation: no column
        }
    )
    attrs.loc[:19, "relation:left of"] = pd.NA
    joint = np.stack([a, b], 1)
    single = GT.auroc_table(torch.tensor(joint), attrs[["relation:left of"]])
    assert single["relation:left of"].max() < 0.8
    probe = GT.relation_probe({"joint": joint, "noise": rng.normal(size=(n, 2))}, attrs, seed=0)
    assert list(probe.columns) == ["relation:left of", "relation:same row"]
    assert probe.loc["joint", "relation:left of"] > 0.98
    assert abs(probe.loc["noise", "relation:left of"] - 0.5) < 0.1
    assert probe["relation:same row"].isna().all()
    # The <NA> rows are left out: the same probe on the defined rows alone gives the same folds and the same AUROC.
    defined = GT.relation_probe({"joint": joint[20:]}, attrs.iloc[20:].reset_index(drop=True), seed=0)
    assert defined.loc["joint", "relation:left of"] == probe.loc["joint", "relation:left of"]


def test_feature_activations_under_prompts_equal_direct_computation(vlm, world_samples):
    samples = P.SampleSet.from_world(world_samples[:5])
    encoders = {0: topk_encoder(32, 16, 4, seed=3), 1: topk_encoder(32, 16, 4, seed=4)}
    keys = P.all_features([0, 1], 16)
    prompts = W.GENERIC_PROMPTS[:2]
    got = GT.feature_activations_under_prompts(vlm, encoders, keys, samples, prompts, batch_size=2)
    expected = torch.zeros(5, len(keys))
    for prompt in prompts:
        batch = A.prepare(vlm, [samples.images[i] for i in range(5)], [prompt] * 5)
        resid = A.resid_stream(vlm, batch, [0, 1])
        for j, (layer, f) in enumerate(keys):
            z_bs = encoders[layer](resid[A.resid_name(layer)])[..., f]
            expected[:, j] += torch.where(batch.post_image_bs, z_bs, torch.zeros_like(z_bs)).amax(1) / len(prompts)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got.acts_sf, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.select([(1, 2), (0, 0)]), expected[:, [18, 0]])
    top = P.top_from_matrix(got, n=2, features=[(1, 2)])
    assert top.indices((1, 2)) == reference_top(expected[:, [18]], 2)[0]


# ---------------------------------------------------------------------------------------------------------------
# Ground-truth check


def test_ground_truth_check_missed_reasons_on_hand_made_table():
    th = GT.Thresholds(eps=0.01, cos_max=0.2, min_odds=3.0, min_delta=0.005)
    rows = [
        # layer, feature, E_v, cos, OR, delta, lexical, best relation AUROC, expected reason
        (0, 0, 0.50, 0.10, 5.0, 0.020, True, 0.95, None),  # final
        (0, 1, 0.001, 0.10, 5.0, 0.020, np.nan, 0.97, "visual_energy"),
        (0, 2, 0.50, 0.90, 5.0, 0.020, np.nan, 0.92, "dec_cos"),
        (1, 0, 0.50, 0.10, 2.0, 0.020, np.nan, 0.93, "odds_ratio"),
        (1, 1, 0.50, 0.10, np.nan, 0.000, np.nan, 0.90, "odds_ratio"),
        (1, 2, 0.50, 0.10, 4.0, 0.001, np.nan, 0.94, "delta_freq"),
        (1, 3, 0.50, 0.10, 4.0, 0.010, False, 0.99, "lexical"),
        (1, 4, 0.001, 0.90, 1.0, 0.000, False, 0.91, "visual_energy"),  # fails all: the first one counts
        (1, 5, 0.50, 0.10, 1.0, 0.000, np.nan, 0.55, "odds_ratio"),  # not predictive: not missed
        (1, 6, 0.50, 0.50, 1.0, 0.000, np.nan, 0.60, "dec_cos"),
        (1, 7, 0.50, 0.10, 6.0, 0.030, True, 0.85, None),  # final
    ]
    cols = ["layer", "feature", "visual_energy", "dec_cos", "odds_ratio", "delta_freq", "lexical", "auroc", "why"]
    hand = pd.DataFrame(rows, columns=cols)
    table = hand.drop(columns=["auroc", "why"]).assign(
        adapted=lambda t: (t.visual_energy > th.eps) & (t.dec_cos <= th.cos_max),
        spatial=lambda t: (t.odds_ratio.fillna(0) >= th.min_odds) & (t.delta_freq >= th.min_delta),
    )
    auroc = hand[["layer", "feature"]].assign(
        **{"relation:left of": hand.auroc, "relation:above": 1 - hand.auroc, "best_relation_auroc": hand.auroc}
    )
    check = GT.ground_truth_check(table, auroc, th, n_random=100, seed=0, min_auroc=0.9)
    assert check.per_feature.dropped_by.tolist() == hand.why.tolist()
    missed = check.missed.set_index(["layer", "feature"]).dropped_by
    assert missed.to_dict() == {
        (0, 1): "visual_energy",
        (0, 2): "dec_cos",
        (1, 0): "odds_ratio",
        (1, 1): "odds_ratio",
        (1, 2): "delta_freq",
        (1, 3): "lexical",
        (1, 4): "visual_energy",
    }
    assert check.missed_by_filter.to_dict() == {
        "visual_energy": 2,
        "dec_cos": 1,
        "odds_ratio": 2,
        "delta_freq": 1,
        "lexical": 1,
    }
    s = check.summary.set_index("group")
    assert s.loc["final", "n"] == 2 and s.loc["final", "mean"] == pytest.approx(0.90)
    assert s.loc["final", "share >= 0.9"] == 0.5
    adapted_rest = hand[(hand.visual_energy > 0.01) & (hand.dec_cos <= 0.2) & hand.why.notna()]
    assert s.loc["random adapted", "n"] == len(adapted_rest) == 5
    assert s.loc["random adapted", "mean"] == pytest.approx(adapted_rest.auroc.mean())
    assert s.loc["random", "n"] == 9 and s.loc["random", "mean"] == pytest.approx(hand.auroc[hand.why.notna()].mean())
    # With fewer random features asked for than there are, a fixed seed draws the same ones every time.
    a = GT.ground_truth_check(table, auroc, th, n_random=3, seed=1)
    b = GT.ground_truth_check(table, auroc, th, n_random=3, seed=1)
    assert a.summary.loc[2, "n"] == 3 and a.summary.equals(b.summary)


def test_ground_truth_check_refuses_flags_that_disagree_with_thresholds():
    table = pd.DataFrame(
        {
            "layer": [0],
            "feature": [0],
            "visual_energy": [0.5],
            "dec_cos": [0.1],
            "adapted": [False],
            "odds_ratio": [5.0],
            "delta_freq": [0.1],
            "spatial": [True],
            "lexical": [True],
        }
    )
    auroc = pd.DataFrame({"layer": [0], "feature": [0], "relation:above": [0.9], "best_relation_auroc": [0.9]})
    with pytest.raises(ValueError, match="`adapted` disagrees"):
        GT.ground_truth_check(table, auroc, GT.Thresholds(0.01, 0.2, 3.0, 0.005))
    with pytest.raises(ValueError, match="lacks the columns"):
        GT.ground_truth_check(table.drop(columns="lexical"), auroc, GT.Thresholds(0.01, 0.2, 3.0, 0.005))


# ---------------------------------------------------------------------------------------------------------------
# Auto-interp


def test_f1_on_a_hand_made_case():
    attrs = pd.DataFrame({"color:red": [True, True, True, True, False, True, False, False, False, False]})
    # held-out positives 0-4 (four red), random negatives 5-9 (one red): TP 4, FN 1, FP 1, TN 4.
    s = AI.score_description(attrs, "color:red", [0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert (s.tp, s.fn, s.fp, s.tn) == (4, 1, 1, 4)
    assert s.f1 == pytest.approx(2 * 4 / (2 * 4 + 1 + 1)) == 0.8
    pred, label = attrs["color:red"].to_numpy(), np.r_[np.ones(5), np.zeros(5)]
    assert s.f1 == pytest.approx(sk_f1(label, pred))
    assert AI.f1_score([0, 0], [0, 0]) == 0.0


def test_describe_prefers_the_attribute_rare_outside_the_top_samples():
    n = 40
    attrs = pd.DataFrame(
        {
            "count:2": np.arange(n) % 2 == 0,  # base rate 0.5
            "relation:left of": pd.array(np.where(np.arange(n) % 2 == 0, np.arange(n) % 4 == 0, pd.NA), "boolean"),
            "color:red": np.ones(n, bool),  # everywhere: predicts nothing
        }
    )
    top = [0, 4, 8, 12, 16, 2, 6, 20, 24, 28]  # description samples 0-16 are all "left of" (and two-object)
    d = AI.describe_feature(attrs, top, n_heldout=5)
    assert d.described == top[:5] and d.heldout == top[5:]
    assert d.attribute == "relation:left of" and d.precision == 1.0 and d.base_rate == 0.25
    assert d.expected_f1 == pytest.approx(2 / 2.25)
    assert d.text.startswith("fires on two-object scenes where the first object")
    neg = AI.random_negatives(n, top, 5, seed=[0, 1, 2])
    assert len(set(neg)) == 5 and not set(neg) & set(top)
    s = AI.score_description(attrs, d.attribute, d.heldout, neg)
    # held-out: 2 and 6 are two-object but not "left of" (2 % 4, 6 % 4 != 0); 20, 24, 28 are.
    assert (s.tp, s.fn) == (3, 2)
    with pytest.raises(ValueError, match="more than n_heldout"):
        AI.describe_feature(attrs, top[:5], n_heldout=5)


def test_auto_interp_table():
    n = 30
    attrs = pd.DataFrame({"shape:circle": np.arange(n) < 8, "color:red": np.arange(n) % 3 == 0})
    top = P.TopSamples(
        [(0, 1), (0, 2)],
        torch.tensor([[*range(8), -1, -1], [3, 6, 9, 12, -1, -1, -1, -1, -1, -1]]),
        torch.ones(2, 10),
        "text",
    )
    out = AI.auto_interp(top, attrs, n_heldout=5, n_negatives=5, seed=0)
    assert out.loc[0, "attribute"] == "shape:circle" and out.loc[0, "description"] == "fires on images with a circle"
    assert out.loc[0, "tp"] == 5 and out.loc[0, "heldout"] == [3, 4, 5, 6, 7]
    assert np.isnan(out.loc[1, "f1"]) and out.loc[1, "n_top"] == 4  # too few top samples to hold five out
    assert AI.auto_interp(top, attrs, features=[]).columns.tolist() == out.columns.tolist()
    again = AI.auto_interp(top, attrs, features=[(0, 1)], seed=0)
    assert again.loc[0, "negatives"] == out.loc[0, "negatives"], "negatives depend on the feature, not the batch"


# ---------------------------------------------------------------------------------------------------------------
# Panels


def test_feature_trace_and_panel(vlm, world_samples):
    import matplotlib.pyplot as plt

    s = world_samples[1]
    encode = topk_encoder(32, 16, 4, seed=5)
    trace = P.feature_trace(vlm, encode, layer=1, feature=7, image=s.scene.render(), question=s.question)
    assert trace.patch_acts_yx.shape == (6, 6)
    words = ["user", ":", "<image>", *s.question.split(), "assistant", ":"]
    assert trace.tokens == words and torch.isnan(trace.token_acts[2])
    # The trace agrees with the adapter's own read-out.
    batch = A.prepare(vlm, [s.scene.render()], [s.question])
    z_s = encode(A.resid_stream(vlm, batch, [1])[A.resid_name(1)][0])[:, 7]
    torch.testing.assert_close(trace.patch_acts_yx.flatten(), z_s[batch.image_mask_bs[0]])
    fig, (ax_img, ax_txt) = plt.subplots(1, 2, figsize=(7, 2.2))
    tokens = words * 3  # long enough to wrap
    acts = np.tile(trace.token_acts.numpy(), 3)
    patch = trace.patch_acts_yx.clone()
    patch[0, 0] = 0.0
    patch[5, 5] = 2 * float(patch.max()) + 1  # the brightest patch
    FG.draw_feature_panel(ax_img, ax_txt, trace.image, patch.numpy(), tokens, acts, title="L1 F7")
    overlay = ax_img.images[1].get_array()
    assert overlay.shape == (6, 6, 4) and overlay[5, 5, 3] == pytest.approx(0.75) and overlay[0, 0, 3] == 0
    assert len(ax_img.patches) == int((patch > 0).sum())
    assert [t.get_text() for t in ax_txt.texts] == tokens
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax_txt.texts]
    lines = sorted({round(b.y1, 1) for b in boxes}, reverse=True)
    assert len(lines) >= 2, "the tokens should wrap"
    right = ax_txt.get_window_extent(renderer).x1
    for line in lines:
        row = sorted((b for b in boxes if round(b.y1, 1) == line), key=lambda b: b.x0)
        assert all(a.x1 <= b.x0 for a, b in itertools.pairwise(row)), "tokens overlap"
        assert row[-1].x1 <= right + 1
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The optional LLM explainer, through a fake transport (no network)


def test_llm_explainer_is_opt_in():
    assert LLM.LLMConfig.from_env({}) is None
    assert LLM.LLMConfig.from_env({"OPENAI_API_KEY": "k"}) is None, "a key alone does not opt in"
    with pytest.raises(ValueError, match="BOOK_LLM_API_KEY"):
        LLM.LLMConfig.from_env({"BOOK_LLM": "1"})
    cfg = LLM.LLMConfig.from_env({"BOOK_LLM": "1", "OPENAI_API_KEY": "k", "BOOK_LLM_BASE_URL": "http://x/v1/"})
    assert cfg == LLM.LLMConfig("http://x/v1", "gpt-4o-mini", "k")


def test_llm_explainer_and_classifier_requests():
    cfg = LLM.LLMConfig("http://llm.local/v1", "some-model", "secret")
    img = np.zeros((48, 48, 3), np.uint8)
    img[:16, :16] = 255
    examples = [
        LLM.Example(img, LLM.mark_tokens(["is", "<image>", "left"], torch.tensor([0.0, float("nan"), 1.0])))
    ] * 2
    assert examples[0].text == "is <image> [[left]]"
    sent = []

    def transport(url, headers, payload, timeout_s):
        sent.append((url, headers, payload))
        content = {"description": "an object in the top left"} if len(sent) == 1 else {"classifications": [1, 0]}
        return {"choices": [{"message": {"content": json.dumps(content)}}]}

    assert LLM.llm_explainer(examples, cfg, transport) == "an object in the top left"
    assert LLM.llm_classifier("an object in the top left", examples, cfg, transport) == [1, 0]
    url, headers, payload = sent[0]
    assert url == "http://llm.local/v1/chat/completions" and headers["Authorization"] == "Bearer secret"
    assert payload["model"] == "some-model" and payload["response_format"] == {"type": "json_object"}
    parts = payload["messages"][1]["content"]
    data_url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))
    np.testing.assert_array_equal(decoded, img)
    assert "Feature description: an object in the top left" in sent[1][2]["messages"][1]["content"][0]["text"]

    def bad(url, headers, payload, timeout_s):
        return {"choices": [{"message": {"content": json.dumps({"classifications": [1]})}}]}

    with pytest.raises(ValueError, match="classified 1 of 2"):
        LLM.llm_classifier("x", examples, cfg, bad)
    with pytest.raises(ValueError, match="not a chat completion"):
        LLM.llm_explainer(examples, cfg, lambda *a: {"error": "quota"})


def test_sample_set_is_lazy_and_checked(world_samples):
    s = P.SampleSet.from_world(world_samples)
    assert len(s) == 9 and s.images[2].shape == (48, 48, 3)
    np.testing.assert_array_equal(s.images[2], world_samples[2].scene.render())
    with pytest.raises(AssertionError, match="3 images for 2 questions"):
        P.SampleSet([1, 2, 3], ["a", "b"])


def test_firing_counts_equal_direct_counts(vlm, world_samples):
    """Streamed per-layer firing counts on text positions, split by the keyword flag, against one direct pass."""
    enc = {0: topk_encoder(32, 16, 4, seed=0), 1: topk_encoder(32, 16, 4, seed=1)}
    S = P.SampleSet.from_world(world_samples)
    spatial = np.array([s.spatial for s in world_samples])
    counts = SS.firing_counts(vlm, enc, S, spatial, batch_size=4)
    batch = A.prepare(vlm, list(S.images), list(S.questions))
    resid = A.resid_stream(vlm, batch, [0, 1])
    sp_bs = torch.as_tensor(spatial)[:, None].expand_as(batch.text_bs)
    for layer in (0, 1):
        fires = enc[layer](resid[A.resid_name(layer)][batch.text_bs]) > 0
        sp_n = sp_bs[batch.text_bs]
        assert torch.equal(counts[layer].c_sp, fires[sp_n].sum(0)) and counts[layer].n_sp == int(sp_n.sum())
        assert torch.equal(counts[layer].c_gen, fires[~sp_n].sum(0)) and counts[layer].n_gen == int((~sp_n).sum())
    table = SS.spatial_table(counts)
    assert len(table) == 32 and table.layer.tolist() == [0] * 16 + [1] * 16
    assert table.p_adj.between(0, 1).all()


def test_top_samples_round_trip_through_a_long_table():
    top = P.TopSamples(
        [(1, 3), (2, 0)],
        torch.tensor([[5, 2, -1], [7, 1, 0]]),
        torch.tensor([[0.9, 0.5, -math.inf], [0.8, 0.3, 0.1]]),
        "text",
    )
    back = P.TopSamples.from_frame(top.frame(), top.keys, "text")
    assert back.indices((1, 3)) == [5, 2] and back.indices((2, 0)) == [7, 1, 0]
    assert torch.equal(back.value_fk[1], top.value_fk[1])
