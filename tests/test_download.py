"""`make download`'s plan and executor (lib/sources/download.py, lib/io/download.py), without the network: the plan
for the paper profile and for a profile of local paths, the hub's answers played by a fake API, the executor's calls
recorded in place of the hub's, and its refusal while HF_HUB_OFFLINE is on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib.io import download as CLI
from lib.io.book import REPO_ROOT
from lib.io.profiles import PaperConfig, load_profile
from lib.sources import download as D

SCOPE_REPO = "fnlp/Llama3_1-8B-Base-LXR-8x"


def scope_files(layer: int) -> tuple[str, ...]:
    folder = f"Llama3_1-8B-Base-L{layer}R-8x"
    return (f"{folder}/hyperparams.json", f"{folder}/checkpoints/final.safetensors")


def test_plan_for_the_paper_profile(tmp_path):
    """Every identifier of lib/profiles/paper-1gpu.toml (the paper on one GPU: two layers), the Llama Scope release
    mapped through SAELens' directory to its repository and the two files per layer its loader reads; COCO (not on
    the hub) to fetch by hand; no size known offline. (`tmp_path` as the root: no captions file there.)"""
    items = CLI.profile_plan(load_profile("paper-1gpu"), tmp_path)
    got = [(i.field, i.kind, i.source, i.status, i.repo_type) for i in items]
    assert got == [
        ("paper.vlm", "model", "aimagelab/LLaVA_MORE-llama_3_1-8B-finetuning", D.HUB, "model"),
        ("paper.llm", "model", "meta-llama/Llama-3.1-8B-Instruct", D.HUB, "model"),
        ("paper.vision_tower", "model", "openai/clip-vit-large-patch14-336", D.HUB, "model"),
        ("paper.sae_release", "sae", SCOPE_REPO, D.HUB, "model"),
        ("paper.sae_release", "sae", SCOPE_REPO, D.HUB, "model"),
        ("paper.vqa_dataset", "dataset", "lmms-lab/VQAv2", D.HUB, "dataset"),
        ("paper.vsr_dataset", "dataset", "cambridgeltl/vsr_random", D.HUB, "dataset"),
        ("paper.coco_captions", "file", "captions_val2014.json", D.MANUAL, None),
        ("paper.coco_images", "directory", "", D.MANUAL, None),
    ]
    saes = [i for i in items if i.kind == "sae"]
    assert [i.what for i in saes] == ["SAE l12r_8x (layer 12)", "SAE l16r_8x (layer 16)"]  # [sae] layers = [12, 16]
    assert [i.allow for i in saes] == [scope_files(12), scope_files(16)]
    assert all(i.size is None for i in items)
    vqa, vsr = items[5], items[6]
    assert vqa.split == "validation" and vqa.allow is None and vsr.split == "test"
    assert vsr.allow == ("train.jsonl", "dev.jsonl", "test.jsonl")
    assert "original/*" in items[1].ignore, "Meta's consolidated checkpoint duplicates the safetensors weights"
    text = CLI.describe(items)
    assert "7 to fetch from the hub (sizes unknown), 0 already local, 2 to fetch by hand, 0 missing" in text
    assert "cocodataset.org" in text


def test_plan_for_a_profile_of_local_paths(tmp_path):
    """Every field a local path (one relative to the root): all already local with their size on disk, but a layer
    whose SAE folder is absent is missing; nothing is asked of the hub."""
    data = tmp_path / "data"
    sizes = {"llava/model.safetensors": 100, "llama/model.safetensors": 200, "clip/model.safetensors": 30,
             "scope/l1r_8x/sae_weights.safetensors": 40, "scope/l1r_8x/cfg.json": 2, "vqa/data/validation.parquet": 7,
             "vsr/test.jsonl": 5, "captions.json": 3, "coco/train2017/a.jpg": 11}  # fmt: skip
    for rel, n in sizes.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(b"x" * n)
    profile = tmp_path / "local.toml"
    profile.write_text(
        'description = "local copies"\nseed = 0\n[paper]\n'
        + "".join(f'{k} = "{data / v}"\n' for k, v in [("vlm", "llava"), ("llm", "llama"), ("vision_tower", "clip"),
                  ("sae_release", "scope"), ("vsr_dataset", "vsr"), ("coco_captions", "captions.json"),
                  ("coco_images", "coco")])
        + 'vqa_dataset = "data/vqa"\n[sae]\nlayers = [1, 2]\n'
    )  # fmt: skip
    items = CLI.profile_plan(load_profile(profile), tmp_path)
    got = {(i.field, i.what): (i.status, i.size) for i in items}
    assert got == {
        ("paper.vlm", "LLaVA-MORE checkpoint (original LLaVA layout) and tokenizer"): (D.LOCAL, 100),
        ("paper.llm", "the LLM inside the VLM (text-only stream)"): (D.LOCAL, 200),
        ("paper.vision_tower", "CLIP vision tower (config and weights)"): (D.LOCAL, 30),
        ("paper.sae_release", "SAE l1r_8x (layer 1)"): (D.LOCAL, 42),
        ("paper.sae_release", "SAE l2r_8x (layer 2)"): (D.MISSING, None),
        ("paper.vqa_dataset", "VQAv2 split 'validation'"): (D.LOCAL, 7),
        ("paper.vsr_dataset", "VSR split 'test'"): (D.LOCAL, 5),
        ("paper.coco_captions", "COCO 2014 captions (text-only stream)"): (D.LOCAL, 3),
        ("paper.coco_images", "COCO 2017 images for VSR"): (D.LOCAL, None),
    }
    assert "0 to fetch from the hub (sizes unknown), 8 already local, 0 to fetch by hand, 1 missing" in CLI.describe(
        items
    )
    # A path that does not exist and is not a hub id is missing, not fetched.
    items = D.plan(PaperConfig(vlm=str(tmp_path / "nowhere")), [1], tmp_path)
    assert items[0].status == D.MISSING and "does not exist" in items[0].note


def test_no_layers_means_every_layer_the_release_names():
    items = D.sae_downloads("llama_scope_lxr_8x", "l{layer}r_8x", [], Path("."))
    assert [i.what.split()[1] for i in items] == [f"l{layer}r_8x" for layer in range(32)]
    with pytest.raises(D.DownloadError, match=r"field `paper.sae_id`: 'l3r_16x' \(layer 3\) is not in SAELens"):
        D.sae_downloads("llama_scope_lxr_8x", "l{layer}r_16x", [3], Path("."))
    # A release SAELens does not know is, as SAELens reads it, a hub repository with one folder per sae_id.
    (item,) = D.sae_downloads("someone/my-saes", "layer_{layer}", [5], Path("."))
    assert (item.source, item.allow, item.status) == ("someone/my-saes", ("layer_5/*",), D.HUB)


class FakeHub:
    """HfApi's model_info / dataset_info over fixed file lists; an unknown repository raises as the hub would."""

    def __init__(self, repos: dict[str, dict[str, int]]):
        self.repos, self.asked = repos, []

    def _info(self, repo_id, files_metadata=False):
        assert files_metadata
        self.asked.append(repo_id)
        if repo_id not in self.repos:
            raise PermissionError(f"401 Client Error: gated repo {repo_id}")
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f, size=s) for f, s in self.repos[repo_id].items()])

    model_info = dataset_info = _info


