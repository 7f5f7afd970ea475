"""The pipeline, one function per step: profile -> world -> models -> activations -> SAEs -> feature table.

Each step names exactly the profile fields and upstream artifacts it depends on; the cache key is derived from
them (lib/cache.py), so a chapter that calls a step either reuses its artifact or rebuilds it and what follows.
Chapters call these functions; they never re-implement a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from lib.io.cache import Artifact, Cache, load_table, save_table
from lib.io.profiles import Profile, load_profile, settings
from lib.sources import world as W

# Splits of the generated world. Each is an independent random stream, so no scene is shared between splits.
CENSUS_SPLITS = {"train": tuple(W.QTYPES), "heldout": tuple(W.QTYPES), "bench": ("statement",)}


def world_settings(P: Profile) -> dict:
    return {"seed": P.seed, "world": settings(P.world)}


def _pixels_agree(sample: W.Sample) -> bool:
    """Every object's colour is at the centre of its box in the rendered image, and nothing else is drawn."""
    img = sample.scene.render()
    for o in sample.scene.objects:
        x0, y0, x1, y1 = o.box
        if tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) != W.COLORS[o.color]:
            return False
    drawn = (img != np.array(W.BACKGROUND, dtype=np.uint8)).any(-1)
    inside = np.zeros_like(drawn)
    for o in sample.scene.objects:
        x0, y0, x1, y1 = o.box
        inside[y0 : y1 + 1, x0 : x1 + 1] = True
    return not (drawn & ~inside).any()


def world_census(P: Profile, cache: Cache) -> tuple[pd.DataFrame, Artifact]:
    """Regenerate `n_census` samples of every split and check each against its scene's ground truth."""

    def build(out):
        rows = []
        for split, qtypes in CENSUS_SPLITS.items():
            for s in W.make_samples(P.seed, split, P.world.n_census, qtypes, P.world.cell_px, P.world.n_objects):
                rows.append(
                    dict(
                        split=split,
                        index=s.index,
                        qtype=s.qtype,
                        family=s.family,
                        question=s.question,
                        answer=s.answer,
                        keyword_spatial=s.spatial,
                        relation=s.relation,
                        n_objects=len(s.scene.objects),
                        answer_consistent=W.check_answer(s),
                        pixels_consistent=_pixels_agree(s),
                    )
                )
        save_table(out / "census.parquet", pd.DataFrame(rows))

    art = cache.get("world-census", world_settings(P), build, version=1)
    return load_table(art / "census.parquet"), art


# ---------------------------------------------------------------------------------------------------------------
# The organism: base LM and vision tower trained independently, the VLM from both. Three artifacts, so that a
# change to the VLM's settings retrains the VLM only, and a change to the LM's retrains the LM and the VLM.


class OrganismModels(NamedTuple):
    tokenizer: object
    lm: object  # LlamaForCausalLM, the base LM (before fine-tuning)
    vlm: object  # LlavaForConditionalGeneration (after)
    artifacts: dict[str, Artifact]


def _organism_settings(P: Profile, section: str) -> dict:
    # Not the [world] section: the organism generates its own training streams at the world's fixed 48 px size
    # (lib/profiles.py checks the profile agrees), so e.g. a larger census must not retrain the models.
    return {"seed": P.seed, "threads": P.threads, section: settings(getattr(P, section))}


def _save_model(out, model, tokenizer=None) -> None:
    # HF records the directory a model was loaded from; a cache path says nothing and differs between machines.
    for config in (
        model.config,
        getattr(model.config, "text_config", None),
        getattr(model.config, "vision_config", None),
    ):
        if config is not None:
            config._name_or_path = ""
    model.save_pretrained(out / "model")  # safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "model")


def base_lm(P: Profile, cache: Cache) -> Artifact:
    from lib.sources import organism as O

    def build(out):
        torch.set_num_threads(P.threads)
        tokenizer = O.build_tokenizer()
        res = O.train_lm(P.lm, tokenizer, P.seed)
        _save_model(out, res.model, tokenizer)
        save_table(out / "accuracy.parquet", res.accuracy)
        return {"history": res.history, "curve": res.curve}

    return cache.get("lm", _organism_settings(P, "lm"), build, version=2)


def vision_tower(P: Profile, cache: Cache) -> Artifact:
    from lib.sources import organism as O

    def build(out):
        torch.set_num_threads(P.threads)
        res = O.train_tower(P.tower, P.seed)
        _save_model(out, res.model)  # the per-patch probes trained with it are not part of the tower
        return {"accuracy": res.accuracy, "curve": res.curve}

    return cache.get("tower", _organism_settings(P, "tower"), build, version=2)


