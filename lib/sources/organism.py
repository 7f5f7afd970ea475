"""The model organism: a small Llama trained on the world's text, and a LLaVA-style VLM fine-tuned from it.

Everything is a standard Hugging Face model, so the code that later reads activations works unchanged on a real
checkpoint: `LlamaForCausalLM` (the LLM), `CLIPVisionModel` (the vision tower) and `LlavaForConditionalGeneration`
(tower + `mlp2x_gelu` projector + the LLM). Training follows LLaVA:

1. Base LM, on `<bos> lm_prompt(caption, question) answer <eos>`; the caption states every object's position in
   words, so the LM learns to compare positions stated in text before it ever sees an image.
2. Vision tower, pretrained here on the world's images with per-patch heads that keep both content (colour,
   shape) and position (the object's grid row/col, the patch's own row/col) in every patch token; frozen after.
3. VLM stage 1: projector only, on captions ("describe the image ." -> caption with positions), so the projector
   learns to write the positional code the LM already reads.
4. VLM stage 2: projector + LM on questions about images, loss on answer tokens only, LM learning rate lower than
   the projector's (a full-rate LM fine-tune blows up residual norms and breaks the later SAE diffing), with a
   curriculum from single-object scenes to the full mix.

The tower is frozen, so its features for the training scenes are computed once and reused every epoch.
Answers are scored by teacher-forced argmax: every answer word must be the argmax at its position (answers are
1-2 words, so this equals greedy decoding of the answer up to the end-of-answer token).

Key to tensor suffixes: b batch, s sequence position, v vocabulary, d LM width, p image patches (36),
h tower width, c colour channels, y/x pixel rows/cols, l layers (embeddings + blocks), k classes of a head.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from lib.sources import world
from lib.sources.tokenizer import BOS, EOS, IMAGE, build_tokenizer

IMAGE_SIZE = world.GRID * 16  # the world's default 16 px cells
PATCH = 8
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # image tokens at the default patch size
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # the tower is trained from scratch, so a fixed affine map to [-1, 1] suffices
CAPTION_PROMPT = "describe the image ."  # stage-1 instruction (LLaVA's "describe the image briefly")
NON_RELATIONAL = tuple(q for q, fam in world.QTYPES.items() if fam != "relational")  # hostable by one object

Curve = list[tuple[int, float, float]]  # (step, loss, wall seconds since the start of the loop)


# ---------------------------------------------------------------------------------------------------------------
# Configs. Frozen dataclasses that validate themselves; small and full runs differ only in these values.


def _check(cond: bool, cfg: object, msg: str) -> None:
    if not cond:
        raise ValueError(f"{type(cfg).__name__}: {msg}")


@dataclass(frozen=True)
class LMConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 32
    d_mlp: int = 512
    # HF initializer_range. 0.08 (about 1/sqrt(d_model)) rather than HF's 0.02: measured, 2-object colour lookup
    # stayed at chance for 1,200 steps at 0.02 and reached 0.75 by step 800 at 0.08 (attention starts nearer a
    # saddle the smaller the init).
    init_std: float = 0.08
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    # Loss weights: every predicted token counts (predicting the caption teaches the model to attend over it),
    # answer tokens count `answer_weight` times more.
    context_weight: float = 1.0
    answer_weight: float = 4.0
    # Curriculum: this share of each batch is single-object scenes (lookup without matching) for the first
    # `single_object_steps`, a fifth of it afterwards.
    single_object_frac: float = 0.5
    single_object_steps: int = 1500
    n_eval: int = 900
    eval_every: int = 500

    def __post_init__(self):
        _check(self.d_model == self.n_heads * self.head_dim, self, "d_model must equal n_heads * head_dim")
        _check(
            min(self.n_layers, self.n_heads, self.steps, self.batch_size, self.n_eval) > 0,
            self,
            "n_layers, n_heads, steps, batch_size and n_eval must be positive",
        )
        _check(0 <= self.single_object_frac <= 1, self, "single_object_frac must lie in [0, 1]")
        _check(self.answer_weight > 0 and self.context_weight >= 0, self, "loss weights must be >= 0 (answer > 0)")


@dataclass(frozen=True)
class TowerConfig:
    hidden: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_mlp: int = 512
    patch: int = PATCH
    # LLaVA reads a hidden layer of the tower and drops CLS; ours reads the last layer, the one the heads train.
    feature_layer: int = -1
    n_images: int = 20000
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    n_eval: int = 1000

    def __post_init__(self):
        _check(IMAGE_SIZE % self.patch == 0, self, f"patch must divide the image size {IMAGE_SIZE}")
        _check(16 % self.patch == 0, self, "patch must divide the 16 px cell, so no patch straddles two cells")
        _check(self.hidden % self.n_heads == 0, self, "hidden must be a multiple of n_heads")
        _check(-self.n_layers - 1 <= self.feature_layer <= self.n_layers, self, "feature_layer out of range")
        _check(min(self.n_images, self.steps, self.batch_size) > 0, self, "n_images, steps, batch_size > 0")


@dataclass(frozen=True)
class VLMConfig:
    # Every step draws fresh scenes (as the LM's corpus does): a fixed pool of 20,000 scenes was memorised (training
    # loss 0.017 while held-out statements fell from 0.75 to 0.67 over the last 3,000 steps).
    stage1_steps: int = 600
    stage1_lr: float = 2e-3
    stage2_steps: int = 3000
    projector_lr: float = 1e-3
    lm_lr: float = 2e-4  # lower than the projector's: keeps the LM's residual norms near the base LM's
    batch_size: int = 64
    warmup: int = 100
    # Stage-2 curriculum: single-object scenes (where/side/lookup of one object) for `single_object_steps`,
    # then the full mix with `single_object_frac` of each batch still single-object.
    single_object_steps: int = 500
    single_object_frac: float = 0.1
    # Share of each stage-2 batch that asks for the caption ("describe the image .", answer = the caption), as
    # LLaVA's instruction data mixes detailed descriptions with questions. The caption names every object's colour,
    # shape and position, so it supervises every binding the questions need with many tokens per image.
    caption_frac: float = 0.0
    n_eval: int = 900
    eval_every: int = 500

    def __post_init__(self):
        _check(0 <= self.caption_frac < 1, self, "caption_frac must lie in [0, 1)")
        _check(self.lm_lr <= self.projector_lr, self, "lm_lr must not exceed projector_lr (LLaVA's recipe)")
        _check(min(self.batch_size, self.n_eval) > 0, self, "batch_size, n_eval > 0")
        _check(self.stage1_steps >= 0 and self.stage2_steps >= 0, self, "stage steps must be >= 0")
        _check(0 <= self.single_object_frac <= 1, self, "single_object_frac must lie in [0, 1]")


@dataclass(frozen=True)
class OrganismConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    tower: TowerConfig = field(default_factory=TowerConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    seed: int = 0
    # One thread: measured 7x faster than two when another process holds a core (OpenMP spin-waits), and the
    # thread count is part of what makes float sums bit-for-bit repeatable.
    num_threads: int = 1

    def __post_init__(self):
        _check(self.num_threads > 0, self, "num_threads must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


TINY = OrganismConfig(
    lm=LMConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        head_dim=16,
        d_mlp=64,
        steps=20,
        batch_size=16,
        warmup=5,
        single_object_steps=10,
        n_eval=36,
        eval_every=10,
    ),
    tower=TowerConfig(hidden=32, n_layers=2, n_heads=2, d_mlp=64, n_images=64, steps=10, batch_size=16, n_eval=32),
    vlm=VLMConfig(
        stage1_steps=5,
        stage2_steps=10,
        batch_size=16,
        warmup=2,
        single_object_steps=4,
        n_eval=36,
        eval_every=5,
    ),
)
DEFAULT = OrganismConfig()


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
# Shared training plumbing.


def _schedule(opt, warmup: int, steps: int):
    """Linear warmup, cosine decay to zero."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


