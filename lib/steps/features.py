"""Steps 2 and 3: the per-feature table (the hub every figure reads), the controlled shift, the lexical filter and
the selection flags, and the ground-truth activations.

The hub (`features`, saved as `features.parquet`): one row per (layer, variant, feature) with the weight diffs, the
activation statistics and the raw sums behind them (image and text sums of z², token counts), the image
dependence and the spatial counts of the followed variant, and every flag: `adapted` (each variant, its own pooled
percentile), `spatial`, `lexical_all`, `lexical_image`, `lexical` and `final` (the followed variant; empty for the
others). A reader can recompute any selection from this file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pandas as pd

from lib.io.cache import load_table, save_table
from lib.steps.data import data_reads
from lib.steps.distributed import RUNS_WITH, gather_table, in_group, launch
from lib.steps.registry import step
from lib.steps.saes import encoders

# The thresholds that decide the flags (chapters 4 and 5); every step whose result depends on a flag reads them.
FLAG_READS = ("diffing.variant", "diffing.eps", "diffing.q", "probing.min_odds", "probing.min_delta")
# What a run of the lexical filter reads (`run_lexical_filter`), beside what picks its candidates.
LEXICAL_READS = (*data_reads("probe"), "threads", "sae.batch_size", "probing.top_n", "probing.fire_threshold")


def run_lexical_filter(ctx, vlm, adapted, keys, reading, prompts=None, **kw):
    """lib.kernels.lexical.lexical_filter as every step runs it: the followed variant's adapted SAEs, the probe
    samples and the profile's top-n and threshold (declared in LEXICAL_READS). `prompts` default to the
    direction-free prompts of the profile's data (the paper's own on its data); `kw` go to the kernel."""
    from lib.kernels import lexical as LX
    from lib.sources import world as W

    P = ctx.P
    if prompts is None:
        prompts = LX.PAPER_GENERIC_PROMPTS if P.paper is not None else W.GENERIC_PROMPTS
    return LX.lexical_filter(
        vlm,
        encoders(adapted.saes[P.diffing.variant]),
        keys,
        ctx.data.probe,
        P.probing.top_n,
        P.probing.fire_threshold,
        prompts,
        reading,
        batch_size=P.sae.batch_size,
        **kw,
    )


def _build_with(ctx, into):
    """A distributed-capable step's build: torchrun workers when the profile asks for several processes (lib/steps/
    distributed.py), this process otherwise. Never from inside a worker (each rank would write its own artifact)."""

    def build(out):
        if in_group():
            raise RuntimeError(f"{ctx.step.name} must be built before a distributed step that follows it is launched")
        return launch(ctx, out) if ctx.P.distributed.processes > 1 else into(ctx, out)

    return build


@step(
    "feature-table",
    after=("models", "base-saes", "adapted-saes"),
    reads=(*data_reads("heldout"), "threads", "sae.batch_size", "diffing.variant"),
    runs_with=RUNS_WITH,
    version=3,  # 2: post-image image dependence; 3: the raw sums behind visual energy
)
def feature_table(ctx) -> pd.DataFrame:
    """One row per layer x variant x feature: weight diffs against the base SAE and activation statistics on the
    held-out VLM stream (lib.kernels.diffing.feature_table), plus, on the organism, the image dependence of the
    variant the book follows."""
    return load_table(ctx.cached(_build_with(ctx, feature_table_into)) / "features.parquet")


def feature_table_into(ctx, out: Path) -> None:
    """Write the feature table into `out`; in a worker of a distributed step, each rank computes the rows of its
    SAEs (lib.kernels.stats_distributed) and rank 0 writes them in the single process's order."""
    from lib.kernels import diffing

    P, vlm, D = ctx.P, ctx.up("models"), ctx.data
    base, adapted = ctx.up("base-saes"), ctx.up("adapted-saes")
    organism = D.samples is not None  # the organism's ground truth: does the activation depend on image content?
    n_ref = len(D.heldout) // 2  # the mean image comes from the other half of the held-out images
    if not in_group():
        table = diffing.feature_table(
            vlm, base.saes, adapted.saes, D.heldout, D.heldout_text, batch_size=P.sae.batch_size
        )
        if organism:
            dep = diffing.image_dependence(
                vlm,
                adapted.saes[P.diffing.variant],
                D.heldout[n_ref:],
                [D.heldout[i][0] for i in range(n_ref)],
                P.sae.batch_size,
            )
    else:
        from lib.kernels import stats_distributed as SD

        layers, variants = sorted(base.saes), list(adapted.saes)
        part = SD.feature_table_sharded(
            vlm, base.saes, adapted.saes, D.heldout, D.heldout_text, batch_size=P.sae.batch_size
        )
        table = gather_table(part, out / ".parts", [(x, v) for v in variants for x in layers], ("layer", "variant"))
        if organism:
            part = SD.image_dependence_sharded(
                vlm,
                adapted.saes[P.diffing.variant],
                D.heldout[n_ref:],
                [D.heldout[i][0] for i in range(n_ref)],
                P.sae.batch_size,
            )
            dep = gather_table(part, out / ".parts", [(x,) for x in layers], ("layer",))
        if table is None:  # not rank 0: its rows are in rank 0's table
            return
    if organism:
        dep["variant"] = P.diffing.variant
        table = table.merge(dep, on=["layer", "variant", "feature"], how="left")
    save_table(out / "features.parquet", table)


