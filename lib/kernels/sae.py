"""Sparse autoencoders: SAELens TopK SAEs, many of them stacked in one `SAEBank`, and the sparse kernel that
trains them (the trainer and the metrics are lib/kernels/sae_training.py).

Method step 1 (SAE adaptation): for every layer, fine-tune the base SAE on VLM activations in four variants
(`full`, `random`, `text-only`, `image-only`) with the batch-FVU loss. The same bank, with fresh weights and no
token mask, holds the base SAEs trained on the LM's text activations.

What SAELens gives us and what we write by hand:
- The SAE itself is SAELens' `TopKSAE` and its on-disk format (`cfg.json` + `sae_weights.safetensors`, names in
  lib/names.py); every SAE this module writes loads with `sae_lens.SAE.load_from_disk`. SAELens' TopK convention,
  which we match exactly: `pre = (x - b_dec) @ W_enc + b_enc` (the `- b_dec` only when `apply_b_dec_to_input`),
  keep the k largest entries of `pre`, ReLU them, `x_hat = z @ W_dec + b_dec`.
- The forward and backward of a training step are ours. SAELens' trainer decodes with a dense (tokens x width)
  matrix and backpropagates through it; here the decoder gathers the k decoder rows of each token
  (`F.embedding_bag`) and the backward pass touches only the k selected entries per token (custom autograd
  functions, sparse matrix products), so the only O(width) work left per token is the encoder matmul and the top-k
  (on the CPU numpy's argpartition, about 3x faster than torch.topk). `bench/bench_sae.py` measures it against
  SAELens' trainer. `SAE_DENSE=1` (or `TrainConfig(kernel="dense")`) swaps in a plain-autograd twin of the same
  step; a test checks that both give the same loss and gradients.
- Many SAEs train at once: one `SAEBank` holds the parameters of every (layer, variant) pair stacked, and one step
  consumes one batch of activations of all layers, so the model runs one forward pass per batch, not one per
  layer and variant.

Choices (the book states them too):
- Decoder rows have unit norm at every step: before the Adam step the gradient component along each decoder row is
  removed (it would only change the row's norm, which the renormalisation undoes, and would pollute Adam's moment
  estimates), and after it each row is rescaled to norm 1 (the convention of EleutherAI sparsify and of SAELens
  before v6). Because the step moves a row tangentially, the renormalisation changes the norm only at second order
  in the learning rate, so the encoder needs no compensation. A base SAE whose decoder rows are not unit norm is
  brought there once, at initialisation, by folding the row norms into the encoder (exact when all norms are equal,
  as for every SAE this module writes; otherwise TopK then ranks features by `z_i * ||d_i||`, the convention of
  SAELens' `rescale_acts_by_decoder_norm`). The held-out FVU at step 0 shows what the fold did.
- Activation scale: by default SAEs see raw activations. A bank built with an `act_scale_lv` (for instance from
  `sae_training.estimate_act_scale`, SAELens' `expected_average_only_in` factor) trains on scaled activations and
  folds the factor back into the weights on export, so exported SAEs read raw activations. FVU and normalised MSE
  do not depend on the scale; it changes only the optimisation (Adam's steps are in weight units).

Shape suffixes: l layer (of a bank), v variant, n token, d model width (d_in), f SAE width (d_sae), k active
features per token, r rows of a flattened matrix, F variants x width, N tokens x layers x variants, R rows of the
flattened decoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from lib.names import SAE_CFG_FILENAME, resid_name

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
        if ctx.needs_input_grad[0] and W_Rd.dtype not in (torch.float32, torch.float64):
            # sampled_addmm has no bfloat16 kernel: gather each token's k rows, a bounded number of tokens at a time.
            grad_acts = torch.empty_like(acts_Nk)
            step = max(1, (1 << 24) // (k * W_Rd.shape[1]))
            for lo in range(0, N, step):
                rows = rows_Nk[lo : lo + step]
                grad_acts[lo : lo + step] = torch.einsum("nkd,nd->nk", W_Rd[rows], g_Nd[lo : lo + step])
        elif ctx.needs_input_grad[0]:
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


def fresh_decoder(spec: SAESpec, gen: torch.Generator) -> torch.Tensor:
    """A fresh SAE's decoder from the next draw of `gen`: random unit-norm rows (its encoder is the transpose)."""
    W_dec_fd = torch.randn(spec.d_sae, spec.d_in, generator=gen)
    W_dec_fd /= W_dec_fd.norm(dim=-1, keepdim=True)
    return W_dec_fd


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
                    W_dec_fd = fresh_decoder(spec, gen)
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
                hook_name=resid_name(layer),
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
        if not (path / SAE_CFG_FILENAME).is_file():
            raise FileNotFoundError(f"{path}/{SAE_CFG_FILENAME}: no SAE for layer {layer}, variant {variant!r}")
        out[layer] = SAE.load_from_disk(path, device=device)
    return out
