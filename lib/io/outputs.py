"""What a chapter writes: figures (PNG for the page, PDF for print) and tables (CSV), at predictable paths.

    <outputs>/figures/<profile>/<chapter>/<name>.png|.pdf
    <outputs>/tables/<profile>/<chapter>/<name>.csv

The outputs root is the repository's `book/` unless the environment variable SPATIAL_BOOK_OUTPUTS names another;
the runner (lib/io/runner.py) sets it for the kernels it starts, so a test run writes into its own temporary
directory. `python -m lib.io.runner --check` compares these files with the outputs each chapter declares.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

BOOK_DIR = Path(__file__).resolve().parents[2] / "book"
OUTPUTS_ENV = "SPATIAL_BOOK_OUTPUTS"  # the runner's name for it too (lib.io.runner.OUTPUTS_ENV)


def outputs_root() -> Path:
    """Where figures and tables go: SPATIAL_BOOK_OUTPUTS when set, else the repository's book/."""
    return Path(os.environ.get(OUTPUTS_ENV) or BOOK_DIR)


def style() -> None:
    """One look for every figure in the book."""
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)
    matplotlib.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "savefig.bbox": "tight",
            "axes.titleweight": "bold",
            "figure.autolayout": False,
        }
    )


def _display(obj, text: str) -> None:
    """Show `obj` in a notebook; in plain Python (`python chapters/01_world.py`) print `text` instead, since
    IPython's display would print the object's repr."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(text)
        return
    display(obj)


class Outputs:
    """`out = Outputs("01_world", profile)`; then `out.figure(fig, "scene_grid")` and `out.table(df, "counts")`.

    `root` defaults to `outputs_root()`, read when the Outputs is made."""

    def __init__(self, chapter: str, profile_name: str, root: Path | None = None):
        root = Path(root) if root is not None else outputs_root()
        self.chapter = chapter
        self.figures = root / "figures" / profile_name / chapter
        self.tables = root / "tables" / profile_name / chapter
        style()

    def figure(self, fig: plt.Figure, name: str) -> None:
        """Save `fig` as PNG and PDF, show the PNG in the notebook, and close it."""
        self.figures.mkdir(parents=True, exist_ok=True)
        png = self.figures / f"{name}.png"
        fig.savefig(png)
        fig.savefig(self.figures / f"{name}.pdf")
        plt.close(fig)
        try:
            from IPython.display import Image
        except ImportError:
            Image = None
        _display(Image(filename=str(png)) if Image else None, f"[figure {self.chapter}/{name}: {png.name}]")

    def table(self, df: pd.DataFrame, name: str, show: bool = True, float_format: str = "{:.3f}") -> None:
        """Save `df` as CSV (full precision) and show it rounded for reading."""
        self.tables.mkdir(parents=True, exist_ok=True)
        path = self.tables / f"{name}.csv"
        df.to_csv(path, index=False)
        if show:
            floats = df.select_dtypes("float").columns
            text = df.to_string(index=False, formatters={c: float_format.format for c in floats})
            _display(df.style.format(float_format, subset=floats).hide(axis="index"), f"[table {name}]\n{text}")