def vlm(P: Profile, cache: Cache, lm_art: Artifact | None = None, tower_art: Artifact | None = None) -> Artifact:
    """The VLM, fine-tuned from the base LM with the frozen tower (either artifact is looked up if not given)."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    from lib.sources import organism as O

    lm_art = lm_art or base_lm(P, cache)
    tower_art = tower_art or vision_tower(P, cache)
    settings_ = {**_organism_settings(P, "vlm"), "tower": settings(P.tower)}  # the VLM reads the tower's layout
    version = 3  # 3: fresh scenes every step
    # Resumable: a killed build restarts from its checkpoint in the cache directory (stage 2 is hours on a CPU).
    checkpoint = cache.checkpoint("vlm", settings_, deps=[lm_art, tower_art], version=version)

    def build(out):
        torch.set_num_threads(P.threads)
        tokenizer = AutoTokenizer.from_pretrained(lm_art / "model")
        lm = LlamaForCausalLM.from_pretrained(lm_art / "model")
        tower = CLIPVisionModel.from_pretrained(tower_art / "model")
        res = O.train_vlm(P.vlm, lm, tower, P.tower, tokenizer, P.seed, checkpoint=checkpoint)
        _save_model(out, res.model, tokenizer)
        save_table(out / "accuracy.parquet", res.accuracy)
        save_table(out / "accuracy_mean_image.parquet", res.accuracy_mean_image)
        checkpoint.unlink(missing_ok=True)
        return {"history": res.history, "curve_stage1": res.curve_stage1, "curve_stage2": res.curve_stage2}

    return cache.get("vlm", settings_, build, deps=[lm_art, tower_art], version=version)


def organism(P: Profile, cache: Cache) -> OrganismModels:
    """The trained pair, loaded from the cache (trained first if needed)."""
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    arts = {"lm": base_lm(P, cache), "tower": vision_tower(P, cache)}
    arts["vlm"] = vlm(P, cache, arts["lm"], arts["tower"])
    tokenizer = AutoTokenizer.from_pretrained(arts["vlm"] / "model")
    lm = LlamaForCausalLM.from_pretrained(arts["lm"] / "model").eval()
    model = LlavaForConditionalGeneration.from_pretrained(arts["vlm"] / "model").eval()
    return OrganismModels(tokenizer, lm, model, arts)


def heldout_accuracy(P: Profile, cache: Cache, m: OrganismModels) -> pd.DataFrame:
    """Held-out accuracy per question type on `world.n_heldout` samples (the training runs' own tables score 100 per
    type, too few to tell 0.93 from 0.95): base LM on captions, VLM on images and with the mean image embedding."""
    from lib.sources import organism as O

    def build(out):
        torch.set_num_threads(P.threads)
        samples = O.eval_samples(P.seed + 1, P.world.n_heldout)  # the training runs' held-out split, extended
        lm = O.evaluate_lm(m.lm, m.tokenizer, samples)
        tables = {
            "lm_text": lm,
            "vlm_image": O.evaluate_vlm(m.vlm, m.tokenizer, samples),
            "vlm_mean_image": O.evaluate_vlm(m.vlm, m.tokenizer, samples, corrupt="mean_image"),
        }
        table = lm[["qtype", "family", "n", "majority"]].copy()
        for name, t in tables.items():
            table[name] = t.set_index("qtype").accuracy.reindex(table.qtype).to_numpy()
        save_table(out / "table.parquet", table)

    settings_ = {"seed": P.seed, "threads": P.threads, "n_heldout": P.world.n_heldout}
    art = cache.get("heldout_accuracy", settings_, build, deps=list(m.artifacts.values()), version=1)
    return load_table(art / "table.parquet")


# ---------------------------------------------------------------------------------------------------------------
# From here on every step reads the models through one adapter bundle (lib.adapter.VLM) and the data through one
# `Data`, so the organism and the paper's models take the same code path.


def models(P: Profile, cache: Cache):
    """The VLM bundle of a profile: the organism (trained or reused) or the paper's LLaVA-MORE + Llama-3.1."""
    from lib.kernels.adapter import VLM

    if P.paper is not None:
        from lib.sources.paper import load_paper_vlm

        # The generation prompt (assistant header) ends every prompt, so the last position is where the answer is
        # formed: the statement benchmark reads its next-token logits there.
        return load_paper_vlm(
            P.paper.vlm,
            P.paper.llm,
            P.paper.vision_tower,
            dtype=getattr(torch, P.paper.dtype),
            add_generation_prompt=True,
        )
    from lib.sources import organism as O
    from lib.sources.tokenizer import BOS, IMAGE

    # Every later step runs the organism on the profile's thread count, including steps whose cached inputs were
    # reused (torch's default of one thread per core spins when another process holds a core: a feature table took
    # 356 s instead of 4.5 s that way).
    torch.set_num_threads(P.threads)
    m = organism(P, cache)
    return VLM(
        model=m.vlm,
        tokenizer=m.tokenizer,
        preprocess=lambda images: O.pixel_values_from_images(np.stack([np.asarray(im) for im in images])),
        prompt=lambda q: f"{BOS} {W.vlm_prompt(q)}",
        image_placeholder=IMAGE,
        base_lm=m.lm,
        lm_prompt=lambda c, q: f"{BOS} {W.lm_prompt(c, q)}",
    )


