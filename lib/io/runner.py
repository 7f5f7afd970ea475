"""Execute the book's chapters and report what each did.

    python -m lib.io.runner --profile default                  # every chapter, in _toc.yml order
    python -m lib.io.runner --profile tiny --chapter 01_world  # one chapter (repeat --chapter for more)
    python -m lib.io.runner --profile default --check          # only check the outputs and the executed pages
    python -m lib.io.runner --profile tiny --outputs DIR       # notebooks, figures, tables and log under DIR

Execution and rendering are separate steps (the QuantEcon habit): this module executes each `chapters/<stem>.py`
(Jupytext percent format) with papermill, injecting the profile into the cell tagged `parameters`, and writes
`book/notebooks/<stem>.ipynb`; `jupyter-book build` then renders those notebooks without executing anything. The
chapter list, the chapters' conventions and where a run writes are in lib/io/book.py; `--check` is
lib/io/book_check.py. Everything a run writes goes under one outputs root, the repository's `book/` unless
`--outputs` names another: the runner tells the kernels through SPATIAL_BOOK_OUTPUTS, which lib/io/outputs.py reads.

The executed notebook is tidied for its page: the chapter's own `parameters` cell is tagged `remove-cell`, so the
page shows the profile once, in papermill's `injected-parameters` cell. The kernels run without progress bars.

The log (`<outputs>/logs/<profile>.log`) has one short summary per chapter: its status and time, and what its
artifact lookups reused and computed (and how long that took). The kernel's cache (lib/io/cache.py) appends one
JSON line per lookup to the file SPATIAL_CACHE_EVENTS names, a fresh one per chapter; `read_cache_events` sums it up.

A chapter whose inputs have not changed since it was last executed with the same profile (its source, the profile
files, the library and the pinned requirements, hashed into `run_key`), and whose declared outputs are all present,
is not executed again: its executed notebook and outputs are reused, as Jupyter Book's own execution cache would do.
`--force` executes every chosen chapter anyway; the expensive steps inside a chapter are cached separately
(lib/io/cache.py), so a forced run reuses every artifact whose settings did not change.

A failing cell stops the run with exit status 1 and a report naming the chapter, the cell and the exception. A
mistake the user can fix (unknown profile or chapter, malformed `_toc.yml`, a chapter that breaks the conventions)
exits with status 2 and one message naming the file and what was expected.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import nbformat
import papermill

from lib.io.book import (
    CHAPTER_DIR,
    REPO_ROOT,
    Chapter,
    RunnerError,
    check_profile,
    default_outputs,
    missing_sections,
    read_chapter,
    select_chapters,
    shown_path,
    toc_chapters,
    with_outputs,
)
from lib.io.book_check import PageProblem, check_book, check_outputs, scan_notebook

# The kernels run offline and headless: nothing comes from the hub unless the caller says so, wandb must not try to
# log in, pip must not reach an index, matplotlib must not look for a display. Nor may a page show
# a progress bar: TQDM_DISABLE turns off every tqdm bar whose caller does not pass `disable` itself (tqdm >= 4.66
# reads TQDM_<ARG> as the default of <arg>), transformers' "Loading weights" among them;
# HF_HUB_DISABLE_PROGRESS_BARS turns off the hub's bars and, read by transformers at import, its own as well.
# (TRANSFORMERS_VERBOSITY=error does not remove "Loading weights" in transformers 5.23: it only quiets the logger.)
KERNEL_ENV = {
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "PIP_NO_INDEX": "1",
    "MPLBACKEND": "Agg",
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# Added to the kernels' PYTHONWARNINGS. tqdm.auto (imported by transformers and huggingface_hub) warns "IProgress
# not found" in a kernel without ipywidgets, in a line that shows the virtual environment's path; with the bars off
# there is nothing for ipywidgets to draw, so that one warning, matched by its message, is ignored.
KERNEL_WARNING_FILTERS = ("ignore:IProgress not found",)
# KERNEL_ENV's defaults that a caller may override by setting the variable itself (to a non-empty value): the hub is
# off unless the caller turns it on (`HF_HUB_OFFLINE=0 make book PROFILE=paper`, after `make download`, reaches it).
CALLER_MAY_SET = ("HF_HUB_OFFLINE",)
# How the runner tells a kernel where to write: the outputs root (read by lib/io/outputs.py) and the file
# lib/io/cache.py appends one JSON line per artifact lookup to.
OUTPUTS_ENV = "SPATIAL_BOOK_OUTPUTS"
CACHE_EVENTS_ENV = "SPATIAL_CACHE_EVENTS"

ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# papermill adds two markdown cells with this tag to a notebook that failed (a banner and an anchor).
PAPERMILL_ERROR_TAG = "papermill-error-cell-tag"
# What a chapter's execution depends on besides its own source: a change to any of these re-executes it.
RUN_KEY_GLOBS = ("lib/**/*.py", "lib/profiles/*.toml", "requirements.txt")


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


class CacheReport(NamedTuple):
    """What a chapter's artifact lookups came to, one entry per artifact (name and key) with its last outcome."""

    reused: tuple[tuple[str, str | None], ...] = ()  # (name, store): store None for the local cache
    computed: tuple[tuple[str, float], ...] = ()  # (name, seconds its build took)
    corrupt: tuple[str, ...] = ()  # found corrupt (and so built again)
    unreadable: int = 0  # lines of the events file that were not an event

    def lines(self) -> list[str]:
        reused = [f"{name} (committed)" if store else name for name, store in self.reused]
        computed = [f"{name} ({s:.1f} s)" for name, s in self.computed]
        total = f"; {sum(s for _, s in self.computed):.1f} s in all" if len(computed) > 1 else ""
        lines = [
            f"reused ({len(reused)}): {', '.join(reused) or '-'}",
            f"computed ({len(computed)}): {', '.join(computed) or '-'}{total}",
        ]
        if self.corrupt:
            lines.append(f"corrupt, built again ({len(self.corrupt)}): {', '.join(self.corrupt)}")
        if self.unreadable:
            lines.append(f"({self.unreadable} line(s) of the cache's events file were not events)")
        return lines