def test_sizes_come_from_the_hubs_file_lists(tmp_path):
    hub = FakeHub({
        "aimagelab/LLaVA_MORE-llama_3_1-8B-finetuning": {"config.json": 1, "model-00001-of-00002.safetensors": 5000,
            "model-00002-of-00002.safetensors": 3000, "model.safetensors.index.json": 2, "tokenizer.json": 9},
        "openai/clip-vit-large-patch14-336": {"config.json": 1, "pytorch_model.bin": 1700, "model.safetensors": 1700,
            "tf_model.h5": 1700, "flax_model.msgpack": 1700, "preprocessor_config.json": 1},
        SCOPE_REPO: {f: 10 + layer for layer in range(32) for f in scope_files(layer)}
        | {"Llama3_1-8B-Base-L12R-8x/checkpoints/step_1000.safetensors": 99},
        "lmms-lab/VQAv2": {"data/validation-00000-of-00002.parquet": 600, "data/test-00000-of-00001.parquet": 900},
        "cambridgeltl/vsr_random": {"train.jsonl": 4, "dev.jsonl": 2, "test.jsonl": 3, "README.md": 1},
    })  # fmt: skip
    items = D.with_sizes(CLI.profile_plan(load_profile("paper-1gpu"), tmp_path), hub)
    by = {(i.field, i.what): i for i in items}
    vlm = by["paper.vlm", "LLaVA-MORE checkpoint (original LLaVA layout) and tokenizer"]
    assert vlm.size == 8012 and len(vlm.allow) == 5
    clip = by["paper.vision_tower", "CLIP vision tower (config and weights)"]
    assert clip.allow == ("config.json", "model.safetensors", "preprocessor_config.json") and clip.size == 1702
    sae = by["paper.sae_release", "SAE l12r_8x (layer 12)"]
    assert sae.allow == tuple(sorted(scope_files(12))), "only the files SAELens' Llama Scope loader reads"
    assert sae.size == 44
    assert by["paper.vqa_dataset", "VQAv2 split 'validation'"].size == 1500
    assert by["paper.vsr_dataset", "VSR split 'test'"].size == 9
    llm = by["paper.llm", "the LLM inside the VLM (text-only stream)"]
    assert llm.size is None and "size unknown: the hub said PermissionError: 401 Client Error" in llm.note
    assert hub.asked.count(SCOPE_REPO) == 1, "one listing per repository"
    assert "7 to fetch from the hub (11.3 kB + 1 unknown)" in CLI.describe(items)


