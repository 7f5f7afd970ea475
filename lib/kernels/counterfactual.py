"""A lexical test that can see words (chapter 7; organism only): does a feature read the image, or the words?

The paper's lexical filter (lib/kernels/lexical.py) swaps a top sample's question for direction-free prompts and
asks whether the feature still fires. On the organism it cannot fail a word-reader: the prompt is
`<bos> user : <image> {question} assistant :`, so under causal attention the image tokens never see the question
(its "image" reading is the same under every prompt), its "all" reading passes any feature that fires on the image,
and four of its five prompts hold words no training stream contains. This module gives the test the parts it lacks:

- `IN_VOCAB_PROMPTS`: direction-free prompts built from the organism's own training streams (`stream_words`), each
  a question or instruction the VLM was trained on; `prompt_words` checks a prompt set against the streams and
  against `SPATIAL_WORDS`. The lexical filter re-run with them reads `post_image` (the prompt text after the image).
- Counterfactual twins of a relation question (`make_twins`): the **object swap** (the two named objects exchange
  cells, the words stay) and the **word swap** (the relation word becomes its opposite, the image stays). Both flip
  the truth exactly when the two objects differ along the relation's axis; only those pairs are kept.
- `twin_readout`: every SAE feature at the answer position (the last token) and its maximum over the post-image
  text, plus the organism's own yes-minus-no logit, on originals and twins in one forward pass each.
- `sensitivity`, `classify`: per feature, how far each swap moves it, normalised by its mean activation, and the
  rule that calls it lexical ("reads the words, not the image") or spatial ("follows the image").

Shape key: n samples (pairs), f SAE features, b sequences of a batch, s positions, d model width.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from lib.kernels.adapter import VLM, capture, decoder, prepare
from lib.names import resid_name
from lib.sources import world as W

# ---------------------------------------------------------------------------------------------------------------
# The words a direction-free prompt may use

# Words that locate something. Beyond the keyword split (rows, columns, relations, "where"): in the training
# streams "of" occurs only inside "left of" / "right of", "at" only before a row word (captions: "is at top left";
# side questions: "at the top") and "on" only before a column ("on the left"), so each announces a position.
# (tests/test_counterfactual.py checks that claim on the streams.)
SPATIAL_WORDS = frozenset({*W.SPATIAL_KEYWORDS, *" ".join(W.RELATIONS).split(), *W.ROWS, *W.COLS, "of", "at", "on"})

# Direction-free prompts in the organism's own words: each is a question or an instruction of its training streams,
# every word of it occurs in the VLM's stage-2 stream (`stream_words`), and none is in SPATIAL_WORDS.
IN_VOCAB_PROMPTS = (
    # The caption instruction of VLM stages 1 and 2 (organism_training.CAPTION_PROMPT), the in-distribution twin of
    # the paper's "describe how the items are arranged": its trained answer, the caption, states the layout.
    "describe the image .",
    # The count question, word for word; it holds whatever the scene.
    "how many objects are there ?",
    # An exist question: its answer is yes or no whatever the scene, so it never presupposes an absent object.
    "is there a red circle ?",
    # A colour lookup and a shape lookup: the two other non-spatial question types. They name one shape / colour,
    # which the scene may lack (a false premise: the words are in distribution, the question then is not).
    "what color is the square ?",
    "what shape is the blue object ?",
)


def stream_texts(seed: int = 0, n: int = 900, instructions: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Texts of the organism's training streams, drawn as its training draws them (lib/sources/organism_training):
    `lm` = `lm_prompt(caption, question) answer` (the base LM), `vlm` = `vlm_prompt(question) answer` and a
    caption instruction with the caption as its answer (VLM stages 1 and 2; `instructions` in turn, as the
    profile's `vlm.caption_prompts` gives them: "describe the image ." when None). Samples of two or three objects
    of every question type, plus one-object scenes of the non-relational types; n = 900 is 100 cycles of the nine
    types, enough to produce every word a template can."""
    from lib.sources.organism_training import CAPTION_PROMPT, NON_RELATIONAL

    instructions = instructions or (CAPTION_PROMPT,)

    samples = W.make_samples(seed, "vlm-train", n) + W.make_samples(
        seed, "vlm-train-single", n // 3, qtypes=NON_RELATIONAL, n_objects=(1,)
    )
    lm = [f"{W.lm_prompt(s.scene.caption(), s.question)} {s.answer}" for s in samples]
    vlm = [f"{W.vlm_prompt(s.question)} {s.answer}" for s in samples]
    vlm += [f"{W.vlm_prompt(instructions[i % len(instructions)])} {s.scene.caption()}" for i, s in enumerate(samples)]
    return {"lm": lm, "vlm": vlm}