def read_cache_events(path: Path) -> CacheReport:
    """Sum up what lib/io/cache.py appended to `path`: one JSON object per lookup, `{"event": "reused" | "computed"
    | "corrupt", "name", "key", "seconds", "store"}`. An artifact looked up twice counts once, as its last outcome;
    no file means no lookup."""
    last: dict[tuple[str, str], dict] = {}  # (name, key) -> its last reused/computed event, in order of outcome
    corrupt, unreadable = [], 0
    for line in path.read_text().splitlines() if path.is_file() else []:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            kind, name, key = event["event"], event["name"], str(event.get("key"))
        except (json.JSONDecodeError, KeyError, TypeError):
            unreadable += 1
            continue
        if kind == "corrupt":
            corrupt.append(name)
        elif kind in ("reused", "computed"):
            last.pop((name, key), None)
            last[(name, key)] = event
        else:
            unreadable += 1
    return CacheReport(
        reused=tuple((e["name"], e.get("store")) for e in last.values() if e["event"] == "reused"),
        computed=tuple((e["name"], float(e.get("seconds") or 0)) for e in last.values() if e["event"] == "computed"),
        corrupt=tuple(corrupt),
        unreadable=unreadable,
    )


class ChapterResult(NamedTuple):
    chapter: Chapter
    seconds: float
    cache: CacheReport
    failure: CellFailure | None
    problems: list[PageProblem]  # what the executed page shows that it must not (lib/io/book_check.py)


# --------------------------------------------------------------------------------------------------------------
# Execution


@contextlib.contextmanager
def kernel_environment(root: Path, outputs: Path, cache_events: Path) -> Iterator[None]:
    """Set the kernels' environment (they inherit ours) and restore the caller's afterwards."""
    saved = dict(os.environ)
    os.environ.update(KERNEL_ENV)
    os.environ.update({k: saved[k] for k in CALLER_MAY_SET if saved.get(k)})
    os.environ[OUTPUTS_ENV] = str(outputs)
    os.environ[CACHE_EVENTS_ENV] = str(cache_events)
    # The kernel's cwd is the root too, but PYTHONPATH also covers code that changes directory.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), saved.get("PYTHONPATH")) if p)
    os.environ["PYTHONWARNINGS"] = ",".join(w for w in (saved.get("PYTHONWARNINGS"), *KERNEL_WARNING_FILTERS) if w)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _not_applicable(chapter: Chapter, nb: nbformat.NotebookNode, profile: str, missing: list[str], root: Path):
    """The book page of a chapter that does not apply to a profile: its introduction and one line saying why."""
    intro = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    sections = ", ".join(f"[{m}]" for m in missing)
    note = nbformat.v4.new_markdown_cell(
        f"**Not run with profile `{profile}`:** this chapter needs the profile section(s) {sections}, which "
        f"`{profile}` does not have. It is about the self-contained organism; the paper's models enter in the "
        "chapters that follow."
    )
    page = nbformat.v4.new_notebook(cells=[c for c in (intro, note) if c is not None], metadata=nb.metadata)
    page.metadata["papermill"] = {"parameters": {"profile": profile}, "input_path": shown_path(chapter.source, root)}
    nbformat.write(page, chapter.notebook)


