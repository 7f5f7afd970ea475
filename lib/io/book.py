"""The book as the repository declares it: the chapters `_toc.yml` lists, the conventions each chapter follows, what
each declares in its header, and where a run puts what it writes.

The chapter list and its order come from `_toc.yml` (`book/notebooks/<stem>` <-> `chapters/<stem>.py`), so there
is one list of chapters, not two. A chapter is a Jupytext percent-format file whose first code cell is tagged
`parameters` and assigns `profile`; its header may declare

    book_outputs: {figures: [scene_grid], tables: [counts]}   # what lib/io/outputs.py must have written
    book_requires: [world]                                    # profile sections it needs (else: not run)

Everything a run writes goes under one outputs root, the repository's `book/` unless another is named:
`notebooks/<stem>.ipynb` (the executed chapters the book renders), `figures/<profile>/<stem>/`,
`tables/<profile>/<stem>/` and `logs/<profile>.log`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jupytext
import nbformat
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TOC_NOTEBOOK_DIR = "book/notebooks"  # where _toc.yml points for executed chapters
CHAPTER_DIR = "chapters"
PROFILE_DIR = "lib/profiles"  # <name>.toml: the files lib.io.profiles.load_profile reads
DEFAULT_OUTPUTS = "book"  # the outputs root, under the repository root; TOC_NOTEBOOK_DIR lies in it


class RunnerError(Exception):
    """A mistake the user can fix: the message names the file or option and what was expected."""


class Chapter(NamedTuple):
    stem: str  # e.g. "01_world"
    source: Path  # chapters/<stem>.py
    notebook: Path  # book/notebooks/<stem>.ipynb (the executed copy the book renders)


class BookOutputs(NamedTuple):
    """What a chapter declares in its header under `book_outputs`."""

    figures: tuple[str, ...]
    tables: tuple[str, ...]


def known_profiles(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / PROFILE_DIR).glob("*.toml"))


def check_profile(root: Path, profile: str) -> None:
    profiles = known_profiles(root)
    if profile not in profiles:
        raise RunnerError(
            f"unknown profile {profile!r}: expected one of {', '.join(profiles) or '(none)'} "
            f"(the files {root / PROFILE_DIR}/<name>.toml)"
        )


def toc_files(root: Path) -> list[str]:
    """Every page `_toc.yml` lists (root first), as written there: paths without extension, in reading order."""
    toc_path = root / "_toc.yml"
    if not toc_path.is_file():
        raise RunnerError(f"{toc_path} does not exist; expected a jupyter-book table of contents (format: jb-book)")
    try:
        toc = yaml.safe_load(toc_path.read_text())
    except yaml.YAMLError as e:
        raise RunnerError(f"{toc_path}: not valid YAML: {e}") from None
    if not isinstance(toc, dict) or toc.get("format") != "jb-book" or "root" not in toc:
        raise RunnerError(f"{toc_path}: expected a mapping with `format: jb-book` and a `root` page")
    return [
        str(Path(entry).with_suffix("")) if entry.endswith((".md", ".ipynb")) else entry
        for entry in _toc_files(toc, toc_path)
    ]


def toc_chapters(root: Path) -> list[Chapter]:
    """Chapters in the order `_toc.yml` lists them; entries outside book/notebooks/ (plain pages) are skipped."""
    toc_path = root / "_toc.yml"
    chapters = []
    for entry in toc_files(root):
        if not entry.startswith(TOC_NOTEBOOK_DIR + "/"):
            continue
        stem = entry.removeprefix(TOC_NOTEBOOK_DIR + "/")
        source = root / CHAPTER_DIR / f"{stem}.py"
        if not source.is_file():
            raise RunnerError(f"{toc_path} lists `{entry}`, so {source} should exist, but it does not")
        chapters.append(Chapter(stem, source, root / TOC_NOTEBOOK_DIR / f"{stem}.ipynb"))
    if len({c.stem for c in chapters}) != len(chapters):
        raise RunnerError(f"{toc_path}: a chapter is listed twice")
    return chapters


def _toc_files(node, toc_path: Path) -> Iterator[str]:
    """Every `file:`/`root:` entry of a jb-book toc, depth first, in reading order (parts, chapters, sections)."""
    if isinstance(node, list):
        for item in node:
            yield from _toc_files(item, toc_path)
    elif isinstance(node, dict):
        for key in ("root", "file"):
            if key in node:
                if not isinstance(node[key], str):
                    raise RunnerError(f"{toc_path}: `{key}: {node[key]!r}` should be a path string")
                yield node[key]
        for key in ("parts", "chapters", "sections"):
            if key in node:
                yield from _toc_files(node[key], toc_path)


def select_chapters(chapters: list[Chapter], wanted: list[str] | None) -> list[Chapter]:
    """The chapters named by --chapter (stem or path), kept in toc order; all of them when none is named."""
    if not wanted:
        return chapters
    by_stem = {c.stem: c for c in chapters}
    stems = set()
    for name in wanted:
        stem = Path(name).stem
        if stem not in by_stem:
            raise RunnerError(
                f"unknown chapter {name!r}: _toc.yml lists {', '.join(by_stem) or 'no chapters'} "
                f"(add `- file: {TOC_NOTEBOOK_DIR}/{stem}` to _toc.yml to run a new one)"
            )
        stems.add(stem)
    return [c for c in chapters if c.stem in stems]


def read_chapter(chapter: Chapter) -> nbformat.NotebookNode:
    """The chapter as a notebook, after checking the conventions the runner relies on."""
    nb = jupytext.read(chapter.source, fmt="py:percent")
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    first = code_cells[0] if code_cells else None
    if first is None or "parameters" not in first.metadata.get("tags", []) or not _assigns_profile(first.source):
        raise RunnerError(
            f"{chapter.source}: the first code cell must be tagged `parameters` "
            f'(`# %% tags=["parameters"]`) and contain `profile = "default"`'
        )
    declared_outputs(chapter, nb)  # fail on a malformed header before spending time on execution
    return nb


def _assigns_profile(source: str) -> bool:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    return any(
        isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "profile" for t in node.targets)
        for node in tree.body
    )


def declared_outputs(chapter: Chapter, nb: nbformat.NotebookNode | None = None) -> BookOutputs:
    nb = nb if nb is not None else jupytext.read(chapter.source, fmt="py:percent")
    raw = nb.metadata.get("book_outputs") or {}
    where = f"{chapter.source}: header field `jupyter.book_outputs`"
    if not isinstance(raw, dict) or set(raw) - {"figures", "tables"}:
        raise RunnerError(f"{where} = {raw!r}: expected a mapping with keys `figures` and/or `tables`")
    out = {}
    for key in ("figures", "tables"):
        names = raw.get(key) or []
        if not isinstance(names, list) or not all(isinstance(n, str) and re.fullmatch(r"[\w.-]+", n) for n in names):
            raise RunnerError(f"{where}.{key} = {names!r}: expected a list of file names without extension or '/'")
        out[key] = tuple(names)
    return BookOutputs(**out)


def missing_sections(chapter: Chapter, profile: str, nb: nbformat.NotebookNode | None = None) -> list[str]:
    """The profile sections a chapter declares it needs (header field `book_requires`, e.g. `[world]` for the
    chapters about the organism) that `profile` (a name or a .toml path) does not have."""
    from lib.io.profiles import load_profile

    nb = nb if nb is not None else jupytext.read(chapter.source, fmt="py:percent")
    needed = nb.metadata.get("book_requires") or []
    if not isinstance(needed, list) or not all(isinstance(n, str) for n in needed):
        raise RunnerError(f"{chapter.source}: header field `jupyter.book_requires` = {needed!r}: expected a list")
    if not needed:
        return []
    P = load_profile(profile)
    return [n for n in needed if getattr(P, n, None) is None]


# --------------------------------------------------------------------------------------------------------------
# Where a run writes


def default_outputs(root: Path) -> Path:
    return root / DEFAULT_OUTPUTS


def with_outputs(chapters: list[Chapter], root: Path, outputs: Path) -> list[Chapter]:
    """The chapters with their executed notebooks under `<outputs>/notebooks/`, where `_toc.yml` has them when
    `outputs` is the default."""
    if outputs == default_outputs(root):
        return chapters
    return [c._replace(notebook=outputs / "notebooks" / c.notebook.name) for c in chapters]


def expected_outputs(outputs: Path, profile: str, chapter: Chapter) -> list[Path]:
    """The figures and tables a chapter declares, where lib/io/outputs.py writes them under `outputs`; none for a
    chapter the profile does not run."""
    if missing_sections(chapter, profile):
        return []
    declared = declared_outputs(chapter)
    name_ = Path(profile).stem  # a profile given as a .toml path writes under its file name (lib.io.outputs)
    paths = []
    for name in declared.figures:
        paths += [outputs / "figures" / name_ / chapter.stem / f"{name}{ext}" for ext in (".png", ".pdf")]
    paths += [outputs / "tables" / name_ / chapter.stem / f"{name}.csv" for name in declared.tables]
    return paths


def shown_path(path: Path, root: Path) -> str:
    """A path for a message or a notebook's metadata: relative to the root when it lies under it."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