def stream_words(texts: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """One row per word of the streams: how often it occurs in each (`lm`, `vlm`: counts), `spatial`."""
    counts = {name: Counter(w for t in ts for w in t.split() if w != "<image>") for name, ts in texts.items()}
    words = sorted(set().union(*counts.values()))
    df = pd.DataFrame({"word": words, **{name: [c[w] for w in words] for name, c in counts.items()}})
    df["spatial"] = df.word.isin(SPATIAL_WORDS)
    return df


def prompt_words(prompts: Sequence[str], words: pd.DataFrame, stream: str = "vlm") -> pd.DataFrame:
    """Per prompt: the words that never occur in `stream` (untrained embeddings there) and the spatial words."""
    seen = set(words.word[words[stream] > 0])
    rows = []
    for p in prompts:
        ws = p.split()
        rows.append(
            dict(
                prompt=p,
                unseen=" ".join(w for w in ws if w not in seen),
                spatial=" ".join(w for w in ws if w in SPATIAL_WORDS),
            )
        )
    out = pd.DataFrame(rows)
    out["in_vocabulary"] = out.unseen == ""
    out["direction_free"] = out.spatial == ""
    return out


def prompt_spread(max_sp: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How much the prompt matters to each reading of a lexical filter run (`max_sp`: layer, feature, reading, rank,
    prompt, max_act). Per (reading, feature, top sample) the spread = max - min over the prompts of the feature's
    maximum activation; returns (the spreads, a summary per reading: mean, median, max, share of spreads > 0).
    A reading whose spread is 0 everywhere cannot tell one prompt from another, whatever its words."""
    spread = (
        max_sp.groupby(["reading", "layer", "feature", "rank"], sort=False)
        .max_act.agg(lambda a: float(a.max() - a.min()))
        .rename("spread")
        .reset_index()
    )
    summary = spread.groupby("reading", sort=False).spread.agg(
        n="size", mean="mean", median="median", max="max", share_nonzero=lambda a: float((a > 0).mean())
    )
    return spread, summary.reset_index()


# ---------------------------------------------------------------------------------------------------------------
# Twins

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def swap_cells(scene: W.Scene, shape_a: str, shape_b: str) -> W.Scene:
    """The scene with the objects `shape_a` and `shape_b` in each other's cells. Each keeps its size and its offset
    inside its cell (the box moves by whole cells), so the new image is a scene the world could have drawn."""
    a, b = scene.by_shape(shape_a), scene.by_shape(shape_b)
    assert a is not b, f"cannot swap {shape_a!r} with itself"

    def moved(o: W.Obj, to: W.Obj) -> W.Obj:
        dx, dy = (to.col - o.col) * scene.cell_px, (to.row - o.row) * scene.cell_px
        x0, y0, x1, y1 = o.box
        return dataclasses.replace(o, row=to.row, col=to.col, box=(x0 + dx, y0 + dy, x1 + dx, y1 + dy))

    objs = [moved(a, b) if o is a else moved(b, a) if o is b else o for o in scene.objects]
    return W.Scene(tuple(sorted(objs, key=lambda o: (o.row, o.col))), scene.cell_px)


def _truth(scene: W.Scene, s: W.Sample, relation: str) -> bool:
    return W.holds(scene.by_shape(s.subject), scene.by_shape(s.obj), relation)


def object_twin(s: W.Sample) -> W.Sample:
    """Same words, the two named objects swapped in the image; the answer recomputed from the new scene."""
    scene = swap_cells(s.scene, s.subject, s.obj)
    return dataclasses.replace(s, scene=scene, answer="yes" if _truth(scene, s, s.relation) else "no")


def word_twin(s: W.Sample) -> W.Sample:
    """Same image, the relation word replaced by its opposite (left of <-> right of, above <-> below)."""
    new = OPPOSITE[s.relation]
    old_phrase, new_phrase = f"{s.relation} the {s.obj}", f"{new} the {s.obj}"
    assert s.question.count(old_phrase) == 1, f"{s.question!r} does not name {old_phrase!r} once"
    question = s.question.replace(old_phrase, new_phrase)
    answer = "yes" if _truth(s.scene, s, new) else "no"
    return dataclasses.replace(s, question=question, relation=new, answer=answer)


class Twins(NamedTuple):
    """The kept pairs (the truth flips under both swaps): originals and their two twins, aligned; `direction_n` is
    +1 where the twins' answer is yes (the original's no), -1 otherwise; `summary` counts, per relation and
    template, the pairs asked and the pairs kept."""

    original: list[W.Sample]
    image: list[W.Sample]
    word: list[W.Sample]
    direction_n: np.ndarray
    summary: pd.DataFrame


def make_twins(samples: Sequence[W.Sample]) -> Twins:
    """Both twins of every relation / statement sample; pairs whose truth does not flip under both are dropped.
    (The two swaps flip the same pairs: the object swap reverses the two objects' order along the relation's axis,
    the word swap asks for the reverse order, and both change the truth exactly when that order is strict.)"""
    rows, kept = [], ([], [], [])
    for s in samples:
        assert s.qtype in ("relation", "statement") and s.relation, f"sample {s.index}: not a relation question"
        img, word = object_twin(s), word_twin(s)
        flips = img.answer != s.answer and word.answer != s.answer
        rows.append(dict(relation=s.relation, template=s.qtype, flips=flips))
        if flips:
            for bucket, x in zip(kept, (s, img, word), strict=True):
                bucket.append(x)
    direction_n = np.array([1 if t.answer == "yes" else -1 for t in kept[1]], dtype=np.int8)
    summary = (
        pd.DataFrame(rows, columns=["relation", "template", "flips"])
        .groupby(["relation", "template"], sort=False)
        .flips.agg(n="size", n_flipped="sum")
        .reset_index()
    )
    return Twins(*kept, direction_n, summary)


# ---------------------------------------------------------------------------------------------------------------
# Read-out

POSITIONS = ("answer", "post_image")


class Readout(NamedTuple):
    """`codes[position][layer]`: z_nf of every feature (answer = the last token; post_image = the maximum over the
    text after the image, the last token included); `margin_n`: the organism's logit of "yes" minus "no"."""

    codes: dict[str, dict[int, np.ndarray]]
    margin_n: np.ndarray


@torch.no_grad()
def twin_readout(
    vlm: VLM, encode_by_layer: Mapping[int, Callable], samples: Sequence[W.Sample], batch_size: int = 64
) -> Readout:
    """One forward pass per batch through every layer: the SAE codes of `encode_by_layer` at the two readings, and
    the next-token logits from the last block's residual (final norm, then the head: what the model answers)."""
    layers = list(range(vlm.n_layers))
    codes: dict[str, dict[int, list]] = {p: {layer: [] for layer in encode_by_layer} for p in POSITIONS}
    yes, no = (int(vlm.tokenizer.convert_tokens_to_ids(w)) for w in ("yes", "no"))
    head, norm = vlm.model.lm_head, decoder(vlm.model).norm
    margins = []
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        batch = prepare(vlm, [s.scene.render() for s in chunk], [s.question for s in chunk])
        resid = capture(vlm, batch, resid_layers=layers).resid
        rows_b = torch.arange(len(chunk))
        last_b = batch.lengths_b - 1
        b_n, s_n = (batch.post_image_bs & batch.keep_bs).nonzero(as_tuple=True)
        for layer, encode in encode_by_layer.items():
            x_bsd = resid[resid_name(layer)].float()
            codes["answer"][layer].append(encode(x_bsd[rows_b, last_b]).float().cpu())
            z_nf = encode(x_bsd[b_n, s_n]).float().cpu()
            max_bf = torch.zeros(len(chunk), z_nf.shape[1]).scatter_reduce_(
                0, b_n.cpu()[:, None].expand_as(z_nf), z_nf, "amax"
            )
            codes["post_image"][layer].append(max_bf)
        logits_bv = head(norm(resid[resid_name(layers[-1])][rows_b, last_b])).float()
        margins.append((logits_bv[:, yes] - logits_bv[:, no]).cpu())
    out = {p: {layer: torch.cat(z).numpy() for layer, z in by.items()} for p, by in codes.items()}
    for by in out.values():
        for z in by.values():
            assert (z >= 0).all(), "SAE activations must be non-negative (ReLU / TopK / JumpReLU SAEs)"
    return Readout(out, torch.cat(margins).numpy())


def split_readout(readout: Readout, n: int) -> dict[str, Readout]:
    """A read-out of `original + image + word` (n each, in that order) cut into the three versions."""
    parts = {}
    for i, name in enumerate(("original", "image", "word")):
        sl = slice(i * n, (i + 1) * n)
        codes = {p: {layer: z[sl] for layer, z in by.items()} for p, by in readout.codes.items()}
        parts[name] = Readout(codes, readout.margin_n[sl])
    return parts


def answer_follow(parts: Mapping[str, Readout], twins: Twins) -> pd.DataFrame:
    """The organism's own answer (yes where margin > 0) on originals and twins: accuracy against the truth, and how
    often its answer flips with the twin's truth."""
    versions = {"original": twins.original, "image": twins.image, "word": twins.word}
    truth = {k: np.array([s.answer == "yes" for s in v], dtype=bool) for k, v in versions.items()}
    said = {k: parts[k].margin_n > 0 for k in truth}
    return pd.DataFrame(
        [
            dict(version=k, n=len(truth[k]), accuracy=float((said[k] == truth[k]).mean()) if len(truth[k]) else np.nan)
            | (dict(answer_flips=float((said[k] != said["original"]).mean())) if k != "original" else {})
            for k in truth
        ]
    )


# ---------------------------------------------------------------------------------------------------------------
# Sensitivity and the corrected lexical flag


def sensitivity(z_orig_nf: np.ndarray, z_image_nf: np.ndarray, z_word_nf: np.ndarray, direction_n) -> pd.DataFrame:
    """Per feature (column), how far each swap moves it:

    - `mean_act`: the mean activation over the three versions of every pair;
    - `s_image`, `s_word`: mean |Δz| under the object swap / the word swap, divided by `mean_act`. Scale-free, in
      [0, 3] (|Δz| <= z + z', and the two versions compared hold at most all of the three versions' mass), 0 for a
      feature the swap leaves alone, comparable across features whatever their magnitude, and with one denominator
      for both swaps, so s_word / s_image is exactly the ratio of the mean moves. It counts a move in either
      direction, so it sees a feature that reads *where the objects are* (which need not agree with the asked
      relation's truth) as well as one that reads the answer;
    - `align_image`, `align_word`: mean(direction · Δz) / mean |Δz| in [-1, 1]: +1 when every move goes the way the
      truth goes (a "yes" feature), -1 against it (a "no" feature), near 0 for a move unrelated to the truth."""
    d_n = np.asarray(direction_n, dtype=np.float64)[:, None]
    z0, zi, zw = (np.asarray(z, dtype=np.float64) for z in (z_orig_nf, z_image_nf, z_word_nf))
    assert z0.shape == zi.shape == zw.shape and z0.shape[0] == len(d_n), "three aligned (n, f) matrices"
    mean_f = (z0.mean(0) + zi.mean(0) + zw.mean(0)) / 3
    out = {"mean_act": mean_f}
    for name, z in (("image", zi), ("word", zw)):
        delta = z - z0
        moved = np.abs(delta).mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"s_{name}"] = np.where(mean_f > 0, moved / mean_f, np.nan)
            out[f"align_{name}"] = np.where(moved > 0, (d_n * delta).mean(0) / moved, np.nan)
    return pd.DataFrame(out)