def models_key(P: Profile, cache: Cache) -> list[Artifact]:
    """The artifacts the models come from (deps of every later step): the organism's, or none for the paper's
    (their identifiers are in the profile's settings)."""
    if P.paper is not None:
        return []
    a = {"lm": base_lm(P, cache), "tower": vision_tower(P, cache)}
    return [a["lm"], a["tower"], vlm(P, cache, a["lm"], a["tower"])]


class LazyPairs(Sequence):
    """A sequence read lazily by index (e.g. (image, text) pairs of world scenes rendered when indexed, or of
    dataset rows)."""

    def __init__(self, n: int, get):
        self.n, self.get = n, get

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.get(i % self.n)


def world_pairs(samples: list[W.Sample]) -> LazyPairs:
    return LazyPairs(len(samples), lambda i: (samples[i].scene.render(), samples[i].question))


class Data(NamedTuple):
    """The data of steps 1-4. `samples` holds the organism's ground truth (None for the paper's data)."""

    adapt: Sequence  # (image, question): SAE adaptation, one pass
    heldout: Sequence  # (image, question): every held-out metric
    text: Sequence | None  # (caption, question): the base SAEs' training stream (organism only)
    heldout_text: Sequence | None  # (caption, question) of the held-out images: the text-only reference stream
    probe: object  # probing.SampleSet: questions counted for the spatial vs general split
    probe_spatial: np.ndarray  # bool per probe question: the keyword split
    ground_truth: object | None  # probing.SampleSet of two-object scenes (organism only)
    statements: list  # attribution.Statement: the true/false benchmark (VSR for the paper)
    controls: list  # attribution.Choice: the non-spatial control task (organism only)
    samples: dict[str, list[W.Sample]] | None


def data(P: Profile) -> Data:
    from lib.kernels.attribution import choices_from_samples, statements_from_samples
    from lib.kernels.probing import SampleSet

    if P.paper is not None:
        from lib.sources.paper import paper_data

        return paper_data(P)
    mk = lambda split, n, qtypes=tuple(W.QTYPES), n_objects=P.world.n_objects: W.make_samples(  # noqa: E731
        P.seed, split, n, qtypes, P.world.cell_px, n_objects
    )
    S, Q = P.sae, P.probing
    samples = {
        "adapt": mk("adapt", S.adapt_pairs),
        "heldout": mk("heldout", S.heldout_pairs),
        "text": mk("sae-text", S.base_pairs),
        "probe": mk("probe", Q.n_questions),
        # Relations are defined between two objects: the ground-truth check uses two-object scenes.
        "ground_truth": mk("ground-truth", Q.n_ground_truth, n_objects=(2,)),
        "statements": mk("bench", P.attribution.n_statements, ("statement",)),
        "controls": mk("control", P.attribution.n_controls, ("color", "shape")),
    }
    text_pairs = lambda ss: LazyPairs(len(ss), lambda i: (ss[i].scene.caption(), ss[i].question))  # noqa: E731
    return Data(
        adapt=world_pairs(samples["adapt"]),
        heldout=world_pairs(samples["heldout"]),
        text=text_pairs(samples["text"]),
        heldout_text=text_pairs(samples["heldout"]),
        probe=SampleSet.from_world(samples["probe"]),
        probe_spatial=np.array([s.spatial for s in samples["probe"]]),
        ground_truth=SampleSet.from_world(samples["ground_truth"]),
        statements=statements_from_samples(samples["statements"]),
        controls=choices_from_samples(samples["controls"]),
        samples=samples,
    )


def _analysis_settings(P: Profile, *sections: str) -> dict:
    out = {
        "seed": P.seed,
        "world": settings(P.world) if P.world else None,
        "paper": settings(P.paper) if P.paper else None,
    }
    return {**out, **{s: settings(getattr(P, s)) for s in sections}}


def sae_layers(P: Profile, vlm) -> list[int]:
    return list(P.sae.layers) or list(range(vlm.n_layers))


# ---------------------------------------------------------------------------------------------------------------
# Step 1: base SAEs and their adaptation


