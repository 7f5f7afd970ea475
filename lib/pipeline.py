"""The pipeline, one function per step: profile -> world -> models -> activations -> SAEs -> feature table.

Each step names exactly the profile fields and upstream artifacts it depends on; the cache key is derived from
them (lib/cache.py), so a chapter that calls a step either reuses its artifact or rebuilds it and what follows.
Chapters call these functions; they never re-implement a step.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import world as W
from .cache import Artifact, Cache, load_table, save_table
from .profiles import Profile, settings

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
