"""The one entry point chapters use: `S = Study(profile)`, then `S.adapted_saes`, `S.features`, `S.head_scores`, ...

Each attribute runs its step (lib/steps/registry.py) once per Study: reused from the artifact cache when its key
is there, built otherwise, after the steps it follows. `S.report()` prints what this Study reused and computed,
once, as a short summary (the cache itself prints nothing per lookup).
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path

from lib.io.cache import Artifact, Cache
from lib.io.profiles import Profile, load_profile
from lib.steps.registry import STEPS, ProfileView, declared_settings, step_keys


class Context:
    """What a step's function gets: the profile view (`P`), its key, the results of the steps it follows (`up`),
    the data (`data`, read through the view) and `cached(build)` to reuse or build its artifact."""

    def __init__(self, study: Study, name: str):
        self.study, self.step = study, STEPS[name]
        self.P = ProfileView(study.P, self.step.reads + self.step.runs_with, name)
        self.key = study.keys[name]

    def up(self, name: str):
        if name not in self.step.after:
            raise KeyError(f"step {self.step.name!r} uses step {name!r} but does not follow it (after=...)")
        return self.study.run(name)

    @cached_property
    def data(self):
        from lib.steps.data import Data

        return Data(self.P, self.study)

    def cached(self, build, name: str | None = None) -> Artifact:
        """The step's artifact (`build(tmp_dir)` writes it when the key is not in the cache)."""
        s = self.step
        return self.study.cache.get(
            name or s.name,
            declared_settings(self.study.P, s.reads),
            build,
            deps={a: self.study.keys[a] for a in s.after},
            key=self.key,
            version=s.version,
        )

    def checkpoint(self) -> Path:
        """Where a resumable build of this step keeps its checkpoint."""
        return self.study.cache.checkpoint_path(self.step.name, self.key)


class Study:
    """The pipeline of one profile. Attributes are the steps' results, computed on first use."""

    def __init__(self, profile: str | Path | Profile = "default", cache: Cache | None = None):
        self.P = profile if isinstance(profile, Profile) else load_profile(profile)
        self.cache = cache if cache is not None else Cache()
        self.keys = step_keys(self.P)
        self._results: dict[str, object] = {}
        self._memo: dict = {}  # shared inputs (world samples, the paper's datasets), keyed by what they read

    def run(self, name: str):
        if name not in self._results:
            self._results[name] = STEPS[name].fn(Context(self, name))
        return self._results[name]

    def with_seed(self, seed: int) -> Study:
        """The same pipeline with another seed (its own organism and everything after it), on the same cache."""
        if seed == self.P.seed:
            return self
        return Study(dataclasses.replace(self.P, seed=seed), self.cache)

    def report(self) -> None:
        """One short summary of the cache lookups this Study made."""
        print(self.cache.summary())

    # The steps, in the order of the book. Each is documented where it is declared.
    census = property(lambda self: self.run("world-census"))
    organism = property(lambda self: self.run("organism"))
    heldout_accuracy = property(lambda self: self.run("heldout-accuracy"))
    vlm = property(lambda self: self.run("models"))
    base_sae_sweep = property(lambda self: self.run("base-sae-sweep"))
    base_saes = property(lambda self: self.run("base-saes"))
    adapted_saes = property(lambda self: self.run("adapted-saes"))
    reconstruction = property(lambda self: self.run("reconstruction"))
    features = property(lambda self: self.run("features"))
    spatial_stats = property(lambda self: self.run("spatial-stats"))
    lexical = property(lambda self: self.run("lexical"))
    selection = property(lambda self: self.run("selection"))
    ground_truth_acts = property(lambda self: self.run("ground-truth-acts"))
    ground_truth_check = property(lambda self: self.run("ground-truth-check"))
    head_scores = property(lambda self: self.run("head-scores"))
    causal = property(lambda self: self.run("causal-checks"))
    truth_probes = property(lambda self: self.run("truth-probes"))
    truth_scores = property(lambda self: self.run("truth-scores"))
    truth_features = property(lambda self: self.run("truth-features"))
    referee = property(lambda self: self.run("referee"))

    @cached_property
    def data(self):
        """All of the profile's data (for chapters: a step reads its data through its own view)."""
        from lib.steps.data import Data

        return Data(self.P, self)
