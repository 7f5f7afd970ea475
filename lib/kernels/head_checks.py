"""The referee's checks of the attribution itself (issue 17, item 6), beside the head sweep
(lib/kernels/head_sweep.py):

1. The counterfactual corruption: the two objects a relation question names exchange cells
   (`lib.kernels.counterfactual.object_twin`: each keeps its size and its offset inside its cell), so the corrupted
   run differs from the clean one only in *where* the named objects are, not in whether there is an image.
   `attribution_by_corruption` runs the paper's attribution patching with it beside the mean image on the same
   items (`lib.kernels.attribution.attribute` takes the per-sample (b, n, d) swapped image embeddings as its
   corrupted embedding).
2. Sufficiency (`sufficiency`): one head's hook_z patched from the swapped run into the clean run, and how often
   the yes/no answer flips to the swapped run's answer.
3. `within_feature_spearman`: attribution against exhaustive patching ranked within each feature, so that features
   of very different magnitudes do not make the correlation for each other.

Choices this module makes (the book states them):
- The swap changes only which object is where. Every relation between the two named objects reverses, so the asked
  relation's truth flips unless the two objects share the row or column the relation reads (then it is false both
  ways); `answer_flips` says which, and the attribution uses the items whose answer flips.
- Sufficiency patches the head at the post-image positions (the question and the answer position: where the head
  would carry the relation to the answer) by default; "all" also patches the image and prompt positions.
  The flip rate is over the items the model answers differently on the clean and the swapped scene (otherwise there
  is no other answer to flip to); `recovered` is the share of the clean-to-swapped change in the yes-no logit
  difference the patch produces, averaged over the same items.

Shape key: b items in a batch, s positions, n image tokens, d model width, f features, l layers, h heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor

from lib.kernels.adapter import (
    VLM,
    HeadPatch,
    capture,
    image_embeddings,
    next_token_logits,
    patch_heads,
    prepare,
    z_name,
)
from lib.kernels.attribution import Feature, Head, attribute
from lib.kernels.counterfactual import object_twin
from lib.sources import world as W


def answer_flips(sample: W.Sample) -> bool:
    """Whether the ground-truth answer changes when the two named objects exchange cells."""
    return object_twin(sample).answer != sample.answer


# ---------------------------------------------------------------------------------------------------------------
# 1. Attribution with the swap as the corrupted run


def attribution_by_corruption(
    vlm: VLM,
    clean: Sequence[W.Sample],
    swapped: Sequence[W.Sample],
    features: Sequence[Feature],
    mean_embedding_d: Tensor,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """The paper's head score (clean gradient; mean over post-image positions of |effect|), averaged over items,
    with two corrupted runs on the same items: "mean image" (every image token the mean embedding) and "swap" (the
    swapped scene's image tokens). Returns name -> score_flh (NaN at layers >= the feature's)."""
    assert len(clean) == len(swapped) and clean, "one swapped twin per clean item"
    sums: dict[str, Tensor] = {}
    for lo in range(0, len(clean), batch_size):
        c, s = clean[lo : lo + batch_size], swapped[lo : lo + batch_size]
        assert [x.question for x in c] == [x.question for x in s], "a twin must ask the same question"
        batch = prepare(vlm, [x.scene.render() for x in c], [x.question for x in c])
        e_swap_bnd = image_embeddings(vlm, vlm.preprocess([x.scene.render() for x in s]))
        for name, corrupt in (("mean image", mean_embedding_d), ("swap", e_swap_bnd)):
            effects = attribute(vlm, batch, features, corrupt)
            score_flh = torch.stack([e.score_blh.double().sum(0) for e in effects]).cpu()
            sums[name] = score_flh if name not in sums else sums[name] + score_flh
    return {k: v / len(clean) for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------------------------
# 2. Sufficiency


@torch.no_grad()
def _logit_diff(vlm: VLM, batch, yes_id: int, no_id: int, patches=()) -> Tensor:
    with patch_heads(vlm, patches):
        logits_bv = next_token_logits(vlm, batch).double()
    return (logits_bv[:, yes_id] - logits_bv[:, no_id]).cpu()


@torch.no_grad()
def sufficiency(
    vlm: VLM,
    clean: Sequence[W.Sample],
    swapped: Sequence[W.Sample],
    heads: Sequence[Head],
    yes_id: int,
    no_id: int,
    positions: Sequence[Literal["post_image", "all"]] = ("post_image",),
    batch_size: int = 64,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each head's hook_z from the swapped run patched into the clean run. Returns (per head and positions: n items
    whose model answer differs between clean and swapped, flip_rate, recovered; the answer check: per item the
    clean, swapped and ground-truth answers)."""
    assert len(clean) == len(swapped) and clean, "one swapped twin per clean item"
    layers = sorted({int(l) for l, _ in heads})
    ld_clean, ld_swap, ld_patch = [], [], {(h, p): [] for h in heads for p in positions}
    for lo in range(0, len(clean), batch_size):
        c, s = clean[lo : lo + batch_size], swapped[lo : lo + batch_size]
        questions = [x.question for x in c]
        assert questions == [x.question for x in s], "a twin must ask the same question"
        b_clean = prepare(vlm, [x.scene.render() for x in c], questions)
        b_swap = prepare(vlm, [x.scene.render() for x in s], questions)
        z_swap = capture(vlm, b_swap, z_layers=layers).z
        ld_clean.append(_logit_diff(vlm, b_clean, yes_id, no_id))
        ld_swap.append(_logit_diff(vlm, b_swap, yes_id, no_id))
        for (l, h), p in ld_patch:
            where_bs = b_clean.post_image_bs if p == "post_image" else b_clean.attention_mask_bs
            patch = HeadPatch(int(l), int(h), z_swap[z_name(l)][:, :, h], positions_bs=where_bs)
            ld_patch[((l, h), p)].append(_logit_diff(vlm, b_clean, yes_id, no_id, [patch]))
    ld_c, ld_s = torch.cat(ld_clean).numpy(), torch.cat(ld_swap).numpy()
    differ = (ld_c > 0) != (ld_s > 0)
    rows = []
    for ((l, h), p), parts in ld_patch.items():
        ld_p = torch.cat(parts).numpy()
        flipped = (ld_p > 0) == (ld_s > 0)
        recovered = (ld_p - ld_c) / np.where(np.abs(ld_s - ld_c) > 0, ld_s - ld_c, np.nan)
        rows.append(
            dict(
                layer=int(l),
                head=int(h),
                positions=p,
                n=int(differ.sum()),
                flip_rate=float(flipped[differ].mean()) if differ.any() else np.nan,
                recovered=float(np.nanmean(recovered[differ])) if differ.any() else np.nan,
            )
        )
    check = pd.DataFrame(
        {
            "relation": [x.relation for x in clean],
            "qtype": [x.qtype for x in clean],
            "truth_clean": [x.answer == "yes" for x in clean],
            "truth_swapped": [x.answer == "yes" for x in swapped],
            "model_clean": ld_c > 0,
            "model_swapped": ld_s > 0,
        }
    )
    return pd.DataFrame(rows), check


