"""lib/kernels/steering.py: the steering intervention adds exactly its vector where asked, the fast tail runner equals
its plain twin, and on a fake built so that one direction decides yes / no, steering along it flips the answers
while random directions of the same norm do not."""

import fakes
import numpy as np
import pandas as pd
import pytest
import torch

from lib.kernels import adapter as A
from lib.kernels import steering as ST
from lib.sources import world

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vlm():
    return fakes.world_vlm(seed=5, n_layers=3, with_base_lm=False)


@pytest.fixture(scope="module")
def samples():
    return world.make_samples(0, "steer", 80, qtypes=("relation", "statement"), n_objects=(2,))


def _inputs(samples):
    return [s.scene.render() for s in samples], [s.question for s in samples]


def test_add_to_resid_adds_the_vector_at_the_chosen_positions_only(vlm, samples):
    images, questions = _inputs(samples[:4])
    batch = A.prepare(vlm, images, questions)
    v_d = torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(0))
    where_bs = ST.steer_positions(batch, "post_image")
    clean = A.resid_stream(vlm, batch, layers=[1])[A.resid_name(1)]
    with ST.add_to_resid(vlm, 1, v_d, where_bs):
        steered = A.resid_stream(vlm, batch, layers=[1])[A.resid_name(1)]
    diff_bsd = steered - clean
    torch.testing.assert_close(diff_bsd[where_bs], v_d.expand(int(where_bs.sum()), -1), rtol=1e-5, atol=1e-5)
    assert (diff_bsd[~where_bs] == 0).all()
    answer_bs = ST.steer_positions(batch, "answer")
    assert (answer_bs.sum(1) == 1).all() and (answer_bs & ~batch.post_image_bs).sum() == 0
    assert answer_bs[torch.arange(4), batch.lengths_b - 1].all()


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_the_fast_tail_equals_its_plain_twin(vlm, samples, layer):
    images, questions = _inputs(samples[:12])
    vectors_md = ST.random_directions(3, vlm.d_model, seed=1) * 4.0
    fast = ST.steer_p_yes(vlm, images, questions, layer, vectors_md, 5, 6, batch_size=5, fast=True)
    plain = ST.steer_p_yes(vlm, images, questions, layer, vectors_md, 5, 6, batch_size=5, fast=False)
    for a, b in zip(fast, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_random_directions_are_unit_and_reproducible():
    u = ST.random_directions(50, 32, seed=3)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(50))
    torch.testing.assert_close(u, ST.random_directions(50, 32, seed=3))
    assert abs(float((u @ u.T).fill_diagonal_(0).abs().mean())) < 0.25  # nearly orthogonal in 32 dimensions


def test_flip_table_counts_flips_toward_each_answer():
    p_clean = np.array([0.9, 0.8, 0.2, 0.1])
    p_steered = np.array([[0.9, 0.8, 0.7, 0.6], [0.1, 0.8, 0.2, 0.1]])
    t = ST.flip_table(p_clean, p_steered, [dict(vector="+"), dict(vector="-")])
    assert t.flip_rate.tolist() == [0.5, 0.25] and t.to_yes.tolist() == [1.0, 0.0] and t.to_no.tolist() == [0.0, 0.5]


