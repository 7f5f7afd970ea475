"""Tests of lib/kernels/sae.py and lib/kernels/sae_training.py on small random tensors (seconds, no network)."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

from lib import names
from lib.kernels.activations import ActBatch
from lib.kernels.sae import (
    ADAPTATION_VARIANTS,
    FULL,
    IMAGE_ONLY,
    RANDOM,
    TEXT_ONLY,
    SAEBank,
    SAESpec,
    Variant,
    load_saes,
    topk_indices,
)
from lib.kernels.sae_training import (
    ReconAccumulator,
    ReconStats,
    StreamingTrainer,
    TrainConfig,
    batch_fvu,
    estimate_act_scale,
    evaluate_bank,
    evaluate_sae,
    fit,
    fvu_table,
    token_weights_vn,
)
from lib.sources.paper_models import jumprelu_to_topk

D, F_, K = 12, 48, 4
SPLITS_FOR_TEST = ("full", "image", "text")


def random_topk_sae(seed: int, apply_b_dec_to_input: bool = True, dec_norm: float | None = 1.0) -> TopKSAE:
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=F_, k=K, apply_b_dec_to_input=apply_b_dec_to_input))
    W_dec = torch.randn(F_, D, generator=gen)
    if dec_norm is not None:
        W_dec = dec_norm * W_dec / W_dec.norm(dim=-1, keepdim=True)
    sae.load_state_dict(
        {
            "W_enc": torch.randn(D, F_, generator=gen) / D**0.5,
            "b_enc": 0.1 * torch.randn(F_, generator=gen),
            "W_dec": W_dec,
            "b_dec": 0.3 * torch.randn(D, generator=gen),
        }
    )
    return sae


def random_batch(n_layers: int, n: int, seed: int, n_sequences: int = 2) -> ActBatch:
    gen = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n_layers, n, D, generator=gen) + torch.linspace(-1, 1, D)
    return ActBatch(x, torch.rand(n, generator=gen) < 0.4, n_sequences)


def test_topk_indices_selects_the_same_set_as_torch_topk():
    pre = torch.randn(300, 100)
    ours = topk_indices(pre, 7).sort(-1).values
    ref = pre.topk(7, dim=-1).indices.sort(-1).values
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_bank_encodes_and_decodes_like_saelens_topk(apply_b_dec):
    """SAELens' TopK convention: pre = (x - b_dec) W_enc + b_enc (if apply_b_dec_to_input), topk, then ReLU."""
    sae = random_topk_sae(0, apply_b_dec)
    bank = SAEBank.create(SAESpec(D, F_, K, apply_b_dec), [5], [FULL], base_saes={5: sae})
    x_nd = random_batch(1, 64, 1).x_lnd[0]
    acts, idx = bank.encode(x_nd[None])
    z_ours = torch.zeros(64, F_).scatter(-1, idx[0, :, 0], acts[0, :, 0])
    with torch.no_grad():
        z_ref = sae.encode(x_nd)
        x_hat_ref = sae(x_nd)
    assert (z_ref > 0).sum(-1).float().mean() > 1, "the example should have several active features per token"
    torch.testing.assert_close(z_ours, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bank(x_nd[None]).x_hat_lnvd[0, :, 0], x_hat_ref, rtol=1e-5, atol=1e-5)


def test_base_sae_with_non_unit_decoder_is_folded_exactly():
    """Equal decoder norms fold into the encoder without changing the SAE; the bank's decoder rows are unit norm."""
    sae = random_topk_sae(2, dec_norm=2.5)
    bank = SAEBank.create(SAESpec(D, F_, K), [0], [FULL], base_saes={0: sae})
    x_nd = random_batch(1, 32, 3).x_lnd[0]
    torch.testing.assert_close(bank.W_dec.norm(dim=-1), torch.ones(1, 1, F_))
    with torch.no_grad():
        torch.testing.assert_close(bank(x_nd[None]).x_hat_lnvd[0, :, 0], sae(x_nd), rtol=1e-5, atol=1e-5)


