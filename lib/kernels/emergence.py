"""Emergence (chapter 7; organism only): is a feature that carries a relation in the VLM new, or did the base LM
already have it?

The adapted SAE starts from the base SAE, so feature i of the adapted SAE and feature i of the base SAE share a
lineage. For each reference feature (one whose activation at the answer position tells whether the asked relation
holds, `lib.kernels.truth.relation_scores`), this module reads the same-index feature of the base SAE on the base
LM, on the same relation questions, with the scene given as the caption that states the layout in words
(`lm_prompt(caption, question)`, the base LM's training format), and scores it by the same statistic. If the base
feature already tells the relation from words, fine-tuning reused it and taught the VLM to feed it from the image;
if not, the feature's relation code is new in fine-tuning.

- `text_answer_codes`: SAE codes at the answer position (the last token) of the base LM's text-only stream.
- `relation_table`: the relation statistic per (layer, feature), with the score of every relation
  (`relation_columns`: the lower of its two templates' two-sided AUROCs, as in `relation_scores`).
- `emergence`: per reference feature, the adapted score, the base score for the same relation, and the verdict.

Shape key: n samples, f SAE features, b sequences of a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lib.kernels.adapter import VLM, capture, prepare_text
from lib.names import resid_name
from lib.sources import world as W

VERDICTS = ("reused", "new")


@torch.no_grad()
def text_answer_codes(
    vlm: VLM, encode_by_layer: Mapping[int, Callable], samples: Sequence[W.Sample], batch_size: int = 64
) -> dict[int, np.ndarray]:
    """{layer: z_nf} of every feature at the last token of `vlm.lm_prompt(caption, question)` on `vlm.base_lm`."""
    layers = sorted(encode_by_layer)
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        batch = prepare_text(vlm, [s.scene.caption() for s in chunk], [s.question for s in chunk])
        assert batch.pixels is None, "the text-only stream runs on the base LM"
        resid = capture(vlm, batch, resid_layers=layers).resid
        last_b = batch.lengths_b - 1
        rows_b = torch.arange(len(chunk))
        for layer in layers:
            x_nd = resid[resid_name(layer)][rows_b, last_b].float()
            out[layer].append(encode_by_layer[layer](x_nd).float().cpu().numpy())
    codes = {layer: np.concatenate(z) for layer, z in out.items()}
    assert all((z >= 0).all() for z in codes.values()), "SAE activations must be non-negative"
    return codes


def relation_columns(scores: pd.DataFrame) -> pd.DataFrame:
    """Per relation, the lower of its two templates' two-sided AUROCs, from the `{relation}|{template}` cells of a
    `relation_scores` table (the per-relation score `relation_score` is the best of)."""
    cells = {rel: [c for c in scores.columns if c.startswith(f"{rel}|")] for rel in W.RELATIONS}
    missing = [rel for rel, cs in cells.items() if len(cs) != 2]
    assert not missing, f"relation_scores table without both template cells for {missing}"
    return pd.DataFrame({rel: scores[cs].min(axis=1, skipna=False) for rel, cs in cells.items()})


def relation_table(codes_by_layer: Mapping[int, np.ndarray], labels: pd.DataFrame, score_fn=None) -> pd.DataFrame:
    """The relation statistic of every feature of every layer: one row per (layer, feature) with `score_fn`'s
    columns (default `lib.kernels.truth.relation_scores`) and one `score:{relation}` column per relation."""
    if score_fn is None:
        from lib.kernels.truth import relation_scores as score_fn
    frames = []
    for layer, z_nf in sorted(codes_by_layer.items()):
        assert len(z_nf) == len(labels), f"layer {layer}: {len(z_nf)} rows of codes, {len(labels)} labels"
        scores = score_fn(z_nf, labels).reset_index(drop=True)
        per_rel = relation_columns(scores).add_prefix("score:")
        df = pd.concat([scores, per_rel], axis=1)
        df.insert(0, "feature", np.arange(z_nf.shape[1]))
        df.insert(0, "layer", layer)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def emergence(reference: pd.DataFrame, base: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per reference feature (rows of `reference`: layer, feature, best_relation, relation_score), the base SAE's
    same-index feature on the base LM (`base`, a `relation_table`):

    - `adapted_score`: the reference's own relation_score (VLM, adapted SAE, its best relation);
    - `base_score`: the base feature's score for the SAME relation (the lower of its two templates' two-sided
      AUROCs), and `base_best_relation` / `base_best_score` over all relations, for reading;
    - `verdict`: `reused` if base_score >= threshold, else `new`. The threshold is the one that admitted the feature
      to the reference set, so "reused" means the base feature clears the bar the adapted one was held to, for the
      same relation, with the layout given in words instead of pixels."""
    need = {"layer", "feature", "best_relation", "relation_score"}
    assert need <= set(reference.columns), f"reference needs columns {sorted(need - set(reference.columns))}"
    b = base.set_index(["layer", "feature"])
    rows = []
    for r in reference.itertuples(index=False):
        key = (int(r.layer), int(r.feature))
        assert key in b.index, f"feature {key} is not in the base table"
        row = b.loc[key]
        base_score = float(row[f"score:{r.best_relation}"])
        rows.append(
            dict(
                layer=key[0],
                feature=key[1],
                best_relation=r.best_relation,
                adapted_score=float(r.relation_score),
                base_score=base_score,
                base_best_relation=row["best_relation"],
                base_best_score=float(row["relation_score"]),
                base_firing_rate=float(row["firing_rate"]) if "firing_rate" in row else np.nan,
                verdict="reused" if base_score >= threshold else "new",
            )
        )
    cols = ["layer", "feature", "best_relation", "adapted_score", "base_score", "base_best_relation"]
    cols += ["base_best_score", "base_firing_rate", "verdict"]
    return pd.DataFrame(rows, columns=cols)
