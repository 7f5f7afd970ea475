"""The artifact cache: every expensive result lives in a directory named by a hash of what it depends on.

An artifact is a directory `<root>/<name>-<key16>/` holding its files and a `MANIFEST.json` that lists every file
with its size and SHA-256. The key comes from the step's declaration (lib/steps/registry.py: a hash of exactly the
profile fields it reads, its code version and the keys of the steps it follows); the manifest records those
settings and upstream keys beside the files.

Every lookup is recorded as an event (reused, computed, corrupt): `Cache.summary()` turns this run's events into
one short report, and when the environment variable SPATIAL_CACHE_EVENTS names a file each event is also appended
to it as one JSON line (the book's runner reads it for its log).

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


def make_key(name: str, version: int, settings: dict, dep_keys=()) -> str:
    """SHA-256 of the canonical JSON of everything the artifact depends on (settings: plain JSON)."""
    blob = json.dumps(
        {"name": name, "version": version, "settings": settings, "deps": sorted(dep_keys)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class Cache:
    """`cache.get(name, settings, build, deps=..., key=..., version=...)` returns a valid `Artifact`, building it if
    needed. The key is the step's (lib/steps/registry.py); `settings` and `deps` ({step: key}) go into the manifest.
    The cache resolves keys; it never decides what a key hashes.

    `build(tmp_dir)` writes the artifact's files into `tmp_dir`; it may return a dict that is stored as
    `info.json` (for small results such as timings and metrics). `log`, if given, gets one line per lookup.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        log: Callable[[str], None] | None = None,
        stores: tuple[Path, ...] = (COMMITTED,),
    ):
        self.root = Path(root or os.environ.get("SPATIAL_CACHE") or DEFAULT_ROOT)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda message: None)
        self.stores = tuple(Path(s) for s in stores)  # read-only; same layout as root
        self.events: list[dict] = []

    def path(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key[:16]}"

    def checkpoint_path(self, name: str, key: str) -> Path:
        """Where a resumable build of the artifact (name, key) keeps its checkpoint (its folder made)."""
        path = self.root / "checkpoints" / f"{name}-{key[:16]}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _event(
        self, event: str, name: str, key: str, seconds: float | None = None, store: str | None = None, detail=""
    ):
        record = {"event": event, "name": name, "key": key[:16], "seconds": seconds, "store": store}
        self.events.append(record)
        sink = os.environ.get("SPATIAL_CACHE_EVENTS")
        if sink:
            with open(sink, "a") as f:
                f.write(json.dumps(record) + "\n")
        where = f" from {store}/" if store else ""
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        self.log(f"[cache] {event} {name} ({key[:10]}){where}{took}" + (f": {detail}" if detail else ""))
        if event == "corrupt":  # always said: a corrupted cache is worth a reader's attention
            print(f"[cache] {name} ({key[:10]}){where} is corrupt, recomputing: {detail}")

    def summary(self) -> str:
        """This cache's lookups so far, in two lines: what was reused, what was computed and how long it took."""
        seen: dict[str, dict] = {}
        for e in self.events:  # a step looked up twice counts once, as its last outcome
            seen[e["name"]] = e
        reused = [n + (" (committed)" if e["store"] else "") for n, e in seen.items() if e["event"] == "reused"]
        computed = [(n, e["seconds"]) for n, e in seen.items() if e["event"] == "computed"]
        lines = [f"artifacts: {len(reused)} reused, {len(computed)} computed"]
        if reused:
            lines.append("  reused:   " + ", ".join(reused))
        if computed:
            total = sum(s for _, s in computed)
            lines.append(
                "  computed: " + ", ".join(f"{n} ({s:.1f} s)" for n, s in computed) + f"; {total:.1f} s in all"
            )
        return "\n".join(lines)

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
        key: str | None = None,
        deps: dict[str, str] | list[Artifact] | tuple[Artifact, ...] = (),
        version: int = 1,
    ) -> Artifact:
        """`deps`: the upstream keys by name (or the upstream Artifacts). `key`: the step's key; without it, the key
        is made here from name, version, settings and the upstream keys (as lib/steps/registry.py makes it)."""
        deps = dict(deps) if isinstance(deps, dict) else {d.name: d.key for d in deps}
        key = key or make_key(name, version, settings, tuple(deps.values()))
        final = self.path(name, key)
        if final.exists():
            try:
                self.verify(final)
                self._event("reused", name, key)
                return Artifact(name, key, final)
            except CorruptArtifact as e:
                self._event("corrupt", name, key, detail=str(e))
                shutil.rmtree(final, ignore_errors=True)
        for store in self.stores:
            committed = store / final.name
            if committed.exists():
                try:
                    self.verify(committed)
                    self._event("reused", name, key, store=store.name)
                    return Artifact(name, key, committed)
                except CorruptArtifact as e:  # never delete a committed file: report it and build locally
                    self._event("corrupt", name, key, store=store.name, detail=str(e))
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
                "deps": deps,
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
        self._event("computed", name, key, seconds=round(seconds, 3))
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
