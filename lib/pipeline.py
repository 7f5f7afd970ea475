"""The pipeline, one function per step: profile -> world -> models -> activations -> SAEs -> feature table.

Each step names exactly the profile fields and upstream artifacts it depends on; the cache key is derived from
them (lib/cache.py), so a chapter that calls a step either reuses its artifact or rebuilds it and what follows.
Chapters call these functions; they never re-implement a step.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from . import world as W
from .cache import Artifact, Cache, load_table, save_table
from .profiles import Profile, load_profile, settings

# Splits of the generated world. Each is an independent random stream, so no scene is shared between splits.
CENSUS_SPLITS = {"train": tuple(W.QTYPES), "heldout": tuple(W.QTYPES), "bench": ("statement",)}


def world_settings(P: Profile) -> dict:
    return {"seed": P.seed, "world": settings(P.world)}


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


def world_census(P: Profile, cache: Cache) -> tuple[pd.DataFrame, Artifact]:
    """Regenerate `n_census` samples of every split and check each against its scene's ground truth."""

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

    art = cache.get("world-census", world_settings(P), build, version=1)
    return load_table(art / "census.parquet"), art


# ---------------------------------------------------------------------------------------------------------------
# The organism: base LM and vision tower trained independently, the VLM from both. Three artifacts, so that a
# change to the VLM's settings retrains the VLM only, and a change to the LM's retrains the LM and the VLM.


class OrganismModels(NamedTuple):
    tokenizer: object
    lm: object  # LlamaForCausalLM, the base LM (before fine-tuning)
    vlm: object  # LlavaForConditionalGeneration (after)
    artifacts: dict[str, Artifact]


def _organism_settings(P: Profile, section: str) -> dict:
    return {"seed": P.seed, "threads": P.threads, **world_settings(P), section: settings(getattr(P, section))}


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


def base_lm(P: Profile, cache: Cache) -> Artifact:
    from . import organism as O

    def build(out):
        torch.set_num_threads(P.threads)
        tokenizer = O.build_tokenizer()
        res = O.train_lm(P.lm, tokenizer, P.seed)
        _save_model(out, res.model, tokenizer)
        save_table(out / "accuracy.parquet", res.accuracy)
        return {"history": res.history, "curve": res.curve}

    return cache.get("lm", _organism_settings(P, "lm"), build, version=1)


def vision_tower(P: Profile, cache: Cache) -> Artifact:
    from . import organism as O

    def build(out):
        torch.set_num_threads(P.threads)
        res = O.train_tower(P.tower, P.seed)
        _save_model(out, res.model)  # the per-patch probes trained with it are not part of the tower
        return {"accuracy": res.accuracy, "curve": res.curve}

    return cache.get("tower", _organism_settings(P, "tower"), build, version=1)


