"""Execute the book's chapters and check what they produced.

    python -m lib.io.runner --profile default                  # every chapter, in _toc.yml order
    python -m lib.io.runner --profile tiny --chapter 01_world  # one chapter (repeat --chapter for more)
    python -m lib.io.runner --profile default --check          # only check the declared figures and tables

Execution and rendering are separate steps (the QuantEcon habit): this module executes each `chapters/<stem>.py`
(Jupytext percent format) with papermill, injecting the profile into the cell tagged `parameters`, and writes
`book/notebooks/<stem>.ipynb`; `jupyter-book build` then renders those notebooks without executing anything. The
chapter list and its order come from `_toc.yml` (`book/notebooks/<stem>` <-> `chapters/<stem>.py`), so there is
one list of chapters, not two.

A chapter whose inputs have not changed since it was last executed with the same profile (its source, the profile
files, the library and the pinned requirements, hashed into `run_key`), and whose declared outputs are all present,
is not executed again: its executed notebook and outputs are reused, as Jupyter Book's own execution cache would do.
`--force` executes every chosen chapter anyway; the expensive steps inside a chapter are cached separately
(lib/cache.py), so a forced run reuses every artifact whose settings did not change.

A failing cell stops the run with exit status 1 and a report naming the chapter, the cell and the exception. A
mistake the user can fix (unknown profile or chapter, malformed `_toc.yml`, a chapter that breaks the conventions)
exits with status 2 and one message naming the file and what was expected.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import hashlib
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jupytext
import nbformat
import papermill
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TOC_NOTEBOOK_DIR = "book/notebooks"  # where _toc.yml points for executed chapters
CHAPTER_DIR = "chapters"
PROFILE_DIR = "lib/profiles"  # <name>.toml: the files lib.profiles.load_profile reads

# The kernels run offline and headless whatever the calling shell has set: nothing may come from the hub, wandb
# must not try to log in, pip must not reach an index, matplotlib must not look for a display.
KERNEL_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PIP_NO_INDEX": "1", "MPLBACKEND": "Agg"}

# Lines lib/cache.py prints into a notebook's output, e.g. "[cache] reused lm (3fa9c01b2e)" and
# "[cache] computed lm (3fa9c01b2e) in 12.3 s" (the key in brackets is optional); summarised per chapter.
_KEY = r"(?: \((?P<key>[0-9a-f]+)\))?"
CACHE_REUSED_RE = re.compile(rf"^\[cache\] reused (?P<name>\S+){_KEY}", re.MULTILINE)
CACHE_COMPUTED_RE = re.compile(rf"^\[cache\] computed (?P<name>\S+){_KEY} in (?P<seconds>[0-9.]+) ?s", re.MULTILINE)
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# papermill adds two markdown cells with this tag to a notebook that failed (a banner and an anchor).
PAPERMILL_ERROR_TAG = "papermill-error-cell-tag"


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


class CellFailure(NamedTuple):
    chapter: str
    cell_index: int  # index among all cells of the chapter as Jupytext reads it (markdown included), from 0
    line: int | None  # line of the chapter file where the cell's source starts, when it can be found
    first_line: str
    ename: str
    evalue: str
    traceback: str

    def summary(self) -> str:
        where = f"{CHAPTER_DIR}/{self.chapter}.py" + (f":{self.line}" if self.line else "")
        cell = f"cell {self.cell_index} ({where}): {self.first_line}" if self.cell_index >= 0 else f"({where})"
        return f"chapter {self.chapter} failed in {cell}\n  {self.ename}: {self.evalue}"


class ChapterResult(NamedTuple):
    chapter: Chapter
    seconds: float
    reused: list[str]
    computed: list[tuple[str, float]]
    failure: CellFailure | None


# --------------------------------------------------------------------------------------------------------------
# The chapter list, profiles and declared outputs


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


# --------------------------------------------------------------------------------------------------------------
# Execution


@contextlib.contextmanager
def kernel_environment(root: Path) -> Iterator[None]:
    """Set the kernels' environment (they inherit ours) and restore the caller's afterwards."""
    saved = dict(os.environ)
    os.environ.update(KERNEL_ENV)
    # The kernel's cwd is the root too, but PYTHONPATH also covers code that changes directory.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), saved.get("PYTHONPATH")) if p)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


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


def _not_applicable(chapter: Chapter, nb: nbformat.NotebookNode, profile: str, missing: list[str]) -> None:
    """The book page of a chapter that does not apply to a profile: its introduction and one line saying why."""
    intro = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    sections = ", ".join(f"[{m}]" for m in missing)
    note = nbformat.v4.new_markdown_cell(
        f"**Not run with profile `{profile}`:** this chapter needs the profile section(s) {sections}, which "
        f"`{profile}` does not have. It is about the self-contained organism; the paper's models enter in the "
        "chapters that follow."
    )
    page = nbformat.v4.new_notebook(cells=[c for c in (intro, note) if c is not None], metadata=nb.metadata)
    page.metadata["papermill"] = {"parameters": {"profile": profile}, "input_path": str(chapter.source)}
    nbformat.write(page, chapter.notebook)


def run_chapter(
    chapter: Chapter, profile: str, root: Path, progress_bar: bool = False, verbose: bool = False
) -> ChapterResult:
    """Execute one chapter into its notebook; a failing cell is returned as `failure`, not raised. A chapter that
    needs a profile section the profile lacks (`missing_sections`) is not executed: its page says so.

    `verbose` echoes what the cells print (stdout and stderr) while they run, e.g. for CI logs.
    """
    nb = read_chapter(chapter)
    chapter.notebook.parent.mkdir(parents=True, exist_ok=True)
    missing = missing_sections(chapter, profile, nb)
    if missing:
        _not_applicable(chapter, nb, profile, missing)
        return ChapterResult(chapter, 0.0, [], [], None)
    started = time.perf_counter()
    failure = None
    try:
        with kernel_environment(root):
            papermill.execute_notebook(
                nb,
                chapter.notebook,
                parameters={"profile": profile},
                kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
                cwd=root,
                progress_bar=progress_bar,
                # The kernel application's own log only says things that are not ours: a warning on every start
                # that its loopback sockets are unencrypted, and now and then an "ERROR | KeyboardInterrupt caught"
                # as nbclient shuts it down. Cell output and cell errors do not go through this log.
                extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
                stdout_file=sys.stdout if verbose else None,
                stderr_file=sys.stderr if verbose else None,
            )
    except papermill.PapermillExecutionError as e:
        failure = _cell_failure(chapter, e)
    except Exception as e:  # a dead kernel or a timeout: still report which cell was running
        failure = _kernel_failure(chapter, e)
    seconds = time.perf_counter() - started

    executed = _fix_input_path(chapter, root)
    reused, computed = cache_events(executed) if executed is not None else ([], [])
    return ChapterResult(chapter, seconds, reused, computed, failure)


def _fix_input_path(chapter: Chapter, root: Path) -> nbformat.NotebookNode | None:
    """papermill records its input in the notebook's metadata; given a NotebookNode it stores the whole notebook
    there, so replace it with the chapter's path (the notebook is also the book page: keep it small)."""
    if not chapter.notebook.is_file():
        return None
    executed = nbformat.read(chapter.notebook, as_version=4)
    executed.metadata.setdefault("papermill", {})["input_path"] = str(chapter.source.relative_to(root))
    nbformat.write(executed, chapter.notebook)
    return executed


