"""What a profile's `[paper]` section needs from the Hugging Face hub, and fetching it ahead of a run, so that the book
itself can build offline (`make download PROFILE=paper`; the command line is lib/io/download.py, which reads the
profile).

`plan(paper, layers)` is pure and offline: one `Download` per thing the section names, the SAE release expanded to
one per layer through SAELens' own release directory (read from the installed package, no network). A field that
names an existing local path is "already local" (with its size on disk); a hub id is to be fetched; COCO's captions
and images are not on the hub and are listed as what to fetch by hand. `with_sizes(items, api)` asks the hub for
each repository's file list (online only) and narrows each download to exactly the files it would take, with their
sizes. `fetch(items)` downloads: models and SAEs with `huggingface_hub.snapshot_download` into the hub cache, the
datasets through the same loaders the book uses (lib/sources/paper_data.py), which prepare `datasets`' own cache:
offline, `datasets` reloads a hub dataset only from that cache, not from a snapshot of its files. Both show the
hub's progress bars. `fetch` refuses while HF_HUB_OFFLINE is on.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

HUB, LOCAL, MANUAL, MISSING = "from the hub", "already local", "fetch by hand", "missing"
# Weights in formats the loaders here never read (TensorFlow, Flax, ONNX, Meta's original consolidated checkpoint).
MODEL_IGNORE = ("*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "original/*")
# PyTorch pickles are taken only from a repository that has no safetensors weights.
PICKLES = ("*.bin", "*.pth", "*.pt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COCO_CAPTIONS_HOWTO = "COCO's annotations_trainval2014.zip (cocodataset.org), not on the hub: unzip it and set the path"
COCO_IMAGES_HOWTO = (
    "COCO 2017 train and val images (cocodataset.org), not on the hub: cambridgeltl/vsr_random names them without "
    "holding them; download both folders and set paper.coco_images to their parent"
)


class DownloadError(RuntimeError):
    """A download that cannot start (offline, or a field the plan cannot read); the message says what to do."""


class Download(NamedTuple):
    field: str  # the profile field it comes from, e.g. "paper.vlm"
    kind: str  # "model", "sae", "dataset", "file", "directory"
    source: str  # a hub id, or the path as the profile writes it
    what: str  # what it is, in words
    status: str  # HUB, LOCAL, MANUAL or MISSING
    repo_type: str | None = None  # "model" or "dataset" for HUB items
    allow: tuple[str, ...] | None = None  # file patterns to fetch (None: the whole repository)
    ignore: tuple[str, ...] = ()
    size: int | None = None  # bytes, where known: the local files', or the hub's (`with_sizes`)
    note: str = ""
    split: str | None = None  # datasets: the split the book loads


def _local_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _source(field: str, kind: str, value: str, what: str, root: Path, **hub) -> Download:
    """A model or dataset field: an existing path is local, a hub id is fetched, anything else is missing."""
    path = root / value
    if value and path.exists():
        return Download(field, kind, value, what, LOCAL, size=_local_size(path))
    if HUB_ID.match(value):
        return Download(field, kind, value, what, HUB, **hub)
    return Download(field, kind, value, what, MISSING, note=f"{path} does not exist and is not a hub id")


def sae_downloads(release: str, sae_id: str, layers: Sequence[int], root: Path) -> list[Download]:
    """One Download per layer's SAE. A local release is a folder of SAELens SAEs, one per sae_id; a release SAELens
    knows maps to its hub repository and one folder per SAE (its `pretrained_saes.yaml`, read offline); any other
    name is, as SAELens treats it, a hub repository with one folder per sae_id. No layers: every layer of the
    release that the sae_id template names."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    field, local = "paper.sae_release", root / release
    lookup = None if local.is_dir() else get_pretrained_saes_directory().get(release)
    if not layers:
        known = set(lookup.saes_map) if lookup else {p.name for p in local.iterdir()} if local.is_dir() else set()
        layers = [layer for layer in range(1024) if sae_id.format(layer=layer) in known]
        if not layers:
            raise DownloadError(f"field `sae.layers` is empty and release {release!r} names no SAE like {sae_id!r}")
    out = []
    for layer in layers:
        sid = sae_id.format(layer=layer)
        what = f"SAE {sid} (layer {layer})"
        if local.is_dir():
            folder = local / sid
            status, size = (LOCAL, _local_size(folder)) if folder.is_dir() else (MISSING, None)
            out.append(Download(field, "sae", f"{release}/{sid}", what, status, size=size))
            continue
        if lookup is None:
            repo, folder_name, files = release, sid, (f"{sid}/*",)
        elif sid not in lookup.saes_map:
            raise DownloadError(f"field `paper.sae_id`: {sid!r} (layer {layer}) is not in SAELens release {release!r}")
        else:
            repo, folder_name = lookup.repo_id, lookup.saes_map[sid]
            files = (f"{folder_name}/*",)
            if lookup.conversion_func == "llama_scope":  # what SAELens' Llama Scope loader reads, and nothing else
                files = (f"{folder_name}/hyperparams.json", f"{folder_name}/checkpoints/final.safetensors")
        note = f"SAELens release {release!r} -> {repo}/{folder_name}" if lookup else "a hub repository (not in SAELens)"
        out.append(Download(field, "sae", repo, what, HUB, "model", files, note=note))
    return out


