"""lib/io/runner.py (with lib/io/book.py and lib/io/book_check.py) on a throwaway book: its own _toc.yml, profiles
and chapters in a temporary directory.

The tests that execute chapters start real kernels (about 2 s each); the chapters they run are a few lines long.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from lib.io import book, book_check, runner
from lib.io.book import REPO_ROOT, RunnerError

HEADER = """\
# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   book_outputs:
#     figures: [{figures}]
#     tables: [{tables}]
# ---

# %% [markdown]
# # {title}

# %% tags=["parameters"]
profile = "default"
"""


def write_chapter(root: Path, stem: str, body: str, figures: str = "", tables: str = "") -> Path:
    path = root / "chapters" / f"{stem}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER.format(figures=figures, tables=tables, title=stem) + "\n" + textwrap.dedent(body))
    return path


def write_toc(root: Path, stems: list[str]) -> None:
    lines = ["format: jb-book", "root: book/intro", "chapters:"]
    lines += [f"  - file: book/notebooks/{stem}" for stem in stems]
    (root / "_toc.yml").write_text("\n".join(lines) + "\n")


def make_book(tmp_path: Path) -> Path:
    root = tmp_path / "book_root"
    (root / "lib" / "profiles").mkdir(parents=True)
    for name in ("tiny", "default"):  # the runner only needs the names; the chapters here never load them
        (root / "lib" / "profiles" / f"{name}.toml").write_text("")
    return root


# Variables the runner must set for the kernels itself, whatever the calling shell has.
RUNNER_SETS = (*runner.KERNEL_ENV, runner.OUTPUTS_ENV, runner.CACHE_EVENTS_ENV, "PYTHONWARNINGS")


def run(root: Path, *args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    """The runner as `make` calls it: a separate process, judged by its exit status and what it prints."""
    env = {k: v for k, v in os.environ.items() if k not in RUNNER_SETS}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-m", "lib.io.runner", "--root", str(root), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# A chapter that reports the profile and environment it saw, runs a tqdm bar (which must leave nothing behind),
# records cache lookups the way lib/io/cache.py does (one JSON line each, in the file SPATIAL_CACHE_EVENTS names),
# and saves what it declares under the outputs root the runner gave it.
GOOD_BODY = """\
# %%
import json
import os
from pathlib import Path

from tqdm.auto import tqdm