def _source_index(executed_index: int, executed: nbformat.NotebookNode | None) -> int:
    """Map a cell index of the executed notebook, as papermill counts it (after inserting its
    `injected-parameters` cell, before adding its error-marker cells), back to the chapter's own cells."""
    if executed is None:
        return executed_index
    cells = [c for c in executed.cells if PAPERMILL_ERROR_TAG not in c.metadata.get("tags", [])]
    injected = sum("injected-parameters" in c.metadata.get("tags", []) for c in cells[:executed_index])
    return executed_index - injected


def _cell_failure(chapter: Chapter, e: papermill.PapermillExecutionError) -> CellFailure:
    executed = nbformat.read(chapter.notebook, as_version=4) if chapter.notebook.is_file() else None
    index = _source_index(e.cell_index, executed)
    traceback = ANSI_RE.sub("", "\n".join(e.traceback))
    return CellFailure(
        chapter.stem,
        index,
        _line_of(chapter.source, e.source),
        _first_line(e.source),
        e.ename,
        ANSI_RE.sub("", str(e.evalue)),
        traceback,
    )


def _kernel_failure(chapter: Chapter, e: Exception) -> CellFailure:
    """No cell error output (the kernel died, a timeout): the cell papermill marked `running` is the culprit."""
    index, source = -1, ""
    if chapter.notebook.is_file():
        executed = nbformat.read(chapter.notebook, as_version=4)
        for i, cell in enumerate(executed.cells):
            if cell.metadata.get("papermill", {}).get("status") == "running":
                index, source = _source_index(i, executed), cell.source
    return CellFailure(
        chapter.stem,
        index,
        _line_of(chapter.source, source) if source else None,
        _first_line(source) or "(unknown cell)",
        type(e).__name__,
        str(e),
        "",
    )


