"""What a chapter writes: figures (PNG for the page, PDF for print) and tables (CSV), at predictable paths.

    book/figures/<profile>/<chapter>/<name>.png|.pdf
    book/tables/<profile>/<chapter>/<name>.csv

The runner (`lib/runner.py --check`) compares these files with the outputs each chapter declares in its header.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

BOOK_DIR = Path(__file__).resolve().parents[2] / "book"


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


def _display(obj) -> None:
    try:
        from IPython.display import display
    except ImportError:  # plain Python: nothing to show
        return
    display(obj)


class Outputs:
    """`out = Outputs("01_world", profile)`; then `out.figure(fig, "scene_grid")` and `out.table(df, "counts")`."""

    def __init__(self, chapter: str, profile_name: str, root: Path = BOOK_DIR):
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

            _display(Image(filename=str(png)))
        except ImportError:
            pass

    def table(self, df: pd.DataFrame, name: str, show: bool = True, float_format: str = "{:.3f}") -> None:
        """Save `df` as CSV (full precision) and show it rounded for reading."""
        self.tables.mkdir(parents=True, exist_ok=True)
        path = self.tables / f"{name}.csv"
        df.to_csv(path, index=False)
        if show:
            _display(df.style.format(float_format, subset=df.select_dtypes("float").columns).hide(axis="index"))
