"""Benchmark: the organism's trainers with each step's batch padded as one (length_buckets = 1, the trainers before
issue 20's change) against length buckets (lib.sources.organism_training.bucketed_ce), on a profile's shapes.

Not a test. Runs the real training loops (`train_vlm`'s stage 2 with its caption mix from the first step, and
`train_lm`) for `--steps` steps on freshly made models, for each k in turn, twice (interleaved, so drift in the
machine's speed touches every k alike), and prints the loop's own clock per step (the first 5 steps left out) and
the final loss (equal across k up to float rounding: the same loss on less padding). Speed does not depend on the
weights, so no trained organism is needed.

    nice -n 10 .venv/bin/python bench/bench_length_buckets.py [--profile default] [--steps 30]   (about 5 minutes)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch

from lib.io.profiles import load_profile
from lib.sources import organism as O
from lib.sources import organism_training as T
from lib.sources.tokenizer import build_tokenizer


def per_step(curve) -> float:
    """Seconds per step from a training curve's (step, loss, wall seconds) rows, the first 5 steps left out."""
    return (curve[-1][2] - curve[4][2]) / (len(curve) - 5)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    P, tok = load_profile(args.profile), build_tokenizer()
    torch.manual_seed(P.seed)
    lm, tower = O.make_lm(P.lm, tok), O.make_tower(P.tower)
    runs = {
        "VLM stage 2": lambda k: T.train_vlm(
            dataclasses.replace(P.vlm, stage1_steps=0, single_object_steps=0, stage2_steps=args.steps,
                                eval_every=10**6, n_eval=9, length_buckets=k),
            copy.deepcopy(lm), tower, P.tower, tok, P.seed, progress=False,
        ).curve_stage2,
        "base LM": lambda k: T.train_lm(
            dataclasses.replace(P.lm, steps=args.steps, eval_every=10**6, n_eval=9, length_buckets=k),
            tok, P.seed, progress=False,
        ).curve,
    }  # fmt: skip
    print(f"profile {args.profile}, {args.steps} steps, 1 thread, {torch.__version__}")
    print("| stage | k | ms per step (best of rounds) | vs k = 1 | final loss |")
    print("|---|---:|---:|---:|---:|")
    for stage, run in runs.items():
        best, loss = {}, {}
        for _ in range(args.rounds):
            for k in (1, 2, 3, 4):
                curve = run(k)
                best[k] = min(best.get(k, float("inf")), per_step(curve))
                loss[k] = curve[-1][1]
        for k in best:
            print(f"| {stage} | {k} | {best[k] * 1e3:.0f} | {best[1] / best[k]:.2f}x | {loss[k]:.6f} |")


if __name__ == "__main__":
    main()
