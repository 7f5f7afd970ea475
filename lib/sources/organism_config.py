"""The organism's configs: the `[lm]`, `[tower]` and `[vlm]` sections of a profile, frozen dataclasses that validate
themselves (small and full runs differ only in these values), and the constants they check against. Plain Python,
no torch: lib/io/profiles.py reads a profile with them. The models they configure are lib/sources/organism.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from lib.sources import world

IMAGE_SIZE = world.GRID * 16  # the world's default 16 px cells
PATCH = 8
# VLMConfig.caption_prompts: "describe the image ." alone, or the lexical filter's direction-free prompts (so that
# the filter asks the VLM what it was trained on).
CAPTION_PROMPTS = {"describe": ("describe the image .",), "generic": world.GENERIC_PROMPTS}


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
    # Each step's forward on this many sub-batches of similar length, each padded to its own longest (the same
    # loss, fewer padded tokens: lib.sources.organism_training.bucketed_ce). 1: the whole batch padded to its
    # longest, as the trainer did before; "added": out of the cache key at 1, so v1's organism keeps its key.
    length_buckets: int = field(default=1, metadata={"added": True})

    def __post_init__(self):
        _check(self.d_model == self.n_heads * self.head_dim, self, "d_model must equal n_heads * head_dim")
        _check(self.length_buckets >= 1, self, "length_buckets must be >= 1")
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
    # The instructions answered by the caption, in turn (CAPTION_PROMPTS). "added": out of the cache key at its
    # default, so the committed organism keeps its key (lib/io/profiles.settings).
    caption_prompts: str = field(default="describe", metadata={"added": True})
    length_buckets: int = field(default=1, metadata={"added": True})  # as LMConfig's

    def __post_init__(self):
        _check(self.length_buckets >= 1, self, "length_buckets must be >= 1")
        _check(self.caption_prompts in CAPTION_PROMPTS, self, f"caption_prompts must be one of {list(CAPTION_PROMPTS)}")
        _check(0 <= self.caption_frac < 1, self, "caption_frac must lie in [0, 1)")
        _check(self.lm_lr <= self.projector_lr, self, "lm_lr must not exceed projector_lr (LLaVA's recipe)")
        _check(min(self.batch_size, self.n_eval) > 0, self, "batch_size, n_eval > 0")
        _check(self.stage1_steps >= 0 and self.stage2_steps >= 0, self, "stage steps must be >= 0")
        _check(0 <= self.single_object_frac <= 1, self, "single_object_frac must lie in [0, 1]")
