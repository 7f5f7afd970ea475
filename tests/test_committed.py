"""The committed artifacts (artifacts/): every profile's organism and every extra seed's findings rows still resolve
under today's keys with the checksums they were committed with (otherwise the book would train them again), a
sample of the extra seeds' rows is recomputed from their committed organisms, and chapter 2's table of training
times covers every committed organism."""

import dataclasses
import json

import pytest

from lib.io.cache import COMMITTED, Cache
from lib.io.profiles import load_profile
from lib.steps.organism import MODEL_STEPS, committed_training_seconds
from lib.steps.registry import step_keys
from lib.steps.seeds import NUMBERS
from lib.steps.study import Study

PROVENANCE = {p.stem.removeprefix("PROVENANCE-"): p for p in sorted(COMMITTED.glob("PROVENANCE-*.json"))}
PROFILES = [name for name in PROVENANCE if "-seed" not in name]  # seed 0 of a profile keeps the profile's name
# (profile, seed) for each seed a profile's book reports beside its own (`referee.seeds`), read from artifacts/
EXTRA_SEEDS = [(p, s) for p in PROFILES for s in load_profile(p).referee.seeds if s != load_profile(p).seed]
SAMPLE = [(p, s) for p, s in EXTRA_SEEDS if s == max(t for q, t in EXTRA_SEEDS if q == p)]  # one per profile


@pytest.mark.parametrize("profile", PROFILES)
def test_the_committed_organism_resolves_under_its_profile(profile):
    keys = step_keys(load_profile(profile))
    provenance = json.loads(PROVENANCE[profile].read_text())
    for name in MODEL_STEPS:
        assert provenance[name]["key"] == keys[name], f"{name}: the committed artifact no longer resolves"
        assert (COMMITTED / f"{name}-{keys[name][:16]}" / "MANIFEST.json").exists()
        Cache(stores=()).verify(COMMITTED / provenance[name]["artifact"])  # checksums as committed


@pytest.mark.parametrize("profile, seed", EXTRA_SEEDS)
def test_every_extra_seed_is_committed_down_to_its_findings(profile, seed):
    """CI runs only the profile's own seed's pipeline, so each other seed's organism and findings rows (`make seed
    SEED=n`) must be committed and resolve under today's keys: otherwise CI would train that organism or run its
    pipeline."""
    keys = step_keys(dataclasses.replace(load_profile(profile), seed=seed))
    provenance = json.loads(PROVENANCE[f"{profile}-seed{seed}"].read_text())
    wanted = {name: f"{name}-{keys[name][:16]}" for name in MODEL_STEPS}
    wanted |= {f"seeds-{c}": f"seeds-{c}-{keys[f'seeds-{c}'][:16]}" for c in NUMBERS}
    committed = {name: provenance[name]["artifact"] for name in MODEL_STEPS}
    committed |= {f"seeds-{c}": entry["artifact"] for c, entry in provenance.get("findings", {}).items()}
    assert committed == wanted, f"seed {seed}: committed artifacts no longer resolve (re-export: make seed)"
    for artifact in committed.values():
        Cache(stores=()).verify(COMMITTED / artifact)


@pytest.mark.parametrize("profile, seed", SAMPLE)
def test_an_extra_seeds_accuracy_row_is_what_its_committed_organism_scores(profile, seed, tmp_path):
    """The sample CI recomputes (one seed per profile, about a minute): chapter 2's held-out accuracy of the
    committed organism, scored afresh, equals the committed findings row the book reads for that seed."""
    S = Study(dataclasses.replace(load_profile(profile), seed=seed), Cache(tmp_path, stores=(COMMITTED,)))
    row = S.run("seeds-accuracy").iloc[0]  # read from artifacts/
    accuracy = S.heldout_accuracy.set_index("qtype")  # scored here, from the committed organism
    assert not (tmp_path / S.cache.path("vlm", S.keys["vlm"]).name).exists(), "the organism was trained again"
    for model, column in (("lm", "lm_text"), ("vlm", "vlm_image")):
        for qtype, value in accuracy[column].items():
            assert row[f"{model}:{qtype}"] == value, f"seed {seed} {model}:{qtype}"


def test_the_committed_training_times_cover_every_committed_organism():
    """Chapter 2 compares this organism's training time with every committed one's: each profile's seed-0
    provenance file is a row, and its stages add up to its total."""
    table = committed_training_seconds().set_index("profile")
    assert sorted(table.index) == sorted(PROFILES) and len(table) >= 2
    stages = table[[c for c in table.columns if c != "total_s"]]
    assert (stages > 0).all().all() and (stages.sum(axis=1) - table.total_s).abs().max() < 1e-6
