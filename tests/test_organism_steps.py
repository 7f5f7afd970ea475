"""The organism's cached steps on the tiny profile (lib/steps/organism.py): each is reused until a setting it
depends on changes; export and verification; the data the analysis steps read."""

from dataclasses import replace

import torch

from lib.io.cache import Cache
from lib.io.profiles import load_profile
from lib.steps.export import export_organism
from lib.steps.study import Study


def _events(logs):
    return {tuple(m.split()[1:3]) for m in logs}


def _organism(P, cache):
    return Study(P, cache).organism


def test_organism_steps_retrain_only_what_a_changed_setting_touches(tmp_path):
    logs = []
    cache = Cache(tmp_path, log=logs.append)
    P = load_profile("tiny")
    org = _organism(P, cache)
    assert {("computed", "lm"), ("computed", "tower"), ("computed", "vlm")} <= _events(logs)
    assert not list(tmp_path.glob("checkpoints/vlm-*")), "a finished VLM build removes its checkpoint"

    logs.clear()
    again = _organism(P, cache)
    assert _events(logs) == {("reused", "lm"), ("reused", "tower"), ("reused", "vlm")}
    for a, b in zip(org.vlm.state_dict().values(), again.vlm.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    logs.clear()
    _organism(replace(P, vlm=replace(P.vlm, stage2_steps=P.vlm.stage2_steps + 2)), cache)
    assert _events(logs) == {("reused", "lm"), ("reused", "tower"), ("computed", "vlm")}

    logs.clear()
    _organism(replace(P, lm=replace(P.lm, steps=P.lm.steps + 2)), cache)
    assert _events(logs) == {("computed", "lm"), ("reused", "tower"), ("computed", "vlm")}


def test_organism_is_deterministic_across_caches(tmp_path):
    P = load_profile("tiny")
    a = _organism(P, Cache(tmp_path / "a", log=lambda m: None))
    b = _organism(P, Cache(tmp_path / "b", log=lambda m: None))
    assert a.artifacts["vlm"].key == b.artifacts["vlm"].key
    for x, y in zip(a.vlm.state_dict().values(), b.vlm.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_heldout_accuracy_scores_the_extended_split_and_follows_the_models(tmp_path):
    from lib.sources import organism as O

    logs = []
    cache = Cache(tmp_path, log=logs.append)
    P = load_profile("tiny")
    m = _organism(P, cache)
    table = Study(P, cache).heldout_accuracy
    samples = O.eval_samples(P.seed + 1, P.world.n_heldout)
    assert table.n.sum() == P.world.n_heldout == len(samples)
    lm = O.evaluate_lm(m.lm, m.tokenizer, samples).set_index("qtype").accuracy
    assert (table.set_index("qtype").lm_text == lm).all()
    mean = O.evaluate_vlm(m.vlm, m.tokenizer, samples, corrupt="mean_image").set_index("qtype").accuracy
    assert (table.set_index("qtype").vlm_mean_image == mean).all()
    # retrained models (a changed VLM setting) are scored anew, not read from the cache
    logs.clear()
    P2 = replace(P, vlm=replace(P.vlm, stage2_steps=P.vlm.stage2_steps + 2))
    _ = Study(P2, cache).heldout_accuracy
    assert ("computed", "heldout-accuracy") in _events(logs)


def test_export_then_verify_reproduces_the_organism_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIAL_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "artifacts"
    assert export_organism("tiny", store) == 0
    assert (store / "PROVENANCE-tiny.json").exists() and len([p for p in store.glob("*-*") if p.is_dir()]) == 3
    assert export_organism("tiny", store, verify=True) == 0
    assert not (tmp_path / "verify-tiny").exists(), "a passed verification removes its own cache"
    # a fresh cache over the same store trains nothing: the store already holds each model under its key
    monkeypatch.setenv("SPATIAL_CACHE", str(tmp_path / "fresh"))
    provenance = (store / "PROVENANCE-tiny.json").read_bytes()
    monkeypatch.setattr("sys.argv", ["later", "--profile", "tiny"])  # another command, which must not be recorded
    assert export_organism("tiny", store) == 0
    assert not list((tmp_path / "fresh").glob("*-*")), "a model the store holds was trained again"
    assert (store / "PROVENANCE-tiny.json").read_bytes() == provenance, "a re-export overwrote who made the organism"
    # a committed weight that no longer matches what the code trains is reported
    weights = next(store.glob("vlm-*")) / "MANIFEST.json"
    text = weights.read_text()
    weights.write_text(text.replace('"sha256": "', '"sha256": "0', 1))
    assert export_organism("tiny", store, verify=True) == 1


def test_data_follows_the_profile_and_keeps_splits_apart(tmp_path):
    """The organism's data for steps 1-4: sizes from the profile, no scene shared between the streams that train
    (adaptation, base SAEs) and the ones that measure (held-out, probing, ground truth, benchmark)."""
    P = load_profile("tiny")
    D = Study(P, Cache(tmp_path)).data
    assert len(D.adapt) == P.sae.adapt_pairs and len(D.heldout) == P.sae.heldout_pairs
    assert len(D.text) == P.sae.base_pairs and len(D.probe) == P.probing.n_questions
    assert len(D.statements) == P.attribution.n_statements and len(D.controls) == P.attribution.n_controls
    image, question = D.adapt[0]
    assert image.shape == (P.world.image_px, P.world.image_px, 3) and isinstance(question, str)
    assert D.heldout_text[0] == (D.samples["heldout"][0].scene.caption(), D.samples["heldout"][0].question)
    assert D.probe_spatial.any() and not D.probe_spatial.all()
    assert all(len(s.scene.objects) == 2 for s in D.samples["ground_truth"])
    captions = {k: {s.scene.caption() + s.question for s in v} for k, v in D.samples.items()}
    for train in ("adapt", "text"):
        for held in ("heldout", "probe", "ground_truth", "statements"):
            assert not captions[train] & captions[held], f"{train} and {held} share a sample"