def flip_check(check: pd.DataFrame) -> dict:
    """The answer-flip check of the swap: how often the ground truth flips, and how often the model's answer flips
    where it does (and where it does not)."""
    truth_flips = check.truth_clean != check.truth_swapped
    model_flips = check.model_clean != check.model_swapped
    return dict(
        n=len(check),
        truth_flip_share=float(truth_flips.mean()),
        model_flip_rate_where_truth_flips=float(model_flips[truth_flips].mean()) if truth_flips.any() else np.nan,
        model_flip_rate_where_truth_stays=float(model_flips[~truth_flips].mean()) if (~truth_flips).any() else np.nan,
        model_correct_clean=float((check.model_clean == check.truth_clean).mean()),
        model_correct_swapped=float((check.model_swapped == check.truth_swapped).mean()),
    )


# ---------------------------------------------------------------------------------------------------------------
# 3. Spearman within each feature


def within_feature_spearman(
    table: pd.DataFrame, a: str = "attr_clean", b: str = "exhaustive", by: str = "feature"
) -> pd.DataFrame:
    """Per feature (rows of `table` grouped by `by`): Spearman rho of columns `a` and `b` over its heads, and the
    number of heads (rho is NaN for a feature whose heads tie in either column)."""
    rows = []
    for name, g in table.groupby(by, sort=False):
        ok = g[[a, b]].dropna()
        constant = ok[a].nunique() < 2 or ok[b].nunique() < 2
        rho = np.nan if len(ok) < 2 or constant else float(stats.spearmanr(ok[a], ok[b]).statistic)
        row = {by: name, "n_heads": len(ok), "spearman": rho}
        if "feature_layer" in g:
            row["feature_layer"] = int(g.feature_layer.iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def spearman_summary(per_feature: pd.DataFrame) -> dict:
    """Median and range of the within-feature rho (features with a defined rho)."""
    rho = per_feature.spearman.dropna()
    return dict(
        n_features=len(rho),
        median=float(rho.median()) if len(rho) else np.nan,
        min=float(rho.min()) if len(rho) else np.nan,
        max=float(rho.max()) if len(rho) else np.nan,
    )
