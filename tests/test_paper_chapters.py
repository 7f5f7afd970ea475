"""Every chapter of the book under the `paper` profile's code path, on exact-format fakes: a tiny LLaVA-MORE in the
original LLaVA layout (tower from a separate CLIP directory), a tiny Llama-3.1 for the text stream, Llama Scope
SAEs as local JumpReLU folders in SAELens' format, and VQAv2 / COCO-captions / VSR stand-ins with the hub's
columns. The profile file is the real `paper.toml` with its identifiers replaced by the fakes' paths and its sizes
shrunk, so nothing but paths and sizes differs from a run on the real models.
"""

import tomllib

import fakes
import pytest

from lib.io.book import REPO_ROOT, toc_chapters
from lib.io.book_check import check_outputs
from lib.io.runner import run_chapter

CHAPTERS = toc_chapters(REPO_ROOT)


@pytest.fixture(scope="module")
def paper_profile(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    llava = fakes.write_llava_more(root / "llava_more", with_tower=False)
    llama = fakes.write_llama(root / "llama")
    d_model, n_layers = llava.text_config["hidden_size"], llava.text_config["num_hidden_layers"]
    scope = fakes.write_llama_scope(root / "llama_scope", n_layers, d_model)
    n_rows = 48
    vqa = fakes.write_vqav2(root / "vqa", n=n_rows)
    captions = fakes.write_coco_captions(root / "captions_val2014.json", sorted({100 + i // 2 for i in range(n_rows)}))
    vsr = fakes.write_vsr(root / "vsr", root / "coco", n=8)
    real = tomllib.loads((REPO_ROOT / "lib" / "profiles" / "paper.toml").read_text())
    real["paper"].update(
        vlm=str(llava.path),
        llm=str(llama),
        vision_tower=str(llava.clip_path),
        sae_release=str(scope),
        topk=8,
        vqa_dataset=str(vqa),
        adapt_rows=[0, 32],
        heldout_rows=[32, 48],
        n_spatial_questions=8,
        coco_captions=str(captions),
        coco_images=str(root / "coco"),
        vsr_dataset=str(vsr),
        dtype="float32",
    )
    real["description"] = "the paper profile's code on tiny fakes of its models and data"
    real["sae"] = {"batch_size": 4, "eval_every": 2}
    real["probing"] = {"top_n": 6, "n_random": 3}
    real["attribution"] = {"n_samples": 4, "batch_size": 4, "top_k": 1, "n_random": 1}
    real["distributed"] = {"processes": 1, "backend": "gloo", "dtype": "float32"}  # one CPU process (no NCCL here)
    path = root / "paper-fake.toml"
    path.write_text(fakes.toml_text(real))
    return path


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_runs_with_paper_code_on_fakes(chapter, paper_profile, fresh_cache, tmp_path, repo_untouched):
    """As tests/test_chapters.py: notebook, outputs root and cache are temporary, and the working tree untouched."""
    chapter = chapter._replace(notebook=tmp_path / f"{chapter.stem}.ipynb")
    outputs = tmp_path / "book"
    result = run_chapter(chapter, str(paper_profile), REPO_ROOT, outputs)
    assert result.failure is None, f"{result.failure.summary()}\n{result.failure.traceback}"
    problems = check_outputs(REPO_ROOT, str(paper_profile), [chapter], outputs)
    assert not problems, problems
