"""lib/kernels/adaptation.py and lib/kernels/activations.py on an organism-shaped random LLaVA (tests/fakes.py):
forwards, resume, tables, gradients, and the figures of lib/figures/saes.py."""

from __future__ import annotations

import contextlib

import fakes
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig

from lib.figures import saes as FS
from lib.kernels import adaptation as AD
from lib.kernels import adapter as A
from lib.kernels.activations import lm_batches, vlm_batches
from lib.kernels.sae import ADAPTATION_VARIANTS, BASE, SAEBank, SAESpec
from lib.kernels.sae_training import StreamingTrainer, TrainConfig
from lib.names import resid_name
from lib.sources import world

matplotlib.use("Agg")
torch.set_num_threads(1)

D, F_, K = 32, 64, 4  # the fake's d_model; a small SAE
LAYERS = (0, 1, 2)
CFG = TrainConfig(lr=1e-2, num_threads=None)


@pytest.fixture(scope="module")
def vlm():
    return fakes.world_vlm(seed=0, n_layers=len(LAYERS))


@pytest.fixture(scope="module")
def samples():
    return world.make_samples(0, "train", 36)


@pytest.fixture(scope="module")
def pairs(samples):
    return [(s.scene.render(), s.question) for s in samples]


@pytest.fixture(scope="module")
def text_pairs(samples):
    return [(s.scene.caption(), s.question) for s in samples]


def random_topk_sae(seed: int, d_sae: int = F_, k: int = K) -> TopKSAE:
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=d_sae, k=k))
    W_dec = torch.randn(d_sae, D, generator=gen)
    sae.load_state_dict(
        {
            "W_enc": W_dec.T / 4,
            "b_enc": torch.zeros(d_sae),
            "W_dec": W_dec / W_dec.norm(dim=-1, keepdim=True),
            "b_dec": 0.1 * torch.randn(D, generator=gen),
        }
    )
    return sae


@pytest.fixture(scope="module")
def base_saes():
    return {layer: random_topk_sae(10 + layer) for layer in LAYERS}


@contextlib.contextmanager
def count_forwards(module: torch.nn.Module, die_at: int | None = None):
    """Count calls of `module`; with die_at, raise Killed at that call (a run killed mid-training)."""
    calls = []

    def hook(*_):
        calls.append(1)
        if die_at is not None and len(calls) == die_at:
            raise Killed

    handle = module.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


class Killed(Exception):
    pass


# --------------------------------------------------------------------------------------------------------------


def test_one_vlm_forward_per_batch_gives_every_layer(vlm, pairs):
    batches = []
    with count_forwards(A.decoder(vlm.model)) as lm_calls, count_forwards(vlm.model.model.vision_tower) as towers:
        for batch in vlm_batches(vlm, pairs[:10], batch_size=4, layers=LAYERS):
            batches.append(batch)
    assert len(batches) == 3 and len(lm_calls) == 3 and len(towers) == 3
    assert [b.n_sequences for b in batches] == [4, 4, 2]
    # The same activations read layer by layer through the adapter, BOS and padding dropped by hand.
    for i, batch in enumerate(batches):
        chunk = pairs[4 * i : min(4 * i + 4, 10)]
        padded = A.prepare(vlm, [p[0] for p in chunk], [p[1] for p in chunk])
        resid_all = A.resid_stream(vlm, padded)
        keep_bs = padded.attention_mask_bs.clone()
        keep_bs[:, 0] = False  # every fake prompt starts with <bos>
        for li, layer in enumerate(LAYERS):
            torch.testing.assert_close(batch.x_lnd[li], resid_all[resid_name(layer)][keep_bs], rtol=0, atol=0)
        assert torch.equal(batch.image_mask_n, padded.image_mask_bs[keep_bs])
        assert int(batch.image_mask_n.sum()) == len(chunk) * vlm.n_image_tokens