def _weighted_ce(
    logits_bsv: torch.Tensor,
    batch: TextBatch,
    context_weight: float,
    answer_weight: float,
    per_sample: bool = False,
):
    """Next-token cross-entropy, position s predicting token s + 1, weighted per target token. `per_sample`: each
    sample's weighted mean first, then the mean over samples (a long caption answer weighs as much as a one-word
    answer)."""
    target_bs = batch.input_ids_bs[:, 1:]
    ce_bs = F.cross_entropy(logits_bsv[:, :-1].flatten(0, 1), target_bs.flatten(), reduction="none")
    w_bs = (context_weight * batch.attention_mask_bs[:, 1:] + answer_weight * batch.target_mask_bs[:, 1:]).float()
    if per_sample:
        return ((ce_bs.view_as(w_bs) * w_bs).sum(1) / w_bs.sum(1)).mean()
    return (ce_bs.view_as(w_bs) * w_bs).sum() / w_bs.sum()


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


@torch.no_grad()
def colour_by_place(model: LlamaForCausalLM, tokenizer, samples: list[world.Sample]) -> pd.DataFrame:
    """Colour questions answered from captions, by the place of the asked shape in its caption (1 = described
    first): the share answered right, and the share answered with another described object's colour. A model
    that binds each colour to its shape scores alike at every place; one that answers by place does not."""
    assert all(s.qtype == "color" for s in samples), "colour questions only"
    model.eval()
    batch = lm_batch(tokenizer, samples)
    logits_bsv = model(input_ids=batch.input_ids_bs, attention_mask=batch.attention_mask_bs).logits
    first_b = batch.answer_mask_bs.int().argmax(-1)  # first answer token; a colour is one word
    pred = tokenizer.convert_ids_to_tokens(logits_bsv[torch.arange(len(samples)), first_b - 1].argmax(-1).tolist())
    df = pd.DataFrame(
        {
            "n_objects": [len(s.scene.objects) for s in samples],
            "place": [1 + [o.shape for o in s.scene.objects].index(s.subject) for s in samples],
            "correct": [p == s.answer for p, s in zip(pred, samples, strict=True)],
            "other_object": [
                p != s.answer and p in {o.color for o in s.scene.objects} for p, s in zip(pred, samples, strict=True)
            ],
        }
    )
    return (
        df.groupby(["n_objects", "place"])
        .agg(n=("correct", "size"), correct=("correct", "mean"), other_object=("other_object", "mean"))
        .reset_index()
    )


