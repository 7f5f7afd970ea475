"""Steps on several processes: a step whose profile asks for `[distributed] processes` > 1 (or bfloat16 SAEs)
builds its artifact with torchrun, the SAEs shared out over the processes (lib/kernels/sae_distributed.py).

The parent (`launch`, called from the step's build) writes the profile as JSON and runs
`torchrun --standalone --nproc-per-node N -m lib.steps.distributed_run --step NAME ...`. Each worker joins the process
group (the profile's backend; NCCL gives each process its own GPU, `LOCAL_RANK`), opens a Study of the same profile
on the same cache, resolves the step's upstream steps (rank 0 first, so that an upstream artifact is built once,
then the others reuse it), and runs the step's `*_into(ctx, out)`, which writes into the parent's temporary
artifact directory (one machine, one file system). The parent publishes the artifact (lib/io/cache.py) once every
worker has exited 0, with the run's processes, backend and wall time in its info.json; a failing worker fails the
step with the tail of the workers' log. Upstream steps that are themselves distributed are resolved by the parent
before it launches (each launches its own workers), so workers only ever reuse them.

`python -m lib.steps.distributed_run --profile paper --run adapted-saes reconstruction feature-table spatial-stats`
(`make adapt`)
builds those steps in a process that holds no model, which on GPUs leaves every GPU to the workers: run it before
`make book` when the book's own process would otherwise hold a model copy on the first GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from lib.io.cache import load_table, save_table
from lib.io.profiles import profile_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS_WITH = ("distributed.processes", "distributed.backend")  # what the distributed steps declare as runs_with
# step -> (module, function) that writes its artifact; with a process group up it shares the SAEs out.
WORKERS = {
    "adapted-saes": ("lib.steps.saes", "adapt_into"),
    "feature-table": ("lib.steps.features", "feature_table_into"),
    "spatial-stats": ("lib.steps.features", "spatial_stats_into"),
    "reconstruction": ("lib.steps.saes", "reconstruction_into"),
}
LOG_TAIL = 60


def in_group() -> bool:
    """Whether this process is a worker of a distributed step (a process group is up)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def wants_workers(P) -> bool:
    """Whether a distributed step of profile view P builds with torchrun: more than one process, or SAEs in a dtype
    only the sharded trainer has (bfloat16; one process is then a world of one)."""
    return P.distributed.processes > 1 or P.distributed.dtype != "float32"


def launch(ctx, out: Path) -> dict:
    """Build `ctx`'s step into `out` with torchrun (module docstring); returns the artifact's info."""
    P, name = ctx.P, ctx.step.name
    for upstream in ctx.step.after:
        if upstream in WORKERS:
            ctx.up(upstream)  # a distributed upstream step launches its own workers, before ours need it
    n = P.distributed.processes
    study = ctx.study
    log = ctx.checkpoint().with_suffix(".log")
    with tempfile.TemporaryDirectory(dir=study.cache.root, prefix=".launch-") as scratch:
        profile = Path(scratch) / "profile.json"
        profile.write_text(json.dumps(profile_dict(study.P)))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            "-m",
            "lib.steps.distributed_run",
            "--step",
            name,
            "--profile",
            str(profile),
            "--cache",
            str(study.cache.root),
            "--out",
            str(out),
            "--stores",
            *[str(s) for s in study.cache.stores],
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(study.P.threads), PYTHONPATH=str(REPO_ROOT))
        env.pop("SPATIAL_CACHE_EVENTS", None)  # the workers' lookups are theirs; the step's own event is the parent's
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL:])
        raise RuntimeError(f"step {name!r}: {n} torchrun workers failed (exit {rc}); the end of {log}:\n{tail}")
    log.unlink(missing_ok=True)
    info_path = out / "info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return {**info, "processes": n, "backend": P.distributed.backend, "wall_s": round(seconds, 1)}


def gather_table(part: pd.DataFrame, scratch: Path, order: Sequence[tuple], columns: Sequence[str]):
    """Every rank's rows of a table, in the single process's order, on rank 0 (None elsewhere): each rank writes its
    part to `scratch` (a shared folder), and rank 0 reads and orders them (lib.kernels.stats_distributed.merge)."""
    import torch.distributed as dist

    from lib.kernels.stats_distributed import merge

    rank, world = dist.get_rank(), dist.get_world_size()
    scratch.mkdir(parents=True, exist_ok=True)
    if len(part):
        save_table(scratch / f"part-{rank}.parquet", part)
    dist.barrier()
    if rank != 0:
        return None
    parts = [load_table(p) for r in range(world) if (p := scratch / f"part-{r}.parquet").exists()]
    shutil.rmtree(scratch)
    return merge(parts, order, columns)
