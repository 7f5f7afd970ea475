"""Chapter smoke runs: every chapter in the table of contents executes with the `tiny` profile through papermill,
exactly as `make book` runs it, and writes every figure and table it declares.

The executed notebooks go to a temporary directory (the book's own notebooks are left alone) and the artifact
cache is a fresh one shared by the chapters of this run, so later chapters reuse what earlier ones built and
nothing from a previous run hides a broken step.
"""

import pytest

from lib.io.runner import REPO_ROOT, check_outputs, run_chapter, toc_chapters

CHAPTERS = toc_chapters(REPO_ROOT)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_runs_on_tiny_profile(chapter, fresh_cache, tmp_path):
    chapter = chapter._replace(notebook=tmp_path / f"{chapter.stem}.ipynb")
    result = run_chapter(chapter, "tiny", REPO_ROOT)
    assert result.failure is None, f"{result.failure.summary()}\n{result.failure.traceback}"
    problems = check_outputs(REPO_ROOT, "tiny", [chapter])
    assert not problems, problems
