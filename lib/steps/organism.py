"""The organism's steps: the world census, the base LM and the vision tower trained independently, the VLM from
both, and their held-out accuracy (`make organism` exports the three models to `artifacts/`: lib/steps/export.py).

Three model artifacts, so that a change to the VLM's settings retrains the VLM only, and a change to the LM's
retrains the LM and the VLM. None of them reads the [world] section: the organism generates its own training
streams at the world's fixed 48 px size (lib/io/profiles.py checks the profile agrees), so e.g. a larger census
must not retrain the models.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from lib.io.cache import Artifact, load_table, save_table
from lib.sources import world as W
from lib.steps.registry import step

# Splits of the generated world. Each is an independent random stream, so no scene is shared between splits.
CENSUS_SPLITS = {"train": tuple(W.QTYPES), "heldout": tuple(W.QTYPES), "bench": ("statement",)}
MODEL_STEPS = ("lm", "tower", "vlm")


def _pixels_agree(sample: W.Sample) -> bool:
    """Every object's colour is at the centre of its box in the rendered image, and nothing else is drawn."""
    img = sample.scene.render()
    for o in sample.scene.objects:
        x0, y0, x1, y1 = o.box
        if tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) != W.COLORS[o.color]:
            return False
    drawn = (img != np.array(W.BACKGROUND, dtype=np.uint8)).any(-1)
    inside = np.zeros_like(drawn)
    for o in sample.scene.objects:
        x0, y0, x1, y1 = o.box
        inside[y0 : y1 + 1, x0 : x1 + 1] = True
    return not (drawn & ~inside).any()


@step("world-census", reads=("seed", "world.n_census", "world.cell_px", "world.n_objects"))
def world_census(ctx) -> pd.DataFrame:
    """Regenerate `n_census` samples of every split and check each against its scene's ground truth."""
    P = ctx.P

    def build(out):
        rows = []
        for split, qtypes in CENSUS_SPLITS.items():
            for s in W.make_samples(P.seed, split, P.world.n_census, qtypes, P.world.cell_px, P.world.n_objects):
                rows.append(
                    dict(
                        split=split,
                        index=s.index,
                        qtype=s.qtype,
                        family=s.family,
                        question=s.question,
                        answer=s.answer,
                        keyword_spatial=s.spatial,
                        relation=s.relation,
                        n_objects=len(s.scene.objects),
                        answer_consistent=W.check_answer(s),
                        pixels_consistent=_pixels_agree(s),
                    )
                )
        save_table(out / "census.parquet", pd.DataFrame(rows))

    return load_table(ctx.cached(build) / "census.parquet")


def _save_model(out, model, tokenizer=None) -> None:
    # HF records the directory a model was loaded from; a cache path says nothing and differs between machines.
    for config in (
        model.config,
        getattr(model.config, "text_config", None),
        getattr(model.config, "vision_config", None),
    ):
        if config is not None:
            config._name_or_path = ""
    model.save_pretrained(out / "model")  # safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "model")


def _organism_only(ctx) -> None:
    if ctx.P.paper is not None:
        raise ValueError(f"profile {ctx.P.name!r} uses the paper's models: step {ctx.step.name!r} has no organism")


# The keys of these three are those of the committed artifacts (artifacts/PROVENANCE-*.json): their declared
# fields and versions must stay as they are, or the artifacts be re-keyed (see the README's layout section).
@step("lm", reads=("seed", "threads", "lm"), version=2)
def base_lm(ctx) -> Artifact:
    import torch

    from lib.sources.organism_training import train_lm
    from lib.sources.tokenizer import build_tokenizer

    _organism_only(ctx)
    P = ctx.P
    checkpoint = ctx.checkpoint()

    def build(out):
        torch.set_num_threads(P.threads)
        tokenizer = build_tokenizer()
        res = train_lm(P.lm, tokenizer, P.seed, checkpoint=checkpoint)
        _save_model(out, res.model, tokenizer)
        save_table(out / "accuracy.parquet", res.accuracy)
        checkpoint.unlink(missing_ok=True)
        return {"history": res.history, "curve": res.curve}

    return ctx.cached(build)


@step("tower", reads=("seed", "threads", "tower"), version=2)
def vision_tower(ctx) -> Artifact:
    import torch

    from lib.sources.organism_training import train_tower

    _organism_only(ctx)
    P = ctx.P

    def build(out):
        torch.set_num_threads(P.threads)
        res = train_tower(P.tower, P.seed)
        _save_model(out, res.model)  # the per-patch probes trained with it are not part of the tower
        return {"accuracy": res.accuracy, "curve": res.curve}

    return ctx.cached(build)


