"""How the SAEs of a bank are shared out over the ranks of a distributed run, and how much memory each rank holds.

Arithmetic on shapes only: no tensors, no process group. lib/kernels/sae_distributed.py builds and trains what a
`ShardPlan` says; `memory_per_rank` says what that costs, and tests/test_distributed.py checks it against the bytes
of the tensors a rank of the tiny bank actually holds.

Assignment: the bank's layers x variants SAEs in layer-major order (every variant of the first layer, then of the
next), cut into N contiguous runs whose sizes differ by at most one (the first S mod N ranks get one more). Every
SAE of a bank has the same shape and its encoder sees every token of the world batch (a variant's token mask
changes its loss, not its work), so equal counts balance memory and work alike; the count need not divide evenly.
Contiguous in layer-major order keeps the layers whose activations a rank receives to at most ceil(S / N / V) + 1.
A rank holds its SAEs as rectangles of layers x variants (`Block`s, one SAEBank each): at most one partial layer at
each end of its run and the whole layers between.

Memory per rank (`memory_per_rank`), in bytes:
- weights, grads: 2 d f + f + d parameters per SAE (W_enc, W_dec, b_enc, b_dec) in the training dtype, and a
  gradient of each (kept between steps: the trainer frees them at the next step's zero_grad);
- adam: Adam's two moments in the same dtype, and one float32 step counter per parameter tensor (4 per block);
- buffers: the activation scale, one value per SAE in the training dtype;
- activations: the world batch of the layers the rank receives, and its own micro-batch of every layer (harvested,
  then copied into the send buffer), all float32 (an estimate: token counts vary from batch to batch);
- pre_acts: the encoder pre-activations of the largest block on the world batch (tokens x width per SAE), the
  largest transient of a step (an estimate of the peak, not counted exactly);
- models: the frozen model copy every rank holds (given by the caller).
The SAE state (weights + grads + adam + buffers) is exact and falls as 1/N; the rest is not divided by N.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
ADAM_STEP_BYTES = 4  # torch.optim.Adam keeps `step` as a float32 scalar tensor per parameter tensor
PARAM_TENSORS = 4  # W_enc, b_enc, W_dec, b_dec of a block
ACT_BYTES = 4  # activations are harvested in float32 (lib/kernels/activations.py)


class Block(NamedTuple):
    """A rectangle of a rank's SAEs: these layers x these variants (indices into the plan's layers and variants)."""

    layers: tuple[int, ...]
    variants: tuple[int, ...]


@dataclass(frozen=True)
class ShardPlan:
    """Which rank owns which (layer, variant) SAE (module docstring). Indices are positions in `layers` and
    `variants`, the bank's order."""

    layers: tuple[int, ...]
    variants: tuple[str, ...]
    n_ranks: int

    def __post_init__(self):
        if not self.layers or not self.variants:
            raise ValueError(f"ShardPlan: layers {self.layers} and variants {self.variants} must be non-empty")
        if not (isinstance(self.n_ranks, int) and self.n_ranks >= 1):
            raise ValueError(f"ShardPlan.n_ranks = {self.n_ranks!r}: expected an integer >= 1")

    @property
    def n_saes(self) -> int:
        return len(self.layers) * len(self.variants)

    def bounds(self) -> list[int]:
        """SAE s (layer-major index) belongs to the rank r with bounds[r] <= s < bounds[r + 1]."""
        base, extra = divmod(self.n_saes, self.n_ranks)
        out = [0]
        for r in range(self.n_ranks):
            out.append(out[-1] + base + (r < extra))
        return out

    def owned(self, rank: int) -> list[tuple[int, int]]:
        """(layer index, variant index) of the SAEs `rank` owns, in layer-major order."""
        if not 0 <= rank < self.n_ranks:
            raise ValueError(f"ShardPlan: rank {rank} outside 0..{self.n_ranks - 1}")
        b, V = self.bounds(), len(self.variants)
        return [divmod(s, V) for s in range(b[rank], b[rank + 1])]

    def owner(self, li: int, vi: int) -> int:
        s, b = li * len(self.variants) + vi, self.bounds()
        return next(r for r in range(self.n_ranks) if b[r] <= s < b[r + 1])

    def rows(self, rank: int) -> list[int]:
        """The layer indices whose activations `rank` receives: those of its SAEs, ascending."""
        return sorted({li for li, _ in self.owned(rank)})

    def blocks(self, rank: int) -> list[Block]:
        """The rank's SAEs as rectangles: consecutive layers that own the same variants form one block."""
        by_layer: dict[int, list[int]] = {}
        for li, vi in self.owned(rank):
            by_layer.setdefault(li, []).append(vi)
        out: list[Block] = []
        for li, vis in by_layer.items():
            if out and out[-1].variants == tuple(vis) and out[-1].layers[-1] == li - 1:
                out[-1] = Block((*out[-1].layers, li), out[-1].variants)
            else:
                out.append(Block((li,), tuple(vis)))
        return out