def _first_line(source: str) -> str:
    return next((line.strip() for line in source.splitlines() if line.strip()), "")


def _line_of(path: Path, source: str) -> int | None:
    """Line (from 1) where a code cell's source starts in the .py file; None when Jupytext rewrote it (magics)."""
    text = path.read_text()
    at = text.find(source.strip("\n")) if source.strip() else -1
    return text.count("\n", 0, at) + 1 if at >= 0 else None


def cache_events(nb: nbformat.NotebookNode) -> tuple[list[str], list[tuple[str, float]]]:
    """The `[cache] reused/computed` lines lib/cache.py printed, in order of appearance."""
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )
    reused = [m["name"] for m in CACHE_REUSED_RE.finditer(text)]
    computed = [(m["name"], float(m["seconds"])) for m in CACHE_COMPUTED_RE.finditer(text)]
    return reused, computed


# What a chapter's execution depends on besides its own source: a change to any of these re-executes it.
RUN_KEY_GLOBS = ("lib/**/*.py", "lib/profiles/*.toml", "requirements.txt")


def run_key(root: Path, chapter: Chapter, profile: str) -> str:
    """SHA-256 of the chapter source, the profile name, and every file in RUN_KEY_GLOBS (paths and contents)."""
    h = hashlib.sha256(f"profile={profile}\n".encode())
    files = {chapter.source} | {p for pattern in RUN_KEY_GLOBS for p in root.glob(pattern) if p.is_file()}
    for path in sorted(files):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def is_current(root: Path, chapter: Chapter, profile: str, key: str) -> bool:
    """The executed notebook was made from exactly these inputs and every declared output is still there."""
    if not chapter.notebook.is_file():
        return False
    meta = nbformat.read(chapter.notebook, as_version=4).metadata.get("book_run", {})
    return meta.get("key") == key and meta.get("profile") == profile and not check_outputs(root, profile, [chapter])


def _stamp_run_key(chapter: Chapter, profile: str, key: str) -> None:
    nb = nbformat.read(chapter.notebook, as_version=4)
    nb.metadata["book_run"] = {"key": key, "profile": profile}
    nbformat.write(nb, chapter.notebook)


def describe(result: ChapterResult) -> str:
    status = "FAILED" if result.failure else "ok"
    lines = [f"{result.chapter.stem}: {status} in {result.seconds:.1f} s"]
    lines.append(f"  reused ({len(result.reused)}): {', '.join(result.reused) or '-'}")
    computed = ", ".join(f"{name} ({s:.1f} s)" for name, s in result.computed)
    lines.append(f"  computed ({len(result.computed)}): {computed or '-'}")
    return "\n".join(lines)


