"""Findings across seeds (lib/steps/seeds.py) on the tiny profile: each seed is its own pipeline, from its own
organism; every chapter's row is computed from that seed's steps and the spread from the seeds' rows; a seed's
committed row is read without building its pipeline."""

from __future__ import annotations

import dataclasses

import pytest

from lib.io.cache import Cache, load_json
from lib.io.profiles import load_profile
from lib.steps.export import export_findings, export_organism
from lib.steps.seeds import LABELS, NUMBERS, across_seeds
from lib.steps.study import Study


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    P = load_profile("tiny")
    P = dataclasses.replace(P, referee=dataclasses.replace(P.referee, seeds=(0, 1)))
    root = tmp_path_factory.mktemp("seeds")
    S = Study(P, Cache(root / "cache"))
    return S, {chapter: across_seeds(S, chapter) for chapter in NUMBERS}, root


def test_two_seeds_are_two_pipelines_and_the_spread_is_theirs(two_seeds):
    S, found, _ = two_seeds
    other = S.with_seed(1)
    assert S.with_seed(0) is S and other.P.seed == 1 and other.cache is S.cache
    changed = {n for n in S.keys if S.keys[n] != other.keys[n]}
    assert {"lm", "vlm", *(f"seeds-{c}" for c in NUMBERS)} <= changed and "world-census" in changed
    for chapter, (rows, spread) in found.items():
        assert list(rows.seed) == [0, 1] and list(spread.number) == list(NUMBERS[chapter])
        assert set(rows.columns) == {"seed", *NUMBERS[chapter], *LABELS[chapter]}
        for number in NUMBERS[chapter]:
            values = rows[number].astype(float)
            got = spread.set_index("number").loc[number]
            assert (got["mean"], got["min"], got["max"]) == pytest.approx(
                (values.mean(), values.min(), values.max()), nan_ok=True
            )
    truth = found["ground-truth"][0]
    assert (truth.found <= truth.final).all() and (truth.found <= truth.reference).all()
    assert truth.best_head.str.fullmatch(r"L\d+H\d+").all()
    assert found["probing"][0].final.equals(truth.final)  # the referee judges chapter 5's final set


def test_each_seed_row_is_that_seeds_own_numbers(two_seeds):
    S, found, _ = two_seeds
    for seed in (0, 1):
        study = S.with_seed(seed)
        table = study.selection.table
        row = found["diffing"][0].set_index("seed").loc[seed]
        assert row.adapted == int(table.adapted.sum())
        acc = study.heldout_accuracy.set_index("qtype")
        assert found["accuracy"][0].set_index("seed").loc[seed, "vlm:where"] == acc.loc["where", "vlm_image"]


def test_a_committed_seed_row_is_read_without_its_pipeline(two_seeds, monkeypatch):
    """`make seed`: seed 1's organism and findings rows are exported with their provenance; a fresh cache over
    that store reads every row and builds nothing."""
    S, found, root = two_seeds
    store = root / "store"
    monkeypatch.setenv("SPATIAL_CACHE", str(root / "cache"))  # seed 1's pipeline is there already: reused
    assert export_organism("tiny", store, seed=1) == 0 and export_findings("tiny", store, seed=1) == 0
    provenance = load_json(store / "PROVENANCE-tiny-seed1.json")
    assert provenance["made_by"]["seed"] == 1 and set(provenance["findings"]) == set(NUMBERS)
    for chapter, entry in provenance["findings"].items():
        assert entry["artifact"] == S.cache.path(f"seeds-{chapter}", S.with_seed(1).keys[f"seeds-{chapter}"]).name
    fresh = Study(S.P, Cache(root / "fresh", stores=(store,))).with_seed(1)
    for chapter in NUMBERS:
        row = fresh.run(f"seeds-{chapter}")
        assert row.equals(found[chapter][0].iloc[[1]].reset_index(drop=True)), chapter
    assert not any((root / "fresh").iterdir()), "a step of seed 1 was built to read its committed rows"
