"""The data every analysis step reads, and the models: the organism's generated world or the paper's datasets.

`Data(view, study)` builds each split on first use from the profile fields that split needs, read through the
step's profile view: a step that uses the probing questions without declaring `probing.n_questions` fails loudly.
`data_reads(*splits)` is what a step declares for the splits it uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np

from lib.sources import world as W
from lib.steps.registry import step

# What every split of the organism's world reads, and what the paper's datasets read (loaded together).
WORLD_READS = ("seed", "world.cell_px", "world.n_objects")
PAPER_DATA_READS = tuple(
    f"paper.{f}"
    for f in (
        "vqa_dataset",
        "vqa_split",
        "adapt_rows",
        "heldout_rows",
        "coco_captions",
        "n_spatial_questions",
        "vsr_dataset",
        "vsr_split",
        "coco_images",
    )
)
# The profile field that sizes each split of the organism's world (each split is its own random stream, so no
# split's content depends on another's size).
SPLIT_SIZE = {
    "adapt": "sae.adapt_pairs",
    "heldout": "sae.heldout_pairs",
    "text": "sae.base_pairs",
    "probe": "probing.n_questions",
    "ground_truth": "probing.n_ground_truth",
    "statements": "attribution.n_statements",
    "controls": "attribution.n_controls",
    "relation": "referee.n_relation",
    "sweep": "referee.n_sweep",
    "counterfactual": "referee.n_counterfactual",
}
# split -> (the world's stream name, question types, object counts or None for the profile's)
_STREAMS = {
    "adapt": ("adapt", tuple(W.QTYPES), None),
    "heldout": ("heldout", tuple(W.QTYPES), None),
    "text": ("sae-text", tuple(W.QTYPES), None),
    "probe": ("probe", tuple(W.QTYPES), None),
    # Relations are defined between two objects: the ground-truth check uses two-object scenes.
    "ground_truth": ("ground-truth", tuple(W.QTYPES), (2,)),
    "statements": ("bench", ("statement",), None),
    "controls": ("control", ("color", "shape"), None),
    # The referee (chapter 7): relation questions in both templates on two-object scenes, every question type for
    # the head sweep, and relation questions whose twins swap the objects or the relation word.
    "relation": ("referee-relation", ("relation", "statement"), (2,)),
    "sweep": ("referee-sweep", tuple(W.QTYPES), None),
    "counterfactual": ("referee-counterfactual", ("relation", "statement"), (2,)),
}


def data_reads(*splits: str) -> tuple[str, ...]:
    """The profile fields a step reads when it uses these splits of `Data`."""
    return (*WORLD_READS, *PAPER_DATA_READS, *(SPLIT_SIZE[s] for s in splits))


class LazyPairs(Sequence):
    """A sequence read lazily by index (e.g. (image, text) pairs of world scenes rendered when indexed, or of
    dataset rows)."""

    def __init__(self, n: int, get):
        self.n, self.get = n, get

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.get(i % self.n)


def world_pairs(samples: list[W.Sample]) -> LazyPairs:
    return LazyPairs(len(samples), lambda i: (samples[i].scene.render(), samples[i].question))


def text_pairs(samples: list[W.Sample]) -> LazyPairs:
    return LazyPairs(len(samples), lambda i: (samples[i].scene.caption(), samples[i].question))


class _Samples:
    """`data.samples[split]`: the organism's world samples of a split (its ground truth), made on first use."""

    def __init__(self, data: Data):
        self._data = data

    def __getitem__(self, split: str) -> list[W.Sample]:
        return self._data._world(split)

    def keys(self):
        return _STREAMS.keys()

    def items(self):
        return [(k, self[k]) for k in _STREAMS]