ENV = ("HF_HUB_OFFLINE", "WANDB_MODE", "PIP_NO_INDEX", "MPLBACKEND", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")
print("profile seen:", profile)
print("env:", *(f"{k}={os.environ.get(k)}" for k in ENV))
print("cwd:", Path.cwd().name)
print("outputs under the root:", os.environ["SPATIAL_BOOK_OUTPUTS"] == str(Path.cwd() / "book"))
for _ in tqdm(range(3), desc="a bar"):
    pass
with open(os.environ["SPATIAL_CACHE_EVENTS"], "a") as f:
    for event in [
        {"event": "reused", "name": "world", "key": "0123456789abcdef", "seconds": None, "store": None},
        {"event": "reused", "name": "organism", "key": "0123456789abcdee", "seconds": None, "store": "artifacts"},
        {"event": "computed", "name": "lm", "key": "abcdef0123456789", "seconds": 2.5, "store": None},
    ]:
        f.write(json.dumps(event) + "\\n")

# %%
out = Path(os.environ["SPATIAL_BOOK_OUTPUTS"])
fig_dir = out / "figures" / profile / "01_good"
fig_dir.mkdir(parents=True, exist_ok=True)
(fig_dir / "curve.png").write_bytes(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(16))
(fig_dir / "curve.pdf").write_bytes(b"%PDF-1.4\\n")
table_dir = out / "tables" / profile / "01_good"
table_dir.mkdir(parents=True, exist_ok=True)
(table_dir / "counts.csv").write_text("name,count\\nx,1\\n")
"""

BAD_BODY = """\
# %%
x = 1

# %%
# A comment first: the report must show the first line of the failing cell's source.
values = [1, 2, 3]
raise ValueError(f"boom at {len(values)}")

# %%
print("never reached")
"""


@pytest.fixture(scope="module")
def executed_book(tmp_path_factory):
    """One run of a two-chapter book (the second fails), shared by the tests that read its results."""
    root = make_book(tmp_path_factory.mktemp("executed"))
    write_chapter(root, "01_good", GOOD_BODY, figures="curve", tables="counts")
    write_chapter(root, "02_bad", BAD_BODY)
    write_chapter(root, "03_after", "# %%\nprint('after')\n")
    write_toc(root, ["01_good", "02_bad", "03_after"])
    return root, run(root, "--profile", "tiny")


def test_failing_cell_names_chapter_cell_and_exception(executed_book):
    root, done = executed_book
    assert done.returncode == 1, done.stdout + done.stderr
    err = done.stderr
    # Cells of 02_bad as Jupytext reads it: 0 markdown title, 1 parameters, 2 `x = 1`, 3 the failing one.
    assert "chapter 02_bad failed in cell 3 (chapters/02_bad.py:" in err, err
    assert "# A comment first" in err
    assert "ValueError: boom at 3" in err
    line = int(err.split("chapters/02_bad.py:")[1].split(")")[0])
    source_lines = (root / "chapters" / "02_bad.py").read_text().splitlines()
    assert source_lines[line - 1].startswith("# A comment first"), f"line {line} is not where the cell starts"


def test_run_stops_at_the_first_failure(executed_book):
    root, done = executed_book
    assert "[1/3] 01_good" in done.stdout and "[2/3] 02_bad" in done.stdout
    assert "03_after" not in done.stdout
    assert not (root / "book" / "notebooks" / "03_after.ipynb").exists()
    # papermill keeps the partial notebook with the traceback, for reading the failure in full.
    assert (root / "book" / "notebooks" / "02_bad.ipynb").is_file()


def test_profile_is_injected_and_kernel_environment_set(executed_book):
    root, _ = executed_book
    nb = nbformat.read(root / "book" / "notebooks" / "01_good.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'profile = "tiny"' in injected[0].source
    assert nb.metadata.papermill.parameters == {"profile": "tiny"}
    assert nb.metadata.papermill.input_path == "chapters/01_good.py"  # not the whole notebook (papermill's default)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "profile seen: tiny" in text
    env = "HF_HUB_OFFLINE=1 WANDB_MODE=disabled PIP_NO_INDEX=1 MPLBACKEND=Agg"
    assert f"{env} TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1" in text
    assert "cwd: book_root" in text
    assert "outputs under the root: True" in text


def test_page_shows_the_profile_once_and_no_progress_bar(executed_book):
    """The chapter's own `parameters` cell is removed from the page (papermill's injected one says the profile), and
    the tqdm bar left nothing: no stderr, no IProgress warning with the venv's path, nothing the scanner flags."""
    root, _ = executed_book
    nb = nbformat.read(root / "book" / "notebooks" / "01_good.ipynb", as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells if c.cell_type == "code"]
    assert tags[0] == ["parameters", "remove-cell"] and tags[1] == ["injected-parameters"], tags
    assert not any("remove-cell" in t for t in tags[1:])
    assert book_check.scan_notebook(nb, "01_good") == []
    assert not any(o.get("name") == "stderr" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert nb.metadata.papermill.output_path == "book/notebooks/01_good.ipynb"


def test_log_summarises_cache_use_and_time(executed_book):
    root, done = executed_book
    log = (root / "book" / "logs" / "tiny.log").read_text()
    assert "01_good: ok in" in log
    assert "  reused (2): world, organism (committed)\n  computed (1): lm (2.5 s)\n" in log
    assert "02_bad: FAILED" in log
    assert "reused (2): world, organism (committed)" in done.stdout  # progress output carries the same summary
    assert "[cache]" not in log


def test_check_passes_for_what_was_written(executed_book):
    root, _ = executed_book
    done = run(root, "--profile", "tiny", "--check", "--chapter", "01_good")
    assert done.returncode == 0, done.stderr
    assert "3 declared file(s)" in done.stdout


def test_check_names_missing_and_empty_outputs(executed_book):
    root, _ = executed_book
    (root / "book" / "figures" / "tiny" / "01_good" / "curve.pdf").unlink()
    (root / "book" / "tables" / "tiny" / "01_good" / "counts.csv").write_text("")
    done = run(root, "--profile", "tiny", "--check", "--chapter", "01_good")
    assert done.returncode == 1
    assert "01_good: missing book/figures/tiny/01_good/curve.pdf" in done.stderr
    assert "01_good: empty book/tables/tiny/01_good/counts.csv" in done.stderr
    assert "curve.png" not in done.stderr


def test_check_without_running_names_every_missing_file_and_notebook(tmp_path):
    root = make_book(tmp_path)
    write_chapter(root, "01_fig", "# %%\npass\n", figures="scene_grid, counts", tables="counts")
    write_toc(root, ["01_fig"])
    done = run(root, "--profile", "default", "--check")
    assert done.returncode == 1
    for rel in (
        "figures/default/01_fig/scene_grid.png",
        "figures/default/01_fig/scene_grid.pdf",
        "figures/default/01_fig/counts.png",
        "tables/default/01_fig/counts.csv",
    ):
        assert f"missing book/{rel}" in done.stderr
    assert "missing executed notebook book/notebooks/01_fig.ipynb" in done.stderr


def test_check_rejects_a_notebook_executed_with_another_profile(tmp_path):
    root = make_book(tmp_path)
    write_chapter(root, "01_x", "# %%\npass\n")
    write_toc(root, ["01_x"])
    nb = nbformat.v4.new_notebook(metadata={"papermill": {"parameters": {"profile": "tiny"}}})
    (root / "book" / "notebooks").mkdir(parents=True)
    nbformat.write(nb, root / "book" / "notebooks" / "01_x.ipynb")
    problems = book_check.check_outputs(root, "default", book.toc_chapters(root))
    assert problems == ["01_x: book/notebooks/01_x.ipynb was executed with profile 'tiny', not 'default'"]


def test_check_rejects_a_file_that_is_not_what_its_extension_says(tmp_path):
    root = make_book(tmp_path)
    write_chapter(root, "01_x", "# %%\npass\n", figures="f")
    write_toc(root, ["01_x"])
    fig_dir = root / "book" / "figures" / "default" / "01_x"
    fig_dir.mkdir(parents=True)
    (fig_dir / "f.png").write_text("not a png")
    (fig_dir / "f.pdf").write_bytes(b"%PDF-1.7\n")
    problems = book_check.check_outputs(root, "default", book.toc_chapters(root))
    assert "01_x: book/figures/default/01_x/f.png is not a PNG file" in problems
    assert not any("f.pdf" in p for p in problems)


# ---------------------------------------------------------------------------------------------------------------
# Mistakes a user can make: exit status 2 and one message naming what was expected (no kernel is started).


def test_unknown_profile_is_a_clear_error(tmp_path):
    root = make_book(tmp_path)
    write_chapter(root, "01_x", "# %%\npass\n")
    write_toc(root, ["01_x"])
    done = run(root, "--profile", "huge")
    assert done.returncode == 2
    assert "unknown profile 'huge': expected one of default, tiny" in done.stderr
    assert not (root / "book" / "notebooks").exists()


def test_unknown_chapter_is_a_clear_error(tmp_path):
    root = make_book(tmp_path)
    write_chapter(root, "01_x", "# %%\npass\n")
    write_toc(root, ["01_x"])
    done = run(root, "--profile", "tiny", "--chapter", "07_missing")
    assert done.returncode == 2
    assert "unknown chapter '07_missing': _toc.yml lists 01_x" in done.stderr


def test_toc_entry_without_chapter_file_is_a_clear_error(tmp_path):
    root = make_book(tmp_path)
    write_toc(root, ["01_nowhere"])
    with pytest.raises(RunnerError, match=r"lists `book/notebooks/01_nowhere`, so .*chapters/01_nowhere.py should"):
        book.toc_chapters(root)


def test_chapter_without_parameters_cell_is_rejected_before_running(tmp_path):
    root = make_book(tmp_path)
    path = root / "chapters" / "01_noparams.py"
    path.parent.mkdir(parents=True)
    path.write_text("# %%\nprofile = 'default'\n\n# %%\nprint(1)\n")
    write_toc(root, ["01_noparams"])
    done = run(root, "--profile", "tiny")
    assert done.returncode == 2
    assert "01_noparams.py: the first code cell must be tagged `parameters`" in done.stderr


def test_malformed_book_outputs_names_the_field(tmp_path):
    root = make_book(tmp_path)
    path = write_chapter(root, "01_x", "# %%\npass\n")
    path.write_text(path.read_text().replace("#     figures: []", "#     figure: [oops]"))
    write_toc(root, ["01_x"])
    with pytest.raises(RunnerError, match=r"01_x.py: header field `jupyter.book_outputs`"):
        book.declared_outputs(book.toc_chapters(root)[0])


# ---------------------------------------------------------------------------------------------------------------
# Pure functions


def test_toc_order_follows_parts_chapters_and_sections(tmp_path):
    root = make_book(tmp_path)
    for stem in ("01_a", "02_b", "03_c"):
        write_chapter(root, stem, "# %%\npass\n")
    (root / "_toc.yml").write_text(
        textwrap.dedent("""\
        format: jb-book
        root: book/intro
        parts:
          - caption: Second first
            chapters:
              - file: book/notebooks/02_b
                sections:
                  - file: book/notebooks/03_c
          - caption: Then
            chapters:
              - file: book/methods
              - file: book/notebooks/01_a.ipynb
        """)
    )
    assert book.toc_files(root) == [
        "book/intro",
        "book/notebooks/02_b",
        "book/notebooks/03_c",
        "book/methods",
        "book/notebooks/01_a",
    ]
    assert [c.stem for c in book.toc_chapters(root)] == ["02_b", "03_c", "01_a"]
    assert [c.stem for c in book.select_chapters(book.toc_chapters(root), ["01_a", "chapters/02_b.py"])] == [
        "02_b",
        "01_a",
    ]


def test_cache_events_file_becomes_one_short_summary(tmp_path):
    """The JSON lines lib/io/cache.py appends (written here by hand): an artifact looked up twice counts once, as its
    last outcome; a corrupt one is named; a line that is not an event is counted, not fatal."""

    def event(kind, name, key, seconds=None, store=None):
        return json.dumps({"event": kind, "name": name, "key": key, "seconds": seconds, "store": store})

    path = tmp_path / "events.jsonl"
    lines = [
        event("reused", "world", "k1"),
        event("reused", "world", "k1"),
        event("reused", "organism", "k2", store="artifacts"),
        event("corrupt", "sae_l3", "k3"),
        event("computed", "sae_l3", "k3", seconds=12.25),
        event("computed", "probe", "k4", seconds=0.5),
        "not json",
        "",
    ]
    path.write_text("\n".join(lines) + "\n")
    report = runner.read_cache_events(path)
    assert report.reused == (("world", None), ("organism", "artifacts"))
    assert report.computed == (("sae_l3", 12.25), ("probe", 0.5))
    assert report.corrupt == ("sae_l3",) and report.unreadable == 1
    assert report.lines() == [
        "reused (2): world, organism (committed)",
        "computed (2): sae_l3 (12.2 s), probe (0.5 s); 12.8 s in all",
        "corrupt, built again (1): sae_l3",
        "(1 line(s) of the cache's events file were not events)",
    ]
    assert runner.read_cache_events(tmp_path / "none.jsonl").lines() == ["reused (0): -", "computed (0): -"]


def test_failing_cell_index_ignores_papermills_inserted_cells():
    """A notebook as papermill leaves it after a failure in the first cell after the parameters: an error banner
    at the top, the injected parameters, an anchor before the failing cell. papermill reports index 3."""

    def cell(tag=None, kind="code"):
        c = nbformat.v4.new_code_cell("x") if kind == "code" else nbformat.v4.new_markdown_cell("x")
        c.metadata["tags"] = [tag] if tag else []
        return c

    marker = "papermill-error-cell-tag"
    executed = nbformat.v4.new_notebook(
        cells=[
            cell(marker, "markdown"),
            cell(kind="markdown"),  # chapter cell 0
            cell("parameters"),  # chapter cell 1
            cell("injected-parameters"),
            cell(marker, "markdown"),
            cell(),  # chapter cell 2: the failing one
        ]
    )
    assert runner._source_index(3, executed) == 2


def test_known_profiles_are_the_ones_lib_profiles_loads():
    profiles = pytest.importorskip("lib.io.profiles")
    assert book.known_profiles(REPO_ROOT) == profiles.available_profiles()


def test_repository_toc_lists_existing_chapters_with_valid_headers():
    """The real _toc.yml: every chapter it names exists, follows the conventions and declares its outputs."""
    chapters = book.toc_chapters(REPO_ROOT)
    assert chapters, "_toc.yml lists no chapter"
    for chapter in chapters:
        book.read_chapter(chapter)


def test_unchanged_chapter_is_not_executed_again_and_force_executes_it(tmp_path):
    root = make_book(tmp_path)
    write_chapter(root, "01_good", GOOD_BODY, figures="curve", tables="counts")
    write_toc(root, ["01_good"])
    assert run(root, "--profile", "tiny").returncode == 0
    second = run(root, "--profile", "tiny")
    assert second.returncode == 0 and "unchanged since its last run" in second.stdout
    assert "not executed" in (root / "book" / "logs" / "tiny.log").read_text()
    # another profile, a missing output, an edited chapter or --force: executed again
    for change in ("profile", "output", "source", "force"):
        args = ["--profile", "default" if change == "profile" else "tiny"]
        if change == "output":
            (root / "book" / "tables" / "tiny" / "01_good" / "counts.csv").unlink()
        if change == "source":
            src = root / "chapters" / "01_good.py"
            src.write_text(src.read_text() + "\n# %%\nprint('edited')\n")
        if change == "force":
            args.append("--force")
        result = run(root, *args)
        assert result.returncode == 0 and "unchanged since" not in result.stdout, (change, result.stdout)


def test_chapter_for_another_kind_of_profile_gets_a_page_saying_so(tmp_path):
    """A chapter that needs a profile section the profile lacks (here [paper] under `tiny`) is not executed: its
    page keeps the introduction and says why, and no figure or table is expected of it."""
    root = make_book(tmp_path)
    path = write_chapter(root, "01_paper_only", "# %%\nraise RuntimeError('must not run')\n", figures="never")
    path.write_text(path.read_text().replace("#   book_outputs:", "#   book_requires: [paper]\n#   book_outputs:"))
    write_toc(root, ["01_paper_only"])
    done = run(root, "--profile", "tiny")
    assert done.returncode == 0, done.stderr
    page = nbformat.read(root / "book" / "notebooks" / "01_paper_only.ipynb", as_version=4)
    text = "\n".join(c.source for c in page.cells)
    assert "# 01_paper_only" in text and "Not run with profile `tiny`" in text and "[paper]" in text
    assert not any(c.cell_type == "code" for c in page.cells)
    checked = run(root, "--profile", "tiny", "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


# ---------------------------------------------------------------------------------------------------------------
# The outputs root: a run with a temporary one writes nothing into the repository


# A chapter that writes through the library's own Outputs (which falls back to the repository's book/ when nobody
# tells it otherwise), so a runner that forgot to pass the outputs root would write into the working tree.
OUTPUTS_BODY = """\
# %%
import matplotlib.pyplot as plt
import pandas as pd

from lib.io.outputs import Outputs

out = Outputs("01_outputs", profile)
fig, ax = plt.subplots(figsize=(2, 2))
ax.plot([0, 1], [0, 1])
out.figure(fig, "line")
out.table(pd.DataFrame({"x": [1.0, 2.0]}), "values")
"""


def test_run_with_a_temporary_outputs_root_writes_nothing_into_the_repository(tmp_path, repo_untouched):
    root = make_book(tmp_path)
    write_chapter(root, "01_outputs", OUTPUTS_BODY, figures="line", tables="values")
    write_toc(root, ["01_outputs"])
    outputs = tmp_path / "outputs"
    # The kernel imports lib from this checkout (the throwaway root has no library of its own).
    done = run(root, "--profile", "tiny", "--outputs", str(outputs), pythonpath=str(REPO_ROOT))
    assert done.returncode == 0, done.stdout + done.stderr
    for rel in ("figures/tiny/01_outputs/line.png", "tables/tiny/01_outputs/values.csv", "logs/tiny.log"):
        assert (outputs / rel).is_file(), rel
    nb = nbformat.read(outputs / "notebooks" / "01_outputs.ipynb", as_version=4)
    assert book_check.scan_notebook(nb, "01_outputs") == []
    assert not (root / "book").exists(), "the run wrote under <root>/book although --outputs named another root"
    checked = run(root, "--profile", "tiny", "--check", "--outputs", str(outputs))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_runner_and_outputs_agree_on_the_variable_name(monkeypatch, tmp_path):
    outputs = pytest.importorskip("lib.io.outputs")
    assert outputs.OUTPUTS_ENV == runner.OUTPUTS_ENV
    monkeypatch.setenv(runner.OUTPUTS_ENV, str(tmp_path))
    assert outputs.Outputs("01_x", "tiny").figures == tmp_path / "figures" / "tiny" / "01_x"
    monkeypatch.delenv(runner.OUTPUTS_ENV)
    assert outputs.Outputs("01_x", "tiny").tables == REPO_ROOT / "book" / "tables" / "tiny" / "01_x"


# ---------------------------------------------------------------------------------------------------------------
# What a page must not show (lib/io/book_check.py), on a synthetic notebook with one problem of each kind

MACHINE = ("/home/ci/checkout", "/home/ci/checkout/.venv", "site-packages", "/tmp/")


def _cell(source: str, *outputs, tags=()) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source)
    cell.outputs = list(outputs)
    cell.metadata["tags"] = list(tags)
    return cell


def _stream(text: str, name: str = "stdout") -> nbformat.NotebookNode:
    return nbformat.v4.new_output("stream", name=name, text=text)


def test_scanner_finds_each_kind_of_problem_and_names_chapter_cell_and_text():
    warning = "/home/ci/checkout/.venv/lib/python3.11/site-packages/x.py:3: FutureWarning: `y` is deprecated\n"
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("Prose may say /tmp/ or site-packages: markdown is not output."),
            _cell("clean = 1", _stream("42 features\n")),
            _cell("print(cache.root)", _stream("cache in /home/ci/checkout/.cache/artifacts\n")),
            _cell("import lib", _stream(warning, "stderr")),
            _cell("warn_plain()", _stream("UserWarning: no location\n")),
            _cell("log_it()", _stream("Traceback (most recent call last):\n  File ...\n")),
            _cell("fails()", nbformat.v4.new_output("error", ename="ValueError", evalue="boom", traceback=[])),
            _cell("noisy()", _stream("just a note\n", "stderr")),
            _cell("for x in tqdm(xs): ...", _stream("\rbar:  40%|####      | 2/5 [00:01<00:01]")),
            _cell("t", nbformat.v4.new_output("execute_result", data={"text/plain": "'/tmp/x.csv'"})),
            _cell("img", nbformat.v4.new_output("display_data", data={"image/png": "iVBOR/tmp/site-packages"})),
            _cell("hidden()", _stream("/tmp/fine: the page does not show it\n", "stderr"), tags=["remove-output"]),
        ]
    )
    problems = book_check.scan_notebook(nb, "01_x", MACHINE)
    found = [(p.cell, p.kind) for p in problems]
    assert found == [
        (2, "absolute path"),
        (3, "stderr output"),
        (3, "absolute path"),  # a warning line that shows a path is reported for the path
        (4, "warning"),
        (5, "traceback"),
        (6, "error output"),
        (7, "stderr output"),
        (8, "progress bar"),
        (9, "absolute path"),
    ], found
    assert str(problems[0]) == (
        "01_x, cell 2 (print(cache.root)): absolute path: cache in /home/ci/checkout/.cache/artifacts"
    )
    assert "ValueError: boom" in str(problems[5])


