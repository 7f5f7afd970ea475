"""The per-feature table on a tiny random LLaVA: streamed statistics equal a direct computation."""

import fakes
import numpy as np
import torch
from test_adaptation import random_topk_sae

from lib.kernels import adapter as A
from lib.kernels import diffing
from lib.sources import world


def test_feature_table_matches_direct_computation():
    torch.set_num_threads(1)
    vlm = fakes.world_vlm(seed=0, n_layers=2)
    samples = world.make_samples(0, "heldout", 10)
    pairs = [(s.scene.render(), s.question) for s in samples]
    text_pairs = [(s.scene.caption(), s.question) for s in samples]
    base = {0: random_topk_sae(0), 1: random_topk_sae(1)}
    adapted = {"text-only": {0: random_topk_sae(2), 1: random_topk_sae(3)}}
    table = diffing.feature_table(vlm, base, adapted, pairs, text_pairs, batch_size=4)
    assert len(table) == 2 * base[0].cfg.d_sae and set(table.layer) == {0, 1}

    # direct: every held-out token at layer 1 in one forward, encoded at once
    batch = A.prepare(vlm, [p[0] for p in pairs], [p[1] for p in pairs])
    captured = {}
    A.resid_stream(vlm, batch, [1], on_layer=lambda name, x: captured.update({name: x}))
    x_nd = captured[A.resid_name(1)][batch.keep_bs]
    image_n = batch.image_mask_bs[batch.keep_bs]
    z = adapted["text-only"][1].encode(x_nd).detach().double()
    energy = (z[image_n] ** 2).sum(0) / (z**2).sum(0)
    energy = torch.where((z**2).sum(0) > 0, energy, torch.zeros_like(energy))
    rows = table[(table.layer == 1) & (table.variant == "text-only")]
    np.testing.assert_allclose(rows.visual_energy.to_numpy(), energy.numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(rows.freq_txt.to_numpy(), (z[~image_n] > 0).double().mean(0).numpy(), rtol=1e-6)
    cos = torch.nn.functional.cosine_similarity(base[1].W_dec, adapted["text-only"][1].W_dec, dim=1)
    np.testing.assert_allclose(rows.dec_cos.to_numpy(), cos.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert rows.visual_energy_raw.between(0, 1).all()


def test_image_dependence_matches_direct_computation():
    """Relative change of each feature under the mean-image corruption, against two direct forwards."""
    torch.set_num_threads(1)
    vlm = fakes.world_vlm(seed=1, n_layers=2)
    samples = world.make_samples(1, "heldout", 8)
    pairs = [(s.scene.render(), s.question) for s in samples]
    reference = [s.scene.render() for s in world.make_samples(1, "ref", 4)]
    saes = {1: random_topk_sae(5)}
    dep = diffing.image_dependence(vlm, saes, pairs, reference, batch_size=3)
    assert dep.layer.unique().tolist() == [1] and len(dep) == saes[1].cfg.d_sae

    from lib.kernels.attribution import mean_image_embedding

    mean_d = mean_image_embedding(vlm, reference)
    batch = A.prepare(vlm, [p[0] for p in pairs], [p[1] for p in pairs])
    clean = A.capture(vlm, batch, resid_layers=[1]).resid[A.resid_name(1)][batch.post_image_bs]
    with A.replace_image_embeddings(vlm, mean_d):
        corrupt = A.capture(vlm, batch, resid_layers=[1]).resid[A.resid_name(1)][batch.post_image_bs]
    z, zc = saes[1].encode(clean).double(), saes[1].encode(corrupt).double()
    mass = z.abs().sum(0)
    expect = torch.where(mass > 0, (z - zc).abs().sum(0) / mass.clamp_min(1e-12), torch.zeros_like(mass))
    np.testing.assert_allclose(dep.image_dependence.to_numpy(), expect.detach().numpy(), rtol=1e-5, atol=1e-9)
    assert (dep.image_dependence > 0).any(), "a random SAE on a random model reads the image somewhere"