def run_chapter(
    chapter: Chapter,
    profile: str,
    root: Path,
    outputs: Path | None = None,
    progress_bar: bool = False,
    verbose: bool = False,
) -> ChapterResult:
    """Execute one chapter into `chapter.notebook`, its figures and tables under `outputs` (default: the
    repository's book/). A failing cell is returned as `failure`, not raised. A chapter that needs a profile section
    the profile lacks (`missing_sections`) is not executed: its page says so.

    `verbose` echoes what the cells print (stdout and stderr) while they run, e.g. for CI logs.
    """
    root = root.resolve()
    outputs = (outputs or default_outputs(root)).resolve()
    nb = read_chapter(chapter)
    chapter.notebook.parent.mkdir(parents=True, exist_ok=True)
    missing = missing_sections(chapter, profile, nb)
    if missing:
        _not_applicable(chapter, nb, profile, missing, root)
        return ChapterResult(chapter, 0.0, CacheReport(), None, [])
    # A fresh events file for this chapter's cache lookups, outside the tree, read once the kernel is done.
    fd, events_name = tempfile.mkstemp(prefix=f"cache-events-{chapter.stem}-", suffix=".jsonl")
    os.close(fd)
    events = Path(events_name)
    started = time.perf_counter()
    failure = None
    try:
        with kernel_environment(root, outputs, events):
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
    finally:
        cache = read_cache_events(events)
        events.unlink(missing_ok=True)
    seconds = time.perf_counter() - started

    executed = _finish_notebook(chapter, root)
    problems = scan_notebook(executed, chapter.stem) if executed is not None and failure is None else []
    return ChapterResult(chapter, seconds, cache, failure, problems)


def _finish_notebook(chapter: Chapter, root: Path) -> nbformat.NotebookNode | None:
    """Tidy the executed notebook for its page.

    papermill records its input and output in the metadata (given a NotebookNode as input, the whole notebook):
    both become paths relative to the root, so the page stays small and free of this machine's paths. The page
    shows the profile once, in papermill's `injected-parameters` cell: the chapter's own `parameters` cell, whose
    defaults it overrides, is tagged `remove-cell`."""
    if not chapter.notebook.is_file():
        return None
    executed = nbformat.read(chapter.notebook, as_version=4)
    meta = executed.metadata.setdefault("papermill", {})
    meta["input_path"] = shown_path(chapter.source, root)
    meta["output_path"] = shown_path(chapter.notebook.resolve(), root)
    if any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells):
        for cell in executed.cells:
            tags = cell.metadata.get("tags", [])
            if "parameters" in tags and "remove-cell" not in tags:
                cell.metadata["tags"] = [*tags, "remove-cell"]
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


# --------------------------------------------------------------------------------------------------------------
# The book: every chosen chapter in order, skipping the unchanged ones, with a log


def run_key(root: Path, chapter: Chapter, profile: str) -> str:
    """SHA-256 of the chapter source, the profile name, and every file in RUN_KEY_GLOBS (paths and contents)."""
    h = hashlib.sha256(f"profile={profile}\n".encode())
    files = {chapter.source} | {p for pattern in RUN_KEY_GLOBS for p in root.glob(pattern) if p.is_file()}
    for path in sorted(files):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _last_run(chapter: Chapter) -> dict:
    """What `_stamp_run` recorded in the executed notebook ({} if nothing)."""
    if not chapter.notebook.is_file():
        return {}
    return nbformat.read(chapter.notebook, as_version=4).metadata.get("book_run", {})


def is_current(root: Path, chapter: Chapter, profile: str, key: str, outputs: Path | None = None) -> bool:
    """The executed notebook was made from exactly these inputs and every declared output is still there."""
    last = _last_run(chapter)
    return (
        last.get("key") == key
        and last.get("profile") == profile
        and not check_outputs(root, profile, [chapter], outputs)
    )