def test_scanner_reports_a_warning_without_a_path_and_ignores_prose_that_mentions_one():
    nb = nbformat.v4.new_notebook(
        cells=[
            _cell("a", _stream("src/x.py:3: DeprecationWarning: old\n")),
            _cell("b", _stream("the word Warning: in a sentence is fine\n", "stdout")),
        ]
    )
    assert [(p.cell, p.kind) for p in book_check.scan_notebook(nb, "01_x", MACHINE)] == [(0, "warning")]


def test_check_fails_on_a_page_that_shows_what_it_must_not(tmp_path):
    root = make_book(tmp_path)
    write_chapter(root, "01_x", "# %%\npass\n")
    write_toc(root, ["01_x"])
    nb = nbformat.v4.new_notebook(
        cells=[_cell("import lib", _stream(f"{sys.prefix}/lib/x.py:1: UserWarning: careful\n", "stderr"))],
        metadata={"papermill": {"parameters": {"profile": "tiny"}}},
    )
    (root / "book" / "notebooks").mkdir(parents=True)
    nbformat.write(nb, root / "book" / "notebooks" / "01_x.ipynb")
    done = run(root, "--profile", "tiny", "--check")
    assert done.returncode == 1
    assert "01_x, cell 0 (import lib): stderr output:" in done.stderr
    assert "01_x, cell 0 (import lib): absolute path:" in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# The hub setting: offline by default, the caller's explicit value passed through `make` and the runner to the kernel