def test_file_names_are_saelens_own():
    from sae_lens import constants

    assert (names.SAE_CFG_FILENAME, names.SAE_WEIGHTS_FILENAME) == (
        constants.SAE_CFG_FILENAME,
        constants.SAE_WEIGHTS_FILENAME,
    )


def test_saved_saes_load_with_saelens_and_encode_the_same(tmp_path):
    scale = torch.tensor([[0.5, 3.0], [1.0, 7.0]])  # exported SAEs must read raw activations whatever the scale
    bank = SAEBank.create(
        SAESpec(D, F_, K),
        [2, 3],
        [FULL, RANDOM],
        base_saes={2: random_topk_sae(4), 3: random_topk_sae(5)},
        act_scale_lv=scale,
    )
    trainer = StreamingTrainer(bank, TrainConfig(lr=1e-2, num_threads=None))
    for seed in range(3):
        trainer.step(random_batch(2, 40, seed))
    bank.save_saes(tmp_path)
    x_lnd = random_batch(2, 50, 9).x_lnd
    with torch.no_grad():
        rec = bank(x_lnd)
    for li, layer in enumerate((2, 3)):
        for vi, variant in enumerate(("full", "random")):
            loaded = load_saes(tmp_path, [layer], variant)[layer]
            assert isinstance(loaded, TopKSAE) and isinstance(
                SAE.load_from_disk(tmp_path / f"L{layer}" / variant), TopKSAE
            )
            assert loaded.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
            files = {f.name for f in (tmp_path / f"L{layer}" / variant).iterdir()}
            assert files == {names.SAE_CFG_FILENAME, names.SAE_WEIGHTS_FILENAME}
            assert loaded.cfg.k == K
            with torch.no_grad():
                z = loaded.encode(x_lnd[li])
                x_hat = loaded.decode(z)
            z_bank = torch.zeros(50, F_).scatter(-1, rec.idx_lnvk[li, :, vi], rec.acts_lnvk[li, :, vi])
            torch.testing.assert_close(z, z_bank, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(x_hat, rec.x_hat_lnvd[li, :, vi] / scale[li, vi], rtol=1e-4, atol=1e-4)


def _grads(bank: SAEBank, batch: ActBatch, dense: bool):
    bank.zero_grad()
    rec = bank(batch.x_lnd.double(), dense=dense)
    w_vn = token_weights_vn(bank.variants, batch.image_mask_n, torch.float64)
    fvu_lv = batch_fvu(batch.x_lnd.double(), rec.x_hat_lnvd, w_vn, bank.act_scale_lv)
    fvu_lv.sum().backward()
    return fvu_lv.detach(), {name: p.grad.clone() for name, p in bank.named_parameters()}


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_sparse_kernel_equals_dense_twin(apply_b_dec):
    """Same loss and gradients of every parameter (float64, so top-k ties between the two are impossible)."""
    bases = {0: random_topk_sae(6, apply_b_dec), 1: random_topk_sae(7, apply_b_dec)}
    with torch.no_grad():
        bases[1].b_enc -= 2.0  # some kept pre-activations are negative: their ReLU must stop the gradient
    bank = SAEBank.create(
        SAESpec(D, F_, K, apply_b_dec),
        [0, 1],
        ADAPTATION_VARIANTS,
        base_saes=bases,
        act_scale_lv=torch.tensor([[1.0, 2.0, 0.5, 1.5], [3.0, 1.0, 1.0, 0.25]]),
    ).double()
    batch = random_batch(2, 70, 8)
    with torch.no_grad():
        assert (bank.encode(batch.x_lnd.double()).acts_lnvk == 0).any(), "the example should exercise the ReLU"
    fvu_s, g_s = _grads(bank, batch, dense=False)
    fvu_d, g_d = _grads(bank, batch, dense=True)
    torch.testing.assert_close(fvu_s, fvu_d, rtol=1e-12, atol=1e-12)
    for name in g_d:
        assert g_d[name].abs().max() > 0, f"{name}: the dense gradient should not vanish"
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-9, atol=1e-12, msg=name)


