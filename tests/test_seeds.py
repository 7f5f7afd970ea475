"""Findings across seeds (lib/steps/seeds.py) on the tiny profile: each seed is its own pipeline, from its own
organism, and the summary's spread is computed from the seeds' rows."""

from __future__ import annotations

import dataclasses

import pytest

from lib.io.cache import Cache
from lib.io.profiles import load_profile
from lib.steps.seeds import NUMBERS, across_seeds
from lib.steps.study import Study


def test_two_seeds_are_two_pipelines_and_the_spread_is_theirs(tmp_path):
    P = load_profile("tiny")
    P = dataclasses.replace(P, referee=dataclasses.replace(P.referee, seeds=(0, 1)))
    S = Study(P, Cache(tmp_path))
    other = S.with_seed(1)
    assert S.with_seed(0) is S and other.P.seed == 1 and other.cache is S.cache
    assert {"lm", "vlm", "seed-summary"} <= {n for n in S.keys if S.keys[n] != other.keys[n]}
    assert S.keys["world-census"] != other.keys["world-census"]
    rows, spread = across_seeds(S)
    assert list(rows.seed) == [0, 1] and list(spread.number) == list(NUMBERS)
    for number in NUMBERS:
        values = rows[number].astype(float)
        got = spread.set_index("number").loc[number]
        assert (got["mean"], got["min"], got["max"]) == pytest.approx(
            (values.mean(), values.min(), values.max()), nan_ok=True
        )
    assert (rows.found <= rows.final).all() and (rows.found <= rows.reference).all()
    assert rows.best_head.str.fullmatch(r"L\d+H\d+").all()
    again, _ = across_seeds(Study(P, Cache(tmp_path)))  # a second look reads both seeds' summaries from the cache
    assert again.equals(rows)
