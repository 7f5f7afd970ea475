"""Figures of the world chapter (chapter 1): rendered scenes and the census table in, a matplotlib `Figure` out.

- `plot_scene_grid`: one scene per question type, with the vision tower's patch grid, its question and answer.
- `plot_answer_counts`: per question type, how its answers spread over the training census.

Shape key: y / x = pixel rows / columns, c = colour channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lib.figures.style import image_axes


def short_question(question: str) -> str:
    """A question as a figure label: a statement without its "statement : ... . is this correct ?" frame."""
    return question.replace("statement : ", "").replace(" . is this correct ?", " ?")


def plot_scene_grid(
    images_yxc: Sequence[np.ndarray],
    qtypes: Sequence[str],
    questions: Sequence[str],
    answers: Sequence[str],
    patch_px: int,
) -> Figure:
    """Nine scenes on a 3 x 3 grid, each titled with its question type and labelled with its question and answer;
    thin white lines mark the `patch_px` patches the vision tower cuts each image into."""
    fig, axes = plt.subplots(3, 3, figsize=(8.5, 10))
    for ax, image, qtype, question, answer in zip(axes.flat, images_yxc, qtypes, questions, answers, strict=True):
        ax.imshow(image, interpolation="nearest")
        for t in range(0, image.shape[0] + 1, patch_px):
            ax.axhline(t - 0.5, color="white", lw=0.3, alpha=0.35)
            ax.axvline(t - 0.5, color="white", lw=0.3, alpha=0.35)
        image_axes(ax)
        ax.set_title(qtype, fontsize=11)
        ax.set_xlabel(f"{short_question(question)}\n→ {answer}", fontsize=9)
    fig.suptitle("One sample per question type")
    fig.tight_layout()
    return fig


def plot_answer_counts(census: pd.DataFrame, qtypes: Sequence[str]) -> Figure:
    """One stacked bar per question type (in the order `qtypes`), split into its answers, over the census rows of
    the training split (`split == "train"`; columns `qtype`, `answer`)."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    counts = census[census.split == "train"].groupby(["qtype", "answer"]).size().unstack(fill_value=0)
    counts = counts.loc[list(qtypes)]
    counts.plot.barh(stacked=True, ax=ax, legend=False, colormap="tab20", width=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("samples in the training census")
    ax.set_ylabel("")
    ax.set_title("Question types and the spread of their answers")
    return fig
