"""Step 1: the base SAEs (trained on the base LM's text, or the paper's Llama Scope), the width x k sweep they are
chosen from, their adaptation to the VLM in four variants, and held-out reconstruction by token split."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd

from lib.io.cache import load_table, save_table
from lib.steps.data import data_reads
from lib.steps.registry import step

PAPER_SAE_READS = ("paper.base_saes", "paper.sae_release", "paper.sae_id", "paper.topk")


def sae_layers(P, vlm) -> list[int]:
    return list(P.sae.layers) or list(range(vlm.n_layers))


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

        device = str(next(vlm.model.parameters()).device)
        saes = {
            layer: load_llama_scope_topk(layer, P.paper.topk, device, P.paper.sae_release, P.paper.sae_id)
            for layer in layers
        }
        return BaseSAEs(saes, None, None, None)
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
        "sae.base_lr",
        "sae.base_batch_size",
    ),
)
def base_sae_sweep(ctx) -> pd.DataFrame | None:
    """Organism only: base SAEs for every expansion x k of the profile's sweep, on the first `sweep_pairs` text
    pairs; per layer FVU and dead fraction on the held-out text stream (what the profile's choice is read from)."""
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
            sae_layers(P, vlm),
            P.seed,
            batch_size=P.sae.base_batch_size,
        )
        table.insert(2, "expansion", table.d_sae // vlm.d_model)
        save_table(out / "sweep.parquet", table)

    return load_table(ctx.cached(build) / "sweep.parquet")


class Adapted(NamedTuple):
    saes: dict  # variant -> layer -> SAELens SAE
    bank: object  # the same SAEs as one lib.kernels.sae.SAEBank (evaluation in one pass)
    history: pd.DataFrame
    epoch_log: pd.DataFrame
    artifact: object


@step(
    "adapted-saes",
    after=("models", "base-saes"),
    reads=(*data_reads("adapt", "heldout"), "threads", "sae.layers", "sae.lr", "sae.batch_size", "sae.eval_every"),
    version=2,  # 2: fresh variants no longer repeat the base SAEs' initial draw (adaptation.FRESH_SEED_OFFSET)
)
def adapted_saes(ctx) -> Adapted:
    """Every layer's base SAE fine-tuned on the VLM stream in the four variants, one pass, one forward per batch
    for all layers and variants. Resumable: a killed build restarts from its checkpoint in the cache directory."""
    from lib.kernels.adaptation import adapt_saes
    from lib.kernels.sae import ADAPTATION_VARIANTS, SAEBank, SAESpec, load_saes
    from lib.kernels.sae_training import TrainConfig

    P, vlm, D, base = ctx.P, ctx.up("models"), ctx.data, ctx.up("base-saes")
    layers = sae_layers(P, vlm)
    any_sae = base.saes[layers[0]]
    spec = SAESpec(any_sae.cfg.d_in, any_sae.cfg.d_sae, int(any_sae.cfg.k), bool(any_sae.cfg.apply_b_dec_to_input))
    checkpoint = ctx.checkpoint()

    def build(out):
        res = adapt_saes(
            vlm,
            base.saes,
            D.adapt,
            D.heldout,
            spec,
            TrainConfig(lr=P.sae.lr, num_threads=P.threads),
            layers,
            P.seed,
            P.sae.eval_every,
            checkpoint,
            batch_size=P.sae.batch_size,
        )
        res.bank.save_saes(out / "saes")
        save_table(out / "history.parquet", res.history)
        save_table(out / "epoch_log.parquet", res.epoch_log)
        checkpoint.unlink(missing_ok=True)
        return {"forwards_per_epoch": res.forwards_per_epoch}

    art = ctx.cached(build)
    saes = {v.name: load_saes(art / "saes", layers, v.name) for v in ADAPTATION_VARIANTS}
    return Adapted(
        saes,
        SAEBank.from_saes(saes),
        load_table(art / "history.parquet"),
        load_table(art / "epoch_log.parquet"),
        art,
    )


@step(
    "reconstruction",
    after=("models", "base-saes", "adapted-saes"),
    reads=(*data_reads("heldout"), "threads", "sae.batch_size"),
)
def reconstruction(ctx) -> pd.DataFrame:
    """Held-out FVU / normalised MSE by token split: base vs each variant, on the VLM and the LM text streams."""
    from lib.kernels.adaptation import reconstruction_table

    P, vlm, D = ctx.P, ctx.up("models"), ctx.data
    base, adapted = ctx.up("base-saes"), ctx.up("adapted-saes")

    def build(out):
        table = reconstruction_table(
            vlm, base.saes, adapted.bank, D.heldout, D.heldout_text, batch_size=P.sae.batch_size
        )
        save_table(out / "table.parquet", table)

    return load_table(ctx.cached(build) / "table.parquet")
