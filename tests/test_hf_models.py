"""Your own VLM through lib/sources/hf_models.py and the adapter, on tiny random checkpoints of both supported classes
(tests/hf_fakes.py): llava-1.5-shaped `LlavaForConditionalGeneration` and `Qwen2VLForConditionalGeneration`, each
with grouped-query attention (4 query heads over 2 KV heads). Checked against the models' own forward passes: masks
and image-token counts (dynamic for Qwen2-VL), M-RoPE positions, resid_post, hook_z as the input of o_proj, head
patching, the mean-image corruption, padding, attention read-outs, the text stream and the loaders' errors."""

import copy

import fakes
import hf_fakes
import numpy as np
import pytest
import torch
from PIL import Image

from lib.io.profiles import ProfileError, load_profile
from lib.kernels import adapter as A
from lib.kernels import architectures as arch
from lib.kernels import attention as AN
from lib.kernels.probing import feature_trace
from lib.names import resid_name, z_name
from lib.sources import hf_models as HF
from lib.sources.paper_models import CheckpointError

torch.set_num_threads(1)
QUESTIONS = ["What is to the left of the dog?", "Is the cat on top of the laptop?", "How many people?"]
LM_FORMAT = "USER: Caption: {caption}\nInstruction: {question} ASSISTANT:"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"hf-llava": hf_fakes.write_hf_llava(root / "llava"), "qwen2-vl": hf_fakes.write_hf_qwen2_vl(root / "qwen")}


@pytest.fixture(scope="module", params=["hf-llava", "qwen2-vl"])
def vlm(request, written):
    fake = written[request.param]
    lm_prompt = LM_FORMAT if request.param == "hf-llava" else "chat"  # the Vicuna stand-in has no chat template
    return A.VLM(**HF.hf_vlm_parts(request.param, fake.vlm, fake.llm, "chat", lm_prompt))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(30, 40), (40, 30), (32, 32)]]


@pytest.fixture(scope="module")
def batch(vlm, images):
    return A.prepare(vlm, images, QUESTIONS)


def hf_forward(vlm, batch, **kw):
    """The model's own forward from its own inputs (Qwen2-VL computes M-RoPE itself from mm_token_type_ids)."""
    extra = {"pixel_values": batch.pixels.values}
    if vlm.kind == arch.QWEN2_VL:
        extra.update(image_grid_thw=batch.pixels.grid_thw_b3, mm_token_type_ids=batch.image_mask_bs.int())
    with torch.no_grad():
        return vlm.model(input_ids=batch.input_ids_bs, attention_mask=batch.attention_mask_bs.long(), **extra, **kw)


def test_image_tokens_masks_and_prompt(vlm, batch):
    counts = batch.image_mask_bs.sum(1).tolist()
    if vlm.kind == arch.LLAVA:  # CLIP 28 px / 7 px patches, CLS dropped: 16 per image
        assert counts == [16, 16, 16] and batch.image_grid_b2.tolist() == [[4, 4]] * 3
        assert batch.bos_bs[:, 0].all(), "llava-1.5's template writes no BOS: the tokenizer adds one"
    else:  # 8 px merged patches on the resized image: each image its own count, its aspect ratio kept
        assert counts == [20, 20, 16] and batch.image_grid_b2.tolist() == [[4, 5], [5, 4], [4, 4]]
        assert not batch.bos_bs.any(), "Qwen's tokenizer has no BOS"
        assert batch.position_ids.shape == (3, *batch.input_ids_bs.shape)
    for i in range(3):
        img = batch.image_mask_bs[i].nonzero().flatten()
        assert (img.diff() == 1).all() and len(img) == counts[i]
        post = batch.post_image_bs[i].nonzero().flatten()
        assert post.tolist() == list(range(int(img[-1]) + 1, int(batch.lengths_b[i])))
    text = vlm.tokenizer.decode(batch.input_ids_bs[0, : int(batch.lengths_b[0])])
    assert QUESTIONS[0] in text and text.count(vlm.image_placeholder) == counts[0]
    assert text.rstrip().endswith("ASSISTANT:" if vlm.kind == arch.LLAVA else "<|im_start|>assistant")


