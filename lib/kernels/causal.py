"""Causal checks of the attributed heads and features (METHOD.md, step 4): a yes/no statement benchmark and a
non-spatial multiple-choice control task, answered clean and under interventions: the top heads mean- or
zero-ablated (`ablate_heads`, with `mean_z`), as many random heads from the same layers, and each feature projected
out of the residual stream (`project_feature`). `causal_checks` runs them all into the ablation table.

An intervention is a function of a batch that returns a context manager installing the adapter's hooks
(`lib.kernels.adapter.patch_heads`, `project_out`); `combine` runs several at once.

Choices this module makes (the book states them):
- Ablations act at every position; mean ablation uses the head's mean z over the real non-BOS tokens (image and
  text alike) of a reference set. Feature projection acts at post-image positions only (the positions the metric
  reads, the answer position included).

Shape key (the adapter's key): b sequences (items) in a batch, s token positions, l layers, h attention heads,
k head width (d_head), v vocabulary; c candidate answers of the control task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lib.kernels.adapter import (
    VLM,
    Batch,
    HeadPatch,
    capture,
    iter_batches,
    next_token_logits,
    patch_heads,
    project_out,
    z_name,
)
from lib.kernels.attribution import Feature, Head, random_heads_like

Intervention = Callable[[Batch], AbstractContextManager]  # a context manager to run one batch under


@torch.no_grad()
def mean_z(vlm: VLM, batches: Iterable[Batch], layers: Sequence[int] | None = None) -> Tensor:
    """z_mean_lhk: each head's mean hook_z over the real non-BOS tokens of `batches` (mean ablation's value).
    Layers not asked for are NaN."""
    layers = list(range(vlm.n_layers)) if layers is None else [int(x) for x in layers]
    total = torch.zeros(vlm.n_layers, vlm.n_heads, vlm.d_head, dtype=torch.float64)
    n = 0
    for batch in batches:
        z = capture(vlm, batch, z_layers=layers).z
        keep_bs = batch.keep_bs
        for l in layers:
            total[l] += z[z_name(l)][keep_bs].double().sum(0).cpu()
        n += int(keep_bs.sum())
    assert n > 0, "mean_z got no tokens"
    out = total / n
    out[[l for l in range(vlm.n_layers) if l not in layers]] = torch.nan
    return out


def ablate_heads(vlm: VLM, heads: Sequence[Head], z_mean_lhk: Tensor | None = None) -> Intervention:
    """Mean ablation of `heads` at every position (`z_mean_lhk` from `mean_z`), or zero ablation when it is None."""
    patches = []
    for l, h in heads:
        if z_mean_lhk is None:
            value = torch.zeros(vlm.d_head)
        else:
            value = z_mean_lhk[l, h]
            assert torch.isfinite(value).all(), f"no mean z for L{l}H{h}: compute mean_z over its layer"
        patches.append(HeadPatch(int(l), int(h), value))
    return lambda _batch: patch_heads(vlm, patches)


def project_feature(vlm: VLM, feature: Feature, where: Literal["post_image", "all"] = "post_image") -> Intervention:
    """The feature's direction projected out of `blocks.{layer}.hook_resid_post` at the post-image positions
    (default) or at every position."""
    assert where in ("post_image", "all"), f"where must be 'post_image' or 'all', got {where!r}"
    return lambda batch: project_out(
        vlm, feature.layer, feature.direction_d, positions_bs=batch.post_image_bs if where == "post_image" else None
    )


class Statement(NamedTuple):
    """One true/false item: the model should answer yes iff `label`."""

    image: Any
    question: str
    label: bool
    relation: str = ""


class Choice(NamedTuple):
    """One multiple-choice item of the control task: `answer` is one of the candidate words."""

    image: Any
    question: str
    answer: str
    group: str = ""


def single_token_id(tokenizer, text: str) -> int:
    """The id of `text` if the tokenizer makes exactly one token of it (answer words must be single tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"answer word {text!r} is {len(ids)} tokens {ids} for this tokenizer; expected exactly one")
    return int(ids[0])


def _logits(vlm: VLM, images, questions, batch_size: int, intervention: Intervention | None) -> Tensor:
    out = []
    for batch in iter_batches(vlm, images, questions, batch_size):
        with intervention(batch) if intervention is not None else nullcontext():
            out.append(next_token_logits(vlm, batch).double().cpu())
    return torch.cat(out)


def yes_no_eval(
    vlm: VLM,
    statements: Sequence[Statement],
    yes_id: int,
    no_id: int,
    *,
    batch_size: int = 16,
    intervention: Intervention | None = None,
) -> pd.DataFrame:
    """Per item: P(yes) normalised over {yes, no} at the answer position, the answer (yes iff P(yes) > P(no)),
    whether it is correct and P(correct)."""
    assert statements, "no statements given"
    logits_bv = _logits(vlm, [s.image for s in statements], [s.question for s in statements], batch_size, intervention)
    p_yes = torch.softmax(logits_bv[:, [yes_id, no_id]], -1)[:, 0].numpy()
    label = np.array([bool(s.label) for s in statements])
    pred = p_yes > 0.5
    return pd.DataFrame(
        {
            "relation": [s.relation for s in statements],
            "label": label,
            "p_yes": p_yes,
            "answer_yes": pred,
            "correct": pred == label,
            "p_correct": np.where(label, p_yes, 1 - p_yes),
        }
    )


