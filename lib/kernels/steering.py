"""Steering, beyond the paper (issue 17, item 7): add or subtract a feature's decoder direction in the residual
stream after its layer and count how often the model's yes/no answer flips, against random directions of the same
norm. A feature that the model *uses* for the answer should flip it far more often than a random direction.

- `add_to_resid`: the intervention (a context manager, like `lib.kernels.adapter.project_out`): v added to
  `blocks.{layer}.hook_resid_post` at the chosen positions.
- `steer_p_yes`: P(yes) over {yes, no} at the answer position, clean and under each steering vector.
- `random_directions`: unit directions uniform on the sphere (Gaussian, normalised).
- `flip_table`: per direction and sign, how often the answer flips (all items, and toward each answer).
- `mean_active`: the feature's mean activation where it is active (the scale of a natural push).

Choices this module makes (the book states them):
- The vector is sign x scale x (mean activation when active) x ||W_dec[f]|| x the unit decoder direction, so scale 1
  adds what the feature itself adds at its mean activation; random directions get the same norm.
- It is added at the post-image positions (the question and the answer position) by default, as the features are
  read and the attribution metric sums there; "answer" adds it at the last position only. (At the last layer only
  the answer position reaches the output, so the two coincide there.)

Shape key: b items in a batch, s positions, d model width, m steering vectors, i items of a data set, f features.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lib.kernels.adapter import VLM, Batch, capture, decoder, iter_batches, next_token_logits
from lib.kernels.attention import last_token_bs
from lib.names import resid_name

Positions = Literal["post_image", "answer"]


@contextmanager
def add_to_resid(model_or_vlm, layer: int, vector_d: Tensor, positions_bs: Tensor | None = None):
    """`vector_d` added to the residual stream after block `layer`, at `positions_bs` (default: every position)."""
    model = model_or_vlm.model if isinstance(model_or_vlm, VLM) else model_or_vlm

    def hook(_module, _args, output):
        x_bsd = output[0] if isinstance(output, tuple) else output
        v_bsd = vector_d.to(x_bsd.device, x_bsd.dtype).expand_as(x_bsd)
        if positions_bs is not None:
            v_bsd = v_bsd * positions_bs.to(x_bsd.device, x_bsd.dtype)[..., None]
        new = x_bsd + v_bsd
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = decoder(model).layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def steer_positions(batch: Batch, where: Positions) -> Tensor:
    """The positions a steering vector is added at: post-image text, or each sequence's last real token."""
    assert where in ("post_image", "answer"), f"positions must be 'post_image' or 'answer', got {where!r}"
    if where == "post_image":
        return batch.post_image_bs
    return last_token_bs(batch)


class _Tail:
    """The clean run of one batch up to block `layer` (x_bsd, its output) and the rest of the model from a replaced
    output to the next-token logits at each sequence's last real token. The blocks after `layer` are called with the
    arguments the model itself passed them in the clean run (captured by a pre-hook: mask, rotary embeddings), so
    a steered pass costs only the blocks after the steered one."""

    def __init__(self, vlm: VLM, batch: Batch, layer: int):
        self.model, self.batch = vlm.model, batch
        self.blocks = decoder(vlm.model).layers
        self.layer = layer
        self.call: tuple = ((), {})
        if layer + 1 < len(self.blocks):

            def pre_hook(_module, args, kwargs):
                self.call = (args[1:], dict(kwargs))

            handle = self.blocks[layer + 1].register_forward_pre_hook(pre_hook, with_kwargs=True)
            try:
                self.x_bsd = capture(vlm, batch, resid_layers=[layer, layer + 1]).resid[resid_name(layer)]
            finally:
                handle.remove()
        else:
            self.x_bsd = capture(vlm, batch, resid_layers=[layer]).resid[resid_name(layer)]

    def logits(self, x_bsd: Tensor) -> Tensor:
        args, kwargs = self.call
        h_bsd = x_bsd
        for block in self.blocks[self.layer + 1 :]:
            h_bsd = block(h_bsd, *args, **kwargs)
            h_bsd = h_bsd[0] if isinstance(h_bsd, tuple) else h_bsd
        h_bsd = decoder(self.model).norm(h_bsd)
        last_b = self.batch.lengths_b.to(h_bsd.device) - 1
        return self.model.lm_head(h_bsd[torch.arange(h_bsd.shape[0], device=h_bsd.device), last_b]).float()


