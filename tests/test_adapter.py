"""lib/kernels/adapter.py on an organism-shaped random LLaVA: names, masks, hook_z, patching, corruption, projection."""

import copy

import fakes
import pytest
import torch

from lib.kernels import adapter as A
from lib.names import resid_name, z_name
from lib.sources import world

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vlm():
    return fakes.world_vlm(seed=0, n_layers=3)


@pytest.fixture(scope="module")
def samples():
    # Questions of different lengths, so the batch is padded.
    return [world.make_sample(0, "train", i, ("count", "statement", "where"), 16) for i in range(3)]


@pytest.fixture(scope="module")
def batch(vlm, samples):
    return A.prepare(vlm, [s.scene.render() for s in samples], [s.question for s in samples])


def hf_hidden_states(vlm, batch):
    with torch.no_grad():
        return vlm.model(
            input_ids=batch.input_ids_bs,
            pixel_values=batch.pixels.values,
            attention_mask=batch.attention_mask_bs.long(),
            output_hidden_states=True,
        ).hidden_states


def test_batch_masks(vlm, batch):
    n_img = vlm.n_image_tokens
    assert n_img == 36  # 48 px images, 8 px patches, CLS dropped
    assert len(set(batch.lengths_b.tolist())) > 1, "the fixture should produce a padded batch"
    for i in range(batch.input_ids_bs.shape[0]):
        length = int(batch.lengths_b[i])
        img = batch.image_mask_bs[i].nonzero().flatten()
        assert len(img) == n_img and (img.diff() == 1).all(), "one contiguous image span"
        post = batch.post_image_bs[i].nonzero().flatten()
        assert post.tolist() == list(range(int(img[-1]) + 1, length)), "post-image = text after the span, no padding"
        assert batch.bos_bs[i].nonzero().flatten().tolist() == [0]
        assert not batch.keep_bs[i, 0] and not batch.keep_bs[i, length:].any() and batch.keep_bs[i, 1:length].all()
        assert not (batch.text_bs[i] & batch.image_mask_bs[i]).any()
    words = vlm.tokenizer.convert_ids_to_tokens(batch.input_ids_bs[0, : int(batch.lengths_b[0])])
    assert words[:3] == ["<bos>", "user", ":"] and words[-2:] == ["assistant", ":"]


def test_resid_post_equals_hf_hidden_states(vlm, batch):
    resid = A.resid_stream(vlm, batch)
    hidden = hf_hidden_states(vlm, batch)
    real = batch.attention_mask_bs
    assert sorted(resid) == sorted(resid_name(layer) for layer in range(vlm.n_layers))
    for layer in range(vlm.n_layers - 1):
        torch.testing.assert_close(resid[resid_name(layer)][real], hidden[layer + 1][real], rtol=0, atol=1e-6)
    # HF's last hidden state is after the final norm; TransformerLens' last resid_post is before it.
    last = resid[resid_name(vlm.n_layers - 1)]
    assert not torch.allclose(last[real], hidden[-1][real], atol=1e-3)
    torch.testing.assert_close(A.decoder(vlm.model).norm(last)[real], hidden[-1][real], rtol=0, atol=1e-5)


def test_streaming_keeps_nothing_and_stops_early(vlm, batch):
    full = A.resid_stream(vlm, batch)
    seen = []
    kept = A.resid_stream(vlm, batch, layers=[0, 1], on_layer=lambda name, x: seen.append((name, x.clone())))
    assert kept == {}
    assert [name for name, _ in seen] == [resid_name(0), resid_name(1)]
    for name, x in seen:
        torch.testing.assert_close(x, full[name], rtol=0, atol=0)
    ran = []
    handle = A.decoder(vlm.model).layers[2].register_forward_hook(lambda *_: ran.append(1))
    try:
        A.resid_stream(vlm, batch, layers=[1])
    finally:
        handle.remove()
    assert ran == [], "layers after the deepest requested one must not run"


def test_padding_does_not_leak(vlm, samples, batch):
    resid = A.resid_stream(vlm, batch, layers=[2])[resid_name(2)]
    for i, s in enumerate(samples):
        alone = A.resid_stream(vlm, A.prepare(vlm, [s.scene.render()], [s.question]), layers=[2])[resid_name(2)]
        n = int(batch.lengths_b[i])
        torch.testing.assert_close(resid[i, :n], alone[0], rtol=0, atol=2e-5)