def vlm(P: Profile, cache: Cache, lm_art: Artifact | None = None, tower_art: Artifact | None = None) -> Artifact:
    """The VLM, fine-tuned from the base LM with the frozen tower (either artifact is looked up if not given)."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    from . import organism as O

    lm_art = lm_art or base_lm(P, cache)
    tower_art = tower_art or vision_tower(P, cache)
    settings_ = {**_organism_settings(P, "vlm"), "tower": settings(P.tower)}  # the VLM reads the tower's layout

    def build(out):
        torch.set_num_threads(P.threads)
        tokenizer = AutoTokenizer.from_pretrained(lm_art / "model")
        lm = LlamaForCausalLM.from_pretrained(lm_art / "model")
        tower = CLIPVisionModel.from_pretrained(tower_art / "model")
        res = O.train_vlm(P.vlm, lm, tower, P.tower, tokenizer, P.seed)
        _save_model(out, res.model, tokenizer)
        save_table(out / "accuracy.parquet", res.accuracy)
        save_table(out / "accuracy_mean_image.parquet", res.accuracy_mean_image)
        return {"history": res.history, "curve_stage1": res.curve_stage1, "curve_stage2": res.curve_stage2}

    return cache.get("vlm", settings_, build, deps=[lm_art, tower_art], version=1)


def organism(P: Profile, cache: Cache) -> OrganismModels:
    """The trained pair, loaded from the cache (trained first if needed)."""
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    arts = {"lm": base_lm(P, cache), "tower": vision_tower(P, cache)}
    arts["vlm"] = vlm(P, cache, arts["lm"], arts["tower"])
    tokenizer = AutoTokenizer.from_pretrained(arts["vlm"] / "model")
    lm = LlamaForCausalLM.from_pretrained(arts["lm"] / "model").eval()
    model = LlavaForConditionalGeneration.from_pretrained(arts["vlm"] / "model").eval()
    return OrganismModels(tokenizer, lm, model, arts)


# ---------------------------------------------------------------------------------------------------------------
# `make organism`: train the organism of a profile on this CPU and commit it as versioned artifacts.

ORGANISM_STEPS = ("lm", "tower", "vlm")


def export_organism(profile: str, store: Path, verify: bool = False) -> int:
    """Train (or reuse from the local cache) the organism of `profile` and copy its three artifacts into `store`
    with a PROVENANCE.json (command, seed, threads, code commit, versions, checksums). With `verify`, retrain from
    scratch in a temporary cache instead and compare every file's checksum with the committed artifacts."""
    import json
    import platform
    import shutil
    import subprocess
    import sys
    import tempfile

    import transformers

    from .cache import MANIFEST, load_json

    P = load_profile(profile)
    if P.lm is None:
        raise SystemExit(f"profile {profile!r} has no organism ([lm], [tower], [vlm] sections)")
    if verify:
        with tempfile.TemporaryDirectory() as tmp:
            arts = organism(P, Cache(tmp, stores=())).artifacts
            bad = []
            for name in ORGANISM_STEPS:
                ours, committed = load_json(arts[name] / MANIFEST), store / arts[name].path.name / MANIFEST
                if not committed.exists():
                    bad.append(f"{name}: no committed artifact {committed.parent} (settings or code changed?)")
                    continue
                theirs = load_json(committed)["files"]
                # Weights and result tables must be equal bit for bit; info.json holds wall-clock times.
                differ = [f for f, meta in ours["files"].items() if f != "info.json" and theirs.get(f) != meta]
                if differ:
                    bad.append(f"{name}: retrained {', '.join(differ)} differ from {committed.parent}")
            print("\n".join(bad) or f"organism of {profile!r}: retrained bit for bit equal to {store}/")
            return 1 if bad else 0
    arts = organism(P, Cache(stores=())).artifacts
    store.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "lib"], capture_output=True, text=True).stdout)
    provenance = {}
    for name in ORGANISM_STEPS:
        target = store / arts[name].path.name
        if not target.exists():
            shutil.copytree(arts[name].path, target)
        manifest = load_json(target / MANIFEST)
        provenance[name] = {
            "artifact": target.name,
            "key": arts[name].key,
            "build_s": manifest["build_s"],
            "files": manifest["files"],
        }
    provenance["made_by"] = {
        "command": " ".join([Path(sys.executable).name, "-m", "lib.pipeline", *sys.argv[1:]]),
        "profile": profile,
        "seed": P.seed,
        "threads": P.threads,
        "code_commit": commit + (" (lib/ had uncommitted changes)" if dirty else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
    }
    (store / f"PROVENANCE-{profile}.json").write_text(json.dumps(provenance, indent=1, sort_keys=True))
    print(
        f"organism of {profile!r} exported to {store}/ ({', '.join(provenance[n]['artifact'] for n in ORGANISM_STEPS)})"
    )
    return 0


if __name__ == "__main__":
    import argparse

    from .cache import COMMITTED

    parser = argparse.ArgumentParser(prog="python -m lib.pipeline", description="Build and export pipeline steps.")
    parser.add_argument("step", choices=["organism"])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--store", type=Path, default=COMMITTED)
    parser.add_argument("--verify", action="store_true", help="retrain from scratch and compare with the store")
    args = parser.parse_args()
    raise SystemExit(export_organism(args.profile, args.store, args.verify))