def test_mrope_positions_follow_the_image_grid(vlm, batch):
    if vlm.kind != arch.QWEN2_VL:
        assert batch.position_ids.shape == batch.input_ids_bs.shape
        return
    for i in range(3):
        img = batch.image_mask_bs[i].nonzero().flatten()
        start, (rows, cols) = int(img[0]), batch.image_grid_b2[i].tolist()
        t, y, x = batch.position_ids[:, i, img]
        assert (t == start).all()
        assert y.tolist() == [start + r for r in range(rows) for _ in range(cols)]
        assert x.tolist() == [start + c for _ in range(rows) for c in range(cols)]
        after = int(img[-1]) + 1
        assert (batch.position_ids[:, i, after] == start + max(rows, cols)).all(), "text resumes after the grid"


def test_resid_post_equals_the_models_own_hidden_states(vlm, batch):
    resid = A.resid_stream(vlm, batch)
    hidden = hf_forward(vlm, batch, output_hidden_states=True).hidden_states
    real = batch.attention_mask_bs
    for layer in range(vlm.n_layers - 1):
        torch.testing.assert_close(resid[resid_name(layer)][real], hidden[layer + 1][real], rtol=0, atol=1e-5)
    last = resid[resid_name(vlm.n_layers - 1)]
    torch.testing.assert_close(A.decoder(vlm.model).norm(last)[real], hidden[-1][real], rtol=0, atol=1e-5)


def test_hook_z_is_the_o_proj_input_with_one_slice_per_query_head(vlm, batch):
    attn = A.decoder(vlm.model).layers[1].self_attn
    assert vlm.text_config.num_key_value_heads == 2 < vlm.n_heads == 4, "the fakes use grouped-query attention"
    assert attn.k_proj.out_features == 2 * vlm.d_head and attn.o_proj.in_features == vlm.n_heads * vlm.d_head
    seen = []
    handle = attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        z = A.capture(vlm, batch, z_layers=[1]).z[z_name(1)]
    finally:
        handle.remove()
    assert z.shape == (*batch.input_ids_bs.shape, 4, vlm.d_head)
    torch.testing.assert_close(z.flatten(-2), seen[0], rtol=0, atol=0)


def test_patching_a_head_changes_later_layers_only(vlm, batch):
    layer, head, k = 1, 3, vlm.d_head
    clean = A.resid_stream(vlm, batch)
    with A.patch_heads(vlm, [A.HeadPatch(layer, head, torch.zeros(k))]):
        ablated = A.resid_stream(vlm, batch)
    edited = copy.deepcopy(vlm)
    with torch.no_grad():
        A.decoder(edited.model).layers[layer].self_attn.o_proj.weight[:, head * k : (head + 1) * k] = 0
    reference = A.resid_stream(edited, batch)
    real = batch.attention_mask_bs
    torch.testing.assert_close(ablated[resid_name(0)], clean[resid_name(0)], rtol=0, atol=0)
    for L in (1, 2):
        torch.testing.assert_close(ablated[resid_name(L)][real], reference[resid_name(L)][real], rtol=0, atol=1e-5)
        assert (ablated[resid_name(L)] - clean[resid_name(L)])[real].abs().max() > 1e-3


def test_mean_image_corruption_changes_from_the_image_on(vlm, batch):
    e_nd = A.image_embeddings(vlm, batch.pixels)
    assert e_nd.shape == (int(batch.image_mask_bs.sum()), vlm.d_model)
    clean = A.resid_stream(vlm, batch)
    with A.replace_image_embeddings(vlm, e_nd.mean(0)):
        corrupt = A.resid_stream(vlm, batch)
    first = batch.image_mask_bs.float().argmax(1)
    for layer in range(vlm.n_layers):
        diff_bs = (corrupt[resid_name(layer)] - clean[resid_name(layer)]).norm(dim=-1)
        for i in range(3):
            n, f = int(batch.lengths_b[i]), int(first[i])
            assert diff_bs[i, :f].max() < 1e-5 and diff_bs[i, f:n].min() > 1e-4, f"layer {layer}, sequence {i}"


def test_padding_does_not_leak(vlm, images, batch):
    resid = A.resid_stream(vlm, batch, layers=[2])[resid_name(2)]
    for i in range(3):
        alone = A.resid_stream(vlm, A.prepare(vlm, [images[i]], [QUESTIONS[i]]), layers=[2])[resid_name(2)]
        torch.testing.assert_close(resid[i, : int(batch.lengths_b[i])], alone[0], rtol=0, atol=2e-5)


def test_next_token_logits(vlm, batch):
    logits = hf_forward(vlm, batch).logits
    got = A.next_token_logits(vlm, batch)
    for i in range(3):
        torch.testing.assert_close(got[i], logits[i, int(batch.lengths_b[i]) - 1], rtol=0, atol=1e-5)


