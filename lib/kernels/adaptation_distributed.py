"""SAE adaptation (METHOD.md step 1) on the ranks of a torch.distributed process group: the single-process
`adaptation.adapt_saes`, with the SAE bank shared out over the ranks and the model run on every rank.

Every rank holds a frozen copy of the model. A world batch is exactly the single process's batch (`batch_size`
consecutive sequences); rank r runs the model on its contiguous share of it (`micro_range`), and the activations
of each layer go to the ranks whose SAEs read that layer (`sae_distributed.exchange`). Each SAE then takes the
single process's step on the whole world batch: same tokens, same order, the same batch-FVU loss over the tokens
of its mask. One Adam step per world batch; held-out FVU measured where each SAE lives and gathered; sharded
checkpoints. A killed run restarted with the same ranks ends bit for bit equal to an uninterrupted one. One rank is
the single process bit for bit; N ranks give its SAEs to 1e-5, not bit for bit (tests/test_distributed.py
measures about 2e-6 after 100 steps): a rank stacks its SAEs in other shapes than the single bank, so float sums
run in another order, and the model's forward on a micro-batch padded to its own longest sequence differs from the
world batch's in the last bit for some batches.

`world_batches` and `SharedReplay` are also what the distributed statistics pass (lib/kernels/stats_distributed.py)
streams through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
import torch.distributed as dist
from sae_lens import SAE

from lib.kernels import adapter as A
from lib.kernels.activations import ActBatch, Replay, check_layers, device_of, vlm_batches
from lib.kernels.adaptation import DEFAULT_TRAIN, FRESH_SEED_OFFSET, HELDOUT_CACHE_BYTES
from lib.kernels.sae import ADAPTATION_VARIANTS, SAESpec, Variant
from lib.kernels.sae_distributed import Shard, ShardTrainer, comm_device, exchange, micro_range
from lib.kernels.sae_sharding import ShardPlan
from lib.kernels.sae_training import TrainConfig, fit


def world_batches(
    harvest_micro: Callable[[int, int], ActBatch | None],
    n_items: int,
    batch_size: int,
    rows_by_rank: Sequence[Sequence[int]],
    n_layers: int,
    d_model: int,
    start: int = 0,
    group=None,
) -> Iterator[ActBatch]:
    """World batches of items [start, n_items), `batch_size` each, as the rows `rows_by_rank[rank]` of every layer.

    `harvest_micro(a, b)` runs the model on items [a, b) (this rank's share of a world batch) and returns its
    `ActBatch` (every layer, `n_layers` rows). A rank whose share is empty (a last world batch smaller than the
    number of ranks) runs nothing and sends no tokens. n_forwards of a world batch: the ranks that ran the model.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for lo in range(start, n_items, batch_size):
        hi = min(lo + batch_size, n_items)
        a, b = micro_range(lo, hi, rank, world)
        local = harvest_micro(a, b) if b > a else None
        if local is None:
            local = ActBatch(torch.zeros(n_layers, 0, d_model), torch.zeros(0, dtype=torch.bool), 0, 0)
        x_rnd, labels_n, _ = exchange(local.x_lnd, local.image_mask_n, rows_by_rank, group)
        yield ActBatch(x_rnd, labels_n.bool(), n_sequences=hi - lo, n_forwards=min(hi - lo, world))


class SharedReplay(Replay):
    """`Replay` whose keep-or-harvest-again decision every rank takes together: a rank that replays from memory while
    another harvests again would leave the other waiting in a collective forever."""

    def __init__(self, make, max_bytes: int, group=None):
        super().__init__(make, max_bytes)
        self.group = group

    def _harvest(self) -> Iterator[ActBatch]:
        yield from super()._harvest()  # every evaluation reads all batches, so the lines below always run
        fits = torch.tensor([int(self.fits)], device=comm_device(self.group))
        dist.all_reduce(fits, op=dist.ReduceOp.MIN, group=self.group)
        self.fits = bool(fits.item())
        if not self.fits:
            self.kept = None


class ShardedAdaptation(NamedTuple):
    shard: Shard  # this rank's SAEs
    history: pd.DataFrame  # held-out FVU over training of every SAE (the same on every rank)
    forwards_per_epoch: list[int]  # model forwards per pass, summed over ranks (one per non-empty micro-batch)
    epoch_log: pd.DataFrame


def vlm_harvester(vlm: A.VLM, pairs: Sequence[tuple[Any, str]], layers: Sequence[int], device):
    """`harvest_micro` for (image, question) pairs: one VLM forward on pairs[a:b], every layer."""

    def harvest_micro(a: int, b: int) -> ActBatch:
        return next(vlm_batches(vlm, [pairs[i] for i in range(a, b)], b - a, layers, device=device))

    return harvest_micro


def adapt_saes_sharded(
    vlm: A.VLM,
    base_saes: Mapping[int, SAE],
    adapt_pairs: Sequence[tuple[Any, str]],
    heldout_pairs: Sequence[tuple[Any, str]],
    spec: SAESpec,
    cfg: TrainConfig = DEFAULT_TRAIN,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    eval_every: int = 0,
    checkpoint: str | Path | None = None,
    *,
    batch_size: int = 8,
    variants: Sequence[Variant] = ADAPTATION_VARIANTS,
    checkpoint_every: int | None = None,
    heldout_cache_bytes: int = HELDOUT_CACHE_BYTES,
    device=None,
    dtype: torch.dtype = torch.float32,
    group=None,
) -> ShardedAdaptation:
    """`adapt_saes` with the same arguments, called on every rank of the process group (module docstring).

    `checkpoint` is the sharded checkpoint's JSON (each rank's file lies beside it); `dtype` the SAEs' weights and
    Adam state (bfloat16 halves them; the loss is computed in float32). Returns this rank's SAEs and the history of
    all of them."""
    layers = check_layers(vlm, sorted(base_saes) if layers is None else layers)
    device = device_of(vlm.model) if device is None else torch.device(device)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    plan = ShardPlan(tuple(layers), tuple(v.name for v in variants), world)
    rows_by_rank = [plan.rows(r) for r in range(world)]
    name = getattr(vlm.model.config, "_name_or_path", "") or "VLM"
    shard = Shard.create(
        plan, rank, spec, variants, base_saes, seed + FRESH_SEED_OFFSET, name, device=device, dtype=dtype
    )
    if checkpoint_every is None:
        checkpoint_every = eval_every or 100
    if eval_every and checkpoint_every % eval_every:
        raise ValueError(
            f"checkpoint_every = {checkpoint_every}: expected a multiple of eval_every = {eval_every}, so that a "
            "resumed run logs the same held-out history as an uninterrupted one"
        )

    def stream(pairs: Sequence, start: int = 0) -> Iterator[ActBatch]:
        return world_batches(
            vlm_harvester(vlm, pairs, layers, device),
            len(pairs),
            batch_size,
            rows_by_rank,
            len(layers),
            vlm.d_model,
            start,
            group,
        )

    heldout = SharedReplay(lambda: stream(heldout_pairs), heldout_cache_bytes, group)
    trainer = ShardTrainer(shard, cfg, group)
    fit(
        trainer,
        lambda pos: stream(adapt_pairs, pos),
        n_epochs=1,
        heldout=heldout,
        eval_every=eval_every,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every if checkpoint is not None else 0,
    )
    # One forward per non-empty micro-batch: batches x min(batch_size, ranks) for a run on one rank count (a run
    # resumed on another count mixes the two; tests/test_distributed.py checks the first).
    per_epoch = [int(row["n_forwards"]) for row in trainer.epoch_log]
    return ShardedAdaptation(shard, pd.DataFrame(trainer.history), per_epoch, pd.DataFrame(trainer.epoch_log))
