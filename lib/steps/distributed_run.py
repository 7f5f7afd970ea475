"""The command line of the distributed steps (lib/steps/distributed.py), a module no step imports so that
`python -m` runs it once:

    # make adapt:
    python -m lib.steps.distributed_run --profile paper --run adapted-saes reconstruction feature-table spatial-stats
    # a worker:
    torchrun --standalone --nproc-per-node N -m lib.steps.distributed_run --step NAME --profile P.json ...

The first builds the steps from a process that loads no model (launching torchrun workers as the profile says); the
second is what `distributed.launch` starts on every process.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from lib.io.cache import Cache
from lib.io.profiles import load_profile
from lib.steps.distributed import WORKERS

TIMEOUT_ENV = "SPATIAL_DIST_TIMEOUT"  # seconds a collective may wait (default one hour)


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 3600)))


def worker(step_name: str, profile: Path, cache_root: Path, out: Path, stores: Sequence[Path]) -> None:
    """One torchrun worker of `distributed.launch`: join the group, resolve the upstream steps (rank 0 first, so that
    an upstream artifact is built once), write this rank's part of the step's artifact into `out`."""
    import importlib

    import torch
    import torch.distributed as dist

    from lib.steps.registry import STEPS
    from lib.steps.study import Context, Study

    P = load_profile(profile)
    if P.distributed.backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(P.distributed.backend, timeout=_timeout())
    try:
        torch.set_num_threads(P.threads)
        study = Study(P, Cache(cache_root, stores=tuple(stores)))
        upstream = [a for a in STEPS[step_name].after if a not in WORKERS]
        if dist.get_rank() == 0:
            for a in upstream:
                study.run(a)
        dist.barrier()
        for a in STEPS[step_name].after:
            study.run(a)
        module, function = WORKERS[step_name]
        getattr(importlib.import_module(module), function)(Context(study, step_name), out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--profile", required=True, help="a profile name, or the JSON a launch wrote")
    parser.add_argument("--step", help="worker mode (torchrun): the step to build")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--stores", type=Path, nargs="*", default=[])
    parser.add_argument(
        "--run", nargs="+", help="parent mode: build these steps, launching workers as the profile says"
    )
    args = parser.parse_args(argv)
    if args.step:
        worker(args.step, Path(args.profile), args.cache, args.out, args.stores)
        return
    from lib.steps.study import Study

    study = Study(args.profile)
    for name in args.run or list(WORKERS):
        study.run(name)
    study.report()


if __name__ == "__main__":
    main()