@step(
    "spatial-stats",
    after=("models", "adapted-saes"),
    reads=(*data_reads("probe"), "threads", "sae.batch_size", "diffing.variant"),
    runs_with=RUNS_WITH,
)
def spatial_stats(ctx) -> pd.DataFrame:
    """Fisher test per feature of the followed variant: firing on the text positions of spatial vs general
    questions (lib.kernels.spatial_stats)."""
    return load_table(ctx.cached(_build_with(ctx, spatial_stats_into)) / "spatial.parquet")


def spatial_stats_into(ctx, out: Path) -> None:
    """Write the spatial table into `out` (in a worker: each rank counts for its layers; rank 0 writes)."""
    from lib.kernels import spatial_stats as SS

    P, vlm, D, adapted = ctx.P, ctx.up("models"), ctx.data, ctx.up("adapted-saes")
    if not in_group():
        counts = SS.firing_counts(
            vlm, encoders(adapted.saes[P.diffing.variant]), D.probe, D.probe_spatial, P.sae.batch_size
        )
        save_table(out / "spatial.parquet", SS.spatial_table(counts))
        return
    from lib.kernels.stats_distributed import firing_counts_sharded

    saes = adapted.saes[P.diffing.variant]
    part = firing_counts_sharded(vlm, saes, D.probe, D.probe_spatial, P.sae.batch_size)
    table = gather_table(part, out / ".parts", [(x,) for x in sorted(saes)], ("layer",))
    if table is not None:
        save_table(out / "spatial.parquet", table)


