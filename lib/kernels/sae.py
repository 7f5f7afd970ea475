"""Sparse autoencoders: SAELens TopK SAEs, a streaming trainer for many SAEs at once, and reconstruction metrics.

Method step 1 (SAE adaptation): for every layer, fine-tune the base SAE on VLM activations in four variants
(`full`, `random`, `text-only`, `image-only`) with the batch-FVU loss. The same trainer, with fresh weights and no
token mask, trains the base SAEs on the LM's text activations.

What SAELens gives us and what we write by hand:
- The SAE itself is SAELens' `TopKSAE` and its on-disk format (`cfg.json` + `sae_weights.safetensors`); every SAE
  this module writes loads with `sae_lens.SAE.load_from_disk`. SAELens' TopK convention, which we match exactly:
  `pre = (x - b_dec) @ W_enc + b_enc` (the `- b_dec` only when `apply_b_dec_to_input`), keep the k largest
  entries of `pre`, ReLU them, `x_hat = z @ W_dec + b_dec`.
- The training step is ours. SAELens' trainer decodes with a dense (tokens x width) matrix and backpropagates
  through it; here the decoder gathers the k decoder rows of each token (`F.embedding_bag`) and the backward pass
  touches only the k selected entries per token (custom autograd functions, sparse matrix products), so the only
  O(width) work left per token is the encoder matmul and the top-k (on the CPU numpy's argpartition, about 3x
  faster than torch.topk). `bench/bench_sae.py` measures it against SAELens' trainer. `SAE_DENSE=1` (or
  `kernel="dense"`) swaps in a plain-autograd twin of the same step; a test checks that both give the same loss
  and gradients.
- Many SAEs train at once: one `SAEBank` holds the parameters of every (layer, variant) pair stacked, and one step
  consumes one batch of activations of all layers, so the model runs one forward pass per batch, not one per
  layer and variant.

Choices (the book states them too):
- Loss: batch FVU per SAE, `mean ||x - x_hat||^2 / (mean ||x - mu||^2 + 1e-8)` over the tokens in that SAE's loss
  mask, `mu` their batch mean; the bank's loss is the sum over SAEs, which gives each SAE exactly the gradient it
  would get alone (the parameters are disjoint, and Adam is elementwise).
- Decoder rows have unit norm at every step: before the Adam step the gradient component along each decoder row is
  removed (it would only change the row's norm, which the renormalisation undoes, and would pollute Adam's moment
  estimates), and after it each row is rescaled to norm 1 (the convention of EleutherAI sparsify and of SAELens
  before v6). Because the step moves a row tangentially, the renormalisation changes the norm only at second order
  in the learning rate, so the encoder needs no compensation. A base SAE whose decoder rows are not unit norm is
  brought there once, at initialisation, by folding the row norms into the encoder (exact when all norms are equal,
  as for every SAE this module writes; otherwise TopK then ranks features by `z_i * ||d_i||`, the convention of
  SAELens' `rescale_acts_by_decoder_norm`). The held-out FVU at step 0 shows what the fold did.
- No AuxK loss and no gradient clipping: the paper's loss is the batch FVU alone.
- Activation scale: by default SAEs see raw activations. `estimate_act_scale` gives SAELens'
  `expected_average_only_in` factor (mean ||x|| = sqrt(d_in) after scaling) per SAE; a bank built with it trains on
  scaled activations and folds the factor back into the weights on export, so exported SAEs read raw activations.
  FVU and normalised MSE do not depend on the scale; it changes only the optimisation (Adam's steps are in weight
  units).

Shape suffixes: l layer (of a bank), v variant, n token, d model width (d_in), f SAE width (d_sae), k active
features per token, b sequence, s position in a sequence, p token split (full / image / text).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from safetensors import safe_open
from safetensors.torch import save_file

HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"
FVU_EPS = 1e-8  # the paper's denominator guard
SPLITS = ("full", "image", "text")  # token splits of the metrics; each has its own mean
CHECKPOINT_FORMAT = 1

# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of training an SAE of a layer: where its weights start and which tokens its loss sees."""

    name: str
    init: Literal["base", "fresh"]
    tokens: Literal["all", "text", "image"]

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"Variant.name = {self.name!r}: expected a non-empty name without '/'")
        if self.init not in ("base", "fresh"):
            raise ValueError(f"Variant {self.name}: init = {self.init!r}, expected 'base' or 'fresh'")
        if self.tokens not in ("all", "text", "image"):
            raise ValueError(f"Variant {self.name}: tokens = {self.tokens!r}, expected 'all', 'text' or 'image'")


FULL = Variant("full", "base", "all")
RANDOM = Variant("random", "fresh", "all")
TEXT_ONLY = Variant("text-only", "base", "text")
IMAGE_ONLY = Variant("image-only", "base", "image")
ADAPTATION_VARIANTS = (FULL, RANDOM, TEXT_ONLY, IMAGE_ONLY)
BASE = Variant("base", "fresh", "all")  # the base SAEs: fresh weights on the LM's text stream


