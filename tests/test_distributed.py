"""Distributed adaptation and statistics (lib/kernels/sae_sharding.py, sae_distributed.py, adaptation_distributed.py,
stats_distributed.py, bf16_adam.py; lib/steps/distributed.py, distributed_run.py) against the single process, on the
tiny profile's organism.

The ranks are processes forked from the test (gloo on 127.0.0.1, a free port, every collective bounded by a
120 s timeout), so they share the models and data the test built; the step-level test launches real torchrun
workers through the profile and is marked slow (process start-up is most of its time on 2 cores).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import socket
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lib.io.cache import Cache
from lib.io.profiles import load_profile
from lib.kernels import adapter as A
from lib.kernels import diffing
from lib.kernels.activations import ActBatch
from lib.kernels.adaptation import adapt_saes, reconstruction_table
from lib.kernels.adaptation_distributed import adapt_saes_sharded
from lib.kernels.sae import ADAPTATION_VARIANTS, load_saes
from lib.kernels.sae_distributed import Shard, ShardTrainer
from lib.kernels.sae_sharding import Block, ShardPlan, memory_per_rank, sae_params
from lib.kernels.sae_training import TrainConfig
from lib.kernels.spatial_stats import firing_counts, spatial_table
from lib.kernels.stats_distributed import (
    feature_table_sharded,
    firing_counts_sharded,
    image_dependence_sharded,
    merge,
    reconstruction_order,
    reconstruction_sharded,
)
from lib.steps.saes import spec_of
from lib.steps.study import Study

N_STEPS = 100
EVAL_EVERY = 10  # checkpoints every 10 steps too
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
TOLERANCE = 1e-5  # the bar: relative difference of every SAE tensor after 100 steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> None:
    """fn(rank, *args) on `world` forked processes joined in one gloo group; raises if any fails."""
    mp.start_processes(_rank_entry, args=(world, free_port(), fn, args), nprocs=world, start_method="fork")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------------------
# The plan and the memory it implies (no process group)


def test_plan_shares_the_saes_out_evenly_in_contiguous_blocks():
    plan = ShardPlan((0, 1), ("full", "random", "text-only", "image-only"), 3)
    assert [len(plan.owned(r)) for r in range(3)] == [3, 3, 2]
    assert plan.blocks(0) == [Block((0,), (0, 1, 2))]
    assert plan.blocks(1) == [Block((0,), (3,)), Block((1,), (0, 1))]
    assert plan.blocks(2) == [Block((1,), (2, 3))]
    assert [plan.rows(r) for r in range(3)] == [[0], [0, 1], [1]]
    assert [plan.owner(li, vi) for li in range(2) for vi in range(4)] == [0, 0, 0, 1, 1, 1, 2, 2]
    paper = ShardPlan(tuple(range(32)), ("a", "b", "c", "d"), 3)  # 128 SAEs on 3 ranks: no even division needed
    assert [len(paper.owned(r)) for r in range(3)] == [43, 43, 42]
    assert all(len(paper.rows(r)) <= 43 // 4 + 2 for r in range(3))
    assert sorted(s for r in range(3) for s in paper.owned(r)) == [(li, vi) for li in range(32) for vi in range(4)]
    many = ShardPlan((0,), ("a", "b"), 3)  # more ranks than SAEs: the last owns none
    assert [len(many.owned(r)) for r in range(3)] == [1, 1, 0] and many.blocks(2) == [] and many.rows(2) == []


def _held_bytes(trainer: ShardTrainer) -> dict[str, int]:
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    params = trainer.shard.parameters()
    state = [t for p in params for t in trainer.optimizer.state[p].values()]
    return {
        "weights": sum(size(p) for p in params),
        "grads": sum(size(p.grad) for p in params),
        "adam": sum(size(t) for t in state),
        "buffers": sum(size(b) for bank in trainer.shard.banks for b in bank.buffers()),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_per_rank_is_the_bytes_a_rank_of_the_tiny_bank_holds(tiny, dtype):
    """The function the paper's memory table comes from (lib/steps/memory_table.py), against the parameter,
    gradient, Adam-state and buffer bytes of every rank of the tiny bank after one training step."""
    layers, spec = tiny.layers, tiny.spec
    for world in (1, 2, 3, 5):
        plan = ShardPlan(tuple(layers), tuple(v.name for v in ADAPTATION_VARIANTS), world)
        predicted = memory_per_rank(plan, spec.d_in, spec.d_sae, dtype)
        for rank in range(world):
            shard = Shard.create(plan, rank, spec, ADAPTATION_VARIANTS, tiny.base, seed=1, dtype=getattr(torch, dtype))
            trainer = ShardTrainer(shard, TrainConfig(num_threads=None))
            n = 40
            x = torch.randn(len(shard.rows), n, spec.d_in)
            trainer.step(ActBatch(x, torch.arange(n) % 3 == 0, 2))
            m = predicted[rank]
            assert m.n_saes == len(plan.owned(rank))
            if not m.n_saes:
                continue
            held = _held_bytes(trainer)
            assert held == {k: getattr(m, k) for k in held}, (world, rank, held, m)
            assert m.weights == m.n_saes * sae_params(spec.d_in, spec.d_sae) * (4 if dtype == "float32" else 2)


# --------------------------------------------------------------------------------------------------------------
# The tiny profile's organism, base SAEs and 800 adaptation pairs (100 steps of 8 sequences)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    P = load_profile("tiny")
    P = dataclasses.replace(P, sae=dataclasses.replace(P.sae, adapt_pairs=N_STEPS * P.sae.batch_size))
    S = Study(P, Cache(tmp_path_factory.mktemp("cache")))
    vlm, base = S.vlm, S.base_saes
    layers = list(range(vlm.n_layers))

    class Tiny:
        pass

    t = Tiny()
    t.P, t.vlm, t.base, t.layers, t.spec = P, vlm, base.saes, layers, spec_of(base.saes[layers[0]])
    t.adapt, t.heldout = [S.data.adapt[i] for i in range(len(S.data.adapt))], list(S.data.heldout)
    t.probe, t.probe_spatial = S.data.probe, S.data.probe_spatial
    t.heldout_text = list(S.data.heldout_text)
    t.cfg = TrainConfig(lr=P.sae.lr, num_threads=None)
    t.args = (vlm, base.saes, t.adapt, t.heldout, t.spec, t.cfg, layers, P.seed, EVAL_EVERY)
    t.dtype = torch.float32
    return t


@pytest.fixture(scope="module")
def single(tiny):
    """The single-process trainer's SAEs and history: what every distributed run is compared with."""
    return adapt_saes(*tiny.args, batch_size=tiny.P.sae.batch_size)


