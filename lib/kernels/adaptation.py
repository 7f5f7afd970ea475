"""SAE adaptation (METHOD.md step 1): train base SAEs, adapt them, measure.

lib/kernels/sae.py holds the SAEs, lib/kernels/sae_training.py the trainer and the metrics, lib/kernels/activations.py
the activation batches one model forward gives. This module joins them:

- `train_base_saes`: one fresh TopK SAE per layer on the base LM's text stream (the stand-in for Llama Scope in the
  organism profiles), with its held-out FVU and dead fraction; `base_sae_sweep` compares widths and k.
- `adapt_saes`: every layer's base SAE fine-tuned on the VLM stream in the four variants (`full`, `random`,
  `text-only`, `image-only`), one pass over the adaptation pairs in the order given, held-out FVU logged over
  training, resumable from a checkpoint (a killed run restarted with the same arguments ends with the same SAEs).
- `reconstruction_table` / `summary_table`: FVU by token split and normalised MSE, base vs adapted vs random, on the
  VLM stream and on the LM text stream (the paper's Table 1 and reconstruction-gap figure).
- `norm_ratio`: mean residual norms of the two streams per layer, to say how activation scale is handled.

The figures of these tables are lib/figures/saes.py. Choices: data is consumed in the order given (the caller
shuffles; the profile fixes the seed); SAEs read raw activations (no rescaling, lib/kernels/sae.py's default;
`norm_ratio` reports what that means).

Shape key (suffixes of tensor names): l layer, n token (flattened over sequences), d model width, v variant,
p token split (full / image / text).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from sae_lens import SAE

from lib.kernels import adapter as A
from lib.kernels.activations import ActBatch, Replay, check_layers, device_of, lm_batches, vlm_batches
from lib.kernels.sae import ADAPTATION_VARIANTS, BASE, SAEBank, SAESpec, Variant
from lib.kernels.sae_training import (
    ReconAccumulator,
    ReconStats,
    StreamingTrainer,
    TrainConfig,
    fit,
    fvu_table,
)

log = logging.getLogger(__name__)

HELDOUT_CACHE_BYTES = 1 << 30  # held-out activations up to this size are harvested once and replayed from memory
FRESH_SEED_OFFSET = 1_000_003  # adapt_saes: fresh variants never repeat the base SAEs' initial draw
DEFAULT_TRAIN = TrainConfig()  # lr 2e-4, Adam, 2 threads (lib/kernels/sae_training.py)
TABLE_COLUMNS = ("layer", "sae", "stream", "split", "fvu", "nmse", "n_tokens")


# --------------------------------------------------------------------------------------------------------------
# Training: base SAEs and adaptation share one loop
# --------------------------------------------------------------------------------------------------------------


def _train(
    bank: SAEBank,
    cfg: TrainConfig,
    stream_from: Callable[[int], Iterator[ActBatch]],
    heldout: Replay,
    n_epochs: int,
    eval_every: int,
    checkpoint: str | Path | None,
    checkpoint_every: int | None,
) -> StreamingTrainer:
    if checkpoint_every is None:
        checkpoint_every = eval_every or 100
    if eval_every and checkpoint_every % eval_every:
        # fit logs a held-out evaluation when it resumes at a step that has none; a checkpoint off the evaluation
        # grid would give the resumed run's history one row more than the uninterrupted one.
        raise ValueError(
            f"checkpoint_every = {checkpoint_every}: expected a multiple of eval_every = {eval_every}, so that a "
            "resumed run logs the same held-out history as an uninterrupted one"
        )
    trainer = StreamingTrainer(bank, cfg)
    fit(
        trainer,
        stream_from,
        n_epochs=n_epochs,
        heldout=heldout,
        eval_every=eval_every,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every if checkpoint is not None else 0,
    )
    return trainer


def _forwards_per_epoch(trainer: StreamingTrainer, n_sequences: int, batch_size: int, what: str) -> list[int]:
    expected = math.ceil(n_sequences / batch_size)
    per_epoch = [int(row["n_forwards"]) for row in trainer.epoch_log]
    for row in trainer.epoch_log:
        log.info(
            "%s epoch %d: %d model forwards for %d sequences served %d SAEs",
            what,
            row["epoch"],
            row["n_forwards"],
            row["n_sequences"],
            row["n_saes"],
        )
    assert all(f == expected for f in per_epoch), (
        f"{what}: {per_epoch} forwards per epoch, expected {expected} (one per batch of {batch_size})"
    )
    return per_epoch


class BaseTraining(NamedTuple):
    bank: SAEBank  # one variant, "base", per layer
    history: pd.DataFrame  # held-out FVU over training (see StreamingTrainer.history)
    dead_frac: dict[int, float]  # per layer: features that never fired on the held-out text tokens
    heldout_fvu: dict[int, float]  # per layer: FVU on all held-out text tokens at the end
    report: pd.DataFrame  # per layer: d_sae, k, fvu, nmse, dead_frac, n_tokens (what a width/k choice reads)


def train_base_saes(
    vlm: A.VLM,
    text_pairs: Sequence[tuple[str, str]],
    heldout_text_pairs: Sequence[tuple[str, str]],
    spec: SAESpec,
    cfg: TrainConfig = DEFAULT_TRAIN,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    *,
    batch_size: int = 8,
    n_epochs: int = 1,
    eval_every: int = 0,
    checkpoint_every: int | None = None,
    heldout_cache_bytes: int = HELDOUT_CACHE_BYTES,
    device=None,
) -> BaseTraining:
    """Fresh TopK SAEs, one per layer, trained on the base LM's residual stream over (caption, question) pairs.

    All layers train from the same batches (one LM forward per batch). Dead fraction and FVU are measured on the
    held-out pairs after the last epoch; a feature counts as dead if it never fired there, so the number depends on
    the held-out size (`report.n_tokens`)."""
    layers = check_layers(vlm, layers)
    device = device_of(vlm.model) if device is None else torch.device(device)
    name = getattr(getattr(vlm.base_lm, "config", None), "_name_or_path", "") or "base LM"
    bank = SAEBank.create(spec, layers, [BASE], seed=seed, model_name=name).to(device)
    heldout = Replay(
        lambda: lm_batches(vlm, heldout_text_pairs, batch_size, layers, device=device), heldout_cache_bytes
    )
    trainer = _train(
        bank,
        cfg,
        lambda pos: lm_batches(vlm, text_pairs, batch_size, layers, start=pos, device=device),
        heldout,
        n_epochs,
        eval_every,
        checkpoint,
        checkpoint_every,
    )
    _forwards_per_epoch(trainer, len(text_pairs), batch_size, "base SAEs")
    history = pd.DataFrame(trainer.history)
    final = history[(history.step == history.step.max()) & (history.split == "full")].set_index("layer")
    report = pd.DataFrame(
        {
            "layer": list(layers),
            "d_sae": spec.d_sae,
            "k": spec.k,
            "fvu": [float(final.fvu[x]) for x in layers],
            "nmse": [float(final.nmse[x]) for x in layers],
            "dead_frac": [float(final.dead_frac[x]) for x in layers],
            "n_tokens": [int(final.n_tokens[x]) for x in layers],
        }
    )
    return BaseTraining(
        trainer.bank,
        history,
        dict(zip(report.layer, report.dead_frac, strict=True)),
        dict(zip(report.layer, report.fvu, strict=True)),
        report,
    )


def base_sae_sweep(
    vlm: A.VLM,
    text_pairs: Sequence[tuple[str, str]],
    heldout_text_pairs: Sequence[tuple[str, str]],
    specs: Sequence[SAESpec],
    cfg: TrainConfig = DEFAULT_TRAIN,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    **kwargs,
) -> pd.DataFrame:
    """`train_base_saes` for each spec (e.g. widths x k); the per-layer reports stacked, so a profile can pick the
    width and k that keep dead features rare with a low FVU. Each spec is a separate run over the data."""
    return pd.concat(
        [train_base_saes(vlm, text_pairs, heldout_text_pairs, s, cfg, layers, seed, **kwargs).report for s in specs],
        ignore_index=True,
    )


def saes_of(bank: SAEBank, variant: str = "base") -> dict[int, SAE]:
    """One variant of a bank as SAELens SAEs by layer (e.g. the base SAEs `adapt_saes` starts from)."""
    return {layer: bank.sae(layer, variant) for layer in bank.layers}


class Adaptation(NamedTuple):
    bank: SAEBank  # layers x variants (ADAPTATION_VARIANTS by default)
    history: pd.DataFrame  # held-out FVU over training: step, layer, variant, split, fvu, nmse, dead_frac, ...
    forwards_per_epoch: list[int]  # VLM forwards per pass over the adaptation pairs (one per batch)
    epoch_log: pd.DataFrame  # per epoch: step, sequences, forwards, SAEs served


def adapt_saes(
    vlm: A.VLM,
    base_saes: Mapping[int, SAE] | SAEBank,
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
) -> Adaptation:
    """Fine-tune every layer's base SAE on the VLM's activations in every variant, one pass over `adapt_pairs`.

    base_saes: SAELens SAEs by layer, or the bank `train_base_saes` returned. Variants with init "base" copy them,
    `random` starts fresh (seeded by `seed`). Each step is one VLM forward on `batch_size` pairs feeding all
    layers x variants; held-out FVU is logged at step 0, every `eval_every` steps and at the end. With
    `checkpoint`, the trainer state is written every `checkpoint_every` steps (default: `eval_every`, else 100)
    and at the end, and a run restarted with the same arguments resumes from it and ends with the same SAEs.
    """
    if isinstance(base_saes, SAEBank):
        base_saes = saes_of(base_saes, base_saes.variants[0].name)
    layers = check_layers(vlm, sorted(base_saes) if layers is None else layers)
    device = device_of(vlm.model) if device is None else torch.device(device)
    name = getattr(vlm.model.config, "_name_or_path", "") or "VLM"
    # Fresh variants draw from a stream of their own: `train_base_saes(seed=seed)` initialised the base SAEs from
    # `seed`, and a `random` variant started from that same draw would begin next to the base dictionary (measured:
    # median decoder cosine with the base SAE 0.7-0.9 after adaptation instead of near 0).
    bank = SAEBank.create(
        spec, layers, variants, base_saes=base_saes, seed=seed + FRESH_SEED_OFFSET, model_name=name
    ).to(device)
    heldout = Replay(lambda: vlm_batches(vlm, heldout_pairs, batch_size, layers, device=device), heldout_cache_bytes)
    trainer = _train(
        bank,
        cfg,
        lambda pos: vlm_batches(vlm, adapt_pairs, batch_size, layers, start=pos, device=device),
        heldout,
        1,
        eval_every,
        checkpoint,
        checkpoint_every,
    )
    per_epoch = _forwards_per_epoch(trainer, len(adapt_pairs), batch_size, "adaptation")
    log.info("adaptation: %d held-out VLM forwards in this process", heldout.n_forwards)
    return Adaptation(trainer.bank, pd.DataFrame(trainer.history), per_epoch, pd.DataFrame(trainer.epoch_log))


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sae_reconstruct(sae: SAE, x_nd: torch.Tensor) -> torch.Tensor:
    """A SAELens SAE's reconstruction of x, computed where the SAE lives, returned where x lives, in float32."""
    return sae.decode(sae.encode(x_nd.to(sae.device, sae.dtype))).to(x_nd.device, torch.float32)


