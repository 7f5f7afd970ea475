"""What the organism computes, and where: the ground truth of relation questions, read out of the model.

The organism answers "is the A <relation> the B ?" (and the statement template "statement : the A is <relation>
the B . is this correct ?") on two-object scenes whose every cell is known. This module asks where that answer, and
what it needs, can be read:

- `relation_labels`: per sample, the asked relation, the template, its truth, and each named object's row, column
  and cell; `occupancy_code`: which rows, columns and cells hold an object (15 bits), the control that explains
  whatever follows from the layout without knowing which object is which.
- `position_states`: the residual stream after every block at three position classes: the image tokens (mean),
  the question tokens after the image (mean, answer position excluded) and the answer position (the last token).
- `probe_table`: a cross-validated linear probe of each variable at each layer and position class, beside the same
  probe on the occupancy code and on shuffled labels (scikit-learn: standardised inputs, L2 logistic regression).
- `answer_codes` and `relation_scores`: every SAE feature's activation at the answer position, scored by how well
  it tells whether the asked relation holds *within each (relation, template) cell*, the context in which the
  model computes it. A feature's `relation_score` is, for its best relation, the lower of its two templates'
  two-sided AUROC (max(AUROC, 1 - AUROC): a feature that fires when the relation fails carries it as well).
- `matched_random`: features of the same layer with the nearest firing rate, the control for a score.

Shape key: n samples, l layers, d model width, f SAE features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lib.kernels.adapter import VLM, capture, prepare
from lib.kernels.attention import last_token_bs
from lib.kernels.ground_truth import auroc_table
from lib.names import resid_name
from lib.sources import world as W

POSITIONS = ("image", "question", "answer")
TEMPLATES = ("relation", "statement")


def relation_labels(samples: Sequence[W.Sample]) -> pd.DataFrame:
    """One row per relation / statement sample: relation, template, truth, and the named objects' places."""
    rows = []
    for s in samples:
        assert s.qtype in TEMPLATES and s.relation, f"sample {s.index} is not a relation question ({s.qtype})"
        a, b = s.scene.by_shape(s.subject), s.scene.by_shape(s.obj)
        rows.append(
            dict(
                relation=s.relation,
                template=s.qtype,
                truth=s.answer == "yes",
                subject_row=a.row,
                subject_col=a.col,
                subject_cell=a.row * W.GRID + a.col,
                object_row=b.row,
                object_col=b.col,
                object_cell=b.row * W.GRID + b.col,
            )
        )
    return pd.DataFrame(rows)


def occupancy_code(samples: Sequence[W.Sample]) -> np.ndarray:
    """(n, 15): which rows, which columns and which cells hold an object, without saying which object."""
    code = np.zeros((len(samples), 2 * W.GRID + W.GRID * W.GRID), dtype=np.float32)
    for i, s in enumerate(samples):
        for o in s.scene.objects:
            code[i, o.row] = code[i, W.GRID + o.col] = code[i, 2 * W.GRID + o.row * W.GRID + o.col] = 1.0
    return code