class Killed(Exception):
    pass


def _adapt_worker(rank, tiny, out: Path, checkpoint, die_at_forward) -> None:
    handle = None
    if die_at_forward is not None:
        calls = []

        def hook(*_):
            calls.append(1)
            if len(calls) == die_at_forward:
                raise Killed  # every rank at the same world batch: the state on disk is that of a killed run

        handle = A.decoder(tiny.vlm.model).register_forward_pre_hook(hook)
    try:
        res = adapt_saes_sharded(*tiny.args, checkpoint=checkpoint, batch_size=tiny.P.sae.batch_size, dtype=tiny.dtype)
    except Killed:
        return
    finally:
        if handle is not None:
            handle.remove()
    res.shard.save_saes(out / "saes")
    if rank == 0:
        res.history.to_parquet(out / "history.parquet")
        (out / "forwards.json").write_text(json.dumps(res.forwards_per_epoch))


def _saes(root: Path, layers) -> dict:
    return {v.name: load_saes(root / "saes", layers, v.name) for v in ADAPTATION_VARIANTS}


def _worst(single_bank, saes: dict) -> float:
    return max(
        rel_diff(getattr(single_bank.sae(layer, v), name).detach(), getattr(saes[v][layer], name).detach())
        for v in saes
        for layer in saes[v]
        for name in PARAMS
    )