def _rotate(x, pos_s, theta, d_head):
    """Rotary embedding written out: pairs (i, i + d/2) rotated by pos * theta^(-2i/d)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
    ang = pos_s[:, None].float() * inv_freq[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    half = d_head // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


@pytest.mark.parametrize("layer", [0, 1])
def test_hook_z_matches_direct_attention(vlm, batch, layer):
    z = A.capture(vlm, batch, z_layers=[layer]).z[z_name(layer)]
    assert z.shape == (*batch.input_ids_bs.shape, vlm.n_heads, vlm.d_head)
    resid_pre = hf_hidden_states(vlm, batch)[layer]
    block = A.decoder(vlm.model).layers[layer]
    attn, cfg = block.self_attn, vlm.text_config
    n_h, n_kv, k, theta = vlm.n_heads, cfg.num_key_value_heads, vlm.d_head, cfg.rope_parameters["rope_theta"]
    with torch.no_grad():
        x = block.input_layernorm(resid_pre)
        for i in range(x.shape[0]):
            n = int(batch.lengths_b[i])
            pos = torch.arange(n)
            q = _rotate((x[i, :n] @ attn.q_proj.weight.T).view(n, n_h, k).transpose(0, 1), pos, theta, k)
            kk = _rotate((x[i, :n] @ attn.k_proj.weight.T).view(n, n_kv, k).transpose(0, 1), pos, theta, k)
            v = (x[i, :n] @ attn.v_proj.weight.T).view(n, n_kv, k).transpose(0, 1)
            kk, v = kk.repeat_interleave(n_h // n_kv, 0), v.repeat_interleave(n_h // n_kv, 0)  # grouped queries
            scores = q @ kk.transpose(1, 2) / k**0.5 + torch.full((n, n), float("-inf")).triu(1)
            z_direct = (scores.softmax(-1) @ v).transpose(0, 1)  # pos x head x d_head
            torch.testing.assert_close(z[i, :n], z_direct, rtol=0, atol=2e-5)


def _metric(vlm, batch, layer=2):
    """Sum over post-image positions of the residual's projection on a fixed direction (the attribution metric)."""
    direction_d = torch.linspace(-1, 1, vlm.d_model)
    return lambda resid: (resid[resid_name(layer)] @ direction_d)[batch.post_image_bs].sum()


def test_hook_z_gradient_matches_finite_difference(vlm, batch):
    metric = _metric(vlm, batch)
    run = A.capture(vlm, batch, resid_layers=[2], z_layers=[0, 1], grad=True)
    grads = torch.autograd.grad(metric(run.resid), [run.z[z_name(0)], run.z[z_name(1)]])
    assert all(g.abs().sum() > 0 for g in grads)
    torch.manual_seed(0)
    head, eps = 1, 1e-3
    for layer, grad in zip([0, 1], grads, strict=True):
        z_clean = run.z[z_name(layer)][:, :, head].detach()
        u = torch.randn_like(z_clean) * batch.attention_mask_bs[..., None]
        at = []
        for t in (eps, -eps):
            with A.patch_heads(vlm, [A.HeadPatch(layer, head, z_clean + t * u)]):
                at.append(metric(A.capture(vlm, batch, resid_layers=[2]).resid).item())
        finite = (at[0] - at[1]) / (2 * eps)
        analytic = (grad[:, :, head] * u).sum().item()
        assert finite == pytest.approx(analytic, rel=2e-2), f"layer {layer}"


def test_zero_ablation_equals_zeroed_output_columns(vlm, batch):
    layer, head, k = 1, 2, vlm.d_head
    with A.patch_heads(vlm, [A.HeadPatch(layer, head, torch.zeros(k))]):
        ablated = A.resid_stream(vlm, batch, layers=[2])[resid_name(2)]
    edited = copy.deepcopy(vlm)
    with torch.no_grad():
        A.decoder(edited.model).layers[layer].self_attn.o_proj.weight[:, head * k : (head + 1) * k] = 0
    reference = A.resid_stream(edited, batch, layers=[2])[resid_name(2)]
    clean = A.resid_stream(vlm, batch, layers=[2])[resid_name(2)]
    real = batch.attention_mask_bs
    torch.testing.assert_close(ablated[real], reference[real], rtol=0, atol=1e-5)
    assert (ablated - clean)[real].abs().max() > 1e-2, "ablating a head must matter in this model"


def test_patching_replaces_exactly_one_head(vlm, samples, batch):
    other = A.prepare(vlm, [s.scene.render() for s in reversed(samples)], [s.question for s in samples])
    z_other = A.capture(vlm, other, z_layers=[1]).z[z_name(1)]
    z_clean = A.capture(vlm, batch, z_layers=[1]).z[z_name(1)]
    where = batch.post_image_bs
    with A.patch_heads(vlm, [A.HeadPatch(1, 3, z_other[:, :, 3], positions_bs=where)]):
        z_patched = A.capture(vlm, batch, z_layers=[1]).z[z_name(1)]
    torch.testing.assert_close(z_patched[:, :, 3][where], z_other[:, :, 3][where], rtol=0, atol=0)
    torch.testing.assert_close(z_patched[:, :, 3][~where], z_clean[:, :, 3][~where], rtol=0, atol=0)
    torch.testing.assert_close(z_patched[:, :, :3], z_clean[:, :, :3], rtol=0, atol=0)
    assert not torch.equal(z_other[:, :, 3][where], z_clean[:, :, 3][where])
    mean_k = z_clean[:, :, 0][batch.keep_bs].mean(0)
    with A.patch_heads(vlm, [A.HeadPatch(1, 0, mean_k)]):
        z_mean = A.capture(vlm, batch, z_layers=[1]).z[z_name(1)]
    torch.testing.assert_close(z_mean[:, :, 0], mean_k.expand_as(z_mean[:, :, 0]), rtol=0, atol=0)
    # The hooks are gone after the block.
    torch.testing.assert_close(A.capture(vlm, batch, z_layers=[1]).z[z_name(1)], z_clean, rtol=0, atol=0)