@torch.no_grad()
def _recon_stats(
    batches: Iterable[ActBatch],
    layers: Sequence[int],
    base: Mapping[int, SAE],
    bank: SAEBank,
    variant_names: Sequence[str],
) -> list[ReconStats]:
    """FVU / normalised MSE by split, on one stream, for the base SAEs (as SAELens computes them) and some variants
    of a bank, from one pass over the batches."""
    acc = ReconAccumulator(layers, [BASE.name, *variant_names], bank.spec.d_in)
    vi = [bank.index(layers[0], v)[1] for v in variant_names]
    for batch in batches:
        x_lnd = batch.x_lnd
        base_lnd = torch.stack([sae_reconstruct(base[layer], x_lnd[li]) for li, layer in enumerate(layers)])
        x_hat_lnvd = bank(x_lnd.to(bank.W_enc.device)).x_hat_lnvd[:, :, vi]
        x_hat_lnvd = (x_hat_lnvd / bank.act_scale_lv[:, None, vi, None]).to(x_lnd.device)
        acc.update(x_lnd, torch.cat([base_lnd[:, :, None], x_hat_lnvd], dim=2), batch.image_mask_n)
    return acc.result()


def reconstruction_table(
    vlm: A.VLM,
    base_saes: Mapping[int, SAE] | SAEBank,
    adapted: SAEBank,
    heldout_pairs: Sequence[tuple[Any, str]],
    heldout_text_pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    text_variant: str = "text-only",
    device=None,
) -> pd.DataFrame:
    """Held-out reconstruction of every layer, long format (layer, sae, stream, split, fvu, nmse, n_tokens).

    stream "vlm" (held-out (image, question) pairs): the base SAE before adaptation and every variant of `adapted`;
    stream "lm" (held-out (caption, question) pairs through the base LM): the base SAE and the adapted
    `text_variant`. Splits full / image / text each use their own mean for FVU; nmse = SSE / sum ||x||^2. The LM
    stream has no image tokens, so it has no image rows. One forward per batch per stream serves all rows.
    """
    if isinstance(base_saes, SAEBank):
        base_saes = saes_of(base_saes, base_saes.variants[0].name)
    layers = adapted.layers
    missing = [x for x in layers if x not in base_saes]
    if missing:
        raise ValueError(f"reconstruction_table: base_saes has no SAE for layers {missing}")
    device = adapted.W_enc.device if device is None else device
    names = [v.name for v in adapted.variants]
    if BASE.name in names:
        raise ValueError(f"reconstruction_table: the adapted bank has a variant named {BASE.name!r}")
    streams = {
        "vlm": _recon_stats(
            vlm_batches(vlm, heldout_pairs, batch_size, layers, device=device), layers, base_saes, adapted, names
        ),
        "lm": _recon_stats(
            lm_batches(vlm, heldout_text_pairs, batch_size, layers, device=device),
            layers,
            base_saes,
            adapted,
            [text_variant],
        ),
    }
    return recon_frame(streams)


