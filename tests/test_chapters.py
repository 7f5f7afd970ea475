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