def test_image_corruption_changes_only_from_the_image_span_on(vlm, batch):
    mean_d = A.image_embeddings(vlm, batch.pixels).mean(0)
    assert mean_d.shape == (vlm.d_model,)
    clean = A.resid_stream(vlm, batch)
    with A.replace_image_embeddings(vlm, mean_d):
        corrupt = A.resid_stream(vlm, batch)
    first_img = batch.image_mask_bs.float().argmax(1)
    for layer in range(vlm.n_layers):
        diff_bs = (corrupt[resid_name(layer)] - clean[resid_name(layer)]).norm(dim=-1)
        for i in range(diff_bs.shape[0]):
            n, f = int(batch.lengths_b[i]), int(first_img[i])
            assert diff_bs[i, :f].max() < 1e-5, f"layer {layer}: a position before the image changed"
            assert diff_bs[i, f:n].min() > 1e-3, f"layer {layer}: a position at or after the image did not change"


def test_project_out_removes_direction(vlm, batch):
    torch.manual_seed(1)
    dirs_md = torch.randn(2, vlm.d_model)
    where = batch.post_image_bs
    clean = A.resid_stream(vlm, batch, layers=[1, 2])
    with A.project_out(vlm, 1, dirs_md, positions_bs=where):
        out = A.resid_stream(vlm, batch, layers=[1, 2])
    x1 = out[resid_name(1)]
    assert (x1[where] @ dirs_md.T).abs().max() < 1e-4
    torch.testing.assert_close(x1[~where], clean[resid_name(1)][~where], rtol=0, atol=0)
    # Projection, not a rescale: removing the span twice is the same as once.
    basis = torch.linalg.qr(dirs_md.T).Q
    expect = clean[resid_name(1)][where] - clean[resid_name(1)][where] @ basis @ basis.T
    torch.testing.assert_close(x1[where], expect, rtol=0, atol=1e-5)
    assert (out[resid_name(2)] - clean[resid_name(2)])[where].abs().max() > 1e-3


def test_text_only_stream(vlm, samples):
    tb = A.prepare_text(vlm, [s.scene.caption() for s in samples], [s.question for s in samples])
    assert tb.pixels is None and not tb.image_mask_bs.any() and not tb.post_image_bs.any()
    words = vlm.tokenizer.convert_ids_to_tokens(tb.input_ids_bs[0, : int(tb.lengths_b[0])])
    assert " ".join(words) == "<bos> " + world.lm_prompt(samples[0].scene.caption(), samples[0].question)
    resid = A.resid_stream(vlm, tb)
    with torch.no_grad():
        hidden = vlm.base_lm(
            input_ids=tb.input_ids_bs, attention_mask=tb.attention_mask_bs.long(), output_hidden_states=True
        ).hidden_states
    real = tb.attention_mask_bs
    for layer in range(vlm.n_layers - 1):
        torch.testing.assert_close(resid[resid_name(layer)][real], hidden[layer + 1][real], rtol=0, atol=1e-6)


def test_next_token_logits(vlm, batch):
    logits_bv = A.next_token_logits(vlm, batch)
    with torch.no_grad():
        full = vlm.model(
            input_ids=batch.input_ids_bs,
            pixel_values=batch.pixels.values,
            attention_mask=batch.attention_mask_bs.long(),
        ).logits
    for i in range(full.shape[0]):
        torch.testing.assert_close(logits_bv[i], full[i, int(batch.lengths_b[i]) - 1], rtol=0, atol=1e-5)


def test_prompt_without_placeholder_is_refused(vlm):
    bad = copy.copy(vlm)
    bad.prompt = lambda q: "<bos> user : " + q
    with pytest.raises(ValueError, match="image placeholder '<image>' exactly once"):
        A.prepare(bad, [world.make_samples(0, "train", 1)[0].scene.render()], ["what color is the circle ?"])


def test_iter_batches_covers_the_data_in_order(vlm, samples, batch):
    images, questions = [s.scene.render() for s in samples], [s.question for s in samples]
    parts = list(A.iter_batches(vlm, images, questions, batch_size=2))
    assert [p.input_ids_bs.shape[0] for p in parts] == [2, 1]
    for i in range(len(samples)):
        part, row = parts[i // 2], i % 2
        n = int(part.lengths_b[row])
        assert n == int(batch.lengths_b[i]) and torch.equal(part.input_ids_bs[row, :n], batch.input_ids_bs[i, :n])
        torch.testing.assert_close(part.pixels.values[row], batch.pixels.values[i], rtol=0, atol=0)