def recon_frame(streams: Mapping[str, Sequence[ReconStats]]) -> pd.DataFrame:
    """`reconstruction_table`'s rows from each stream's statistics (a split with no tokens has no row)."""
    rows = [
        {**s._asdict(), "sae": s.variant, "stream": stream}
        for stream, stats in streams.items()
        for s in stats
        if s.n_tokens > 0
    ]
    return pd.DataFrame(rows, columns=[*ReconStats._fields, "sae", "stream"])[list(TABLE_COLUMNS)]


def summary_table(table: pd.DataFrame, stream: str = "vlm") -> pd.DataFrame:
    """The paper's Table 1 from a `reconstruction_table`: per (sae, split) FVU mean / std / min / max over layers
    and the tokens per layer, on one stream (sae_training.fvu_table does the aggregation)."""
    missing = set(TABLE_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"summary_table: expected a reconstruction_table, missing columns {sorted(missing)}")
    part = table[table.stream == stream]
    if part.empty:
        raise ValueError(f"summary_table: no rows for stream {stream!r}; streams are {sorted(set(table.stream))}")
    stats = [ReconStats(r.layer, r.sae, r.split, r.n_tokens, r.fvu, r.nmse) for r in part.itertuples()]
    out = fvu_table(stats).rename(columns={"variant": "sae"})
    out.insert(1, "stream", stream)
    return out


