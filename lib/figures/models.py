"""Figures of the models chapter (chapter 2): training curves, accuracy tables and free answers in, a matplotlib
`Figure` out. No torch here: the chapter passes the lists and tables the training artifacts hold.

- `plot_training_curves`: loss per step of each training run, with a running mean.
- `plot_heldout_accuracy`: held-out accuracy per question type during training, one panel per model.
- `plot_accuracy`: final held-out accuracy per question type (`steps.heldout_accuracy`'s table) against targets.
- `plot_free_answers`: scenes with the VLM's greedy answer and the true one.

Shape key: y / x = pixel rows / columns, c = colour channels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lib.figures.style import image_axes
from lib.figures.world import short_question

Curve = Sequence[Sequence[float]]  # (step, loss, wall seconds) per training step, as the training artifacts store it
History = Sequence[tuple[int, Mapping[str, float]]]  # (step, accuracy per question type) per held-out evaluation
LINESTYLES = {"lookup": ":", "absolute": "--", "relational": "-"}  # by question family


def smooth(y: Sequence[float], k: int = 25) -> np.ndarray:
    """Running mean over `k` points (fewer when the series is shorter), only where the window is full."""
    y = np.asarray(y, dtype=float)
    k = max(1, min(k, len(y)))
    return np.convolve(y, np.ones(k) / k, mode="valid")


def plot_training_curves(curves: Mapping[str, Curve]) -> Figure:
    """One panel per training run (title -> curve): the loss per step in grey, its running mean over 25 steps in
    blue, log scale. An empty curve (a stage of 0 steps) leaves its panel empty."""
    fig, axes = plt.subplots(1, len(curves), figsize=(15, 3.4))
    for ax, (title, curve) in zip(axes, curves.items(), strict=True):
        if curve:
            loss = [c[1] for c in curve]
            ax.plot(loss, color="0.8", lw=0.6)
            ax.plot(np.arange(len(smooth(loss))) + min(25, len(loss)) // 2, smooth(loss), color="C0")
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss (nats / token)")
    fig.tight_layout()
    return fig


def plot_heldout_accuracy(histories: Mapping[str, History], families: Mapping[str, str]) -> Figure:
    """Two panels (model name -> history): held-out accuracy of every question type (`families`: question type ->
    its family, in legend order) over training steps, the line style telling the family."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, (name, hist) in zip(axes, histories.items(), strict=True):
        steps = [h[0] for h in hist]
        for q in families:
            ax.plot(steps, [h[1][q] for h in hist], LINESTYLES[families[q]], marker="o", ms=3, label=q)
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("held-out accuracy")
    axes[1].legend(
        fontsize=8,
        ncol=1,
        bbox_to_anchor=(1.01, 1),
        loc="upper left",
        title="dotted: lookup\ndashed: absolute\nsolid: relational",
        title_fontsize=7.5,
    )
    fig.tight_layout()
    return fig


def plot_accuracy(accuracy: pd.DataFrame) -> Figure:
    """Per question type: the base LM on captions, the VLM on images and on the mean image (bars), the VLM's
    target (a black tick over its bar) and the best guess from the question's text, the chance level of a model
    that cannot see (a red tick over the mean-image bar). Columns: qtype, family, question_prior, lm_text,
    vlm_image, vlm_mean_image, vlm_target."""
    fig, ax = plt.subplots(figsize=(10, 3.8))
    x = np.arange(len(accuracy))
    bars = [("lm_text", "C0"), ("vlm_image", "C1"), ("vlm_mean_image", "C7")]
    labels = {"lm_text": "base LM, caption", "vlm_image": "VLM, image", "vlm_mean_image": "VLM, mean image"}
    for i, (col, color) in enumerate(bars):
        ax.bar(x + (i - 1) * 0.25, accuracy[col], 0.25, color=color, label=labels[col])
    ax.scatter(x, accuracy.vlm_target, marker="_", s=250, color="k", zorder=3, label="VLM target")
    ax.scatter(
        x + 0.25, accuracy.question_prior, marker="_", s=250, color="C3", zorder=3, label="guess from the question"
    )
    ax.set_xticks(x, [f"{q}\n({f})" for q, f in zip(accuracy.qtype, accuracy.family, strict=True)], fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return fig


def plot_free_answers(
    images_yxc: Sequence[np.ndarray],
    qtypes: Sequence[str],
    questions: Sequence[str],
    answers: Sequence[str],
    truths: Sequence[str],
) -> Figure:
    """One panel per scene: its question, the VLM's free answer (✓ when it equals the truth) and the truth."""
    fig, axes = plt.subplots(1, len(images_yxc), figsize=(2.0 * len(images_yxc), 3.2))
    for ax, image, qtype, question, answer, truth in zip(
        axes, images_yxc, qtypes, questions, answers, truths, strict=True
    ):
        ax.imshow(image, interpolation="nearest")
        image_axes(ax)
        ok = "✓" if answer == truth else "✗"
        ax.set_title(qtype, fontsize=9)
        ax.set_xlabel(f"{short_question(question)}\nVLM: {answer} {ok}\ntruth: {truth}", fontsize=7.5, wrap=True)
    fig.tight_layout()
    return fig