def selection_table(P, features: pd.DataFrame, spatial: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """The followed variant's rows with the `adapted` and `spatial` flags the profile's thresholds give."""
    from lib.kernels.diffing import selection
    from lib.kernels.spatial_stats import select_spatial

    rows, cos_max = selection(features, P.diffing.variant, P.diffing.eps, P.diffing.q)
    rows = rows.merge(spatial, on=["layer", "feature"], how="left", validate="one_to_one")
    rows["spatial"] = select_spatial(rows, P.probing.min_odds, P.probing.min_delta)
    return rows, cos_max


class Lexical(NamedTuple):
    table: pd.DataFrame  # per candidate: layer, feature, n_top, min_best_all, lexical_all, ..., lexical
    top: pd.DataFrame  # per candidate and rank: layer, feature, rank, sample (index into Data.probe), value
    max_sp: pd.DataFrame  # per candidate, top sample and prompt, both readings: the activations the flags read


@step(
    "lexical",
    after=("models", "adapted-saes", "feature-table", "spatial-stats"),
    reads=(*LEXICAL_READS, *FLAG_READS, "probing.reading"),
)
def lexical(ctx) -> Lexical:
    """The lexical filter on the candidates (adapted and spatial): top samples by activation on their own question,
    then the question swapped for each direction-free prompt (lib.kernels.lexical)."""
    from lib.kernels.probing import feature_keys

    P, vlm, adapted = ctx.P, ctx.up("models"), ctx.up("adapted-saes")
    table, _ = selection_table(P, ctx.up("feature-table"), ctx.up("spatial-stats"))
    keys = feature_keys(table[table.adapted & table.spatial][["layer", "feature"]])

    def build(out):
        res = run_lexical_filter(ctx, vlm, adapted, keys, P.probing.reading)
        save_table(out / "lexical.parquet", res.table)
        top = [
            dict(layer=k[0], feature=k[1], rank=r, sample=int(i), value=float(v))
            for j, k in enumerate(res.top.keys)
            for r, (i, v) in enumerate(zip(res.top.index_fk[j].tolist(), res.top.value_fk[j].tolist(), strict=True))
            if i >= 0
        ]
        save_table(out / "top.parquet", pd.DataFrame(top, columns=["layer", "feature", "rank", "sample", "value"]))
        acts = [
            dict(layer=k[0], feature=k[1], reading=r, rank=s, prompt=p, max_act=float(m[s, p]))
            for r, by_key in res.max_sp.items()
            for k, m in by_key.items()
            for s in range(m.shape[0])
            for p in range(m.shape[1])
        ]
        save_table(
            out / "max_sp.parquet",
            pd.DataFrame(acts, columns=["layer", "feature", "reading", "rank", "prompt", "max_act"]),
        )

    art = ctx.cached(build)
    return Lexical(*(load_table(art / f) for f in ("lexical.parquet", "top.parquet", "max_sp.parquet")))


@step("features", after=("feature-table", "spatial-stats", "lexical"), reads=FLAG_READS)
def features(ctx) -> pd.DataFrame:
    """The hub (module docstring): every variant's rows with every flag, saved as one parquet."""
    from lib.kernels.diffing import select_adapted
    from lib.kernels.spatial_stats import final_set

    P = ctx.P
    raw, lex = ctx.up("feature-table"), ctx.up("lexical")

    def build(out):
        followed, _ = selection_table(P, raw, ctx.up("spatial-stats"))
        followed = followed.merge(
            lex.table[["layer", "feature", "lexical_all", "lexical_image", "lexical"]],
            on=["layer", "feature"],
            how="left",
        )
        followed["final"] = final_set(followed)
        others = []
        for _, rows in raw[raw.variant != P.diffing.variant].groupby("variant", sort=False):
            rows = rows.reset_index(drop=True).copy()
            rows["adapted"] = select_adapted(rows, P.diffing.eps, P.diffing.q)
            others.append(rows)
        hub = pd.concat([followed, *others], ignore_index=True)
        for flag in ("spatial", "lexical_all", "lexical_image", "lexical", "final"):
            hub[flag] = hub[flag].astype("boolean")  # <NA>: not asked (another variant, or not a candidate)
        hub = hub.sort_values(["variant", "layer", "feature"], kind="stable").reset_index(drop=True)
        save_table(out / "features.parquet", hub)

    return load_table(ctx.cached(build) / "features.parquet")


class Selection(NamedTuple):
    table: pd.DataFrame  # the followed variant's rows: adapted, spatial, lexical_all / _image, lexical, final
    cos_max: float  # the pooled decoder-cosine threshold
    lexical: Lexical


@step("selection", after=("features", "lexical"), reads=("diffing.variant", "diffing.q"), cached=False)
def selection(ctx) -> Selection:
    """The followed variant's rows of the hub, in the order of the feature table, and the cosine threshold."""
    from lib.kernels.diffing import pooled_percentile

    P, hub = ctx.P, ctx.up("features")
    table = hub[hub.variant == P.diffing.variant].sort_values(["layer", "feature"]).reset_index(drop=True)
    for flag in ("spatial", "final"):
        table[flag] = table[flag].astype(bool)
    return Selection(table, pooled_percentile(table.dec_cos, P.diffing.q), ctx.up("lexical"))


@step(
    "ground-truth-acts",
    after=("models", "adapted-saes"),
    reads=(*data_reads("ground_truth"), "threads", "sae.batch_size", "diffing.variant"),
)
def ground_truth_activations(ctx):
    """Organism only: every feature's activation on each two-object scene under the direction-free prompts (max over
    post-image positions, mean over prompts; lib.kernels.ground_truth)."""
    from lib.io.cache import load_tensors, save_tensors
    from lib.kernels import ground_truth as GT
    from lib.kernels.probing import FeatureMatrix, all_features
    from lib.sources import world as W

    P, D = ctx.P, ctx.data
    if D.samples is None:
        return None
    vlm, adapted = ctx.up("models"), ctx.up("adapted-saes")
    saes = adapted.saes[P.diffing.variant]
    keys = all_features(sorted(saes), next(iter(saes.values())).cfg.d_sae)

    def build(out):
        m = GT.feature_activations_under_prompts(
            vlm, encoders(adapted.saes[P.diffing.variant]), keys, D.ground_truth, batch_size=P.sae.batch_size
        )
        save_tensors(out / "acts.safetensors", {"acts_sf": m.acts_sf.contiguous()})

    art = ctx.cached(build)
    return FeatureMatrix(keys, load_tensors(art / "acts.safetensors")["acts_sf"], W.GENERIC_PROMPTS)


class GroundTruth(NamedTuple):
    auroc: pd.DataFrame  # every feature's AUROC per scene attribute (lib.kernels.ground_truth.auroc_table)
    check: object  # lib.kernels.ground_truth.GroundTruthCheck: the final set against random features


@step(
    "ground-truth-check",
    after=("selection", "ground-truth-acts"),
    reads=(*data_reads("ground_truth"), "seed", *FLAG_READS, "probing.n_random", "probing.min_auroc"),
    cached=False,
)
def ground_truth_check(ctx) -> GroundTruth | None:
    """Organism only: does the final set predict the true relation better than random (adapted) features (chapter 5;
    lib.kernels.ground_truth.ground_truth_check on the AUROC of every feature under the direction-free prompts)?"""
    from lib.kernels import ground_truth as GT

    acts = ctx.up("ground-truth-acts")
    if acts is None:
        return None
    P, Q = ctx.P, ctx.P.probing
    table, cos_max, _ = ctx.up("selection")
    auroc = GT.auroc_table(acts.acts_sf, GT.sample_attributes(ctx.data.samples["ground_truth"]), acts.keys)
    th = GT.Thresholds(P.diffing.eps, cos_max, Q.min_odds, Q.min_delta)
    return GroundTruth(auroc, GT.ground_truth_check(table, auroc, th, Q.n_random, P.seed, Q.min_auroc))
