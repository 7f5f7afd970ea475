"""SAEs trained across the ranks of a torch.distributed process group: each (layer, variant) SAE lives on one rank
(lib/kernels/sae_sharding.py says which) and is trained there on the whole world batch, exactly as the single
process trains it (lib/kernels/sae_training.py).

- `exchange`: every rank holds the activations of its own micro-batch for every layer; it receives, for the layers
  its SAEs read, the activations of the whole world batch, in world order (rank 0's tokens, then rank 1's, ...).
  One `all_to_all_single` moves them: each rank receives only its own layers, about 1/N of the world batch's
  activations, where an all_gather would send every rank all of them (at the paper's scale about 2.9 GB per world
  batch of 8 sequences over 32 layers). Token counts and per-token labels (the image mask) are small and go by
  all_gather. Gloo and NCCL both support uneven splits of all_to_all_single.
- `Shard`: the SAEs one rank owns, as SAEBanks (one per block of layers x variants), initialised with exactly the
  weights `SAEBank.create` gives the same (layer, variant) in a single-process bank (fresh SAEs draw from one
  seeded stream in bank order, so every rank replays the draws of the SAEs before its own).
- `ShardTrainer`: the same interface as `StreamingTrainer` (so `sae_training.fit` drives it unchanged): one Adam
  step per world batch on the rank's own SAEs, the loss of each SAE the batch FVU over every token of the world
  batch in its mask (computed in float32 whatever the SAEs' dtype; bfloat16 SAEs step with the stochastically
  rounded Adam of lib/kernels/bf16_adam.py); held-out FVU computed where each SAE lives and gathered, so every
  rank holds the same history; checkpoints sharded (below).

No gradient or loss is ever reduced across ranks: the SAEs' parameters are disjoint and each one's loss needs
only its own layer's activations, so the only communication is the activations in and the metrics out.

Sharded checkpoints: every rank writes its SAEs' weights and Adam moments, named by (layer, variant), to a
safetensors file of its own, stamped with the step; then rank 0 writes the JSON that names the step, the file of
every SAE, the counters and the history (atomically, after a barrier), then the files no longer named are
removed. A run killed at any moment leaves a complete, consistent checkpoint: the one the JSON names. A run
restarted with the same ranks ends bit for bit equal to an uninterrupted one; with other ranks, each reads its new
SAEs from whichever files hold them (equal to 1e-5, as between any two rank counts).

Shape suffixes: l layer, v variant, n token, d model width, f SAE width, r a rank's received layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from sae_lens import SAE
from safetensors import safe_open
from safetensors.torch import save_file

from lib.kernels.activations import ActBatch
from lib.kernels.bf16_adam import StochasticBF16Adam
from lib.kernels.sae import SAEBank, SAESpec, Variant, fresh_decoder
from lib.kernels.sae_sharding import ShardPlan
from lib.kernels.sae_training import (
    Counters,
    EvalResult,
    ReconAccumulator,
    ReconStats,
    TrainConfig,
    batch_fvu,
    close_epoch,
    history_rows,
    token_weights_vn,
)
from lib.names import SPLITS

SHARDED_FORMAT = 1
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _slot(name: str, li: int, vi: int):
    """Index of one SAE (block row li, block variant vi) in a bank parameter of the given name."""
    return (li, slice(None), vi) if name == "W_enc" else (li, vi)


def comm_device(group=None) -> torch.device:
    """Where collective buffers must live: the current GPU for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------------
# Moving activations to the SAEs that read them


