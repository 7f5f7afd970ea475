"""Benchmark: distributed SAE adaptation (lib/kernels/adaptation_distributed.py) against the single process, on this
CPU, on a profile's bank (`--profile`; v1's, as bench/README.md records: its organism VLM, 4 layers x 4 variants of
512-wide TopK SAEs, k 16).

Not a test. Each configuration runs in fresh processes (torch.multiprocessing spawn, gloo on 127.0.0.1, one torch
thread per process) on the same `--steps` world batches of 8 (image, question) pairs of the profile's
adaptation data, and reports per process:
- peak memory: the process's peak resident set (VmHWM), and its growth from just before the SAEs were built to the
  end of training (VmHWM - VmRSS before): the training part, SAEs and activations, without Python, torch and the
  model every process loads;
- the SAE part, exactly: bytes of the process's SAE parameters, gradients, Adam state and buffers, walked from its
  tensors, beside `sae_sharding.memory_per_rank`'s prediction (they must agree; tests/test_distributed.py checks it);
- time: the whole adaptation, and the training steps split into the model forward on the process's micro-batch,
  the exchange of activations (all_to_all), and the SAE step of the process's own SAEs; throughput in world-batch
  tokens per second of training.
"single" is `adaptation.adapt_saes`, the path the book uses. N = 4 processes oversubscribe the 2 cores.

Held-out evaluation runs only at step 0 and at the end, on 16 pairs (2 world batches), so the times are training.

`--dtype-check` instead trains the bank on one process in float32, in bfloat16 with this project's stochastically
rounded Adam (lib/kernels/bf16_adam.py), and in bfloat16 with torch's Adam (round to nearest), and prints the
held-out FVU of each variant at the end (held-out: the profile's first 64 pairs).

Run: nice -n 10 .venv/bin/python bench/bench_distributed.py [--profile v1] [--steps 100] [--ranks 1 2 4]
(a few minutes: most of it is process start-up; SPATIAL_CACHE=dir to use another artifact cache; the
profile's base SAEs are built there first if missing, about a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HELDOUT_PAIRS = 16


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _study(steps: int, heldout: int = HELDOUT_PAIRS, profile: str = "default"):
    from lib.io.profiles import load_profile
    from lib.steps.study import Study

    P = load_profile(profile)
    P = dataclasses.replace(
        P, sae=dataclasses.replace(P.sae, adapt_pairs=steps * P.sae.batch_size, heldout_pairs=heldout)
    )
    return Study(P)


class Timers:
    def __init__(self):
        self.s: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0

        return timed


def _sae_bytes(params, optimizer, buffers) -> int:
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    grads = sum(size(p.grad) for p in params if p.grad is not None)
    state = sum(size(t) for p in params for t in optimizer.state[p].values())
    return sum(size(p) for p in params) + grads + state + sum(size(b) for b in buffers)


def worker(rank: int, world: int, port: int, steps: int, out: str, single: bool, profile: str) -> None:
    torch.set_num_threads(1)
    from lib.kernels import activations, adaptation, adaptation_distributed, sae_distributed
    from lib.kernels.sae_sharding import ShardPlan, memory_per_rank
    from lib.kernels.sae_training import StreamingTrainer, TrainConfig
    from lib.steps.saes import sae_layers, spec_of

    if not single:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))  # fmt: skip
    S = _study(steps, profile=profile)
    P, vlm, base = S.P, S.vlm, S.base_saes.saes
    D = S.data
    adapt, heldout = [D.adapt[i] for i in range(len(D.adapt))], list(D.heldout)
    layers = sae_layers(P, vlm)
    spec = spec_of(base[layers[0]])
    cfg = TrainConfig(lr=P.sae.lr, num_threads=1)
    timers = Timers()
    seen: dict = {}
    if single:
        activations.harvest = timers.wrap("forward", activations.harvest)
        original = StreamingTrainer.step

        def step(self, batch):
            seen["trainer"] = self
            return timers.wrap("sae_step", original)(self, batch)

        StreamingTrainer.step = step
    else:
        activations.harvest = timers.wrap("forward", activations.harvest)
        adaptation_distributed.exchange = timers.wrap("exchange", sae_distributed.exchange)
        original = sae_distributed.ShardTrainer.step

        def step(self, batch):
            seen["trainer"] = self
            return timers.wrap("sae_step", original)(self, batch)

        sae_distributed.ShardTrainer.step = step
    args = (vlm, base, adapt, heldout, spec, cfg, layers, P.seed, 0)
    rss0 = _status("VmRSS")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    if single:
        adaptation.adapt_saes(*args, batch_size=P.sae.batch_size)
    else:
        adaptation_distributed.adapt_saes_sharded(*args, batch_size=P.sae.batch_size)
    wall = time.perf_counter() - t0
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    trainer = seen["trainer"]
    tokens = trainer.counters.n_tokens  # every world batch's tokens
    if single:
        bank = trainer.bank
        params, buffers, n_saes = list(bank.parameters()), list(bank.buffers()), len(bank.layers) * len(bank.variants)
        predicted = memory_per_rank(ShardPlan(tuple(layers), tuple(v.name for v in bank.variants), 1),
                                    spec.d_in, spec.d_sae)[0]  # fmt: skip
    else:
        shard = trainer.shard
        params = shard.parameters()
        buffers = [b for bank in shard.banks for b in bank.buffers()]
        n_saes = len(shard.plan.owned(rank))
        predicted = memory_per_rank(shard.plan, spec.d_in, spec.d_sae)[rank]
    result = {
        "rank": rank,
        "world": world,
        "single": single,
        "n_saes": n_saes,
        "wall_s": wall,
        "cpu_s": cpu.ru_utime + cpu.ru_stime - cpu0,
        "train_tokens": tokens,
        "times": timers.s,
        "peak_rss": _status("VmHWM"),
        "rss_before": rss0,
        "sae_bytes": _sae_bytes(params, trainer.optimizer, buffers) if params else 0,
        "sae_bytes_predicted": predicted.sae_state,
    }
    Path(out, f"{'single' if single else world}-{rank}.json").write_text(json.dumps(result))
    if not single:
        dist.destroy_process_group()


def dtype_worker(rank: int, port: int, steps: int, dtype: str, out: str, profile: str) -> None:
    torch.set_num_threads(1)
    from lib.kernels import adaptation_distributed, sae_distributed
    from lib.kernels.sae_training import TrainConfig
    from lib.steps.saes import sae_layers, spec_of

    if dtype == "bfloat16-nearest":  # torch's fused Adam on the bfloat16 tensors: every write rounded to nearest
        sae_distributed.StochasticBF16Adam = lambda banks, ids, lr, betas, eps: torch.optim.Adam(
            [p for b in banks for p in b.parameters()], lr=lr, betas=betas, eps=eps, fused=True
        )
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    S = _study(steps, heldout=64, profile=profile)
    P, vlm, base, D = S.P, S.vlm, S.base_saes.saes, S.data
    layers = sae_layers(P, vlm)
    res = adaptation_distributed.adapt_saes_sharded(
        vlm, base, [D.adapt[i] for i in range(len(D.adapt))], list(D.heldout), spec_of(base[layers[0]]),
        TrainConfig(lr=P.sae.lr, num_threads=1), layers, P.seed, 0, batch_size=P.sae.batch_size,
        dtype=getattr(torch, dtype.split("-")[0]),
    )  # fmt: skip
    h = res.history[(res.history.split == "full") & (res.history.step == res.history.step.max())]
    Path(out, f"{dtype}.json").write_text(json.dumps(h.groupby("variant").fvu.mean().to_dict()))
    dist.destroy_process_group()


def dtype_check(steps: int, profile: str) -> None:
    with tempfile.TemporaryDirectory() as out:
        names = ("float32", "bfloat16", "bfloat16-nearest")
        for name in names:
            mp.spawn(dtype_worker, args=(free_port(), steps, name, out, profile), nprocs=1)
        fvu = {name: json.loads(Path(out, f"{name}.json").read_text()) for name in names}
    print(f"held-out FVU (all tokens) after {steps} steps, one process:")
    print("| SAEs' weights and Adam state | " + " | ".join(fvu["float32"]) + " |")
    print("|---|" + "---:|" * len(fvu["float32"]))
    labels = {"float32": "float32", "bfloat16": "bfloat16, stochastic rounding (ours)",
              "bfloat16-nearest": "bfloat16, torch Adam (round to nearest)"}  # fmt: skip
    for name in names:
        print(f"| {labels[name]} | " + " | ".join(f"{fvu[name][v]:.4f}" for v in fvu["float32"]) + " |")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default", help="an organism profile (bench/README.md: v1)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dtype-check", action="store_true", help="float32 vs bfloat16 quality, one process")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    S = _study(args.steps, profile=args.profile)
    _ = S.base_saes  # built once here (about a minute on a fresh cache), reused by every process
    print(
        f"base SAEs ready ({time.perf_counter() - t0:.0f} s); {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    if args.dtype_check:
        dtype_check(args.steps, args.profile)
        return
    runs = [("single", 1)] + [("sharded", n) for n in args.ranks]
    with tempfile.TemporaryDirectory() as out:
        for kind, n in runs:
            t = time.perf_counter()
            mp.spawn(worker, args=(n, free_port(), args.steps, out, kind == "single", args.profile), nprocs=n)
            print(f"{kind} N={n}: {time.perf_counter() - t:.0f} s with start-up", flush=True)
        rows = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))]
    mb = lambda b: b / 2**20  # noqa: E731
    print()
    print("| run | rank | SAEs | SAE bytes (predicted) MiB | peak RSS MiB | growth in training MiB | forward s "
          "| exchange s | SAE step s | adaptation s | CPU s | tokens/s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, n in runs:
        for r in sorted((r for r in rows if r["single"] == (kind == "single") and (r["single"] or r["world"] == n)),
                        key=lambda r: r["rank"]):  # fmt: skip
            t = r["times"]
            print(
                f"| {'single process' if r['single'] else f'N = {n}'} | {r['rank']} | {r['n_saes']} "
                f"| {mb(r['sae_bytes']):.2f} ({mb(r['sae_bytes_predicted']):.2f}) | {mb(r['peak_rss']):.0f} "
                f"| {mb(r['peak_rss'] - r['rss_before']):.1f} | {t.get('forward', 0):.2f} | {t.get('exchange', 0):.2f} "
                f"| {t.get('sae_step', 0):.2f} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} "
                f"| {r['train_tokens'] / r['wall_s']:.0f} |"
            )


if __name__ == "__main__":
    main()
