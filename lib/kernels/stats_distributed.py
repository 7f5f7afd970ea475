"""The per-feature statistics passes on the ranks of a torch.distributed process group: visual energy and firing
frequencies (`diffing.feature_table`), the image dependence (`diffing.image_dependence`) and the spatial firing
counts (`spatial_stats.firing_counts`), each with its SAEs shared out over the ranks the way adaptation shares them
(lib/kernels/adaptation_distributed.py).

Every rank runs the model on its share of each world batch (the single process's batch), the activations at the
positions a statistic reads go to the rank that owns the SAE of that layer (`sae_distributed.exchange`), and the
owner updates that SAE's sums exactly as the single process does, over the world batch's tokens in the single
process's order. Each function returns this rank's rows; `merge` orders every rank's rows as the single process
writes them. Given the same activations the rows would equal the single process's bit for bit (each SAE's sums run
in the same order on one rank); the model's forward on a micro-batch, padded to its own longest sequence, differs
from the world batch's in the last bit for some batches, so tests/test_distributed.py finds them equal to 1e-5,
counts exactly.

Shape suffixes: l layer, n token, d model width, f SAE width, b sequence, s position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from sae_lens import SAE

from lib.kernels import adapter as A
from lib.kernels import diffing
from lib.kernels.activations import ActBatch, lm_batches
from lib.kernels.adaptation_distributed import vlm_harvester, world_batches
from lib.kernels.sae_distributed import comm_device
from lib.kernels.sae_sharding import ShardPlan
from lib.kernels.spatial_stats import FiringCounts, spatial_table
from lib.names import resid_name


def _plan(layers: Sequence[int], variants: Sequence[str], group, device) -> tuple[ShardPlan, int, torch.device]:
    """The plan of a pass, this rank, and where its SAEs work (by default where the collectives put activations)."""
    plan = ShardPlan(tuple(layers), tuple(variants), dist.get_world_size(group))
    return plan, dist.get_rank(group), comm_device(group) if device is None else torch.device(device)


def _owned(plan: ShardPlan, rank: int) -> list[tuple[int, str, int]]:
    """(layer, variant, row in the received batch) of each SAE the rank owns."""
    rows = plan.rows(rank)
    return [(plan.layers[li], plan.variants[vi], rows.index(li)) for li, vi in plan.owned(rank)]


def _on(sae: SAE, device: torch.device) -> SAE:
    return sae if next(sae.parameters()).device == device else sae.to(device)


def merge(parts: Sequence[pd.DataFrame], order: Sequence[tuple], columns: Sequence[str]) -> pd.DataFrame:
    """Every rank's rows in the single process's order: `order` lists the values of `columns` (e.g. (layer,
    variant)) in the order the single process concatenates them; rows keep their order within each."""
    table = pd.concat(parts, ignore_index=True)
    rank_of = {tuple(k): i for i, k in enumerate(order)}
    position = [rank_of[tuple(k)] for k in table[list(columns)].itertuples(index=False, name=None)]
    table = table.iloc[np.argsort(np.asarray(position), kind="stable")].reset_index(drop=True)
    return table


@torch.no_grad()
def feature_table_sharded(
    vlm: A.VLM,
    base_saes: Mapping[int, SAE],
    adapted: Mapping[str, Mapping[int, SAE]],
    heldout_pairs: Sequence[tuple[Any, str]],
    heldout_text_pairs: Sequence[tuple[str, str]] | None = None,
    batch_size: int = 8,
    device=None,
    group=None,
) -> pd.DataFrame:
    """`diffing.feature_table`'s rows of the SAEs this rank owns (every (layer, variant) of `adapted` shared out).
    `merge(parts, [(layer, v) for v in adapted for layer in layers], ("layer", "variant"))` gives the table."""
    layers, variants = sorted(base_saes), list(adapted)
    plan, rank, device = _plan(layers, variants, group, device)
    rows_by_rank = [plan.rows(r) for r in range(plan.n_ranks)]
    owned = _owned(plan, rank)
    saes = {(layer, v): _on(adapted[v][layer], device) for layer, v, _ in owned}
    stats = {(layer, v): diffing.FeatureStats(saes[(layer, v)].cfg.d_sae) for layer, v, _ in owned}
    sq_lm = {k: torch.zeros(s.cfg.d_sae, dtype=torch.float64) for k, s in saes.items()}
    for batch in world_batches(
        vlm_harvester(vlm, heldout_pairs, layers, device), len(heldout_pairs), batch_size, rows_by_rank,
        len(layers), vlm.d_model, group=group,
    ):  # fmt: skip
        for layer, v, row in owned:
            stats[(layer, v)].update(saes[(layer, v)].encode(batch.x_lnd[row]), batch.image_mask_n)
    n_lm = 0
    if heldout_text_pairs is not None:
        harvest_text = _text_harvester(vlm, heldout_text_pairs, layers, device)
        for batch in world_batches(
            harvest_text, len(heldout_text_pairs), batch_size, rows_by_rank, len(layers), vlm.d_model, group=group
        ):
            n_lm += batch.x_lnd.shape[1]
            for layer, v, row in owned:
                sq_lm[(layer, v)] += saes[(layer, v)].encode(batch.x_lnd[row]).double().square().sum(0).cpu()
    base = {layer: base_saes[layer] for layer in dict.fromkeys(x for x, _, _ in owned)}  # each read once
    frames = [
        diffing.feature_rows(layer, v, base[layer], saes[(layer, v)], stats[(layer, v)], sq_lm[(layer, v)], n_lm)
        for layer, v, _ in owned
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _positions_harvester(
    vlm: A.VLM,
    prepare: Callable[[int, int], A.Batch],
    layers: Sequence[int],
    positions: Callable[[A.Batch], torch.Tensor],
    labels: Callable[[A.Batch, int, int], torch.Tensor],
    corrupt_d: torch.Tensor | None = None,
) -> Callable[[int, int], ActBatch]:
    """`harvest_micro` that reads the residual after each of `layers` at `positions(batch)` (b, s) and labels each
    token with `labels(batch, a, b)`; with `corrupt_d`, the rows of a second forward whose image embeddings are all
    `corrupt_d` follow (2 x layers rows)."""

    def harvest_micro(a: int, b: int) -> ActBatch:
        batch = prepare(a, b)
        keep_bs = positions(batch)
        runs = [A.capture(vlm, batch, resid_layers=layers).resid]
        if corrupt_d is not None:
            with A.replace_image_embeddings(vlm, corrupt_d):
                runs.append(A.capture(vlm, batch, resid_layers=layers).resid)
        x = [
            run[resid_name(layer)][keep_bs.to(run[resid_name(layer)].device)].float()
            for run in runs
            for layer in layers
        ]
        return ActBatch(torch.stack(x), labels(batch, a, b).cpu().bool(), b - a)

    return harvest_micro


@torch.no_grad()
def image_dependence_sharded(
    vlm: A.VLM,
    saes: Mapping[int, SAE],
    pairs: Sequence[tuple[Any, str]],
    reference_images,
    batch_size: int = 8,
    device=None,
    group=None,
) -> pd.DataFrame:
    """`diffing.image_dependence`'s rows of the layers this rank owns (one SAE per layer, shared out over the ranks):
    clean and mean-image runs of each rank's share, post-image positions to the owners. Rows by layer: concatenate
    every rank's rows and sort by layer (`merge` with order [(layer,) ...])."""
    from lib.kernels.attribution import mean_image_embedding

    layers = sorted(saes)
    plan, rank, device = _plan(layers, ("sae",), group, device)
    L = len(layers)
    rows_by_rank = [[*plan.rows(r), *(L + i for i in plan.rows(r))] for r in range(plan.n_ranks)]
    mean_d = mean_image_embedding(vlm, reference_images, batch_size)  # every rank: a small deterministic pass
    owned = _owned(plan, rank)
    own = {layer: _on(saes[layer], device) for layer, _, _ in owned}
    diff = {layer: torch.zeros(own[layer].cfg.d_sae, dtype=torch.float64) for layer in own}
    mass = {layer: torch.zeros_like(diff[layer]) for layer in own}

    def prepare(a: int, b: int) -> A.Batch:
        chunk = [pairs[i] for i in range(a, b)]
        return A.prepare(vlm, [p[0] for p in chunk], [p[1] for p in chunk])

    def no_labels(batch: A.Batch, a: int, b: int) -> torch.Tensor:
        return torch.zeros(int(batch.post_image_bs.sum()), dtype=torch.bool)

    harvest = _positions_harvester(vlm, prepare, layers, lambda batch: batch.post_image_bs, no_labels, mean_d)
    n_rows = len(plan.rows(rank))
    for batch in world_batches(harvest, len(pairs), batch_size, rows_by_rank, 2 * L, vlm.d_model, group=group):
        for layer, _, row in owned:
            sae = own[layer]
            z_clean = sae.encode(batch.x_lnd[row].to(sae.dtype)).double()
            z_corrupt = sae.encode(batch.x_lnd[n_rows + row].to(sae.dtype)).double()
            diff[layer] += (z_clean - z_corrupt).abs().sum(0).cpu()
            mass[layer] += z_clean.abs().sum(0).cpu()
    frames = []
    for layer in own:
        dep = torch.where(
            mass[layer] > 0, diff[layer] / mass[layer].clamp_min(diffing.EPS), torch.zeros_like(diff[layer])
        )
        frames.append(pd.DataFrame({"layer": layer, "feature": np.arange(len(dep)), "image_dependence": dep.numpy()}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@torch.no_grad()
def firing_counts_sharded(
    vlm: A.VLM,
    saes: Mapping[int, SAE],
    samples,
    spatial_s,
    batch_size: int = 8,
    device=None,
    group=None,
) -> pd.DataFrame:
    """`spatial_stats.spatial_table(firing_counts(...))`'s rows of the layers this rank owns: text positions of
    each rank's share of the questions, labelled spatial or general, to the owners. Sort every rank's rows by
    layer (`merge`) for the table."""
    spatial_s = torch.as_tensor(np.asarray(spatial_s, dtype=bool))
    assert len(spatial_s) == len(samples), f"{len(spatial_s)} spatial flags for {len(samples)} samples"
    layers = sorted(saes)
    plan, rank, device = _plan(layers, ("sae",), group, device)
    rows_by_rank = [plan.rows(r) for r in range(plan.n_ranks)]
    owned = _owned(plan, rank)
    own = {layer: _on(saes[layer], device) for layer, _, _ in owned}

    def prepare(a: int, b: int) -> A.Batch:
        return A.prepare(vlm, [samples.images[i] for i in range(a, b)], list(samples.questions[a:b]))

    def labels(batch: A.Batch, a: int, b: int) -> torch.Tensor:
        text_bs = batch.text_bs.cpu()
        return spatial_s[a:b, None].expand_as(text_bs)[text_bs]

    harvest = _positions_harvester(vlm, prepare, layers, lambda batch: batch.text_bs, labels)
    counts: dict[int, FiringCounts] = {}
    for batch in world_batches(harvest, len(samples), batch_size, rows_by_rank, len(layers), vlm.d_model, group=group):
        # The exchanged per-token labels travel as the batch's mask: here they say "spatial question".
        for layer, _, row in owned:
            z_nf = own[layer].encode(batch.x_lnd[row]).float().cpu()
            counts.setdefault(layer, FiringCounts(z_nf.shape[1])).update(z_nf, batch.image_mask_n.cpu())
    return spatial_table(counts) if counts else pd.DataFrame()


@torch.no_grad()
def reconstruction_sharded(
    vlm: A.VLM,
    base_saes: Mapping[int, SAE],
    adapted: Mapping[str, Mapping[int, SAE]],
    heldout_pairs: Sequence[tuple[Any, str]],
    heldout_text_pairs: Sequence[tuple[str, str]],
    batch_size: int = 8,
    text_variant: str = "text-only",
    device=None,
    group=None,
) -> pd.DataFrame:
    """`adaptation.reconstruction_table`'s rows of the SAEs this rank owns: the base SAE of every layer and each
    variant of `adapted` are shared out as one bank of (layer, sae) pairs, so no rank holds more than its share (at
    the paper's 32 layers the whole bank is about 137 GB). Each owner keeps its own `ReconAccumulator` over the world
    batch's tokens; on the LM stream the owners of the base and `text_variant` SAEs count. Order every rank's rows
    with `merge(parts, reconstruction_order(...), ("stream", "layer", "sae"))`."""
    from lib.kernels.adaptation import recon_frame, sae_reconstruct
    from lib.kernels.sae import BASE
    from lib.kernels.sae_training import ReconAccumulator

    layers, names = sorted(base_saes), [BASE.name, *adapted]
    plan, rank, device = _plan(layers, names, group, device)
    rows_by_rank = [plan.rows(r) for r in range(plan.n_ranks)]
    owned = _owned(plan, rank)
    saes = {(x, s): _on(base_saes[x] if s == BASE.name else adapted[s][x], device) for x, s, _ in owned}
    streams = {
        "vlm": (vlm_harvester(vlm, heldout_pairs, layers, device), len(heldout_pairs), names),
        "lm": (_text_harvester(vlm, heldout_text_pairs, layers, device), len(heldout_text_pairs),
               [BASE.name, text_variant]),
    }  # fmt: skip
    out = {}
    for stream, (harvest, n_items, counted) in streams.items():
        mine = [(x, s, row) for x, s, row in owned if s in counted]
        acc = {(x, s): ReconAccumulator([x], [s], vlm.d_model) for x, s, _ in mine}
        for batch in world_batches(harvest, n_items, batch_size, rows_by_rank, len(layers), vlm.d_model, group=group):
            for x, s, row in mine:
                x_nd = batch.x_lnd[row]
                x_hat = sae_reconstruct(saes[(x, s)], x_nd)
                acc[(x, s)].update(x_nd[None], x_hat[None, :, None], batch.image_mask_n.to(x_nd.device))
        out[stream] = [r for a in acc.values() for r in a.result()]
    return recon_frame(out)


def reconstruction_order(layers: Sequence[int], variants: Sequence[str], text_variant: str = "text-only"):
    """(stream, layer, sae) in the order `reconstruction_table` writes its rows."""
    from lib.kernels.sae import BASE

    return [
        *(("vlm", x, s) for x in sorted(layers) for s in (BASE.name, *variants)),
        *(("lm", x, s) for x in sorted(layers) for s in (BASE.name, text_variant)),
    ]


def _text_harvester(vlm: A.VLM, pairs: Sequence[tuple[str, str]], layers: Sequence[int], device):
    """`harvest_micro` for (caption, question) pairs through the base LM, every layer."""

    def harvest_micro(a: int, b: int) -> ActBatch:
        return next(lm_batches(vlm, [pairs[i] for i in range(a, b)], b - a, layers, device=device))

    return harvest_micro
