"""Step 1: the base SAEs (trained on the base LM's text, or the paper's Llama Scope), the width x k sweep they are
chosen from, their adaptation to the VLM in four variants, and held-out reconstruction by token split."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import cached_property, partial
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from lib.io.cache import load_table, save_json, save_table
from lib.steps.data import data_reads
from lib.steps.distributed import RUNS_WITH, gather_table, in_group, launch, wants_workers
from lib.steps.registry import step

PAPER_SAE_READS = ("paper.base_saes", "paper.sae_release", "paper.sae_id", "paper.topk")


def sae_layers(P, vlm) -> list[int]:
    return list(P.sae.layers) or list(range(vlm.n_layers))


class LazySAEs(Mapping):
    """SAEs by layer, each loaded on first use: a process touches only the SAEs it reads (a worker of a distributed
    step its own; the paper's 32 layers are 34 GB per variant). keep=False loads on every use and keeps nothing."""

    def __init__(self, layers, load: Callable[[int], object], keep: bool = True):
        self._layers, self._load, self._loaded, self._keep = tuple(layers), load, {}, keep

    def __getitem__(self, layer: int):
        if layer not in self._layers:
            raise KeyError(layer)
        if not self._keep:
            return self._load(layer)
        if layer not in self._loaded:
            self._loaded[layer] = self._load(layer)
        return self._loaded[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def _load_one(root: Path, variant: str, device: str, layer: int):
    from lib.kernels.sae import load_saes

    return load_saes(root, [layer], variant, device=device)[layer]


def model_device(vlm) -> str:
    """Where the SAEs of a study live: with the VLM whose activations they read."""
    return str(next(vlm.model.parameters()).device)


def encoders(saes_by_layer: Mapping) -> dict:
    """Each layer's SAE encoder, the SAE loaded when the encoder is first called (a kernel that reads a few layers
    of the paper's 32 loads a few SAEs, not 34 GB)."""
    return {layer: partial(_encode, saes_by_layer, layer) for layer in saes_by_layer}


def _encode(saes_by_layer: Mapping, layer: int, x):
    return saes_by_layer[layer].encode(x)


def spec_of(sae):
    from lib.kernels.sae import SAESpec

    cfg = sae.cfg
    return SAESpec(cfg.d_in, cfg.d_sae, int(cfg.k), bool(cfg.apply_b_dec_to_input))


class BaseSAEs(NamedTuple):
    saes: dict  # layer -> SAELens SAE
    report: pd.DataFrame | None  # per layer: d_sae, k, fvu, nmse, dead_frac, n_tokens (organism)
    history: pd.DataFrame | None
    artifact: object | None


@step(
    "base-saes",
    after=("models",),
    reads=(
        *data_reads("text", "heldout"),
        *PAPER_SAE_READS,
        "threads",
        "sae.layers",
        "sae.expansion",
        "sae.k",
        "sae.base_lr",
        "sae.base_batch_size",
    ),
)
def base_saes(ctx) -> BaseSAEs:
    """One TopK SAE per layer trained on the base LM's text stream (the organism, and a `[paper]` section with
    `base_saes = "train"`), or a SAELens release rebuilt as TopK k = paper.topk (Llama Scope for the paper)."""
    from lib.kernels.adaptation import train_base_saes
    from lib.kernels.sae import SAESpec, load_saes
    from lib.kernels.sae_training import TrainConfig

    P, vlm, D = ctx.P, ctx.up("models"), ctx.data
    layers = sae_layers(P, vlm)
    if P.paper is not None and P.paper.base_saes == "release":
        from lib.sources.paper_models import load_llama_scope_topk

        device = model_device(vlm)
        load = partial(
            load_llama_scope_topk, k=P.paper.topk, device=device, release=P.paper.sae_release, sae_id=P.paper.sae_id
        )
        # A worker of a distributed step reads each base SAE of its layers once (to initialise its SAEs, or for the
        # weight diffs): keeping them would hold a GB per layer beside the SAEs being trained.
        return BaseSAEs(LazySAEs(layers, load, keep=not in_group()), None, None, None)
    spec = SAESpec(vlm.d_model, P.sae.expansion * vlm.d_model, P.sae.k)

    def build(out):
        res = train_base_saes(
            vlm,
            D.text,
            D.heldout_text,
            spec,
            TrainConfig(lr=P.sae.base_lr, num_threads=P.threads),
            layers,
            P.seed,
            batch_size=P.sae.base_batch_size,
            eval_every=max(1, len(D.text) // P.sae.base_batch_size // 10),
        )
        res.bank.save_saes(out / "saes")
        save_table(out / "report.parquet", res.report)
        save_table(out / "history.parquet", res.history)

    art = ctx.cached(build)
    return BaseSAEs(
        load_saes(art / "saes", layers, "base"),
        load_table(art / "report.parquet"),
        load_table(art / "history.parquet"),
        art,
    )


@step(
    "base-sae-sweep",
    after=("models",),
    reads=(
        *data_reads("text", "heldout"),
        "threads",
        "sae.layers",
        "sae.sweep_expansion",
        "sae.sweep_k",
        "sae.sweep_pairs",
        "sae.sweep_every",
        "sae.base_lr",
        "sae.base_batch_size",
    ),
)
def base_sae_sweep(ctx) -> pd.DataFrame | None:
    """Organism only: base SAEs for every expansion x k of the profile's sweep, on the first `sweep_pairs` text
    pairs and every `sweep_every`-th layer; per layer FVU and dead fraction on the held-out text stream (what the
    profile's choice is read from)."""
    from lib.kernels.adaptation import base_sae_sweep as sweep
    from lib.kernels.sae import SAESpec
    from lib.kernels.sae_training import TrainConfig

    P = ctx.P
    if P.paper is not None:
        return None
    vlm, D = ctx.up("models"), ctx.data
    n = min(P.sae.sweep_pairs, len(D.text))

    def build(out):
        specs = [
            SAESpec(vlm.d_model, int(e) * vlm.d_model, int(k))
            for e in P.sae.sweep_expansion
            for k in P.sae.sweep_k
            if k <= e * vlm.d_model
        ]
        table = sweep(
            vlm,
            D.text[:n],
            D.heldout_text,
            specs,
            TrainConfig(lr=P.sae.base_lr, num_threads=P.threads),
            sae_layers(P, vlm)[:: P.sae.sweep_every],
            P.seed,
            batch_size=P.sae.base_batch_size,
        )
        table.insert(2, "expansion", table.d_sae // vlm.d_model)
        save_table(out / "sweep.parquet", table)

    return load_table(ctx.cached(build) / "sweep.parquet")


class Adapted:
    """The adapted SAEs: `saes[variant][layer]` (SAELens SAEs, each loaded on first use), `bank` (all of them as one
    lib.kernels.sae.SAEBank, built on first use: evaluation in one pass), the training history and epoch log."""

    def __init__(self, saes: dict, history: pd.DataFrame, epoch_log: pd.DataFrame, artifact, device: str = "cpu"):
        self.saes, self.history, self.epoch_log, self.artifact = saes, history, epoch_log, artifact
        self.device = device

    @cached_property
    def bank(self):
        """Every layer and variant in one bank, on the SAEs' device (a single process's evaluation; a distributed
        step never builds it: at the paper's 32 layers it is about 137 GB)."""
        from lib.kernels.sae import SAEBank

        return SAEBank.from_saes(self.saes).to(self.device)


@step(
    "adapted-saes",
    after=("models", "base-saes"),
    reads=(
        *data_reads("adapt", "heldout"),
        "threads",
        "sae.layers",
        "sae.lr",
        "sae.batch_size",
        "sae.eval_every",
        "distributed.dtype",
    ),
    runs_with=RUNS_WITH,
    version=2,  # 2: fresh variants no longer repeat the base SAEs' initial draw (adaptation.FRESH_SEED_OFFSET)
)
def adapted_saes(ctx) -> Adapted:
    """Every layer's base SAE fine-tuned on the VLM stream in the four variants, one pass, one forward per batch
    for all layers and variants (on `[distributed] processes` processes, the SAEs shared out: lib/steps/
    distributed.py). Resumable: a killed build restarts from its checkpoint in the cache directory."""
    from lib.kernels.sae import ADAPTATION_VARIANTS

    def build(out):
        if in_group():
            raise RuntimeError("adapted-saes must be built before a distributed step that follows it is launched")
        return launch(ctx, out) if wants_workers(ctx.P) else adapt_into(ctx, out)

    art = ctx.cached(build)
    layers = sorted(int(p.name[1:]) for p in (art / "saes").iterdir() if p.name.startswith("L"))
    device = model_device(ctx.up("models"))
    saes = {v.name: LazySAEs(layers, partial(_load_one, art / "saes", v.name, device)) for v in ADAPTATION_VARIANTS}
    tables = [load_table(art / f"{name}.parquet") for name in ("history", "epoch_log")]
    return Adapted(saes, *tables, art, device)


def _first_own_layer(layers: list[int]) -> int:
    """A layer whose base SAE this process reads anyway (its own first, in a worker), to take the SAEs' shape from."""
    if not in_group():
        return layers[0]
    import torch.distributed as dist

    from lib.kernels.sae import ADAPTATION_VARIANTS
    from lib.kernels.sae_sharding import ShardPlan

    plan = ShardPlan(tuple(layers), tuple(v.name for v in ADAPTATION_VARIANTS), dist.get_world_size())
    rows = plan.rows(dist.get_rank())
    return layers[rows[0]] if rows else layers[0]


def adapt_into(ctx, out: Path) -> dict:
    """Write the adapted SAEs, their history and epoch log into `out`: in this process, or, in a worker of a
    distributed step, this rank's SAEs (rank 0 writes the tables)."""
    import torch

    from lib.kernels.adaptation import adapt_saes
    from lib.kernels.sae_training import TrainConfig

    P, vlm, D, base = ctx.P, ctx.up("models"), ctx.data, ctx.up("base-saes")
    layers = sae_layers(P, vlm)
    spec = spec_of(base.saes[_first_own_layer(layers)])
    cfg = TrainConfig(lr=P.sae.lr, num_threads=P.threads)
    checkpoint = ctx.checkpoint()
    if not in_group():
        res = adapt_saes(
            vlm, base.saes, D.adapt, D.heldout, spec, cfg, layers, P.seed, P.sae.eval_every, checkpoint,
            batch_size=P.sae.batch_size,
        )  # fmt: skip
        res.bank.save_saes(out / "saes")
        save_table(out / "history.parquet", res.history)
        save_table(out / "epoch_log.parquet", res.epoch_log)
        checkpoint.unlink(missing_ok=True)
        return {"forwards_per_epoch": res.forwards_per_epoch}
    import torch.distributed as dist

    from lib.kernels.adaptation_distributed import adapt_saes_sharded
    from lib.kernels.sae_distributed import remove_checkpoint

    sharded = checkpoint.with_name(checkpoint.stem + "-sharded.json")
    res = adapt_saes_sharded(
        vlm, base.saes, D.adapt, D.heldout, spec, cfg, layers, P.seed, P.sae.eval_every, sharded,
        batch_size=P.sae.batch_size, dtype=getattr(torch, P.distributed.dtype),
    )  # fmt: skip
    res.shard.save_saes(out / "saes")
    dist.barrier()
    info = {"forwards_per_epoch": res.forwards_per_epoch}
    if dist.get_rank() == 0:
        save_table(out / "history.parquet", res.history)
        save_table(out / "epoch_log.parquet", res.epoch_log)
        save_json(out / "info.json", info)
        remove_checkpoint(sharded)
    return info


@step(
    "reconstruction",
    after=("models", "base-saes", "adapted-saes"),
    reads=(*data_reads("heldout"), "threads", "sae.batch_size"),
    runs_with=RUNS_WITH,
)
def reconstruction(ctx) -> pd.DataFrame:
    """Held-out FVU / normalised MSE by token split: base vs each variant, on the VLM and the LM text streams (on
    `[distributed] processes` processes, the base and adapted SAEs shared out like adaptation's)."""

    def build(out):
        if in_group():
            raise RuntimeError("reconstruction must be built before a distributed step that follows it is launched")
        return launch(ctx, out) if ctx.P.distributed.processes > 1 else reconstruction_into(ctx, out)

    return load_table(ctx.cached(build) / "table.parquet")


def reconstruction_into(ctx, out: Path) -> None:
    """Write the reconstruction table into `out`; in a worker, each rank the rows of its SAEs, rank 0 the table."""
    P, vlm, D = ctx.P, ctx.up("models"), ctx.data
    base, adapted = ctx.up("base-saes"), ctx.up("adapted-saes")
    if not in_group():
        from lib.kernels.adaptation import reconstruction_table

        table = reconstruction_table(
            vlm, base.saes, adapted.bank, D.heldout, D.heldout_text, batch_size=P.sae.batch_size
        )
    else:
        from lib.kernels.stats_distributed import reconstruction_order, reconstruction_sharded

        layers = sorted(base.saes)
        part = reconstruction_sharded(
            vlm, base.saes, adapted.saes, D.heldout, D.heldout_text, batch_size=P.sae.batch_size
        )
        order = reconstruction_order(layers, list(adapted.saes))
        table = gather_table(part, out / ".parts", order, ("stream", "layer", "sae"))
        if table is None:  # not rank 0
            return
    save_table(out / "table.parquet", table)
