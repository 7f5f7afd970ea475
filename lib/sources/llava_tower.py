"""Which vision tower a converted original-layout LLaVA checkpoint gets, and why (lib/sources/paper_models.py).

Such a checkpoint may carry the tower's weights (`model.vision_tower.vision_tower.vision_model.*`) and also names,
in `mm_vision_tower`, the CLIP model it was built from. LLaVA's loader, which LLaVA-MORE keeps
(`multimodal_encoder/clip_encoder.py`), builds the tower with `delay_load` and then calls `load_model()`, which
reloads `mm_vision_tower` from its own source: the checkpoint's copy is never read. The exception is
`unfreeze_mm_vision_tower: true`: the tower is then loaded first and the checkpoint's (trained) weights overwrite it.

The converter therefore uses, and says which:
- no tower in the checkpoint: the CLIP model (`clip=`, by default `mm_vision_tower`);
- `unfreeze_mm_vision_tower: true`: the checkpoint's tower, as LLaVA runs it;
- otherwise the CLIP model, as LLaVA-MORE runs it, after checking that the checkpoint's copy agrees with it tensor
  by tensor (equal to one rounding step of the dtype it was stored in). If it does not, the converter refuses and
  names both sources and the first tensor that differs: two towers that disagree mean one of them is not the model
  the other was trained with (a wrong `clip=`, a re-trained tower), and choosing silently would change every image
  token. The caller then decides with `tower="clip"` (LLaVA-MORE's choice) or `tower="checkpoint"`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

TOWER_CHOICES = ("clip", "checkpoint")


class TowerChoice(NamedTuple):
    source: str | None  # "clip", "checkpoint", or None: refused (the caller raises `message`)
    message: str  # one line saying which tower is used and why, or why neither


def first_disagreement(
    checkpoint_bf: dict[str, torch.Tensor], stored_dtypes: dict[str, torch.dtype], clip_bf: dict[str, torch.Tensor]
) -> tuple[str, float] | None:
    """The first tensor (in name order) on which the checkpoint's tower and CLIP's differ by more than one rounding
    step of the dtype the checkpoint stored it in, with the largest absolute difference; None if they agree.
    `checkpoint_bf` holds the checkpoint's tensors as loaded into the model, `clip_bf` CLIP's under the same names."""
    for name in sorted(checkpoint_bf):
        ours, theirs = checkpoint_bf[name], clip_bf.get(name)
        if theirs is None or theirs.shape != ours.shape:
            return name, float("inf")
        stored = stored_dtypes.get(name, ours.dtype)
        a = ours.detach().float().cpu()
        b = theirs.detach().to(stored).float().cpu()  # CLIP's, rounded as the checkpoint's copy was
        eps = torch.finfo(stored).eps if stored.is_floating_point else 0.0
        if not torch.allclose(a, b, rtol=eps, atol=0.0):
            return name, float((a - b).abs().max())
    return None


def choose_tower(
    *,
    in_checkpoint: bool,
    unfrozen: bool,
    requested: str | None,
    checkpoint: str,
    clip: str,
    named: str,
    disagreement: tuple[str, float] | None,
) -> TowerChoice:
    """The tower to use (see the module docstring). `checkpoint` is the checkpoint's path, `clip` the CLIP source
    used for the config (and weights), `named` the checkpoint's `mm_vision_tower`. `disagreement` is
    `first_disagreement`'s answer (None when they agree or when there was nothing to compare)."""
    if requested is not None and requested not in TOWER_CHOICES:
        raise ValueError(f"tower = {requested!r}: expected one of {list(TOWER_CHOICES)} or None")
    clip_desc = f"{clip!r}" + ("" if str(clip) == str(named) else f" (given for mm_vision_tower = {named!r})")
    if not in_checkpoint:
        if requested == "checkpoint":
            return TowerChoice(None, f"{checkpoint}: tower='checkpoint' but the checkpoint has no vision-tower weights")
        return TowerChoice("clip", f"vision tower: CLIP weights from {clip_desc}; the checkpoint carries none")
    if requested is not None:
        where = f"the checkpoint's own weights ({checkpoint})"
        where = f"CLIP weights from {clip_desc}" if requested == "clip" else where
        return TowerChoice(requested, f"vision tower: {where}, as asked (tower={requested!r})")
    if unfrozen:
        return TowerChoice(
            "checkpoint",
            f"vision tower: the checkpoint's own weights ({checkpoint}): its config says unfreeze_mm_vision_tower, "
            "so LLaVA loads these over mm_vision_tower's",
        )
    if disagreement is not None:
        key, diff = disagreement
        return TowerChoice(
            None,
            f"{checkpoint}: its vision-tower weights disagree with the CLIP model {clip_desc} "
            f"(first at `{key}`, max |difference| {diff:.3g}); LLaVA-MORE's loader would use the CLIP model's and "
            "ignore the checkpoint's. Check `clip=` / the profile's `paper.vision_tower`, or choose with "
            "tower='clip' (LLaVA-MORE's choice) or tower='checkpoint'",
        )
    return TowerChoice(
        "clip",
        f"vision tower: CLIP weights from {clip_desc}, as LLaVA-MORE's loader reloads them; the checkpoint's copy "
        "agrees with them tensor by tensor",
    )