def sensitivity_table(parts: Mapping[str, Readout], direction_n) -> pd.DataFrame:
    """`sensitivity` of every feature of every layer at both readings: one row per (position, layer, feature)."""
    frames = []
    for position in POSITIONS:
        for layer, z0 in parts["original"].codes[position].items():
            df = sensitivity(
                z0, parts["image"].codes[position][layer], parts["word"].codes[position][layer], direction_n
            )
            df.insert(0, "feature", np.arange(z0.shape[1]))
            df.insert(0, "layer", layer)
            df.insert(0, "position", position)
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


@dataclasses.dataclass(frozen=True)
class LexicalRule:
    """The corrected lexical test's rule (`classify`). `min_sensitivity`: a swap that moves the feature by less than
    this share of its mean activation is not read (0.1: a tenth of its typical value, on average over the pairs).
    `ratio`: "reads the words, not the image" when the word swap moves it at least this many times as far as the
    object swap (10: an order of magnitude. Both swaps change the answer, so a feature that reads the answer moves
    under both, and the object swap changes the image tokens every later position attends to, so a small move under
    it is no sign of reading the layout; on the default organism the log ratio at the answer position has a valley
    between 5 and 20, between the features that move alike under both swaps and those that move with the word
    alone). `min_align`: "tracks the truth" when both swaps move it the truth's way (same sign) with at least this
    alignment."""

    min_sensitivity: float = 0.1
    ratio: float = 10.0
    min_align: float = 0.5

    def __post_init__(self):
        assert self.min_sensitivity > 0 and self.ratio >= 1 and 0 <= self.min_align <= 1, f"bad rule {self}"


