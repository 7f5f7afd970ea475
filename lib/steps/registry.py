"""Every cached step of the pipeline, declared once: its name, the profile fields it reads, the steps it follows.

    @step("adapted-saes", after=("base-saes",), reads=(*data_reads("adapt", "heldout"), "sae.lr", ...), version=2)
    def adapted_saes(ctx: Context) -> Adapted: ...

A step's key is a SHA-256 of exactly the values of the fields it reads and the keys of the steps it follows (and its
code version), so changing one profile value recomputes the steps that read it and their descendants, nothing else
(saev's habit: the folder is the hash of the declared config). The key is known before anything is built:
`step_keys(profile)` gives every step's key from the profile alone, which is what the key test checks.

A step's function sees the profile only through `ctx.P`, a view that holds the declared fields and raises
`UndeclaredRead` on any other, so a declaration that forgets a field fails loudly the first time the step runs
(every step runs on the `tiny` profile in the chapter smoke tests).

A step may also declare `runs_with=(...)`: fields that change how it runs, not what it computes (marked
`execution=True` in lib/io/profiles.py, e.g. `distributed.processes`). The step reads them through its view like the
others, but they are not hashed into its key: changing them re-keys nothing, and an artifact built one way is
reused by a run configured the other way (the test of each such field is that it gives the same result).

Field names: `seed`, `threads`, a whole section (`lm`) or one field of it (`sae.lr`). A field of a section the
profile does not have (`paper.vlm` on the organism) reads as None: the key says which kind of profile it is.
Versions are explicit integers, bumped by hand when a step's code changes what it computes. (A hash of the step's
source would also change on a comment, and would re-key the committed organism with every edit; the kernels a step
calls are outside its source anyway.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from lib.io.cache import make_key
from lib.io.profiles import SECTION_NAMES, Profile, section_type, settings

TOP_LEVEL = ("seed", "threads")


class UndeclaredRead(AttributeError):
    """A step read a profile field it does not declare (so its cache key would not change with it)."""


class Step(NamedTuple):
    name: str
    fn: Callable
    reads: tuple[str, ...]
    after: tuple[str, ...]
    version: int
    cached: bool  # False: a step that loads or assembles (models, the selection); keyed, never stored
    runs_with: tuple[str, ...] = ()  # execution settings it reads, not hashed into its key


STEPS: dict[str, Step] = {}


def step(
    name: str,
    *,
    reads: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    version: int = 1,
    cached=True,
    runs_with: tuple[str, ...] = (),
):
    """Register `fn(ctx)` as the step `name` (see the module docstring)."""

    def register(fn):
        if name in STEPS:
            raise ValueError(f"step {name!r} declared twice ({STEPS[name].fn.__module__} and {fn.__module__})")
        unknown = [a for a in after if a not in STEPS]
        if unknown:
            raise ValueError(f"step {name!r} follows undeclared steps {unknown} (declare them first)")
        for field in reads:
            _check_field_name(field, name)
        for field in runs_with:
            _check_execution_field(field, name)
        STEPS[name] = Step(name, fn, tuple(dict.fromkeys(reads)), tuple(after), version, cached, tuple(runs_with))
        return fn

    return register


def _check_field_name(field: str, step_name: str) -> None:
    head, _, rest = field.partition(".")
    if head in TOP_LEVEL and not rest:
        return
    types = {f.name: f for f in dataclasses.fields(Profile)}
    if head not in types or head in (*TOP_LEVEL, "name", "description"):
        raise ValueError(f"step {step_name!r} reads {field!r}: no such profile section")


def _check_execution_field(field: str, step_name: str) -> None:
    head, _, rest = field.partition(".")
    known = {f.name: f for f in dataclasses.fields(section_type(head))} if head in SECTION_NAMES else {}
    if rest not in known or not known[rest].metadata.get("execution"):
        raise ValueError(
            f"step {step_name!r} runs_with {field!r}: only fields marked execution=True in lib/io/profiles.py "
            "(settings that cannot change a result) may stay out of a key"
        )


def read_value(P: Profile, field: str):
    """The value of one declared field, as plain JSON (tuples as lists; a missing section's field as None)."""
    head, _, rest = field.partition(".")
    value = getattr(P, head)
    if not rest:
        return settings(value) if dataclasses.is_dataclass(value) else value
    if value is None:
        return None
    if rest not in {f.name for f in dataclasses.fields(value)}:
        raise ValueError(f"no profile field {field!r}")
    v = getattr(value, rest)
    return list(v) if isinstance(v, tuple) else v


def declared_settings(P: Profile, reads: tuple[str, ...]) -> dict:
    """The declared fields as a nested dict ({"sae": {"lr": ...}}): what the key hashes and the manifest records."""
    out: dict[str, Any] = {}
    for field in reads:
        head, _, rest = field.partition(".")
        value = read_value(P, field)
        if rest:
            section = out.setdefault(head, {})
            if isinstance(section, dict):
                section[rest] = value
        else:
            out[head] = value
    return out


def step_keys(P: Profile) -> dict[str, str]:
    """Every declared step's key under profile `P`, computed from the declarations alone (nothing is built). Every
    step is registered by then: importing any module of lib.steps runs lib/steps/__init__.py first."""
    keys: dict[str, str] = {}
    for s in STEPS.values():  # declaration order is topological: a step follows only steps declared before it
        keys[s.name] = make_key(s.name, s.version, declared_settings(P, s.reads), tuple(keys[a] for a in s.after))
    return keys


def descendants(names: set[str]) -> set[str]:
    """The steps that follow any of `names`, directly or not (`names` included)."""
    out = set(names)
    for s in STEPS.values():
        if any(a in out for a in s.after):
            out.add(s.name)
    return out


# ---------------------------------------------------------------------------------------------------------------
# What a step's function sees of the profile.


class SectionView:
    """One profile section, restricted to the fields a step declares. Properties (e.g. `world.image_px`) are
    computed through the view, so they need the fields they use."""

    def __init__(self, section, allowed: set[str], step_name: str, section_name: str):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_where", (step_name, section_name))

    def __getattr__(self, attr: str):
        section = object.__getattribute__(self, "_section")
        step_name, section_name = object.__getattribute__(self, "_where")
        if attr in {f.name for f in dataclasses.fields(section)}:
            if attr not in object.__getattribute__(self, "_allowed"):
                raise UndeclaredRead(
                    f"step {step_name!r} reads `{section_name}.{attr}` but does not declare it "
                    f"(lib/steps: add it to the step's reads=...)"
                )
            return getattr(section, attr)
        prop = getattr(type(section), attr, None)
        if isinstance(prop, property):
            return prop.fget(self)
        return getattr(section, attr)

    def __setattr__(self, attr, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {attr!r}")


class ProfileView:
    """The profile as one step may read it: `name` and `description` freely (they change no result), whether a
    section exists freely (it decides the kind of profile), and only the declared fields' values."""

    def __init__(self, P: Profile, reads: tuple[str, ...], step_name: str):
        self._P, self._reads, self._step = P, set(reads), step_name

    @property
    def name(self) -> str:
        return self._P.name

    @property
    def description(self) -> str:
        return self._P.description

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        P = self._P
        value = getattr(P, attr)
        if attr in TOP_LEVEL:
            if attr not in self._reads:
                raise UndeclaredRead(f"step {self._step!r} reads `{attr}` but does not declare it")
            return value
        if value is None or attr in self._reads:
            return value
        allowed = {f.partition(".")[2] for f in self._reads if f.startswith(attr + ".")}
        return SectionView(value, allowed, self._step, attr)
