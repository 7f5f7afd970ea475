"""The model organism: a small Llama that reads the world's text, and a LLaVA-style VLM built from it.

Everything is a standard Hugging Face model, so the code that later reads activations works unchanged on a real
checkpoint: `LlamaForCausalLM` (the LLM), `CLIPVisionModel` (the vision tower) and `LlavaForConditionalGeneration`
(tower + `mlp2x_gelu` projector + the LLM). This module defines the organism: its inputs and prompts, how each model
is built, how it is scored, and the checks on the trained pair. How it is trained is
lib/sources/organism_training.py.

Answers are scored by teacher-forced argmax: every answer word must be the argmax at its position (answers are
1-2 words, so this equals greedy decoding of the answer up to the end-of-answer token).

Key to tensor suffixes: b batch, s sequence position, v vocabulary, d LM width, p image patches (36),
h tower width, c colour channels, y/x pixel rows/cols, l layers (embeddings + blocks), k classes of a head.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from lib.names import resid_name
from lib.sources import world
from lib.sources.organism_config import (  # noqa: F401 (re-exported: the configs belong to the organism)
    CAPTION_PROMPTS,
    IMAGE_SIZE,
    PATCH,
    LMConfig,
    TowerConfig,
    VLMConfig,
)
from lib.sources.tokenizer import BOS, EOS, IMAGE

N_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # image tokens at the default patch size
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # the tower is trained from scratch, so a fixed affine map to [-1, 1] suffices


# ---------------------------------------------------------------------------------------------------------------
# Inputs: text, images and the prompts that combine them.


def pixel_values_from_images(images_byxc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB images (B, H, W, 3) or one (H, W, 3) -> float pixel_values (B, 3, H, W) for the CLIP tower."""
    x_byxc = torch.as_tensor(np.asarray(images_byxc))
    if x_byxc.ndim == 3:
        x_byxc = x_byxc[None]
    assert x_byxc.ndim == 4 and x_byxc.shape[-1] == 3, f"expected uint8 images (B, H, W, 3), got {tuple(x_byxc.shape)}"
    assert x_byxc.dtype == torch.uint8, f"expected uint8 images, got {x_byxc.dtype}"
    x_bcyx = x_byxc.permute(0, 3, 1, 2).float() / 255.0
    return (x_bcyx - PIXEL_MEAN) / PIXEL_STD


def lm_text(caption: str, question: str) -> str:
    """The LM's full prompt (with <bos>); the answer follows after one space."""
    return f"{BOS} {world.lm_prompt(caption, question)}"


def vlm_text(question: str, n_image_tokens: int) -> str:
    """The VLM's full prompt (with <bos>): `<image>` expanded to one token per image patch."""
    prompt = world.vlm_prompt(question)
    assert prompt.count(IMAGE) == 1, f"world.vlm_prompt must contain {IMAGE} exactly once, got {prompt!r}"
    return f"{BOS} " + prompt.replace(IMAGE, " ".join([IMAGE] * n_image_tokens))


class TextBatch(NamedTuple):
    input_ids_bs: torch.Tensor
    attention_mask_bs: torch.Tensor
    answer_mask_bs: torch.Tensor  # answer words: what accuracy is scored on
    target_mask_bs: torch.Tensor  # answer words + <eos>: what the answer loss covers