CLASSES = ("silent", "insensitive", "lexical", "spatial")


def classify(table: pd.DataFrame, rule: LexicalRule = LexicalRule()) -> pd.DataFrame:
    """Adds the classes of `sensitivity` rows, in order of precedence:

    - `silent`: it never fires on these prompts at this reading (mean_act = 0);
    - `lexical` (reads the words, not the image): s_word >= min_sensitivity and s_word >= ratio x s_image;
    - `spatial` (follows the image): s_image >= min_sensitivity and not lexical;
    - `insensitive`: neither swap moves it enough.

    `passes` = spatial (the survivors of the corrected test, as `lexical` = True marks the paper's survivors) and
    `tracks_truth` = spatial features whose moves under both swaps go the truth's way (or both against it)."""
    out = table.copy()
    s_img, s_word = out.s_image.fillna(0), out.s_word.fillna(0)
    silent = ~(out.mean_act > 0)
    lexical = ~silent & (s_word >= rule.min_sensitivity) & (s_word >= rule.ratio * s_img)
    spatial = ~silent & ~lexical & (s_img >= rule.min_sensitivity)
    out["class"] = np.select([silent, lexical, spatial], ["silent", "lexical", "spatial"], "insensitive")
    out["passes"] = spatial
    a_img, a_word = out.align_image.fillna(0), out.align_word.fillna(0)
    same_way = np.sign(a_img) == np.sign(a_word)
    strong = np.minimum(a_img.abs(), a_word.abs()) >= rule.min_align
    out["tracks_truth"] = spatial & (s_word >= rule.min_sensitivity) & same_way & strong
    return out


