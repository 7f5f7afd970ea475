"""Fixtures shared by the chapter smoke runs (tests/test_chapters.py, tests/test_paper_chapters.py)."""

import os

import pytest


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