def encode(tokenizer: PreTrainedTokenizerBase, prompts: list[str], answers: list[str] | None = None) -> TextBatch:
    """Right-padded batch of `prompt answer <eos>` (or prompts alone). Right padding keeps every real token at
    its unpadded position id, so the default position ids and the causal mask are exact."""
    answers = answers if answers is not None else [None] * len(prompts)
    assert len(answers) == len(prompts), f"{len(prompts)} prompts but {len(answers)} answers"
    ids, amask, tmask = [], [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(f"{answer} {EOS}", add_special_tokens=False).input_ids if answer is not None else []
        ids.append(p + a)
        amask.append([0] * len(p) + [1] * (len(a) - 1) + [0] * min(len(a), 1))
        tmask.append([0] * len(p) + [1] * len(a))
    n_s = max(map(len, ids))
    pad = lambda rows, v: torch.tensor([r + [v] * (n_s - len(r)) for r in rows])  # noqa: E731
    assert all(tokenizer.unk_token_id not in r for r in ids), f"unknown word in {prompts[0]!r} / {answers[0]!r}"
    return TextBatch(
        pad(ids, tokenizer.pad_token_id), pad([[1] * len(r) for r in ids], 0), pad(amask, 0), pad(tmask, 0)
    )


def lm_batch(tokenizer, samples: list[world.Sample], with_answers: bool = True) -> TextBatch:
    return encode(
        tokenizer,
        [lm_text(s.scene.caption(), s.question) for s in samples],
        [s.answer for s in samples] if with_answers else None,
    )


def vlm_batch(
    tokenizer, samples: list[world.Sample], n_image_tokens: int, with_answers: bool = True
) -> tuple[TextBatch, torch.Tensor]:
    """Text batch and pixel_values for a standard `LlavaForConditionalGeneration` forward."""
    text = encode(
        tokenizer,
        [vlm_text(s.question, n_image_tokens) for s in samples],
        [s.answer for s in samples] if with_answers else None,
    )
    return text, pixel_values_from_images(np.stack([s.scene.render() for s in samples]))


# ---------------------------------------------------------------------------------------------------------------
# Models.


def make_lm(cfg: LMConfig, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=cfg.init_std,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "eager"  # measured faster than sdpa at these sizes on CPU
    return LlamaForCausalLM(config)


def make_tower(cfg: TowerConfig) -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        image_size=IMAGE_SIZE,
        patch_size=cfg.patch,
        num_channels=3,
    )
    config._attn_implementation = "eager"
    return CLIPVisionModel(config)


def make_vlm(
    lm: LlamaForCausalLM, tower: CLIPVisionModel, tokenizer, tower_cfg: TowerConfig, seed: int = 0
) -> LlavaForConditionalGeneration:
    """A standard LLaVA: `tower` and `lm` weights copied in, a freshly initialised mlp2x_gelu projector."""
    n_patches = (tower.config.image_size // tower.config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=n_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=tower_cfg.feature_layer,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    vlm = LlavaForConditionalGeneration(config)
    vlm.model.vision_tower.load_state_dict(tower.state_dict())
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
    vlm.model.language_model.config._attn_implementation = "eager"
    return vlm


# ---------------------------------------------------------------------------------------------------------------
# Scoring: teacher-forced accuracy per question type, against the targets.


def _correct(logits_bsv: torch.Tensor, batch: TextBatch) -> torch.Tensor:
    """Per sample: every answer word is the argmax of the logits at the position before it (teacher forcing)."""
    hit_bs = logits_bsv[:, :-1].argmax(-1) == batch.input_ids_bs[:, 1:]
    answer_bs = batch.answer_mask_bs[:, 1:].bool()
    assert answer_bs.any(-1).all(), "every sample needs at least one answer token"
    return (hit_bs | ~answer_bs).all(-1)


# The targets, held-out accuracy per question type (checked in chapters/02_models.py, never retyped there).
TARGETS = {
    "lm": {q: 0.95 if fam == "lookup" else 0.90 for q, fam in world.QTYPES.items()},
    "vlm": {
        **{q: 0.95 for q, fam in world.QTYPES.items() if fam in ("lookup", "absolute")},
        "relation": 0.90,
        "what_rel": 0.80,
        "statement": 0.90,
    },
}


def against_targets(heldout: pd.DataFrame) -> pd.DataFrame:
    """A copy of the held-out accuracy table (lib.steps.organism.heldout_accuracy) with each type's target for the
    LM and the VLM beside its accuracy, and whether each is met."""
    table = heldout.copy()
    for model, column in (("lm", "lm_text"), ("vlm", "vlm_image")):
        table.insert(table.columns.get_loc(column) + 1, f"{model}_target", [TARGETS[model][q] for q in table.qtype])
    table["lm_met"] = table.lm_text >= table.lm_target
    table["vlm_met"] = table.vlm_image >= table.vlm_target
    return table


def accuracy_table(samples: list[world.Sample], correct_b: torch.Tensor) -> pd.DataFrame:
    """Accuracy per question type with its majority baseline (share of the most common answer of that type)."""
    df = pd.DataFrame(
        {
            "qtype": [s.qtype for s in samples],
            "answer": [s.answer for s in samples],
            "correct": correct_b.numpy().astype(bool),
        }
    )
    rows = []
    for qtype, g in df.groupby("qtype", sort=False):
        rows.append(
            dict(
                qtype=qtype,
                family=world.QTYPES[qtype],
                n=len(g),
                accuracy=g.correct.mean(),
                majority=g.answer.value_counts().iloc[0] / len(g),
            )
        )
    order = {q: i for i, q in enumerate(world.QTYPES)}
    return pd.DataFrame(rows).sort_values("qtype", key=lambda c: c.map(order)).reset_index(drop=True)


def question_prior(samples: list[world.Sample], prior: list[world.Sample]) -> pd.Series:
    """Per question type, the accuracy of the best guess from the question's text alone: each sample answered with
    the answer its question text most often has among `prior` (a split of its own; the type's most common answer
    for a text `prior` lacks). This is the chance level of a model that cannot see: above the majority baseline
    where the text rules answers out (what is left of the circle? never the circle)."""
    learned = pd.DataFrame([(s.qtype, s.question, s.answer) for s in prior], columns=["qtype", "question", "answer"])
    most_common = lambda answers: answers.value_counts().index[0]  # noqa: E731
    by_text = learned.groupby("question").answer.agg(most_common)
    by_type = learned.groupby("qtype").answer.agg(most_common)
    guess = [by_text.get(s.question, by_type[s.qtype]) for s in samples]
    hit = [g == s.answer for g, s in zip(guess, samples, strict=True)]
    hits = pd.DataFrame({"qtype": [s.qtype for s in samples], "hit": hit})
    return hits.groupby("qtype", sort=False).hit.mean()


@torch.no_grad()
def binding_by_place(model: LlamaForCausalLM, tokenizer, samples: list[world.Sample]) -> pd.DataFrame:
    """Colour and shape questions (`world.BINDING_QTYPES`) answered from captions, by question type and the place
    of the asked object in its caption (1 = described first): the share answered right, and the share answered with
    another described object's colour or shape. A model that binds each colour to its shape scores alike at every
    place; one that answers by place does not."""
    assert all(s.qtype in world.BINDING_QTYPES for s in samples), f"{' and '.join(world.BINDING_QTYPES)} only"
    model.eval()
    batch = lm_batch(tokenizer, samples)
    logits_bsv = model(input_ids=batch.input_ids_bs, attention_mask=batch.attention_mask_bs).logits
    first_b = batch.answer_mask_bs.int().argmax(-1)  # first answer token; a colour or a shape is one word
    pred = tokenizer.convert_ids_to_tokens(logits_bsv[torch.arange(len(samples)), first_b - 1].argmax(-1).tolist())
    described = [{getattr(o, s.qtype) for o in s.scene.objects} for s in samples]  # the qtype names the attribute
    df = pd.DataFrame(
        {
            "qtype": [s.qtype for s in samples],
            "n_objects": [len(s.scene.objects) for s in samples],
            # `subject` is the asked object's shape for both types (a shape question's answer)
            "place": [1 + [o.shape for o in s.scene.objects].index(s.subject) for s in samples],
            "correct": [p == s.answer for p, s in zip(pred, samples, strict=True)],
            "other_object": [p != s.answer and p in d for p, s, d in zip(pred, samples, described, strict=True)],
        }
    )
    return (
        df.groupby(["qtype", "n_objects", "place"])
        .agg(n=("correct", "size"), correct=("correct", "mean"), other_object=("other_object", "mean"))
        .reset_index()
    )


def binding(model: LlamaForCausalLM, tokenizer, seed: int, n: int = 600) -> tuple[pd.DataFrame, dict]:
    """`binding_by_place` on n fresh questions of each type in `world.BINDING_QTYPES` (a split of their own per
    type), and its summary per type over three-object captions: accuracy when the asked object is described last
    (`last_place`) and earlier (`earlier_places`), and the misses and how many of them name another described
    object's colour or shape (`misses`, `misses_other_object`)."""
    samples = [s for q in world.BINDING_QTYPES for s in world.make_samples(seed + 2, f"{q}-by-place", n, qtypes=(q,))]
    by_place = binding_by_place(model, tokenizer, samples)
    summary = {}
    for qtype, three in by_place[by_place.n_objects == 3].groupby("qtype"):
        last = three.place == three.place.max()
        right, other = three.correct * three.n, three.other_object * three.n  # counts
        summary[qtype] = {
            "last_place": float(three.correct[last].mean()),
            "earlier_places": float(right[~last].sum() / three.n[~last].sum()),
            "misses": int((three.n - right).sum().round()),
            "misses_other_object": int(other.sum().round()),
        }
    return by_place, summary


def eval_samples(seed: int, n: int) -> list[world.Sample]:
    """The held-out set: its own split, so it never overlaps the training streams."""
    return world.make_samples(seed, "test", n)


@torch.no_grad()
def evaluate_lm(model: LlamaForCausalLM, tokenizer, samples: list[world.Sample], batch_size: int = 256):
    """Held-out accuracy of the LM reading captions, per question type, with the majority baseline."""
    model.eval()
    correct = []
    for i in range(0, len(samples), batch_size):
        batch = lm_batch(tokenizer, samples[i : i + batch_size])
        logits_bsv = model(input_ids=batch.input_ids_bs, attention_mask=batch.attention_mask_bs).logits
        correct.append(_correct(logits_bsv, batch))
    return accuracy_table(samples, torch.cat(correct))


# ---------------------------------------------------------------------------------------------------------------
# The VLM's forward from tower features, and its scoring.


def tower_features(tower: CLIPVisionModel, pixel_values_bcyx: torch.Tensor, layer: int) -> torch.Tensor:
    """LLaVA's feature choice: hidden layer `layer`, CLS dropped -> (B, P, h)."""
    return tower(pixel_values=pixel_values_bcyx, output_hidden_states=True).hidden_states[layer][:, 1:]


def vlm_forward(
    vlm: LlavaForConditionalGeneration,
    batch: TextBatch,
    image_embeds_bpd: torch.Tensor,
    output_hidden_states: bool = False,
):
    """The LLaVA forward with the projected image embeddings given: the same masked_scatter the standard forward
    does after running tower + projector, so cached tower features (and the mean-image corruption) share one path."""
    embeds_bsd = vlm.get_input_embeddings()(batch.input_ids_bs)
    image_mask_bs = batch.input_ids_bs == vlm.config.image_token_id
    assert image_mask_bs.sum() == image_embeds_bpd.shape[0] * image_embeds_bpd.shape[1], (
        f"{int(image_mask_bs.sum())} image tokens but {tuple(image_embeds_bpd.shape[:2])} image embeddings"
    )
    embeds_bsd = embeds_bsd.masked_scatter(image_mask_bs[..., None], image_embeds_bpd.to(embeds_bsd.dtype))
    return vlm(
        inputs_embeds=embeds_bsd, attention_mask=batch.attention_mask_bs, output_hidden_states=output_hidden_states
    )


@torch.no_grad()
def image_features(vlm: LlavaForConditionalGeneration, samples: list[world.Sample], batch_size: int = 512):
    """Frozen-tower features (B, P, h) at the configured layer, CLS dropped (computed once, reused)."""
    out = []
    for i in range(0, len(samples), batch_size):
        px = pixel_values_from_images(np.stack([s.scene.render() for s in samples[i : i + batch_size]]))
        out.append(tower_features(vlm.model.vision_tower, px, vlm.config.vision_feature_layer))
    return torch.cat(out)


@torch.no_grad()
def vlm_correct(
    vlm: LlavaForConditionalGeneration,
    tokenizer,
    samples: list[world.Sample],
    corrupt: str | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per sample, whether the VLM gives its answer (`_correct`: every answer word the argmax, teacher-forced).
    `corrupt="mean_image"` replaces every image embedding by the mean image-token embedding over `samples` (text
    unchanged): spatial accuracy should fall to chance."""
    assert corrupt in (None, "mean_image"), f"corrupt must be None or 'mean_image', got {corrupt!r}"
    vlm.eval()
    n_img = vlm.config.image_seq_length
    embeds_bpd = vlm.model.multi_modal_projector(image_features(vlm, samples))
    if corrupt == "mean_image":
        embeds_bpd = embeds_bpd.mean((0, 1), keepdim=True).expand_as(embeds_bpd)
    correct = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        text = encode(tokenizer, [vlm_text(s.question, n_img) for s in chunk], [s.answer for s in chunk])
        correct.append(_correct(vlm_forward(vlm, text, embeds_bpd[i : i + batch_size]).logits, text))
    return torch.cat(correct)


def evaluate_vlm(
    vlm: LlavaForConditionalGeneration,
    tokenizer,
    samples: list[world.Sample],
    corrupt: str | None = None,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Held-out accuracy per question type with the majority baseline (`vlm_correct`, `corrupt` as there)."""
    return accuracy_table(samples, vlm_correct(vlm, tokenizer, samples, corrupt, batch_size))


# ---------------------------------------------------------------------------------------------------------------
# Checks on the trained pair.


def _resid_posts(decoder: nn.Module, run) -> list[torch.Tensor]:
    """Embedding output and every block's output, the last one taken *before* the final RMSNorm (HF's last
    hidden state is after it)."""
    captured = []
    handle = decoder.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        hidden = run().hidden_states
    finally:
        handle.remove()
    return [*hidden[:-1], captured[0]]


@torch.no_grad()
def residual_norm_ratio(
    lm: LlamaForCausalLM, vlm: LlavaForConditionalGeneration, tokenizer, samples: list[world.Sample]
) -> pd.DataFrame:
    """Mean residual-stream norm (embedding, then after each block, before the final norm) on text tokens, BOS
    dropped: the LM on its caption prompt, the VLM on the non-image tokens of its image prompt, and their ratio.
    Large ratios break diffing of SAEs across the two."""
    lm.eval(), vlm.eval()
    text = lm_batch(tokenizer, samples, with_answers=False)
    hs_lm = _resid_posts(
        lm.model,
        lambda: lm(input_ids=text.input_ids_bs, attention_mask=text.attention_mask_bs, output_hidden_states=True),
    )
    keep_lm_bs = text.attention_mask_bs.bool().clone()
    keep_lm_bs[:, 0] = False
    vtext = encode(tokenizer, [vlm_text(s.question, vlm.config.image_seq_length) for s in samples])
    embeds = vlm.model.multi_modal_projector(image_features(vlm, samples))
    hs_vlm = _resid_posts(vlm.model.language_model, lambda: vlm_forward(vlm, vtext, embeds, output_hidden_states=True))
    keep_vlm_bs = vtext.attention_mask_bs.bool() & (vtext.input_ids_bs != vlm.config.image_token_id)
    keep_vlm_bs[:, 0] = False
    rows = []
    for i, (h_lm, h_vlm) in enumerate(zip(hs_lm, hs_vlm, strict=True)):
        n_lm, n_vlm = h_lm.norm(dim=-1)[keep_lm_bs].mean().item(), h_vlm.norm(dim=-1)[keep_vlm_bs].mean().item()
        point = "embed" if i == 0 else resid_name(i - 1)
        rows.append(dict(point=point, lm_norm=n_lm, vlm_norm=n_vlm, ratio=n_vlm / n_lm))
    return pd.DataFrame(rows)


@torch.no_grad()
def generate_answers(
    vlm: LlavaForConditionalGeneration, tokenizer, samples: list[world.Sample], max_new_tokens: int = 4
) -> list[str]:
    """Free greedy answers (not teacher-forced) through the standard HF `generate` with pixels in, one sample at
    a time (right padding would put pads before the answer)."""
    vlm.eval()
    answers = []
    for s in samples:
        text, px = vlm_batch(tokenizer, [s], vlm.config.image_seq_length, with_answers=False)
        out = vlm.generate(
            input_ids=text.input_ids_bs,
            attention_mask=text.attention_mask_bs,
            pixel_values=px,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers.append(tokenizer.decode(out[0, text.input_ids_bs.shape[1] :], skip_special_tokens=True).strip())
    return answers