# --------------------------------------------------------------------------------------------------------------
# Memory


def sae_params(d_in: int, d_sae: int) -> int:
    """Parameters of one TopK SAE: W_enc (d x f), W_dec (f x d), b_enc (f), b_dec (d)."""
    return 2 * d_in * d_sae + d_sae + d_in


class RankMemory(NamedTuple):
    rank: int
    n_saes: int
    n_layers: int  # layers whose activations the rank receives
    weights: int
    grads: int
    adam: int
    buffers: int
    activations: int
    pre_acts: int
    models: int

    @property
    def sae_state(self) -> int:
        return self.weights + self.grads + self.adam + self.buffers

    @property
    def total(self) -> int:
        return self.sae_state + self.activations + self.pre_acts + self.models


def memory_per_rank(
    plan: ShardPlan,
    d_in: int,
    d_sae: int,
    dtype: str = "float32",
    tokens: int = 0,
    model_bytes: int = 0,
) -> list[RankMemory]:
    """Bytes each rank of `plan` holds (module docstring) when its SAEs train in `dtype` on world batches of
    `tokens` tokens, next to a model copy of `model_bytes`."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"memory_per_rank: dtype {dtype!r}, expected one of {sorted(DTYPE_BYTES)}")
    w, p = DTYPE_BYTES[dtype], sae_params(d_in, d_sae)
    n_layers = len(plan.layers)
    micro = math.ceil(tokens / plan.n_ranks)
    out = []
    for r in range(plan.n_ranks):
        blocks = plan.blocks(r)
        n = sum(len(b.layers) * len(b.variants) for b in blocks)
        largest = max((len(b.layers) * len(b.variants) for b in blocks), default=0)
        out.append(
            RankMemory(
                rank=r,
                n_saes=n,
                n_layers=len(plan.rows(r)),
                weights=n * p * w,
                grads=n * p * w,
                adam=2 * n * p * w + len(blocks) * PARAM_TENSORS * ADAM_STEP_BYTES,
                buffers=n * w,
                activations=ACT_BYTES * d_in * (len(plan.rows(r)) * tokens + 2 * n_layers * micro),
                pre_acts=largest * tokens * d_sae * w,
                models=model_bytes,
            )
        )
    return out


def layers_that_fit(
    budget_bytes: int,
    n_ranks: int,
    n_variants: int,
    d_in: int,
    d_sae: int,
    dtype: str,
    tokens: int,
    model_bytes: int,
    max_layers: int,
) -> int:
    """The most layers (all variants each) whose bank fits in `budget_bytes` on every one of `n_ranks` ranks."""
    best = 0
    for n_layers in range(1, max_layers + 1):
        plan = ShardPlan(tuple(range(n_layers)), tuple(str(v) for v in range(n_variants)), n_ranks)
        if max(m.total for m in memory_per_rank(plan, d_in, d_sae, dtype, tokens, model_bytes)) > budget_bytes:
            break
        best = n_layers
    return best


def llama_params(
    vocab: int, d_model: int, n_layers: int, d_mlp: int, n_heads: int, n_kv_heads: int, head_dim: int
) -> int:
    """Parameters of a Llama decoder with untied input and output embeddings (Llama-3.1-8B: 8.03e9)."""
    attn = d_model * head_dim * (2 * n_heads + 2 * n_kv_heads)
    mlp = 3 * d_model * d_mlp
    return 2 * vocab * d_model + n_layers * (attn + mlp + 2 * d_model) + d_model


def clip_vision_params(d_model: int, n_layers: int, d_mlp: int, patch: int, image: int, channels: int = 3) -> int:
    """Parameters of a CLIP ViT vision tower (patch embedding, class and position embeddings, pre/post norms,
    blocks with biases): ViT-L/14-336 has 3.04e8."""
    n_pos = (image // patch) ** 2 + 1
    embed = channels * patch * patch * d_model + d_model + n_pos * d_model
    block = 4 * (d_model * d_model + d_model) + 2 * d_model * d_mlp + d_mlp + d_model + 4 * d_model
    return embed + 4 * d_model + n_layers * block


def mlp_projector_params(d_vision: int, d_model: int) -> int:
    """LLaVA's `mlp2x_gelu` projector: Linear(d_vision, d_model), GELU, Linear(d_model, d_model)."""
    return d_vision * d_model + d_model + d_model * d_model + d_model


def table_rows(memory: Sequence[RankMemory]) -> dict[str, int]:
    """The largest rank's numbers (every rank's SAE state differs from it by at most one SAE)."""
    worst = max(memory, key=lambda m: m.total)
    return {**worst._asdict(), "sae_state": worst.sae_state, "total": worst.total}