def _mix(seed: int, split: str, n: int, single_frac: float, start: int) -> list[world.Sample]:
    """`n` samples: all question types on 2-3 objects, plus a `single_frac` share of one-object scenes
    (non-relational types only: a relation needs two objects)."""
    n1 = round(single_frac * n)
    multi = world.make_samples(seed, split, n - n1, start=start)
    single = world.make_samples(seed, f"{split}-single", n1, qtypes=NON_RELATIONAL, n_objects=(1,), start=start)
    return multi + single


def eval_samples(seed: int, n: int) -> list[world.Sample]:
    """The held-out set: its own split, so it never overlaps the training streams."""
    return world.make_samples(seed, "test", n)


# ---------------------------------------------------------------------------------------------------------------
# 1. Base LM.


class LMResult(NamedTuple):
    model: LlamaForCausalLM
    accuracy: pd.DataFrame  # final held-out accuracy per question type
    history: list[tuple[int, dict[str, float]]]  # (step, accuracy per qtype) every eval_every steps
    curve: Curve


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


def train_lm(cfg: LMConfig, tokenizer, seed: int = 0, progress: bool = True) -> LMResult:
    torch.manual_seed(seed)
    model = make_lm(cfg, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = _schedule(opt, cfg.warmup, cfg.steps)
    test = eval_samples(seed + 1, cfg.n_eval)
    curve, history, t0 = [], [], time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.steps), desc="base LM", disable=not progress, mininterval=5)
    for step in bar:
        frac = cfg.single_object_frac if step < cfg.single_object_steps else cfg.single_object_frac / 5
        batch = lm_batch(tokenizer, _mix(seed, "lm-train", cfg.batch_size, frac, start=step * cfg.batch_size))
        logits_bsv = model(input_ids=batch.input_ids_bs, attention_mask=batch.attention_mask_bs).logits
        loss = _weighted_ce(logits_bsv, batch, cfg.context_weight, cfg.answer_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        curve.append((step, loss.item(), time.perf_counter() - t0))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc = evaluate_lm(model, tokenizer, test)
            history.append((step + 1, dict(zip(acc.qtype, acc.accuracy.round(3), strict=True))))
            if progress:
                tqdm.write(f"held-out accuracy after {step + 1} steps: {history[-1][1]}")
            model.train()
    model.eval()
    return LMResult(model, evaluate_lm(model, tokenizer, test), history, curve)


# ---------------------------------------------------------------------------------------------------------------
# 2. Vision tower.


def tower_heads(patch: int) -> dict[str, int]:
    """Per-patch targets and their class counts; class 0 of the object heads is "background"."""
    return {
        "color": 1 + len(world.COLORS),
        "shape": 1 + len(world.SHAPES),
        "obj_row": 1 + world.GRID,
        "obj_col": 1 + world.GRID,
        "patch_row": IMAGE_SIZE // patch,
        "patch_col": IMAGE_SIZE // patch,
    }


def patch_labels(samples: list[world.Sample], patch: int) -> torch.Tensor:
    """(B, 6, P) int64 targets for `tower_heads(patch)`, one per image patch in raster order."""
    n_side = IMAGE_SIZE // patch
    p = np.arange(n_side * n_side)
    lab_bkp = np.zeros((len(samples), len(tower_heads(patch)), n_side * n_side), dtype=np.int64)
    lab_bkp[:, 4], lab_bkp[:, 5] = p // n_side, p % n_side
    for i, s in enumerate(samples):
        assert s.scene.size_px == IMAGE_SIZE, f"scene is {s.scene.size_px} px, the tower expects {IMAGE_SIZE}"
        for o in s.scene.objects:
            idx = list(o.patches(s.scene.cell_px, patch))
            lab_bkp[i, :4, idx] = (
                1 + list(world.COLORS).index(o.color),
                1 + world.SHAPES.index(o.shape),
                1 + o.row,
                1 + o.col,
            )
    return torch.from_numpy(lab_bkp)


class TowerResult(NamedTuple):
    model: CLIPVisionModel
    heads: nn.ModuleDict  # linear probes trained with the tower, on the feature layer
    accuracy: dict[str, float]  # held-out per-patch accuracy of each head
    curve: Curve


def _tower_features(tower: CLIPVisionModel, pixel_values_bcyx: torch.Tensor, layer: int) -> torch.Tensor:
    """LLaVA's feature choice: hidden layer `layer`, CLS dropped -> (B, P, h)."""
    return tower(pixel_values=pixel_values_bcyx, output_hidden_states=True).hidden_states[layer][:, 1:]


def _head_loss_acc(heads: nn.ModuleDict, feat_bph: torch.Tensor, lab_bkp: torch.Tensor):
    loss, acc = 0.0, {}
    for k, (name, head) in enumerate(heads.items()):
        logits_bpk = head(feat_bph)
        loss = loss + F.cross_entropy(logits_bpk.flatten(0, 1), lab_bkp[:, k].flatten())
        acc[name] = (logits_bpk.argmax(-1) == lab_bkp[:, k]).float().mean().item()
    return loss, acc


def train_tower(cfg: TowerConfig, seed: int = 0, progress: bool = True) -> TowerResult:
    torch.manual_seed(seed)
    tower = make_tower(cfg)
    heads = nn.ModuleDict({k: nn.Linear(cfg.hidden, n) for k, n in tower_heads(cfg.patch).items()})
    # Scenes with 1-3 objects: the tower should see every object count the VLM will.
    train = world.make_samples(seed, "tower-train", cfg.n_images, qtypes=("count",), n_objects=(1, 2, 3))
    test = world.make_samples(seed + 1, "tower-test", cfg.n_eval, qtypes=("count",), n_objects=(1, 2, 3))
    x_train, y_train = (
        pixel_values_from_images(np.stack([s.scene.render() for s in train])),
        patch_labels(train, cfg.patch),
    )
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = _schedule(opt, 50, cfg.steps)
    gen = torch.Generator().manual_seed(seed)
    curve, t0 = [], time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="vision tower", disable=not progress, mininterval=5)
    for step in bar:
        i_b = torch.randint(0, cfg.n_images, (cfg.batch_size,), generator=gen)
        loss, _ = _head_loss_acc(heads, _tower_features(tower, x_train[i_b], cfg.feature_layer), y_train[i_b])
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        curve.append((step, loss.item(), time.perf_counter() - t0))
    tower.eval().requires_grad_(False)
    with torch.no_grad():
        x_test = pixel_values_from_images(np.stack([s.scene.render() for s in test]))
        feat_bph, lab_bkp = _tower_features(tower, x_test, cfg.feature_layer), patch_labels(test, cfg.patch)
        _, acc = _head_loss_acc(heads, feat_bph, lab_bkp)
        # Most patches are background, which every head finds easily: an all-patch shape accuracy of 0.975 was 0.89
        # on the patches under an object, the bound on what the VLM can answer about shape.
        obj_bp = lab_bkp[:, 0] > 0
        for k, name in enumerate(list(heads)[:4]):
            hit_bp = heads[name](feat_bph).argmax(-1) == lab_bkp[:, k]
            acc[f"{name}_on_objects"] = hit_bp[obj_bp].float().mean().item()
    return TowerResult(tower, heads, acc, curve)