@dataclass(frozen=True)
class SAESpec:
    """The architecture shared by every SAE of a bank."""

    d_in: int
    d_sae: int
    k: int
    apply_b_dec_to_input: bool = True  # SAELens' default; Llama Scope SAEs have False

    def __post_init__(self):
        for name in ("d_in", "d_sae", "k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SAESpec.{name} = {getattr(self, name)!r}: expected a positive integer")
        if self.k > self.d_sae:
            raise ValueError(f"SAESpec.k = {self.k}: expected at most d_sae = {self.d_sae}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of a bank (Adam, one pass).

    lr: METHOD.md says 2e-4. The authors' code also has `2e-4 / sqrt(width / 2**14)` (= 1.41e-4 at width 32768,
    sparsify's rule), but on their SAELens SAE that branch never runs (it reads `cfg.num_latents`, which SAELens
    configs do not have), so 2e-4 is what they used; the profile decides.
    kernel: "sparse" (fast), "dense" (plain autograd twin) or "auto" (sparse unless the environment has SAE_DENSE=1).
    """

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    kernel: Literal["auto", "sparse", "dense"] = "auto"
    num_threads: int | None = 2  # the CI machine has 2 shared cores; None leaves torch's setting alone

    def __post_init__(self):
        if not (isinstance(self.lr, float) and 0 < self.lr < 1):
            raise ValueError(f"TrainConfig.lr = {self.lr!r}: expected a float in (0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas = {self.betas!r}: expected two floats in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"TrainConfig.eps = {self.eps!r}: expected a positive float")
        if self.kernel not in ("auto", "sparse", "dense"):
            raise ValueError(f"TrainConfig.kernel = {self.kernel!r}: expected 'auto', 'sparse' or 'dense'")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"TrainConfig.num_threads = {self.num_threads!r}: expected None or >= 1")

    @property
    def dense(self) -> bool:
        if self.kernel == "auto":
            return os.environ.get("SAE_DENSE", "0") == "1"
        return self.kernel == "dense"


# --------------------------------------------------------------------------------------------------------------
# Activation batches
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


def token_weights_vn(variants: Sequence[Variant], image_mask_n: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """0/1 loss weights of every token for every variant (its loss mask)."""
    rows = {"all": torch.ones_like(image_mask_n), "image": image_mask_n, "text": ~image_mask_n}
    return torch.stack([rows[v.tokens] for v in variants]).to(dtype)


@torch.no_grad()
def estimate_act_scale(batches: Iterable[ActBatch], variants: Sequence[Variant]) -> torch.Tensor:
    """SAELens' `expected_average_only_in` factor per (layer, variant): sqrt(d_in) / mean ||x|| over the tokens each
    SAE trains on. Returns (layers, variants). The book's default is no rescaling (all ones): call this only when a
    profile asks for it."""
    total_lv, count_v = None, None
    for batch in batches:
        w_vn = token_weights_vn(variants, batch.image_mask_n, torch.float64)
        norms_ln = batch.x_lnd.double().norm(dim=-1)
        part = norms_ln @ w_vn.T
        total_lv = part if total_lv is None else total_lv + part
        count_v = w_vn.sum(1) if count_v is None else count_v + w_vn.sum(1)
    if total_lv is None:
        raise ValueError("estimate_act_scale: got no batches")
    if (count_v == 0).any():
        raise ValueError(
            f"estimate_act_scale: no tokens for variant(s) "
            f"{[v.name for v, c in zip(variants, count_v, strict=True) if c == 0]}"
        )
    d_in = batch.x_lnd.shape[-1]
    return (math.sqrt(d_in) / (total_lv / count_v)).float()


# --------------------------------------------------------------------------------------------------------------
# The sparse kernel: top-k encoder with a backward pass over the k selected entries only
# --------------------------------------------------------------------------------------------------------------


def topk_indices(pre_rf: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of each row (unordered), exactly the set torch.topk selects.

    On the CPU, numpy's argpartition (introselect, SIMD-accelerated in numpy 2) is about 3x faster than torch.topk
    for SAE shapes, and top-k is the largest single cost of a step; elsewhere torch.topk.
    """
    if pre_rf.device.type == "cpu" and pre_rf.dtype in (torch.float32, torch.float64):
        f = pre_rf.shape[-1]
        part = np.argpartition(pre_rf.detach().contiguous().numpy(), f - k, axis=-1)
        return torch.from_numpy(np.ascontiguousarray(part[..., f - k :]))
    return pre_rf.topk(k, dim=-1, sorted=False).indices


class _TopKEncode(torch.autograd.Function):
    """acts, idx = topk(x @ W + b) with ReLU, for all layers and variants of a bank at once.

    Inputs: x_lnd, W_ldF, b_lF with F = variants * width (the variants of a layer share the left operand, so one
    matmul per layer serves all of them). Backward: the gradient reaches only the k kept entries per token, so
    dL/dW = sum over tokens of x_n * g_nk at rows idx_nk, one sparse-dense product instead of a dense matmul.
    """

    @staticmethod
    def forward(ctx, x_lnd, W_ldF, b_lF, n_variants: int, k: int):
        L, n, _ = x_lnd.shape
        pre_lnvf = torch.baddbmm(b_lF[:, None, :], x_lnd, W_ldF).view(L, n, n_variants, -1)
        idx_lnvk = topk_indices(pre_lnvf, k)
        vals_lnvk = pre_lnvf.gather(-1, idx_lnvk)
        acts_lnvk = vals_lnvk.relu()
        ctx.save_for_backward(x_lnd, idx_lnvk, vals_lnvk > 0)
        ctx.width = pre_lnvf.shape[-1]
        ctx.mark_non_differentiable(idx_lnvk)
        return acts_lnvk, idx_lnvk

    @staticmethod
    def backward(ctx, grad_acts_lnvk, _grad_idx):
        x_lnd, idx_lnvk, alive_lnvk = ctx.saved_tensors
        L, n, V, k = idx_lnvk.shape
        d, f = x_lnd.shape[-1], ctx.width
        g_lnvk = grad_acts_lnvk * alive_lnvk
        # Row (l, v, feature) and column (l, token) of each kept entry, in one block-diagonal sparse matrix.
        row = (idx_lnvk + (torch.arange(L * V, device=idx_lnvk.device) * f).view(L, 1, V, 1)).reshape(-1)
        col = torch.arange(L * n, device=row.device).repeat_interleave(V * k)
        grad_b = torch.zeros(L * V * f, dtype=g_lnvk.dtype, device=g_lnvk.device).index_add_(0, row, g_lnvk.reshape(-1))
        G = torch.sparse_coo_tensor(
            torch.stack([row, col]), g_lnvk.reshape(-1), (L * V * f, L * n), check_invariants=False
        )
        grad_W_lvfd = torch.sparse.mm(G, x_lnd.reshape(L * n, d)).view(L, V, f, d)
        grad_W_ldF = grad_W_lvfd.permute(0, 3, 1, 2).reshape(L, d, V * f)
        return None, grad_W_ldF, grad_b.view(L, V * f), None, None