def exchange(
    x_lnd: torch.Tensor, labels_n: torch.Tensor, rows_by_rank: Sequence[Sequence[int]], group=None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """This rank's micro-batch x (every layer, its tokens, d) and per-token labels (uint8 or bool) -> the world batch
    of the layers in `rows_by_rank[rank]` (those rows of x, every rank's tokens in rank order), the world's labels,
    and every rank's token count."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = comm_device(group)
    _, n, d = x_lnd.shape
    mine = list(rows_by_rank[rank])
    counts_t = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts_t, torch.tensor([n], dtype=torch.int64, device=device), group=group)
    counts = [int(c) for c in counts_t]
    padded = torch.zeros(max(max(counts), 1), dtype=torch.uint8, device=device)
    padded[:n] = labels_n.to(device, torch.uint8)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    labels_world = torch.cat([g[:c] for g, c in zip(gathered, counts, strict=True)])
    x = x_lnd.to(device, torch.float32)
    send = torch.cat([x[list(rows)].reshape(-1) for rows in rows_by_rank])
    in_splits = [len(rows) * n * d for rows in rows_by_rank]
    out_splits = [len(mine) * c * d for c in counts]
    recv = torch.empty(sum(out_splits), dtype=torch.float32, device=device)
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    parts = [blk.view(len(mine), c, d) for blk, c in zip(recv.split(out_splits), counts, strict=True)]
    return torch.cat(parts, dim=1), labels_world, counts


def micro_range(lo: int, hi: int, rank: int, world: int) -> tuple[int, int]:
    """The sequences [a, b) of world batch [lo, hi) that `rank` runs the model on: contiguous, in rank order, sizes
    differing by at most one (the world batch is the single process's batch, cut in N)."""
    base, extra = divmod(hi - lo, world)
    a = lo + rank * base + min(rank, extra)
    return a, a + base + (rank < extra)


# --------------------------------------------------------------------------------------------------------------
# The SAEs of one rank


class Shard:
    """The SAEs `rank` owns under `plan`, as one SAEBank per block (lib/kernels/sae_sharding.py)."""

    def __init__(self, plan: ShardPlan, rank: int, spec: SAESpec, dtype: torch.dtype, banks: Sequence[SAEBank]):
        self.plan, self.rank, self.spec, self.dtype, self.banks = plan, rank, spec, dtype, list(banks)
        self.rows = plan.rows(rank)  # layer indices this rank receives, ascending
        self.blocks = plan.blocks(rank)
        # For each bank, the positions in `rows` of its layers (what it reads of a received batch).
        self.bank_rows = [[self.rows.index(li) for li in b.layers] for b in self.blocks]

    @classmethod
    def create(
        cls,
        plan: ShardPlan,
        rank: int,
        spec: SAESpec,
        variants: Sequence[Variant],
        base_saes: Mapping[int, SAE] | None = None,
        seed: int = 0,
        model_name: str = "",
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> Shard:
        """The rank's SAEs initialised as `SAEBank.create(spec, plan.layers, variants, base_saes, seed)` would
        initialise them. Only the base SAEs of the rank's own layers are read (a lazy mapping loads no others)."""
        if tuple(v.name for v in variants) != plan.variants:
            raise ValueError(f"Shard.create: variants {[v.name for v in variants]} differ from the plan's")
        blocks = plan.blocks(rank)
        banks = [
            SAEBank(spec, [plan.layers[i] for i in b.layers], [variants[j] for j in b.variants], model_name=model_name)
            for b in blocks
        ]
        where = {
            (li, vi): (g, bli, bvi)
            for g, b in enumerate(blocks)
            for bli, li in enumerate(b.layers)
            for bvi, vi in enumerate(b.variants)
        }
        gen = torch.Generator().manual_seed(seed)
        zeros_f, zeros_d = torch.zeros(spec.d_sae), torch.zeros(spec.d_in)
        for li, layer in enumerate(plan.layers):
            base = None  # the layer's base SAE, read once and only if one of this rank's SAEs starts from it
            for vi, variant in enumerate(variants):
                # Every fresh SAE draws, owned or not: the stream stays where a single-process bank has it.
                W_dec_fd = fresh_decoder(spec, gen) if variant.init == "fresh" else None
                if (li, vi) not in where:
                    continue
                g, bli, bvi = where[(li, vi)]
                if W_dec_fd is not None:
                    banks[g]._set(bli, bvi, W_dec_fd.T, zeros_f, W_dec_fd, zeros_d)
                    continue
                if base_saes is None or layer not in base_saes:
                    raise ValueError(f"Shard.create: variant {variant.name} starts from a base SAE of layer {layer}")
                base = base_saes[layer] if base is None else base
                banks[g].load_sae(bli, bvi, base)
        return cls(plan, rank, spec, dtype, [b.to(device=device, dtype=dtype) for b in banks])

    def owned(self):
        """(bank, block row, block variant, layer, variant name) of every SAE of the rank, in plan order."""
        for bank in self.banks:
            for bli, layer in enumerate(bank.layers):
                for bvi, v in enumerate(bank.variants):
                    yield bank, bli, bvi, layer, v.name

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for bank in self.banks for p in bank.parameters()]

    def save_saes(self, root: str | Path) -> None:
        """Write the rank's SAEs as SAELens folders, `root/L{layer}/{variant}`: the folders `SAEBank.save_saes` of
        a single-process bank writes for the same SAEs."""
        for bank in self.banks:
            bank.save_saes(root)


# --------------------------------------------------------------------------------------------------------------
# Training


class ShardTrainer:
    """`StreamingTrainer`'s interface on a rank's `Shard` (module docstring). `step` takes the world batch of the
    rank's received layers (`exchange`), rows in `shard.rows` order."""

    def __init__(self, shard: Shard, cfg: TrainConfig, group=None):
        self.shard, self.cfg, self.group = shard, cfg, group
        params = shard.parameters()
        if not params:
            self.optimizer = None
        elif shard.dtype == torch.bfloat16:  # round-to-nearest would lose Adam's small steps (lib/kernels/bf16_adam.py)
            V = len(shard.plan.variants)
            ids = [[[li * V + vi for vi in b.variants] for li in b.layers] for b in shard.blocks]
            self.optimizer = StochasticBF16Adam(shard.banks, ids, cfg.lr, cfg.betas, cfg.eps)
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
        self.counters = Counters()
        self.history: list[dict] = []
        self.epoch_log: list[dict] = []

    def _check(self, batch: ActBatch) -> None:
        if batch.x_lnd.shape[0] != len(self.shard.rows):
            raise ValueError(
                f"ShardTrainer (rank {self.shard.rank}): activations {tuple(batch.x_lnd.shape)}, expected "
                f"{len(self.shard.rows)} rows (layers {[self.shard.plan.layers[i] for i in self.shard.rows]})"
            )

    def step(self, batch: ActBatch) -> None:
        """One Adam step of every SAE of the rank on the world batch: the single process's step, per SAE."""
        self._check(batch)
        total = None
        for bank, rows in zip(self.shard.banks, self.shard.bank_rows, strict=True):
            x_lnd = batch.x_lnd[rows].to(bank.W_enc.device, torch.float32)
            w_vn = token_weights_vn(bank.variants, batch.image_mask_n.to(x_lnd.device), x_lnd.dtype)
            x_hat_lnvd = bank(x_lnd, dense=self.cfg.dense).x_hat_lnvd
            fvu = batch_fvu(x_lnd, x_hat_lnvd.float(), w_vn, bank.act_scale_lv.float()).sum()
            total = fvu if total is None else total + fvu
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            for bank in self.shard.banks:
                bank.project_decoder_grad_()
            self.optimizer.step()
            for bank in self.shard.banks:
                bank.normalize_decoder_()
        c = self.counters
        c.step += 1
        c.n_tokens += batch.x_lnd.shape[1]
        c.n_forwards += batch.n_forwards
        c.seq_in_epoch += batch.n_sequences

    @torch.no_grad()
    def _evaluate_own(self, batches: Iterable[ActBatch]) -> dict[tuple[int, str], list[float]]:
        """Per own SAE: (n_tokens, fvu, nmse) of each split, then the dead fraction (evaluate_bank's numbers)."""
        shard = self.shard
        accs = [ReconAccumulator(b.layers, [v.name for v in b.variants], b.spec.d_in) for b in shard.banks]
        fires = [torch.zeros(b.W_dec.shape[0] * b.W_dec.shape[1] * b.spec.d_sae, dtype=torch.long) for b in shard.banks]
        for batch in batches:
            for bank, rows, acc, fire in zip(shard.banks, shard.bank_rows, accs, fires, strict=True):
                x_lnd = batch.x_lnd[rows].to(bank.W_enc.device)
                x_hat_lnvd, acts_lnvk, idx_lnvk = bank(x_lnd)
                L, V, width = len(bank.layers), len(bank.variants), bank.spec.d_sae
                acc.update(x_lnd, (x_hat_lnvd / bank.act_scale_lv[:, None, :, None]).float(), batch.image_mask_n)
                row = idx_lnvk + (torch.arange(L * V, device=idx_lnvk.device) * width).view(L, 1, V, 1)
                fire += torch.bincount(row[acts_lnvk > 0], minlength=L * V * width).cpu()
        out: dict[tuple[int, str], list[float]] = {}
        for bank, acc, fire in zip(shard.banks, accs, fires, strict=True):
            fire_lvf = fire.view(len(bank.layers), len(bank.variants), bank.spec.d_sae)
            by_key: dict[tuple[int, str], list[float]] = {}
            for r in acc.result():
                by_key.setdefault((r.layer, r.variant), []).extend([float(r.n_tokens), r.fvu, r.nmse])
            for li, layer in enumerate(bank.layers):
                for vi, v in enumerate(bank.variants):
                    dead = float((fire_lvf[li, vi] == 0).double().mean())
                    out[(layer, v.name)] = [*by_key[(layer, v.name)], dead]
        return out

    def evaluate(self, batches: Iterable[ActBatch]) -> EvalResult:
        """Held-out metrics of EVERY SAE of the plan, on every rank: each rank measures its own, then all gather."""
        plan, group = self.shard.plan, self.group
        own = self._evaluate_own(batches)
        width = 3 * len(SPLITS) + 1
        rows_max = max(len(plan.owned(r)) for r in range(plan.n_ranks))
        packed = torch.full((max(rows_max, 1), width), float("nan"), dtype=torch.float64)
        for j, (li, vi) in enumerate(plan.owned(self.shard.rank)):
            packed[j] = torch.tensor(own[(plan.layers[li], plan.variants[vi])], dtype=torch.float64)
        device = comm_device(group)
        gathered = [torch.empty_like(packed, device=device) for _ in range(plan.n_ranks)]
        dist.all_gather(gathered, packed.to(device), group=group)
        recon, dead = [], {}
        for li, layer in enumerate(plan.layers):
            for vi, v in enumerate(plan.variants):
                r = plan.owner(li, vi)
                vals = gathered[r][plan.owned(r).index((li, vi))].cpu().tolist()
                for pi, split in enumerate(SPLITS):
                    n, fvu, nmse = vals[3 * pi : 3 * pi + 3]
                    recon.append(ReconStats(layer, v, split, int(n), fvu, nmse))
                dead[(layer, v)] = vals[-1]
        return EvalResult(recon, dead, torch.empty(0))

    def log_heldout(self, batches: Iterable[ActBatch]) -> EvalResult:
        result = self.evaluate(batches)
        self.history += history_rows(self.counters, result)
        return result

    def end_epoch(self) -> None:
        close_epoch(self.counters, self.epoch_log, self.shard.plan.n_saes)

    # -- sharded checkpoints ------------------------------------------------------------------------------------

    def _identity(self) -> dict:
        """What a checkpoint must agree on to be resumed (the number of ranks need not: see the module docstring)."""
        shard = self.shard
        return {
            "spec": dataclasses.asdict(shard.spec),
            "layers": list(shard.plan.layers),
            "variants": list(shard.plan.variants),
            "lr": self.cfg.lr,
            "betas": list(self.cfg.betas),
            "eps": self.cfg.eps,
            "dtype": str(shard.dtype),
        }

    def _file(self, path: Path, rank: int, step: int) -> str:
        return f"{path.name}.rank{rank}-of-{self.shard.plan.n_ranks}.step{step}.safetensors"

    def save_checkpoint(self, path: str | Path) -> None:
        """Collective: every rank calls it at the same step (module docstring)."""
        path, plan, rank, step = Path(path), self.shard.plan, self.shard.rank, self.counters.step
        path.parent.mkdir(parents=True, exist_ok=True)
        # Adam steps once per trainer step, so its step count is the counters' (and it has moments once step > 0).
        state = self.optimizer.state if self.optimizer is not None else {}
        tensors = {}
        for bank, bli, bvi, layer, v in self.shard.owned():
            for name in PARAMS:
                p, key, slot = getattr(bank, name), f"L{layer}/{v}/{name}", _slot(name, bli, bvi)
                tensors[key] = p.detach()[slot].contiguous().cpu()
                if p in state:
                    for moment in ("exp_avg", "exp_avg_sq"):
                        tensors[f"{key}.{moment}"] = state[p][moment][slot].contiguous().cpu()
        if tensors:
            target = path.parent / self._file(path, rank, step)
            tmp = target.with_name(target.name + ".tmp")
            save_file(tensors, tmp, metadata={"step": str(step)})
            os.replace(tmp, target)
        dist.barrier(group=self.group)  # every rank's file is written before the JSON names it
        if rank == 0:
            meta = {
                "format": SHARDED_FORMAT,
                "identity": self._identity(),
                "step": step,
                "files": {
                    f"L{plan.layers[li]}/{plan.variants[vi]}": self._file(path, plan.owner(li, vi), step)
                    for li in range(len(plan.layers))
                    for vi in range(len(plan.variants))
                },
                "n_ranks": plan.n_ranks,
                "counters": dataclasses.asdict(self.counters),
                "history": self.history,
                "epoch_log": self.epoch_log,
            }
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, path)
            keep = set(meta["files"].values())
            for old in path.parent.glob(f"{path.name}.rank*.safetensors"):
                if old.name not in keep:
                    old.unlink(missing_ok=True)
        dist.barrier(group=self.group)

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable sharded SAE checkpoint ({type(e).__name__}: {e})") from e
        if meta.get("format") != SHARDED_FORMAT:
            raise ValueError(f"{path}: sharded checkpoint format {meta.get('format')!r}, expected {SHARDED_FORMAT}")
        mine = json.loads(json.dumps(self._identity()))
        diff = [k for k in mine if meta["identity"].get(k) != mine[k]]
        if diff:
            raise ValueError(
                f"{path}: checkpoint was written for different {', '.join(diff)} "
                f"({[meta['identity'].get(k) for k in diff]} vs {[mine[k] for k in diff]}); "
                "delete it or use the settings it was written with"
            )
        moments: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
        handles: dict[str, object] = {}
        try:
            for bank, bli, bvi, layer, v in self.shard.owned():
                file = meta["files"][f"L{layer}/{v}"]
                if file not in handles:
                    handles[file] = safe_open(path.parent / file, framework="pt", device="cpu").__enter__()
                f = handles[file]
                for name in PARAMS:
                    p, key, slot = getattr(bank, name), f"L{layer}/{v}/{name}", _slot(name, bli, bvi)
                    with torch.no_grad():
                        p[slot].copy_(f.get_tensor(key))
                    if meta["counters"]["step"] > 0:
                        m = moments.setdefault(p, {k: torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq")})
                        for moment in m:
                            m[moment][slot].copy_(f.get_tensor(f"{key}.{moment}"))
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)
        if self.optimizer is not None and meta["counters"]["step"] > 0:
            params = self.shard.parameters()
            state = {
                i: {"step": torch.tensor(float(meta["counters"]["step"]), dtype=torch.float32), **moments[p]}
                for i, p in enumerate(params)
            }
            groups = self.optimizer.state_dict()["param_groups"]
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.counters = Counters(**meta["counters"])
        self.history = list(meta["history"])
        self.epoch_log = list(meta["epoch_log"])


def remove_checkpoint(path: str | Path) -> None:
    """Delete a sharded checkpoint: its JSON and every rank's file."""
    path = Path(path)
    for f in path.parent.glob(f"{path.name}.rank*"):
        f.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
