"""The step declarations (lib/steps/registry.py): every key is a hash of exactly the fields a step reads and the
keys of the steps it follows, and a step cannot read what it does not declare (the committed artifacts:
tests/test_committed.py)."""

import dataclasses

import pytest

from lib.io.cache import Cache
from lib.io.profiles import available_profiles, load_profile
from lib.steps.registry import STEPS, ProfileView, UndeclaredRead, descendants, step_keys
from lib.steps.study import Study


def _other_values(value):
    """Candidate replacements for a profile value, tried in order until the profile still validates."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2, value // 2]
    if isinstance(value, float):
        return [value * 1.5, value / 2, value + 0.1, value - 0.1, 0.5]
    if isinstance(value, str):
        # Named choices first (paper.format, paper.base_saes, the prompts' format strings, the distributed
        # dtype and backend, the organism's caption instructions), then generic edits.
        choices = ["hf-llava", "qwen2-vl", "train", "release", "{image} {question}", "{caption} {question}"]
        choices += ["generic", "describe"]
        return [
            *choices,
            "image",
            "full",
            "float32",
            "float16",
            "bfloat16",
            "nccl",
            "gloo",
            "dev",
            value + "x",
            value.replace("{layer}", "{layer}x"),
        ]
    if isinstance(value, tuple):
        if not value:
            return [(0,)]
        out = [value[:-1], (*value, value[-1]), (0,)]
        if value and isinstance(value[-1], (int, float)):
            out.insert(0, (*value[:-1], type(value[-1])(value[-1] * 2)))
        return out
    raise TypeError(value)


def _changed(P, field):
    """P with one field changed to another valid value, or None if no candidate validates alone."""
    head, _, rest = field.partition(".")
    value = getattr(getattr(P, head), rest) if rest else getattr(P, head)
    for new in _other_values(value):
        if new == value:
            continue
        try:
            if rest:
                section = dataclasses.replace(getattr(P, head), **{rest: new})
                return dataclasses.replace(P, **{head: section})
            return dataclasses.replace(P, **{head: new})
        except ValueError:  # ProfileError and the organism configs' own checks
            continue
    return None


def _fields(P):
    out = ["seed", "threads"]
    for f in dataclasses.fields(P):
        section = getattr(P, f.name)
        if dataclasses.is_dataclass(section):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]
    return out


def _readers(field):
    section = field.partition(".")[0]
    return {s.name for s in STEPS.values() if field in s.reads or section in s.reads}


# Fields that cannot change alone: each is tied to another by the profile's own checks.
TIED = {
    "lm.d_model",  # = lm.n_heads * lm.head_dim
    "lm.n_heads",
    "lm.head_dim",
    "world.patch_px",  # = tower.patch, and must divide world.cell_px
    "tower.patch",
    "world.cell_px",  # the organism reads 48 px images: cell_px = 16
}


@pytest.mark.parametrize("name", available_profiles())
def test_each_field_changes_exactly_the_keys_of_its_readers_and_their_descendants(name):
    P = load_profile(name)
    keys = step_keys(P)
    untested = set()
    for field in _fields(P):
        P2 = _changed(P, field)
        if P2 is None:
            untested.add(field)
            continue
        keys2 = step_keys(P2)
        changed = {s for s in keys if keys[s] != keys2[s]}
        assert changed == descendants(_readers(field)), f"{name}: changing `{field}` re-keys {sorted(changed)}"
    organism_fields = {f for f in TIED if P.lm is not None}
    assert untested <= organism_fields | {"world.cell_px"}, f"{name}: could not change {sorted(untested)}"


def test_a_larger_census_rekeys_the_census_alone_and_thresholds_only_what_reads_them():
    P = load_profile("default")
    keys = step_keys(P)

    def diff(**change):
        ((section, fields),) = change.items()
        P2 = dataclasses.replace(P, **{section: dataclasses.replace(getattr(P, section), **fields)})
        return {s for s, k in step_keys(P2).items() if k != keys[s]}

    assert diff(world={"n_census": P.world.n_census * 2}) == {"world-census"}
    assert diff(world={"n_heldout": 99}) == {"heldout-accuracy", "seeds-accuracy"}  # chapter 2's seed row reads it
    assert "base-saes" not in diff(sae={"sweep_k": (4,)})
    assert diff(probing={"min_auroc": 0.8}) == {"ground-truth-check", "seeds-probing"}  # and chapter 5's seed row
    assert "head-scores" not in diff(attribution={"top_k": 3})
    assert diff(attribution={"top_k": 3}) == {"causal-checks", "head-sets", "seeds-attribution"}


def test_a_step_cannot_read_a_field_it_does_not_declare():
    P = load_profile("tiny")
    view = ProfileView(P, ("seed", "sae.lr", "world"), "some-step")
    assert view.seed == P.seed and view.sae.lr == P.sae.lr and view.world.image_px == P.world.image_px
    assert view.paper is None and view.name == "tiny"
    with pytest.raises(UndeclaredRead, match=r"sae\.batch_size"):
        _ = view.sae.batch_size
    with pytest.raises(UndeclaredRead, match="threads"):
        _ = view.threads
    partial = ProfileView(P, ("world.n_objects",), "other-step")
    with pytest.raises(UndeclaredRead, match=r"world\.cell_px"):
        _ = partial.world.image_px  # a property reads through the view


def test_every_declared_field_exists_and_every_step_follows_declared_steps():
    P = load_profile("default")
    fields = set(_fields(P)) | {"paper", "lm", "tower", "vlm", "world"}
    fields |= {f"paper.{f.name}" for f in dataclasses.fields(load_profile("paper").paper)}
    for s in STEPS.values():
        assert set(s.reads) <= fields, f"{s.name} reads unknown fields {set(s.reads) - fields}"
        assert set(s.runs_with) <= fields, f"{s.name} runs with unknown fields {set(s.runs_with) - fields}"


def test_execution_settings_stay_out_of_keys_and_only_they_may():
    """`distributed.processes` and `backend` change how the SAE steps run, not their result (tests/
    test_distributed.py: equal to 1e-5): no key changes with them. A result-changing field cannot be declared so."""
    from lib.steps.distributed import WORKERS
    from lib.steps.registry import step

    runners = {s.name for s in STEPS.values() if "distributed.processes" in s.runs_with}
    assert runners == set(WORKERS) >= {"adapted-saes", "feature-table", "spatial-stats", "reconstruction"}
    P = load_profile("default")
    for field, value in (("processes", 4), ("backend", "nccl")):
        P2 = dataclasses.replace(P, distributed=dataclasses.replace(P.distributed, **{field: value}))
        assert step_keys(P2) == step_keys(P), field
    with pytest.raises(ValueError, match="execution=True"):
        step("no-such-step", reads=("seed",), runs_with=("sae.lr",))(lambda ctx: None)
    assert "no-such-step" not in STEPS


def test_changing_the_census_rebuilds_the_census_and_reuses_the_models(tmp_path):
    P = load_profile("tiny")
    S = Study(P, Cache(tmp_path))
    S.run("world-census"), S.run("base-saes")
    assert {e["event"] for e in S.cache.events} == {"computed"}
    P2 = dataclasses.replace(P, world=dataclasses.replace(P.world, n_census=P.world.n_census + 72))
    S2 = Study(P2, Cache(tmp_path))
    S2.run("world-census"), S2.run("base-saes")
    outcome = {e["name"]: e["event"] for e in S2.cache.events}
    assert outcome.pop("world-census") == "computed"
    assert set(outcome.values()) == {"reused"}, outcome
    assert len(S2.census) == 3 * P2.world.n_census
    assert "world-census" in S2.cache.summary() and "reused" in S2.cache.summary()