class _SparseDecode(torch.autograd.Function):
    """x_hat_N = sum_k acts_Nk * W[rows_Nk]: decode from the k kept features of each token.

    Forward is `F.embedding_bag`. Its own backward sorts the indices and is slow on CPU, so the backward is ours:
    dL/dacts_Nk = <g_N, W[rows_Nk]> (a sampled dense-dense product) and dL/dW[r] = sum of acts * g over the
    entries with row r (a sparse-dense product): O(N k d), never O(N width d).
    """

    @staticmethod
    def forward(ctx, acts_Nk, rows_Nk, W_Rd):
        ctx.save_for_backward(acts_Nk, rows_Nk, W_Rd)
        return F.embedding_bag(rows_Nk, W_Rd, per_sample_weights=acts_Nk, mode="sum")

    @staticmethod
    def backward(ctx, g_Nd):
        acts_Nk, rows_Nk, W_Rd = ctx.saved_tensors
        (N, k), R = rows_Nk.shape, W_Rd.shape[0]
        grad_acts = None
        if ctx.needs_input_grad[0]:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is what we need
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(
                    torch.arange(0, N * k + 1, k, device=rows_Nk.device),
                    rows_Nk.reshape(-1),
                    torch.ones_like(acts_Nk).reshape(-1),
                    (N, R),
                    check_invariants=False,
                )
            grad_acts = torch.sparse.sampled_addmm(pattern, g_Nd, W_Rd.T, beta=0.0).values().view(N, k)
        grad_W = None
        if ctx.needs_input_grad[2]:
            col = torch.arange(N, device=rows_Nk.device).repeat_interleave(k)
            A = torch.sparse_coo_tensor(
                torch.stack([rows_Nk.reshape(-1), col]), acts_Nk.reshape(-1), (R, N), check_invariants=False
            )
            grad_W = torch.sparse.mm(A, g_Nd)
        return grad_acts, None, grad_W


class Encoding(NamedTuple):
    acts_lnvk: torch.Tensor  # ReLU'd top-k pre-activations
    idx_lnvk: torch.Tensor  # their feature indices


class Reconstruction(NamedTuple):
    x_hat_lnvd: torch.Tensor  # in the bank's (scaled) units: divide by act_scale for raw units
    acts_lnvk: torch.Tensor
    idx_lnvk: torch.Tensor


# --------------------------------------------------------------------------------------------------------------
# The bank of SAEs
# --------------------------------------------------------------------------------------------------------------


