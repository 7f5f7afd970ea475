"""SAE adaptation (METHOD.md step 1): harvest activations, train base SAEs, adapt them, measure, plot.

lib/sae.py holds the SAEs, the trainer and the metrics; lib/adapter.py reads the models. This module joins them:

- `vlm_batches` / `lm_batches` turn (image, question) or (caption, question) pairs into `ActBatch`es. One model
  forward per batch gives the residual stream after every requested block (`blocks.L.hook_resid_post`); each layer
  is cut to its real, non-BOS tokens as soon as its block has run, so the padded residuals of all layers are never
  held together and nothing is written to disk. The same batches serve every layer x variant SAE of a bank, so a
  pass over the data costs one forward per batch, whatever the number of SAEs.
- `train_base_saes`: one fresh TopK SAE per layer on the base LM's text stream (the stand-in for Llama Scope in the
  organism profiles), with its held-out FVU and dead fraction; `base_sae_sweep` compares widths and k.
- `adapt_saes`: every layer's base SAE fine-tuned on the VLM stream in the four variants (`full`, `random`,
  `text-only`, `image-only`), one pass over the adaptation pairs in the order given, held-out FVU logged over
  training, resumable from a checkpoint (a killed run restarted with the same arguments ends with the same SAEs).
- `reconstruction_table` / `summary_table`: FVU by token split and normalised MSE, base vs adapted vs random, on the
  VLM stream and on the LM text stream (the paper's Table 1 and reconstruction-gap figure).
- `norm_ratio`: mean residual norms of the two streams per layer, to say how activation scale is handled.
- Plot helpers for the chapter; each returns its Figure.

Choices: data is consumed in the order given (the caller shuffles; the profile fixes the seed); BOS is dropped where
the tokenizer put one (`Batch.keep_bs`); activations are float32 on the model's device unless `device` says
otherwise; SAEs read raw activations (no rescaling, lib.sae's default; `norm_ratio` reports what that means).

Shape key (suffixes of tensor names): l layer, n token (flattened over sequences), d model width, v variant,
b sequence in a batch, s position in a sequence, p token split (full / image / text).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from sae_lens import SAE

from lib.kernels import adapter as A
from lib.kernels.sae import (
    ADAPTATION_VARIANTS,
    BASE,
    SPLITS,
    ActBatch,
    ReconAccumulator,
    ReconStats,
    SAEBank,
    SAESpec,
    StreamingTrainer,
    TrainConfig,
    Variant,
    fit,
    fvu_table,
)

log = logging.getLogger(__name__)

HELDOUT_CACHE_BYTES = 1 << 30  # held-out activations up to this size are harvested once and replayed from memory
FRESH_SEED_OFFSET = 1_000_003  # adapt_saes: fresh variants never repeat the base SAEs' initial draw
DEFAULT_TRAIN = TrainConfig()  # lr 2e-4, Adam, 2 threads (lib.sae)
TABLE_COLUMNS = ("layer", "sae", "stream", "split", "fvu", "nmse", "n_tokens")
# One colour per SAE across every figure of the chapter, so a reader can follow a variant from plot to plot.
SAE_COLORS = {
    "base": "#444444",
    "full": "#1f77b4",
    "random": "#999999",
    "text-only": "#2ca02c",
    "image-only": "#d62728",
}


# --------------------------------------------------------------------------------------------------------------
# Activation batches: one forward, all layers
# --------------------------------------------------------------------------------------------------------------


def _layers(vlm: A.VLM, layers: Sequence[int] | None) -> tuple[int, ...]:
    layers = tuple(range(vlm.n_layers)) if layers is None else tuple(int(x) for x in layers)
    if not layers or len(set(layers)) != len(layers) or not all(0 <= x < vlm.n_layers for x in layers):
        raise ValueError(f"layers = {list(layers)}: expected distinct layer numbers in 0..{vlm.n_layers - 1}")
    return layers


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def harvest(vlm: A.VLM, batch: A.Batch, layers: Sequence[int], device=None) -> ActBatch:
    """The residual stream after each of `layers` on the real, non-BOS tokens of `batch`, from one forward.

    Each layer is copied out of the padded (b, s, d) tensor as soon as its block has run (adapter's `on_layer`
    streaming), so peak memory is one padded layer plus the (layers, tokens, d) result. Equivalent to
    `ActBatch.from_padded(stacked residuals, batch.keep_bs, batch.image_mask_bs, drop_bos=False)`.
    """
    keep_bs = batch.keep_bs
    device = keep_bs.device if device is None else torch.device(device)
    rows = {A.resid_name(layer): li for li, layer in enumerate(layers)}
    x_lnd = torch.empty(len(rows), int(keep_bs.sum()), vlm.d_model, dtype=torch.float32, device=device)
    seen: list[str] = []

    def on_layer(name: str, x_bsd: torch.Tensor) -> None:
        assert x_bsd.shape[:2] == keep_bs.shape and x_bsd.shape[-1] == x_lnd.shape[-1], (
            f"{name}: residual {tuple(x_bsd.shape)} does not fit batch {tuple(keep_bs.shape)} x d {x_lnd.shape[-1]}"
        )
        x_lnd[rows[name]] = x_bsd[keep_bs]  # the copy casts to float32 and moves to `device`
        seen.append(name)

    A.resid_stream(vlm, batch, list(layers), on_layer=on_layer)
    assert sorted(seen) == sorted(rows), f"the forward produced {seen}, expected {sorted(rows)}"
    return ActBatch(x_lnd, batch.image_mask_bs[keep_bs].to(device), n_sequences=keep_bs.shape[0], n_forwards=1)


def _check_vlm_pairs(chunk: list, first: int) -> tuple[list[np.ndarray], list[str]]:
    images, questions = [], []
    for i, pair in enumerate(chunk, start=first):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"VLM pairs[{i}]: expected an (image, question) pair, got {type(pair).__name__}")
        image, question = pair
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or not isinstance(question, str):
            raise ValueError(
                f"VLM pairs[{i}]: expected (uint8 image H x W x 3, question str), got "
                f"({image.dtype} {image.shape}, {type(question).__name__})"
            )
        images.append(image)
        questions.append(question)
    return images, questions


def _check_text_pairs(chunk: list, first: int) -> tuple[list[str], list[str]]:
    for i, pair in enumerate(chunk, start=first):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ValueError(f"text pairs[{i}]: expected a (caption str, question str) pair, got {pair!r:.80}")
    return [c for c, _ in chunk], [q for _, q in chunk]


def vlm_batches(
    vlm: A.VLM,
    pairs: Sequence[tuple[Any, str]],
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    start: int = 0,
    device=None,
) -> Iterator[ActBatch]:
    """VLM activations of `pairs[start:]` (image uint8 H x W x 3, question), `batch_size` sequences per batch, one
    forward each, every layer in `layers` (default all). `start` is the trainer's data position (`fit` resumes with
    `stream_from(position)`), so a resumed epoch sees exactly the batches the uninterrupted one would."""
    layers = _layers(vlm, layers)
    for lo in range(start, len(pairs), batch_size):
        images, questions = _check_vlm_pairs([pairs[i] for i in range(lo, min(lo + batch_size, len(pairs)))], lo)
        yield harvest(vlm, A.prepare(vlm, images, questions), layers, device)


def lm_batches(
    vlm: A.VLM,
    text_pairs: Sequence[tuple[str, str]],
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    start: int = 0,
    device=None,
) -> Iterator[ActBatch]:
    """The same on the base LM's text stream: `vlm.lm_prompt(caption, question)` through `vlm.base_lm`. The image
    mask is all False."""
    layers = _layers(vlm, layers)
    if vlm.base_lm is None:
        raise ValueError("lm_batches: VLM.base_lm is not set; the text-only stream runs the base LM")
    if device is None:
        device = _device_of(vlm.model)  # the SAEs live with the VLM; the base LM may sit elsewhere
    for lo in range(start, len(text_pairs), batch_size):
        captions, questions = _check_text_pairs(
            [text_pairs[i] for i in range(lo, min(lo + batch_size, len(text_pairs)))], lo
        )
        yield harvest(vlm, A.prepare_text(vlm, captions, questions), layers, device)


class _Replay:
    """Held-out batches for the evaluations during training: harvested on the first evaluation and kept in memory
    when they fit in `max_bytes`, harvested again at every evaluation otherwise. The forward is deterministic, so
    both give the same numbers; replaying only saves forwards. `n_forwards` counts the forwards actually run."""

    def __init__(self, make: Callable[[], Iterable[ActBatch]], max_bytes: int):
        self.make, self.max_bytes = make, max_bytes
        self.kept: list[ActBatch] | None = None
        self.fits = max_bytes > 0
        self.n_forwards = 0

    def __call__(self) -> Iterable[ActBatch]:
        return self.kept if self.kept is not None else self._harvest()

    def _harvest(self) -> Iterator[ActBatch]:
        kept, size = [], 0
        for batch in self.make():
            self.n_forwards += batch.n_forwards
            if self.fits:
                size += batch.x_lnd.numel() * batch.x_lnd.element_size()
                self.fits = size <= self.max_bytes
                if self.fits:
                    kept.append(batch)
                else:
                    kept.clear()
            yield batch
        if self.fits:
            self.kept = kept


# --------------------------------------------------------------------------------------------------------------
# Training: base SAEs and adaptation share one loop
# --------------------------------------------------------------------------------------------------------------


def _train(
    bank: SAEBank,
    cfg: TrainConfig,
    stream_from: Callable[[int], Iterator[ActBatch]],
    heldout: _Replay,
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
    layers = _layers(vlm, layers)
    device = _device_of(vlm.model) if device is None else torch.device(device)
    name = getattr(getattr(vlm.base_lm, "config", None), "_name_or_path", "") or "base LM"
    bank = SAEBank.create(spec, layers, [BASE], seed=seed, model_name=name).to(device)
    heldout = _Replay(
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
    layers = _layers(vlm, sorted(base_saes) if layers is None else layers)
    device = _device_of(vlm.model) if device is None else torch.device(device)
    name = getattr(vlm.model.config, "_name_or_path", "") or "VLM"
    # Fresh variants draw from a stream of their own: `train_base_saes(seed=seed)` initialised the base SAEs from
    # `seed`, and a `random` variant started from that same draw would begin next to the base dictionary (measured:
    # median decoder cosine with the base SAE 0.7-0.9 after adaptation instead of near 0).
    bank = SAEBank.create(
        spec, layers, variants, base_saes=base_saes, seed=seed + FRESH_SEED_OFFSET, model_name=name
    ).to(device)
    heldout = _Replay(lambda: vlm_batches(vlm, heldout_pairs, batch_size, layers, device=device), heldout_cache_bytes)
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
def _sae_reconstruct(sae: SAE, x_nd: torch.Tensor) -> torch.Tensor:
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
        base_lnd = torch.stack([_sae_reconstruct(base[layer], x_lnd[li]) for li, layer in enumerate(layers)])
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
    rows = [
        {**s._asdict(), "sae": s.variant, "stream": stream}
        for stream, stats in streams.items()
        for s in stats
        if s.n_tokens > 0
    ]
    return pd.DataFrame(rows)[list(TABLE_COLUMNS)]


def summary_table(table: pd.DataFrame, stream: str = "vlm") -> pd.DataFrame:
    """The paper's Table 1 from a `reconstruction_table`: per (sae, split) FVU mean / std / min / max over layers
    and the tokens per layer, on one stream (lib.sae.fvu_table does the aggregation)."""
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
    layers = _layers(vlm, layers)
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


# --------------------------------------------------------------------------------------------------------------
# Figures (sized for the book's text width; each returns its Figure)
# --------------------------------------------------------------------------------------------------------------


def _color(name: str) -> str | None:
    return SAE_COLORS.get(name)


def plot_fvu_over_training(history: pd.DataFrame, splits: Sequence[str] = ("text", "image")) -> Figure:
    """Mean held-out FVU across layers vs training step, one line per variant, one panel per token split (the band
    is the min..max over layers)."""
    fig, axes = plt.subplots(1, len(splits), figsize=(3.6 * len(splits), 3.0), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        part = history[history.split == split]
        for variant, rows in part.groupby("variant", sort=False):
            by_step = rows.groupby("step").fvu.agg(["mean", "min", "max"])
            ax.plot(by_step.index, by_step["mean"], marker="o", ms=3, label=variant, color=_color(variant))
            ax.fill_between(by_step.index, by_step["min"], by_step["max"], alpha=0.15, color=_color(variant))
        ax.set_title(f"{split} tokens")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("held-out FVU (mean over layers)")
    axes[0, -1].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_fvu_per_layer(table: pd.DataFrame, stream: str = "vlm", splits: Sequence[str] = SPLITS) -> Figure:
    """Held-out FVU per layer, one line per SAE (base, adapted variants, random), one panel per token split."""
    part = table[table.stream == stream]
    fig, axes = plt.subplots(1, len(splits), figsize=(2.7 * len(splits), 2.9), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        for sae, rows in part[part.split == split].groupby("sae", sort=False):
            rows = rows.sort_values("layer")
            ax.plot(rows.layer, rows.fvu, marker="o", ms=3, label=sae, color=_color(sae))
        ax.set_title(f"{split} tokens")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("held-out FVU")
    axes[0, -1].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_reconstruction_gap(table: pd.DataFrame, text_variant: str = "text-only") -> Figure:
    """Normalised MSE per layer (log scale) for {base SAE, adapted text-only SAE} x {LM text activations, VLM
    activations (all tokens)}: colour is the SAE, line style the stream."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = {"lm": ("-", "LM text"), "vlm": ("--", "VLM")}
    for sae, label in ((BASE.name, "base SAE"), (text_variant, f"adapted {text_variant} SAE")):
        for stream, (ls, stream_label) in styles.items():
            rows = table[(table.sae == sae) & (table.stream == stream) & (table.split == "full")].sort_values("layer")
            if len(rows):
                ax.plot(
                    rows.layer, rows.nmse, ls, marker="o", ms=3, color=_color(sae), label=f"{label}, {stream_label}"
                )
    ax.set_yscale("log")
    # 0.2, not 2 x 10^-1; minor ticks labelled at 2 and 5 only, which stays readable over two or three decades.
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised MSE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    return fig