def _stamp_run(chapter: Chapter, profile: str, key: str, cache: CacheReport) -> None:
    """Record in the executed notebook what it was made from and which artifacts it read (for the log of a later
    run that skips it)."""
    nb = nbformat.read(chapter.notebook, as_version=4)
    artifacts = list(dict.fromkeys([name for name, _ in cache.reused] + [name for name, _ in cache.computed]))
    nb.metadata["book_run"] = {"key": key, "profile": profile, "artifacts": artifacts}
    nbformat.write(nb, chapter.notebook)


def describe(result: ChapterResult) -> str:
    """The chapter's entry in the log: status and time, its cache summary, and what its page must not show."""
    status = "FAILED" if result.failure else "ok"
    lines = [f"{result.chapter.stem}: {status} in {result.seconds:.1f} s"]
    lines += [f"  {line}" for line in result.cache.lines()]
    if result.problems:
        lines.append(f"  its page shows {len(result.problems)} thing(s) it must not (`--check` fails on them):")
        lines += [f"    {p}" for p in result.problems]
    return "\n".join(lines)


def run_book(
    root: Path,
    profile: str,
    wanted: list[str] | None = None,
    verbose: bool = False,
    force: bool = False,
    outputs: Path | None = None,
) -> int:
    """Execute the chosen chapters in toc order; stop at the first failure. Returns the exit status.

    Notebooks, figures, tables and the log go under `outputs` (default: the repository's book/). A chapter that
    `is_current` is skipped unless `force`."""
    root = root.resolve()
    outputs = (outputs or default_outputs(root)).resolve()
    check_profile(root, profile)
    chapters = with_outputs(select_chapters(toc_chapters(root), wanted), root, outputs)
    for chapter in chapters:  # check every chapter's conventions before running the first one
        read_chapter(chapter)

    log_path = outputs / "logs" / f"{profile}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # A full run replaces the log; a run of some chapters adds to it, so earlier chapters' lines survive.
    with log_path.open("a" if wanted else "w") as log:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"# {stamp} profile={profile} chapters={','.join(c.stem for c in chapters)}\n")
        start = time.perf_counter()
        for i, chapter in enumerate(chapters, 1):
            key = run_key(root, chapter, profile)
            if not force and is_current(root, chapter, profile, key, outputs):
                read = ", ".join(_last_run(chapter).get("artifacts", [])) or "-"
                line = (
                    f"{chapter.stem}: unchanged since its last run (inputs {key[:10]}): not executed, executed "
                    f"notebook and outputs reused\n  artifacts its last run read: {read}"
                )
                print(f"[{i}/{len(chapters)}] {line}", flush=True)
                log.write(line + "\n")
                continue
            print(f"[{i}/{len(chapters)}] {chapter.stem} (profile {profile}) ...", flush=True)
            result = run_chapter(
                chapter, profile, root, outputs, progress_bar=sys.stderr.isatty() and not verbose, verbose=verbose
            )
            elapsed = time.perf_counter() - start
            print(f"[{i}/{len(chapters)}] {describe(result)}\n  elapsed {elapsed:.1f} s", flush=True)
            log.write(describe(result) + "\n")
            log.flush()
            if result.failure:
                failure = result.failure
                report = failure.summary()
                print(f"\n{failure.traceback}\n" if failure.traceback else "", file=sys.stderr)
                print(f"error: {report}\n  executed notebook: {shown_path(chapter.notebook, root)}", file=sys.stderr)
                log.write(f"error: {report}\n")
                return 1
            _stamp_run(chapter, profile, key, result.cache)
        log.write(f"# total {time.perf_counter() - start:.1f} s\n")
    print(f"done: {len(chapters)} chapter(s) in {time.perf_counter() - start:.1f} s; log: {log_path}")
    return 0


# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.io.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default", help="profile name (lib/profiles/<name>.toml)")
    parser.add_argument("--chapter", action="append", help="chapter stem, e.g. 01_world (repeatable)")
    parser.add_argument("--check", action="store_true", help="only check the declared outputs and executed pages")
    parser.add_argument("--verbose", "-v", action="store_true", help="echo what the cells print while they run")
    parser.add_argument("--force", action="store_true", help="execute chapters even if their inputs are unchanged")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: this checkout)")
    parser.add_argument("--outputs", type=Path, help="where notebooks, figures, tables and log go (<root>/book)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            return check_book(args.root, args.profile, args.chapter, args.outputs)
        return run_book(args.root, args.profile, args.chapter, args.verbose, args.force, args.outputs)
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