class Data:
    """The data of the analysis steps. Organism: every split generated from the world; paper: VQAv2, COCO captions
    and VSR (lib.sources.paper). `samples` holds the organism's ground truth (None for the paper's data)."""

    def __init__(self, P, study):
        self.P, self._memo = P, study._memo
        self.samples = _Samples(self) if P.world is not None else None

    def _world(self, split: str) -> list[W.Sample]:
        P = self.P
        stream, qtypes, n_objects = _STREAMS[split]
        section, field = SPLIT_SIZE[split].split(".")
        n = getattr(getattr(P, section), field)
        memo_key = ("world", P.seed, stream, n, qtypes, P.world.cell_px, n_objects or P.world.n_objects)
        if memo_key not in self._memo:
            self._memo[memo_key] = W.make_samples(P.seed, stream, n, qtypes, *memo_key[5:])
        return self._memo[memo_key]

    @cached_property
    def _paper(self) -> dict:
        cfg = self.P.paper
        memo_key = ("paper", *(getattr(cfg, f.partition(".")[2]) for f in PAPER_DATA_READS))
        if memo_key not in self._memo:
            self._memo[memo_key] = paper_data(cfg)
        return self._memo[memo_key]

    def _get(self, name: str, from_world):
        return self._paper[name] if self.P.paper is not None else from_world()

    @cached_property
    def adapt(self) -> Sequence:  # (image, question): SAE adaptation, one pass
        return self._get("adapt", lambda: world_pairs(self._world("adapt")))

    @cached_property
    def heldout(self) -> Sequence:  # (image, question): every held-out metric
        return self._get("heldout", lambda: world_pairs(self._world("heldout")))

    @cached_property
    def text(self) -> Sequence:  # (caption, question): the base SAEs' training stream
        if self.P.paper is not None:  # the first base_pairs adaptation rows' COCO captions and questions
            return self._paper["text"][: self.P.sae.base_pairs]
        return text_pairs(self._world("text"))

    @cached_property
    def heldout_text(self) -> Sequence:  # (caption, question) of the held-out images: the text-only stream
        return self._get("heldout_text", lambda: text_pairs(self._world("heldout")))

    @cached_property
    def probe(self):  # probing.SampleSet: questions counted for the spatial vs general split
        from lib.kernels.probing import SampleSet

        return self._get("probe", lambda: SampleSet.from_world(self._world("probe")))

    @cached_property
    def probe_spatial(self) -> np.ndarray:  # bool per probe question: the keyword split
        return self._get("probe_spatial", lambda: np.array([s.spatial for s in self._world("probe")]))

    @cached_property
    def ground_truth(self):  # probing.SampleSet of two-object scenes (organism only)
        from lib.kernels.probing import SampleSet

        return self._get("ground_truth", lambda: SampleSet.from_world(self._world("ground_truth")))

    @cached_property
    def statements(self) -> list:  # attribution.Statement: the true/false benchmark (VSR for the paper)
        from lib.kernels.causal import statements_from_samples

        return self._get("statements", lambda: statements_from_samples(self._world("statements")))

    @property
    def relation(self) -> list[W.Sample]:  # the referee's relation questions (organism only)
        return self._world("relation")

    @property
    def sweep(self) -> list[W.Sample]:  # every question type, for the single-head ablation sweep (organism only)
        return self._world("sweep")

    @property
    def counterfactual(self) -> list[W.Sample]:  # relation questions to twin (organism only)
        return self._world("counterfactual")

    @cached_property
    def controls(self) -> list:  # attribution.Choice: the non-spatial control task (organism only)
        from lib.kernels.causal import choices_from_samples

        return self._get("controls", lambda: choices_from_samples(self._world("controls")))


def paper_data(cfg) -> dict:
    """The paper profile's data: VQAv2 rows for adaptation and held-out metrics, COCO captions for the text-only
    streams (held-out rows; adaptation rows for base SAEs trained here), the first `n_spatial_questions` spatial and
    as many general VQAv2 questions (adaptation rows, keyword regex) for probing, VSR as the statement benchmark. No
    ground truth, no control task."""
    from lib.kernels.causal import Statement
    from lib.kernels.probing import SampleSet
    from lib.sources import paper_data as PD

    name = cfg.vqa_dataset
    vqa = PD.load_vqav2(name, columns=(*PD.VQA_PROBING_COLUMNS, "image_id"), split=cfg.vqa_split)
    adapt = PD.select_rows(vqa, range(*cfg.adapt_rows), name)
    heldout = PD.select_rows(vqa, range(*cfg.heldout_rows), name)
    pairs = lambda ds: LazyPairs(len(ds), lambda i: (ds[i]["image"], ds[i]["question"]))  # noqa: E731
    captions = PD.load_coco_captions(cfg.coco_captions)
    caps, questions = PD.text_stream_pairs(heldout, captions, name)
    adapt_caps, adapt_questions = PD.text_stream_pairs(adapt, captions, name)
    questions_all = adapt["question"]
    spatial = [i for i, q in enumerate(questions_all) if PD.is_spatial_question(q)][: cfg.n_spatial_questions]
    general = [i for i, q in enumerate(questions_all) if not PD.is_spatial_question(q)][: len(spatial)]
    probe_rows = adapt.select(sorted(spatial + general))
    vsr = PD.load_vsr(cfg.vsr_dataset, cfg.vsr_split)
    root = cfg.coco_images or None
    statements = [
        Statement(
            PD.vsr_image(row, root), PD.VSR_PROMPT.format(caption=row["caption"]), bool(row["label"]), row["relation"]
        )
        for row in vsr
    ]
    return dict(
        adapt=pairs(adapt),
        heldout=pairs(heldout),
        text=list(zip(adapt_caps, adapt_questions, strict=True)),  # base SAEs trained here (base_saes = "train")
        heldout_text=list(zip(caps, questions, strict=True)),
        probe=SampleSet(LazyPairs(len(probe_rows), lambda i: probe_rows[i]["image"]), list(probe_rows["question"])),
        probe_spatial=np.array([PD.is_spatial_question(q) for q in probe_rows["question"]]),
        ground_truth=None,
        statements=statements,
        controls=[],
    )


