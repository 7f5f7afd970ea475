"""Tokenizer, prompts and the organism of the `tiny` profile: fast, offline, and each assertion could fail."""

import dataclasses
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from lib.io.profiles import load_profile
from lib.sources import organism as O
from lib.sources import organism_training as OT
from lib.sources import world
from lib.sources.tokenizer import build_tokenizer

TINY = load_profile("tiny")  # the organism's sections: .lm, .tower, .vlm; and .seed, .threads


class Trained(NamedTuple):
    lm: OT.LMResult
    tower: OT.TowerResult
    vlm: OT.VLMResult


def train_tiny() -> Trained:
    """The tiny profile's organism, trained the way lib/steps trains every profile's: LM and tower, then the VLM."""
    torch.set_num_threads(TINY.threads)
    tokenizer = build_tokenizer()
    lm = OT.train_lm(TINY.lm, tokenizer, TINY.seed, progress=False)
    tower = OT.train_tower(TINY.tower, TINY.seed, progress=False)
    vlm = OT.train_vlm(TINY.vlm, lm.model, tower.model, TINY.tower, tokenizer, TINY.seed, progress=False)
    return Trained(lm, tower, vlm)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    return train_tiny()


def test_tokenizer_round_trip_and_ids(tok, tmp_path):
    sample = world.make_samples(0, "t", 9)[3]
    text = O.lm_text(sample.scene.caption(), sample.question) + f" {sample.answer} <eos>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.split()), "one word must be one token"
    assert [world.VOCAB[i] for i in ids] == text.split(), "ids must follow the order of lib.sources.world.VOCAB"
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
    lab_kp = OT.patch_labels([s], O.PATCH)[0]
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
    vlm = tiny.vlm.model
    assert vlm.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert vlm.config.vision_feature_select_strategy == "default"
    samples = world.make_samples(3, "t", 4)
    text, px = O.vlm_batch(tok, samples, O.N_PATCHES)
    standard = vlm(input_ids=text.input_ids_bs, attention_mask=text.attention_mask_bs, pixel_values=px).logits
    cached = O.vlm_forward(vlm, text, vlm.model.multi_modal_projector(O.image_features(vlm, samples))).logits
    torch.testing.assert_close(standard, cached)
    # stage 2 moved the LM away from the base LM, the tower stayed frozen
    assert not torch.equal(
        vlm.model.language_model.layers[0].mlp.up_proj.weight, tiny.lm.model.model.layers[0].mlp.up_proj.weight
    )
    torch.testing.assert_close(vlm.model.vision_tower.state_dict(), tiny.tower.model.state_dict(), rtol=0, atol=0)
    for name, table in [
        ("LM accuracy", tiny.lm.accuracy),
        ("VLM accuracy", tiny.vlm.accuracy),
        ("VLM accuracy with the mean image", tiny.vlm.accuracy_mean_image),
    ]:
        assert list(table.qtype) == list(world.QTYPES), f"{name}: one row per question type"
    assert set(tiny.tower.accuracy) >= set(OT.tower_heads(TINY.tower.patch)), "every tower head is scored"
    norms = O.residual_norm_ratio(tiny.lm.model, vlm, tok, O.eval_samples(TINY.seed + 1, 16))
    assert list(norms.point) == ["embed", *(f"blocks.{i}.hook_resid_post" for i in range(TINY.lm.n_layers))]
    assert (norms.ratio > 0).all()


