"""Adam for SAEs whose weights and moments are kept in bfloat16: each step computed in float32 and written back to
bfloat16 with stochastic rounding.

Why not torch's Adam on bfloat16 tensors: it rounds every write to the nearest bfloat16 (8 bits of mantissa, a
relative spacing of 2^-8), and Adam's small changes vanish: the second moment's decay (x 0.999 per step) rounds
back to the same value, and a step of lr 2e-4 on a weight of 0.05 is half a spacing. On the default profile's bank
(500 steps) that left the held-out FVU of the `full` variant at 0.22 where float32 reaches 0.09
(bench/bench_distributed.py --dtype-check prints the comparison). Stochastic rounding rounds up with probability
equal to the remainder, so every update survives in expectation (Gupta et al., 2015, "Deep learning with limited
numerical precision").

The noise is drawn per SAE from a generator seeded by (seed, step, SAE, tensor), never from a stream that depends on
how SAEs are stacked, so a resumed run draws what an uninterrupted one drew, and a given SAE gets the same noise on
any number of processes. Memory: the moments are bfloat16 and the step counter float32, as torch's Adam keeps them
(lib/kernels/sae_sharding.py counts them); the float32 work is one SAE's tensor at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def to_bf16_stochastic(x32: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """float32 -> bfloat16, rounding away from zero with probability equal to the dropped fraction (the low 16 bits of
    the float32 pattern): noise below the last kept bit is added to the bit pattern, then the low bits are cut."""
    bits = x32.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, generator=gen, device=x32.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class StochasticBF16Adam(torch.optim.Optimizer):
    """Adam (torch's update rule) over the parameters of SAEBanks, by SAE. `sae_ids[g][li][vi]` names SAE (li, vi)
    of bank g across every process (its index in the whole bank), which seeds its noise."""

    def __init__(
        self,
        banks: Sequence,
        sae_ids: Sequence[Sequence[Sequence[int]]],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        seed: int = 0,
    ):
        params = [p for bank in banks for p in bank.parameters()]
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.seed = seed
        self._slots = []  # (parameter, tensor number, index of one SAE in it, SAE id)
        for bank, ids in zip(banks, sae_ids, strict=True):
            for k, name in enumerate(PARAMS):
                p = getattr(bank, name)
                for li, row in enumerate(ids):
                    for vi, sae in enumerate(row):
                        index = (li, slice(None), vi) if name == "W_enc" else (li, vi)
                        self._slots.append((p, k, index, sae))

    def _generator(self, device, step: int, sae: int, k: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + step * 4_099 + sae * 8 + k) % 2**62)

    @torch.no_grad()
    def step(self, closure=None):
        group = self.param_groups[0]
        lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
        for p in group["params"]:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        for p, k, index, sae in self._slots:
            if p.grad is None:
                continue
            state = self.state[p]
            t = int(state["step"])
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            gen = self._generator(p.device, t, sae, k)
            g = p.grad[index].float()
            m = state["exp_avg"][index].float().mul_(b1).add_(g, alpha=1 - b1)
            v = state["exp_avg_sq"][index].float().mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2**0.5).add_(eps)
            p[index] = to_bf16_stochastic(p[index].float().addcdiv_(m, denom, value=-lr / bc1), gen)
            state["exp_avg"][index] = to_bf16_stochastic(m, gen)
            state["exp_avg_sq"][index] = to_bf16_stochastic(v, gen)