def test_fetch_refuses_while_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items = CLI.profile_plan(load_profile("paper-1gpu"), tmp_path)
    with pytest.raises(D.DownloadError, match=r"HF_HUB_OFFLINE is on, so nothing can be downloaded: run `HF_HUB_OFF"):
        D.fetch(items)
    assert CLI.main(["--profile", "paper"]) == 2
    out, err = capsys.readouterr()
    assert "download plan for profile 'paper'" in out and "HF_HUB_OFFLINE is on" in err
    assert CLI.main(["--profile", "paper", "--dry-run"]) == 0
    assert CLI.main(["--profile", "default"]) == 0 and "nothing to download" in capsys.readouterr().out


def test_fetch_downloads_each_hub_item_the_way_the_book_reads_it(tmp_path, monkeypatch):
    """Models and SAEs through snapshot_download with the plan's patterns, datasets through the book's own loaders
    (their cache is what `datasets` reloads offline); local and by-hand items are not fetched. The hub's functions
    are replaced by recorders, and HF_ENDPOINT points at a closed local port so anything missed fails at once."""
    import huggingface_hub

    from lib.sources import paper_data as PD

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)) or "/snap")
    monkeypatch.setattr(PD, "load_vqav2", lambda src, **kw: calls.append((src, kw)) or [0] * 3)
    monkeypatch.setattr(PD, "load_vsr", lambda src, split: calls.append((src, {"split": split})) or [0] * 2)
    items = CLI.profile_plan(load_profile("paper-1gpu"), tmp_path)
    done = D.fetch(items, log=lambda line: None)
    assert [c[0] for c in calls] == [
        "aimagelab/LLaVA_MORE-llama_3_1-8B-finetuning",
        "meta-llama/Llama-3.1-8B-Instruct",
        "openai/clip-vit-large-patch14-336",
        SCOPE_REPO,
        SCOPE_REPO,
        "lmms-lab/VQAv2",
        "cambridgeltl/vsr_random",
    ]
    assert calls[0][1] == {"repo_type": "model", "allow_patterns": None, "ignore_patterns": list(D.MODEL_IGNORE)}
    assert calls[3][1]["allow_patterns"] == list(scope_files(12)) and calls[4][1]["allow_patterns"] == list(
        scope_files(16)
    )
    assert calls[5][1]["split"] == "validation" and calls[6][1] == {"split": "test"}
    assert done[-1] == "cambridgeltl/vsr_random (test: 2 rows) in the datasets cache"


def test_make_download_goes_online_unless_the_caller_says_offline():
    """`make download` is the one target whose default is online; the caller's HF_HUB_OFFLINE wins."""
    stamp = str(Path(sys.prefix) / ".installed")
    for env, seen in (({}, "0"), ({"HF_HUB_OFFLINE": "1"}, "1"), ({"HF_HUB_OFFLINE": "0"}, "0")):
        base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MAKEFLAGS", "MAKELEVEL")}
        done = subprocess.run(
            ["make", "-n", "-o", stamp, "download", f"VENV={sys.prefix}", "PROFILE=paper", "DRY_RUN=1"],
            cwd=REPO_ROOT,
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"HF_HUB_OFFLINE={seen} " in done.stdout and "--dry-run" in done.stdout, (env, done.stdout)