def test_mean_active_ignores_inactive_positions():
    codes = torch.tensor([[0.0, 2.0], [4.0, 0.0], [0.0, 0.0], [2.0, 6.0]])
    torch.testing.assert_close(ST.mean_active(codes), torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert ST.mean_active(torch.zeros(3, 1)).item() == 0


def _planted(vlm, samples, layer):
    """The fake with the unembeddings of yes and no set to +u and -u, u the direction along which the residual at
    the answer position varies most from item to item (the mean removed): that direction alone decides the answer."""
    images, questions = _inputs(samples)
    batch = A.prepare(vlm, images, questions)
    x_bd = A.resid_stream(vlm, batch, layers=[vlm.n_layers - 1])[A.resid_name(vlm.n_layers - 1)]
    x_bd = x_bd[torch.arange(len(samples)), batch.lengths_b - 1].double()
    centred = x_bd - x_bd.mean(0)
    mean_dir = torch.nn.functional.normalize(x_bd.mean(0), dim=0)
    centred = centred - torch.outer(centred @ mean_dir, mean_dir)
    u_d = torch.linalg.svd(centred, full_matrices=False).Vh[0].float()
    yes, no = (vlm.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    norm = A.decoder(vlm.model).norm
    with torch.no_grad():
        norm.weight.fill_(1.0)
        vlm.model.lm_head.weight[yes] = 10 * u_d
        vlm.model.lm_head.weight[no] = -10 * u_d
    return u_d, yes, no, (x_bd.float() @ u_d).numpy()


def test_steering_flips_a_planted_direction_and_random_directions_do_not(samples):
    vlm = fakes.world_vlm(seed=5, n_layers=3, with_base_lm=False)
    layer = vlm.n_layers - 1
    u_d, yes, no, margin_i = _planted(vlm, samples, layer)
    # The items the direction decides with a margin between m and 2m (m the median margin): a push of 2.4 m along it
    # flips every one, while a random direction of that norm would need |cos| > 0.4 with it to flip any.
    m = np.median(np.abs(margin_i))
    keep = (np.abs(margin_i) >= m) & (np.abs(margin_i) <= 2 * m)
    images, questions = _inputs([s for s, k in zip(samples, keep, strict=True) if k])
    norm = 2.4 * m
    n_random = 20
    vectors_md = torch.cat([torch.stack([u_d, -u_d]), ST.random_directions(n_random, vlm.d_model, seed=0)]) * norm
    p_clean, p_mi = ST.steer_p_yes(vlm, images, questions, layer, vectors_md, yes, no, positions="answer")
    assert len(p_clean) >= 8 and 0 < (p_clean > 0.5).mean() < 1, "both answers among the decided items"
    labels = [dict(kind="feature", vector="+"), dict(kind="feature", vector="-")]
    labels += [dict(kind="random", vector="random")] * n_random
    t = ST.flip_table(p_clean, p_mi, labels)
    plus, minus, rand = t.iloc[0], t.iloc[1], t[t.kind == "random"]
    assert plus.to_yes == 1.0 and plus.to_no == 0.0 and minus.to_no == 1.0 and minus.to_yes == 0.0
    assert plus.flip_rate + minus.flip_rate == pytest.approx(1.0)  # between them, every answer flips
    assert rand.flip_rate.mean() < 0.05 and rand.flip_rate.max() < min(plus.flip_rate, minus.flip_rate)


def test_steer_features_reads_sign_and_scale_from_the_data(samples):
    vlm = fakes.world_vlm(seed=5, n_layers=3, with_base_lm=False)
    layer = vlm.n_layers - 1
    u_d, yes, no, _ = _planted(vlm, samples, layer)

    class SAE:  # one feature whose decoder row is -u (so it means "no") and whose code is the projection on it
        dtype = torch.float32
        W_dec = -u_d[None, :]

        @staticmethod
        def encode(x):
            return torch.relu(x @ -u_d)[..., None]

    # The fake's own answers stand in for the truth, so the feature separates the answers by construction.
    images, questions = _inputs(samples)
    p_clean, _ = ST.steer_p_yes(vlm, images, questions, layer, torch.zeros(1, vlm.d_model), yes, no)
    own = [
        s.__class__(**{**s.__dict__, "answer": "yes" if p > 0.5 else "no"})
        for s, p in zip(samples, p_clean, strict=True)
    ]
    chosen = pd.DataFrame([dict(layer=layer, feature=0, best_relation=own[0].relation)])
    flips, feats = ST.steer_features(vlm, {layer: SAE}, chosen, own, yes, no, scales=[1.0, 64.0], n_random=4, seed=0)
    assert feats.sign.iloc[0] == -1.0 and feats.mean_active.iloc[0] > 0
    big = flips[(flips.scale == 64.0) & (flips.kind == "feature") & (flips.subset == "all relations")]
    assert big.set_index("vector").loc["+ (toward yes)", "to_yes"] == 1.0
    assert big.set_index("vector").loc["- (toward no)", "to_no"] == 1.0
    assert set(flips.subset) == {"best relation", "all relations"} and len(flips) == 2 * 2 * (2 + 4)