def test_attention_read_out_reproduces_hook_z_and_keeps_each_grid(vlm, batch):
    """attention_patterns recomputes softmax(q k) under the model's rotary embedding (M-RoPE for Qwen2-VL) and
    asserts pattern @ v == hook_z; image_attention puts each sequence's attention on its own grid."""
    att = AN.image_attention(vlm, batch, [(1, 0), (2, 3)], AN.last_token_bs(batch))
    for i, (rows, cols) in enumerate(batch.image_grid_b2.tolist()):
        grid_hyx = att.grid_bhyx[i]
        assert torch.isfinite(grid_hyx[:, :rows, :cols]).all() and grid_hyx[:, rows:].isnan().all()
        assert grid_hyx[:, :, cols:].isnan().all()
    torch.testing.assert_close(att.image_mass_bh, att.grid_bhyx.nansum((-2, -1)))
    assert ((att.image_mass_bh > 0) & (att.image_mass_bh < 1)).all()


def test_feature_trace_is_on_the_images_grid(vlm, images):
    d = vlm.d_model
    trace = feature_trace(vlm, lambda x: (x @ torch.eye(d)[:, :2]).relu(), 1, 1, images[0], QUESTIONS[0])
    rows, cols = (4, 4) if vlm.kind == arch.LLAVA else (4, 5)
    assert tuple(trace.patch_acts_yx.shape) == (rows, cols) and "<image>" in trace.tokens


def test_text_stream_runs_the_base_llm(vlm):
    tb = A.prepare_text(vlm, ["A cat on a mat.", "Two dogs."], ["Where is the cat?", "How many dogs?"])
    text = vlm.lm_tokenizer.decode(tb.input_ids_bs[0, : int(tb.lengths_b[0])])
    assert "Caption: A cat on a mat.\nInstruction: Where is the cat?" in text
    resid = A.resid_stream(vlm, tb)
    with torch.no_grad():
        hidden = vlm.base_lm(
            input_ids=tb.input_ids_bs, attention_mask=tb.attention_mask_bs.long(), output_hidden_states=True
        ).hidden_states
    real = tb.attention_mask_bs
    torch.testing.assert_close(resid[resid_name(0)][real], hidden[1][real], rtol=0, atol=1e-5)


def test_loader_errors_name_the_file_and_field(written, tmp_path):
    llava, qwen = written["hf-llava"], written["qwen2-vl"]
    with pytest.raises(CheckpointError, match=r"config\.json: field `model_type` = 'llava'.*'qwen2_vl'"):
        HF.hf_vlm_parts("qwen2-vl", llava.vlm, None)
    with pytest.raises(CheckpointError, match=r"base LLM has no chat template for `paper\.lm_prompt`"):
        HF.hf_vlm_parts("hf-llava", llava.vlm, llava.llm, "chat", "chat")
    with pytest.raises(CheckpointError, match=r"`paper\.llm` must be the LLM the VLM was fine-tuned from"):
        HF.hf_vlm_parts("hf-llava", llava.vlm, fakes.write_llama(tmp_path / "other"), "chat", LM_FORMAT)
    parts = HF.hf_vlm_parts("qwen2-vl", qwen.vlm, None, "<|im_start|>user\n{image}{question}<|im_end|>\n")
    with pytest.raises(CheckpointError, match=r"holds the image token '<\|image_pad\|>' 2 times"):
        HF.vlm_prompt("{image} {question} <|image_pad|>", qwen.vlm, parts["tokenizer"], "<|image_pad|>")
    assert parts["prompt"]("Q?") == "<|im_start|>user\n<|image_pad|>Q?<|im_end|>\n"


def test_profile_fields_are_checked(tmp_path):
    base = 'description = "x"\nseed = 0\n[paper]\n'
    for line, match in [
        ('format = "llava-next"', r"field `paper\.format` = 'llava-next': expected one of 'llava-more'"),
        ('prompt = "USER: {question}"', r"field `paper\.prompt`.*\{image\} once and \{question\}"),
        ('lm_prompt = "{question}"', r"field `paper\.lm_prompt`.*\{caption\} and \{question\}"),
        ('base_saes = "scope"', r"field `paper\.base_saes` = 'scope': expected 'release'"),
    ]:
        path = tmp_path / "mine.toml"
        path.write_text(base + line + "\n")
        with pytest.raises(ProfileError, match=match):
            load_profile(path)