@torch.no_grad()
def position_states(vlm: VLM, samples: Sequence[W.Sample], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Residual stream after every block, per position class: {position: (n, l, d)} (float32)."""
    layers = list(range(vlm.n_layers))
    out: dict[str, list[np.ndarray]] = {p: [] for p in POSITIONS}
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        batch = prepare(vlm, [s.scene.render() for s in chunk], [s.question for s in chunk])
        resid = capture(vlm, batch, resid_layers=layers).resid
        x_lbsd = torch.stack([resid[resid_name(l)].float() for l in layers])
        answer_bs = last_token_bs(batch)
        masks = {"image": batch.image_mask_bs, "question": batch.post_image_bs & ~answer_bs, "answer": answer_bs}
        for name, m_bs in masks.items():
            w_bs = m_bs.float()
            pooled_lbd = (x_lbsd * w_bs[None, :, :, None]).sum(2) / w_bs.sum(1).clamp_min(1)[None, :, None]
            out[name].append(pooled_lbd.permute(1, 0, 2).cpu().numpy())
    return {p: np.concatenate(v) for p, v in out.items()}


def _cv_score(x_nd: np.ndarray, y_n: np.ndarray, folds: int, seed: int) -> float:
    """Cross-validated AUROC (binary; macro one-vs-rest for more classes) of a linear probe: standardised inputs,
    a ridge classifier (least squares per class: one linear solve per fold, where a logistic probe took minutes for
    the 120 probes of a chapter on this CPU; both are linear read-outs, which is what the question asks)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes, counts = np.unique(y_n, return_counts=True)
    if len(classes) < 2 or counts.min() < folds:
        return float("nan")
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    score = cross_val_predict(probe, x_nd, y_n, cv=cv, method="decision_function")
    if len(classes) == 2:
        return float(roc_auc_score(y_n, score))
    # macro one-vs-rest: each class's own score column against the rest (ridge scores are not probabilities)
    return float(np.mean([roc_auc_score(y_n == c, score[:, i]) for i, c in enumerate(classes)]))


PROBE_VARIABLES = ("truth", "subject_row", "subject_col", "object_row", "object_col")


def probe_table(
    states: Mapping[str, np.ndarray],
    labels: pd.DataFrame,
    occupancy_nc: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    variables: Sequence[str] = PROBE_VARIABLES,
) -> pd.DataFrame:
    """Cross-validated probe AUROC per (variable, layer, position), with two controls per variable: the same probe
    on the occupancy code (what the layout alone explains) and on shuffled labels (chance, as measured)."""
    rng = np.random.default_rng(seed)
    rows = []
    for var in variables:
        y = labels[var].to_numpy()
        control = _cv_score(occupancy_nc, y, folds, seed)
        for position, x_nld in states.items():
            for layer in range(x_nld.shape[1]):
                rows.append(
                    dict(
                        variable=var,
                        position=position,
                        layer=layer,
                        auroc=_cv_score(x_nld[:, layer], y, folds, seed),
                        shuffled=_cv_score(x_nld[:, layer], rng.permutation(y), folds, seed),
                        occupancy=control,
                    )
                )
    return pd.DataFrame(rows)


@torch.no_grad()
def answer_codes(vlm: VLM, saes: Mapping, samples: Sequence[W.Sample], batch_size: int = 64) -> dict:
    """{key: (n, f) activation at the answer position} for every SAE in `saes` ({(variant, layer): SAELens SAE}),
    from one forward per batch."""
    layers = sorted({layer for _, layer in saes})
    out: dict = {k: [] for k in saes}
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        batch = prepare(vlm, [s.scene.render() for s in chunk], [s.question for s in chunk])
        resid = capture(vlm, batch, resid_layers=layers).resid
        answer_bs = last_token_bs(batch)
        for key, sae in saes.items():
            x_nd = resid[resid_name(key[1])][answer_bs]
            out[key].append(sae.encode(x_nd.to(sae.dtype)).float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def cell_attributes(labels: pd.DataFrame) -> pd.DataFrame:
    """One boolean column per (relation, template) cell, `truth` inside the cell and <NA> outside it."""
    cols = {}
    for rel in W.RELATIONS:
        for tpl in TEMPLATES:
            inside = (labels.relation == rel) & (labels.template == tpl)
            cols[f"{rel}|{tpl}"] = labels.truth.astype("boolean").where(inside, pd.NA)
    return pd.DataFrame(cols)


def relation_scores(acts_nf: np.ndarray, labels: pd.DataFrame) -> pd.DataFrame:
    """Per feature: the two-sided AUROC for "the asked relation holds" in each (relation, template) cell; for each
    relation the lower of its two templates; `best_relation` and its `relation_score`; `truth_score`, the mean over
    all cells (a feature that carries the truth of any asked relation); and the firing rate."""
    table = auroc_table(acts_nf, cell_attributes(labels))
    cells = [f"{r}|{t}" for r in W.RELATIONS for t in TEMPLATES]
    two_sided = np.maximum(table[cells].to_numpy(), 1 - table[cells].to_numpy())
    per_rel = np.stack([np.fmin(two_sided[:, 2 * i], two_sided[:, 2 * i + 1]) for i in range(len(W.RELATIONS))], 1)
    with np.errstate(all="ignore"):
        best = np.nanargmax(np.where(np.isnan(per_rel), -1, per_rel), 1)
    out = pd.DataFrame(two_sided, columns=cells)
    out["best_relation"] = np.array(W.RELATIONS)[best]
    out["relation_score"] = per_rel[np.arange(len(per_rel)), best]
    out["truth_score"] = np.nanmean(two_sided, 1)
    out["firing_rate"] = (np.asarray(acts_nf) > 0).mean(0)
    return out


def matched_random(scores: pd.DataFrame, chosen: pd.Series, n: int = 1, seed: int = 0) -> pd.DataFrame:
    """For each chosen row, `n` other rows of the same layer (and variant) with the nearest firing rates: the
    control a reference feature's score is read against. `scores` has layer, firing_rate (and variant)."""
    rng = np.random.default_rng(seed)
    chosen = pd.Series(np.asarray(chosen, dtype=bool), index=scores.index)
    group = ["variant", "layer"] if "variant" in scores else ["layer"]
    picks = []
    for _, rows in scores.groupby(group):
        pool = rows[~chosen.loc[rows.index]]
        for idx in rows.index[chosen.loc[rows.index]]:
            if pool.empty:
                continue
            order = (pool.firing_rate - rows.firing_rate[idx]).abs().sort_values(kind="stable")
            near = order.index[: max(n, 5)]  # the five nearest firing rates, drawn from
            picks += list(rng.choice(near, size=min(n, len(near)), replace=False))
    return scores.loc[picks]