def run_book(
    root: Path, profile: str, wanted: list[str] | None = None, verbose: bool = False, force: bool = False
) -> int:
    """Execute the chosen chapters in toc order; stop at the first failure. Returns the exit status.

    A chapter that `is_current` is skipped unless `force`."""
    root = root.resolve()
    check_profile(root, profile)
    chapters = select_chapters(toc_chapters(root), wanted)
    for chapter in chapters:  # check every chapter's conventions before running the first one
        read_chapter(chapter)

    log_path = root / "book" / "logs" / f"{profile}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # A full run replaces the log; a run of some chapters adds to it, so earlier chapters' lines survive.
    with log_path.open("a" if wanted else "w") as log:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"# {stamp} profile={profile} chapters={','.join(c.stem for c in chapters)}\n")
        start = time.perf_counter()
        for i, chapter in enumerate(chapters, 1):
            key = run_key(root, chapter, profile)
            if not force and is_current(root, chapter, profile, key):
                reused, computed = cache_events(nbformat.read(chapter.notebook, as_version=4))
                artifacts = ", ".join(dict.fromkeys(reused + [name for name, _ in computed])) or "-"
                line = (
                    f"{chapter.stem}: unchanged since its last run (inputs {key[:10]}): not executed, executed "
                    f"notebook and outputs reused\n  recomputed (0): -\n  artifacts it read: {artifacts}"
                )
                print(f"[{i}/{len(chapters)}] {line}", flush=True)
                log.write(line + "\n")
                continue
            print(f"[{i}/{len(chapters)}] {chapter.stem} (profile {profile}) ...", flush=True)
            result = run_chapter(
                chapter, profile, root, progress_bar=sys.stderr.isatty() and not verbose, verbose=verbose
            )
            elapsed = time.perf_counter() - start
            print(f"[{i}/{len(chapters)}] {describe(result)}\n  elapsed {elapsed:.1f} s", flush=True)
            log.write(describe(result) + "\n")
            log.flush()
            if result.failure:
                failure = result.failure
                report = failure.summary()
                print(f"\n{failure.traceback}\n" if failure.traceback else "", file=sys.stderr)
                print(
                    f"error: {report}\n  executed notebook: {chapter.notebook.relative_to(root)}",
                    file=sys.stderr,
                )
                log.write(f"error: {report}\n")
                return 1
            _stamp_run_key(chapter, profile, key)
        log.write(f"# total {time.perf_counter() - start:.1f} s\n")
    print(f"done: {len(chapters)} chapter(s) in {time.perf_counter() - start:.1f} s; log: {log_path}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Checking the declared outputs

MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF"}


def expected_outputs(root: Path, profile: str, chapter: Chapter) -> list[Path]:
    if missing_sections(chapter, profile):
        return []
    declared = declared_outputs(chapter)
    name_ = Path(profile).stem  # a profile given as a .toml path writes under its file name (lib.book.Outputs)
    paths = []
    for name in declared.figures:
        paths += [root / "book" / "figures" / name_ / chapter.stem / f"{name}{ext}" for ext in (".png", ".pdf")]
    paths += [root / "book" / "tables" / name_ / chapter.stem / f"{name}.csv" for name in declared.tables]
    return paths


def check_outputs(root: Path, profile: str, chapters: list[Chapter]) -> list[str]:
    """One line per problem: a declared figure or table that is missing, empty or not what its extension says,
    or an executed notebook that is missing or was run with another profile."""
    problems = []
    for chapter in chapters:
        for path in expected_outputs(root, profile, chapter):
            rel = path.relative_to(root)
            if not path.is_file():
                problems.append(f"{chapter.stem}: missing {rel}")
            elif path.stat().st_size == 0:
                problems.append(f"{chapter.stem}: empty {rel}")
            elif path.suffix in MAGIC and not path.read_bytes()[:8].startswith(MAGIC[path.suffix]):
                problems.append(f"{chapter.stem}: {rel} is not a {path.suffix[1:].upper()} file")
        if not chapter.notebook.is_file():
            problems.append(f"{chapter.stem}: missing executed notebook {chapter.notebook.relative_to(root)}")
        else:
            ran_with = nbformat.read(chapter.notebook, as_version=4).metadata.get("papermill", {})
            ran_with = ran_with.get("parameters", {}).get("profile")
            if ran_with != profile:
                problems.append(
                    f"{chapter.stem}: {chapter.notebook.relative_to(root)} was executed with profile "
                    f"{ran_with!r}, not {profile!r}"
                )
    return problems


def check_book(root: Path, profile: str, wanted: list[str] | None = None) -> int:
    root = root.resolve()
    check_profile(root, profile)
    chapters = select_chapters(toc_chapters(root), wanted)
    problems = check_outputs(root, profile, chapters)
    n_files = sum(len(expected_outputs(root, profile, c)) for c in chapters)
    if problems:
        print(f"check failed ({len(problems)} problem(s), profile {profile}):", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 1
    print(f"check ok: {n_files} declared file(s) and {len(chapters)} notebook(s) for profile {profile}")
    return 0


# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.io.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default", help="profile name (lib/profiles/<name>.toml)")
    parser.add_argument("--chapter", action="append", help="chapter stem, e.g. 01_world (repeatable)")
    parser.add_argument("--check", action="store_true", help="only check the declared figures and tables")
    parser.add_argument("--verbose", "-v", action="store_true", help="echo what the cells print while they run")
    parser.add_argument("--force", action="store_true", help="execute chapters even if their inputs are unchanged")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            return check_book(args.root, args.profile, args.chapter)
        return run_book(args.root, args.profile, args.chapter, verbose=args.verbose, force=args.force)
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