def feature_verdict(classified: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, feature): its class read where it fires, i.e. at the answer position if it fires there on
    these questions, otherwise over the post-image text (`reading` says which). The paper's features were selected
    by firing on question text, and many never fire at the last token."""
    by = {p: classified[classified.position == p].set_index(["layer", "feature"]) for p in POSITIONS}
    answer, post = by["answer"], by["post_image"].reindex(by["answer"].index)
    use_post = answer["class"] == "silent"
    out = answer.where(~use_post, post).drop(columns="position")
    out.insert(0, "reading", np.where(use_post, "post_image", "answer"))
    return out.reset_index()


def class_counts(classified: pd.DataFrame, by: Sequence[str] = ("position",)) -> pd.DataFrame:
    """Features per class (columns in CLASSES order), per `by` group."""
    counts = classified.groupby([*by, "class"]).size().unstack("class", fill_value=0)
    return counts.reindex(columns=list(CLASSES), fill_value=0)


# ---------------------------------------------------------------------------------------------------------------
# Against the reference set


def precision_recall(selected, reference) -> dict:
    """Precision and recall of a boolean selection against a boolean reference (same rows)."""
    sel, ref = np.asarray(selected, dtype=bool), np.asarray(reference, dtype=bool)
    assert sel.shape == ref.shape, f"{sel.shape} vs {ref.shape}"
    both = int((sel & ref).sum())
    return dict(
        n_selected=int(sel.sum()),
        n_reference=int(ref.sum()),
        n_both=both,
        precision=both / sel.sum() if sel.sum() else np.nan,
        recall=both / ref.sum() if ref.sum() else np.nan,
    )


def compare_selections(
    table: pd.DataFrame, selections: Mapping[str, str], reference: str = "reference"
) -> pd.DataFrame:
    """One row per named selection (a boolean column of `table`): its precision and recall against `reference`."""
    ref = table[reference].fillna(False).astype(bool)
    return pd.DataFrame(
        [
            dict(selection=name) | precision_recall(table[col].fillna(False).astype(bool), ref)
            for name, col in selections.items()
        ]
    )


def against_reference(
    table: pd.DataFrame, vocab: pd.DataFrame, verdict: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's final set and the corrected tests, each against the reference set.

    `table`: the followed variant's features with `adapted`, `spatial`, `final` and `reference` (the referee's
    table); `vocab`: the lexical filter re-run with in-vocabulary prompts (per candidate, `lexical_post_image`);
    `verdict`: `feature_verdict` of the counterfactual test. Returns the merged table (one boolean column per
    selection) and one row of precision and recall per selection."""
    t = table.merge(vocab[["layer", "feature", "lexical_post_image"]], on=["layer", "feature"], how="left")
    cf = verdict[["layer", "feature", "reading", "class", "passes", "tracks_truth"]].add_prefix("cf_")
    t = t.merge(cf.rename(columns={"cf_layer": "layer", "cf_feature": "feature"}), on=["layer", "feature"], how="left")
    flag = lambda c: t[c].fillna(False).astype(bool)  # noqa: E731
    candidates = flag("adapted") & flag("spatial")
    t["sel_paper_final"] = flag("final")
    t["sel_vocab_post_image"] = candidates & flag("lexical_post_image")
    t["sel_candidates_cf"] = candidates & flag("cf_passes")
    t["sel_cf"] = flag("cf_passes")
    t["sel_cf_truth"] = flag("cf_tracks_truth")
    rows = compare_selections(t, SELECTIONS)
    return t, rows


SELECTIONS = {
    "paper: adapted, spatial, lexical filter ('all' reading, its prompts)": "sel_paper_final",
    "adapted, spatial, lexical filter ('post_image' reading, in-vocabulary prompts)": "sel_vocab_post_image",
    "adapted, spatial, counterfactual test": "sel_candidates_cf",
    "counterfactual test alone (every feature)": "sel_cf",
    "counterfactual test, tracks the truth (every feature)": "sel_cf_truth",
}
