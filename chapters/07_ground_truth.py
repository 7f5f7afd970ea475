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
#     figures: [probes, reference_set, referee, prompt_spread, swap_sensitivity, emergence]
#     tables: [probes, reference_per_layer, referee, reference_dropped_by, lexical_prompts, prompt_spread,
#       counterfactual_pairs, counterfactual_classes, lexical_against_reference, emergence]
# ---

# %% [markdown]
# # The ground truth referees the method
#
# Chapters 3 to 6 ran the paper's pipeline as the paper describes it. On the organism every scene's layout is
# known, so each of its steps can be checked against what the model actually computes. This chapter does that, in
# the order of the pipeline:
#
# 1. **What the organism computes, and where.** A linear probe of each ground-truth variable (the asked relation's
#    truth; each named object's row and column) from the residual stream at each layer and at three position
#    classes: the image tokens, the question tokens after the image, and the answer position (the last token,
#    whose next-token logits give yes or no). Two controls: the same probe on the *occupancy code* (which rows,
#    columns and cells hold an object, not which object is where: 15 bits) and on shuffled labels.
# 2. **The reference set.** Every feature of the followed variant scored where the model computes the relation: its
#    activation at the answer position of relation questions, as a score for "the asked relation holds", *within*
#    each (relation, question template) cell. A feature's relation score is, for its best relation, the lower of
#    its two templates' two-sided AUROC; the reference set is every feature whose score reaches
#    `referee.min_auroc` (profile), against features of the same layer and firing rate.
# 3. **The referee.** Precision and recall of the paper's final set against the reference set, the first of the
#    paper's filters that dropped each reference feature, and the same under each choice the source leaves open.
#
# Organism only: the paper's data has no ground truth.

# %% tags=["parameters"]
profile = "default"

# %% tags=["hide-input"]
import pandas as pd

from lib.figures import referee as FR
from lib.figures import referee_lexical as FL
from lib.io.outputs import Outputs
from lib.kernels import counterfactual as CF
from lib.kernels import truth as T
from lib.sources import world as W
from lib.steps.study import Study

S = Study(profile)  # the pipeline of this profile: every step's result, cached (lib/steps)
P, out = S.P, Outputs("07_ground_truth", S.P.name)
n_rel = len(S.data.relation)
print(f"{n_rel} relation questions on two-object scenes (both templates, every relation, answers balanced)")

# %% [markdown]
# ## What the organism computes, and where

# %%
probes = S.truth_probes
out.table(probes, "probes", show=False)
out.figure(FR.plot_probes(probes), "probes")
truth = probes[probes.variable == "truth"].set_index(["position", "layer"]).auroc
best = truth.idxmax()
control = probes[probes.variable == "truth"].occupancy.iloc[0]
print(
    f"the asked relation's truth: best probe at the {best[0]} position, layer {best[1]} (AUROC {truth[best]:.3f}); "
    f"occupancy control {control:.3f}; at the image tokens at most {truth['image'].max():.3f}"
)
for var in ("subject_row", "subject_col"):
    v = probes[probes.variable == var].set_index(["position", "layer"]).auroc
    print(
        f"{var}: image tokens at most {v['image'].max():.3f}, question tokens at most {v['question'].max():.3f}, "
        f"answer position at most {v['answer'].max():.3f} (occupancy control "
        f"{probes[probes.variable == var].occupancy.iloc[0]:.3f})"
    )

# %% [markdown]
# Under causal attention the image tokens cannot know which object the question will name, so a probe there can
# read the named object's row only through what the layout alone implies (the occupancy control says how much that
# is). Where the answer-position probe of the relation's truth rises above its occupancy control, the model
# computes the relation there, at that depth; the layer where it does is where a feature carrying the relation
# should be looked for.

# %% [markdown]
# ## The reference set