def test_lm_batches_run_the_base_lm_on_text_only(vlm, text_pairs):
    with count_forwards(A.decoder(vlm.model)) as vlm_calls, count_forwards(A.decoder(vlm.base_lm)) as lm_calls:
        batches = list(lm_batches(vlm, text_pairs[:6], batch_size=4, layers=[2, 0]))
    assert (len(vlm_calls), len(lm_calls)) == (0, 2)
    assert not any(b.image_mask_n.any() for b in batches)
    padded = A.prepare_text(vlm, [c for c, _ in text_pairs[:4]], [q for _, q in text_pairs[:4]])
    resid = A.resid_stream(vlm, padded, layers=[0, 2])
    keep_bs = padded.keep_bs
    assert batches[0].x_lnd.shape == (2, int(keep_bs.sum()), D)
    torch.testing.assert_close(batches[0].x_lnd[0], resid[resid_name(2)][keep_bs], rtol=0, atol=0)  # layer order
    torch.testing.assert_close(batches[0].x_lnd[1], resid[resid_name(0)][keep_bs], rtol=0, atol=0)


def test_adaptation_spends_one_forward_per_batch_on_all_layers_and_variants(vlm, pairs, base_saes):
    with count_forwards(A.decoder(vlm.model)) as calls, count_forwards(A.decoder(vlm.base_lm)) as lm_calls:
        result = AD.adapt_saes(
            vlm, base_saes, pairs[:20], pairs[20:28], SAESpec(D, F_, K), CFG, seed=1, eval_every=2, batch_size=4
        )
    n_train, n_held = 5, 2  # batches of 4
    assert result.forwards_per_epoch == [n_train]
    # Held-out activations are harvested once and replayed at every evaluation (step 0, 2, 4, 5).
    assert len(calls) == n_train + n_held and len(lm_calls) == 0
    assert result.epoch_log.to_dict("records") == [
        {"epoch": 0, "step": n_train, "n_sequences": 20, "n_forwards": n_train, "n_saes": 12}
    ]
    bank = result.bank
    assert bank.layers == LAYERS and [v.name for v in bank.variants] == [v.name for v in ADAPTATION_VARIANTS]
    start = SAEBank.create(SAESpec(D, F_, K), LAYERS, ADAPTATION_VARIANTS, base_saes=base_saes, seed=1)
    moved_lv = (bank.W_dec - start.W_dec).abs().amax(dim=(-1, -2))
    assert (moved_lv > 0).all(), "every SAE of every layer must have been trained from those forwards"
    h = result.history
    assert sorted(h.step.unique()) == [0, 2, 4, 5]
    assert set(h.columns) >= {"step", "layer", "variant", "split", "fvu"}
    assert len(h) == 4 * len(LAYERS) * len(ADAPTATION_VARIANTS) * 3


def test_killed_and_resumed_adaptation_equals_uninterrupted(vlm, pairs, base_saes, tmp_path):
    spec = SAESpec(D, F_, K)
    args = (vlm, base_saes, pairs[:24], pairs[24:32], spec, CFG)
    kwargs = dict(seed=3, eval_every=2, batch_size=4)
    straight = AD.adapt_saes(*args, **kwargs)
    ckpt = tmp_path / "adapt.safetensors"
    # 2 held-out forwards at step 0, then training; dying on the 5th training forward leaves the step-4 checkpoint.
    with pytest.raises(Killed), count_forwards(A.decoder(vlm.model), die_at=2 + 5):
        AD.adapt_saes(*args, **kwargs, checkpoint=ckpt)
    assert ckpt.exists()
    with count_forwards(A.decoder(vlm.model)) as calls:
        resumed = AD.adapt_saes(*args, **kwargs, checkpoint=ckpt)
    assert len(calls) == 2 + 2, "the resumed run must start at step 4 (held-out harvest + the last 2 batches)"
    for name, p in straight.bank.state_dict().items():
        assert torch.equal(p, resumed.bank.state_dict()[name]), name
    pd.testing.assert_frame_equal(straight.history, resumed.history)
    assert straight.forwards_per_epoch == resumed.forwards_per_epoch == [6]
    with pytest.raises(ValueError, match="multiple of eval_every"):
        AD.adapt_saes(*args, **kwargs, checkpoint=tmp_path / "other", checkpoint_every=3)


def perfect_sae() -> TopKSAE:
    """d_sae = 2d, k = d, encoder [I, -I], decoder [I; -I]: x_hat = relu(x) - relu(-x) = x exactly."""
    eye = torch.eye(D)
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=2 * D, k=D))
    sae.load_state_dict(
        {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * D), "W_dec": torch.cat([eye, -eye], 0)}
        | {"b_dec": torch.zeros(D)}
    )
    return sae


