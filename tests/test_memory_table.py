"""The paper profile's memory table (lib/steps/memory_table.py) is what book/intro.md shows, and each paper profile
asks for no more layers than fit on its GPUs by that table."""

import re

import pytest

from lib.io.book import REPO_ROOT
from lib.kernels.sae_sharding import sae_params
from lib.steps import memory_table as MT


def test_the_intro_holds_exactly_the_table_the_command_prints():
    intro = (REPO_ROOT / "book" / "intro.md").read_text()
    found = re.search(re.escape(MT.START) + r"\n(.*?)\n" + re.escape(MT.END), intro, re.S)
    assert found, "book/intro.md lost its memory-table markers"
    assert found.group(1) == MT.table("paper"), "run `python -m lib.steps.memory_table --write book/intro.md`"


@pytest.mark.parametrize("profile", ["paper", "paper-1gpu"])
def test_each_paper_profile_fits_its_gpus(profile):
    shapes = MT.paper_shapes(profile)
    assert shapes["n_layers"] <= MT.fits(shapes, shapes["processes"], shapes["dtype"]), profile
    assert sae_params(shapes["d_in"], shapes["d_sae"]) == 268_472_320  # Llama Scope: 2 x 4096 x 32768 + 32768 + 4096


def test_all_layers_on_eight_gpus_need_bfloat16():
    shapes = MT.paper_shapes("paper")
    assert (shapes["n_layers"], shapes["processes"], shapes["dtype"]) == (32, 8, "bfloat16")
    assert MT.fits(shapes, 8, "float32") < 32 <= MT.fits(shapes, 8, "bfloat16")