# %%
ref_table = S.referee["table"]
reference = ref_table[ref_table.reference]
per_layer = (
    ref_table.groupby("layer")
    .agg(features=("feature", "size"), reference=("reference", "sum"), final=("final", "sum"))
    .reset_index()
)
per_layer["reference_in_final"] = ref_table[ref_table.reference & ref_table.final].groupby("layer").size()
per_layer = per_layer.fillna(0)
out.table(per_layer, "reference_per_layer", float_format="{:.0f}")
out.figure(FR.plot_reference(ref_table, P.referee.min_auroc), "reference_set")
scores = S.truth_features
matched = T.matched_random(scores, scores.reference, n=1, seed=P.seed)
print(
    f"reference set (relation score >= {P.referee.min_auroc}): {len(reference)} features, per layer "
    f"{reference.groupby('layer').size().to_dict()}; best relations {reference.best_relation.value_counts().to_dict()}"
)
print(
    f"mean relation score: reference {reference.relation_score.mean():.3f}, features of the same layers and firing "
    f"rates {matched.relation_score.mean():.3f}, all features {scores.relation_score.mean():.3f}"
)

# %% [markdown]
# Each dot is a feature of the followed variant: its relation score (y) against how far fine-tuning rotated its
# decoder (x). The dashed line is the reference threshold; the stars are the paper's final set. The bars count the
# reference features per layer and how many of them the final set holds. The matched control (features of the same
# layer with the nearest firing rates) says the reference features' scores are not what any feature that fires as
# often would get.

# %% [markdown]
# ## The referee

# %%
rows = S.referee["rows"]
out.table(rows, "referee")
out.figure(FR.plot_referee(rows), "referee")
paper = rows.iloc[0]
print(
    f"the paper's pipeline: final set {paper.final} features, {paper.found} of them in the reference set: "
    f"precision {paper.precision:.3f}, recall {paper.recall:.3f} (reference set {paper.reference})"
)
if rows.recall.notna().any():
    best_row = rows.loc[rows.recall.idxmax()]
    print(f"highest recall over the choices: {best_row.recall:.3f} ({best_row.choice}: {best_row.value})")
else:
    print("the reference set is empty on this profile: no recall to compare")
dropped = S.referee["reference"]
out.table(
    dropped[["layer", "feature", "best_relation", "relation_score", "dec_cos", "visual_energy", "dropped_by"]],
    "reference_dropped_by",
)
print("first filter that dropped each reference feature:", dropped.dropped_by.value_counts(dropna=False).to_dict())

# %% [markdown]
# The first row is the pipeline of chapters 4 and 5; each later row changes one choice the source leaves open and
# reruns the selection (the lexical filter included, on every new candidate). The last table names, for every
# reference feature, the first of the paper's filters (in pipeline order: visual energy, rotation, odds ratio,
# frequency shift, lexical) that dropped it.

# %% [markdown]
# ## A lexical test that can see words
#
# The paper's lexical filter (chapter 5) swaps a top sample's question for direction-free prompts and keeps a
# feature that still fires. On the organism that test cannot fail a feature that reads words. The prompt is
# `<bos> user : <image> {question} assistant :`: under causal attention the image tokens come before the question
# and never see it, so the "image" reading gives the same value under every prompt, and the "all" reading (image
# and text together) passes any feature that fires on the image. And most of the prompts hold words that no
# training stream contains, whose embeddings were never trained. Three repairs, each computed below:
#
# 1. **Prompts in the organism's own words** (`lib.kernels.counterfactual.IN_VOCAB_PROMPTS`): each is a question or
#    instruction the VLM was trained on (the caption instruction, the count, exist, colour and shape questions),
#    and none names a relation, a side, a row or a column. The table checks every word of both prompt sets against
#    the training streams.
# 2. **A reading that can see them**: the maximum over the prompt text after the image (`post_image`). The filter
#    is re-run on the same candidates and top samples, so only the prompts and the reading change.
# 3. **Counterfactual twins.** For each relation question of a held-out split, an *object swap* (the two named
#    objects exchange cells, the words stay, the image is re-rendered) and a *word swap* (the relation word becomes
#    its opposite, the image stays). Both flip the truth exactly when the two objects differ along the relation's
#    axis; only those pairs are kept. Per feature, each swap's mean |Δz| divided by the feature's mean activation:
#    a feature that reads the words moves under the word swap alone, one that reads the layout moves under the
#    object swap, and one that carries the answer moves under both.