@step("vlm", after=("lm", "tower"), reads=("seed", "threads", "vlm", "tower"), version=3)  # 3: fresh scenes
def vlm(ctx) -> Artifact:
    """The VLM, fine-tuned from the base LM with the frozen tower (it reads the tower's layout). Resumable: a killed
    build restarts from its checkpoint in the cache directory (stage 2 is hours on a CPU)."""
    import torch
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    from lib.sources.organism_training import train_vlm

    _organism_only(ctx)
    P = ctx.P
    lm_art, tower_art = ctx.up("lm"), ctx.up("tower")
    checkpoint = ctx.checkpoint()

    def build(out):
        torch.set_num_threads(P.threads)
        tokenizer = AutoTokenizer.from_pretrained(lm_art / "model")
        lm = LlamaForCausalLM.from_pretrained(lm_art / "model")
        tower = CLIPVisionModel.from_pretrained(tower_art / "model")
        res = train_vlm(P.vlm, lm, tower, P.tower, tokenizer, P.seed, checkpoint=checkpoint)
        _save_model(out, res.model, tokenizer)
        save_table(out / "accuracy.parquet", res.accuracy)
        save_table(out / "accuracy_mean_image.parquet", res.accuracy_mean_image)
        checkpoint.unlink(missing_ok=True)
        return {"history": res.history, "curve_stage1": res.curve_stage1, "curve_stage2": res.curve_stage2}

    return ctx.cached(build)


class OrganismModels(NamedTuple):
    tokenizer: object
    lm: object  # LlamaForCausalLM, the base LM (before fine-tuning)
    vlm: object  # LlavaForConditionalGeneration (after)
    artifacts: dict[str, Artifact]


@step("organism", after=MODEL_STEPS, cached=False)
def organism(ctx) -> OrganismModels:
    """The trained pair, loaded from the cache (trained first if needed)."""
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    _organism_only(ctx)
    arts = {name: ctx.up(name) for name in MODEL_STEPS}
    tokenizer = AutoTokenizer.from_pretrained(arts["vlm"] / "model")
    lm = LlamaForCausalLM.from_pretrained(arts["lm"] / "model").eval()
    model = LlavaForConditionalGeneration.from_pretrained(arts["vlm"] / "model").eval()
    return OrganismModels(tokenizer, lm, model, arts)


def training_seconds(artifacts: dict) -> dict[str, float]:
    """Wall seconds of each training stage of an organism (its artifacts by step name): the training loops' own
    clocks, recorded in each curve, which a resumed run carries on (an artifact's build time restarts with the
    session that finished it); evaluation at the end and saving excluded. Stage 1 and 2 are 0 when skipped."""
    from lib.io.cache import load_json

    info = {name: load_json(artifacts[name] / "info.json") for name in MODEL_STEPS}

    def last(curve):
        return float(curve[-1][2]) if curve else 0.0

    return {
        "lm": last(info["lm"]["curve"]),
        "tower": last(info["tower"]["curve"]),
        "vlm_stage1": last(info["vlm"]["curve_stage1"]),
        "vlm_stage2": last(info["vlm"]["curve_stage2"]),
    }


def committed_training_seconds() -> pd.DataFrame:
    """`training_seconds` of every committed organism (seed 0 of each profile: artifacts/PROVENANCE-<profile>.json),
    one row per profile with the stages and their total: how long each recipe took on the CPU that ran `make
    organism`, read from the committed files (nothing is trained or loaded)."""
    from lib.io.cache import COMMITTED, load_json

    rows = []
    for path in sorted(COMMITTED.glob("PROVENANCE-*.json")):
        profile = path.stem.removeprefix("PROVENANCE-")
        if "-seed" in profile:
            continue
        provenance = load_json(path)
        seconds = training_seconds({name: COMMITTED / provenance[name]["artifact"] for name in MODEL_STEPS})
        rows.append({"profile": profile, **{f"{k}_s": v for k, v in seconds.items()}, "total_s": sum(seconds.values())})
    return pd.DataFrame(rows)


N_PRIOR = 20_000  # questions the text-only guess learns from (at most 48 texts per type: about 45 samples each)


@step("heldout-accuracy", after=("organism",), reads=("seed", "threads", "world.n_heldout"), version=2)
def heldout_accuracy(ctx) -> pd.DataFrame:
    """Held-out accuracy per question type on `world.n_heldout` samples (the training runs' own tables score 100 per
    type, too few to tell 0.93 from 0.95): base LM on captions, VLM on images and with the mean image embedding,
    beside two chance levels: the majority answer and the best guess from the question's text
    (`lib.sources.organism.question_prior`). Version 2 added the second."""
    import torch

    from lib.sources import organism as O

    P, m = ctx.P, ctx.up("organism")

    def build(out):
        torch.set_num_threads(P.threads)
        samples = O.eval_samples(P.seed + 1, P.world.n_heldout)  # the training runs' held-out split, extended
        lm = O.evaluate_lm(m.lm, m.tokenizer, samples)
        tables = {
            "lm_text": lm,
            "vlm_image": O.evaluate_vlm(m.vlm, m.tokenizer, samples),
            "vlm_mean_image": O.evaluate_vlm(m.vlm, m.tokenizer, samples, corrupt="mean_image"),
        }
        table = lm[["qtype", "family", "n", "majority"]].copy()
        prior = O.question_prior(samples, W.make_samples(P.seed + 1, "prior", N_PRIOR))
        table.insert(4, "question_prior", prior.reindex(table.qtype).to_numpy())
        for name, t in tables.items():
            table[name] = t.set_index("qtype").accuracy.reindex(table.qtype).to_numpy()
        save_table(out / "table.parquet", table)

    return load_table(ctx.cached(build) / "table.parquet")