# ---------------------------------------------------------------------------------------------------------------
# The models every analysis step runs: the organism (lib/steps/organism.py), the paper's LLaVA-MORE or your own VLM.

PAPER_MODEL_READS = tuple(
    f"paper.{f}" for f in ("format", "vlm", "llm", "vision_tower", "prompt", "lm_prompt", "dtype")
)


def paper_parts(cfg) -> dict:
    """The VLM bundle's fields for a `[paper]` section: LLaVA-MORE converted (format 'llava-more') or a Hugging Face
    LLaVA / Qwen2-VL checkpoint, each with its base LLM; `prompt` and `lm_prompt` other than 'chat' are format
    strings (lib/sources/hf_models.py)."""
    import torch

    from lib.sources import hf_models as HF

    dtype = getattr(torch, cfg.dtype)
    if cfg.format != "llava-more":
        return HF.hf_vlm_parts(cfg.format, cfg.vlm, cfg.llm, cfg.prompt, cfg.lm_prompt, dtype=dtype)
    from pathlib import Path

    from lib.sources.paper_models import paper_vlm_parts

    # The generation prompt (assistant header) ends every prompt, so the last position is where the answer is
    # formed: the statement benchmark reads its next-token logits there.
    parts = paper_vlm_parts(cfg.vlm, cfg.llm, cfg.vision_tower, dtype=dtype, add_generation_prompt=True)
    if cfg.prompt != HF.CHAT:  # LLaVA-MORE's placeholder is "<image>", replaced by its image token on encoding
        fn, add_special = HF.vlm_prompt(cfg.prompt, Path(cfg.vlm), parts["tokenizer"], parts["image_placeholder"])
        parts.update(prompt=fn, add_special_tokens=add_special)
    if cfg.lm_prompt != HF.CHAT:
        fn, add_special = HF.lm_prompt(cfg.lm_prompt, Path(cfg.llm), parts["lm_tokenizer"])
        parts.update(lm_prompt=fn, lm_add_special_tokens=add_special)
    return parts


@step("models", after=("organism",), reads=("threads", *PAPER_MODEL_READS), cached=False)
def models(ctx):
    """The VLM bundle (lib.kernels.adapter.VLM) of a profile: the organism, or a `[paper]` section's VLM and LLM."""
    import torch

    from lib.kernels.adapter import VLM

    P = ctx.P
    # Every later step runs on the profile's thread count, including steps whose cached inputs were reused (torch's
    # default of one thread per core spins when another process holds a core: a feature table took 356 s instead of
    # 4.5 s that way, and chapter 6 on the tiny Hugging Face fakes 107 s instead of 17 s).
    torch.set_num_threads(P.threads)
    if P.paper is not None:
        return VLM(**paper_parts(P.paper))
    from lib.sources import organism as O
    from lib.sources.tokenizer import BOS, IMAGE

    m = ctx.up("organism")
    return VLM(
        model=m.vlm,
        tokenizer=m.tokenizer,
        preprocess=lambda images: O.pixel_values_from_images(np.stack([np.asarray(im) for im in images])),
        prompt=lambda q: f"{BOS} {W.vlm_prompt(q)}",
        image_placeholder=IMAGE,
        base_lm=m.lm,
        lm_prompt=lambda c, q: f"{BOS} {W.lm_prompt(c, q)}",
    )