# %%
words = CF.stream_words(CF.stream_texts(P.seed))
prompt_check = pd.concat(
    [
        CF.prompt_words(W.GENERIC_PROMPTS, words).assign(prompts="paper-style (chapter 5)"),
        CF.prompt_words(CF.IN_VOCAB_PROMPTS, words).assign(prompts="the organism's own words"),
    ],
    ignore_index=True,
)
out.table(prompt_check, "lexical_prompts")
for name, rows in prompt_check.groupby("prompts", sort=False):
    print(
        f"{name}: {int((~rows.in_vocabulary).sum())} of {len(rows)} prompts hold words no VLM training stream has "
        f"({' '.join(sorted(set(' '.join(rows.unseen).split()))) or 'none'}); "
        f"{int((~rows.direction_free).sum())} hold a spatial word"
    )

# %%
vocab = S.run("referee-lexical-vocab")
spread_paper = CF.prompt_spread(S.lexical.max_sp)[1].assign(prompts="paper-style")
spread, spread_vocab = CF.prompt_spread(vocab.max_sp)
out.table(pd.concat([spread_paper, spread_vocab.assign(prompts="own words")], ignore_index=True), "prompt_spread")
out.figure(FL.plot_prompt_spread(spread, "in-vocabulary prompts, top samples of every candidate"), "prompt_spread")
s = spread_vocab.set_index("reading")
print(
    f"spread of a feature's maximum over the five prompts, per (candidate, top sample), {int(s.loc['image', 'n'])} "
    f"pairs: 'image' reading at most {s.loc['image', 'max']:.3g} (paper-style prompts: "
    f"{spread_paper.set_index('reading').loc['image', 'max']:.3g}); 'post_image' reading mean "
    f"{s.loc['post_image', 'mean']:.3f}, nonzero for {s.loc['post_image', 'share_nonzero']:.0%} of the pairs"
)
lex_t, vocab_t = S.lexical.table, vocab.table
print(
    f"survivors of {len(vocab_t)} candidates: paper's filter ('all', paper-style prompts) "
    f"{int(lex_t.lexical_all.sum())}; own words: 'all' {int(vocab_t.lexical_all.sum())}, 'image' "
    f"{int(vocab_t.lexical_image.sum())}, 'post_image' {int(vocab_t.lexical_post_image.sum())}"
)

# %% [markdown]
# The image tokens' reading cannot tell the prompts apart (its spread is exactly zero): it is no test of words.
# The text after the image can, and with prompts the organism was trained on, fewer candidates pass. A feature
# that still passes fires on every one of its top samples under at least one of these prompts; that is what the
# filter asks, and it does not yet say whether the feature reads the image. The twins do.

# %%
cf = S.run("referee-counterfactual")
out.table(cf.pairs, "counterfactual_pairs", float_format="{:.0f}")
print(
    f"{int(cf.pairs.n.sum())} relation questions; the truth flips under both swaps for {int(cf.pairs.n_flipped.sum())} "
    f"(kept); the others name two objects in the same row or column of the asked axis"
)
acc = cf.answers.set_index("version")
print(
    f"the organism's own answer: accuracy {acc.loc['original', 'accuracy']:.3f} on the originals, "
    f"{acc.loc['image', 'accuracy']:.3f} on the object swaps, {acc.loc['word', 'accuracy']:.3f} on the word swaps; "
    f"its answer flips on {acc.loc['image', 'answer_flips']:.1%} and {acc.loc['word', 'answer_flips']:.1%} of them"
)
rule = CF.LexicalRule()
counts = CF.class_counts(cf.table, ("position", "layer")).reset_index()
out.table(counts, "counterfactual_classes", float_format="{:.0f}")
for ratio in (rule.ratio / 2, rule.ratio * 2):
    alt = CF.class_counts(CF.classify(cf.table, CF.LexicalRule(rule.min_sensitivity, ratio)))
    print(f"with ratio {ratio:g} instead of {rule.ratio:g}: lexical per position {alt['lexical'].to_dict()}")