def plan(paper, layers: Sequence[int], root: str | Path = ".") -> list[Download]:
    """Everything a `[paper]` section names (`paper`: lib.io.profiles.PaperConfig or any object with its fields),
    for the SAE layers `layers` (the profile's `sae.layers`; empty: all). Relative paths are read from `root` (the
    runner's working directory, the repository root). Pure: no network."""
    from lib.sources.paper_data import VSR_SPLIT_FILES

    root = Path(root)
    model = dict(repo_type="model", ignore=MODEL_IGNORE)
    items = [
        _source(
            "paper.vlm",
            "model",
            paper.vlm,
            "LLaVA-MORE checkpoint (original LLaVA layout) and tokenizer",
            root,
            **model,
        ),
        _source(
            "paper.llm",
            "model",
            paper.llm,
            "the LLM inside the VLM (text-only stream)",
            root,
            **model,
            note="gated on the hub: accept its licence there and log in (`hf auth login` or HF_TOKEN)",
        ),
        _source(
            "paper.vision_tower", "model", paper.vision_tower, "CLIP vision tower (config and weights)", root, **model
        ),
        *sae_downloads(paper.sae_release, paper.sae_id, layers, root),
        _source(
            "paper.vqa_dataset",
            "dataset",
            paper.vqa_dataset,
            f"VQAv2 split {paper.vqa_split!r}",
            root,
            repo_type="dataset",
            split=paper.vqa_split,
            note="datasets prepares every split of the repository, not only the one the book reads",
        ),
        _source(
            "paper.vsr_dataset",
            "dataset",
            paper.vsr_dataset,
            f"VSR split {paper.vsr_split!r}",
            root,
            repo_type="dataset",
            allow=tuple(VSR_SPLIT_FILES.values()),
            split=paper.vsr_split,
        ),
    ]
    captions = root / paper.coco_captions
    items.append(
        Download(
            "paper.coco_captions",
            "file",
            paper.coco_captions,
            "COCO 2014 captions (text-only stream)",
            LOCAL,
            size=captions.stat().st_size,
        )
        if captions.is_file()
        else Download(
            "paper.coco_captions",
            "file",
            paper.coco_captions,
            "COCO 2014 captions (text-only stream)",
            MANUAL,
            note=COCO_CAPTIONS_HOWTO,
        )
    )
    images = root / paper.coco_images
    if paper.coco_images and images.is_dir():
        items.append(Download("paper.coco_images", "directory", paper.coco_images, "COCO 2017 images for VSR", LOCAL))
    else:
        note = COCO_IMAGES_HOWTO if not paper.coco_images else f"{images} does not exist; {COCO_IMAGES_HOWTO}"
        items.append(
            Download("paper.coco_images", "directory", paper.coco_images, "COCO 2017 images for VSR", MANUAL, note=note)
        )
    return items