def _assert_identical(a: dict, b: dict) -> None:
    for v in a:
        for layer in a[v]:
            for name in PARAMS:
                assert torch.equal(getattr(a[v][layer], name), getattr(b[v][layer], name)), (v, layer, name)


def test_one_two_and_three_processes_give_the_single_process_saes(tiny, single, tmp_path):
    """N = 1, 2, 3 forked processes (gloo) x 100 steps: every SAE within 1e-5 of the single-process trainer's (N = 1:
    bit for bit), the same held-out history to 1e-5, and one forward per non-empty micro-batch. N = 3 gives the
    first rank three SAEs of layer 0, the second one of layer 0 and two of layer 1, the third two of layer 1."""
    worst = {}
    for world in (1, 2, 3):
        out = tmp_path / f"N{world}"
        run_ranks(world, _adapt_worker, tiny, out, None, None)
        saes = _saes(out, tiny.layers)
        worst[world] = _worst(single.bank, saes)
        history = pd.read_parquet(out / "history.parquet")
        assert history[["step", "layer", "variant", "split", "n_tokens"]].equals(
            single.history[["step", "layer", "variant", "split", "n_tokens"]]
        )
        assert (history.fvu - single.history.fvu).abs().max() <= TOLERANCE
        assert json.loads((out / "forwards.json").read_text()) == [N_STEPS * min(world, tiny.P.sae.batch_size)]
    assert worst[1] == 0.0, "one process must be the single-process trainer bit for bit"
    assert max(worst.values()) <= TOLERANCE, worst
    print(f"largest relative difference from the single process after {N_STEPS} steps: {worst}")


def test_a_killed_distributed_run_resumes_bit_for_bit_and_on_other_ranks_within_tolerance(tiny, single, tmp_path):
    """3 ranks killed at world batch 25 (checkpoint at step 20) and restarted on 3 ranks end bit for bit equal to an
    uninterrupted 3-rank run; killed on 2 ranks and restarted on 3, within 1e-5 of the single process."""
    held_forwards = 3  # the held-out pairs are 3 world batches: every rank runs 3 forwards at step 0
    straight = tmp_path / "straight"
    run_ranks(3, _adapt_worker, tiny, straight, None, None)
    for first, then in ((3, 3), (2, 3)):
        out, ckpt = tmp_path / f"killed{first}to{then}", tmp_path / f"ckpt{first}to{then}" / "adapt.json"
        run_ranks(first, _adapt_worker, tiny, out, ckpt, held_forwards + 25)
        assert not (out / "saes").exists() and json.loads(ckpt.read_text())["counters"]["step"] == 20
        run_ranks(then, _adapt_worker, tiny, out, ckpt, None)
        resumed = _saes(out, tiny.layers)
        if first == then:
            _assert_identical(_saes(straight, tiny.layers), resumed)
            pd.testing.assert_frame_equal(
                pd.read_parquet(straight / "history.parquet"), pd.read_parquet(out / "history.parquet")
            )
        assert _worst(single.bank, resumed) <= TOLERANCE
    files = sorted(p.name for p in ckpt.parent.iterdir())
    assert files == ["adapt.json", *[f"adapt.json.rank{r}-of-3.step100.safetensors" for r in range(3)]], files


def test_bfloat16_saes_train_with_stochastic_rounding_and_resume_bit_for_bit(tiny, tmp_path):
    """bfloat16 weights and Adam state (lib/kernels/bf16_adam.py): a 2-rank run killed at world batch 25 resumes
    bit for bit, and the exported SAEs are float32 SAELens folders."""
    bf16 = copy.copy(tiny)
    bf16.dtype = torch.bfloat16
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ckpt = tmp_path / "ckpt" / "adapt.json"
    run_ranks(2, _adapt_worker, bf16, straight, None, None)
    run_ranks(2, _adapt_worker, bf16, killed, ckpt, 3 + 25)
    run_ranks(2, _adapt_worker, bf16, killed, ckpt, None)
    a, b = _saes(straight, tiny.layers), _saes(killed, tiny.layers)
    _assert_identical(a, b)
    assert a["full"][0].W_enc.dtype == torch.float32