# %%
marks = {"paper's final set": ref_table[ref_table.final], "reference set": ref_table[ref_table.reference]}
out.figure(FL.plot_swap_sensitivity(cf.table, marks, rule.ratio, rule.min_sensitivity), "swap_sensitivity")
verdict = CF.feature_verdict(cf.table)
merged, against = CF.against_reference(ref_table, vocab_t, verdict)
final_cf = merged[merged.final]
print(
    f"the paper's final set ({len(final_cf)}) under the counterfactual test, read where each feature fires "
    f"(answer position: {int((final_cf.cf_reading == 'answer').sum())}, post-image text: "
    f"{int((final_cf.cf_reading == 'post_image').sum())}): {final_cf.cf_class.value_counts().to_dict()}"
)
print("of them lexical:", [f"L{r.layer}F{r.feature}" for r in final_cf[final_cf.cf_class == "lexical"].itertuples()])

# %% [markdown]
# Each dot is one feature at one reading: how far the object swap (x) and the word swap (y) move it, relative to
# its mean activation. Below the dotted lines a swap does not move it; above the dashed line the word swap moves
# it ten times as far as the object swap, and the feature reads the words, not the image (`LexicalRule`: a ratio
# of ten, an order of magnitude; the printed counts show how many features change class at half or twice that).
# On the diagonal sit features that both swaps move alike: they follow the answer, which both swaps flip.

# %%
out.table(against, "lexical_against_reference")
reach = merged[merged.reference & merged.adapted.astype(bool) & merged.spatial.astype(bool)]
print(
    f"reference features that reach a lexical filter (adapted and spatial): {len(reach)}; kept by the paper's "
    f"filter {int(reach.lexical.fillna(False).astype(bool).sum())}, by the own-words post-image filter "
    f"{int(reach.lexical_post_image.fillna(False).astype(bool).sum())}, by the counterfactual test "
    f"{int(reach.cf_passes.fillna(False).astype(bool).sum())}"
)

# %% [markdown]
# Precision and recall of each selection against the reference set. The lexical filter can only remove features,
# so its rows are bounded by the candidates that reach it; the counterfactual test on its own is a filter, not a
# selection (it keeps every feature that follows the image), and its recall says how many reference features a
# lexical test that sees words would wrongly drop.

# %% [markdown]
# ## Emergence: new in fine-tuning, or reused?
#
# The adapted SAE starts from the base SAE, so its feature i and the base SAE's feature i share a lineage. For each
# reference feature, the base SAE's same-index feature is read on the base LM at the answer position of the same
# relation questions, with the scene given as the caption that states the layout in words, and scored by the same
# statistic (`lib.kernels.emergence`). *Reused* if it reaches the threshold of the reference set for the same
# relation: the LM already told that relation from words, and fine-tuning taught the VLM to feed it from pixels.
# *New* otherwise.

# %%
em = S.run("emergence")
out.table(em, "emergence")
if len(em):
    out.figure(FL.plot_emergence(em, P.referee.min_auroc), "emergence")
    new = em[em.verdict == "new"]
    print(
        f"{len(em)} reference features: {int((em.verdict == 'reused').sum())} reused, {len(new)} new; of the new, "
        f"{int((new.base_firing_rate < 0.01).sum())} fire on fewer than 1% of the base LM's relation questions, "
        f"{int((new.base_score < 0.6).sum())} score below 0.6 there and "
        f"{int((new.base_best_score >= P.referee.min_auroc).sum())} carry another relation instead"
    )
    rate = em.groupby("verdict").base_firing_rate.median()
    print(
        f"median firing rate on the base LM's questions: reused {rate.get('reused', float('nan')):.3f}, new "
        f"{rate.get('new', float('nan')):.3f}"
    )
    print("verdict per layer:", em.groupby(["layer", "verdict"]).size().unstack(fill_value=0).to_dict("index"))
else:
    print("the reference set is empty on this profile: no emergence to read")

# %% [markdown]
# A reused feature's base twin already separates true from false for the same relation when the layout comes in
# words; a new one is silent or at chance there. The verdict is per index: a "new" feature's relation may still be
# carried by other base features, which this comparison does not look for.

# %% tags=["remove-input"]
S.report()
