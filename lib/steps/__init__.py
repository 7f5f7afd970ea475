"""The cached steps of the pipeline (each declared once, lib/steps/registry.py) and the entry point chapters use
(`lib.steps.study.Study`). Importing this package registers every step, module by module in the order of the book
(a step may only follow steps declared before it)."""

import importlib

STEP_MODULES = (
    "organism",  # world census, lm, tower, vlm, organism, held-out accuracy
    "data",  # models
    "saes",  # base SAEs, their sweep, adapted SAEs, reconstruction
    "features",  # feature table, spatial stats, lexical, the hub, selection, ground-truth activations
    "heads",  # head scores, causal checks
    "referee",  # chapter 7: truth probes, truth scores, the reference set, the referee
    "referee_heads",  # chapter 7: the head sweep, random head sets, sufficiency, counterfactual attribution, steering
    "referee_lexical",  # chapter 7: the lexical test in the organism's words, counterfactual twins, emergence
    "seeds",  # chapters 2 to 7: each chapter's findings on one seed, for the summary across seeds
)
for _module in STEP_MODULES:
    importlib.import_module(f"lib.steps.{_module}")