def zero_sae() -> TopKSAE:
    sae = perfect_sae()
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def test_reconstruction_table_by_hand(vlm, pairs, text_pairs):
    spec = SAESpec(D, 2 * D, D)
    perfect = {layer: perfect_sae() for layer in LAYERS}
    # A bank fresh from the perfect base SAEs: base-initialised variants reconstruct perfectly, random does not.
    bank = SAEBank.create(spec, LAYERS, ADAPTATION_VARIANTS, base_saes=perfect, seed=0)
    held, held_text = pairs[:6], text_pairs[:5]
    table = AD.reconstruction_table(vlm, perfect, bank, held, held_text, batch_size=4)
    assert tuple(table.columns) == AD.TABLE_COLUMNS
    vlm_rows, lm_rows = table[table.stream == "vlm"], table[table.stream == "lm"]
    assert set(vlm_rows.sae) == {"base", "full", "random", "text-only", "image-only"}
    assert set(lm_rows.sae) == {"base", "text-only"} and "image" not in set(lm_rows.split)
    exact = table[table.sae != "random"]
    assert (exact.fvu < 1e-10).all() and (exact.nmse < 1e-10).all(), exact[exact.fvu >= 1e-10]
    assert (table[table.sae == "random"].fvu > 0.1).all()
    # Token counts from the masks, computed independently.
    padded = A.prepare(vlm, [p[0] for p in held], [p[1] for p in held])
    n_img = int(padded.image_mask_bs.sum())
    n_txt = int(padded.text_bs.sum())
    counts = vlm_rows.groupby("split").n_tokens.unique().to_dict()
    assert {s: list(c) for s, c in counts.items()} == {"full": [n_img + n_txt], "image": [n_img], "text": [n_txt]}
    assert n_img == 6 * vlm.n_image_tokens

    # An SAE that reconstructs nothing: nmse = 1 and FVU = sum ||x||^2 / sum ||x - mu||^2, each split its own mean.
    table0 = AD.reconstruction_table(vlm, {layer: zero_sae() for layer in LAYERS}, bank, held, held_text)
    resid = A.resid_stream(vlm, padded, layers=[1])[resid_name(1)].double()
    for split, mask_bs in (("full", padded.keep_bs), ("image", padded.image_mask_bs), ("text", padded.text_bs)):
        x_nd = resid[mask_bs]
        want = float(x_nd.pow(2).sum() / (x_nd - x_nd.mean(0)).pow(2).sum())
        row = table0[(table0.sae == "base") & (table0.stream == "vlm") & (table0.layer == 1) & (table0.split == split)]
        assert row.fvu.item() == pytest.approx(want, rel=1e-9)
        assert row.nmse.item() == pytest.approx(1.0, abs=1e-12)

    summary = AD.summary_table(table0)
    assert set(summary.columns) >= {"sae", "stream", "split", "fvu_mean", "fvu_std", "fvu_min", "fvu_max", "n_tokens"}
    got = summary[(summary.sae == "base") & (summary.split == "image")]
    want_rows = table0[(table0.sae == "base") & (table0.stream == "vlm") & (table0.split == "image")]
    assert got.fvu_mean.item() == pytest.approx(want_rows.fvu.mean())
    assert got.fvu_max.item() == pytest.approx(want_rows.fvu.max()) and got.n_tokens.item() == n_img
    with pytest.raises(ValueError, match="stream 'nope'"):
        AD.summary_table(table0, stream="nope")


