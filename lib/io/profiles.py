"""Profiles: typed, validated settings loaded from `lib/profiles/<name>.toml`.

A profile is the only thing that differs between the fast smoke runs (`tiny`), the book (`default`) and the paper's
own models (`paper`): code never branches on the profile's name, only on its values (nanoGPT's habit).

Each section is a frozen dataclass. A field's `metadata["check"]` is a predicate and `metadata["allowed"]` says in
words what passes it; `load_profile` turns any misspelt field, wrong type or out-of-range value into one
`ProfileError` naming the file, the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parents[1] / "profiles"


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file, the field and what is allowed."""


def _f(default, check, allowed: str, execution: bool = False):
    """A dataclass field with a validity check and its description for error messages. `execution=True` marks a
    setting that changes how a step runs, not what it computes (lib/steps/registry.py keeps it out of cache keys)."""
    kw = {"default_factory": lambda: default} if isinstance(default, (list, tuple)) else {"default": default}
    return field(metadata={"check": check, "allowed": allowed, "execution": execution}, **kw)


def _int_in(default: int, lo: int, hi: int):
    return _f(default, lambda v: isinstance(v, int) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")


class Section:
    """Base of every profile section: validates each field against its metadata after construction."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and not check(value):
                raise ProfileError(f"field `{f.name}` = {value!r}: expected {f.metadata['allowed']}")


@dataclass(frozen=True)
class WorldConfig(Section):
    """The generated spatial world (lib/world.py)."""

    cell_px: int = _f(16, lambda v: isinstance(v, int) and 4 <= v <= 64, "an integer in [4, 64]")
    patch_px: int = _f(8, lambda v: isinstance(v, int) and 2 <= v <= 64, "an integer in [2, 64]")
    n_objects: tuple[int, ...] = _f(
        (2, 3),
        lambda v: len(v) > 0 and all(isinstance(n, int) and 1 <= n <= 4 for n in v),
        "a non-empty list of object counts, each in [1, 4]",
    )
    n_census: int = _f(
        2000,
        lambda v: isinstance(v, int) and 9 <= v <= 1_000_000,
        "an integer in [9, 1000000] (samples per split checked against ground truth)",
    )
    n_heldout: int = _f(
        900,
        lambda v: isinstance(v, int) and 9 <= v <= 1_000_000,
        "an integer in [9, 1000000] (held-out samples on which chapter 2 scores the organism)",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.cell_px % self.patch_px:
            raise ProfileError(f"field `patch_px` = {self.patch_px}: expected a divisor of cell_px = {self.cell_px}")

    @property
    def image_px(self) -> int:
        return 3 * self.cell_px

    @property
    def n_patches(self) -> int:
        return (self.image_px // self.patch_px) ** 2


VLM_FORMATS = ("llava-more", "hf-llava", "qwen2-vl")


@dataclass(frozen=True)
class PaperConfig(Section):
    """The paper's models and data (../shared/METHOD.md), or your own VLM on the same data: used when a profile has a
    `[paper]` section. `format` says which kind of checkpoint `vlm` is (lib/sources/paper_models.py for LLaVA-MORE,
    lib/sources/hf_models.py for Hugging Face LLaVA and Qwen2-VL checkpoints)."""

    format: str = _f(
        "llava-more",
        lambda v: v in VLM_FORMATS,
        "one of 'llava-more' (the original LLaVA layout, converted on load), 'hf-llava' (a Hugging Face "
        "LlavaForConditionalGeneration checkpoint), 'qwen2-vl' (a Qwen2VLForConditionalGeneration checkpoint)",
    )
    vlm: str = _f(
        "aimagelab/LLaVA_MORE-llama_3_1-8B-finetuning",
        lambda v: isinstance(v, str) and v != "",
        "a hub id or local path of the VLM checkpoint, in the layout `format` names",
    )
    llm: str = _f(
        "meta-llama/Llama-3.1-8B-Instruct",
        lambda v: isinstance(v, str) and v != "",
        "a hub id or local path of the LLM the VLM was fine-tuned from",
    )
    vision_tower: str = _f(
        "openai/clip-vit-large-patch14-336",
        lambda v: isinstance(v, str) and v != "",
        "a hub id or local path of the CLIP tower (format 'llava-more' only), used when the checkpoint has no tower "
        "weights",
    )
    prompt: str = _f(
        "chat",
        lambda v: isinstance(v, str) and (v == "chat" or (v.count("{image}") == 1 and "{question}" in v)),
        "'chat' (the VLM's chat template: one user turn of the image and the question) or a format string "
        "holding {image} once and {question}",
    )
    lm_prompt: str = _f(
        "chat",
        lambda v: isinstance(v, str) and (v == "chat" or ("{caption}" in v and "{question}" in v)),
        "'chat' (the LLM's chat template over the paper's user turn of caption and instruction) or a format string "
        "holding {caption} and {question}",
    )
    base_saes: str = _f(
        "release",
        lambda v: v in ("release", "train"),
        "'release' (the SAELens release sae_release / sae_id, rebuilt as TopK with topk) or 'train' (TopK SAEs "
        "trained here on the LLM's text stream with [sae] expansion, k, base_pairs, base_lr, base_batch_size)",
    )
    sae_release: str = _f(
        "llama_scope_lxr_8x",
        lambda v: isinstance(v, str) and v != "",
        "a SAELens release, or a local folder of SAELens SAEs, one per sae_id",
    )
    sae_id: str = _f(
        "l{layer}r_8x",
        lambda v: isinstance(v, str) and "{layer}" in v,
        "a SAELens sae_id template containing `{layer}`",
    )
    topk: int = _int_in(50, 1, 4096)
    vqa_dataset: str = _f("lmms-lab/VQAv2", lambda v: isinstance(v, str) and v != "", "a dataset id or local path")
    vqa_split: str = _f("validation", lambda v: isinstance(v, str) and v != "", "a split name")
    adapt_rows: tuple[int, ...] = _f((0, 50_000), lambda v: len(v) == 2 and 0 <= v[0] < v[1], "[first, end) row range")
    heldout_rows: tuple[int, ...] = _f(
        (50_000, 54_096), lambda v: len(v) == 2 and 0 <= v[0] < v[1], "[first, end) row range"
    )
    vsr_dataset: str = _f(
        "cambridgeltl/vsr_random", lambda v: isinstance(v, str) and v != "", "a dataset id or local path"
    )
    n_spatial_questions: int = _int_in(20_000, 1, 1_000_000)
    coco_captions: str = _f(
        "captions_val2014.json",
        lambda v: isinstance(v, str) and v != "",
        "the path of COCO's captions_val2014.json (the text-only stream's captions of VQAv2's images)",
    )
    coco_images: str = _f(
        "", lambda v: isinstance(v, str), "a COCO 2017 image directory for VSR, or '' if VSR holds images"
    )
    vsr_split: str = _f("test", lambda v: v in ("train", "dev", "test"), "one of train, dev, test")
    dtype: str = _f("bfloat16", lambda v: v in ("bfloat16", "float16", "float32"), "one of bfloat16, float16, float32")


def _float_in(default: float, lo: float, hi: float):
    return _f(default, lambda v: isinstance(v, float) and lo <= v <= hi, f"a number in [{lo}, {hi}]")


def _grid(default: tuple, lo: float, hi: float):
    return _f(
        default,
        lambda v: len(v) > 0 and all(isinstance(x, (int, float)) and lo <= x <= hi for x in v),
        f"a non-empty list of numbers in [{lo}, {hi}]",
    )


@dataclass(frozen=True)
class SAEConfig(Section):
    """Step 1 (chapters/03_sae_adaptation.py). The organism's base SAEs are trained here on the base LM's text
    stream (width = expansion x d_model, k active); the paper's are Llama Scope rebuilt as TopK k = paper.topk."""

    expansion: int = _int_in(4, 1, 64)
    k: int = _int_in(16, 1, 4096)
    base_pairs: int = _int_in(20_000, 8, 10_000_000)  # (caption, question) pairs the base SAEs train on
    base_lr: float = _float_in(1e-3, 1e-6, 0.1)
    base_batch_size: int = _int_in(32, 1, 4096)
    adapt_pairs: int = _int_in(4000, 8, 10_000_000)  # (image, question) pairs, one pass (organism)
    heldout_pairs: int = _int_in(512, 8, 1_000_000)  # held-out pairs for every metric (organism)
    lr: float = _float_in(2e-4, 1e-6, 0.1)  # METHOD.md: Adam, 2e-4 (the 1.41e-4 branch never ran; lib.sae)
    batch_size: int = _int_in(8, 1, 4096)  # sequences per step (METHOD.md: 8)
    eval_every: int = _int_in(50, 0, 1_000_000)  # held-out FVU every this many steps (0: start and end only)
    layers: tuple[int, ...] = _f((), lambda v: all(isinstance(x, int) and x >= 0 for x in v), "a list of layers")
    # The width x k sweep the organism's choice of expansion and k is read from (chapter 3), on fewer pairs.
    sweep_expansion: tuple[int, ...] = _grid((2, 4, 8), 1, 64)
    sweep_k: tuple[int, ...] = _grid((8, 16, 32), 1, 4096)
    sweep_pairs: int = _int_in(5000, 8, 10_000_000)
    sweep_every: int = _int_in(1, 1, 1024)  # the sweep trains on every n-th of the SAE layers (the first included)


@dataclass(frozen=True)
class DiffingConfig(Section):
    """Step 2 (chapters/04_feature_diffing.py): adapted = visual energy > eps and decoder cosine <= the pooled
    q-th percentile; the robustness sweep covers eps_grid x q_grid."""

    eps: float = _float_in(0.01, 0.0, 1.0)
    q: float = _float_in(25.0, 0.0, 100.0)
    eps_grid: tuple[float, ...] = _grid((5e-4, 1e-3, 2e-3, 5e-3, 1e-2), 0.0, 1.0)
    q_grid: tuple[float, ...] = _grid((15, 20, 25, 30, 35), 0.0, 100.0)
    variant: str = _f("text-only", lambda v: v in ("full", "text-only", "image-only", "random"), "a variant name")


@dataclass(frozen=True)
class ProbingConfig(Section):
    """Step 3 (chapters/05_spatial_probing.py)."""

    n_questions: int = _int_in(4000, 8, 10_000_000)  # questions whose text positions are counted (organism)
    min_odds: float = _float_in(3.0, 0.0, 1e9)
    min_delta: float = _float_in(0.005, -1.0, 1.0)
    fire_threshold: float = _float_in(0.01, 0.0, 1e9)  # lexical filter: "still fires" means max activation above this
    top_n: int = _int_in(10, 6, 1000)  # top samples per feature (auto-interp describes from n - 5, scores on 5)
    reading: str = _f("all", lambda v: v in ("all", "image"), "'all' or 'image'")
    n_ground_truth: int = _int_in(1000, 8, 1_000_000)  # scenes for the AUROC check (organism)
    n_random: int = _int_in(50, 1, 100_000)
    min_auroc: float = _float_in(0.9, 0.5, 1.0)


@dataclass(frozen=True)
class AttributionConfig(Section):
    """Step 4 (chapters/06_attribution.py)."""

    n_samples: int = _int_in(64, 1, 100_000)  # statements attribution and exhaustive patching run on
    batch_size: int = _int_in(8, 1, 4096)
    top_k: int = _int_in(3, 1, 1024)  # heads ablated
    n_statements: int = _int_in(720, 8, 1_000_000)  # benchmark size (organism; the paper's is VSR's test split)
    n_controls: int = _int_in(360, 8, 1_000_000)  # colour/shape control questions (organism)
    n_random: int = _int_in(3, 1, 100)  # random-head draws


@dataclass(frozen=True)
class RefereeConfig(Section):
    """The ground truth referees the method (chapters/07_ground_truth.py; organism only)."""

    n_relation: int = _int_in(1600, 16, 1_000_000)  # two-object relation and statement questions (probes, features)
    min_auroc: float = _float_in(0.9, 0.5, 1.0)  # reference set: a feature whose relation score reaches this
    cv_folds: int = _int_in(5, 2, 20)  # cross-validation folds of every probe
    n_sweep: int = _int_in(900, 9, 1_000_000)  # held-out samples (all question types) of the single-head sweep
    n_head_draws: int = _int_in(500, 1, 1_000_000)  # random head sets drawn for the control distribution
    n_counterfactual: int = _int_in(400, 8, 1_000_000)  # relation questions with object-swap / word-swap twins
    steer_scale: float = _float_in(4.0, 0.0, 1e6)  # steering: this many times the feature's mean activation
    n_steer_random: int = _int_in(20, 1, 10_000)  # random directions of the same norm
    # The seeds whose pipelines chapter 7 summarises (mean and range; lib/steps/seeds.py); each is the whole
    # pipeline again with `seed` replaced, its organism included.
    seeds: tuple[int, ...] = _f((0,), lambda v: len(v) > 0 and all(isinstance(x, int) and x >= 0 for x in v),
                                "a non-empty list of seeds")  # fmt: skip


@dataclass(frozen=True)
class DistributedConfig(Section):
    """How the SAE steps run (lib/steps/distributed.py): on `processes` processes launched with torchrun, the
    (layer, variant) SAEs shared out among them, over the torch.distributed `backend`; and the dtype of the SAEs'
    weights and Adam state while they train (exported SAEs are float32 SAELens folders either way).

    `processes` and `backend` change how a step runs, not what it computes: N processes give the single process's
    SAEs to 1e-5 (tests/test_distributed.py), not bit for bit (the SAEs of a rank are stacked differently, so float
    sums run in another order; in bfloat16 they agree to bfloat16's rounding). They are kept out of every cache key,
    so SAEs adapted on 8 GPUs serve a chapter run on one; the artifact's info.json records how it was built. `dtype`
    changes the SAEs and is in the key; bfloat16 SAEs train with stochastically rounded Adam steps
    (lib/kernels/bf16_adam.py)."""

    processes: int = _f(1, lambda v: isinstance(v, int) and 1 <= v <= 1024, "an integer in [1, 1024]", execution=True)
    backend: str = _f("gloo", lambda v: v in ("gloo", "nccl"), "'gloo' (CPU) or 'nccl' (one GPU per process)", True)
    dtype: str = _f("float32", lambda v: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    seed: int
    threads: int = 1  # torch threads for training: part of what makes float sums repeatable bit for bit
    world: WorldConfig | None = None
    paper: PaperConfig | None = None
    # The organism's models; their config classes live beside the code that trains them (lib/organism.py).
    lm: object | None = None
    tower: object | None = None
    vlm: object | None = None
    # The analysis, the same for every profile (defaults are the paper's choices where it states them).
    sae: SAEConfig = field(default_factory=SAEConfig)
    diffing: DiffingConfig = field(default_factory=DiffingConfig)
    probing: ProbingConfig = field(default_factory=ProbingConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    referee: RefereeConfig = field(default_factory=RefereeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        if (self.world is None) == (self.paper is None):
            raise ProfileError("a profile has exactly one of the sections [world] (the organism) or [paper]")
        organism = (self.lm, self.tower, self.vlm)
        if any(s is not None for s in organism) and (self.world is None or None in organism):
            raise ProfileError("the organism needs all of the sections [world], [lm], [tower] and [vlm]")
        if self.tower is not None:
            from lib.sources.organism_config import IMAGE_SIZE

            if self.world.image_px != IMAGE_SIZE or self.tower.patch != self.world.patch_px:
                raise ProfileError(
                    f"field `tower.patch` = {self.tower.patch} and `world.cell_px` = {self.world.cell_px}: the "
                    f"organism reads {IMAGE_SIZE} px images (world.cell_px = {IMAGE_SIZE // 3}) with tower.patch "
                    f"equal to world.patch_px = {self.world.patch_px}"
                )


_SECTIONS = {f.name: f for f in dataclasses.fields(Profile)}
# Section name -> its config class. The organism's are imported only when a profile has them (they need torch).
_SECTION_TYPES = {
    "world": WorldConfig,
    "paper": PaperConfig,
    "lm": "LMConfig",
    "tower": "TowerConfig",
    "vlm": "VLMConfig",
    "sae": SAEConfig,
    "diffing": DiffingConfig,
    "probing": ProbingConfig,
    "attribution": AttributionConfig,
    "referee": RefereeConfig,
    "distributed": DistributedConfig,
}


SECTION_NAMES = tuple(_SECTION_TYPES)


def section_type(name: str):
    """The config class of a profile section (the organism's live beside its code, lib/sources/organism_config.py)."""
    cls = _SECTION_TYPES[name]
    if isinstance(cls, str):
        from lib.sources import organism_config

        cls = getattr(organism_config, cls)
    return cls


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def _coerce(value, annotation: str, where: str, allowed: str):
    """TOML has no tuples and writes 3.0 as a float; map what TOML gives onto the field's declared type."""
    hint = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation)
    if annotation.startswith("tuple"):
        if not isinstance(value, list):
            raise ProfileError(f"{where} = {value!r}: expected {allowed}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is not None and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ProfileError(f"{where} = {value!r}: expected {allowed}")
    return value


def _build(cls, raw: dict, path: Path, prefix: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise ProfileError(f"{path}: unknown field `{prefix}{key}`; allowed fields: {', '.join(known)}")
        f = known[key]
        allowed = f.metadata.get("allowed", str(f.type))
        kwargs[key] = _coerce(value, str(f.type), f"{path}: field `{prefix}{key}`", allowed)
    try:
        return cls(**kwargs)
    except ProfileError as e:
        raise ProfileError(f"{path}: {str(e).replace('field `', f'field `{prefix}', 1)}") from None
    except ValueError as e:  # the organism's configs validate themselves with ValueError
        raise ProfileError(f"{path}: section [{prefix.rstrip('.')}]: {e}") from None


def load_profile(name_or_path: str | Path) -> Profile:
    """Load `lib/profiles/<name>.toml` (or a path to any profile file, TOML or the JSON `profile_dict` writes) and
    validate every field."""
    path = Path(name_or_path)
    if path.suffix not in (".toml", ".json"):
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise ProfileError(
            f"no profile {str(name_or_path)!r} ({path} does not exist); available: {', '.join(available_profiles())}"
        )
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
        return _from_raw(raw, path, raw.pop("name", path.stem))
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None
    return _from_raw(raw, path, path.stem)


def _from_raw(raw: dict, path: Path, name: str) -> Profile:
    top = {}
    for key, value in raw.items():
        if key not in _SECTIONS or key == "name":
            raise ProfileError(
                f"{path}: unknown field `{key}`; allowed: {', '.join(k for k in _SECTIONS if k != 'name')}"
            )
        if key in _SECTION_TYPES:
            if value is None:  # a section the profile does not have (profile_dict writes it as null)
                continue
            if not isinstance(value, dict):
                raise ProfileError(f"{path}: field `{key}` must be a [{key}] table")
            top[key] = _build(section_type(key), value, path, f"{key}.")
        else:
            allowed = {"seed": "an integer", "description": "a string", "threads": "an integer >= 1"}[key]
            kind = {"seed": "int", "description": "str", "threads": "int"}[key]
            top[key] = _coerce(value, kind, f"{path}: field `{key}`", allowed)
            if key == "threads" and top[key] < 1:
                raise ProfileError(f"{path}: field `threads` = {value!r}: expected {allowed}")
    for required in ("seed", "description"):
        if required not in top:
            raise ProfileError(f"{path}: missing field `{required}`")
    try:
        return Profile(name=name, **top)
    except ProfileError as e:
        raise ProfileError(f"{path}: {e}") from None


def profile_dict(P: Profile) -> dict:
    """Every field of a profile as plain JSON (`load_profile` reads it back from a .json file): how a profile built
    in memory reaches the worker processes of a distributed step."""
    out = {"name": P.name, "description": P.description, "seed": P.seed, "threads": P.threads}
    for name in _SECTION_TYPES:
        section = getattr(P, name)
        out[name] = None if section is None else settings(section)
    return out


def settings(section) -> dict:
    """A section as plain JSON-able data, for cache keys. A field declared with `metadata={"added": True}` (one
    added after artifacts were committed) is left out while it holds its default, so adding a setting whose default
    keeps the old behaviour never re-keys what was built before it existed (artifacts/PROVENANCE-*.json)."""
    added = {f.name: f.default for f in dataclasses.fields(section) if f.metadata.get("added")}
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(section).items()
        if not (k in added and v == added[k])
    }
