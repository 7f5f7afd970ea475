"""Fixtures shared by the tests that execute chapters (tests/test_chapters.py, tests/test_paper_chapters.py,
tests/test_runner.py)."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Where a run could write into the working tree by mistake: the book's outputs root (figures, tables, notebooks,
# logs) and the artifact cache. The repository's top-level entries are watched too (a stray relative path).
WATCHED = ("book", ".cache")


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """A fresh artifact cache for one module's chapters: later chapters reuse what earlier ones built, and nothing
    from a previous run hides a broken step. The kernels inherit SPATIAL_CACHE from the environment."""
    path = tmp_path_factory.mktemp("cache")
    saved = os.environ.get("SPATIAL_CACHE")
    os.environ["SPATIAL_CACHE"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("SPATIAL_CACHE")
    else:
        os.environ["SPATIAL_CACHE"] = saved


def tree_snapshot(root: Path = REPO_ROOT) -> dict[str, tuple[int, int] | None]:
    """Every file (size, mtime) and folder (None) under the watched folders, and the top-level entries."""
    snapshot: dict[str, tuple[int, int] | None] = {p.name: None for p in root.iterdir()}
    for name in WATCHED:
        for dirpath, dirnames, filenames in os.walk(root / name):
            folder = Path(dirpath)
            snapshot |= {str((folder / d).relative_to(root)): None for d in dirnames}
            for f in filenames:
                stat = (folder / f).stat()
                snapshot[str((folder / f).relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return snapshot


def tree_changes(before: dict, after: dict) -> list[str]:
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    return [f"created {p}" for p in created] + [f"removed {p}" for p in removed] + [f"changed {p}" for p in changed]


@pytest.fixture
def repo_untouched():
    """Fails the test if it created, removed or changed anything under book/ or .cache/ (or at the top level) of the
    working tree: tests write into temporary directories only. (Another process writing there at the same time,
    a `make book` say, fails it too.)"""
    before = tree_snapshot()
    yield
    changes = tree_changes(before, tree_snapshot())
    assert not changes, "the test wrote into the working tree:\n  " + "\n  ".join(changes[:20])
