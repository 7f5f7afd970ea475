"""Compare the tables of two book builds: `python -m lib.io.diff_tables OLD_DIR NEW_DIR`.

Each directory is a `book/tables/<profile>/` (one folder per chapter, CSV files). For every CSV in either build it
prints whether it is missing on one side, whether its columns or row count differ, and for each shared column
whether the values are equal: exactly for text and integers, and for floats the largest absolute and relative
difference. Columns whose names say they are wall-clock times (`seconds`, `*_s`, `speedup`, `wall`) are reported
apart: two runs never agree on them. Exit status 1 if any non-timing value differs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

TIMING = re.compile(r"(^|_)(seconds|s|speedup|wall|share_of_ideal|time)($|_)|_s_")


def _is_timing(column: str) -> bool:
    return bool(TIMING.search(column))


def compare_frames(old: pd.DataFrame, new: pd.DataFrame, rtol: float = 1e-9) -> list[str]:
    """Differences between two tables, one line each; timing columns are prefixed with `timing:`."""
    out = []
    if list(old.columns) != list(new.columns):
        gone, added = set(old.columns) - set(new.columns), set(new.columns) - set(old.columns)
        out.append(f"columns differ: removed {sorted(gone)}, added {sorted(added)}")
    if len(old) != len(new):
        return [*out, f"rows: {len(old)} -> {len(new)}"]
    for col in [c for c in old.columns if c in new.columns]:
        a, b = old[col], new[col]
        prefix = "timing: " if _is_timing(str(col)) else ""
        if pd.api.types.is_float_dtype(a) and pd.api.types.is_numeric_dtype(b):
            x, y = a.to_numpy(float), b.to_numpy(float)
            same_nan = np.isnan(x) == np.isnan(y)
            both = ~np.isnan(x) & ~np.isnan(y)
            diff = np.abs(x[both] - y[both])
            rel = diff / np.maximum(np.abs(x[both]), 1e-300)
            close = np.allclose(x[both], y[both], rtol=rtol, atol=0)
            if not same_nan.all() or not close:
                out.append(
                    f"{prefix}{col}: max |diff| {diff.max(initial=0):.3g}, max rel {rel.max(initial=0):.3g}, "
                    f"NaN pattern {'same' if same_nan.all() else 'differs'}"
                )
        elif not a.astype(str).equals(b.astype(str)):
            n = int((a.astype(str) != b.astype(str)).sum())
            out.append(f"{prefix}{col}: {n} of {len(a)} values differ")
    return out


def compare_dirs(old: Path, new: Path) -> tuple[list[str], bool]:
    lines, differs = [], False
    names = sorted({p.relative_to(old) for p in old.rglob("*.csv")} | {p.relative_to(new) for p in new.rglob("*.csv")})
    for rel in names:
        a, b = old / rel, new / rel
        if not a.exists() or not b.exists():
            lines.append(f"{rel}: only in {'new' if b.exists() else 'old'}")
            differs = True
            continue
        problems = compare_frames(pd.read_csv(a), pd.read_csv(b))
        differs |= any(not p.startswith("timing: ") for p in problems)
        lines.append(f"{rel}: " + ("same values" if not problems else "\n    " + "\n    ".join(problems)))
    return lines, differs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.io.diff_tables", description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    lines, differs = compare_dirs(args.old, args.new)
    print("\n".join(lines))
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
