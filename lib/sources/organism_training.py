"""Training the model organism (lib/sources/organism.py), as LLaVA trains its models:

1. Base LM, on `<bos> lm_prompt(caption, question) answer <eos>`; the caption states every object's position in
   words, so the LM learns to compare positions stated in text before it ever sees an image.
2. Vision tower, pretrained here on the world's images with per-patch heads that keep both content (colour,
   shape) and position (the object's grid row/col, the patch's own row/col) in every patch token; frozen after.
3. VLM stage 1: projector only, on captions ("describe the image ." -> caption with positions), so the projector
   learns to write the positional code the LM already reads.
4. VLM stage 2: projector + LM on questions about images, loss on answer tokens only, LM learning rate lower than
   the projector's (a full-rate LM fine-tune blows up residual norms and breaks the later SAE diffing), with a
   curriculum from single-object scenes to the full mix.

Each function takes its section of a profile (`load_profile(name).lm`, `.tower`, `.vlm`) and the profile's seed;
with the same seed and thread count (`torch.set_num_threads(profile.threads)`) it gives the same weights bit for bit.
The frozen tower runs without gradients in stage 2 (`image_features`).

Key to tensor suffixes: as in lib/sources/organism.py (b batch, s sequence position, v vocabulary, p image patches,
h tower width, k classes of a head).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

from lib.sources import world
from lib.sources.organism import (
    CAPTION_PROMPTS,
    IMAGE_SIZE,
    LMConfig,
    TextBatch,
    TowerConfig,
    VLMConfig,
    encode,
    eval_samples,
    evaluate_lm,
    evaluate_vlm,
    image_features,
    lm_batch,
    make_lm,
    make_tower,
    make_vlm,
    pixel_values_from_images,
    tower_features,
    vlm_forward,
    vlm_text,
)

CAPTION_PROMPT = CAPTION_PROMPTS["describe"][0]  # the caption instruction (LLaVA's "describe the image briefly")
NON_RELATIONAL = tuple(q for q, fam in world.QTYPES.items() if fam != "relational")  # hostable by one object

Curve = list[tuple[int, float, float]]  # (step, loss, wall seconds since the start of the loop)


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
    ce_bs, w_bs = _ce_terms(logits_bsv, batch, context_weight, answer_weight)
    if per_sample:
        return (ce_bs.sum(1) / w_bs.sum(1)).mean()
    return ce_bs.sum() / w_bs.sum()


def _ce_terms(logits_bsv, batch: TextBatch, context_weight: float, answer_weight: float):
    """Per target token: the weighted cross-entropy and its weight (both (B, S - 1))."""
    target_bs = batch.input_ids_bs[:, 1:]
    ce_bs = F.cross_entropy(logits_bsv[:, :-1].flatten(0, 1), target_bs.flatten(), reduction="none")
    w_bs = (context_weight * batch.attention_mask_bs[:, 1:] + answer_weight * batch.target_mask_bs[:, 1:]).float()
    return ce_bs.view_as(w_bs) * w_bs, w_bs


def length_buckets(lengths: list[int], k: int) -> list[list[int]]:
    """The batch's rows in at most `k` groups of similar length (contiguous in length order), chosen to minimise the
    padded token slots, the sum over groups of size x longest length (dynamic programming over the cut points)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n, sorted_len = len(order), [lengths[i] for i in order]
    # best[b][j]: fewest slots for the j shortest rows in b groups; cut[b][j]: where the last group starts
    best = [[0] + [float("inf")] * n] + [[float("inf")] * (n + 1) for _ in range(k)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    for b in range(1, k + 1):
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[b - 1][i] + (j - i) * sorted_len[j - 1]
                if cost < best[b][j]:
                    best[b][j], cut[b][j] = cost, i
    b = min(range(1, k + 1), key=lambda b: (best[b][n], b))
    groups, j = [], n
    while j > 0:
        i = cut[b][j]
        groups.append(order[i:j])
        j, b = i, b - 1
    return groups[::-1]


def bucketed_ce(
    forward: Callable[[torch.Tensor, TextBatch], torch.Tensor],
    batch: TextBatch,
    context_weight: float,
    answer_weight: float,
    per_sample: bool = False,
    k: int = 1,
) -> torch.Tensor:
    """`_weighted_ce` of the whole batch, with the forward run on `k` sub-batches of similar length, each trimmed of
    the padding its rows do not need (`forward(rows, sub_batch) -> logits`). The same loss up to float rounding, on
    fewer token slots: a stage-2 batch mixes one-word answers with captions three times longer, and padding all of
    it to the longest caption doubled the step (issue 20). Right padding makes the trim exact: every real token
    keeps its position. `k` = 1 is the whole batch, one forward, the exact computation of the trainers before."""
    if k == 1:
        return _weighted_ce(forward(torch.arange(len(batch.input_ids_bs)), batch), batch, context_weight,
                            answer_weight, per_sample)  # fmt: skip
    lengths = batch.attention_mask_bs.sum(1).tolist()
    ce_sum, w_sum = 0.0, 0.0
    for group in length_buckets(lengths, k):
        rows = torch.tensor(group)
        sub = TextBatch(*(t[rows, : max(lengths[i] for i in group)] for t in batch))
        ce_bs, w_bs = _ce_terms(forward(rows, sub), sub, context_weight, answer_weight)
        if per_sample:
            ce_sum = ce_sum + (ce_bs.sum(1) / w_bs.sum(1)).sum()
        else:
            ce_sum, w_sum = ce_sum + ce_bs.sum(), w_sum + w_bs.sum()
    return ce_sum / len(lengths) if per_sample else ce_sum / w_sum


def _mix(seed: int, split: str, n: int, single_frac: float, start: int) -> list[world.Sample]:
    """`n` samples: all question types on 2-3 objects, plus a `single_frac` share of one-object scenes
    (non-relational types only: a relation needs two objects)."""
    n1 = round(single_frac * n)
    multi = world.make_samples(seed, split, n - n1, start=start)
    single = world.make_samples(seed, f"{split}-single", n1, qtypes=NON_RELATIONAL, n_objects=(1,), start=start)
    return multi + single


# ---------------------------------------------------------------------------------------------------------------
# 1. Base LM.


class LMResult(NamedTuple):
    model: LlamaForCausalLM
    accuracy: pd.DataFrame  # final held-out accuracy per question type
    history: list[tuple[int, dict[str, float]]]  # (step, accuracy per qtype) every eval_every steps
    curve: Curve


def train_lm(
    cfg: LMConfig, tokenizer, seed: int = 0, progress: bool = True, checkpoint: str | Path | None = None
) -> LMResult:
    """The base LM on captions and questions (module docstring). With `checkpoint`, the training state is written
    there at every held-out evaluation, and a run that finds the file resumes from it and ends with the same weights
    bit for bit (each step's batch is drawn from its step number, so nothing else needs restoring)."""
    torch.manual_seed(seed)
    model = make_lm(cfg, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = _schedule(opt, cfg.warmup, cfg.steps)
    test = eval_samples(seed + 1, cfg.n_eval)
    curve, history, start = [], [], 0
    identity = {"config": asdict(cfg), "seed": seed}
    state = _load_checkpoint(checkpoint, identity) if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"]), sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        curve, history, start = state["curve"], state["history"], state["step"]
        if progress:
            tqdm.write(f"base LM: resuming at step {start} from {checkpoint}")
    t0 = time.perf_counter() - (curve[-1][2] if curve else 0.0)  # wall times run on across a resume
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="base LM", disable=not progress,
               mininterval=5)  # fmt: skip
    for step in bar:
        frac = cfg.single_object_frac if step < cfg.single_object_steps else cfg.single_object_frac / 5
        batch = lm_batch(tokenizer, _mix(seed, "lm-train", cfg.batch_size, frac, start=step * cfg.batch_size))
        loss = bucketed_ce(
            lambda rows, sub: model(input_ids=sub.input_ids_bs, attention_mask=sub.attention_mask_bs).logits,
            batch, cfg.context_weight, cfg.answer_weight, k=cfg.length_buckets,
        )  # fmt: skip
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
            if checkpoint is not None and step + 1 < cfg.steps:
                _save_checkpoint(
                    checkpoint, identity=identity, step=step + 1, model=model.state_dict(),
                    optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=torch.get_rng_state(),
                    curve=curve, history=history,
                )  # fmt: skip
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
        loss, _ = _head_loss_acc(heads, tower_features(tower, x_train[i_b], cfg.feature_layer), y_train[i_b])
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        curve.append((step, loss.item(), time.perf_counter() - t0))
    tower.eval().requires_grad_(False)
    with torch.no_grad():
        x_test = pixel_values_from_images(np.stack([s.scene.render() for s in test]))
        feat_bph, lab_bkp = tower_features(tower, x_test, cfg.feature_layer), patch_labels(test, cfg.patch)
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


class VLMResult(NamedTuple):
    model: LlavaForConditionalGeneration
    accuracy: pd.DataFrame  # held-out, clean images
    accuracy_mean_image: pd.DataFrame  # held-out, every image embedding replaced by the mean image embedding
    history: list[tuple[int, dict[str, float]]]
    curve_stage1: Curve
    curve_stage2: Curve


def _save_checkpoint(path: str | Path, **state) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a run killed while writing leaves the previous checkpoint intact


def _load_checkpoint(path: str | Path, identity: dict) -> dict | None:
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
    # Samples drawn so far from each training stream, and caption instructions given (resumed with the checkpoint).
    drawn = dict.fromkeys(("caption", "multi", "single", "instructions"), 0)

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

    def instruction() -> str:
        """The next caption instruction: the profile's instructions in turn, counted over the whole run."""
        prompts = CAPTION_PROMPTS[cfg.caption_prompts]
        drawn["instructions"] += 1
        return prompts[(drawn["instructions"] - 1) % len(prompts)]

    def step_on(samples, answers, questions, weights, per_sample=False):
        batch = encode(tokenizer, [vlm_text(q, n_img) for q in questions(samples)], answers(samples))
        features = image_features(vlm, samples)
        return bucketed_ce(
            lambda rows, sub: vlm_forward(vlm, sub, projector(features[rows])).logits,
            batch, *weights, per_sample=per_sample, k=cfg.length_buckets,
        )  # fmt: skip

    identity = {"config": asdict(cfg), "tower": asdict(tower_cfg), "seed": seed}
    state = _load_checkpoint(checkpoint, identity) if checkpoint is not None else None
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
            lambda ss: [instruction() for _ in ss],
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
            lambda ss, is_cap=is_cap: [instruction() if c else s.question for s, c in zip(ss, is_cap, strict=True)],
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
                _save_checkpoint(
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