def test_decoder_gradient_projection_removes_only_the_radial_part():
    bank = SAEBank.create(SAESpec(D, F_, K), [0], [RANDOM])
    grad = torch.randn_like(bank.W_dec)
    bank.W_dec.grad = grad.clone()
    bank.project_decoder_grad_()
    w = bank.W_dec.detach()
    torch.testing.assert_close((bank.W_dec.grad * w).sum(-1), torch.zeros(1, 1, F_), atol=1e-6, rtol=0)
    torch.testing.assert_close(bank.W_dec.grad + (grad * w).sum(-1, keepdim=True) * w, grad)


def test_sae_dense_environment_variable_selects_the_twin(monkeypatch):
    monkeypatch.setenv("SAE_DENSE", "1")
    assert TrainConfig().dense and not TrainConfig(kernel="sparse").dense
    monkeypatch.setenv("SAE_DENSE", "0")
    assert not TrainConfig().dense and TrainConfig(kernel="dense").dense


def test_bank_trains_each_sae_as_if_alone():
    """Stacking SAEs of several layers and variants into one bank must not couple them."""
    layers, variants = [0, 1], [TEXT_ONLY, IMAGE_ONLY]
    bases = {0: random_topk_sae(10), 1: random_topk_sae(11)}
    batches = [random_batch(2, 30, s) for s in range(4)]
    cfg = TrainConfig(lr=3e-3, num_threads=None)
    bank = StreamingTrainer(SAEBank.create(SAESpec(D, F_, K), layers, variants, base_saes=bases).double(), cfg)
    for b in batches:
        bank.step(b)
    for li, layer in enumerate(layers):
        for vi, v in enumerate(variants):
            alone = StreamingTrainer(SAEBank.create(SAESpec(D, F_, K), [layer], [v], base_saes=bases).double(), cfg)
            for b in batches:
                alone.step(ActBatch(b.x_lnd[li : li + 1], b.image_mask_n, b.n_sequences))
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                mine = getattr(bank.bank, name)[li, :, vi] if name == "W_enc" else getattr(bank.bank, name)[li, vi]
                ref = getattr(alone.bank, name)[0, :, 0] if name == "W_enc" else getattr(alone.bank, name)[0, 0]
                torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-12, msg=f"{layer}/{v.name}/{name}")


def test_batch_fvu_by_hand():
    # One layer, 4 tokens in 2-d, two variants: all tokens, and tokens 0 and 1 only.
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 2.0], [0.0, 2.0]])  # errors^2: 1, 0, 0, 4
    x_hat_lnvd = x_hat[None, :, None, :].expand(1, 4, 2, 2)
    w_vn = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    fvu = batch_fvu(x, x_hat_lnvd, w_vn, torch.ones(1, 2))
    # all: mean err 5/4; mean (1, 1.5); ||x - mu||^2 = 2.25, 6.25, 1.25, 7.25 -> mean 17/4
    # first two: mean err 1/2; mean (2, 0); ||x - mu||^2 = 1, 1 -> mean 1
    torch.testing.assert_close(fvu, torch.tensor([[5 / 17, 0.5]]), rtol=1e-6, atol=0)
    # a bank scale only changes units: the same reconstruction in scaled units gives the same FVU
    fvu_scaled = batch_fvu(x, 3 * x_hat_lnvd, w_vn, torch.full((1, 2), 3.0))
    torch.testing.assert_close(fvu_scaled, fvu)


