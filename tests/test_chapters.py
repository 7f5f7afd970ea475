"""Chapter smoke runs: every chapter in the table of contents executes with the `tiny` profile through papermill,
exactly as `make book` runs it, and writes every figure and table it declares.

Everything the runs write goes to temporary directories, and a test fails if it wrote into the working tree
(`repo_untouched`): the executed notebook and the outputs root (figures, tables) are the test's own, and the
artifact cache is a fresh one shared by the chapters of this run, so later chapters reuse what earlier ones built
and nothing from a previous run hides a broken step.
"""

import pytest

from lib.io.book import REPO_ROOT, toc_chapters
from lib.io.book_check import check_outputs
from lib.io.runner import run_chapter

CHAPTERS = toc_chapters(REPO_ROOT)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_runs_on_tiny_profile(chapter, fresh_cache, tmp_path, repo_untouched):
    chapter = chapter._replace(notebook=tmp_path / f"{chapter.stem}.ipynb")
    outputs = tmp_path / "book"
    result = run_chapter(chapter, "tiny", REPO_ROOT, outputs)
    assert result.failure is None, f"{result.failure.summary()}\n{result.failure.traceback}"
    problems = check_outputs(REPO_ROOT, "tiny", [chapter], outputs)
    assert not problems, problems


# ---------------------------------------------------------------------------------------------------------------
# A chapter opened where it lies: the library is importable from chapters/ (the .pth file `make install` writes)

CHAPTER_DIR = REPO_ROOT / "chapters"


def _without_repo_on_path(tmp_path) -> dict:
    """The environment of a user's shell: no PYTHONPATH (the runner sets one; a user does not), outputs and cache
    in temporary folders so nothing is written into the working tree."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(SPATIAL_BOOK_OUTPUTS=str(tmp_path / "book"), SPATIAL_CACHE=str(tmp_path / "cache"), MPLBACKEND="Agg")
    return env


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts)


def test_chapter_executes_as_a_notebook_from_the_chapters_folder(fresh_cache, tmp_path, repo_untouched, monkeypatch):
    """What Jupyter does with a chapter opened in chapters/ (`make lab`, or `jupyter nbconvert --execute` of the
    converted notebook): a kernel of this environment, started with chapters/ as its working directory. (The
    module's cache, which the smoke runs above filled: the tiny world is not built twice.)"""
    import jupytext
    import papermill

    before = _listing(CHAPTER_DIR)
    env = _without_repo_on_path(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    for key in ("SPATIAL_BOOK_OUTPUTS", "MPLBACKEND"):
        monkeypatch.setenv(key, env[key])
    nb = jupytext.read(CHAPTER_DIR / "01_world.py")
    papermill.execute_notebook(
        nb, str(tmp_path / "01_world.ipynb"), parameters={"profile": "tiny"}, cwd=str(CHAPTER_DIR), progress_bar=False
    )
    executed = jupytext.read(tmp_path / "01_world.ipynb")
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "smoke-test profile" in text, "the chapter did not print the tiny profile's description"
    assert (tmp_path / "book" / "figures" / "tiny" / "01_world" / "scene_grid.png").is_file()
    assert _listing(CHAPTER_DIR) == before, "the run wrote into chapters/"


def test_chapter_runs_as_a_plain_script_from_the_chapters_folder(tmp_path, repo_untouched):
    """`python 01_world.py` in chapters/ (the chapter's own parameters: the default profile)."""
    import subprocess
    import sys

    before = _listing(CHAPTER_DIR)
    done = subprocess.run(
        [sys.executable, "01_world.py"],
        cwd=CHAPTER_DIR,
        env=_without_repo_on_path(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "book" / "figures" / "default" / "01_world" / "scene_grid.png").is_file()
    # Outside a notebook, figures and tables are printed as text, not as the reprs of IPython's display objects.
    assert "[figure 01_world/scene_grid: scene_grid.png]" in done.stdout and "[table keyword_split]" in done.stdout
    assert "<IPython.core.display" not in done.stdout and "Styler object" not in done.stdout, done.stdout[-2000:]
    assert _listing(CHAPTER_DIR) == before, "the run wrote into chapters/"