class BaseSAEs(NamedTuple):
    saes: dict  # layer -> SAELens SAE
    report: pd.DataFrame | None  # per layer: d_sae, k, fvu, nmse, dead_frac, n_tokens (organism)
    history: pd.DataFrame | None
    artifact: Artifact | None


def base_saes(P: Profile, cache: Cache, vlm, D: Data) -> BaseSAEs:
    """Organism: one TopK SAE per layer trained on the base LM's text stream. Paper: Llama Scope as TopK k."""
    from lib.kernels.adaptation import train_base_saes
    from lib.kernels.sae import SAESpec, TrainConfig, load_saes

    layers = sae_layers(P, vlm)
    if P.paper is not None:
        from lib.sources.paper import load_llama_scope_topk

        device = str(next(vlm.model.parameters()).device)
        saes = {
            layer: load_llama_scope_topk(layer, P.paper.topk, device, P.paper.sae_release, P.paper.sae_id)
            for layer in layers
        }
        return BaseSAEs(saes, None, None, None)
    spec = SAESpec(vlm.d_model, P.sae.expansion * vlm.d_model, P.sae.k)

    def build(out):
        res = train_base_saes(
            vlm,
            D.text,
            D.heldout_text,
            spec,
            TrainConfig(lr=P.sae.base_lr, num_threads=P.threads),
            layers,
            P.seed,
            batch_size=P.sae.base_batch_size,
            eval_every=max(1, len(D.text) // P.sae.base_batch_size // 10),
        )
        res.bank.save_saes(out / "saes")
        save_table(out / "report.parquet", res.report)
        save_table(out / "history.parquet", res.history)

    art = cache.get("base-saes", _analysis_settings(P, "sae"), build, deps=models_key(P, cache), version=1)
    return BaseSAEs(
        load_saes(art / "saes", layers, "base"),
        load_table(art / "report.parquet"),
        load_table(art / "history.parquet"),
        art,
    )


def base_sae_sweep(P: Profile, cache: Cache, vlm, D: Data) -> pd.DataFrame | None:
    """Organism only: base SAEs for every expansion x k of the profile's sweep, on the first `sweep_pairs` text
    pairs; per layer FVU and dead fraction on the held-out text stream (what the profile's choice is read from)."""
    from lib.kernels.adaptation import base_sae_sweep as sweep
    from lib.kernels.sae import SAESpec, TrainConfig

    if P.paper is not None:
        return None
    n = min(P.sae.sweep_pairs, len(D.text))

    def build(out):
        specs = [
            SAESpec(vlm.d_model, int(e) * vlm.d_model, int(k))
            for e in P.sae.sweep_expansion
            for k in P.sae.sweep_k
            if k <= e * vlm.d_model
        ]
        table = sweep(
            vlm,
            D.text[:n],
            D.heldout_text,
            specs,
            TrainConfig(lr=P.sae.base_lr, num_threads=P.threads),
            sae_layers(P, vlm),
            P.seed,
            batch_size=P.sae.base_batch_size,
        )
        table.insert(2, "expansion", table.d_sae // vlm.d_model)
        save_table(out / "sweep.parquet", table)

    art = cache.get("base-sae-sweep", _analysis_settings(P, "sae"), build, deps=models_key(P, cache), version=1)
    return load_table(art / "sweep.parquet")


class Adapted(NamedTuple):
    saes: dict  # variant -> layer -> SAELens SAE
    bank: object  # the same SAEs as one lib.sae.SAEBank (evaluation in one pass)
    history: pd.DataFrame
    epoch_log: pd.DataFrame
    artifact: Artifact


def adapted_saes(P: Profile, cache: Cache, vlm, D: Data, base: BaseSAEs) -> Adapted:
    """Every layer's base SAE fine-tuned on the VLM stream in the four variants, one pass, one forward per batch
    for all layers and variants. Resumable: a killed build restarts from its checkpoint in the cache directory."""
    from lib.kernels.adaptation import adapt_saes
    from lib.kernels.sae import ADAPTATION_VARIANTS, SAEBank, SAESpec, TrainConfig, load_saes

    layers = sae_layers(P, vlm)
    any_sae = base.saes[layers[0]]
    spec = SAESpec(any_sae.cfg.d_in, any_sae.cfg.d_sae, int(any_sae.cfg.k), bool(any_sae.cfg.apply_b_dec_to_input))
    deps = models_key(P, cache) + ([base.artifact] if base.artifact else [])
    settings_ = _analysis_settings(P, "sae")
    # version 2: fresh variants no longer repeat the base SAEs' initial draw (lib.adaptation.FRESH_SEED_OFFSET)
    version = 2
    checkpoint = cache.checkpoint("adapted-saes", settings_, deps=deps, version=version)

    def build(out):
        res = adapt_saes(
            vlm,
            base.saes,
            D.adapt,
            D.heldout,
            spec,
            TrainConfig(lr=P.sae.lr, num_threads=P.threads),
            layers,
            P.seed,
            P.sae.eval_every,
            checkpoint,
            batch_size=P.sae.batch_size,
        )
        res.bank.save_saes(out / "saes")
        save_table(out / "history.parquet", res.history)
        save_table(out / "epoch_log.parquet", res.epoch_log)
        checkpoint.unlink(missing_ok=True)
        return {"forwards_per_epoch": res.forwards_per_epoch}

    art = cache.get("adapted-saes", settings_, build, deps=deps, version=version)
    saes = {v.name: load_saes(art / "saes", layers, v.name) for v in ADAPTATION_VARIANTS}
    return Adapted(
        saes,
        SAEBank.from_saes(saes),
        load_table(art / "history.parquet"),
        load_table(art / "epoch_log.parquet"),
        art,
    )


def reconstruction(P: Profile, cache: Cache, vlm, D: Data, base: BaseSAEs, adapted: Adapted) -> pd.DataFrame:
    """Held-out FVU / normalised MSE by token split: base vs each variant, on the VLM and the LM text streams."""
    from lib.kernels.adaptation import reconstruction_table

    def build(out):
        table = reconstruction_table(
            vlm, base.saes, adapted.bank, D.heldout, D.heldout_text, batch_size=P.sae.batch_size
        )
        save_table(out / "table.parquet", table)

    art = cache.get("reconstruction", _analysis_settings(P, "sae"), build, deps=[adapted.artifact], version=1)
    return load_table(art / "table.parquet")


# ---------------------------------------------------------------------------------------------------------------
# Step 2: the per-feature table


def feature_table(P: Profile, cache: Cache, vlm, D: Data, base: BaseSAEs, adapted: Adapted) -> pd.DataFrame:
    """One row per layer x variant x feature: weight diffs against the base SAE and activation statistics on the
    held-out VLM stream (lib.diffing.feature_table), plus, on the organism, the image dependence of the variant
    the book follows. The selection flags are added by the chapters from the profile's thresholds."""
    from lib.kernels import diffing

    def build(out):
        table = diffing.feature_table(
            vlm, base.saes, adapted.saes, D.heldout, D.heldout_text, batch_size=P.sae.batch_size
        )
        if D.samples is not None:  # the organism's ground truth: does the activation depend on image content?
            n_ref = len(D.heldout) // 2  # the mean image comes from the other half of the held-out images
            dep = diffing.image_dependence(
                vlm,
                adapted.saes[P.diffing.variant],
                D.heldout[n_ref:],
                [D.heldout[i][0] for i in range(n_ref)],
                P.sae.batch_size,
            )
            dep["variant"] = P.diffing.variant
            table = table.merge(dep, on=["layer", "variant", "feature"], how="left")
        save_table(out / "features.parquet", table)

    settings_ = {**_analysis_settings(P, "sae"), "variant": P.diffing.variant}
    art = cache.get("feature-table", settings_, build, deps=[adapted.artifact], version=2)  # 2: post-image dependence
    return load_table(art / "features.parquet")


# ---------------------------------------------------------------------------------------------------------------
# Step 3: spatial probing


def _encoders(adapted: Adapted, variant: str) -> dict:
    return {layer: sae.encode for layer, sae in adapted.saes[variant].items()}


def spatial_stats(P: Profile, cache: Cache, vlm, D: Data, adapted: Adapted) -> pd.DataFrame:
    """Fisher test per feature of the followed variant: firing on the text positions of spatial vs general
    questions (lib.probing.firing_counts / spatial_table)."""
    from lib.kernels import probing

    variant = P.diffing.variant

    def build(out):
        counts = probing.firing_counts(vlm, _encoders(adapted, variant), D.probe, D.probe_spatial, P.sae.batch_size)
        save_table(out / "spatial.parquet", probing.spatial_table(counts))

    settings_ = {**_analysis_settings(P, "sae"), "variant": variant, "n_questions": P.probing.n_questions}
    art = cache.get("spatial-stats", settings_, build, deps=[adapted.artifact], version=1)
    return load_table(art / "spatial.parquet")


def selection_table(P: Profile, features: pd.DataFrame, spatial: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """The followed variant's rows with the `adapted` and `spatial` flags the profile's thresholds give."""
    from lib.kernels.diffing import selection
    from lib.kernels.probing import select_spatial

    rows, cos_max = selection(features, P.diffing.variant, P.diffing.eps, P.diffing.q)
    rows = rows.merge(spatial, on=["layer", "feature"], how="left", validate="one_to_one")
    rows["spatial"] = select_spatial(rows, P.probing.min_odds, P.probing.min_delta)
    return rows, cos_max


class Lexical(NamedTuple):
    table: pd.DataFrame  # per candidate: layer, feature, n_top, min_best_all, lexical_all, ..., lexical
    top: pd.DataFrame  # per candidate and rank: layer, feature, rank, sample (index into Data.probe), value
    max_sp: pd.DataFrame  # per candidate, top sample and prompt, both readings: the activations the flags read


def lexical(P: Profile, cache: Cache, vlm, D: Data, adapted: Adapted, candidates: pd.DataFrame) -> Lexical:
    """The lexical filter on the candidates (adapted and spatial): top samples by activation on their own question,
    then the question swapped for each direction-free prompt (lib.probing.lexical_filter)."""
    from lib.kernels import probing
    from lib.sources import world as W_

    prompts = probing.PAPER_GENERIC_PROMPTS if P.paper is not None else W_.GENERIC_PROMPTS
    keys = probing.feature_keys(candidates)

    def build(out):
        res = probing.lexical_filter(
            vlm,
            _encoders(adapted, P.diffing.variant),
            keys,
            D.probe,
            P.probing.top_n,
            P.probing.fire_threshold,
            prompts,
            P.probing.reading,
            batch_size=P.sae.batch_size,
        )
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

    settings_ = {**_analysis_settings(P, "sae", "probing"), "variant": P.diffing.variant, "candidates": keys}
    art = cache.get("lexical", settings_, build, deps=[adapted.artifact], version=1)
    return Lexical(*(load_table(art / f) for f in ("lexical.parquet", "top.parquet", "max_sp.parquet")))


class Selection(NamedTuple):
    table: pd.DataFrame  # the followed variant's rows: adapted, spatial, lexical_all / _image, lexical, final
    cos_max: float  # the pooled decoder-cosine threshold
    lexical: Lexical


def spatial_selection(P: Profile, cache: Cache, vlm, D: Data, adapted: Adapted, features: pd.DataFrame) -> Selection:
    """Adapted, spatial, lexical and final flags of every feature of the followed variant (chapters 5 and 6)."""
    from lib.kernels.probing import final_set

    spatial = spatial_stats(P, cache, vlm, D, adapted)
    table, cos_max = selection_table(P, features, spatial)
    candidates = table[table.adapted & table.spatial][["layer", "feature"]]
    lex = lexical(P, cache, vlm, D, adapted, candidates)
    table = table.merge(
        lex.table[["layer", "feature", "lexical_all", "lexical_image", "lexical"]], on=["layer", "feature"], how="left"
    )
    table["final"] = final_set(table)
    return Selection(table, cos_max, lex)


def ground_truth_activations(P: Profile, cache: Cache, vlm, D: Data, adapted: Adapted):
    """Organism only: every feature's activation on each two-object scene under the direction-free prompts (max over
    post-image positions, mean over prompts; lib.probing.feature_activations_under_prompts)."""
    from lib.io.cache import load_tensors, save_tensors
    from lib.kernels import probing

    if D.ground_truth is None:
        return None
    saes = adapted.saes[P.diffing.variant]
    keys = probing.all_features(sorted(saes), next(iter(saes.values())).cfg.d_sae)

    def build(out):
        m = probing.feature_activations_under_prompts(
            vlm, _encoders(adapted, P.diffing.variant), keys, D.ground_truth, batch_size=P.sae.batch_size
        )
        save_tensors(out / "acts.safetensors", {"acts_sf": m.acts_sf.contiguous()})

    settings_ = {**_analysis_settings(P, "sae"), "variant": P.diffing.variant, "n": P.probing.n_ground_truth}
    art = cache.get("ground-truth-acts", settings_, build, deps=[adapted.artifact], version=1)
    return probing.FeatureMatrix(keys, load_tensors(art / "acts.safetensors")["acts_sf"], W.GENERIC_PROMPTS)


# ---------------------------------------------------------------------------------------------------------------
# Step 4: attribution to heads, its validation, causal checks


def features_of(adapted: Adapted, variant: str, keys) -> list:
    """lib.attribution.Feature for each (layer, feature): the decoder row of the adapted SAE (layer 0 has no head
    below it and is left out)."""
    from lib.kernels.attribution import Feature
    from lib.kernels.probing import feature_keys

    saes = adapted.saes[variant]
    keys = feature_keys(keys)
    return [
        Feature(int(layer), saes[int(layer)].W_dec[int(f)].detach().float(), f"L{int(layer)}F{int(f)}")
        for layer, f in keys
        if int(layer) >= 1
    ]


def mean_image(P: Profile, vlm, D: Data):
    """The corrupted run's image embedding: the mean projected image token over held-out images (never the images
    being corrupted: attribution runs on the statement benchmark)."""
    from lib.kernels.attribution import mean_image_embedding

    n = min(len(D.heldout), 256)
    return mean_image_embedding(vlm, [D.heldout[i][0] for i in range(n)], P.attribution.batch_size)


class HeadScores(NamedTuple):
    table: pd.DataFrame  # per feature x layer x head: attr_clean, attr_corrupt, exhaustive (the paper's score), *_total
    timing: dict  # wall seconds of attribution (both gradients) and of exhaustive patching, forwards counted


def head_scores(P: Profile, cache: Cache, vlm, D: Data, adapted: Adapted, final: pd.DataFrame) -> HeadScores:
    """Attribution patching (gradient at the clean and at the corrupted run) and exhaustive activation patching
    (one forward per head and per head x post-image position) of every final feature, on the first `n_samples`
    statements. Scores are means over samples; NaN at layers >= the feature's."""
    import time

    from lib.kernels import attribution as AT
    from lib.kernels.adapter import iter_batches

    feats = features_of(adapted, P.diffing.variant, final)
    A_ = P.attribution
    items = D.statements[: A_.n_samples]
    images, questions = [s.image for s in items], [s.question for s in items]

    def build(out):
        mean_d = mean_image(P, vlm, D)
        sums: dict[str, torch.Tensor] = {}
        timing = {"attribution_s": 0.0, "exhaustive_s": 0.0, "n_samples": len(items)}

        def add(name, t_flh):
            sums[name] = t_flh if name not in sums else sums[name] + t_flh

        for batch in iter_batches(vlm, images, questions, A_.batch_size):
            t = time.perf_counter()
            for grad_at in ("clean", "corrupt"):
                eff = AT.attribute(vlm, batch, feats, mean_d, gradient_at=grad_at)
                add(f"attr_{grad_at}", torch.stack([e.score_blh.double().sum(0) for e in eff]))
                add(f"attr_{grad_at}_total", torch.stack([e.total_blh.double().sum(0) for e in eff]))
                if grad_at == "clean":
                    add("resid_attr", torch.stack([e.resid_score_bl.double().sum(0) for e in eff]))
            timing["attribution_s"] += time.perf_counter() - t
            t = time.perf_counter()
            eff = AT.activation_patching(vlm, batch, feats, mean_d, per_position=True)
            add("exhaustive", torch.stack([e.score_blh.double().sum(0) for e in eff]))
            add("exhaustive_total", torch.stack([e.total_blh.double().sum(0) for e in eff]))
            timing["exhaustive_s"] += time.perf_counter() - t
        rows = []
        n = len(items)
        for fi, f in enumerate(feats):
            for layer in range(f.layer):
                for head in range(vlm.n_heads):
                    row = dict(feature=f.name, feature_layer=f.layer, layer=layer, head=head)
                    row.update({k: float(v[fi, layer, head]) / n for k, v in sums.items() if k != "resid_attr"})
                    rows.append(row)
        save_table(out / "heads.parquet", pd.DataFrame(rows))
        resid = [
            dict(feature=f.name, feature_layer=f.layer, layer=layer, score=float(sums["resid_attr"][fi, layer]) / n)
            for fi, f in enumerate(feats)
            for layer in range(f.layer)
        ]
        save_table(out / "resid.parquet", pd.DataFrame(resid))
        return timing

    settings_ = {
        **_analysis_settings(P, "sae", "diffing", "probing", "attribution"),
        "features": [f.name for f in feats],
    }
    art = cache.get("head-scores", settings_, build, deps=[adapted.artifact], version=1)
    from lib.io.cache import load_json

    table = load_table(art / "heads.parquet")
    return HeadScores(table, {**load_json(art / "info.json"), "resid": load_table(art / "resid.parquet")})


def answer_words(P: Profile) -> tuple[str, str]:
    return ("Yes", "No") if P.paper is not None else ("yes", "no")


def causal_table(
    P: Profile, cache: Cache, vlm, D: Data, adapted: Adapted, final: pd.DataFrame, heads: list, random_keys: list
) -> pd.DataFrame:
    """The ablation table (lib.attribution.causal_checks) on the statement benchmark and the control task."""
    from lib.kernels import attribution as AT
    from lib.kernels.adapter import iter_batches

    A_ = P.attribution
    feats = features_of(adapted, P.diffing.variant, final)
    random_feats = features_of(adapted, P.diffing.variant, random_keys)
    yes, no = answer_words(P)

    def build(out):
        ref = [D.heldout[i] for i in range(min(len(D.heldout), 256))]
        z_mean = AT.mean_z(vlm, iter_batches(vlm, [r[0] for r in ref], [r[1] for r in ref], A_.batch_size))
        # Control answers are scored among every colour and shape word (the organism's control task).
        candidates = {w: AT.single_token_id(vlm.tokenizer, w) for w in [*W.COLORS, *W.SHAPES]} if D.controls else None
        table = AT.causal_checks(
            vlm,
            D.statements,
            yes_id=AT.single_token_id(vlm.tokenizer, yes),
            no_id=AT.single_token_id(vlm.tokenizer, no),
            heads=heads,
            z_mean_lhk=z_mean,
            features=feats,
            random_features=random_feats,
            controls=D.controls,
            candidate_ids=candidates,
            n_random=A_.n_random,
            seed=P.seed,
            batch_size=A_.batch_size,
        )
        save_table(out / "causal.parquet", table)

    settings_ = {
        **_analysis_settings(P, "sae", "diffing", "probing", "attribution"),
        "heads": [list(h) for h in heads],
        "features": [f.name for f in feats],
        "random_features": [f.name for f in random_feats],
    }
    art = cache.get("causal-checks", settings_, build, deps=[adapted.artifact], version=1)
    return load_table(art / "causal.parquet")


# ---------------------------------------------------------------------------------------------------------------
# `make organism`: train the organism of a profile on this CPU and commit it as versioned artifacts.

ORGANISM_STEPS = ("lm", "tower", "vlm")


def export_organism(profile: str, store: Path, verify: bool = False) -> int:
    """Train (or reuse from the local cache) the organism of `profile` and copy its three artifacts into `store`
    with a PROVENANCE.json (command, seed, threads, code commit, versions, checksums). With `verify`, retrain from
    scratch in a cache of its own instead and compare every file's checksum with the committed artifacts. Both are
    resumable: a finished step is kept in its cache and the VLM's stage 2 checkpoints, so a killed run restarted
    with the same command goes on where it stopped (the verification cache is removed once it has passed)."""
    import json
    import platform
    import shutil
    import subprocess
    import sys

    import transformers

    from lib.io.cache import MANIFEST, load_json

    P = load_profile(profile)
    if P.lm is None:
        raise SystemExit(f"profile {profile!r} has no organism ([lm], [tower], [vlm] sections)")
    if verify:
        scratch = Cache(stores=()).root.parent / f"verify-{profile}"  # beside the local cache, never the store
        arts = organism(P, Cache(scratch, stores=())).artifacts
        bad = []
        for name in ORGANISM_STEPS:
            ours, committed = load_json(arts[name] / MANIFEST), store / arts[name].path.name / MANIFEST
            if not committed.exists():
                bad.append(f"{name}: no committed artifact {committed.parent} (settings or code changed?)")
                continue
            theirs = load_json(committed)["files"]
            # Weights and result tables must be equal bit for bit; info.json holds wall-clock times.
            differ = [f for f, meta in ours["files"].items() if f != "info.json" and theirs.get(f) != meta]
            if differ:
                bad.append(f"{name}: retrained {', '.join(differ)} differ from {committed.parent}")
        print("\n".join(bad) or f"organism of {profile!r}: retrained bit for bit equal to {store}/")
        if not bad:
            shutil.rmtree(scratch)
        return 1 if bad else 0
    arts = organism(P, Cache(stores=())).artifacts
    store.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "lib"], capture_output=True, text=True).stdout)
    provenance = {}
    for name in ORGANISM_STEPS:
        target = store / arts[name].path.name
        if not target.exists():
            shutil.copytree(arts[name].path, target)
        manifest = load_json(target / MANIFEST)
        provenance[name] = {
            "artifact": target.name,
            "key": arts[name].key,
            "build_s": manifest["build_s"],
            "files": manifest["files"],
        }
    provenance["made_by"] = {
        "command": " ".join([Path(sys.executable).name, "-m", "lib.steps.pipeline", *sys.argv[1:]]),
        "profile": profile,
        "seed": P.seed,
        "threads": P.threads,
        "code_commit": commit + (" (lib/ had uncommitted changes)" if dirty else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
    }
    (store / f"PROVENANCE-{profile}.json").write_text(json.dumps(provenance, indent=1, sort_keys=True))
    print(
        f"organism of {profile!r} exported to {store}/ ({', '.join(provenance[n]['artifact'] for n in ORGANISM_STEPS)})"
    )
    return 0


if __name__ == "__main__":
    import argparse

    from lib.io.cache import COMMITTED

    parser = argparse.ArgumentParser(
        prog="python -m lib.steps.pipeline", description="Build and export pipeline steps."
    )
    parser.add_argument("step", choices=["organism"])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--store", type=Path, default=COMMITTED)
    parser.add_argument("--verify", action="store_true", help="retrain from scratch and compare with the store")
    args = parser.parse_args()
    raise SystemExit(export_organism(args.profile, args.store, args.verify))
