# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   book_requires: [world]
#   book_outputs:
#     figures: [scene_grid, question_counts]
#     tables: [question_types, statement_balance, keyword_split]
# ---

# %% [markdown]
# # The spatial world
#
# The paper studies what happens inside Llama-3.1-8B when it is fine-tuned into LLaVA-MORE on natural images. We
# cannot train that pair on a laptop, and on natural images nobody knows which relation a feature *should* encode.
# So the default profile replaces COCO with a generated world in which every fact is known: scenes of two or three
# coloured shapes on a 3 x 3 grid. Each scene comes with its objects, their pixel boxes, the image patches they
# cover and every pairwise relation, and from that ground truth we generate
#
# * **captions** (the COCO analogue): the objects in reading order, "the red circle is at top left .";
# * **questions** of four non-spatial types (colour, shape, existence, count) and five spatial ones: the position
#   of one object ("where is the circle ?", "is the circle on the left ?"), yes/no relations between two objects
#   ("is the circle left of the square ?"), "what is left of the square ?", and true/false **statements** (the VSR
#   analogue, balanced per relation);
# * the **text corpus** the language model is pretrained on: the caption takes the place where the VLM later sees
#   the image, so the LM already answers the same questions from words;
# * the **keyword split** of questions into spatial and general (the paper's regex over VQAv2 questions) and the
#   **direction-free prompts** of the lexical filter.
#
# Everything is a pure function of `(seed, split, index)` (`lib/sources/world.py`): the same seed gives byte-identical
# scenes on any machine, and splits never share a scene.

# %% tags=["parameters"]
profile = "default"

# %% tags=["hide-input"]
import pandas as pd

from lib.figures import world as FG
from lib.io.outputs import Outputs
from lib.sources import world as W
from lib.steps.study import Study

S = Study(profile)  # the pipeline of this profile: every step's result, cached (lib/steps)
P, out = S.P, Outputs("01_world", S.P.name)
print(P.description, "|", P.world)

# %% [markdown]
# ## Scenes, questions and answers
# One sample of every question type from the training split. The thin lines are the vision tower's patches: each
# image is a sequence of these patches for the VLM, in raster order.

# %%
samples = [
    W.make_sample(P.seed, "train", i, tuple(W.QTYPES), P.world.cell_px, P.world.n_objects) for i in range(len(W.QTYPES))
]
fig = FG.plot_scene_grid(
    [s.scene.render() for s in samples],
    [s.qtype for s in samples],
    [s.question for s in samples],
    [s.answer for s in samples],
    P.world.patch_px,
)
out.figure(fig, "scene_grid")

# %% [markdown]
# Each panel's caption is the question and its generated answer. The statement panel shows the statement the
# model must judge true or false.
#
# ## What the two models read
# The base language model reads the scene as its caption; the VLM reads the same position as image tokens. The
# rest of the prompt is the same chat format, the analogue of the paper's Llama-3.1 template.

# %%
s = next(x for x in samples if x.qtype == "relation")
print("LM  :", W.lm_prompt(s.scene.caption(), s.question), s.answer)
print("VLM :", W.vlm_prompt(s.question).replace("<image>", f"<image> x {P.world.n_patches}"), s.answer)
print("direction-free prompts of the lexical filter:", *W.GENERIC_PROMPTS, sep="\n  ")
print(f"vocabulary: {len(W.VOCAB)} words (every word any template can produce, listed explicitly)")

# %% [markdown]
# ## A census checked against the ground truth
# We regenerate `n_census` samples of each split (a cached artifact), recompute every answer from the scene's
# objects with code independent of the question builder (`world.check_answer`), and check the rendered pixels
# against the object boxes. The cell fails if a single sample disagrees.

# %%
census = S.census
assert census.answer_consistent.all(), census[~census.answer_consistent].head()
assert census.pixels_consistent.all(), census[~census.pixels_consistent].head()
print(f"{len(census)} samples checked: every answer and every image agrees with its scene's ground truth")

types = (
    census[census.split != "bench"]
    .groupby(["qtype", "family"], sort=False)
    .agg(
        n=("answer", "size"),
        distinct_answers=("answer", "nunique"),
        share_yes=("answer", lambda a: (a == "yes").mean()),
        majority_share=("answer", lambda a: a.value_counts(normalize=True).iloc[0]),
        keyword_spatial=("keyword_spatial", "mean"),
    )
    .reset_index()
)
out.table(types, "question_types")
yes_no = types[types.qtype.isin(["exist", "side", "relation", "statement"])]
assert (yes_no.share_yes == 0.5).all(), "every yes/no type must be balanced"

# %% [markdown]
# Every yes/no type is balanced (`share_yes` = 0.5) and `majority_share` is the accuracy of always giving the most
# frequent answer: the chance level each model is compared with in the next chapter.

# %%
out.figure(FG.plot_answer_counts(census, W.QTYPES), "question_counts")

# %% [markdown]
# Each bar is one question type, split into its answers: yes/no types split in two equal halves, open types spread
# over their answer words (`where` over the nine cells), so no type can be solved by a constant.
#
# ## The benchmark statements are balanced per relation

# %%
bench = census[census.split == "bench"]
balance = pd.crosstab(bench.relation, bench.answer).reset_index()
out.table(balance, "statement_balance")
assert (balance["yes"] == balance["no"]).all(), "statements must be balanced per relation"

# %% [markdown]
# ## The keyword split
# The paper separates spatial from general VQAv2 questions with a keyword regex. The same rule on our questions
# (`world.SPATIAL_KEYWORDS`) agrees with the question families by construction; the table shows that it does.

# %%
split = pd.crosstab(census.family, census.keyword_spatial.map({True: "spatial", False: "general"})).reset_index()
out.table(split, "keyword_split")
assert (census.keyword_spatial == census.family.isin(W.SPATIAL_FAMILIES)).all()

# %% [markdown]
# Lookup questions all fall on the general side and every absolute or relational question on the spatial side,
# so the "controlled shift" of the spatial-probing chapter compares exactly the two families.

# %% tags=["remove-input"]
S.report()