def test_stochastic_rounding_is_unbiased_and_each_saes_noise_ignores_how_saes_are_stacked():
    from lib.kernels.bf16_adam import StochasticBF16Adam, to_bf16_stochastic
    from lib.kernels.sae import SAEBank, SAESpec, Variant

    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of bfloat16's spacing above 1
    assert torch.all(x.to(torch.bfloat16) == 1.0)  # round to nearest loses it
    y = to_bf16_stochastic(x, torch.Generator().manual_seed(0)).float()
    assert set(y.unique().tolist()) == {1.0, 1.0 + 2**-7} and abs(float(y.mean()) - float(x[0])) < 2e-5
    spec = SAESpec(8, 16, 2)
    variants = [Variant(n, "fresh", "all") for n in ("a", "b", "c")]
    one = SAEBank.create(spec, [0], variants[1:2], seed=0).to(dtype=torch.bfloat16)
    three = SAEBank.create(spec, [0], variants, seed=0).to(dtype=torch.bfloat16)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            src, dst = getattr(one, name), getattr(three, name)
            index = (0, slice(None), 1) if name == "W_enc" else (0, 1)
            dst[index] = src[(0, slice(None), 0) if name == "W_enc" else (0, 0)]
            src.grad = torch.randn_like(src)
            dst.grad = torch.zeros_like(dst)
            dst.grad[index] = src.grad[(0, slice(None), 0) if name == "W_enc" else (0, 0)]
    opt_one = StochasticBF16Adam([one], [[[7]]], 1e-3, (0.9, 0.999), 1e-8)
    opt_three = StochasticBF16Adam([three], [[[6, 7, 8]]], 1e-3, (0.9, 0.999), 1e-8)
    opt_one.step(), opt_three.step()
    assert torch.equal(one.W_enc[0, :, 0], three.W_enc[0, :, 1]) and torch.equal(one.W_dec[0, 0], three.W_dec[0, 1])


# --------------------------------------------------------------------------------------------------------------
# The statistics pass


def _stats_worker(rank, tiny, saes: dict, out: Path) -> None:
    variant = "text-only"
    n_ref = len(tiny.heldout) // 2
    parts = {
        "features": feature_table_sharded(tiny.vlm, tiny.base, saes, tiny.heldout, None, 8),
        "dependence": image_dependence_sharded(
            tiny.vlm, saes[variant], tiny.heldout[n_ref:], [p[0] for p in tiny.heldout[:n_ref]], 8
        ),
        "spatial": firing_counts_sharded(tiny.vlm, saes[variant], tiny.probe, tiny.probe_spatial, 8),
        "reconstruction": reconstruction_sharded(tiny.vlm, tiny.base, saes, tiny.heldout, tiny.heldout_text, 8),
    }
    for name, part in parts.items():
        part.to_parquet(out / f"{name}-{rank}.parquet")


