"""Training and evaluating the SAEs of a bank (lib/kernels/sae.py): the loss, a streaming trainer for many SAEs at
once, and the reconstruction metrics.

Choices (the book states them too):
- Loss: batch FVU per SAE, `mean ||x - x_hat||^2 / (mean ||x - mu||^2 + 1e-8)` over the tokens in that SAE's loss
  mask, `mu` their batch mean; the bank's loss is the sum over SAEs, which gives each SAE exactly the gradient it
  would get alone (the parameters are disjoint, and Adam is elementwise).
- Adam, one activation batch per step; the decoder's unit-norm constraint is the bank's (`project_decoder_grad_`
  before the step, `normalize_decoder_` after it).
- No AuxK loss and no gradient clipping: the paper's loss is the batch FVU alone.
- Activation scale: by default SAEs see raw activations. `estimate_act_scale` gives SAELens'
  `expected_average_only_in` factor (mean ||x|| = sqrt(d_in) after scaling) per SAE, for a bank that asks for it.
- Held-out metrics stream over batches and keep sums, never activations (`ReconAccumulator`); the trainer is
  resumable from one safetensors checkpoint, so a killed run restarted with the same arguments ends with the same
  SAEs.

Shape suffixes: l layer (of a bank), v variant, n token, d model width (d_in), f SAE width (d_sae), k active
features per token, p token split (full / image / text).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import pandas as pd
import torch
from sae_lens import SAE
from safetensors import safe_open
from safetensors.torch import save_file

from lib.kernels.activations import ActBatch
from lib.kernels.sae import SAEBank, Variant
from lib.names import SPLITS

FVU_EPS = 1e-8  # the paper's denominator guard
CHECKPOINT_FORMAT = 1

# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


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
# Loss masks and activation scale
# --------------------------------------------------------------------------------------------------------------


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


def history_rows(c: Counters, result: EvalResult) -> list[dict]:
    """One history row per (layer, variant, split) of a held-out evaluation, stamped with the trainer's counters."""
    return [
        {
            "step": c.step,
            "epoch": c.epoch,
            "n_tokens": c.n_tokens,
            "n_forwards": c.n_forwards,
            **r._asdict(),
            "dead_frac": result.dead_frac[(r.layer, r.variant)],
        }
        for r in result.recon
    ]


def close_epoch(c: Counters, epoch_log: list[dict], n_saes: int) -> None:
    """Append the finished epoch's row to `epoch_log` and move the counters to the next epoch."""
    done = sum(row["n_forwards"] for row in epoch_log)
    epoch_log.append(
        {
            "epoch": c.epoch,
            "step": c.step,
            "n_sequences": c.seq_in_epoch,
            "n_forwards": c.n_forwards - done,
            "n_saes": n_saes,
        }
    )
    c.epoch += 1
    c.seq_in_epoch = 0


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
        self.history += history_rows(self.counters, result)
        return result

    def end_epoch(self) -> None:
        close_epoch(self.counters, self.epoch_log, len(self.bank.layers) * len(self.bank.variants))

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