def choice_eval(
    vlm: VLM,
    choices: Sequence[Choice],
    candidate_ids: Mapping[str, int],
    *,
    batch_size: int = 16,
    intervention: Intervention | None = None,
) -> pd.DataFrame:
    """Per item of the control task: the candidate with the highest next-token logit, whether it is the answer, and
    P(answer) normalised over the candidates."""
    assert choices, "no control items given"
    words = list(candidate_ids)
    missing = sorted({c.answer for c in choices} - set(words))
    assert not missing, f"answers {missing} are not among the candidate words {words}"
    logits_bv = _logits(vlm, [c.image for c in choices], [c.question for c in choices], batch_size, intervention)
    p_bc = torch.softmax(logits_bv[:, [candidate_ids[w] for w in words]], -1).numpy()
    answer = np.array([words.index(c.answer) for c in choices])
    pred = p_bc.argmax(1)
    return pd.DataFrame(
        {
            "relation": [c.group for c in choices],
            "answer": [c.answer for c in choices],
            "predicted": [words[i] for i in pred],
            "correct": pred == answer,
            "p_correct": p_bc[np.arange(len(choices)), answer],
        }
    )


def summarise(per_item: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and mean P(correct) per relation (or control group), plus an 'all' row."""
    groups = per_item.groupby("relation", sort=True)[["correct", "p_correct"]].agg(["count", "mean"])
    table = pd.DataFrame(
        {
            "n": groups[("correct", "count")],
            "accuracy": groups[("correct", "mean")],
            "mean_p_correct": groups[("p_correct", "mean")],
        }
    )
    table.loc["all"] = [len(per_item), per_item["correct"].mean(), per_item["p_correct"].mean()]
    table["n"] = table["n"].astype(int)
    return table.rename_axis("relation").reset_index()


def ablation_table(causal: pd.DataFrame) -> pd.DataFrame:
    """The book's Table 2 from `causal_checks`' rows: accuracy and mean P(correct) on each task (relation 'all') per
    condition and ablation; the final features pooled as "each final feature", the random adapted features as
    "random adapted feature", random draws averaged. Columns `<task>: <metric>`."""
    pooled = causal.condition.where(~causal.condition.str.startswith("feature "), "each final feature")
    pooled = pooled.where(~causal.condition.str.startswith("random feature "), "random adapted feature")
    rows = causal.assign(condition=pooled)
    table = (
        rows[rows.relation == "all"]
        .groupby(["condition", "ablation", "task"])[["accuracy", "mean_p_correct"]]
        .mean()
        .unstack("task")
    )
    table.columns = [f"{task}: {metric}" for metric, task in table.columns]
    return table.reset_index()


def causal_checks(
    vlm: VLM,
    statements: Sequence[Statement],
    *,
    yes_id: int,
    no_id: int,
    heads: Sequence[Head],
    z_mean_lhk: Tensor,
    features: Sequence[Feature] = (),
    random_features: Sequence[Feature] = (),
    controls: Sequence[Choice] = (),
    candidate_ids: Mapping[str, int] | None = None,
    n_random: int = 3,
    seed: int = 0,
    batch_size: int = 16,
    feature_positions: Literal["post_image", "all"] = "post_image",
) -> pd.DataFrame:
    """The ablation table: accuracy and mean P(correct) per relation on the statement benchmark (and per group on
    the control task) for each condition:

    clean; `heads` mean- and zero-ablated; `n_random` draws of random heads from the same layers (seeds seed..,
    both ablations); each of `features` and of `random_features` projected out of the residual stream at its layer.

    One row per (condition, ablation, seed, task, relation). Seed is -1 where no randomness is involved.
    """
    assert not controls or candidate_ids is not None, "control items need candidate_ids (word -> token id)"
    conditions: list[tuple[str, str, int, Intervention | None]] = [("clean", "", -1, None)]
    for name, z in (("mean", z_mean_lhk), ("zero", None)):
        conditions.append(("top heads", name, -1, ablate_heads(vlm, heads, z)))
        for r in range(n_random):
            conditions.append(
                ("random heads", name, seed + r, ablate_heads(vlm, random_heads_like(heads, vlm.n_heads, seed + r), z))
            )
    for kind, group in (("feature", features), ("random feature", random_features)):
        for i, f in enumerate(group):
            conditions.append(
                (
                    f"{kind} {f.name or i}",
                    f"project {feature_positions}",
                    -1,
                    project_feature(vlm, f, feature_positions),
                )
            )
    rows = []
    for condition, ablation, s, intervention in conditions:
        tasks = [
            ("statement", yes_no_eval(vlm, statements, yes_id, no_id, batch_size=batch_size, intervention=intervention))
        ]
        if controls:
            tasks.append(
                ("control", choice_eval(vlm, controls, candidate_ids, batch_size=batch_size, intervention=intervention))
            )
        for task, per_item in tasks:
            table = summarise(per_item)
            table.insert(0, "task", task)
            table.insert(0, "seed", s)
            table.insert(0, "ablation", ablation)
            table.insert(0, "condition", condition)
            rows.append(table)
    return pd.concat(rows, ignore_index=True)


def statements_from_samples(samples) -> list[Statement]:
    """lib.world samples with a yes/no relation question as benchmark items (label: the answer is yes)."""
    bad = [s.index for s in samples if s.answer not in ("yes", "no") or not s.relation]
    assert not bad, f"samples {bad[:5]} are not yes/no relation questions"
    return [Statement(s.scene.render(), s.question, s.answer == "yes", s.relation) for s in samples]


def choices_from_samples(samples) -> list[Choice]:
    """lib.world samples as control items, grouped by question type (e.g. colour questions)."""
    return [Choice(s.scene.render(), s.question, s.answer, s.qtype) for s in samples]


# ---------------------------------------------------------------------------------------------------------------
# Convenience: several interventions at once


def combine(*interventions: Intervention) -> Intervention:
    """One intervention that runs all of `interventions` (they compose: each installs its own hooks)."""

    @contextmanager
    def run(batch: Batch):
        with ExitStack() as stack:
            for make in interventions:
                stack.enter_context(make(batch))
            yield

    return run
