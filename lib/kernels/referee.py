"""The referee: the paper's selection against the reference set the ground truth defines.

`selection_rows` rebuilds the paper's final set under each of the choices the source leaves open (visual-energy
share vs raw second moment, ε, q, pooled vs per-layer percentile, the lexical filter's reading, no lexical filter)
from the per-feature table alone; `referee_table` scores each row's final set against the reference set (precision,
recall); `dropped_by` names, for every reference feature, the first of the paper's filters that dropped it.
Everything here is table logic: the statistics come from lib.kernels.truth and the pipeline's hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from lib.kernels.diffing import pooled_percentile
from lib.kernels.ground_truth import Thresholds, first_failed_filter
from lib.kernels.spatial_stats import select_spatial


class Choice(NamedTuple):
    name: str  # the open choice (e.g. "q")
    value: str  # its value in this row, as text
    energy: str = "visual_energy"  # the visual-energy column: the share, or `visual_energy_raw`
    eps: float | None = None  # None: the profile's
    q: float | None = None
    per_layer: bool = False  # percentile of decoder cosine within each layer instead of pooled
    lexical: str | None = "lexical_all"  # the lexical flag column; None: no lexical filter


def choices(eps: float, q: float, eps_grid: Sequence[float], q_grid: Sequence[float], reading: str) -> list[Choice]:
    """The paper's pipeline as the book runs it first, then one open choice changed per row."""
    default = f"lexical_{reading}"
    rows = [Choice("paper pipeline (the book's choices)", f"ε={eps}, q={q}, share, pooled, {reading}", lexical=default)]
    rows.append(Choice("visual energy", "raw second moment (VLM vs LM)", energy="visual_energy_raw", lexical=default))
    rows += [Choice("ε", f"{e}", eps=float(e), lexical=default) for e in eps_grid if e != eps]
    rows += [Choice("q", f"{v}", q=float(v), lexical=default) for v in q_grid if v != q]
    rows.append(Choice("cosine percentile", "per layer", per_layer=True, lexical=default))
    other = "image" if reading == "all" else "all"
    rows.append(Choice("lexical reading", other, lexical=f"lexical_{other}"))
    rows.append(Choice("lexical filter", "none", lexical=None))
    return rows


def adapted_under(table: pd.DataFrame, c: Choice, eps: float, q: float) -> pd.Series:
    """The `adapted` flag of one variant's rows under a choice."""
    eps, q = c.eps if c.eps is not None else eps, c.q if c.q is not None else q
    if c.per_layer:
        cos_max = table.groupby("layer")["dec_cos"].transform(lambda x: np.percentile(x, q))
    else:
        cos_max = pooled_percentile(table["dec_cos"], q)
    return (table[c.energy] > eps) & (table["dec_cos"] <= cos_max)


def selection_rows(
    table: pd.DataFrame, rows: Sequence[Choice], eps: float, q: float, min_odds: float, min_delta: float
) -> dict[str, pd.Series]:
    """{row label: candidates (adapted and spatial)} of one variant's rows under each choice. The lexical flag is
    applied by `referee_table`, from a lexical table that covers every candidate of every row."""
    spatial = select_spatial(table, min_odds, min_delta)
    return {f"{c.name}: {c.value}": adapted_under(table, c, eps, q) & spatial for c in rows}


def union_candidates(table: pd.DataFrame, candidates: dict[str, pd.Series]) -> pd.DataFrame:
    """(layer, feature) of every candidate of any row: what the lexical filter must see."""
    any_row = np.logical_or.reduce([m.to_numpy() for m in candidates.values()])
    return table.loc[any_row, ["layer", "feature"]].reset_index(drop=True)


def referee_table(
    table: pd.DataFrame,
    rows: Sequence[Choice],
    candidates: dict[str, pd.Series],
    lexical: pd.DataFrame,
    reference: pd.Series,
) -> pd.DataFrame:
    """One row per choice: candidates, final set size, reference-set size, precision and recall of the final set
    against the reference set. `lexical` has layer, feature and the lexical flag columns (every candidate)."""
    flags = table[["layer", "feature"]].merge(lexical, on=["layer", "feature"], how="left")
    out = []
    ref = reference.to_numpy(bool)
    for c, (label, cand) in zip(rows, candidates.items(), strict=True):
        cand = cand.to_numpy(bool)
        if c.lexical is None:
            final = cand
        else:
            known = flags[c.lexical].notna().to_numpy()
            assert known[cand].all(), f"{label}: the lexical table misses {int((cand & ~known).sum())} candidates"
            final = cand & flags[c.lexical].fillna(False).to_numpy(bool)
        hit = int((final & ref).sum())
        out.append(
            dict(
                choice=c.name,
                value=c.value,
                candidates=int(cand.sum()),
                final=int(final.sum()),
                reference=int(ref.sum()),
                found=hit,
                precision=hit / final.sum() if final.sum() else np.nan,
                recall=hit / ref.sum() if ref.sum() else np.nan,
            )
        )
    return pd.DataFrame(out)


def dropped_by(table: pd.DataFrame, eps: float, cos_max: float, min_odds: float, min_delta: float) -> pd.Series:
    """The first of the paper's filters (in pipeline order) each row fails, or None (lib.kernels.ground_truth)."""
    return first_failed_filter(table, Thresholds(eps, cos_max, min_odds, min_delta))
