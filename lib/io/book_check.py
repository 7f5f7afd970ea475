"""What a run of the book must have produced, and what no page of it may show a reader (`python -m lib.io.runner
--check`, `make check`).

`check_outputs`: every figure and table a chapter declares exists, is not empty and is what its extension says,
and every executed notebook was run with the profile being checked.

The scanners: a page must not show an absolute path of the machine that built it (the checkout, the virtual
environment, site-packages, the temporary directory), a Python warning, a traceback or error output, text written
to stderr, or what a progress bar leaves behind. The same rules are applied twice:

* `scan_notebook` reads every output of every code cell of an executed notebook; `--check` runs it on each
  chapter, so a problem is caught before the HTML is built;
* `scan_html` reads a page of the built book; tests/test_rendered.py runs it on every page (`make rendered`).

Each problem is one `PageProblem`, printed as `<page>, cell <n> (<first line of its source>): <kind>: <text>`.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

import nbformat

from lib.io.book import (
    REPO_ROOT,
    Chapter,
    check_profile,
    default_outputs,
    expected_outputs,
    select_chapters,
    shown_path,
    toc_chapters,
    with_outputs,
)

MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF"}  # how a file of each binary kind the chapters write starts

# Python's warnings format, `<file>:<line>: <Category>: <message>`, and the same without the location (a warning
# that went through logging): a line that starts with a capitalised `...Warning: `.
WARNING_RE = re.compile(r"^(?:.*:\d+: )?[A-Z]\w*Warning: ")
TRACEBACK_MARK = "Traceback (most recent call last)"
# What tqdm draws: "Loading weights:  40%|████      | 8/21 [00:01<00:02, 6.1it/s]".
PROGRESS_RE = re.compile(r"\d+%\|.*\|\s*\d+/\d+")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Cells whose outputs the page does not show (Jupyter Book's cell tags, honoured by myst-nb).
HIDDEN_OUTPUT_TAGS = ("remove-cell", "remove-output")
# myst-nb's CSS class of an output in a built page -> the kind of problem it is
FLAGGED_OUTPUTS = {"stderr": "stderr output", "traceback": "error output"}
EXCERPT = 160  # characters of an offending line quoted in a report


# --------------------------------------------------------------------------------------------------------------
# The declared outputs


def check_outputs(root: Path, profile: str, chapters: list[Chapter], outputs: Path | None = None) -> list[str]:
    """One line per problem: a declared figure or table under `outputs` (default: the repository's book/) that is
    missing, empty or not what its extension says, or an executed notebook that is missing or was run with another
    profile."""
    outputs = outputs or default_outputs(root)
    problems = []
    for chapter in chapters:
        for path in expected_outputs(outputs, profile, chapter):
            shown = shown_path(path, root)
            if not path.is_file():
                problems.append(f"{chapter.stem}: missing {shown}")
            elif path.stat().st_size == 0:
                problems.append(f"{chapter.stem}: empty {shown}")
            elif path.suffix in MAGIC and not path.read_bytes()[:8].startswith(MAGIC[path.suffix]):
                problems.append(f"{chapter.stem}: {shown} is not a {path.suffix[1:].upper()} file")
        notebook = shown_path(chapter.notebook, root)
        if not chapter.notebook.is_file():
            problems.append(f"{chapter.stem}: missing executed notebook {notebook}")
            continue
        ran_with = nbformat.read(chapter.notebook, as_version=4).metadata.get("papermill", {})
        ran_with = ran_with.get("parameters", {}).get("profile")
        if ran_with != profile:
            problems.append(f"{chapter.stem}: {notebook} was executed with profile {ran_with!r}, not {profile!r}")
    return problems


def check_book(root: Path, profile: str, wanted: list[str] | None = None, outputs: Path | None = None) -> int:
    """`--check`: the declared outputs, then every executed page; prints what is wrong and returns 1, else 0."""
    root = root.resolve()
    outputs = (outputs or default_outputs(root)).resolve()
    check_profile(root, profile)
    chapters = with_outputs(select_chapters(toc_chapters(root), wanted), root, outputs)
    problems = check_outputs(root, profile, chapters, outputs)
    shown = [p for c in chapters if c.notebook.is_file() for p in scan_notebook(nbformat.read(c.notebook, 4), c.stem)]
    if problems:
        print(f"check failed ({len(problems)} problem(s), profile {profile}):", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
    if shown:
        print(f"check failed: {len(shown)} thing(s) the pages must not show:", file=sys.stderr)
        print("\n".join(f"  {p}" for p in shown), file=sys.stderr)
    if problems or shown:
        return 1
    n_files = sum(len(expected_outputs(outputs, profile, c)) for c in chapters)
    print(
        f"check ok: {n_files} declared file(s) and {len(chapters)} notebook(s) for profile {profile}; no page shows "
        "a machine path, a warning, an error, stderr or a progress bar"
    )
    return 0


# --------------------------------------------------------------------------------------------------------------
# What a page must not show


class PageProblem(NamedTuple):
    page: str  # chapter stem or page path
    cell: int | None  # index of the code cell (in the notebook, or among the cells the page shows); None: the page
    source: str  # first line of the cell's source ("" when unknown)
    kind: str  # "absolute path", "warning", "traceback", "error output", "stderr output", "progress bar"
    text: str  # the offending line, shortened

    def __str__(self) -> str:
        if self.cell is None:
            where = "outside any cell"
        else:
            where = f"cell {self.cell}" + (f" ({self.source})" if self.source else "")
        return f"{self.page}, {where}: {self.kind}: {self.text}"


def machine_paths() -> tuple[str, ...]:
    """The absolute paths of this machine a page must not show, longest first."""
    paths = {
        str(REPO_ROOT),
        os.path.realpath(REPO_ROOT),
        sys.prefix,
        os.path.realpath(sys.prefix),
        "site-packages",
        "/tmp/",
        os.path.join(tempfile.gettempdir(), ""),
    }
    return tuple(sorted(paths, key=len, reverse=True))


def _excerpt(line: str) -> str:
    line = line.strip()
    return line if len(line) <= EXCERPT else line[: EXCERPT - 3] + "..."


def text_problems(text: str, paths: tuple[str, ...]) -> list[tuple[str, str]]:
    """(kind, offending line) for each line of output text that shows a machine path, a warning, a traceback or a
    progress bar: one kind per line, in that order; a bar, however many frames it drew, once."""
    text = ANSI_RE.sub("", text)
    found = []
    for line in text.replace("\r", "\n").splitlines():
        if any(p in line for p in paths):
            kind = "absolute path"
        elif WARNING_RE.match(line):
            kind = "warning"
        elif TRACEBACK_MARK in line:
            kind = "traceback"
        elif PROGRESS_RE.search(line):
            kind = "progress bar"
        else:
            continue
        if kind != "progress bar" or not _has_bar(found):
            found.append((kind, _excerpt(line)))
    if "\r" in text and not _has_bar(found):  # something redrawn in place: the stream keeps every frame
        last = next((f for f in reversed(text.split("\r")) if f.strip()), "")
        found.append(("progress bar", _excerpt(last)))
    return found


def _has_bar(found: list[tuple[str, str]]) -> bool:
    return any(kind == "progress bar" for kind, _ in found)


def _first_line(source: str) -> str:
    return _excerpt(next((line for line in source.splitlines() if line.strip()), ""))


def _output_text(output: nbformat.NotebookNode) -> str:
    """Everything textual an output shows (images are skipped: base64 can contain any short string)."""
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return "\n".join(
        value if isinstance(value, str) else "\n".join(value) if isinstance(value, list) else ""
        for mime, value in data.items()
        if not mime.startswith("image/")
    )


def scan_notebook(nb: nbformat.NotebookNode, page: str, paths: tuple[str, ...] | None = None) -> list[PageProblem]:
    """Every problem in the outputs of an executed notebook, except those of cells the page does not show."""
    paths = machine_paths() if paths is None else paths
    problems = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or any(t in cell.metadata.get("tags", []) for t in HIDDEN_OUTPUT_TAGS):
            continue
        source = _first_line(cell.source)
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                text = ANSI_RE.sub("", f"{output.get('ename', '')}: {output.get('evalue', '')}")
                problems.append(PageProblem(page, index, source, "error output", _excerpt(text)))
                continue
            text = _output_text(output)
            found = text_problems(text, paths)
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                found.insert(0, ("stderr output", _first_line(ANSI_RE.sub("", text).replace("\r", "\n"))))
            problems += [PageProblem(page, index, source, kind, line) for kind, line in found]
    return problems


class _PageCells(HTMLParser):
    """The code cells of a page as myst-nb writes them: `div.cell` holding `div.cell_input` (the source) and
    `div.cell_output`, which holds one `div.output <kind>` per output (`stream`, `stderr`, `traceback`,
    `text_html`, ...). Collects each cell's source and outputs, and the rest of the page (text and attribute values
    outside the cells' inputs and outputs)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.cells: list[dict] = []  # {"input": [text], "outputs": [(problem kind or None, [text])]}
        self.rest: list[str] = []
        self._stack: list[str | None] = []  # per open div: "input", "output", or None (inside: as its parent)

    def _part(self) -> str | None:
        return next((p for p in reversed(self._stack) if p), None)

    def handle_starttag(self, tag, attrs):
        if self._part() is None:
            self.rest += [value for _, value in attrs if value]
        if tag != "div":
            return
        classes = (dict(attrs).get("class") or "").split()
        part = None
        if "cell" in classes:
            self.cells.append({"input": [], "outputs": []})
        elif self.cells and "cell_input" in classes:
            part = "input"
        elif self.cells and "cell_output" in classes:
            part = "output"
        elif self._part() == "output" and "output" in classes:
            kind = next((k for css, k in FLAGGED_OUTPUTS.items() if css in classes), None)
            self.cells[-1]["outputs"].append((kind, []))
        self._stack.append(part)

    def handle_endtag(self, tag):
        if tag == "div" and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        part = self._part()
        if part is None:
            self.rest.append(data)
        elif part == "input":
            self.cells[-1]["input"].append(data)
        else:
            outputs = self.cells[-1]["outputs"]
            if not outputs:
                outputs.append((None, []))
            outputs[-1][1].append(data)


def scan_html(page_html: str, page: str, paths: tuple[str, ...] | None = None) -> list[PageProblem]:
    """Every problem a built page shows: in its cells (counted from 0 among the cells the page shows; machine paths
    in a cell's source too), and machine paths anywhere else in the page, markup included."""
    paths = machine_paths() if paths is None else paths
    parser = _PageCells()
    parser.feed(page_html)
    parser.close()
    problems = []
    for index, cell in enumerate(parser.cells):
        source = "".join(cell["input"])
        found = [(kind, line) for kind, line in text_problems(source, paths) if kind == "absolute path"]
        for flagged, chunks in cell["outputs"]:
            text = "".join(chunks)
            found += [(flagged, _first_line(text))] if flagged else []
            found += text_problems(text, paths)
        problems += [PageProblem(page, index, _first_line(source), kind, line) for kind, line in found]
    rest = "\n".join(parser.rest)
    problems += [PageProblem(page, None, "", k, line) for k, line in text_problems(rest, paths) if k == "absolute path"]
    return problems