def test_recon_accumulator_by_hand_and_streaming():
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 2.0], [0.0, 2.0]])[None, :, None, :]
    image = torch.tensor([True, True, False, False])
    acc = ReconAccumulator([7], ["v"], 2)
    acc.update(x[:, :3], x_hat[:, :3], image[:3])  # two batches...
    acc.update(x[:, 3:], x_hat[:, 3:], image[3:])
    one = ReconAccumulator([7], ["v"], 2)
    one.update(x, x_hat, image)  # ...give what one batch gives
    got = {r.split: r for r in acc.result()}
    assert {r.split: r for r in one.result()} == got
    # full: SSE 5, sum ||x - mu||^2 = 17, sum ||x||^2 = 1 + 9 + 4 + 16 = 30
    # image (tokens 0, 1): SSE 1, own mean (2, 0) -> 2, ||x||^2 10; text (2, 3): SSE 4, own mean (0, 3) -> 2, 20
    assert (got["full"].n_tokens, got["image"].n_tokens, got["text"].n_tokens) == (4, 2, 2)
    assert got["full"].layer == 7 and got["full"].variant == "v"
    assert math.isclose(got["full"].fvu, 5 / 17) and math.isclose(got["full"].nmse, 5 / 30)
    assert math.isclose(got["image"].fvu, 1 / 2) and math.isclose(got["image"].nmse, 1 / 10)
    assert math.isclose(got["text"].fvu, 4 / 2) and math.isclose(got["text"].nmse, 4 / 20)


def test_training_lowers_fvu_and_keeps_decoder_rows_unit_norm():
    gen = torch.Generator().manual_seed(0)
    dictionary = torch.randn(32, D, generator=gen)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.rand(200, 32, generator=g) * (torch.rand(200, 32, generator=g) < 0.08)
        return ActBatch((z @ dictionary)[None], torch.zeros(200, dtype=torch.bool), 4)

    trainer = StreamingTrainer(SAEBank.create(SAESpec(D, F_, K), [0], [RANDOM]), TrainConfig(lr=1e-2, num_threads=None))
    first = float(trainer.step(batch(0)).fvu_lv)
    for s in range(1, 80):
        last = float(trainer.step(batch(s)).fvu_lv)
    assert last < 0.5 * first, (first, last)
    torch.testing.assert_close(trainer.bank.W_dec.norm(dim=-1), torch.ones(1, 1, F_))


def _stream(batches):
    def stream_from(position):
        for b in batches:  # each batch is 2 sequences
            if position > 0:
                position -= b.n_sequences
                continue
            yield b

    return stream_from


def test_killed_and_resumed_training_gives_the_same_saes(tmp_path):
    bases = {0: random_topk_sae(20), 4: random_topk_sae(21)}
    batches = [random_batch(2, 24, 100 + s) for s in range(9)]
    held = [random_batch(2, 30, 999)]

    def new_trainer():
        bank = SAEBank.create(SAESpec(D, F_, K), [0, 4], ADAPTATION_VARIANTS, base_saes=bases, seed=3)
        return StreamingTrainer(bank, TrainConfig(lr=5e-3, num_threads=None))

    straight = fit(new_trainer(), _stream(batches), heldout=lambda: held, eval_every=2)

    class Killed(Exception):
        pass

    def dying_stream(position):
        for i, b in enumerate(_stream(batches)(position)):
            if i == 5:  # the last checkpoint was at step 4
                raise Killed
            yield b

    ckpt = tmp_path / "adapt.safetensors"
    with pytest.raises(Killed):
        fit(new_trainer(), dying_stream, heldout=lambda: held, eval_every=2, checkpoint=ckpt, checkpoint_every=2)
    resumed = fit(
        new_trainer(), _stream(batches), heldout=lambda: held, eval_every=2, checkpoint=ckpt, checkpoint_every=2
    )
    for name, p in straight.bank.state_dict().items():
        assert torch.equal(p, resumed.bank.state_dict()[name]), name
    assert straight.history == resumed.history
    assert [
        row["step"]
        for row in straight.history
        if row["layer"] == 0 and row["variant"] == "full" and row["split"] == "full"
    ] == [0, 2, 4, 6, 8, 9]
    assert straight.counters == resumed.counters
    # one model forward per batch served all 2 layers x 4 variants
    assert straight.epoch_log == [{"epoch": 0, "step": 9, "n_sequences": 18, "n_forwards": 9, "n_saes": 8}]


