"""Every chapter that applies to your own VLM (03-06; 01-02 are about the organism) on tiny random Hugging Face
checkpoints: a llava-1.5-shaped `LlavaForConditionalGeneration` (chat template in the processor's file, its base LLM
prompted by a format string, base SAEs from a local SAELens release) and a `Qwen2VLForConditionalGeneration`
(dynamic image-token counts, M-RoPE, base SAEs trained here on its LLM's text stream). The profile is the real
`paper.toml` with `format`, the identifiers, the prompts and the base-SAE source changed and its sizes shrunk; the
data are the VQAv2 / COCO-captions / VSR stand-ins of tests/test_paper_chapters.py.
"""

import tomllib

import fakes
import hf_fakes
import pytest

from lib.io.book import REPO_ROOT, missing_sections, toc_chapters
from lib.io.book_check import check_outputs
from lib.io.runner import run_chapter

CHAPTERS = toc_chapters(REPO_ROOT)
MODELS = ("hf-llava", "qwen2-vl")


@pytest.fixture(scope="module")
def profiles(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    n_rows = 48
    vqa = fakes.write_vqav2(root / "vqa", n=n_rows)
    captions = fakes.write_coco_captions(root / "captions_val2014.json", sorted({100 + i // 2 for i in range(n_rows)}))
    vsr = fakes.write_vsr(root / "vsr", root / "coco", n=8)
    real = tomllib.loads((REPO_ROOT / "lib" / "profiles" / "paper.toml").read_text())
    data = dict(
        vqa_dataset=str(vqa),
        adapt_rows=[0, 32],
        heldout_rows=[32, 48],
        n_spatial_questions=8,
        coco_captions=str(captions),
        coco_images=str(root / "coco"),
        vsr_dataset=str(vsr),
        dtype="float32",
    )
    # Two layers, as the paper's fakes: exhaustive patching (chapter 6) costs a forward per head below a feature.
    llava = hf_fakes.write_hf_llava(root / "llava", n_layers=2)
    qwen = hf_fakes.write_hf_qwen2_vl(root / "qwen", n_layers=2)
    scope = fakes.write_llama_scope(root / "saes", llava.n_layers, llava.d_model)
    sections = {
        "hf-llava": dict(
            format="hf-llava",
            vlm=str(llava.vlm),
            llm=str(llava.llm),
            lm_prompt="USER: Caption: {caption}\nInstruction: {question} ASSISTANT:",  # Vicuna has no chat template
            base_saes="release",
            sae_release=str(scope),
            topk=8,
        ),
        "qwen2-vl": dict(format="qwen2-vl", vlm=str(qwen.vlm), llm=str(qwen.llm), base_saes="train"),
    }
    paths = {}
    for name, section in sections.items():
        profile = {**real, "paper": {**real["paper"], **data, **section}}
        profile["description"] = f"your own VLM ({name}) on tiny random checkpoints"
        profile["sae"] = {"batch_size": 4, "eval_every": 2, "expansion": 2, "k": 8, "base_pairs": 32}
        profile["probing"] = {"top_n": 6, "n_random": 3}
        profile["attribution"] = {"n_samples": 4, "batch_size": 4, "top_k": 1, "n_random": 1}
        profile["distributed"] = {"processes": 1, "backend": "gloo", "dtype": "float32"}  # one CPU process here
        paths[name] = root / f"{name}.toml"
        paths[name].write_text(fakes.toml_text(profile))
    return paths


ORGANISM_ONLY = ("01_world", "02_models", "07_ground_truth")  # they need the generated world's ground truth


def test_only_the_organism_chapters_do_not_apply(profiles):
    for path in profiles.values():
        skipped = [c.stem for c in CHAPTERS if missing_sections(c, str(path))]
        assert skipped == list(ORGANISM_ONLY)


# Each run takes 12-40 s on 2 shared cores (chapter 6, which patches every head at every post-image position, the
# longest: 17 s LLaVA, 40 s Qwen2-VL), so none is marked slow.
RUNS = [(m, c) for m in MODELS for c in CHAPTERS if c.stem not in ORGANISM_ONLY]


@pytest.mark.parametrize(("model", "chapter"), RUNS, ids=[f"{m}-{c.stem}" for m, c in RUNS])
def test_chapter_runs_on_tiny_hf_vlm(model, chapter, profiles, fresh_cache, tmp_path, repo_untouched):
    """As tests/test_paper_chapters.py: notebook, outputs root and cache are temporary, and the tree untouched."""
    chapter = chapter._replace(notebook=tmp_path / f"{chapter.stem}.ipynb")
    outputs = tmp_path / "book"
    result = run_chapter(chapter, str(profiles[model]), REPO_ROOT, outputs)
    assert result.failure is None, f"{result.failure.summary()}\n{result.failure.traceback}"
    problems = check_outputs(REPO_ROOT, str(profiles[model]), [chapter], outputs)
    assert not problems, problems
