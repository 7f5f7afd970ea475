"""Activation batches (`ActBatch`) and the iterators that harvest them from a model: one forward, all layers.

- `ActBatch`: the residual activations of the real, non-BOS tokens of some sequences, for every layer a bank of SAEs
  reads, flattened over sequences, with the image-token mask. SAE training and every metric consume these.
- `vlm_batches` / `lm_batches` turn (image, question) or (caption, question) pairs into `ActBatch`es. One model
  forward per batch gives the residual stream after every requested block (`blocks.L.hook_resid_post`); each layer
  is cut to its real, non-BOS tokens as soon as its block has run, so the padded residuals of all layers are never
  held together and nothing is written to disk. The same batches serve every layer x variant SAE of a bank, so a
  pass over the data costs one forward per batch, whatever the number of SAEs.
- `Replay`: held-out batches harvested once and replayed from memory while they fit.

Data is consumed in the order given (the caller shuffles; the profile fixes the seed); BOS is dropped where the
tokenizer put one (`Batch.keep_bs`); activations are float32 on the model's device unless `device` says otherwise.

Shape key (suffixes of tensor names): l layer, n token (flattened over sequences), d model width, b sequence in a
batch, s position in a sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lib.kernels import adapter as A
from lib.names import resid_name

# --------------------------------------------------------------------------------------------------------------
# The batch every SAE step and metric consumes
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActBatch:
    """Residual activations of the tokens of some sequences, for every layer of a bank, from one model forward.

    Tokens are flattened across sequences; BOS and padding are already gone (see `from_padded`).
    n_forwards: model forward passes spent producing this batch (the caller counts; the trainer sums them).
    """

    x_lnd: torch.Tensor
    image_mask_n: torch.Tensor
    n_sequences: int
    n_forwards: int = 1

    def __post_init__(self):
        x, m = self.x_lnd, self.image_mask_n
        if x.ndim != 3 or not x.is_floating_point():
            raise ValueError(
                f"ActBatch.x_lnd: expected a float tensor (layers, tokens, d_model), got {x.dtype} {tuple(x.shape)}"
            )
        if m.dtype != torch.bool or m.shape != (x.shape[1],):
            raise ValueError(
                f"ActBatch.image_mask_n: expected bool of shape ({x.shape[1]},), got {m.dtype} {tuple(m.shape)}"
            )
        if self.n_sequences < 0 or self.n_forwards < 0:
            raise ValueError("ActBatch.n_sequences and n_forwards must be >= 0")

    @classmethod
    def from_padded(
        cls,
        resid_lbsd: torch.Tensor | Sequence[torch.Tensor],
        attention_mask_bs: torch.Tensor,
        image_mask_bs: torch.Tensor,
        drop_bos: bool = True,
        n_forwards: int = 1,
    ) -> ActBatch:
        """Flatten padded per-layer residuals (layers, batch, seq, d) to the tokens that count.

        drop_bos drops each sequence's first attended token (left or right padding alike): BOS carries no
        information about the input and its residual norm is an outlier, so the paper leaves it out everywhere.
        """
        if not isinstance(resid_lbsd, torch.Tensor):
            resid_lbsd = torch.stack(list(resid_lbsd))
        keep_bs = attention_mask_bs.bool()
        if resid_lbsd.shape[1:3] != keep_bs.shape or image_mask_bs.shape != keep_bs.shape:
            raise ValueError(
                f"ActBatch.from_padded: residuals {tuple(resid_lbsd.shape)}, attention mask "
                f"{tuple(keep_bs.shape)} and image mask {tuple(image_mask_bs.shape)} disagree"
            )
        if drop_bos:
            keep_bs = keep_bs & (keep_bs.cumsum(1) > 1)
        return cls(resid_lbsd[:, keep_bs].float(), image_mask_bs.bool()[keep_bs], keep_bs.shape[0], n_forwards)


# --------------------------------------------------------------------------------------------------------------
# Harvesting: one forward, all layers
# --------------------------------------------------------------------------------------------------------------


def check_layers(vlm: A.VLM, layers: Sequence[int] | None) -> tuple[int, ...]:
    """`layers` as a tuple of distinct block numbers of `vlm` (all blocks for None), or one clear error."""
    layers = tuple(range(vlm.n_layers)) if layers is None else tuple(int(x) for x in layers)
    if not layers or len(set(layers)) != len(layers) or not all(0 <= x < vlm.n_layers for x in layers):
        raise ValueError(f"layers = {list(layers)}: expected distinct layer numbers in 0..{vlm.n_layers - 1}")
    return layers


def device_of(module: torch.nn.Module) -> torch.device:
    """The device a module's (first) parameters live on."""
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
    rows = {resid_name(layer): li for li, layer in enumerate(layers)}
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
    layers = check_layers(vlm, layers)
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
    layers = check_layers(vlm, layers)
    if vlm.base_lm is None:
        raise ValueError("lm_batches: VLM.base_lm is not set; the text-only stream runs the base LM")
    if device is None:
        device = device_of(vlm.model)  # the SAEs live with the VLM; the base LM may sit elsewhere
    for lo in range(start, len(text_pairs), batch_size):
        captions, questions = _check_text_pairs(
            [text_pairs[i] for i in range(lo, min(lo + batch_size, len(text_pairs)))], lo
        )
        yield harvest(vlm, A.prepare_text(vlm, captions, questions), layers, device)


class Replay:
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