def test_tiny_training_is_deterministic(tiny):
    again = train_tiny()
    for a, b in ((tiny.lm.model, again.lm.model), (tiny.vlm.model, again.vlm.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), "same seed must give identical weights"
    other = OT.train_lm(TINY.lm, build_tokenizer(), seed=TINY.seed + 1, progress=False).model
    assert not torch.equal(other.lm_head.weight, tiny.lm.model.lm_head.weight), "the seed must matter"


def killed_at_second_call(fn):
    """`fn` that raises KeyboardInterrupt on its second call: a training run killed after its first checkpoint."""
    calls = []

    def wrapped(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fn(*args, **kw)

    return wrapped


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "resumed weights differ"


def test_killed_vlm_training_resumes_bit_for_bit(tok, tmp_path, monkeypatch):
    """Stage 2 killed after its first checkpoint and restarted with the same arguments ends with the weights and
    history of an uninterrupted run; a checkpoint written for other settings is refused."""
    from dataclasses import replace

    cfg = replace(TINY.vlm, stage2_steps=9, eval_every=3)
    lm = OT.train_lm(TINY.lm, tok, 0, progress=False).model
    tower = OT.train_tower(TINY.tower, 0, progress=False).model
    ref = OT.train_vlm(cfg, lm, tower, TINY.tower, tok, 0, progress=False)

    evaluate = OT.evaluate_vlm
    ckpt = tmp_path / "vlm.pt"
    monkeypatch.setattr(OT, "evaluate_vlm", killed_at_second_call(evaluate))
    with pytest.raises(KeyboardInterrupt):
        OT.train_vlm(cfg, lm, tower, TINY.tower, tok, 0, progress=False, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    counted = []
    monkeypatch.setattr(OT, "evaluate_vlm", lambda *a, **kw: counted.append(1) or evaluate(*a, **kw))
    resumed = OT.train_vlm(cfg, lm, tower, TINY.tower, tok, 0, progress=False, checkpoint=ckpt)
    assert len(counted) == 4, "a resumed run evaluates at steps 6 and 9 and twice at the end (a restart: 5 times)"
    monkeypatch.setattr(OT, "evaluate_vlm", evaluate)
    assert_same_weights(ref.model, resumed.model)
    assert resumed.history == ref.history
    assert [c[:2] for c in resumed.curve_stage2] == [c[:2] for c in ref.curve_stage2]
    with pytest.raises(ValueError, match="other settings"):
        OT.train_vlm(replace(cfg, lm_lr=cfg.lm_lr / 2), lm, tower, TINY.tower, tok, 0, progress=False, checkpoint=ckpt)


def test_killed_lm_training_resumes_bit_for_bit(tok, tmp_path, monkeypatch):
    """The base LM killed after its first checkpoint and restarted with the same arguments ends with the weights,
    history and loss curve of an uninterrupted run; a checkpoint written for another seed is refused."""
    from dataclasses import replace

    cfg = replace(TINY.lm, steps=9, eval_every=3)
    ref = OT.train_lm(cfg, tok, 0, progress=False)
    evaluate = OT.evaluate_lm
    ckpt = tmp_path / "lm.pt"
    monkeypatch.setattr(OT, "evaluate_lm", killed_at_second_call(evaluate))
    with pytest.raises(KeyboardInterrupt):
        OT.train_lm(cfg, tok, 0, progress=False, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    monkeypatch.setattr(OT, "evaluate_lm", evaluate)
    resumed = OT.train_lm(cfg, tok, 0, progress=False, checkpoint=ckpt)
    assert_same_weights(ref.model, resumed.model)
    assert resumed.history == ref.history
    assert [c[:2] for c in resumed.curve] == [c[:2] for c in ref.curve]
    with pytest.raises(ValueError, match="other settings"):
        OT.train_lm(cfg, tok, 1, progress=False, checkpoint=ckpt)


def test_generic_caption_prompts_take_turns_and_stay_out_of_the_committed_keys(tok, monkeypatch):
    """`vlm.caption_prompts = "generic"`: the caption instructions are the lexical filter's direction-free prompts
    in turn; the field's default ("describe") leaves every committed key as it was (a field marked "added")."""
    from dataclasses import replace

    from lib.io.profiles import settings

    seen = []
    encode = OT.encode
    monkeypatch.setattr(OT, "encode", lambda t, prompts, answers: seen.extend(prompts) or encode(t, prompts, answers))
    cfg = replace(TINY.vlm, stage1_steps=2, stage2_steps=0, batch_size=4, caption_prompts="generic")
    lm = O.make_lm(TINY.lm, tok)
    OT.train_vlm(cfg, lm, O.make_tower(TINY.tower), TINY.tower, tok, 0, progress=False)
    instructions = [p for p in seen if "<image>" in p][:8]
    assert [next(g for g in world.GENERIC_PROMPTS if g in p) for p in instructions] == [
        world.GENERIC_PROMPTS[i % len(world.GENERIC_PROMPTS)] for i in range(8)
    ]
    assert "caption_prompts" not in settings(TINY.vlm) and settings(cfg)["caption_prompts"] == "generic"


@pytest.mark.parametrize("qtype", world.BINDING_QTYPES)
def test_binding_by_place_reads_the_answer_position(tok, qtype):
    """A stand-in LM that always names the first-described object's colour (or shape): right exactly at place 1,
    and every miss names another described object's colour (or shape)."""
    samples = world.make_samples(0, "binding-test", 48, qtypes=(qtype,), n_objects=(2, 3))
    first = torch.tensor(tok.convert_tokens_to_ids([getattr(s.scene.objects[0], qtype) for s in samples]))

    class FirstObject(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits_bsv = torch.zeros(*input_ids.shape, len(tok))
            logits_bsv[torch.arange(len(first)), :, first] = 1.0
            return type("Out", (), {"logits": logits_bsv})

    table = O.binding_by_place(FirstObject(), tok, samples).set_index(["qtype", "n_objects", "place"]).loc[qtype]
    assert table.n.sum() == len(samples)
    assert set(table.index) == {(2, 1), (2, 2), (3, 1), (3, 2), (3, 3)}
    assert (table.loc[(slice(None), 1), "correct"] == 1.0).all()
    later = table.drop(index=1, level="place")
    assert (later.correct == 0.0).all() and (later.other_object == 1.0).all()


def test_the_guess_from_the_question_is_a_chance_level_the_text_can_raise():
    """`question_prior` learns each question text's most common answer on a split of its own: never below the
    majority answer by more than noise, above it where the text rules answers out (what_rel: the named shape is
    never the answer), and perfect where the text decides the answer."""
    held, prior = O.eval_samples(1, 2700), world.make_samples(1, "prior", 6000)
    guess = O.question_prior(held, prior)
    answers = pd.DataFrame({"qtype": [s.qtype for s in held], "answer": [s.answer for s in held]})
    majority = answers.groupby("qtype").answer.agg(lambda a: a.value_counts(normalize=True).iloc[0])
    assert (guess >= majority.reindex(guess.index) - 0.05).all()
    assert guess["what_rel"] > majority["what_rel"] + 0.03
    told = [dataclasses.replace(s, question=f"{s.question} {s.answer}") for s in held[:90]]
    assert (O.question_prior(told, told) == 1.0).all()


def test_length_buckets_cover_the_batch_once_with_the_fewest_padded_slots():
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(3, 30, size=int(rng.integers(1, 9))).tolist()
        for k in (1, 2, 3):
            groups = OT.length_buckets(lengths, k)
            assert sorted(i for g in groups for i in g) == list(range(len(lengths))) and len(groups) <= k
            slots = sum(len(g) * max(lengths[i] for i in g) for g in groups)
            s = sorted(lengths)  # brute force over every way to cut the sorted lengths into at most k groups
            best = min(
                sum((b - a) * s[b - 1] for a, b in itertools.pairwise((0, *cuts, len(s))))
                for m in range(k)
                for cuts in itertools.combinations(range(1, len(s)), m)
            )
            assert slots == best


@pytest.mark.parametrize("per_sample", [False, True])
def test_bucketed_loss_is_the_whole_batch_loss_on_less_padding(per_sample):
    """The trainers' loss on length buckets equals the one-batch loss and gradient (to float rounding), and k = 1
    is the one-batch computation exactly: what the committed v1 organism was trained with."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = O.make_lm(TINY.lm, tok)
    samples = world.make_samples(0, "lm-train", 12) + world.make_samples(0, "x", 4, qtypes=("count",), n_objects=(1,))
    batch = O.lm_batch(tok, samples)
    forward = lambda rows, sub: model(input_ids=sub.input_ids_bs, attention_mask=sub.attention_mask_bs).logits  # noqa: E731
    losses, grads = {}, {}
    for k in (1, 3):
        model.zero_grad()
        losses[k] = OT.bucketed_ce(forward, batch, 1.0, 4.0, per_sample=per_sample, k=k)
        losses[k].backward()
        grads[k] = torch.cat([p.grad.flatten() for p in model.parameters()])
    whole = OT._weighted_ce(forward(None, batch), batch, 1.0, 4.0, per_sample=per_sample)
    assert torch.equal(losses[1], whole)
    assert batch.input_ids_bs.shape[1] > min(batch.attention_mask_bs.sum(1))  # there was padding to save
    torch.testing.assert_close(losses[3], losses[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[3], grads[1], rtol=1e-4, atol=1e-7)