class SAEBank(torch.nn.Module):
    """The TopK SAEs of several layers x variants, parameters stacked so one step trains them all.

    Parameters are stored in the layouts the fast step wants: W_enc (l, d, v, f) (a view (l, d, v*f) is one
    matmul per layer), W_dec (l, v, f, d) (rows gathered per token). `sae(layer, variant)` gives one SAELens SAE.
    act_scale_lv: the bank trains on act_scale * x (ones by default, see `estimate_act_scale`).
    """

    def __init__(
        self,
        spec: SAESpec,
        layers: Sequence[int],
        variants: Sequence[Variant],
        act_scale_lv: torch.Tensor | None = None,
        model_name: str = "",
    ):
        super().__init__()
        if len(set(layers)) != len(layers) or not layers:
            raise ValueError(f"SAEBank: layers = {list(layers)}: expected distinct layer numbers")
        if len({v.name for v in variants}) != len(variants) or not variants:
            raise ValueError(f"SAEBank: variants = {[v.name for v in variants]}: expected distinct names")
        self.spec, self.layers, self.variants, self.model_name = spec, tuple(layers), tuple(variants), model_name
        L, V, f, d = len(layers), len(variants), spec.d_sae, spec.d_in
        self.W_enc = torch.nn.Parameter(torch.zeros(L, d, V, f))
        self.b_enc = torch.nn.Parameter(torch.zeros(L, V, f))
        self.W_dec = torch.nn.Parameter(torch.zeros(L, V, f, d))
        self.b_dec = torch.nn.Parameter(torch.zeros(L, V, d))
        scale = torch.ones(L, V) if act_scale_lv is None else act_scale_lv.detach().float().clone()
        if scale.shape != (L, V) or not (scale > 0).all():
            raise ValueError(f"SAEBank: act_scale_lv must be positive of shape ({L}, {V}), got {tuple(scale.shape)}")
        self.register_buffer("act_scale_lv", scale)

    @classmethod
    def create(
        cls,
        spec: SAESpec,
        layers: Sequence[int],
        variants: Sequence[Variant],
        base_saes: Mapping[int, SAE] | None = None,
        seed: int = 0,
        act_scale_lv: torch.Tensor | None = None,
        model_name: str = "",
    ) -> SAEBank:
        """A bank initialised for training: variants with init="base" copy `base_saes[layer]` (any SAELens SAE
        with W_enc, b_enc, W_dec, b_dec and no activation normalisation), the others get fresh weights: unit-norm
        random decoder rows, encoder = decoder transposed, zero biases (SAELens' and sparsify's init)."""
        bank = cls(spec, layers, variants, act_scale_lv, model_name)
        gen = torch.Generator().manual_seed(seed)
        needs_base = [v.name for v in variants if v.init == "base"]
        for li, layer in enumerate(bank.layers):
            for vi, variant in enumerate(bank.variants):
                if variant.init == "fresh":
                    W_dec_fd = torch.randn(spec.d_sae, spec.d_in, generator=gen)
                    W_dec_fd /= W_dec_fd.norm(dim=-1, keepdim=True)
                    bank._set(li, vi, W_dec_fd.T, torch.zeros(spec.d_sae), W_dec_fd, torch.zeros(spec.d_in))
                else:
                    if base_saes is None or layer not in base_saes:
                        raise ValueError(
                            f"SAEBank.create: variants {needs_base} start from a base SAE, but "
                            f"base_saes has no layer {layer}"
                        )
                    bank.load_sae(li, vi, base_saes[layer])
        return bank

    @classmethod
    def from_saes(cls, saes: Mapping[str, Mapping[int, SAE]], model_name: str = "") -> SAEBank:
        """A bank holding trained SAEs, `saes[variant][layer]` (e.g. `load_saes` of each variant), for evaluation."""
        known = {v.name: v for v in (*ADAPTATION_VARIANTS, BASE)}
        variants = [known.get(name, Variant(name, "base", "all")) for name in saes]
        layers = sorted(next(iter(saes.values())))
        first = next(iter(saes.values()))[layers[0]].cfg
        spec = SAESpec(first.d_in, first.d_sae, int(first.k), bool(first.apply_b_dec_to_input))
        bank = cls(spec, layers, variants, model_name=model_name)
        for vi, by_layer in enumerate(saes.values()):
            for li, layer in enumerate(layers):
                bank.load_sae(li, vi, by_layer[layer])
        return bank

    @torch.no_grad()
    def _set(self, li, vi, W_enc_df, b_enc_f, W_dec_fd, b_dec_d):
        self.W_enc[li, :, vi].copy_(W_enc_df)
        self.b_enc[li, vi].copy_(b_enc_f)
        self.W_dec[li, vi].copy_(W_dec_fd)
        self.b_dec[li, vi].copy_(b_dec_d)

    @torch.no_grad()
    def load_sae(self, li: int, vi: int, sae: SAE) -> None:
        """Copy a SAELens SAE (raw units) into slot (li, vi), in the bank's scaled units, with unit decoder rows."""
        cfg, spec, name = sae.cfg, self.spec, f"base SAE for layer {self.layers[li]}"
        if (cfg.d_in, cfg.d_sae) != (spec.d_in, spec.d_sae):
            raise ValueError(
                f"{name}: d_in, d_sae = {cfg.d_in}, {cfg.d_sae}; the bank expects {spec.d_in}, {spec.d_sae}"
            )
        if bool(cfg.apply_b_dec_to_input) != spec.apply_b_dec_to_input:
            raise ValueError(
                f"{name}: apply_b_dec_to_input = {cfg.apply_b_dec_to_input}; the bank's SAESpec has "
                f"{spec.apply_b_dec_to_input}"
            )
        if cfg.normalize_activations != "none":
            raise ValueError(
                f"{name}: normalize_activations = {cfg.normalize_activations!r}; expected 'none' "
                "(SAE.from_pretrained folds the Llama Scope norm factor; fold others first)"
            )
        c = float(self.act_scale_lv[li, vi])
        W_enc_df, b_enc_f = sae.W_enc.detach().float() / c, sae.b_enc.detach().float()
        W_dec_fd, b_dec_d = sae.W_dec.detach().float() * c, sae.b_dec.detach().float() * c
        norm_f = W_dec_fd.norm(dim=-1).clamp_min(1e-12)  # fold decoder norms: unit rows, same z_i * d_i
        self._set(li, vi, W_enc_df * norm_f, b_enc_f * norm_f, W_dec_fd / norm_f[:, None], b_dec_d)

    def index(self, layer: int, variant: str) -> tuple[int, int]:
        names = [v.name for v in self.variants]
        if layer not in self.layers or variant not in names:
            raise KeyError(f"SAEBank has layers {list(self.layers)} and variants {names}; got ({layer}, {variant!r})")
        return self.layers.index(layer), names.index(variant)

    # -- forward ------------------------------------------------------------------------------------------------

    def _scaled_encoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W and b with pre = (c x - b_dec) @ W_enc + b_enc = x @ W + b, so all variants of a layer share x."""
        W_ldvf = self.W_enc
        if not bool((self.act_scale_lv == 1).all()):
            W_ldvf = W_ldvf * self.act_scale_lv[:, None, :, None]
        b_lvf = self.b_enc
        if self.spec.apply_b_dec_to_input:
            b_lvf = b_lvf - torch.einsum("lvd,ldvf->lvf", self.b_dec, self.W_enc)
        L, d, V, f = self.W_enc.shape
        return W_ldvf.reshape(L, d, V * f), b_lvf.reshape(L, V * f)

    def encode(self, x_lnd: torch.Tensor) -> Encoding:
        """Top-k features of raw activations x (layers, tokens, d) for every SAE of the bank."""
        W_ldF, b_lF = self._scaled_encoder()
        acts, idx = _TopKEncode.apply(x_lnd.to(W_ldF.dtype), W_ldF, b_lF, len(self.variants), self.spec.k)
        return Encoding(acts, idx)

    def forward(self, x_lnd: torch.Tensor, dense: bool = False) -> Reconstruction:
        """Reconstruct raw activations x (layers, tokens, d) with every SAE: the sparse path by default, the plain
        autograd twin with dense=True. Both return x_hat in scaled units and the same (acts, idx)."""
        if dense:
            return self._forward_dense(x_lnd)
        acts_lnvk, idx_lnvk = self.encode(x_lnd)
        L, n, V, k = idx_lnvk.shape
        f, d = self.spec.d_sae, self.spec.d_in
        # Row of W_dec (flattened over layer, variant, feature) of every kept entry; embedding_bag sums
        # acts * W_dec[row] per token without building the (tokens x width) matrix.
        row_lnvk = idx_lnvk + (torch.arange(L * V, device=idx_lnvk.device) * f).view(L, 1, V, 1)
        x_hat = _SparseDecode.apply(acts_lnvk.reshape(-1, k), row_lnvk.reshape(-1, k), self.W_dec.view(L * V * f, d))
        return Reconstruction(x_hat.view(L, n, V, d) + self.b_dec[:, None], acts_lnvk, idx_lnvk)

    def _forward_dense(self, x_lnd: torch.Tensor) -> Reconstruction:
        """SAELens' TopK forward, written plainly for all SAEs at once; autograd does the backward pass."""
        x_lnvd = x_lnd.to(self.W_enc.dtype)[:, :, None, :] * self.act_scale_lv[:, None, :, None]
        if self.spec.apply_b_dec_to_input:
            x_lnvd = x_lnvd - self.b_dec[:, None]
        pre_lnvf = torch.einsum("lnvd,ldvf->lnvf", x_lnvd, self.W_enc) + self.b_enc[:, None]
        vals_lnvk, idx_lnvk = pre_lnvf.topk(self.spec.k, dim=-1, sorted=False)
        z_lnvf = torch.zeros_like(pre_lnvf).scatter(-1, idx_lnvk, vals_lnvk.relu())
        x_hat_lnvd = torch.einsum("lnvf,lvfd->lnvd", z_lnvf, self.W_dec) + self.b_dec[:, None]
        return Reconstruction(x_hat_lnvd, vals_lnvk.relu(), idx_lnvk)

    # -- the unit-norm decoder constraint -------------------------------------------------------------------

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the gradient component along each decoder row (it would only change the row's norm)."""
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g.sub_((g * w).sum(-1, keepdim=True) * w)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    # -- export -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sae(self, layer: int, variant: str) -> TopKSAE:
        """One SAE of the bank as a SAELens TopKSAE on raw activations (the activation scale folded in)."""
        li, vi = self.index(layer, variant)
        c = float(self.act_scale_lv[li, vi])
        spec = self.spec
        cfg = TopKSAEConfig(
            d_in=spec.d_in,
            d_sae=spec.d_sae,
            k=spec.k,
            apply_b_dec_to_input=spec.apply_b_dec_to_input,
            dtype="float32",
            device="cpu",
            normalize_activations="none",
            metadata=SAEMetadata(
                hook_name=HOOK_TEMPLATE.format(layer=layer),
                model_name=self.model_name,
                variant=variant,
                act_scale=c,
                prepend_bos=True,
            ),
        )
        sae = TopKSAE(cfg)
        sae.load_state_dict(
            {
                "W_enc": (self.W_enc[li, :, vi] * c).cpu().float().contiguous(),
                "b_enc": self.b_enc[li, vi].cpu().float().clone(),
                "W_dec": (self.W_dec[li, vi] / c).cpu().float().contiguous(),
                "b_dec": (self.b_dec[li, vi] / c).cpu().float().clone(),
            }
        )
        return sae

    def save_saes(self, root: str | Path) -> dict[tuple[int, str], Path]:
        """Write every SAE as `root/L{layer}/{variant}/{cfg.json, sae_weights.safetensors}`."""
        out = {}
        for layer in self.layers:
            for v in self.variants:
                path = Path(root) / f"L{layer}" / v.name
                self.sae(layer, v.name).save_model(path)
                out[(layer, v.name)] = path
        return out


def load_saes(root: str | Path, layers: Sequence[int], variant: str, device: str = "cpu") -> dict[int, SAE]:
    """The SAEs `save_saes` wrote for one variant, by layer, through SAELens' own loader."""
    out = {}
    for layer in layers:
        path = Path(root) / f"L{layer}" / variant
        if not (path / "cfg.json").is_file():
            raise FileNotFoundError(f"{path}/cfg.json: no SAE for layer {layer}, variant {variant!r}")
        out[layer] = SAE.load_from_disk(path, device=device)
    return out


# --------------------------------------------------------------------------------------------------------------
# Loss and metrics
# --------------------------------------------------------------------------------------------------------------


def batch_fvu(
    x_lnd: torch.Tensor, x_hat_lnvd: torch.Tensor, w_vn: torch.Tensor, act_scale_lv: torch.Tensor
) -> torch.Tensor:
    """The paper's loss for every SAE: mean ||x - x_hat||^2 / (mean ||x - mu||^2 + 1e-8) over the tokens with
    weight 1 in w_vn, mu their batch mean, everything in raw units (x_hat is divided by the bank's scale).
    A variant with no tokens in the batch gets FVU 0 (no gradient). Returns (layers, variants)."""
    x_lnd = x_lnd.to(x_hat_lnvd.dtype)
    w_vn = w_vn.to(x_hat_lnvd.dtype)
    count_v = w_vn.sum(1).clamp_min(1)
    x_hat_raw = x_hat_lnvd / act_scale_lv[:, None, :, None]
    sse_lv = torch.einsum("lnv,vn->lv", (x_hat_raw - x_lnd[:, :, None, :]).pow(2).sum(-1), w_vn)
    with torch.no_grad():  # the denominator depends on the data only
        mu_lvd = torch.einsum("vn,lnd->lvd", w_vn, x_lnd) / count_v[:, None]
        dev_lnv = (x_lnd[:, :, None, :] - mu_lvd[:, None]).pow(2).sum(-1)
        var_lv = torch.einsum("lnv,vn->lv", dev_lnv, w_vn) / count_v
    return sse_lv / count_v / (var_lv + FVU_EPS)


class ReconStats(NamedTuple):
    layer: int
    variant: str
    split: str  # full / image / text
    n_tokens: int
    fvu: float  # sum ||x - x_hat||^2 / sum ||x - mu_split||^2, mu_split the mean of the split's tokens
    nmse: float  # sum ||x - x_hat||^2 / sum ||x||^2 (the reconstruction-gap figure)


class ReconAccumulator:
    """Streaming sums for FVU and normalised MSE split by token type, for (layers x variants) SAEs.

    Keeps per split the token count, sum x, sum ||x||^2 and sum ||x - x_hat||^2 in float64, never the activations:
    FVU_split = SSE / (sum ||x||^2 - ||sum x||^2 / count). Each split uses its own mean, taken over all tokens seen,
    not per batch: this is the held-out FVU, which differs from the training loss's batch FVU by the
    between-batch variance of the mean (small).
    """

    def __init__(self, layers: Sequence[int], variants: Sequence[str], d_in: int):
        self.layers, self.variants = tuple(layers), tuple(variants)
        L, V, P = len(layers), len(variants), len(SPLITS)
        self.count_p = torch.zeros(P, dtype=torch.float64)
        self.sum_x_lpd = torch.zeros(L, P, d_in, dtype=torch.float64)
        self.sum_sq_lp = torch.zeros(L, P, dtype=torch.float64)
        self.sse_lvp = torch.zeros(L, V, P, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x_lnd: torch.Tensor, x_hat_lnvd: torch.Tensor, image_mask_n: torch.Tensor) -> None:
        """x in raw units (layers, tokens, d); x_hat in raw units (layers, tokens, variants, d)."""
        L, n, V, d = x_hat_lnvd.shape
        if x_lnd.shape != (L, n, d) or image_mask_n.shape != (n,) or (L, V) != self.sse_lvp.shape[:2]:
            raise ValueError(
                f"ReconAccumulator.update: x {tuple(x_lnd.shape)}, x_hat {tuple(x_hat_lnvd.shape)}, "
                f"mask {tuple(image_mask_n.shape)} do not fit {self.sse_lvp.shape[:2]} SAEs"
            )
        w_pn = torch.stack([torch.ones_like(image_mask_n), image_mask_n, ~image_mask_n]).double().to(x_lnd.device)
        x = x_lnd.double()
        self.count_p += w_pn.sum(1).cpu()
        self.sum_x_lpd += torch.einsum("pn,lnd->lpd", w_pn, x).cpu()
        self.sum_sq_lp += torch.einsum("pn,ln->lp", w_pn, x.pow(2).sum(-1)).cpu()
        err_lnv = (x_hat_lnvd.double() - x[:, :, None, :]).pow(2).sum(-1)
        self.sse_lvp += torch.einsum("pn,lnv->lvp", w_pn, err_lnv).cpu()

    def result(self) -> list[ReconStats]:
        count_p = self.count_p.clamp_min(1)
        var_lp = self.sum_sq_lp - self.sum_x_lpd.pow(2).sum(-1) / count_p
        out = []
        for li, layer in enumerate(self.layers):
            for vi, variant in enumerate(self.variants):
                for pi, split in enumerate(SPLITS):
                    n = int(self.count_p[pi])
                    sse = float(self.sse_lvp[li, vi, pi])
                    fvu = sse / float(var_lp[li, pi]) if n > 1 and var_lp[li, pi] > 0 else float("nan")
                    nmse = sse / float(self.sum_sq_lp[li, pi]) if n and self.sum_sq_lp[li, pi] > 0 else float("nan")
                    out.append(ReconStats(layer, variant, split, n, fvu, nmse))
        return out


class EvalResult(NamedTuple):
    recon: list[ReconStats]
    dead_frac: dict[tuple[int, str], float]  # fraction of features that never fired on the evaluated tokens
    fire_count_lvf: torch.Tensor  # how often each feature fired (z > 0)


@torch.no_grad()
def evaluate_bank(bank: SAEBank, batches: Iterable[ActBatch]) -> EvalResult:
    """Held-out reconstruction metrics and dead features of every SAE of a bank, streaming over batches."""
    names = [v.name for v in bank.variants]
    acc = ReconAccumulator(bank.layers, names, bank.spec.d_in)
    L, V, f = len(bank.layers), len(names), bank.spec.d_sae
    fires = torch.zeros(L * V * f, dtype=torch.long)
    for batch in batches:
        x_hat_lnvd, acts_lnvk, idx_lnvk = bank(batch.x_lnd.to(bank.W_enc.device))
        acc.update(batch.x_lnd, x_hat_lnvd / bank.act_scale_lv[:, None, :, None], batch.image_mask_n)
        row = idx_lnvk + (torch.arange(L * V, device=idx_lnvk.device) * f).view(L, 1, V, 1)
        fires += torch.bincount(row[acts_lnvk > 0], minlength=L * V * f).cpu()
    fires_lvf = fires.view(L, V, f)
    dead = {
        (layer, v): float((fires_lvf[li, vi] == 0).double().mean())
        for li, layer in enumerate(bank.layers)
        for vi, v in enumerate(names)
    }
    return EvalResult(acc.result(), dead, fires_lvf)


@torch.no_grad()
def evaluate_sae(
    sae: SAE, batches: Iterable[ActBatch], layer_index: int = 0, layer: int = 0, name: str = "sae"
) -> EvalResult:
    """The same metrics for one SAELens SAE (e.g. a base SAE) on row `layer_index` of each batch's activations;
    `layer` and `name` label the result."""
    acc = ReconAccumulator([layer], [name], sae.cfg.d_in)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for batch in batches:
        x_nd = batch.x_lnd[layer_index]
        z_nf = sae.encode(x_nd.to(sae.device, sae.dtype))
        x_hat_nd = sae.decode(z_nf).float().cpu()
        acc.update(x_nd[None], x_hat_nd[None, :, None], batch.image_mask_n)
        fires += (z_nf > 0).sum(0).cpu()
    return EvalResult(acc.result(), {(layer, name): float((fires == 0).double().mean())}, fires[None, None])


def fvu_table(stats: Iterable[ReconStats]) -> pd.DataFrame:
    """The summary table of the adaptation step: per (variant, split), FVU mean / std (ddof 1) / min / max over
    layers and the tokens per layer. `stats` may mix sources (base SAE, adapted, random), told apart by `variant`."""
    df = pd.DataFrame([s._asdict() for s in stats])
    table = df.groupby(["variant", "split"], sort=False).agg(
        fvu_mean=("fvu", "mean"),
        fvu_std=("fvu", "std"),
        fvu_min=("fvu", "min"),
        fvu_max=("fvu", "max"),
        n_layers=("layer", "nunique"),
        n_tokens=("n_tokens", "max"),
    )
    return table.reset_index()


# --------------------------------------------------------------------------------------------------------------
# The streaming trainer
# --------------------------------------------------------------------------------------------------------------


class StepOutput(NamedTuple):
    fvu_lv: torch.Tensor  # batch FVU of every SAE before the update
    n_tokens_v: torch.Tensor  # tokens in each variant's loss mask


@dataclass
class Counters:
    step: int = 0
    n_tokens: int = 0  # tokens seen (all of them; each variant's loss uses its subset)
    n_forwards: int = 0  # model forward passes spent on training batches (summed from ActBatch.n_forwards)
    epoch: int = 0
    seq_in_epoch: int = 0  # data position: sequences consumed in the current epoch


class StreamingTrainer:
    """Adam on all SAEs of a bank, one activation batch per step; resumable from a checkpoint.

    history: one row per (held-out evaluation, layer, variant, split); epoch_log: one row per finished epoch with
    the model forwards it used.
    """

    def __init__(self, bank: SAEBank, cfg: TrainConfig = TrainConfig()):
        self.bank, self.cfg = bank, cfg
        self.optimizer = torch.optim.Adam(bank.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
        self.counters = Counters()
        self.history: list[dict] = []
        self.epoch_log: list[dict] = []

    def step(self, batch: ActBatch) -> StepOutput:
        bank = self.bank
        if batch.x_lnd.shape[0] != len(bank.layers) or batch.x_lnd.shape[2] != bank.spec.d_in:
            raise ValueError(
                f"StreamingTrainer.step: activations {tuple(batch.x_lnd.shape)}, expected "
                f"({len(bank.layers)}, tokens, {bank.spec.d_in}) for layers {list(bank.layers)}"
            )
        x_lnd = batch.x_lnd.to(bank.W_enc.device, bank.W_enc.dtype)
        w_vn = token_weights_vn(bank.variants, batch.image_mask_n.to(x_lnd.device), x_lnd.dtype)
        x_hat_lnvd = bank(x_lnd, dense=self.cfg.dense).x_hat_lnvd
        fvu_lv = batch_fvu(x_lnd, x_hat_lnvd, w_vn, bank.act_scale_lv)
        self.optimizer.zero_grad(set_to_none=True)
        fvu_lv.sum().backward()
        bank.project_decoder_grad_()
        self.optimizer.step()
        bank.normalize_decoder_()
        c = self.counters
        c.step += 1
        c.n_tokens += x_lnd.shape[1]
        c.n_forwards += batch.n_forwards
        c.seq_in_epoch += batch.n_sequences
        return StepOutput(fvu_lv.detach(), w_vn.sum(1))

    def log_heldout(self, batches: Iterable[ActBatch]) -> EvalResult:
        """Evaluate on held-out batches and append the result to `history`."""
        result = evaluate_bank(self.bank, batches)
        c = self.counters
        for r in result.recon:
            self.history.append(
                {
                    "step": c.step,
                    "epoch": c.epoch,
                    "n_tokens": c.n_tokens,
                    "n_forwards": c.n_forwards,
                    **r._asdict(),
                    "dead_frac": result.dead_frac[(r.layer, r.variant)],
                }
            )
        return result

    def end_epoch(self) -> None:
        c = self.counters
        done = sum(row["n_forwards"] for row in self.epoch_log)
        self.epoch_log.append(
            {
                "epoch": c.epoch,
                "step": c.step,
                "n_sequences": c.seq_in_epoch,
                "n_forwards": c.n_forwards - done,
                "n_saes": len(self.bank.layers) * len(self.bank.variants),
            }
        )
        c.epoch += 1
        c.seq_in_epoch = 0

    # -- checkpoints --------------------------------------------------------------------------------------------

    def _identity(self) -> dict:
        """What a checkpoint must agree on to be resumed by this trainer."""
        b = self.bank
        return {
            "spec": dataclasses.asdict(b.spec),
            "layers": list(b.layers),
            "variants": [dataclasses.asdict(v) for v in b.variants],
            "lr": self.cfg.lr,
            "betas": list(self.cfg.betas),
            "eps": self.cfg.eps,
        }

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a resumed run needs: tensors (weights, Adam moments) and plain JSON (the rest)."""
        tensors = {f"bank.{name}": t.detach().contiguous() for name, t in self.bank.state_dict().items()}
        optim = self.optimizer.state_dict()
        for i, per_param in optim["state"].items():
            for key, t in per_param.items():
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(t).contiguous()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "identity": self._identity(),
            "param_groups": optim["param_groups"],
            "counters": dataclasses.asdict(self.counters),
            "history": self.history,
            "epoch_log": self.epoch_log,
        }
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict, source: str = "checkpoint") -> None:
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{source}: checkpoint format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        mine = json.loads(json.dumps(self._identity()))  # tuples become lists, as in the file
        diff = [key for key in mine if meta["identity"].get(key) != mine[key]]
        if diff:
            raise ValueError(
                f"{source}: checkpoint was written for different {', '.join(diff)} "
                f"({[meta['identity'].get(key) for key in diff]} vs {[mine[key] for key in diff]}); "
                "delete it or use the settings it was written with"
            )
        self.bank.load_state_dict({name[5:]: t for name, t in tensors.items() if name.startswith("bank.")})
        per_param: dict[int, dict] = {}
        for name, t in tensors.items():
            if name.startswith("optim."):
                _, i, key = name.split(".", 2)
                per_param.setdefault(int(i), {})[key] = t
        self.optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
        self.counters = Counters(**meta["counters"])
        self.history = list(meta["history"])
        self.epoch_log = list(meta["epoch_log"])

    def save_checkpoint(self, path: str | Path) -> None:
        """One safetensors file, the non-tensor state in its header. Atomic: a run killed while writing leaves the
        previous checkpoint intact."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp, metadata={"trainer": json.dumps(meta)})
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | Path) -> None:
        try:
            with safe_open(path, framework="pt", device=str(self.bank.W_enc.device)) as f:
                meta = json.loads(f.metadata()["trainer"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # a truncated or foreign file: say which one
            raise ValueError(f"{path}: not a readable SAE trainer checkpoint ({type(e).__name__}: {e})") from e
        self.restore(tensors, meta, source=str(path))


def fit(
    trainer: StreamingTrainer,
    stream_from: Callable[[int], Iterator[ActBatch]],
    *,
    n_epochs: int = 1,
    heldout: Callable[[], Iterable[ActBatch]] | None = None,
    eval_every: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 0,
) -> StreamingTrainer:
    """Train until `n_epochs` passes over the stream are done, resuming from `checkpoint` if it exists.

    stream_from(position) yields the training batches of one epoch starting at sequence `position` (the caller
    harvests activations there: one model forward per batch serves every layer and variant). Held-out FVU is logged
    at step 0, every `eval_every` steps and at the end; the checkpoint is written every `checkpoint_every` steps and
    at the end of each epoch, so a killed run restarted with the same arguments ends with the same SAEs.
    """
    if trainer.cfg.num_threads is not None:
        torch.set_num_threads(trainer.cfg.num_threads)
    if checkpoint is not None and Path(checkpoint).exists():
        trainer.load_checkpoint(checkpoint)
    c = trainer.counters

    def evaluate():
        if heldout is not None and (not trainer.history or trainer.history[-1]["step"] != c.step):
            trainer.log_heldout(heldout())

    evaluate()
    while c.epoch < n_epochs:
        for batch in stream_from(c.seq_in_epoch):
            trainer.step(batch)
            if eval_every and c.step % eval_every == 0:
                evaluate()
            if checkpoint is not None and checkpoint_every and c.step % checkpoint_every == 0:
                trainer.save_checkpoint(checkpoint)
        evaluate()
        trainer.end_epoch()
        if checkpoint is not None:
            trainer.save_checkpoint(checkpoint)
    return trainer
