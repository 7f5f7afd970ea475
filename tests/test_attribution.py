"""lib/kernels/attribution.py, causal.py and attention.py on organism-shaped random LLaVAs (tests/fakes.py) in
float64, so first-order identities hold to many digits: one-backward gradients against finite differences,
attribution against exhaustive patching on a near-linear model, the aggregation rule on a hand-made example, the
causal-check interventions and the attention read-outs."""

import copy
import types

import fakes
import numpy as np
import pytest
import torch

from lib.kernels import adapter as A
from lib.kernels import attention as AN
from lib.kernels import attribution as T
from lib.kernels import causal as C
from lib.sources import world

torch.set_num_threads(1)


def _rms_norm_float64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def in_float64(vlm):
    """The model in float64 end to end: HF's LlamaRMSNorm computes in float32 whatever the model's dtype, which
    would limit finite differences to ~1e-7 relative precision."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    vlm.model.double()
    for module in vlm.model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(_rms_norm_float64, module)
    return vlm


@pytest.fixture(scope="module")
def vlm():
    return in_float64(fakes.world_vlm(seed=0, n_layers=3, with_base_lm=False))


@pytest.fixture(scope="module")
def samples():
    # Statements of different lengths ("left of" vs "above"), so the batch is right-padded.
    return world.make_samples(0, "train", 4, qtypes=("statement",))


@pytest.fixture(scope="module")
def batch(vlm, samples):
    return A.prepare(vlm, [s.scene.render() for s in samples], [s.question for s in samples])


@pytest.fixture(scope="module")
def mean_d(vlm):
    reference = world.make_samples(0, "reference", 6, qtypes=("statement",))
    return T.mean_image_embedding(vlm, [s.scene.render() for s in reference], batch_size=4)


def features_for(vlm, layers=(2, 1), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        T.Feature(layer, torch.randn(vlm.d_model, generator=gen, dtype=torch.float64), f"f{i}")
        for i, layer in enumerate(layers)
    ]


def metric_b(vlm, batch, feature, intervention=None):
    ctx = intervention if intervention is not None else torch.no_grad()
    with ctx, torch.no_grad():
        x = A.capture(vlm, batch, resid_layers=[feature.layer]).resid[A.resid_name(feature.layer)]
    return T.feature_metric(x, feature.direction_d, batch.post_image_bs)


# ---------------------------------------------------------------------------------------------------------------
# Metric and corruption


def test_feature_metric_sums_projection_over_post_image_positions(vlm, batch):
    f = features_for(vlm)[0]
    assert f.direction_d.norm().item() == pytest.approx(1.0)
    x = A.resid_stream(vlm, batch, layers=[2])[A.resid_name(2)]
    m = T.feature_metric(x, f.direction_d, batch.post_image_bs)
    for i in range(x.shape[0]):
        expect = sum(float(x[i, t] @ f.direction_d) for t in batch.post_image_bs[i].nonzero().flatten().tolist())
        assert m[i].item() == pytest.approx(expect, rel=1e-12)


def test_mean_image_embedding_is_the_mean_over_image_positions(vlm):
    images = [s.scene.render() for s in world.make_samples(0, "reference", 5, qtypes=("statement",))]
    e = A.image_embeddings(vlm, vlm.preprocess(images))
    torch.testing.assert_close(T.mean_image_embedding(vlm, images, batch_size=2), e.mean(0), rtol=1e-12, atol=1e-12)


def test_feature_rejects_bad_input(vlm):
    with pytest.raises(AssertionError, match="no attention head lies below layer 0"):
        T.Feature(0, torch.ones(vlm.d_model))
    with pytest.raises(AssertionError, match="norm 0"):
        T.Feature(1, torch.zeros(vlm.d_model))


# ---------------------------------------------------------------------------------------------------------------
# Attribution patching: one backward against finite differences


def _patched_metric(vlm, batch, feature, layer, head, value_bsk, corrupt_d=None, positions_bs=None):
    with A.replace_image_embeddings(vlm, corrupt_d) if corrupt_d is not None else torch.no_grad():
        with A.patch_heads(vlm, [A.HeadPatch(layer, head, value_bsk, positions_bs)]):
            return metric_b(vlm, batch, feature)


@pytest.mark.parametrize("gradient_at", ["clean", "corrupt"])
def test_head_gradients_equal_finite_differences(vlm, batch, mean_d, gradient_at):
    features = features_for(vlm)
    effects = T.attribute(vlm, batch, features, mean_d, gradient_at=gradient_at)
    clean = A.capture(vlm, batch, z_layers=[0, 1]).z
    with A.replace_image_embeddings(vlm, mean_d):
        corrupt = A.capture(vlm, batch, z_layers=[0, 1]).z
    base = clean if gradient_at == "clean" else corrupt
    corrupt_d = mean_d if gradient_at == "corrupt" else None
    eps = 1e-5
    for f, e in zip(features, effects, strict=True):
        assert e.total_blh[:, f.layer :].isnan().all(), "heads at or above the feature's layer are not scored"
        for l in range(f.layer):
            for h in range(vlm.n_heads):
                z0 = base[A.z_name(l)][:, :, h]
                dz = corrupt[A.z_name(l)][:, :, h] - clean[A.z_name(l)][:, :, h]
                plus = _patched_metric(vlm, batch, f, l, h, z0 + eps * dz, corrupt_d)
                minus = _patched_metric(vlm, batch, f, l, h, z0 - eps * dz, corrupt_d)
                finite_b = (plus - minus) / (2 * eps)
                assert finite_b.abs().max() > 1e-6, f"L{l}H{h} should matter to {f.name}"
                torch.testing.assert_close(e.total_blh[:, l, h], finite_b, rtol=1e-6, atol=1e-9)
    # Per position: perturb one head at one position only (an image position and a post-image one).
    f, e = features[0], effects[0]
    img_t = int(batch.image_mask_bs[0].nonzero()[5])
    post_t = int(batch.post_image_bs[0].nonzero()[0])
    for t in (img_t, post_t):
        one_bs = torch.zeros_like(batch.attention_mask_bs)
        one_bs[:, t] = True
        z0 = base[A.z_name(0)][:, :, 2]
        dz = corrupt[A.z_name(0)][:, :, 2] - clean[A.z_name(0)][:, :, 2]
        plus = _patched_metric(vlm, batch, f, 0, 2, z0 + eps * dz, corrupt_d, one_bs)
        minus = _patched_metric(vlm, batch, f, 0, 2, z0 - eps * dz, corrupt_d, one_bs)
        torch.testing.assert_close(e.effect_bslh[:, t, 0, 2], (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_residual_gradients_equal_finite_differences(vlm, batch, mean_d):
    f = features_for(vlm)[0]
    (e,) = T.attribute(vlm, batch, [f], mean_d)
    clean = A.resid_stream(vlm, batch, layers=[0, 1])
    with A.replace_image_embeddings(vlm, mean_d):
        corrupt = A.resid_stream(vlm, batch, layers=[0, 1])
    eps = 1e-5
    for l in range(f.layer):
        dx = corrupt[A.resid_name(l)] - clean[A.resid_name(l)]
        at = []
        for sign in (1, -1):
            hook = lambda _m, _a, out, s=sign, dx=dx: out + s * eps * dx  # noqa: E731
            handle = A.decoder(vlm.model).layers[l].register_forward_hook(hook)
            try:
                at.append(metric_b(vlm, batch, f))
            finally:
                handle.remove()
        finite_b = (at[0] - at[1]) / (2 * eps)
        torch.testing.assert_close(e.resid_effect_bsl[:, :, l].sum(1), finite_b, rtol=1e-6, atol=1e-9)
    assert e.resid_score_bl.shape == (4, vlm.n_layers) and e.resid_score_bl[:, f.layer :].isnan().all()


def test_stacked_backward_equals_one_backward_per_feature(vlm, batch, mean_d):
    features = features_for(vlm, layers=(2, 1, 2))
    loop = T.attribute(vlm, batch, features, mean_d)
    stacked = T.attribute(vlm, batch, features, mean_d, stacked=True)
    for a, b in zip(loop, stacked, strict=True):
        torch.testing.assert_close(a.effect_bslh, b.effect_bslh, rtol=1e-12, atol=1e-14, equal_nan=True)
        torch.testing.assert_close(a.resid_effect_bsl, b.resid_effect_bsl, rtol=1e-12, atol=1e-14, equal_nan=True)


def test_score_is_mean_abs_over_post_image_positions(vlm, batch, mean_d):
    (e,) = T.attribute(vlm, batch, features_for(vlm)[:1], mean_d)
    score = e.score_blh
    for i in range(batch.input_ids_bs.shape[0]):
        post = batch.post_image_bs[i]
        torch.testing.assert_close(score[i, :2], e.effect_bslh[i, post, :2].abs().mean(0), rtol=1e-12, atol=0)
    assert (score[:, :2] > 0).all() and score[:, 2:].isnan().all()
    # Positions before the image see no corruption, so they carry no effect at all.
    first_img = int(batch.image_mask_bs[0].nonzero()[0])
    assert (e.effect_bslh[:, :first_img, :2] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Exhaustive activation patching and the comparison


def test_exhaustive_patching_measures_the_patched_run(vlm, batch, mean_d):
    features = features_for(vlm)
    out = T.activation_patching(vlm, batch, features, mean_d, heads=[(1, 3), (0, 0)], per_position=True)
    f = features[0]
    with A.replace_image_embeddings(vlm, mean_d):
        z_corr = A.capture(vlm, batch, z_layers=[1]).z[A.z_name(1)][:, :, 3]
    expect = _patched_metric(vlm, batch, f, 1, 3, z_corr) - metric_b(vlm, batch, f)
    torch.testing.assert_close(out[0].total_blh[:, 1, 3], expect, rtol=1e-10, atol=1e-12)
    t = int(batch.post_image_bs[0].nonzero()[2])
    one_bs = torch.zeros_like(batch.attention_mask_bs)
    one_bs[:, t] = batch.post_image_bs[:, t]
    expect_t = _patched_metric(vlm, batch, f, 1, 3, z_corr, positions_bs=one_bs) - metric_b(vlm, batch, f)
    torch.testing.assert_close(out[0].effect_bslh[:, t, 1, 3], expect_t, rtol=1e-10, atol=1e-12)
    # What was not patched is NaN, what was is finite; the layer-1 feature ignores the layer-1 head.
    assert out[0].total_blh[:, 0, 1].isnan().all() and out[1].total_blh[:, 1, 3].isnan().all()
    assert torch.isfinite(out[1].total_blh[:, 0, 0]).all()
    assert torch.isfinite(out[0].effect_bslh[:, :, 1, 3][batch.post_image_bs]).all()
    assert out[0].effect_bslh[:, :, 1, 3][~batch.post_image_bs].isnan().all()


@pytest.fixture(scope="module")
def near_linear():
    """A model whose projected image tokens are nearly all the same vector (a large output bias in the projector and
    a shrunk output weight), so the corruption is a small step and the metric is close to linear along it."""
    vlm = fakes.world_vlm(seed=1, n_layers=3, with_base_lm=False)
    out = vlm.model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        out.bias.copy_(torch.randn(out.bias.shape, generator=torch.Generator().manual_seed(0)))
        out.weight.mul_(0.01)
    in_float64(vlm)
    samples = world.make_samples(1, "train", 4, qtypes=("statement",))
    batch = A.prepare(vlm, [s.scene.render() for s in samples], [s.question for s in samples])
    ref = world.make_samples(1, "reference", 4, qtypes=("statement",))
    return vlm, batch, T.mean_image_embedding(vlm, [s.scene.render() for s in ref])


def _relative_error(attr, exact, batch):
    a, b = attr.total_blh[:, :2].flatten(), exact.total_blh[:, :2].flatten()
    post = batch.post_image_bs
    a_t, b_t = attr.effect_bslh[:, :, :2][post].flatten(), exact.effect_bslh[:, :, :2][post].flatten()
    assert b.abs().max() > 1e-6 and b_t.abs().max() > 1e-6, "the corruption must move the metric at all"
    return float((a - b).abs().max() / b.abs().max()), float((a_t - b_t).abs().max() / b_t.abs().max())


def test_attribution_matches_exhaustive_patching_when_near_linear(near_linear):
    vlm, batch, mean_d = near_linear
    features = features_for(vlm, layers=(2,), seed=3)
    (attr,) = T.attribute(vlm, batch, features, mean_d)
    (exact,) = T.activation_patching(vlm, batch, features, mean_d, per_position=True)
    per_head, per_position = _relative_error(attr, exact, batch)
    assert per_head < 0.01 and per_position < 0.01, (per_head, per_position)
    a, b = attr.score_blh[:, :2].flatten().numpy(), exact.score_blh[:, :2].flatten().numpy()
    assert np.corrcoef(a, b)[0, 1] > 0.9999
    assert T.top_heads(attr.score_blh.mean(0), 3) == T.top_heads(exact.score_blh.mean(0), 3)


def test_attribution_is_only_first_order_on_the_large_weight_model(vlm, batch, mean_d):
    """The control for the test above: with a full-size corruption the same comparison is far from exact, so that
    test passes because the case is near-linear, not because the two functions compute the same thing."""
    features = features_for(vlm, layers=(2,), seed=3)
    (attr,) = T.attribute(vlm, batch, features, mean_d)
    (exact,) = T.activation_patching(vlm, batch, features, mean_d, per_position=True)
    per_head, per_position = _relative_error(attr, exact, batch)
    assert per_head > 0.05 and per_position > 0.05, (per_head, per_position)


def test_attribution_scores_averages_over_samples(vlm, batch, mean_d, samples):
    features = features_for(vlm)
    halves = [
        A.prepare(vlm, [s.scene.render() for s in part], [s.question for s in part])
        for part in (samples[:3], samples[3:])
    ]
    scores = T.attribution_scores(vlm, halves, features, mean_d)
    whole = T.attribute(vlm, batch, features, mean_d)
    assert scores.n_samples == 4 and scores.feature_layers_f.tolist() == [2, 1]
    for i, e in enumerate(whole):
        torch.testing.assert_close(scores.score_flh[i], e.score_blh.mean(0), rtol=1e-6, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(
            scores.resid_score_fl[i], e.resid_score_bl.mean(0), rtol=1e-6, atol=1e-12, equal_nan=True
        )


# ---------------------------------------------------------------------------------------------------------------
# Aggregation


def test_aggregation_on_a_hand_made_example():
    nan = float("nan")
    score_flh = torch.tensor(
        [
            [[1.0, 3.0], [0.0, 4.0], [nan, nan]],  # a feature at layer 2: total 8
            [[2.0, 2.0], [nan, nan], [nan, nan]],  # a feature at layer 1: total 4
        ]
    )
    agg = T.aggregate(score_flh, [2, 1])
    expect = torch.tensor([[(1 / 8 + 2 / 4) / 2, (3 / 8 + 2 / 4) / 2], [0.0, 4 / 8], [nan, nan]], dtype=torch.float64)
    torch.testing.assert_close(agg.score_lh, expect, equal_nan=True)
    assert agg.n_features_above_l.tolist() == [2, 1, 0]
    torch.testing.assert_close(agg.layer_profile_l[:2], expect[:2].sum(1))
    assert T.top_heads(agg.score_lh, 2) == [(1, 1), (0, 1)]
    by_max = T.aggregate(score_flh, [2, 1], normalise="max")
    torch.testing.assert_close(by_max.score_lh[:2], torch.tensor([[0.625, 0.875], [0.0, 1.0]], dtype=torch.float64))
    with pytest.raises(AssertionError, match="top 5 heads of 4"):
        T.top_heads(agg.score_lh, 5)


def test_random_heads_keep_layers_and_avoid_the_top_heads():
    top = [(1, 0), (1, 2), (3, 1)]
    draws = [T.random_heads_like(top, n_heads=4, seed=s) for s in range(20)]
    for heads in draws:
        assert sorted(l for l, _ in heads) == [1, 1, 3]
        assert not set(heads) & set(top) and len(set(heads)) == 3
    assert len({tuple(sorted(h)) for h in draws}) > 1, "different seeds should draw different heads"
    assert T.random_heads_like(top, 4, seed=7) == T.random_heads_like(top, 4, seed=7)


# ---------------------------------------------------------------------------------------------------------------
# Causal checks


@pytest.fixture(scope="module")
def statements(samples):
    return C.statements_from_samples(samples)


@pytest.fixture(scope="module")
def yes_no(vlm):
    return C.single_token_id(vlm.tokenizer, "yes"), C.single_token_id(vlm.tokenizer, "no")


def test_yes_no_eval_reads_the_answer_position(vlm, batch, statements, yes_no):
    yes, no = yes_no
    table = C.yes_no_eval(vlm, statements, yes, no, batch_size=3)
    logits = A.next_token_logits(vlm, batch)
    p_yes = torch.softmax(logits[:, [yes, no]], -1)[:, 0].numpy()
    np.testing.assert_allclose(table["p_yes"], p_yes, rtol=1e-6)  # next_token_logits returns float32
    labels = np.array([s.label for s in statements])
    assert (table["correct"] == ((p_yes > 0.5) == labels)).all()
    np.testing.assert_allclose(table["p_correct"], np.where(labels, p_yes, 1 - p_yes), rtol=1e-6)
    summary = C.summarise(table).set_index("relation")
    assert summary.loc["all", "n"] == 4 and summary.loc["all", "accuracy"] == table["correct"].mean()
    for rel, part in table.groupby("relation"):
        assert summary.loc[rel, "mean_p_correct"] == pytest.approx(part["p_correct"].mean())


def test_ablating_all_heads_changes_answers_and_none_does_not(vlm, batch, statements, yes_no):
    z_mean = C.mean_z(vlm, [batch])
    clean = C.yes_no_eval(vlm, statements, *yes_no)
    every = [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]
    for z in (z_mean, None):
        none = C.yes_no_eval(vlm, statements, *yes_no, intervention=C.ablate_heads(vlm, [], z))
        np.testing.assert_array_equal(none["p_yes"], clean["p_yes"])
        ablated = C.yes_no_eval(vlm, statements, *yes_no, intervention=C.ablate_heads(vlm, every, z))
        assert np.abs(ablated["p_yes"] - clean["p_yes"]).min() > 1e-4


def test_mean_ablation_sets_z_to_the_reference_mean(vlm, batch):
    z_mean = C.mean_z(vlm, [batch], layers=[1])
    z = A.capture(vlm, batch, z_layers=[1]).z[A.z_name(1)]
    torch.testing.assert_close(z_mean[1, 2], z[:, :, 2][batch.keep_bs].mean(0), rtol=1e-12, atol=1e-12)
    assert z_mean[0].isnan().all()
    with C.ablate_heads(vlm, [(1, 2)], z_mean)(batch):
        z_abl = A.capture(vlm, batch, z_layers=[1]).z[A.z_name(1)]
    torch.testing.assert_close(z_abl[:, :, 2], z_mean[1, 2].expand_as(z_abl[:, :, 2]), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="no mean z for L0H1"):
        C.ablate_heads(vlm, [(0, 1)], z_mean)


def test_projecting_a_feature_removes_it_at_its_layer(vlm, batch):
    f = features_for(vlm, layers=(1,))[0]
    clean = A.resid_stream(vlm, batch, layers=[1, 2])
    with C.project_feature(vlm, f)(batch):
        out = A.resid_stream(vlm, batch, layers=[1, 2])
    post = batch.post_image_bs
    x1 = out[A.resid_name(1)]
    assert (clean[A.resid_name(1)][post] @ f.direction_d).abs().min() > 1e-3, "the feature must be there before"
    assert (x1[post] @ f.direction_d).abs().max() < 1e-5  # adapter.project_out projects in float32
    torch.testing.assert_close(x1[~post], clean[A.resid_name(1)][~post], rtol=0, atol=0)
    assert (out[A.resid_name(2)] - clean[A.resid_name(2)])[post].abs().max() > 1e-3
    with C.project_feature(vlm, f, where="all")(batch):
        x_all = A.resid_stream(vlm, batch, layers=[1])[A.resid_name(1)]
    assert (x_all[batch.attention_mask_bs] @ f.direction_d).abs().max() < 1e-5


def test_causal_checks_table(vlm, batch, statements, yes_no):
    z_mean = C.mean_z(vlm, [batch])
    controls = C.choices_from_samples(world.make_samples(0, "control", 3, qtypes=("color",)))
    candidates = {c: C.single_token_id(vlm.tokenizer, c) for c in world.COLORS}
    f1, f2 = features_for(vlm, layers=(1, 2))
    table = C.causal_checks(
        vlm,
        statements,
        yes_id=yes_no[0],
        no_id=yes_no[1],
        heads=[(1, 0), (2, 3)],
        z_mean_lhk=z_mean,
        features=[f1],
        random_features=[f2],
        controls=controls,
        candidate_ids=candidates,
        n_random=2,
        seed=5,
        batch_size=4,
    )
    conditions = set(zip(table["condition"], table["ablation"], table["seed"], strict=True))
    assert conditions == {
        ("clean", "", -1),
        ("top heads", "mean", -1),
        ("top heads", "zero", -1),
        ("random heads", "mean", 5),
        ("random heads", "mean", 6),
        ("random heads", "zero", 5),
        ("random heads", "zero", 6),
        ("feature f0", "project post_image", -1),
        ("random feature f1", "project post_image", -1),
    }
    clean = table[(table["condition"] == "clean") & (table["relation"] == "all")].set_index("task")
    direct = C.summarise(C.yes_no_eval(vlm, statements, *yes_no)).set_index("relation")
    assert clean.loc["statement", "accuracy"] == direct.loc["all", "accuracy"]
    assert clean.loc["control", "n"] == 3
    top = table[(table["condition"] == "top heads") & (table["relation"] == "all") & (table["task"] == "statement")]
    assert not np.allclose(top["mean_p_correct"], clean.loc["statement", "mean_p_correct"])


def test_choice_eval_is_argmax_over_candidates(vlm):
    controls = C.choices_from_samples(world.make_samples(0, "control", 5, qtypes=("color",)))
    candidates = {c: C.single_token_id(vlm.tokenizer, c) for c in world.COLORS}
    table = C.choice_eval(vlm, controls, candidates, batch_size=2)
    batch = A.prepare(vlm, [c.image for c in controls], [c.question for c in controls])
    logits = A.next_token_logits(vlm, batch)[:, list(candidates.values())]
    assert table["predicted"].tolist() == [list(candidates)[i] for i in logits.argmax(1).tolist()]
    p = torch.softmax(logits, -1)
    answer = [list(candidates).index(c.answer) for c in controls]
    np.testing.assert_allclose(table["p_correct"], p[torch.arange(5), answer].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="expected exactly one"):
        C.single_token_id(vlm.tokenizer, "left of")


# ---------------------------------------------------------------------------------------------------------------
# Attention overlays


def test_attention_patterns_equal_hf_eager_weights(vlm, batch):
    heads = [(0, 1), (1, 3), (2, 0)]
    patterns = AN.attention_patterns(vlm, batch, heads)
    eager = copy.deepcopy(vlm.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attn = eager(
            input_ids=batch.input_ids_bs,
            pixel_values=batch.pixels.values,
            attention_mask=batch.attention_mask_bs.long(),
            output_attentions=True,
        ).attentions
    for l, h in heads:
        for i in range(batch.input_ids_bs.shape[0]):
            n = int(batch.lengths_b[i])
            # HF's eager kernel takes its softmax in float32 even in a float64 model.
            torch.testing.assert_close(patterns[(l, h)][i, :n, :n], attn[l][i, h, :n, :n], rtol=0, atol=1e-6)
            torch.testing.assert_close(patterns[(l, h)][i, :n].sum(-1), torch.ones(n, dtype=torch.float64))


def test_image_attention_and_mass_on_object_patches(vlm, batch, samples):
    heads = [(1, 3), (2, 0)]
    att = AN.image_attention(vlm, batch, heads)
    assert att.grid_bhyx.shape == (4, 2, 6, 6)
    patterns = AN.attention_patterns(vlm, batch, heads)
    post, img = batch.post_image_bs[0], batch.image_mask_bs[0]
    expect_n = patterns[(2, 0)][0][post][:, img].mean(0)
    torch.testing.assert_close(att.to_image_bhn[0, 1], expect_n, rtol=1e-12, atol=0)
    torch.testing.assert_close(att.grid_bhyx[0, 1, 2, 3], expect_n[2 * 6 + 3])
    torch.testing.assert_close(att.image_mass_bh, att.to_image_bhn.sum(-1))
    assert ((att.image_mass_bh > 0) & (att.image_mass_bh < 1)).all()
    patches_b = [AN.scene_patches(s.scene, [s.subject, s.obj], grid_side=6) for s in samples]
    assert all(0 < len(p) < 36 for p in patches_b)
    mass = AN.attention_mass(att, patches_b)
    for i, p in enumerate(patches_b):
        torch.testing.assert_close(mass[i], att.to_image_bhn[i][:, p].sum(-1))
    torch.testing.assert_close(AN.attention_mass(att, [range(36)] * 4), att.image_mass_bh)
    answer = AN.image_attention(vlm, batch, heads, query_bs=AN.last_token_bs(batch))
    last = int(batch.lengths_b[0]) - 1
    torch.testing.assert_close(answer.to_image_bhn[0, 0], patterns[(1, 3)][0, last][img])


def test_frozen_weights_give_the_same_attribution(vlm, batch, mean_d):
    """Models loaded for inference often have requires_grad off; the adapter then makes hook_z a leaf itself."""
    features = features_for(vlm)
    default = T.attribute(vlm, batch, features, mean_d)
    vlm.model.requires_grad_(False)
    try:
        frozen = T.attribute(vlm, batch, features, mean_d)
    finally:
        vlm.model.requires_grad_(True)
    for a, b in zip(default, frozen, strict=True):
        torch.testing.assert_close(a.effect_bslh, b.effect_bslh, rtol=1e-12, atol=1e-14, equal_nan=True)
        torch.testing.assert_close(a.resid_effect_bsl, b.resid_effect_bsl, rtol=1e-12, atol=1e-14, equal_nan=True)


def test_combined_interventions_equal_nested_ones(vlm, batch, statements, yes_no):
    f = features_for(vlm, layers=(1,))[0]
    ablate, project = C.ablate_heads(vlm, [(0, 1)]), C.project_feature(vlm, f)
    combined = C.yes_no_eval(vlm, statements, *yes_no, intervention=C.combine(ablate, project))
    with ablate(batch), project(batch):
        logits = A.next_token_logits(vlm, batch)
    p_yes = torch.softmax(logits[:, list(yes_no)], -1)[:, 0].numpy()
    np.testing.assert_allclose(combined["p_yes"], p_yes, rtol=1e-6)
    assert not np.allclose(combined["p_yes"], C.yes_no_eval(vlm, statements, *yes_no)["p_yes"])