def test_checkpoint_for_other_settings_is_refused_with_the_file_named(tmp_path):
    trainer = StreamingTrainer(SAEBank.create(SAESpec(D, F_, K), [0], [RANDOM]), TrainConfig(num_threads=None))
    trainer.save_checkpoint(tmp_path / "c.pt")
    other = StreamingTrainer(SAEBank.create(SAESpec(D, F_, K + 1), [0], [RANDOM]), TrainConfig(num_threads=None))
    with pytest.raises(ValueError, match=r"c\.pt.*spec"):
        other.load_checkpoint(tmp_path / "c.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt"):
        trainer.load_checkpoint(tmp_path / "bad.pt")


def test_from_padded_drops_bos_and_padding():
    resid = torch.arange(2 * 2 * 4 * 1, dtype=torch.float32).view(2, 2, 4, 1)  # layers, batch, seq, d
    attn = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right-padded, left-padded
    image = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]]).bool()
    batch = ActBatch.from_padded(resid, attn, image)
    assert batch.x_lnd[0, :, 0].tolist() == [1.0, 2.0, 6.0, 7.0]  # BOS at (0, 0) and (1, 1) dropped
    assert batch.image_mask_n.tolist() == [True, False, True, False]
    assert batch.n_sequences == 2


def test_estimate_act_scale_makes_mean_norm_sqrt_d():
    batches = [random_batch(2, 40, s) for s in range(3)]
    variants = [FULL, TEXT_ONLY, IMAGE_ONLY]
    scale_lv = estimate_act_scale(batches, variants)
    for li in range(2):
        for vi, tokens in enumerate(("all", "text", "image")):
            norms = []
            for b in batches:
                keep = {"all": torch.ones_like(b.image_mask_n), "text": ~b.image_mask_n, "image": b.image_mask_n}
                norms.append((scale_lv[li, vi] * b.x_lnd[li, keep[tokens]]).norm(dim=-1))
            assert math.isclose(float(torch.cat(norms).mean()), math.sqrt(D), rel_tol=1e-5)
    assert scale_lv[0, 1] != scale_lv[0, 2]


def test_evaluation_counts_dead_features_and_matches_saelens_eval():
    sae = random_topk_sae(30)
    with torch.no_grad():
        sae.b_enc[:5] = -1e6  # these can never be among the top k with a positive value
    bank = SAEBank.create(SAESpec(D, F_, K), [0], [FULL], base_saes={0: sae})
    held = [random_batch(1, 64, 31), random_batch(1, 64, 32)]
    ours = evaluate_bank(bank, held)
    ref = evaluate_sae(sae, held, layer_index=0, layer=0, name="full")
    assert ours.dead_frac[(0, "full")] == ref.dead_frac[(0, "full")] >= 5 / F_
    assert torch.equal(ours.fire_count_lvf, ref.fire_count_lvf)
    # the same SAE in a bank that works in scaled units reports the same raw-unit metrics
    scaled = evaluate_bank(
        SAEBank.create(SAESpec(D, F_, K), [0], [FULL], base_saes={0: sae}, act_scale_lv=torch.tensor([[4.0]])), held
    )
    for a, b, c in zip(ours.recon, ref.recon, scaled.recon, strict=True):
        assert (a.split, a.n_tokens) == (b.split, b.n_tokens) == (c.split, c.n_tokens)
        assert math.isfinite(a.fvu) and a.fvu > 0 and a.nmse > 0
        for other in (b, c):
            assert math.isclose(a.fvu, other.fvu, rel_tol=1e-5) and math.isclose(a.nmse, other.nmse, rel_tol=1e-5)


