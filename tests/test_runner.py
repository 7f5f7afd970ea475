"""lib/runner.py on a throwaway book: its own _toc.yml, profiles and chapters in a temporary directory.

The tests that execute chapters start real kernels (about 2 s each); the chapters they run are a few lines long.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from lib.io import runner
from lib.io.runner import REPO_ROOT, RunnerError

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


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    """The runner as `make` calls it: a separate process, judged by its exit status and what it prints."""
    env = {k: v for k, v in os.environ.items() if k not in runner.KERNEL_ENV}  # the runner must set them itself
    return subprocess.run(
        [sys.executable, "-m", "lib.io.runner", "--root", str(root), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# A chapter that saves what it declares, reports the profile and environment it saw, and prints cache lines.
GOOD_BODY = """\
# %%
import os
from pathlib import Path

print("profile seen:", profile)
print("env:", *(f"{k}={os.environ.get(k)}" for k in ("HF_HUB_OFFLINE", "WANDB_MODE", "PIP_NO_INDEX", "MPLBACKEND")))
print("cwd:", Path.cwd())
print("[cache] reused world (0123456789)")
print("[cache] computed lm (abcdef0123) in 2.5 s")

# %%
fig_dir = Path("book/figures") / profile / "01_good"
fig_dir.mkdir(parents=True, exist_ok=True)
(fig_dir / "curve.png").write_bytes(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(16))
(fig_dir / "curve.pdf").write_bytes(b"%PDF-1.4\\n")
table_dir = Path("book/tables") / profile / "01_good"
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
    assert "HF_HUB_OFFLINE=1 WANDB_MODE=disabled PIP_NO_INDEX=1 MPLBACKEND=Agg" in text
    assert f"cwd: {root.resolve()}" in text


def test_log_summarises_cache_use_and_time(executed_book):
    root, done = executed_book
    log = (root / "book" / "logs" / "tiny.log").read_text()
    assert "01_good: ok in" in log
    assert "reused (1): world" in log
    assert "computed (1): lm (2.5 s)" in log
    assert "02_bad: FAILED" in log
    assert "reused (1): world" in done.stdout  # progress output carries the same summary


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
    problems = runner.check_outputs(root, "default", runner.toc_chapters(root))
    assert problems == ["01_x: book/notebooks/01_x.ipynb was executed with profile 'tiny', not 'default'"]


def test_check_rejects_a_file_that_is_not_what_its_extension_says(tmp_path):
    root = make_book(tmp_path)
    write_chapter(root, "01_x", "# %%\npass\n", figures="f")
    write_toc(root, ["01_x"])
    fig_dir = root / "book" / "figures" / "default" / "01_x"
    fig_dir.mkdir(parents=True)
    (fig_dir / "f.png").write_text("not a png")
    (fig_dir / "f.pdf").write_bytes(b"%PDF-1.7\n")
    problems = runner.check_outputs(root, "default", runner.toc_chapters(root))
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
        runner.toc_chapters(root)


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
        runner.declared_outputs(runner.toc_chapters(root)[0])


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
    assert runner.toc_files(root) == [
        "book/intro",
        "book/notebooks/02_b",
        "book/notebooks/03_c",
        "book/methods",
        "book/notebooks/01_a",
    ]
    assert [c.stem for c in runner.toc_chapters(root)] == ["02_b", "03_c", "01_a"]
    assert [c.stem for c in runner.select_chapters(runner.toc_chapters(root), ["01_a", "chapters/02_b.py"])] == [
        "02_b",
        "01_a",
    ]


def test_cache_events_reads_stream_outputs_only():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                outputs=[
                    nbformat.v4.new_output("stream", name="stdout", text="[cache] reused world (01ab)\nother\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="[cache] computed sae_l3 (ff00) in 12.25 s\n"),
                    nbformat.v4.new_output("execute_result", data={"text/plain": "[cache] reused not_a_log_line"}),
                ]
            ),
            nbformat.v4.new_markdown_cell("[cache] reused prose"),
        ]
    )
    assert runner.cache_events(nb) == (["world"], [("sae_l3", 12.25)])


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
    assert runner.known_profiles(REPO_ROOT) == profiles.available_profiles()


def test_repository_toc_lists_existing_chapters_with_valid_headers():
    """The real _toc.yml: every chapter it names exists, follows the conventions and declares its outputs."""
    chapters = runner.toc_chapters(REPO_ROOT)
    assert chapters, "_toc.yml lists no chapter"
    for chapter in chapters:
        runner.read_chapter(chapter)


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
