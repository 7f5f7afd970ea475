"""Tokenizer, prompts and the tiny organism: fast, offline, and each assertion could fail."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lib.sources import organism as O
from lib.sources import world
from lib.sources.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(O.TINY.num_threads)
    return O.build_organism(O.TINY, progress=False)


def test_tokenizer_round_trip_and_ids(tok, tmp_path):
    sample = world.make_samples(0, "t", 9)[3]
    text = O.lm_text(sample.scene.caption(), sample.question) + f" {sample.answer} <eos>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.split()), "one word must be one token"
    assert [world.VOCAB[i] for i in ids] == text.split(), "ids must follow the order of lib.world.VOCAB"
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False).input_ids == ids
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 2, 3)


def test_unknown_word_maps_to_unk(tok):
    ids = tok("what colour is the zebra ?", add_special_tokens=False).input_ids
    assert ids.count(tok.unk_token_id) == 2 and len(ids) == 6
    with pytest.raises(AssertionError, match="unknown word"):
        O.encode(tok, ["what colour is it ?"], ["red"])


def test_encode_masks_mark_the_answer(tok):
    samples = world.make_samples(0, "t", 18)
    batch = O.lm_batch(tok, samples)
    for i, s in enumerate(samples):
        answer_ids = batch.input_ids_bs[i][batch.answer_mask_bs[i].bool()].tolist()
        assert tok.decode(answer_ids) == s.answer
        target_ids = batch.input_ids_bs[i][batch.target_mask_bs[i].bool()].tolist()
        assert tok.decode(target_ids) == f"{s.answer} <eos>"
    # right padding: real tokens first, then pads that the attention mask hides
    assert (batch.attention_mask_bs.cumsum(1) == torch.arange(1, batch.input_ids_bs.shape[1] + 1)).any(1).all()
    assert (batch.input_ids_bs[batch.attention_mask_bs == 0] == tok.pad_token_id).all()


def test_vlm_prompt_and_pixels(tok):
    s = world.make_samples(0, "t", 1)[0]
    text, px = O.vlm_batch(tok, [s], O.N_PATCHES)
    assert int((text.input_ids_bs == tok.convert_tokens_to_ids("<image>")).sum()) == O.N_PATCHES == 36
    assert px.shape == (1, 3, 48, 48) and px.dtype == torch.float32
    assert px.min() >= -1 and px.max() <= 1
    with pytest.raises(AssertionError, match="uint8"):
        O.pixel_values_from_images(np.zeros((48, 48, 3), dtype=np.float32))


def test_tower_patch_labels_match_the_scene():
    s = world.make_samples(0, "t", 1, n_objects=(3,))[0]
    lab_kp = O.patch_labels([s], O.PATCH)[0]
    for o in s.scene.objects:
        for p in o.patches(16, O.PATCH):
            assert lab_kp[1, p] == 1 + world.SHAPES.index(o.shape) and lab_kp[3, p] == 1 + o.col
    covered = {p for o in s.scene.objects for p in o.patches(16, O.PATCH)}
    assert all(lab_kp[0, p] == 0 for p in range(O.N_PATCHES) if p not in covered)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="LMConfig: d_model"):
        O.LMConfig(d_model=100)
    with pytest.raises(ValueError, match="VLMConfig: lm_lr"):
        O.VLMConfig(lm_lr=1e-2, projector_lr=1e-3)


def test_tiny_organism_is_a_standard_llava(tiny, tok):
    vlm = tiny.vlm
    assert vlm.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert vlm.config.vision_feature_select_strategy == "default"
    samples = world.make_samples(3, "t", 4)
    text, px = O.vlm_batch(tok, samples, O.N_PATCHES)
    standard = vlm(input_ids=text.input_ids_bs, attention_mask=text.attention_mask_bs, pixel_values=px).logits
    cached = O.vlm_forward(vlm, text, vlm.model.multi_modal_projector(O.image_features(vlm, samples))).logits
    torch.testing.assert_close(standard, cached)
    # stage 2 moved the LM away from the base LM, the tower stayed frozen
    assert not torch.equal(
        vlm.model.language_model.layers[0].mlp.up_proj.weight, tiny.lm.model.layers[0].mlp.up_proj.weight
    )
    for name in ("lm_accuracy", "vlm_accuracy", "vlm_accuracy_mean_image", "residual_norms", "tower_accuracy"):
        assert tiny.metrics[name], f"metrics lack {name}"


def test_tiny_training_is_deterministic(tiny):
    again = O.build_organism(O.TINY, progress=False)
    for a, b in ((tiny.lm, again.lm), (tiny.vlm, again.vlm)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), "same seed must give identical weights"
    other = O.train_lm(O.TINY.lm, build_tokenizer(), seed=1, progress=False).model
    assert not torch.equal(other.lm_head.weight, tiny.lm.lm_head.weight), "the seed must matter"


def test_killed_vlm_training_resumes_bit_for_bit(tok, tmp_path, monkeypatch):
    """Stage 2 killed after its first checkpoint and restarted with the same arguments ends with the weights and
    history of an uninterrupted run; a checkpoint written for other settings is refused."""
    from dataclasses import replace

    cfg = replace(O.TINY.vlm, stage2_steps=9, eval_every=3)
    lm = O.train_lm(O.TINY.lm, tok, 0, progress=False).model
    tower = O.train_tower(O.TINY.tower, 0, progress=False).model
    ref = O.train_vlm(cfg, lm, tower, O.TINY.tower, tok, 0, progress=False)

    evaluate, calls = O.evaluate_vlm, []

    def killed_at_second_evaluation(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kw)

    ckpt = tmp_path / "vlm.pt"
    monkeypatch.setattr(O, "evaluate_vlm", killed_at_second_evaluation)
    with pytest.raises(KeyboardInterrupt):
        O.train_vlm(cfg, lm, tower, O.TINY.tower, tok, 0, progress=False, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    counted = []
    monkeypatch.setattr(O, "evaluate_vlm", lambda *a, **kw: counted.append(1) or evaluate(*a, **kw))
    resumed = O.train_vlm(cfg, lm, tower, O.TINY.tower, tok, 0, progress=False, checkpoint=ckpt)
    assert len(counted) == 4, "a resumed run evaluates at steps 6 and 9 and twice at the end (a restart: 5 times)"
    monkeypatch.setattr(O, "evaluate_vlm", evaluate)
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert resumed.history == ref.history
    assert [c[:2] for c in resumed.curve_stage2] == [c[:2] for c in ref.curve_stage2]
    with pytest.raises(ValueError, match="other settings"):
        O.train_vlm(replace(cfg, lm_lr=cfg.lm_lr / 2), lm, tower, O.TINY.tower, tok, 0, progress=False, checkpoint=ckpt)


def test_save_load_round_trip(tiny, tmp_path):
    O.save_organism(tiny, tmp_path)
    back = O.load_organism(tmp_path)
    samples = world.make_samples(4, "t", 3)
    text, px = O.vlm_batch(back.tokenizer, samples, back.vlm.config.image_seq_length)
    kw = dict(input_ids=text.input_ids_bs, attention_mask=text.attention_mask_bs, pixel_values=px)
    torch.testing.assert_close(back.vlm(**kw).logits, tiny.vlm(**kw).logits)
    with pytest.raises(FileNotFoundError, match="not a saved organism"):
        O.load_organism(tmp_path / "nowhere")


def test_colour_by_place_reads_the_answer_position(tok):
    """A stand-in LM that always names the first-described object's colour: right exactly at place 1, and every
    miss names another described object's colour."""
    samples = world.make_samples(0, "colour-by-place", 48, qtypes=("color",), n_objects=(2, 3))
    first = torch.tensor(tok.convert_tokens_to_ids([s.scene.objects[0].color for s in samples]))

    class FirstColour(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits_bsv = torch.zeros(*input_ids.shape, len(tok))
            logits_bsv[torch.arange(len(first)), :, first] = 1.0
            return type("Out", (), {"logits": logits_bsv})

    table = O.colour_by_place(FirstColour(), tok, samples).set_index(["n_objects", "place"])
    assert table.n.sum() == len(samples)
    assert set(table.index) == {(2, 1), (2, 2), (3, 1), (3, 2), (3, 3)}
    assert (table.loc[(slice(None), 1), "correct"] == 1.0).all()
    later = table.drop(index=1, level="place")
    assert (later.correct == 0.0).all() and (later.other_object == 1.0).all()