def test_topk_rebuild_copies_weights_and_drops_threshold():
    # the rebuild lives in lib/sources/paper_models.py (jumprelu_to_topk); this checks it on a SAE without b_dec on
    # the input
    gen = torch.Generator().manual_seed(0)
    jr = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F_, apply_b_dec_to_input=False))
    state = {
        "W_enc": torch.randn(D, F_, generator=gen),
        "b_enc": torch.randn(F_, generator=gen),
        "W_dec": torch.randn(F_, D, generator=gen),
        "b_dec": torch.randn(D, generator=gen),
        "threshold": torch.ones(F_),
    }
    jr.load_state_dict(state)
    topk = jumprelu_to_topk(jr, k=5)
    assert isinstance(topk, TopKSAE) and topk.cfg.k == 5 and not topk.cfg.apply_b_dec_to_input
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(topk, name), state[name])
    with torch.no_grad():
        assert ((topk.encode(torch.randn(9, D)) > 0).sum(-1) <= 5).all()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="k = 60"):
        SAESpec(D, F_, 60)
    with pytest.raises(ValueError, match="image_mask_n"):
        ActBatch(torch.zeros(1, 5, D), torch.zeros(4, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="base_saes has no layer 3"):
        SAEBank.create(SAESpec(D, F_, K), [3], [TEXT_ONLY])
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        SAEBank.create(SAESpec(D, F_, K), [0], [FULL], base_saes={0: random_topk_sae(0, apply_b_dec_to_input=False)})
    trainer = StreamingTrainer(SAEBank.create(SAESpec(D, F_, K), [0, 1], [RANDOM]), TrainConfig(num_threads=None))
    with pytest.raises(ValueError, match="expected \\(2, tokens, 12\\)"):
        trainer.step(random_batch(3, 10, 0))
    with pytest.raises(ValueError, match="init"):
        Variant("x", "pretrained", "all")


def test_fvu_table_summarises_over_layers():
    stats = [
        ReconStats(layer, variant, split, 10, fvu, 0.0)
        for layer, fvus in ((0, (0.1, 0.2)), (1, (0.3, 0.6)))
        for variant, fvu in zip(("base", "text-only"), fvus, strict=True)
        for split in SPLITS_FOR_TEST
    ]
    table = fvu_table(stats).set_index(["variant", "split"])
    row = table.loc[("text-only", "image")]
    assert math.isclose(row.fvu_mean, 0.4) and math.isclose(row.fvu_min, 0.2) and math.isclose(row.fvu_max, 0.6)
    assert math.isclose(row.fvu_std, math.sqrt(0.08)) and row.n_layers == 2 and row.n_tokens == 10


def test_bank_from_saved_saes_encodes_like_each_sae(tmp_path):
    """SAEBank.from_saes: a bank made of SAELens SAEs (as load_saes returns them) encodes as each SAE does."""
    spec = SAESpec(d_in=12, d_sae=24, k=3)
    made = SAEBank.create(spec, [0, 2], [RANDOM], seed=4)
    saes = {"a": {0: made.sae(0, "random"), 2: made.sae(2, "random")}}
    made.save_saes(tmp_path)
    saes["b"] = load_saes(tmp_path, [0, 2], "random")
    bank = SAEBank.from_saes(saes)
    x_lnd = torch.randn(2, 7, 12)
    enc = bank.encode(x_lnd)
    for li, layer in enumerate([0, 2]):
        for vi, name in enumerate(["a", "b"]):
            z_ref = saes[name][layer].encode(x_lnd[li])
            z = torch.zeros_like(z_ref).scatter_(1, enc.idx_lnvk[li, :, vi], enc.acts_lnvk[li, :, vi])
            torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