def test_reconstruction_of_the_base_sae_equals_the_step_zero_history(vlm, pairs, text_pairs, base_saes):
    result = AD.adapt_saes(vlm, base_saes, pairs[:8], pairs[8:16], SAESpec(D, F_, K), CFG)
    table = AD.reconstruction_table(vlm, base_saes, result.bank, pairs[8:16], text_pairs[:4])
    # At step 0 every base-initialised variant is the base SAE (unit decoder rows: nothing to fold).
    step0 = result.history[(result.history.step == 0) & (result.history.variant == "full")]
    base = table[(table.sae == "base") & (table.stream == "vlm")]
    merged = step0.merge(base, on=["layer", "split"], suffixes=("_hist", "_table"))
    assert len(merged) == 3 * len(LAYERS)
    np.testing.assert_allclose(merged.fvu_hist, merged.fvu_table, rtol=1e-5)
    # ... and the end of the history is the adapted bank's table row.
    last = result.history[result.history.step == result.history.step.max()]
    adapted = table[(table.stream == "vlm") & (table.sae != "base")].rename(columns={"sae": "variant"})
    merged = last.merge(adapted, on=["layer", "variant", "split"], suffixes=("_hist", "_table"))
    assert len(merged) == 3 * len(LAYERS) * len(ADAPTATION_VARIANTS)
    np.testing.assert_allclose(merged.fvu_hist, merged.fvu_table, rtol=1e-5)


@pytest.mark.parametrize("variant, perturbed", [("text-only", "image"), ("image-only", "text")])
def test_a_masked_variant_ignores_the_other_tokens(vlm, pairs, base_saes, variant, perturbed):
    batch = next(vlm_batches(vlm, pairs[:4], batch_size=4, layers=LAYERS))
    where_n = batch.image_mask_n if perturbed == "image" else ~batch.image_mask_n
    gen = torch.Generator().manual_seed(0)
    noise_lnd = 5.0 * torch.randn(batch.x_lnd.shape, generator=gen) * where_n[None, :, None]
    other = type(batch)(batch.x_lnd + noise_lnd, batch.image_mask_n, batch.n_sequences)
    grads = []
    for b in (batch, other):
        bank = SAEBank.create(SAESpec(D, F_, K), LAYERS, ADAPTATION_VARIANTS, base_saes=base_saes, seed=0)
        trainer = StreamingTrainer(bank, CFG)
        trainer.step(b)
        grads.append({name: p.grad.clone() for name, p in bank.named_parameters()})
    names = [v.name for v in ADAPTATION_VARIANTS]

    def slot(g: dict, name: str, v: str) -> torch.Tensor:
        """One variant's gradient of a parameter: W_enc is (l, d, v, f), the others have v second."""
        return g[name][:, :, names.index(v)] if name == "W_enc" else g[name][:, names.index(v)]

    clean, noisy = grads
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert slot(clean, name, variant).abs().sum() > 0, name
        torch.testing.assert_close(slot(noisy, name, variant), slot(clean, name, variant), rtol=0, atol=0, msg=name)
        assert not torch.equal(slot(noisy, name, "full"), slot(clean, name, "full")), (
            f"the full variant must see the {perturbed} tokens ({name})"
        )


def test_train_base_saes_reports_fvu_and_dead_features(vlm, text_pairs):
    spec = SAESpec(D, F_, K)
    result = AD.train_base_saes(vlm, text_pairs[:24], text_pairs[24:], spec, CFG, seed=0, eval_every=1, n_epochs=2)
    h = result.history
    assert [v.name for v in result.bank.variants] == ["base"] and result.bank.layers == LAYERS
    first = h[(h.step == 0) & (h.split == "full")].set_index("layer").fvu
    for layer in LAYERS:
        assert result.heldout_fvu[layer] < first[layer], f"layer {layer}: training did not lower held-out FVU"
        assert 0 <= result.dead_frac[layer] < 1
    padded = A.prepare_text(vlm, [c for c, _ in text_pairs[24:]], [q for _, q in text_pairs[24:]])
    assert (result.report.n_tokens == int(padded.keep_bs.sum())).all()
    assert list(result.report.columns) == ["layer", "d_sae", "k", "fvu", "nmse", "dead_frac", "n_tokens"]
    # The base SAEs feed the adaptation directly (as a bank or as SAELens SAEs).
    saes = AD.saes_of(result.bank)
    assert sorted(saes) == list(LAYERS) and saes[0].cfg.d_sae == F_
    sweep = AD.base_sae_sweep(vlm, text_pairs[:8], text_pairs[24:], [spec, SAESpec(D, 2 * F_, 2 * K)], CFG, [1])
    assert sweep[["d_sae", "k"]].values.tolist() == [[F_, K], [2 * F_, 2 * K]]