def _p_yes_of(logits_bv: Tensor, yes_id: int, no_id: int) -> np.ndarray:
    return torch.softmax(logits_bv.double()[:, [yes_id, no_id]], -1)[:, 0].cpu().numpy()


@torch.no_grad()
def steer_p_yes(
    vlm: VLM,
    images: Sequence[Any],
    questions: Sequence[str],
    layer: int,
    vectors_md: Tensor,
    yes_id: int,
    no_id: int,
    *,
    positions: Positions = "post_image",
    batch_size: int = 64,
    fast: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(p_yes_i clean, p_yes_mi under each steering vector) at the answer position. `fast` runs the model once per
    batch up to the steered block and only the blocks after it per vector (`_Tail`); `fast=False` is its plain twin,
    one full forward per vector with `add_to_resid` installed (a test checks that they agree)."""
    assert vectors_md.ndim == 2 and vectors_md.shape[1] == vlm.d_model, f"vectors must be (m, {vlm.d_model})"
    clean, steered = [], []
    for batch in iter_batches(vlm, images, questions, batch_size):
        where_bs = steer_positions(batch, positions)
        per_m = []
        if fast:
            tail = _Tail(vlm, batch, layer)
            clean.append(_p_yes_of(tail.logits(tail.x_bsd), yes_id, no_id))
            w_bs1 = where_bs[..., None].to(tail.x_bsd.device, tail.x_bsd.dtype)
            for v_d in vectors_md:
                x_bsd = tail.x_bsd + w_bs1 * v_d.to(tail.x_bsd.device, tail.x_bsd.dtype)
                per_m.append(_p_yes_of(tail.logits(x_bsd), yes_id, no_id))
        else:
            clean.append(_p_yes_of(next_token_logits(vlm, batch), yes_id, no_id))
            for v_d in vectors_md:
                with add_to_resid(vlm, layer, v_d, where_bs):
                    per_m.append(_p_yes_of(next_token_logits(vlm, batch), yes_id, no_id))
        steered.append(np.stack(per_m))
    return np.concatenate(clean), np.concatenate(steered, axis=1)


def random_directions(n: int, d: int, seed: int, dtype=torch.float32) -> Tensor:
    """u_md: `n` unit directions uniform on the sphere of R^d."""
    gen = torch.Generator().manual_seed(seed)
    g_md = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return (g_md / g_md.norm(dim=1, keepdim=True)).to(dtype)


def flip_table(p_clean_i: np.ndarray, p_steered_mi: np.ndarray, labels: Sequence[dict]) -> pd.DataFrame:
    """One row per steering vector (its `labels` entry: direction, sign, ...): the share of all items whose answer
    (yes iff P(yes) > 0.5) flips, the share of clean-"no" items turned "yes" and of clean-"yes" items turned "no",
    and the mean change of P(yes)."""
    assert len(labels) == p_steered_mi.shape[0], f"{len(labels)} labels for {p_steered_mi.shape[0]} vectors"
    yes_i = p_clean_i > 0.5
    rows = []
    for lab, p_i in zip(labels, p_steered_mi, strict=True):
        yes_after = p_i > 0.5
        rows.append(
            dict(
                **lab,
                n=len(p_i),
                flip_rate=float((yes_after != yes_i).mean()),
                to_yes=float(yes_after[~yes_i].mean()) if (~yes_i).any() else np.nan,
                to_no=float((~yes_after[yes_i]).mean()) if yes_i.any() else np.nan,
                delta_p_yes=float((p_i - p_clean_i).mean()),
            )
        )
    return pd.DataFrame(rows)


def mean_active(codes_if: Tensor) -> Tensor:
    """Per feature: the mean of its activations where it is active (> 0); 0 for a feature never active."""
    active_if = codes_if > 0
    total_f = torch.where(active_if, codes_if, 0).double().sum(0)
    count_f = active_if.sum(0)
    return torch.where(count_f > 0, total_f / count_f.clamp_min(1), 0.0)


@torch.no_grad()
def feature_activations(vlm: VLM, saes, chosen: pd.DataFrame, images, questions, batch_size: int = 64):
    """{(layer, feature): (activations at every post-image position, activations at the answer position)} of the
    (layer, feature) rows of `chosen`, `saes` mapping layer -> SAELens SAE."""
    layers = sorted({int(x) for x in chosen.layer})
    post: dict = {(int(r.layer), int(r.feature)): [] for r in chosen.itertuples()}
    last: dict = {k: [] for k in post}
    for batch in iter_batches(vlm, images, questions, batch_size):
        resid = capture(vlm, batch, resid_layers=layers).resid
        answer_bs = steer_positions(batch, "answer")
        for l in layers:
            idx = [f for (ll, f) in post if ll == l]
            codes_bsf = saes[l].encode(resid[resid_name(l)].to(saes[l].dtype)).float()[..., idx]
            for j, f in enumerate(idx):
                post[(l, f)].append(codes_bsf[..., j][batch.post_image_bs].cpu())
                last[(l, f)].append(codes_bsf[..., j][answer_bs].cpu())
    return {k: (torch.cat(post[k]), torch.cat(last[k])) for k in post}


def steer_features(
    vlm: VLM,
    saes,
    chosen: pd.DataFrame,
    samples: Sequence[Any],
    yes_id: int,
    no_id: int,
    *,
    scales: Sequence[float],
    n_random: int,
    seed: int,
    positions: Positions = "post_image",
    batch_size: int = 64,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Steer each (layer, feature, best_relation) row of `chosen` on `samples` (world samples of yes/no relation
    questions) at each scale, against `n_random` random directions of the same norms (the same directions at every
    scale). The feature's sign is +1 when its answer-position activation is higher where its best relation holds,
    so "+ (toward yes)" is sign x direction. Returns (flips: feature, layer, scale, norm, kind, vector, index,
    subset ("best relation" / "all relations"), n, flip_rate, to_yes, to_no, delta_p_yes; features: the chosen rows
    with name, sign, mean_active, decoder_norm)."""
    images, questions = [s.scene.render() for s in samples], [s.question for s in samples]
    relation_i = np.array([s.relation for s in samples])
    holds_i = np.array([s.answer == "yes" for s in samples])
    acts = feature_activations(vlm, saes, chosen, images, questions, batch_size)
    flips, feats = [], []
    for r in chosen.itertuples():
        layer, f = int(r.layer), int(r.feature)
        post_t, last_t = acts[(layer, f)]
        of_rel = relation_i == r.best_relation
        holds, fails = last_t.numpy()[of_rel & holds_i], last_t.numpy()[of_rel & ~holds_i]
        sign = -1.0 if len(holds) and len(fails) and holds.mean() < fails.mean() else 1.0  # +1 without both
        w_dec_d = saes[layer].W_dec[f].detach().float()
        active = float(mean_active(post_t[:, None])[0])
        unit_d = w_dec_d / w_dec_d.norm()
        rand_md = random_directions(n_random, vlm.d_model, seed + layer)
        dirs_md = torch.cat([torch.stack([unit_d, -unit_d]) * sign, rand_md])
        norms = [scale * active * float(w_dec_d.norm()) for scale in scales]
        vectors_md = torch.cat([dirs_md * n for n in norms])
        p_clean_i, p_mi = steer_p_yes(
            vlm, images, questions, layer, vectors_md, yes_id, no_id, positions=positions, batch_size=batch_size
        )
        labels = []
        for scale, n in zip(scales, norms, strict=True):
            labels += [
                dict(scale=scale, norm=n, kind="feature", vector="+ (toward yes)", index=-1),
                dict(scale=scale, norm=n, kind="feature", vector="- (toward no)", index=-1),
            ]
            labels += [dict(scale=scale, norm=n, kind="random", vector="random", index=i) for i in range(n_random)]
        name = f"L{layer}F{f}"
        for subset, keep in (("best relation", of_rel), ("all relations", np.ones(len(samples), dtype=bool))):
            table = flip_table(p_clean_i[keep], p_mi[:, keep], labels)
            flips.append(table.assign(feature=name, layer=layer, subset=subset))
        row = {k: v for k, v in r._asdict().items() if k != "Index"}
        feats.append(dict(**row, name=name, sign=sign, mean_active=active, decoder_norm=float(w_dec_d.norm())))
    return pd.concat(flips, ignore_index=True), pd.DataFrame(feats)
