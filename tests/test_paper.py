"""lib/sources/paper_models.py and paper_data.py on fakes: the original-layout LLaVA-MORE converter against an
independent reference forward, its errors, the prompt and preprocessing, the Llama Scope JumpReLU -> TopK rebuild,
and the dataset loaders."""

import json
import shutil

import fakes
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from lib.kernels import adapter as A
from lib.names import resid_name, z_name
from lib.sources import paper_data as PD
from lib.sources import paper_models as PM

torch.set_num_threads(1)
TOWER = "model.vision_tower.vision_tower.vision_model."


@pytest.fixture(scope="module", params=[True, False], ids=["tower-in-checkpoint", "tower-from-clip"])
def fake(request, tmp_path_factory):
    return fakes.write_llava_more(tmp_path_factory.mktemp("llava_more"), with_tower=request.param)


@pytest.fixture(scope="module")
def llm_path(tmp_path_factory):
    return fakes.write_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def vlm(fake, llm_path):
    return A.VLM(**PM.paper_vlm_parts(fake.path, llm_path, fake.clip_path))


@pytest.fixture(scope="module")
def batch(vlm):
    images = fakes._images(3, seed=7)  # 40x30, 30x40, 32x32: two of them need padding
    return A.prepare(vlm, images, ["Is the cat left of the dog?", "What color is the bus?", "How many?"])


def reference_logits(fake, batch, image_token_id):
    """LLaVA's forward composed by hand from the original-layout weights: CLIP hidden_states[-2] without CLS ->
    Linear, GELU, Linear -> written over the image-token embeddings -> Llama."""
    state = {}
    for shard in sorted(fake.path.glob("model-*.safetensors")):
        state.update(load_file(shard))
    tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(fake.clip_path))
    if fake.with_tower:
        tower_state = {k[len(TOWER) :]: v for k, v in state.items() if k.startswith(TOWER)}
    else:
        clip_state = load_file(fake.clip_path / "model.safetensors")
        tower_state = {k[len("vision_model.") :]: v for k, v in clip_state.items() if k.startswith("vision_model.")}
    tower.load_state_dict(tower_state)
    d_model, d_vision = fake.text_config["hidden_size"], tower.config.hidden_size
    projector = torch.nn.Sequential(
        torch.nn.Linear(d_vision, d_model), torch.nn.GELU(), torch.nn.Linear(d_model, d_model)
    )
    projector.load_state_dict(
        {k[len("model.mm_projector.") :]: v for k, v in state.items() if k.startswith("model.mm_projector.")}
    )
    llama = LlamaForCausalLM(LlamaConfig(**fake.text_config))
    assert llama.config.rope_parameters["rope_type"] == "llama3"
    llama.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(("model.mm_projector.", "model.vision_tower."))}
    )
    with torch.no_grad():
        feats = projector(tower(batch.pixels.values, output_hidden_states=True).hidden_states[-2][:, 1:])
        embeds = llama.model.embed_tokens(batch.input_ids_bs).clone()
        is_image = batch.input_ids_bs == image_token_id
        embeds[is_image] = feats.reshape(-1, d_model)
        return llama(inputs_embeds=embeds, attention_mask=batch.attention_mask_bs.long()).logits


def test_converted_model_matches_reference_forward(fake, vlm, batch):
    with torch.no_grad():
        logits = vlm.model(
            input_ids=batch.input_ids_bs,
            pixel_values=batch.pixels.values,
            attention_mask=batch.attention_mask_bs.long(),
        ).logits
    ref = reference_logits(fake, batch, vlm.image_token_id)
    real = batch.attention_mask_bs
    torch.testing.assert_close(logits[real], ref[real], rtol=0, atol=1e-4)
    assert vlm.model.config.vision_feature_layer == -2 and vlm.model.config.vision_feature_select_strategy == "default"
    # The tower is CLIP's in both cases (the checkpoint's copy agrees with it: lib/sources/llava_tower.py).
    assert torch.equal(_used_patch(vlm.model), _clip_patch(fake))


def _used_patch(model):
    return model.model.vision_tower.embeddings.patch_embedding.weight


def _clip_patch(fake):
    return load_file(fake.clip_path / "model.safetensors")["vision_model.embeddings.patch_embedding.weight"]


