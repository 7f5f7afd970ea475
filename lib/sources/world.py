"""The spatial world: seeded scenes of coloured shapes on a 3 x 3 grid, their images, and the text built from them.

Every scene carries its complete ground truth (objects, pixel boxes, image patches, pairwise relations), so the
later chapters can check claims that the paper could only argue for. Everything here is a pure function of
(seed, split, index): the same seed gives byte-identical scenes on every machine.

Text is word-level and lower-case, punctuation is its own word ("what color is the circle ?"), and every word that
any template can produce is listed in `VOCAB`, so the tokenizer's vocabulary does not depend on which lines a
corpus happens to contain.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw

GRID = 3
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (230, 50, 50),
    "green": (60, 190, 75),
    "blue": (60, 100, 240),
    "yellow": (235, 215, 50),
    "purple": (165, 70, 210),
}
BACKGROUND = (25, 25, 25)
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("zero", "one", "two", "three")

# Question types, the family each belongs to, and whether it is spatial by construction.
QTYPES = {
    "color": "lookup",  # what color is the circle ?            -> red
    "shape": "lookup",  # what shape is the red object ?        -> circle
    "exist": "lookup",  # is there a blue square ?              -> yes / no
    "count": "lookup",  # how many objects are there ?          -> two / three
    "where": "absolute",  # where is the circle ?               -> top left
    "side": "absolute",  # is the circle on the left ?          -> yes / no
    "relation": "relational",  # is the circle left of the square ?  -> yes / no
    "what_rel": "relational",  # what is left of the square ?    -> circle
    "statement": "relational",  # statement : the circle is left of the square . is this correct ? -> yes / no
}
SPATIAL_FAMILIES = ("absolute", "relational")
# The questions that name an object by one attribute and ask the other (named by the attribute they ask): answered
# from a caption, they test whether a model binds each colour to its shape.
BINDING_QTYPES = ("color", "shape")

# The keyword split of questions (the paper's regex over VQAv2 questions, here over ours).
SPATIAL_KEYWORDS = ("left", "right", "above", "below", "top", "bottom", "middle", "center", "where")

# Direction-free prompts for the lexical filter: they name no relation and no side.
GENERIC_PROMPTS = (
    "describe the image .",
    "what do you see in the image ?",
    "describe how the objects are arranged .",
    "list the objects in the image .",
    "what is in the picture ?",
)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>")
_WORDS = """
the a an is are at on of in there what which how many where this that correct yes no and object objects
color shape statement answer user assistant image picture scene see do you describe list arranged
: ? . ,
""".split()
VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys([*SPECIAL_TOKENS, *_WORDS, *ROWS, *COLS, *SHAPES, *COLORS, *NUMBERS, *" ".join(RELATIONS).split()])
)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    row: int
    col: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive

    @property
    def where(self) -> str:
        return f"{ROWS[self.row]} {COLS[self.col]}"

    def patches(self, cell_px: int, patch_px: int) -> tuple[int, ...]:
        """Raster indices of the image patches that the object's box overlaps."""
        n = GRID * cell_px // patch_px
        x0, y0, x1, y1 = self.box
        rows = range(y0 // patch_px, y1 // patch_px + 1)
        cols = range(x0 // patch_px, x1 // patch_px + 1)
        return tuple(r * n + c for r in rows for c in cols)


def holds(a: Obj, b: Obj, relation: str) -> bool:
    """Ground truth of "a <relation> b": strict comparison of grid cells."""
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in raster order of their cells (reading order)
    cell_px: int

    @property
    def size_px(self) -> int:
        return GRID * self.cell_px

    def by_shape(self, shape: str) -> Obj:
        return next(o for o in self.objects if o.shape == shape)

    @cached_property
    def relations(self) -> tuple[tuple[str, str, str], ...]:
        """Every true (subject shape, relation, object shape) triple."""
        return tuple(
            (a.shape, r, b.shape)
            for a in self.objects
            for b in self.objects
            if a is not b
            for r in RELATIONS
            if holds(a, b, r)
        )

    def caption(self) -> str:
        """The scene in words, objects in reading order: the COCO-caption analogue and the LM's context."""
        return " ".join(f"the {o.color} {o.shape} is at {o.where} ." for o in self.objects)

    def render(self) -> np.ndarray:
        """RGB uint8 image, H = W = 3 * cell_px."""
        img = Image.new("RGB", (self.size_px, self.size_px), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for o in self.objects:
            x0, y0, x1, y1 = o.box
            fill = COLORS[o.color]
            if o.shape == "circle":
                draw.ellipse(o.box, fill=fill)
            elif o.shape == "square":
                draw.rectangle(o.box, fill=fill)
            elif o.shape == "triangle":
                draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
            elif o.shape == "diamond":
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        return np.asarray(img, dtype=np.uint8)


def rng_for(seed: int, split: str, index: int) -> np.random.Generator:
    """One independent, reproducible stream per (seed, split, index)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def make_scene(rng: np.random.Generator, cell_px: int, n_objects: int) -> Scene:
    """`n_objects` objects with distinct shapes and distinct colours in distinct cells, jittered inside the cell."""
    cells = sorted(rng.choice(GRID * GRID, size=n_objects, replace=False).tolist())
    shapes = rng.choice(len(SHAPES), size=n_objects, replace=False)
    colors = rng.choice(len(COLORS), size=n_objects, replace=False)
    objects = []
    for cell, s, c in zip(cells, shapes, colors, strict=True):
        row, col = divmod(cell, GRID)
        side = int(rng.integers(int(0.55 * cell_px), int(0.85 * cell_px) + 1))
        x0 = col * cell_px + int(rng.integers(0, cell_px - side + 1))
        y0 = row * cell_px + int(rng.integers(0, cell_px - side + 1))
        objects.append(Obj(SHAPES[s], list(COLORS)[c], row, col, (x0, y0, x0 + side - 1, y0 + side - 1)))
    return Scene(tuple(objects), cell_px)


@dataclass(frozen=True)
class Sample:
    """One (scene, question, answer) with the ground truth a later check needs."""

    split: str
    index: int
    qtype: str
    question: str
    answer: str
    scene: Scene
    subject: str = ""  # shape the question is about ("" if none)
    obj: str = ""  # second shape of a relation question
    relation: str = ""  # relation named by the question ("" if none)
    side: str = ""  # row or column word named by a "side" question

    @property
    def family(self) -> str:
        return QTYPES[self.qtype]

    @property
    def spatial(self) -> bool:
        """The keyword split, read off the question text alone (as the paper's regex is)."""
        return is_spatial(self.question)


def is_spatial(question: str) -> bool:
    words = question.split()
    return any(k in words for k in SPATIAL_KEYWORDS)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _question(qtype: str, scene: Scene, rng: np.random.Generator, want_yes: bool, relation: str) -> dict | None:
    """Build one question of `qtype` about `scene`, or None if the scene cannot host it with the wanted answer.
    `relation` is used by the yes/no relation types, so that they are balanced per relation too."""
    objs = scene.objects
    pick = objs[int(rng.integers(len(objs)))]
    if qtype == "color":
        return dict(question=f"what color is the {pick.shape} ?", answer=pick.color, subject=pick.shape)
    if qtype == "shape":
        return dict(question=f"what shape is the {pick.color} object ?", answer=pick.shape, subject=pick.shape)
    if qtype == "count":
        return dict(question="how many objects are there ?", answer=NUMBERS[len(objs)])
    if qtype == "exist":
        present = {(o.color, o.shape) for o in objs}
        if want_yes:
            color, shape = pick.color, pick.shape
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            color, shape = absent[int(rng.integers(len(absent)))]
        return dict(question=f"is there a {color} {shape} ?", answer=_yes_no(want_yes), subject=shape)
    if qtype == "where":
        return dict(question=f"where is the {pick.shape} ?", answer=pick.where, subject=pick.shape)
    if qtype == "side":
        axis = int(rng.integers(2))
        words, value = (COLS, pick.col) if axis else (ROWS, pick.row)
        ends = (0, GRID - 1)
        end = ends[int(rng.integers(2))] if not want_yes else value
        if end not in ends or (end == value) != want_yes:
            return None
        phrase = f"on the {words[end]}" if axis else f"at the {words[end]}"
        return dict(
            question=f"is the {pick.shape} {phrase} ?", answer=_yes_no(want_yes), subject=pick.shape, side=words[end]
        )
    if qtype in ("relation", "statement"):
        pairs = [(a, b) for a in objs for b in objs if a is not b and holds(a, b, relation) == want_yes]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        rel = relation
        if qtype == "relation":
            question = f"is the {a.shape} {rel} the {b.shape} ?"
        else:
            question = f"statement : the {a.shape} is {rel} the {b.shape} . is this correct ?"
        return dict(question=question, answer=_yes_no(want_yes), subject=a.shape, obj=b.shape, relation=rel)
    if qtype == "what_rel":
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        hits = [a for a in objs if a is not pick and holds(a, pick, rel)]
        if len(hits) != 1:
            return None
        return dict(
            question=f"what is {rel} the {pick.shape} ?",
            answer=hits[0].shape,
            subject=hits[0].shape,
            obj=pick.shape,
            relation=rel,
        )
    raise ValueError(f"unknown question type {qtype!r}; expected one of {sorted(QTYPES)}")


def make_sample(
    seed: int, split: str, index: int, qtypes: tuple[str, ...], cell_px: int, n_objects: tuple[int, ...] = (2, 3)
) -> Sample:
    """Sample `index` of `split`: its question type cycles through `qtypes`, its yes/no answer alternates with
    each cycle and the relation of a yes/no relation question with each second cycle, so types, answers and
    relations are balanced by construction (exactly, over any multiple of 8 cycles). Scenes are redrawn until one
    can host the question."""
    rng = rng_for(seed, split, index)
    cycle, t = divmod(index, len(qtypes))
    qtype, want_yes, relation = qtypes[t], cycle % 2 == 0, RELATIONS[(cycle // 2) % len(RELATIONS)]
    for _ in range(1000):
        scene = make_scene(rng, cell_px, int(rng.choice(n_objects)))
        q = _question(qtype, scene, rng, want_yes, relation)
        if q is not None:
            return Sample(split=split, index=index, qtype=qtype, scene=scene, **q)
    raise RuntimeError(f"no scene could host a {qtype!r} question (split {split!r}, index {index})")


def make_samples(
    seed: int,
    split: str,
    n: int,
    qtypes: tuple[str, ...] = tuple(QTYPES),
    cell_px: int = 16,
    n_objects: tuple[int, ...] = (2, 3),
    start: int = 0,
) -> list[Sample]:
    return [make_sample(seed, split, i, qtypes, cell_px, n_objects) for i in range(start, start + n)]


def check_answer(sample: Sample) -> bool:
    """Recompute a sample's answer from its scene's ground truth, independently of the question builder."""
    s, q = sample.scene, sample.question.split()
    if sample.qtype == "color":
        return sample.answer == s.by_shape(q[-2]).color
    if sample.qtype == "shape":
        return sample.answer == next(o.shape for o in s.objects if o.color == q[-3])
    if sample.qtype == "count":
        return sample.answer == NUMBERS[len(s.objects)]
    if sample.qtype == "exist":
        return sample.answer == _yes_no(any(o.color == q[-3] and o.shape == q[-2] for o in s.objects))
    if sample.qtype == "where":
        return sample.answer == s.by_shape(q[-2]).where
    if sample.qtype == "side":
        o, word = s.by_shape(q[2]), q[-2]
        return sample.answer == _yes_no(word in (ROWS[o.row], COLS[o.col]))
    if sample.qtype in ("relation", "statement"):
        triple = (sample.subject, sample.relation, sample.obj)
        return sample.answer == _yes_no(triple in s.relations)
    if sample.qtype == "what_rel":
        hits = [a for (a, r, b) in s.relations if r == sample.relation and b == sample.obj]
        return hits == [sample.answer]
    raise ValueError(sample.qtype)


# ---------------------------------------------------------------------------------------------------------------
# Prompts. One place defines how a sample becomes text, for the language model and for the VLM alike.
# The LM reads the scene as a caption where the VLM reads it as image tokens; everything else is the same.


def lm_prompt(caption: str, question: str) -> str:
    """The text-only stream (the paper's `Caption: {caption}\\nInstruction: {question}` in chat form)."""
    return f"user : {caption} {question} assistant :"


def vlm_prompt(question: str) -> str:
    """The VLM's chat prompt; `<image>` expands to one token per image patch."""
    return f"user : <image> {question} assistant :"