# ---------------------------------------------------------------------------------------------------------------
# 3. VLM.


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
        out.append(_tower_features(vlm.model.vision_tower, px, vlm.config.vision_feature_layer))
    return torch.cat(out)


@torch.no_grad()
def evaluate_vlm(
    vlm: LlavaForConditionalGeneration,
    tokenizer,
    samples: list[world.Sample],
    corrupt: str | None = None,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Held-out accuracy per question type. `corrupt="mean_image"` replaces every image embedding by the mean
    image-token embedding over `samples` (text unchanged): spatial accuracy should fall to chance."""
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
    return accuracy_table(samples, torch.cat(correct))


class VLMResult(NamedTuple):
    model: LlavaForConditionalGeneration
    accuracy: pd.DataFrame  # held-out, clean images
    accuracy_mean_image: pd.DataFrame  # held-out, every image embedding replaced by the mean image embedding
    history: list[tuple[int, dict[str, float]]]
    curve_stage1: Curve
    curve_stage2: Curve


def _save_vlm_checkpoint(path: str | Path, **state) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a run killed while writing leaves the previous checkpoint intact


def _load_vlm_checkpoint(path: str | Path, identity: dict) -> dict | None:
    if not Path(path).exists():
        return None
    state = torch.load(path, weights_only=True)
    if json.loads(json.dumps(state["identity"])) != json.loads(json.dumps(identity)):
        raise ValueError(
            f"checkpoint {path} was written for other settings ({state['identity']} vs {identity}); delete it or "
            "use the settings it was written with"
        )
    return state


def train_vlm(
    cfg: VLMConfig,
    lm: LlamaForCausalLM,
    tower: CLIPVisionModel,
    tower_cfg: TowerConfig,
    tokenizer,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> VLMResult:
    """LLaVA's two stages (see the module docstring). With `checkpoint`, the whole training state is written
    there at every held-out evaluation of stage 2, and a run that finds the file resumes from it: a killed run
    restarted with the same arguments ends with the same weights, bit for bit (stage 2 is hours on a CPU)."""
    vlm = make_vlm(lm, tower, tokenizer, tower_cfg, seed)
    vlm.model.vision_tower.requires_grad_(False).eval()
    projector, lang = vlm.model.multi_modal_projector, vlm.model.language_model
    test = eval_samples(seed + 1, cfg.n_eval)
    n_img = vlm.config.image_seq_length
    drawn = dict.fromkeys(("caption", "multi", "single"), 0)  # samples drawn so far from each training stream

    def draw(stream: str, n: int) -> list[world.Sample]:
        """The next `n` fresh samples of a stream: no scene is seen twice, so nothing can be memorised."""
        split, kw = {
            "caption": ("vlm-caption", dict(qtypes=("count",), n_objects=(1, 2, 3))),
            "multi": ("vlm-train", {}),
            "single": ("vlm-train-single", dict(qtypes=NON_RELATIONAL, n_objects=(1,))),
        }[stream]
        out = world.make_samples(seed, split, n, start=drawn[stream], **kw)
        drawn[stream] += n
        return out

    def step_on(samples, answers, questions, weights, per_sample=False):
        batch = encode(tokenizer, [vlm_text(q, n_img) for q in questions(samples)], answers(samples))
        logits = vlm_forward(vlm, batch, projector(image_features(vlm, samples))).logits
        return _weighted_ce(logits, batch, *weights, per_sample=per_sample)

    identity = {"config": asdict(cfg), "tower": asdict(tower_cfg), "seed": seed}
    state = _load_vlm_checkpoint(checkpoint, identity) if checkpoint is not None else None
    if state is not None:
        missing, unexpected = vlm.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if ".vision_tower." not in k]  # the frozen tower is not in the checkpoint
        assert not missing and not unexpected, f"checkpoint {checkpoint}: weights {missing[:3]} {unexpected[:3]}"
        drawn.update(state["drawn"])
        if progress:
            tqdm.write(f"VLM: resuming stage 2 at step {state['step']} from {checkpoint}")

    # Stage 1: projector only, captions (answer-only loss on the caption words + <eos>).
    lang.requires_grad_(False), vlm.lm_head.requires_grad_(False)
    opt = torch.optim.AdamW(projector.parameters(), lr=cfg.stage1_lr, weight_decay=0.0)
    sched = _schedule(opt, cfg.warmup, max(cfg.stage1_steps, 1))
    curve1, t0 = ([], time.perf_counter()) if state is None else (state["curve1"], None)
    bar = tqdm(range(cfg.stage1_steps if state is None else 0), desc="VLM stage 1", disable=not progress, mininterval=5)
    for step in bar:
        loss = step_on(
            draw("caption", cfg.batch_size),
            lambda ss: [s.scene.caption() for s in ss],
            lambda ss: [CAPTION_PROMPT] * len(ss),
            (0.0, 1.0),
        )
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        curve1.append((step, loss.item(), time.perf_counter() - t0))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

    # Stage 2: projector + LM on questions, answer-only loss, LM at the lower rate.
    lang.requires_grad_(True), vlm.lm_head.requires_grad_(True)
    lm_params = [p for p in {id(p): p for p in [*lang.parameters(), *vlm.lm_head.parameters()]}.values()]
    opt = torch.optim.AdamW(
        [dict(params=list(projector.parameters()), lr=cfg.projector_lr), dict(params=lm_params, lr=cfg.lm_lr)],
        weight_decay=0.0,
    )
    sched = _schedule(opt, cfg.warmup, max(cfg.stage2_steps, 1))
    curve2, history, start = [], [], 0
    if state is not None:
        opt.load_state_dict(state["optimizer"]), sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        curve2, history, start = state["curve2"], state["history"], state["step"]
    t0 = time.perf_counter() - (curve2[-1][2] if curve2 else 0.0)  # wall times run on across a resume
    bar = tqdm(
        range(start, cfg.stage2_steps),
        initial=start,
        total=cfg.stage2_steps,
        desc="VLM stage 2",
        disable=not progress,
        mininterval=5,
    )
    for step in bar:
        if step < cfg.single_object_steps:
            samples = draw("single", cfg.batch_size)
        else:
            n1 = round(cfg.single_object_frac * cfg.batch_size)
            samples = draw("multi", cfg.batch_size - n1) + draw("single", n1)
        vlm.train(), vlm.model.vision_tower.eval()
        n_cap = round(cfg.caption_frac * cfg.batch_size) if step >= cfg.single_object_steps else 0
        is_cap = [i < n_cap for i in range(len(samples))]  # the first n_cap samples of the batch describe the image
        loss = step_on(
            samples,
            lambda ss, is_cap=is_cap: [s.scene.caption() if c else s.answer for s, c in zip(ss, is_cap, strict=True)],
            lambda ss, is_cap=is_cap: [CAPTION_PROMPT if c else s.question for s, c in zip(ss, is_cap, strict=True)],
            (0.0, 1.0),
            per_sample=cfg.caption_frac > 0,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*projector.parameters(), *lm_params], 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        curve2.append((step, loss.item(), time.perf_counter() - t0))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.stage2_steps:
            acc = evaluate_vlm(vlm, tokenizer, test)
            history.append((step + 1, dict(zip(acc.qtype, acc.accuracy.round(3), strict=True))))
            if progress:
                tqdm.write(f"held-out accuracy after {step + 1} steps: {history[-1][1]}")
            if checkpoint is not None and step + 1 < cfg.stage2_steps:
                _save_vlm_checkpoint(
                    checkpoint,
                    identity=identity,
                    step=step + 1,
                    model={k: v for k, v in vlm.state_dict().items() if ".vision_tower." not in k},
                    optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(),
                    rng=torch.get_rng_state(),
                    drawn=dict(drawn),
                    curve1=curve1,
                    curve2=curve2,
                    history=history,
                )
    vlm.eval()
    return VLMResult(
        vlm,
        evaluate_vlm(vlm, tokenizer, test),
        evaluate_vlm(vlm, tokenizer, test, "mean_image"),
        history,
        curve1,
        curve2,
    )


# ---------------------------------------------------------------------------------------------------------------
# 4. Checks on the pair.


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
        point = "embed" if i == 0 else f"blocks.{i - 1}.hook_resid_post"
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


# ---------------------------------------------------------------------------------------------------------------
# 5. The whole organism: build, save, load.


class Organism(NamedTuple):
    tokenizer: PreTrainedTokenizerBase
    lm: LlamaForCausalLM
    vlm: LlavaForConditionalGeneration
    metrics: dict  # accuracies, tower probe accuracies, norm ratios, training curves, wall times


def build_organism(cfg: OrganismConfig = DEFAULT, progress: bool = True) -> Organism:
    """Train everything from scratch with `cfg.seed`; same seed and machine give identical weights."""
    torch.set_num_threads(cfg.num_threads)
    tokenizer = build_tokenizer()
    wall = {}
    t = time.perf_counter()
    lm_res = train_lm(cfg.lm, tokenizer, cfg.seed, progress)
    wall["lm"] = time.perf_counter() - t
    t = time.perf_counter()
    tower_res = train_tower(cfg.tower, cfg.seed, progress)
    wall["tower"] = time.perf_counter() - t
    t = time.perf_counter()
    vlm_res = train_vlm(cfg.vlm, lm_res.model, tower_res.model, cfg.tower, tokenizer, cfg.seed, progress)
    wall["vlm"] = time.perf_counter() - t
    norms = residual_norm_ratio(lm_res.model, vlm_res.model, tokenizer, eval_samples(cfg.seed + 1, 256))
    metrics = dict(
        config=cfg.to_dict(),
        wall_s=wall,
        lm_accuracy=lm_res.accuracy.to_dict("records"),
        lm_history=lm_res.history,
        lm_curve=lm_res.curve,
        tower_accuracy=tower_res.accuracy,
        tower_curve=tower_res.curve,
        vlm_accuracy=vlm_res.accuracy.to_dict("records"),
        vlm_accuracy_mean_image=vlm_res.accuracy_mean_image.to_dict("records"),
        vlm_history=vlm_res.history,
        vlm_curve_stage1=vlm_res.curve_stage1,
        vlm_curve_stage2=vlm_res.curve_stage2,
        residual_norms=norms.to_dict("records"),
    )
    return Organism(tokenizer, lm_res.model, vlm_res.model, metrics)


def save_organism(org: Organism, directory: str | Path) -> Path:
    """`directory/lm` and `directory/vlm` are standard HF model dirs (safetensors + tokenizer.json)."""
    directory = Path(directory)
    for name, model in (("lm", org.lm), ("vlm", org.vlm)):
        model.save_pretrained(directory / name)
        org.tokenizer.save_pretrained(directory / name)
    (directory / "metrics.json").write_text(json.dumps(org.metrics, indent=1))
    return directory


def load_organism(directory: str | Path) -> Organism:
    directory = Path(directory)
    missing = [p for p in ("lm/config.json", "vlm/config.json", "metrics.json") if not (directory / p).exists()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a saved organism: missing {missing} (see save_organism)")
    tokenizer = AutoTokenizer.from_pretrained(directory / "lm")
    lm = LlamaForCausalLM.from_pretrained(directory / "lm", attn_implementation="eager").eval()
    vlm = LlavaForConditionalGeneration.from_pretrained(directory / "vlm", attn_implementation="eager").eval()
    return Organism(tokenizer, lm, vlm, json.loads((directory / "metrics.json").read_text()))


def main(argv: list[str] | None = None) -> None:
    """`python -m lib.sources.organism OUT_DIR [tiny|default]`: train the organism with a fixed seed and save it."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("config", nargs="?", default="default", choices=["tiny", "default"])
    args = parser.parse_args(argv)
    org = build_organism({"tiny": TINY, "default": DEFAULT}[args.config])
    save_organism(org, args.out_dir)
    print(pd.DataFrame(org.metrics["vlm_accuracy"]).to_string(index=False))


if __name__ == "__main__":
    main()