def _checkpoint_patch(fake):
    key = TOWER + "embeddings.patch_embedding.weight"
    index = json.loads((fake.path / "model.safetensors.index.json").read_text())
    return load_file(fake.path / index["weight_map"][key])[key]


def _edit(src, dst, key, value=None):
    """A copy of checkpoint `src` with `key` removed (value None) or replaced."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = dst / index["weight_map"][key]
    state = load_file(shard)
    if value is None:
        del state[key]
        del index["weight_map"][key]
    else:
        state[key] = value
    save_file(state, shard)
    index_path.write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.1.mlp.down_proj.weight",
        "model.mm_projector.0.bias",
        "lm_head.weight",
        TOWER + "encoder.layers.1.mlp.fc1.weight",
    ],
)
def test_missing_key_is_named(fake, tmp_path, key):
    if key.startswith(TOWER) and not fake.with_tower:
        # This fake's tower comes from the CLIP directory: remove the key there.
        clip = shutil.copytree(fake.clip_path, tmp_path / "clip")
        state = load_file(clip / "model.safetensors")
        del state["vision_model.encoder.layers.1.mlp.fc1.weight"]
        save_file(state, clip / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(
            PM.CheckpointError, match=r"missing vision-tower key `encoder\.layers\.1\.mlp\.fc1\.weight`"
        ):
            PM.convert_llava_more(fake.path, clip, image_token_id=2)
        return
    broken = _edit(fake.path, tmp_path / "broken", key)
    with pytest.raises(PM.CheckpointError, match=f"missing key `{key}`"):
        PM.convert_llava_more(broken, fake.clip_path, image_token_id=2)


def test_misshapen_key_is_named(fake, tmp_path):
    key = "model.mm_projector.2.weight"
    broken = _edit(fake.path, tmp_path / "broken", key, torch.zeros(32, 33))
    with pytest.raises(
        PM.CheckpointError,
        match=r"key `model.mm_projector.2.weight` has shape \(32, 33\); expected "
        r"\(32, 32\)",
    ):
        PM.convert_llava_more(broken, fake.clip_path, image_token_id=2)


def test_unknown_key_and_bad_config_are_named(fake, tmp_path):
    broken = shutil.copytree(fake.path, tmp_path / "extra")
    save_file({"model.mm_projector.1.weight": torch.zeros(3)}, broken / "extra.safetensors")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.mm_projector.1.weight"] = "extra.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PM.CheckpointError, match=r"key `model\.mm_projector\.1\.weight` has no place"):
        PM.convert_llava_more(broken, fake.clip_path, image_token_id=2)
    cfg_dir = shutil.copytree(fake.path, tmp_path / "cfg")
    cfg = json.loads((cfg_dir / "config.json").read_text())
    cfg["mm_projector_type"] = "linear"
    (cfg_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PM.CheckpointError, match="field `mm_projector_type` = 'linear'"):
        PM.convert_llava_more(cfg_dir, fake.clip_path, image_token_id=2)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("mm_use_im_start_end", True, r"field `mm_use_im_start_end` = True; expected False \(<im_start>/<im_end>"),
        ("mm_patch_merge_type", "spatial_unpad", r"field `mm_patch_merge_type` = 'spatial_unpad'; expected 'flat'"),
    ],
)
def test_original_llava_options_not_implemented_are_refused(tmp_path, field, value, match):
    fake = fakes.write_llava_more(tmp_path / "a", with_tower=False, config={field: value})
    with pytest.raises(PM.CheckpointError, match=match):
        PM.convert_llava_more(fake.path, fake.clip_path, image_token_id=2)
    # Absent, each takes LLaVA's default (False, 'flat'): the same checkpoint converts.
    cfg = json.loads((fake.path / "config.json").read_text())
    del cfg[field], cfg["mm_use_im_start_end" if field == "mm_patch_merge_type" else "mm_patch_merge_type"]
    (fake.path / "config.json").write_text(json.dumps(cfg))
    PM.convert_llava_more(fake.path, fake.clip_path, image_token_id=2)


# The vision tower: which one is used, and the agreement check (lib/sources/llava_tower.py)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """A checkpoint whose tower copy disagrees with its CLIP directory."""
    return fakes.write_llava_more(tmp_path_factory.mktemp("noisy"), with_tower=True, tower_noise=0.05)


def test_tower_copy_that_agrees_with_clip_says_clip_is_used(fake, capsys):
    model = PM.convert_llava_more(fake.path, fake.clip_path, image_token_id=2)
    said = capsys.readouterr().out
    assert f"vision tower: CLIP weights from '{fake.clip_path}' (given for mm_vision_tower = " in said
    if fake.with_tower:
        assert "as LLaVA-MORE's loader reloads them; the checkpoint's copy agrees with them tensor by tensor" in said
    else:
        assert "the checkpoint carries none" in said
    assert torch.equal(_used_patch(model), _clip_patch(fake))


def test_tower_copy_that_disagrees_is_refused_naming_both(noisy):
    with pytest.raises(PM.CheckpointError) as e:
        PM.convert_llava_more(noisy.path, noisy.clip_path, image_token_id=2)
    msg = str(e.value)
    assert msg.startswith(f"{noisy.path}: its vision-tower weights disagree with the CLIP model '{noisy.clip_path}'")
    assert "mm_vision_tower = 'openai/clip-vit-large-patch14-336'" in msg
    assert "(first at `embeddings.class_embedding`, max |difference|" in msg
    assert "tower='clip' (LLaVA-MORE's choice) or tower='checkpoint'" in msg


@pytest.mark.parametrize("choice", ["clip", "checkpoint"])
def test_tower_chosen_by_the_caller_is_the_one_used(noisy, capsys, choice):
    model = PM.convert_llava_more(noisy.path, noisy.clip_path, image_token_id=2, tower=choice)
    assert f"as asked (tower='{choice}')" in capsys.readouterr().out
    expected = _clip_patch(noisy) if choice == "clip" else _checkpoint_patch(noisy)
    assert torch.equal(_used_patch(model), expected)
    assert not torch.equal(_clip_patch(noisy), _checkpoint_patch(noisy))


def test_unfrozen_tower_is_the_checkpoints(tmp_path, capsys):
    fake = fakes.write_llava_more(tmp_path, True, tower_noise=0.05, config={"unfreeze_mm_vision_tower": True})
    model = PM.convert_llava_more(fake.path, fake.clip_path, image_token_id=2)
    assert "the checkpoint's own weights" in capsys.readouterr().out
    assert torch.equal(_used_patch(model), _checkpoint_patch(fake))


def test_tower_choice_checkpoint_without_tower_is_refused(tmp_path):
    fake = fakes.write_llava_more(tmp_path, with_tower=False)
    with pytest.raises(PM.CheckpointError, match="tower='checkpoint' but the checkpoint has no vision-tower weights"):
        PM.convert_llava_more(fake.path, fake.clip_path, image_token_id=2, tower="checkpoint")


def test_agreement_allows_one_rounding_step_of_the_stored_dtype():
    from lib.sources.llava_tower import first_disagreement

    torch.manual_seed(0)
    clip = {"a.weight": torch.randn(8, 8), "b.bias": torch.randn(8)}
    as_bf16 = {k: v.to(torch.bfloat16).float() for k, v in clip.items()}  # saved in bf16, loaded into fp32
    assert first_disagreement(dict(clip), {}, clip) is None
    assert first_disagreement(as_bf16, dict.fromkeys(clip, torch.bfloat16), clip) is None
    assert first_disagreement(as_bf16, {}, clip)[0] == "a.weight", "an fp32 copy must equal CLIP's exactly"
    off = {**as_bf16, "b.bias": as_bf16["b.bias"] * (1 + 4 * torch.finfo(torch.bfloat16).eps)}
    name, diff = first_disagreement(off, dict.fromkeys(clip, torch.bfloat16), clip)
    assert name == "b.bias" and diff > 0
    assert first_disagreement({"a.weight": clip["a.weight"][:4]}, {}, clip) == ("a.weight", float("inf"))


def test_prompt_follows_llava_more_llama_3_1(vlm, batch):
    text = vlm.prompt("Is the cat left of the dog?")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + PM.LLAVA_MORE_SYSTEM)
    assert "<|start_header_id|>user<|end_header_id|>\n\n<image>\nIs the cat left of the dog?<|eot_id|>" in text
    assert text.endswith("<|eot_id|>"), "LLaVA-MORE's llama_3_1 conversation adds no assistant header"
    ids = batch.input_ids_bs[0, : int(batch.lengths_b[0])].tolist()
    assert ids.count(vlm.tokenizer.bos_token_id) == 1 and ids[0] == vlm.tokenizer.bos_token_id
    assert batch.bos_bs[:, 0].all()
    img = batch.image_mask_bs[0].nonzero().flatten()
    assert len(img) == vlm.n_image_tokens == 16
    assert vlm.tokenizer.decode(ids[int(img[-1]) + 1 :]).startswith("\nIs the cat")
    assert vlm.tokenizer.decode(ids[: int(img[0])]).endswith("user<|end_header_id|>\n\n")


def test_pad_preprocessing():
    pre = PM.PadPreprocess(size=28)
    fill = tuple(int(m * 255) for m in PM.OPENAI_CLIP_MEAN)
    assert fill == (122, 116, 104)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))  # 40 wide, 30 high
    square = np.asarray(PM.expand_to_square(img, fill))
    assert square.shape == (40, 40, 3)
    assert (square[:5] == fill).all() and (square[35:] == fill).all()
    assert (square[5:35] == np.asarray(img)).all()
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    expected = hf(PM.expand_to_square(img, fill), return_tensors="pt")["pixel_values"]
    got = pre([img])
    assert got.shape == (1, 3, 28, 28)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_paper_model_runs_through_the_adapter(vlm, batch):
    resid = A.resid_stream(vlm, batch)
    with torch.no_grad():
        hidden = vlm.model(
            input_ids=batch.input_ids_bs,
            pixel_values=batch.pixels.values,
            attention_mask=batch.attention_mask_bs.long(),
            output_hidden_states=True,
        ).hidden_states
    real = batch.attention_mask_bs
    torch.testing.assert_close(resid[resid_name(0)][real], hidden[1][real], rtol=0, atol=1e-6)
    run = A.capture(vlm, batch, resid_layers=[1], z_layers=[0, 1], grad=True)
    assert run.z[z_name(1)].shape == (*batch.input_ids_bs.shape, 4, 8)
    metric = run.resid[resid_name(1)][batch.post_image_bs].sum()
    grads = torch.autograd.grad(metric, [run.z[z_name(0)], run.z[z_name(1)]])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    mean_d = A.image_embeddings(vlm, batch.pixels).mean(0)
    with A.replace_image_embeddings(vlm, mean_d):
        corrupt = A.resid_stream(vlm, batch, layers=[1])[resid_name(1)]
    diff_bs = (corrupt - resid[resid_name(1)]).norm(dim=-1)
    first = int(batch.image_mask_bs[0].nonzero()[0])
    assert diff_bs[:, :first].max() < 1e-5 and diff_bs[0, first : int(batch.lengths_b[0])].min() > 1e-4
    text = A.prepare_text(vlm, ["A cat on a mat."], ["Where is the cat?"])
    assert vlm.lm_tokenizer.decode(text.input_ids_bs[0]).count("Caption: A cat on a mat.\nInstruction: Where is") == 1
    assert int(text.bos_bs.sum()) == 1 and (text.input_ids_bs[0] == vlm.lm_tokenizer.bos_token_id).sum() == 1
    assert A.resid_stream(vlm, text)[resid_name(1)].shape == (1, int(text.lengths_b[0]), 32)


def test_jumprelu_to_topk(tmp_path):
    from sae_lens import SAE, JumpReLUSAE, TopKSAE

    path = fakes.write_jumprelu_sae(tmp_path / "sae", d_in=32, d_sae=128)
    assert {p.name for p in path.iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    jump = SAE.load_from_disk(path)
    assert isinstance(jump, JumpReLUSAE)
    topk = PM.jumprelu_to_topk(jump, k=8)
    assert isinstance(topk, TopKSAE) and topk.cfg.k == 8 and topk.cfg.architecture() == "topk"
    assert topk.cfg.apply_b_dec_to_input and topk.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert set(topk.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(topk, name), getattr(jump, name))
        assert getattr(topk, name).data_ptr() != getattr(jump, name).data_ptr(), "copies, not shared storage"
    x = torch.randn(50, 32)
    pre = (x - jump.b_dec) @ jump.W_enc + jump.b_enc  # b_dec subtracted: apply_b_dec_to_input is True here
    top = pre.topk(8, dim=-1)
    expect = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    z = topk.encode(x)
    torch.testing.assert_close(z, expect, rtol=0, atol=1e-5)
    assert ((z != 0).sum(-1) <= 8).all() and ((z != 0).sum(-1) == 8).float().mean() > 0.9
    assert not torch.equal(z, jump.encode(x)), "TopK must differ from the thresholded code"
    topk.save_model(tmp_path / "topk")
    again = SAE.load_from_disk(tmp_path / "topk")
    assert isinstance(again, TopKSAE) and again.cfg.k == 8
    torch.testing.assert_close(again.encode(x), z, rtol=0, atol=0)
    with pytest.raises(ValueError, match="k = 200"):
        PM.jumprelu_to_topk(jump, k=200)


@pytest.mark.parametrize("fmt", ["parquet", "disk"])
def test_vqav2_loader(tmp_path, fmt):
    path = fakes.write_vqav2(tmp_path / "vqa", n=12, fmt=fmt)
    ds = PD.load_vqav2(path, rows=range(4, 10))
    assert len(ds) == 6 and ds[0]["question_id"] == 1004 and isinstance(ds[0]["image"], Image.Image)
    PD.load_vqav2(path, columns=PD.VQA_PROBING_COLUMNS)
    with pytest.raises(PD.DatasetSchemaError, match=r"rows 0\.\.49999 requested, only 12 rows"):
        PD.load_vqav2(path, rows=PD.VQA_ADAPTATION_ROWS)
    broken = fakes.write_vqav2(tmp_path / "broken", n=4, fmt=fmt, drop="question")
    with pytest.raises(PD.DatasetSchemaError, match=f"dataset {broken}: missing column 'question'"):
        PD.load_vqav2(broken)


def test_vsr_loader_and_images(tmp_path):
    path = fakes.write_vsr(tmp_path / "vsr", tmp_path / "coco")
    ds = PD.load_vsr(path, split="dev")
    assert len(ds) == 6 and set(PD.VSR_BENCHMARK_COLUMNS) <= set(ds.column_names)
    image = PD.vsr_image(ds[0], tmp_path / "coco")
    assert image.size in {(40, 30), (30, 40), (32, 32)}
    with pytest.raises(FileNotFoundError, match="pass image_root"):
        PD.vsr_image(ds[0], None)
    broken = fakes.write_vsr(tmp_path / "vsr_broken", tmp_path / "coco2", drop="relation")
    with pytest.raises(PD.DatasetSchemaError, match="missing column 'relation'"):
        PD.load_vsr(broken, split="test")


def test_coco_captions_for_the_text_stream(tmp_path):
    vqa = PD.load_vqav2(fakes.write_vqav2(tmp_path / "vqa", n=6), columns=PD.VQA_TEXT_STREAM_COLUMNS)
    captions = PD.load_coco_captions(fakes.write_coco_captions(tmp_path / "captions.json", [100, 101, 102]))
    assert captions[101] == "caption 0 of image 101."  # the first caption, stripped
    caps, questions = PD.text_stream_pairs(vqa, captions)
    assert caps[:3] == ["caption 0 of image 100."] * 2 + ["caption 0 of image 101."] and questions == vqa["question"]
    with pytest.raises(PD.DatasetSchemaError, match="image_id 102 has no COCO caption"):
        PD.text_stream_pairs(vqa, {k: v for k, v in captions.items() if k != 102})


def test_vqa_keyword_split():
    assert PD.is_spatial_question("What is to the left of the dog?")
    assert PD.is_spatial_question("Is the cat on top of the laptop?")
    assert PD.is_spatial_question("What is next to the bus?")
    assert not PD.is_spatial_question("What color is the bus?")
    assert not PD.is_spatial_question("How many people are there?")
    assert not PD.is_spatial_question("Is this a leftover pizza?"), "whole words only"