# ---------------------------------------------------------------------------------------------------------------
# Online: sizes, then the downloads


def select_files(files: dict[str, int | None], item: Download) -> dict[str, int | None]:
    """The files of a repository (name -> size) that `item` fetches: its allow patterns less its ignore patterns,
    and for a model no PyTorch pickle when the selection has safetensors weights."""
    chosen = {
        name: size
        for name, size in files.items()
        if (item.allow is None or any(fnmatch.fnmatch(name, p) for p in item.allow))
        and not any(fnmatch.fnmatch(name, p) for p in item.ignore)
    }
    if item.kind == "model" and any(n.endswith(".safetensors") for n in chosen):
        chosen = {n: s for n, s in chosen.items() if not any(fnmatch.fnmatch(n, p) for p in PICKLES)}
    return chosen


def with_sizes(items: list[Download], api=None) -> list[Download]:
    """Each hub item narrowed to the exact files it fetches (`allow`), with their total size, from the hub's file
    lists (`HfApi.model_info` / `dataset_info` with `files_metadata=True`). An item the hub does not answer for
    keeps its patterns, no size, and the reason in its note."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    listings: dict[tuple[str, str], dict[str, int | None] | str] = {}
    out = []
    for item in items:
        if item.status != HUB:
            out.append(item)
            continue
        key = (item.repo_type, item.source)
        if key not in listings:
            info = api.dataset_info if item.repo_type == "dataset" else api.model_info
            try:
                siblings = info(item.source, files_metadata=True).siblings or []
                listings[key] = {s.rfilename: s.size for s in siblings}
            except Exception as e:  # gated, missing, or no network: the plan still prints
                listings[key] = f"size unknown: the hub said {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        listing = listings[key]
        if isinstance(listing, str):
            out.append(item._replace(note="; ".join(n for n in (item.note, listing) if n)))
            continue
        chosen = select_files(listing, item)
        sizes = [s for s in chosen.values() if s is not None]
        out.append(item._replace(allow=tuple(sorted(chosen)), size=sum(sizes) if len(sizes) == len(chosen) else None))
    return out


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1, ON, YES or TRUE, in any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def fetch(items: list[Download], log=print) -> list[str]:
    """Download every hub item; returns where each went. Refuses, before any download, while HF_HUB_OFFLINE is on."""
    if hub_offline():
        raise DownloadError(
            "HF_HUB_OFFLINE is on, so nothing can be downloaded: run `HF_HUB_OFFLINE=0 make download "
            "PROFILE=<profile>` where the hub can be reached (`make book` then runs offline from the cache)"
        )
    from huggingface_hub import snapshot_download

    from lib.sources import paper_data as PD

    todo = [i for i in items if i.status == HUB]
    done = []
    for n, item in enumerate(todo, 1):
        log(f"[{n}/{len(todo)}] {item.field}: {item.what} <- {item.source} ({format_size(item.size)})")
        if item.kind == "dataset":  # the book's own loader: it prepares the cache `datasets` reloads offline
            if item.field == "paper.vsr_dataset":
                ds = PD.load_vsr(item.source, item.split)
            else:
                ds = PD.load_vqav2(item.source, columns=PD.VQA_ACTIVATION_COLUMNS, split=item.split)
            done.append(f"{item.source} ({item.split}: {len(ds):,} rows) in the datasets cache")
        else:
            path = snapshot_download(
                item.source,
                repo_type=item.repo_type,
                allow_patterns=list(item.allow) if item.allow is not None else None,
                ignore_patterns=list(item.ignore) or None,
            )
            done.append(f"{item.source} -> {path}")
    return done


def format_size(size: int | None) -> str:
    if size is None:
        return "size unknown"
    value, unit = float(size), "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