ENV_BODY = """\
# %%
import os

print("kernel HF_HUB_OFFLINE =", os.environ.get("HF_HUB_OFFLINE"))
"""


@pytest.mark.parametrize(
    ("env", "args", "seen"),
    [
        ({}, [], "1"),  # nobody says: offline
        ({"HF_HUB_OFFLINE": ""}, [], "1"),  # set but empty: offline
        ({"HF_HUB_OFFLINE": "0"}, [], "0"),  # `HF_HUB_OFFLINE=0 make book PROFILE=paper`
        ({}, ["HF_HUB_OFFLINE=0"], "0"),  # `make book PROFILE=paper HF_HUB_OFFLINE=0`
    ],
    ids=["default", "empty", "environment", "make-variable"],
)
def test_hub_setting_reaches_the_kernel_through_make(tmp_path, env, args, seen):
    """`make chapter` on a throwaway book (`--root`), with this interpreter's environment as the Makefile's VENV and
    its install stamp taken as current (`-o`: nothing is installed): the kernel sees what the caller set, else 1."""
    root = make_book(tmp_path)
    write_chapter(root, "01_env", ENV_BODY)
    write_toc(root, ["01_env"])
    venv = Path(sys.prefix)
    base = {k: v for k, v in os.environ.items() if k not in (*RUNNER_SETS, "MAKEFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", str(venv / ".installed"), "chapter", f"VENV={venv}",
         "PROFILE=tiny", "CHAPTER=01_env", f"RUNNER_ARGS=--root {root}", *args],
        cwd=REPO_ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"HF_HUB_OFFLINE={seen} " in done.stdout, done.stdout  # the command make ran
    nb = nbformat.read(root / "book" / "notebooks" / "01_env.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"kernel HF_HUB_OFFLINE = {seen}\n" in text, text


def test_tests_run_offline_whatever_the_caller_set():
    done = subprocess.run(
        ["make", "-n", "-o", str(Path(sys.prefix) / ".installed"), "test", f"VENV={sys.prefix}", "HF_HUB_OFFLINE=0"],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "HF_HUB_OFFLINE=1 " in done.stdout and "HF_HUB_OFFLINE=0" not in done.stdout, done.stdout
