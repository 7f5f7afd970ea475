"""A recipe trial for the organism (issue 20): a profile with some training settings replaced, trained through the
cache and keyed exactly as `make organism` would key it (so a trial that becomes the recipe is not trained twice),
then chapter 2's numbers for it: held-out accuracy per question type on `world.n_heldout` samples against the
targets, and each stage's loop seconds. For the VLM it adds the ground truth's view of its `where` misses: accuracy
when the queried object is alone in its row and when another object shares that row, and how many misses answer
with the cell of another object (a binding error, not a position error).

Not a test, and long: a trial trains whatever its settings change (v2's LM over 10,000 steps is about 70 minutes on
one thread here, its VLM about 90).

    .venv/bin/python bench/recipe_trial.py --set lm.steps=6000 --lm-only
    .venv/bin/python bench/recipe_trial.py --set vlm.stage2_steps=12000
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib

import pandas as pd
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

from lib.io.profiles import load_profile
from lib.sources import organism as O
from lib.steps.study import Study


def with_settings(P, settings: list[str]):
    """The profile with each `section.field=value` replaced (the value read as TOML, as the profile files are)."""
    for setting in settings:
        path, _, value = setting.partition("=")
        section, _, field = path.partition(".")
        part = getattr(P, section)
        new = tomllib.loads(f"v = {value}")["v"]
        P = dataclasses.replace(P, **{section: dataclasses.replace(part, **{field: new})})
    return P


def where_binding(vlm, tokenizer, samples) -> tuple[pd.DataFrame, int, int]:
    """The `where` questions among `samples`: accuracy by whether another object shares the queried object's row, the
    number of misses, and how many of them answer with another object's cell (each miss scored again with every
    other object's cell as its answer)."""
    samples = [s for s in samples if s.qtype == "where"]
    correct = O.vlm_correct(vlm, tokenizer, samples).tolist()
    others = [[o for o in s.scene.objects if o.shape != s.subject] for s in samples]
    target_rows = [next(o.row for o in s.scene.objects if o.shape == s.subject) for s in samples]
    shares_row = [any(o.row == r for o in os) for os, r in zip(others, target_rows, strict=True)]
    misses = [i for i, c in enumerate(correct) if not c]
    swapped = [(i, dataclasses.replace(samples[i], answer=o.where)) for i in misses for o in others[i]]
    said_other = O.vlm_correct(vlm, tokenizer, [s for _, s in swapped]).tolist() if swapped else []
    binding = {i for (i, _), hit in zip(swapped, said_other, strict=True) if hit}
    df = pd.DataFrame({"correct": correct, "shares_row": shares_row})
    table = df.groupby("shares_row").correct.agg(accuracy="mean", n="size")
    return table, len(misses), len(binding)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--lm-only", action="store_true", help="train and score the base LM alone")
    args = parser.parse_args(argv)
    P = with_settings(load_profile(args.profile), args.set)
    torch.set_num_threads(P.threads)
    S = Study(P)
    if args.lm_only:
        art = S.run("lm")
        lm = LlamaForCausalLM.from_pretrained(art / "model")
        samples = O.eval_samples(P.seed + 1, P.world.n_heldout)  # the held-out split chapter 2 scores
        table = O.evaluate_lm(lm, AutoTokenizer.from_pretrained(art / "model"), samples)
        table["target"] = [O.TARGETS["lm"][q] for q in table.qtype]
        print(table.to_string(index=False))
        return
    print(S.run("seeds-accuracy").T.to_string())
    art = S.run("vlm")
    vlm = LlavaForConditionalGeneration.from_pretrained(art / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(art / "model")
    table, n_miss, n_binding = where_binding(vlm, tokenizer, O.eval_samples(P.seed + 1, P.world.n_heldout))
    print(f"\n`where` by whether another object shares the queried object's row:\n{table.to_string()}")
    print(f"misses: {n_miss}, of which answer with another object's cell: {n_binding}")


if __name__ == "__main__":
    main()