def test_statistics_pass_on_three_processes_equals_the_single_process(tiny, single, tmp_path):
    """Visual energy and firing frequencies, image dependence, spatial firing counts and held-out reconstruction
    (base SAEs and adapted variants shared out together) of the same SAEs: every
    rank's rows, ordered by `merge`, equal the single-process tables to 1e-5 (each SAE's sums run on one rank over
    the world batch in the single process's token order, so they would be equal bit for bit but for the model: its
    forward on a micro-batch, padded to its own longest sequence, differs from the world batch's in the last bit
    for some batches). Counts and token totals are exact."""
    saes = {v.name: {layer: single.bank.sae(layer, v.name) for layer in tiny.layers} for v in ADAPTATION_VARIANTS}
    run_ranks(3, _stats_worker, tiny, saes, tmp_path)
    read = lambda name: [pd.read_parquet(p) for p in sorted(tmp_path.glob(f"{name}-*.parquet"))]  # noqa: E731
    layers, variants = tiny.layers, list(saes)
    n_ref = len(tiny.heldout) // 2
    expected = {
        "features": diffing.feature_table(tiny.vlm, tiny.base, saes, tiny.heldout, None, 8),
        "dependence": diffing.image_dependence(
            tiny.vlm, saes["text-only"], tiny.heldout[n_ref:], [p[0] for p in tiny.heldout[:n_ref]], 8
        ),
        "spatial": spatial_table(firing_counts(tiny.vlm, {x: saes["text-only"][x].encode for x in layers},
                                               tiny.probe, tiny.probe_spatial, 8)),
        "reconstruction": reconstruction_table(tiny.vlm, tiny.base, single.bank, tiny.heldout, tiny.heldout_text,
                                               batch_size=8),
    }  # fmt: skip
    order = {
        "features": ([(x, v) for v in variants for x in layers], ("layer", "variant")),
        "dependence": ([(x,) for x in layers], ("layer",)),
        "spatial": ([(x,) for x in layers], ("layer",)),
        "reconstruction": (reconstruction_order(layers, variants), ("stream", "layer", "sae")),
    }
    for name, table in expected.items():
        parts = [p for p in read(name) if len(p)]
        # 2 layers x 1 variant: the third rank owns none; every other pass shares more than 3 SAEs out
        assert len(parts) == (2 if name in ("dependence", "spatial") else 3), name
        got = merge(parts, *order[name])
        pd.testing.assert_frame_equal(got, table, check_exact=False, rtol=TOLERANCE, atol=1e-9, obj=name)
        counts = [c for c in table.columns if c.startswith(("n_", "c_"))]
        pd.testing.assert_frame_equal(got[counts], table[counts], check_exact=True, obj=name)


# --------------------------------------------------------------------------------------------------------------
# The steps, launched with torchrun as the profile says


@pytest.mark.slow
def test_steps_on_two_torchrun_processes_match_one_process(tmp_path, monkeypatch):
    """`[distributed] processes = 2`: adapted-saes, feature-table, spatial-stats and reconstruction build with
    torchrun workers (lib/steps/distributed.py) into the same artifact layout, with the same keys, within 1e-5 of
    one process."""
    monkeypatch.setenv("SPATIAL_DIST_TIMEOUT", "300")  # a hung collective fails the test in minutes, not an hour
    P = load_profile("tiny")
    P2 = dataclasses.replace(P, distributed=dataclasses.replace(P.distributed, processes=2))
    one, two = Study(P, Cache(tmp_path / "one")), Study(P2, Cache(tmp_path / "two"))
    assert one.keys == two.keys
    for name in ("adapted-saes", "feature-table", "spatial-stats", "reconstruction"):
        one.run(name), two.run(name)
    a, b = one.adapted_saes, two.adapted_saes
    files = lambda art: sorted(str(p.relative_to(art.path)) for p in art.path.rglob("*") if p.is_file())  # noqa: E731
    assert files(a.artifact) == files(b.artifact)
    worst = max(
        rel_diff(getattr(a.saes[v][x], n).detach(), getattr(b.saes[v][x], n).detach())
        for v in a.saes
        for x in a.saes[v]
        for n in PARAMS
    )
    assert worst <= TOLERANCE
    info = json.loads((b.artifact / "info.json").read_text())
    assert info["processes"] == 2 and info["backend"] == "gloo"
    assert not list((tmp_path / "two" / "checkpoints").glob("adapted-saes-*sharded*"))
    for name in ("feature-table", "spatial-stats", "reconstruction"):
        x, y = one.run(name), two.run(name)
        assert list(x.columns) == list(y.columns) and len(x) == len(y)
        num = x.select_dtypes("number").columns
        rel = ((x[num] - y[num]).abs() / x[num].abs().clip(lower=1.0)).max().max()
        assert rel <= 1e-4, (name, rel)