@torch.no_grad()
def norm_ratio(
    vlm: A.VLM,
    pairs: Sequence[tuple[Any, str]],
    text_pairs: Sequence[tuple[str, str]],
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Mean residual norm ||x|| per layer (BOS dropped) on the VLM's text tokens, the VLM's image tokens and the
    base LM's text tokens, and the ratios to the LM's text norm. SAEs read raw activations; a text ratio far from 1
    would mean the base SAE meets activations at a scale it was not trained for."""
    layers = check_layers(vlm, layers)
    L = len(layers)
    sum_lp, count_p = torch.zeros(L, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    # p: 0 VLM text, 1 VLM image, 2 LM text
    for batch in vlm_batches(vlm, pairs, batch_size, layers):
        w_pn = torch.stack([~batch.image_mask_n, batch.image_mask_n]).double()
        sum_lp[:, :2] += (batch.x_lnd.double().norm(dim=-1) @ w_pn.T).cpu()
        count_p[:2] += w_pn.sum(1).cpu()
    for batch in lm_batches(vlm, text_pairs, batch_size, layers):
        sum_lp[:, 2] += batch.x_lnd.double().norm(dim=-1).sum(1).cpu()
        count_p[2] += batch.x_lnd.shape[1]
    if (count_p == 0).any():
        raise ValueError(f"norm_ratio: no tokens in (VLM text, VLM image, LM text) = {count_p.tolist()}")
    mean_lp = (sum_lp / count_p).numpy()
    return pd.DataFrame(
        {
            "layer": list(layers),
            "vlm_text": mean_lp[:, 0],
            "vlm_image": mean_lp[:, 1],
            "lm_text": mean_lp[:, 2],
            "ratio_text": mean_lp[:, 0] / mean_lp[:, 2],
            "ratio_image": mean_lp[:, 1] / mean_lp[:, 2],
            "n_vlm_text": int(count_p[0]),
            "n_vlm_image": int(count_p[1]),
            "n_lm_text": int(count_p[2]),
        }
    )