def test_norm_ratio_by_hand(vlm, pairs, text_pairs):
    table = AD.norm_ratio(vlm, pairs[:5], text_pairs[:3], layers=[0, 2], batch_size=2)
    assert table.layer.tolist() == [0, 2]
    padded = A.prepare(vlm, [p[0] for p in pairs[:5]], [p[1] for p in pairs[:5]])
    x = A.resid_stream(vlm, padded, layers=[2])[resid_name(2)].double().norm(dim=-1)
    text = A.prepare_text(vlm, [c for c, _ in text_pairs[:3]], [q for _, q in text_pairs[:3]])
    y = A.resid_stream(vlm, text, layers=[2])[resid_name(2)].double().norm(dim=-1)
    row = table.set_index("layer").loc[2]
    assert row.vlm_text == pytest.approx(float(x[padded.text_bs].mean()), rel=1e-6)
    assert row.vlm_image == pytest.approx(float(x[padded.image_mask_bs].mean()), rel=1e-6)
    assert row.lm_text == pytest.approx(float(y[text.keep_bs].mean()), rel=1e-6)
    assert row.ratio_text == pytest.approx(row.vlm_text / row.lm_text)
    assert row.n_vlm_image == 5 * vlm.n_image_tokens and row.n_lm_text == int(text.keep_bs.sum())


def test_bad_pairs_name_the_index(vlm, pairs, text_pairs):
    bad = [*pairs[:3], (pairs[3][0].astype(np.float32), pairs[3][1])]
    with pytest.raises(ValueError, match=r"pairs\[3\].*uint8"):
        list(vlm_batches(vlm, bad, batch_size=2))
    with pytest.raises(ValueError, match=r"pairs\[1\]"):
        list(lm_batches(vlm, [text_pairs[0], ("caption only",)], batch_size=2))
    with pytest.raises(ValueError, match="layers"):
        list(vlm_batches(vlm, pairs[:2], layers=[0, 7]))


def test_plots_return_readable_figures(vlm, pairs, text_pairs, base_saes):
    import matplotlib.pyplot as plt

    result = AD.adapt_saes(vlm, base_saes, pairs[:8], pairs[8:12], SAESpec(D, F_, K), CFG, eval_every=1)
    table = AD.reconstruction_table(vlm, base_saes, result.bank, pairs[8:12], text_pairs[:4])
    fig = FS.plot_fvu_over_training(result.history)
    assert [ax.get_title() for ax in fig.axes] == ["text tokens", "image tokens"]
    assert [line.get_label() for line in fig.axes[0].lines] == [v.name for v in ADAPTATION_VARIANTS]
    # Each line is the mean over layers at each logged step.
    h = result.history
    want = h[(h.split == "text") & (h.variant == "random")].groupby("step").fvu.mean().to_numpy()
    np.testing.assert_allclose(fig.axes[0].lines[1].get_ydata(), want)
    fig2 = FS.plot_fvu_per_layer(table)
    assert len(fig2.axes) == 3 and len(fig2.axes[0].lines) == 5
    fig3 = FS.plot_reconstruction_gap(table)
    ax = fig3.axes[0]
    assert ax.get_yscale() == "log" and len(ax.lines) == 4
    for fig_ in (fig, fig2, fig3):
        assert fig_.get_figwidth() <= 9
        plt.close(fig_)


def test_random_variant_does_not_start_from_the_base_init(vlm, pairs, text_pairs):
    """Base SAEs and adaptation with the same seed: the `random` variant's starting dictionary must be independent
    of the draw the base SAEs started from (it was the same draw once, which made `random` look half-aligned)."""
    spec = SAESpec(D, F_, K)
    init = SAEBank.create(spec, LAYERS, [BASE], seed=0)  # what train_base_saes(seed=0) starts from
    base = AD.saes_of(init)
    res = AD.adapt_saes(vlm, base, pairs[:2], pairs[:2], spec, CFG, seed=0, batch_size=2)
    li, vi = res.bank.index(LAYERS[0], "random")
    start = init.W_dec[0, 0].detach()
    adapted = res.bank.W_dec[li, vi].detach()
    cos = torch.nn.functional.cosine_similarity(start, adapted, dim=1)
    assert cos.abs().median() < 0.3, f"random variant follows the base init (median |cos| {cos.abs().median():.2f})"
