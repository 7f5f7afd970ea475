"""The artifact cache: every expensive result lives in a directory named by a hash of what it depends on.

An artifact is a directory `<root>/<name>-<key16>/` holding its files and a `MANIFEST.json` that lists every file
with its size and SHA-256. The key hashes exactly the artifact's name, a code version, its settings (plain JSON)
and the keys of the upstream artifacts it was built from, so changing one profile value recomputes only what
depends on it, and everything downstream of that.

Writes are atomic: `build` fills a temporary directory beside the final one, the manifest is written last, and
one `os.rename` publishes the whole directory. A run killed mid-write leaves only a `.tmp-*` directory, which is
never read. On every read the manifest is checked against the files on disk; a truncated or corrupted artifact
is reported, deleted and rebuilt.

Formats: tensors as safetensors, tables as parquet, small metadata as JSON, models through `save_pretrained`
(safetensors). Nothing here, or anywhere in the project, is loaded with pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

MANIFEST = "MANIFEST.json"
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / ".cache" / "artifacts"
# Artifacts committed to the repository (`make organism` writes them): read-only, looked up after the local cache.
COMMITTED = Path(__file__).resolve().parents[2] / "artifacts"


@dataclass(frozen=True)
class Artifact:
    name: str
    key: str
    path: Path

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel


class CorruptArtifact(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def make_key(name: str, version: int, settings: dict, deps: tuple[Artifact, ...] = ()) -> str:
    """SHA-256 of the canonical JSON of everything the artifact depends on."""
    blob = json.dumps(
        {"name": name, "version": version, "settings": settings, "deps": sorted(d.key for d in deps)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class Cache:
    """`cache.get(name, settings, build, deps=..., version=...)` returns a valid `Artifact`, building it if needed.

    `build(tmp_dir)` writes the artifact's files into `tmp_dir`; it may return a dict that is stored as
    `info.json` (for small results such as timings and metrics).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        log: Callable[[str], None] = print,
        stores: tuple[Path, ...] = (COMMITTED,),
    ):
        self.root = Path(root or os.environ.get("SPATIAL_CACHE") or DEFAULT_ROOT)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.stores = tuple(Path(s) for s in stores)  # read-only; same layout as root

    def path(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key[:16]}"

    def checkpoint(self, name: str, settings: dict, *, deps=(), version: int = 1) -> Path:
        """Where a resumable build of the artifact `get` would key this way keeps its checkpoint (its folder made)."""
        path = self.root / "checkpoints" / f"{name}-{make_key(name, version, settings, tuple(deps))[:16]}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def verify(self, path: Path) -> dict:
        """The manifest of a complete, intact artifact; raises CorruptArtifact naming what is wrong."""
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise CorruptArtifact(f"{path}: no {MANIFEST} (incomplete write)")
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptArtifact(f"{manifest_path}: unreadable manifest ({e})") from None
        for rel, meta in files.items():
            f = path / rel
            if not f.exists():
                raise CorruptArtifact(f"{f}: missing")
            size = f.stat().st_size
            if size != meta["size"]:
                raise CorruptArtifact(f"{f}: {size} bytes, manifest says {meta['size']} (truncated?)")
            if _sha256(f) != meta["sha256"]:
                raise CorruptArtifact(f"{f}: checksum differs from the manifest (corrupted)")
        return manifest

    def get(
        self,
        name: str,
        settings: dict,
        build: Callable[[Path], dict | None],
        *,
        deps: tuple[Artifact, ...] | list[Artifact] = (),
        version: int = 1,
    ) -> Artifact:
        deps = tuple(deps)
        key = make_key(name, version, settings, deps)
        final = self.path(name, key)
        if final.exists():
            try:
                self.verify(final)
                self.log(f"[cache] reused {name} ({key[:10]})")
                return Artifact(name, key, final)
            except CorruptArtifact as e:
                self.log(f"[cache] corrupt {name} ({key[:10]}): {e}; recomputing")
                shutil.rmtree(final, ignore_errors=True)
        for store in self.stores:
            committed = store / final.name
            if committed.exists():
                try:
                    self.verify(committed)
                    self.log(f"[cache] reused {name} ({key[:10]}) from {store.name}/")
                    return Artifact(name, key, committed)
                except CorruptArtifact as e:  # never delete a committed file: report it and build locally
                    self.log(f"[cache] corrupt {name} ({key[:10]}) in {store}: {e}; recomputing locally")
        tmp = self.root / f".tmp-{name}-{key[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            info = build(tmp)
            seconds = time.perf_counter() - t0
            if info is not None:
                save_json(tmp / "info.json", info)
            files = {
                str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            manifest = {
                "name": name,
                "key": key,
                "version": version,
                "settings": settings,
                "deps": {d.name: d.key for d in deps},
                "build_s": round(seconds, 3),
                "files": files,
            }
            _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            try:
                os.rename(tmp, final)  # atomic publish: readers see all of it or none of it
            except OSError:
                if not final.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process published the same key first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.log(f"[cache] computed {name} ({key[:10]}) in {seconds:.1f} s")
        return Artifact(name, key, final)

    def clean_tmp(self) -> int:
        """Remove leftovers of killed writes; returns how many."""
        leftovers = list(self.root.glob(".tmp-*"))
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
        return len(leftovers)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# Formats: one function pair each, so every artifact reads back the way it was written.


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=device)


def save_table(path: Path, df: pd.DataFrame) -> None:
    df.to_parquet(path, index=False)


def load_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def load_json(path: Path):
    return json.loads(Path(path).read_text())
