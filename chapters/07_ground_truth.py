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
#     figures: [probes, reference_set, referee, prompt_spread, swap_sensitivity, emergence, null_correction,
#       head_sweep, head_costs, head_sets, sufficiency, steering]
#     tables: [probes, reference_per_layer, referee, reference_dropped_by, lexical_prompts, prompt_spread,
#       counterfactual_pairs, counterfactual_classes, lexical_against_reference, emergence, null_ranking, head_sweep,
#       head_costs, head_sets, head_set_placement, attribution_by_corruption, sufficiency, spearman_per_feature,
#       steering, steering_best_relation, claims, seeds, seeds_spread]
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
from lib.figures import referee_heads as FH
from lib.figures import referee_lexical as FL
from lib.io.outputs import Outputs
from lib.kernels import counterfactual as CF
from lib.kernels import head_checks as HC
from lib.kernels import truth as T
from lib.sources import world as W
from lib.sources.organism_config import CAPTION_PROMPTS
from lib.steps import heads as HD
from lib.steps import referee_heads as RH
from lib.steps import seeds as SD
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
referee_rows = S.referee["rows"]
out.table(referee_rows, "referee")
out.figure(FR.plot_referee(referee_rows), "referee")
paper = referee_rows.iloc[0]
print(
    f"the paper's pipeline: final set {paper.final} features, {paper.found} of them in the reference set: "
    f"precision {paper.precision:.3f}, recall {paper.recall:.3f} (reference set {paper.reference})"
)
if referee_rows.recall.notna().any():
    best_row = referee_rows.loc[referee_rows.recall.idxmax()]
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
# and text together) passes any feature that fires on the image. And where the VLM's only caption instruction was
# "describe the image ." (the profile's `vlm.caption_prompts`; organism v1), most of the prompts hold words that no
# training stream contains, whose embeddings were never trained (the table below checks this organism's streams).
# Three repairs, each computed below:
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
words = CF.stream_words(CF.stream_texts(P.seed, instructions=CAPTION_PROMPTS[P.vlm.caption_prompts]))
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
# The text after the image can: its spread is printed above, and the survivors under each prompt set and reading
# beside it (compare the paper's filter with the own-words `post_image` reading). A feature that still passes
# fires on every one of its top samples under at least one of these prompts; that is what the filter asks, and it
# does not yet say whether the feature reads the image. The twins do.

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
# it `LexicalRule.ratio` times as far as the object swap (the ratio is printed above, with how many features change
# class at half or twice it), and the feature reads the words, not the image.
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
out.figure(FL.plot_emergence(em, P.referee.min_auroc), "emergence")
if len(em):
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

# %% [markdown]
# ## The heads, refereed
#
# Chapter 6 ranked heads with the paper's aggregation and checked the top k by ablation. Five links of that chain
# can be checked against the organism's ground truth:
#
# * **Depth bias of the aggregation.** Each feature's head scores are normalised to unit mass over the heads below
#   its layer, and each head is divided by the number of features above it. A feature that spreads its mass
#   uniformly therefore gives 1 / (L_f × heads) to every head below it, and shallow heads, below every feature,
#   score more for that alone. The *uniform-spread null* is what each head would get from such features; a head's
#   corrected score is its aggregate over that null (1 = no preference). A ratio rather than a z-score: under the
#   null the aggregate is one number, with no spread to divide by.
# * **What each head does, head by head.** Every head mean-ablated alone on held-out questions of every type,
#   accuracy (every answer token argmax-correct under teacher forcing) and P(correct) per type. The mean is taken
#   over held-out questions of the same template (type and length) *at the same position*, BOS never patched: the
#   all-position mean puts at the answer position a vector the head never writes there, which costs every type
#   alike (shown below for comparison, on the first third of the items).
# * **The random control as a distribution.** Chapter 6's random control is `attribution.n_random` draws of k =
#   `attribution.top_k` heads from the top heads' layers: a few conditions (on an organism with four heads per
#   layer and k = 2, the same complementary pair drawn again and again), too few to place the top heads. Here: every
#   k-set of heads from the layers the attribution scores (or `referee.n_head_draws` random ones, if there are
#   more), each ablated together, and the paper's top-k set and the null-corrected top-k set placed in that
#   distribution (first third of the sweep's items).
# * **The corruption.** The mean image removes all image content, so it credits any head that reads the image at
#   all. The organism allows a spatial counterfactual: the two named objects exchange cells, so only *where* they
#   are changes. Attribution with that corruption beside the mean image on the same questions; and sufficiency: one
#   head's output patched from the swapped run into the clean run (at the post-image positions), and how often the
#   answer flips to the swapped scene's.
# * **Validation, per feature.** Chapter 6's Spearman correlation between attribution and exhaustive patching is
#   pooled over (feature, head) pairs of very different magnitudes; here it is computed within each feature.

# %%
vlm = S.vlm
n_layers, n_heads, k = vlm.n_layers, vlm.n_heads, P.attribution.top_k
paper_heads = HD.head_ranking(S.head_scores.table, n_layers, n_heads, k)
null = RH.null_ranking(S.head_scores.table, n_layers, n_heads, k)
out.table(null.table, "null_ranking")
out.figure(FH.plot_null_correction(null.table, n_layers, n_heads), "null_correction")
heads_str = lambda hs: ", ".join(f"L{l}H{h}" for l, h in hs)  # noqa: E731
print(
    f"paper's top {len(paper_heads.top)}: {heads_str(paper_heads.top)}; null-corrected top {len(null.top)}: "
    f"{heads_str(null.top)}"
)
print(null.table.head(5).round(3).to_string(index=False))

# %% [markdown]
# Left: the paper's aggregate; middle: what uniformly spread features would give each head (it falls with depth);
# right: their ratio. The printed table ranks heads by the ratio, with each head's rank under the raw aggregate.

# %%
sweep = S.run("head-sweep")
costs = RH.sweep_costs(sweep)  # matched means, all sweep items; points of accuracy and of P(correct)
out.table(sweep.table, "head_sweep")
out.table(costs, "head_costs")
all_items = sweep.table[sweep.table.subset == "all"]
out.figure(FH.plot_sweep_heatmap(all_items), "head_sweep")
out.figure(FH.plot_cost_scatter(costs, paper_heads.top, null.top[0], goal=RH.ABLATION_GOAL), "head_costs")
by_head = costs.set_index(["layer", "head"])
largest = costs.iloc[0]  # the largest spatial cost
nb = by_head.loc[null.top[0]]
goal_spatial, goal_control = RH.ABLATION_GOAL
print(
    f"{sweep.info['n_items']} items, {len(sweep.info['templates'])} templates in the means "
    f"({sweep.info['n_reference']} held-out items), {sweep.info['n_fallback']} items on the all-position mean"
)
for label, (l, h), r in (
    ("largest spatial cost", (int(largest.layer), int(largest["head"])), largest),
    ("null-corrected best", null.top[0], nb),
):
    met = r.spatial_accuracy_cost >= goal_spatial and r.control_accuracy_cost <= goal_control
    print(
        f"{label}: L{l}H{h} costs {r.spatial_accuracy_cost:.1f} points on the spatial types and "
        f"{r.control_accuracy_cost:.1f} on the control types (goal >= {goal_spatial:.0f} against <= "
        f"{goal_control:.0f}: {'met' if met else 'not met'}); rank {int(r['rank'])} of {len(costs)} heads by spatial "
        f"cost (percentile {r.percentile:.2f}), rank {int(r.rank_specific)} by spatial minus control cost"
    )
for l, h in paper_heads.top:
    r = by_head.loc[(l, h)]
    print(
        f"paper's top head L{l}H{h}: spatial {r.spatial_accuracy_cost:.1f}, control {r.control_accuracy_cost:.1f} "
        f"points; rank {int(r['rank'])} by spatial cost"
    )
third = {a: RH.sweep_costs(sweep, a, "first third").set_index(["layer", "head"]) for a in ("matched", "global")}
print(
    "on the first third, mean control cost per head: "
    + ", ".join(f"{a} means {c.control_accuracy_cost.mean():.1f}" for a, c in third.items())
    + "; spatial: "
    + ", ".join(f"{a} {c.spatial_accuracy_cost.mean():.1f}" for a, c in third.items())
    + " points; heads costing the control types 5+ points more under the all-position mean: "
    + heads_str(
        [
            hd
            for hd in third["global"].index
            if third["global"].control_accuracy_cost[hd] - third["matched"].control_accuracy_cost[hd] >= 5
        ]
    )
)

# %% [markdown]
# The heatmap gives each head's cost on each question type (clean accuracy minus accuracy with the head ablated,
# in points; lookup types on the left, then absolute and relational). The scatter places every head by its cost on
# the spatial types (y) against the control types (x); the shaded corner is the goal, red rings mark the
# paper's top k and the blue star the null-corrected best head.

# %%
sets = S.run("head-sets")
placement = RH.set_placement(sets)
out.table(sets.table, "head_sets")
out.table(placement, "head_set_placement")
out.figure(FH.plot_set_distribution(sets.table, sets.info["k"]), "head_sets")
d = sets.table[sets.table.draw]
print(
    f"{sets.info['n_sets']} {'(every one)' if sets.info['exhaustive'] else 'random'} {sets.info['k']}-head sets of "
    f"{len(sets.info['eligible'])} heads ({', '.join(sets.info['eligible'])}), on {sets.info['n_items']} items: "
    f"spatial cost median {d.spatial_accuracy_cost.median():.1f} (5-95%: {d.spatial_accuracy_cost.quantile(0.05):.1f}-"
    f"{d.spatial_accuracy_cost.quantile(0.95):.1f}), control cost median {d.control_accuracy_cost.median():.1f} "
    f"(5-95%: {d.control_accuracy_cost.quantile(0.05):.1f}-{d.control_accuracy_cost.quantile(0.95):.1f}) points"
)
for r in placement.itertuples():
    print(
        f"{r.set} {r.heads}: spatial {r.spatial_cost:.1f} points (rank {r.spatial_rank} of {r.n_draws}, percentile "
        f"{r.spatial_percentile:.2f}), control {r.control_cost:.1f} (rank {r.control_rank}, percentile "
        f"{r.control_percentile:.2f})"
    )

# %% [markdown]
# A top-k set that matters *for space* sits high in the spatial distribution and low in the control one; a set that
# only breaks image reading sits high in both.

# %%
by_corruption = RH.corruption_ranking(S.run("head-counterfactual"), n_layers, n_heads, k)
suff = S.run("head-sufficiency")
out.table(by_corruption, "attribution_by_corruption")
out.table(suff.table, "sufficiency")
out.figure(FH.plot_sufficiency(suff.table, by_corruption[["layer", "head", "mean image", "swap"]]), "sufficiency")
flips = HC.flip_check(suff.check)
for corruption in ("mean image", "swap"):
    top3 = by_corruption.sort_values(corruption, ascending=False).head(3)
    print(
        f"top heads by attribution / null, {corruption}: "
        + ", ".join(f"L{int(r.layer)}H{int(r['head'])} ({r[corruption]:.2f})" for _, r in top3.iterrows())
    )
print(
    f"the swap flips the true answer of {flips['truth_flip_share']:.0%} of {flips['n']} questions; the model's answer "
    f"flips on {flips['model_flip_rate_where_truth_flips']:.0%} of those and on "
    f"{flips['model_flip_rate_where_truth_stays']:.0%} of the others (correct: {flips['model_correct_clean']:.0%} "
    f"clean, {flips['model_correct_swapped']:.0%} swapped)"
)
s_top = suff.table.sort_values("flip_rate", ascending=False).head(4)
print(
    "patching one head from the swapped run flips the answer: "
    + ", ".join(f"L{int(r.layer)}H{int(r['head'])} {r.flip_rate:.0%}" for _, r in s_top.iterrows())
    + f" (of the {int(s_top.n.iloc[0])} questions the model answers differently on the swapped scene)"
)

# %% [markdown]
# Left: per head, the share of answers that flip to the swapped scene's answer when only that head's output (at
# the question and answer positions) comes from the swapped run. Right: the attribution to each head over its
# uniform-spread null under each corruption, on the same questions.

# %%
per_feature = HC.within_feature_spearman(S.head_scores.table)
spearman = HC.spearman_summary(per_feature)
out.table(per_feature, "spearman_per_feature")
pooled = S.head_scores.table[["attr_clean", "exhaustive"]].corr("spearman").iloc[0, 1]
by_layer = per_feature.groupby("feature_layer").spearman.median()
print(
    f"Spearman rho, attribution vs exhaustive patching within each of {spearman['n_features']} features: median "
    f"{spearman['median']:.3f}, range {spearman['min']:.3f} to {spearman['max']:.3f} (pooled over pairs: "
    f"{pooled:.3f}); median by feature layer: "
    + ", ".join(f"L{int(l)} {v:.3f}" for l, v in by_layer.items())
    + f" (a layer-1 feature ranks only {n_heads} heads)"
)

# %% [markdown]
# ## Steering (beyond the paper)
#
# If the model *uses* a reference feature, adding its decoder direction after its layer should move the answer, and
# random directions of the same norm should not. For the best reference feature of each layer (highest relation
# score; ties by truth score), on the counterfactual relation questions (held out from the questions that chose
# it): ± scale × its mean activation when active × its unit decoder direction, added at the post-image positions,
# the sign chosen so that + pushes toward "yes"; `referee.n_steer_random` random directions at each norm. The norm
# runs over multiples of `referee.steer_scale` (`lib.steps.referee_heads.STEER_MULTIPLES`): at one scale alone a
# dose-response would stay hidden.

# %%
steer = S.run("steering")
st_all = RH.steering_summary(steer, "all relations")
st_rel = RH.steering_summary(steer, "best relation")
out.table(steer.flips, "steering")
out.figure(FH.plot_steering(steer.flips, "all relations"), "steering")
best_name = steer.features[steer.features.best].name.iloc[0]
for name, r in steer.features.set_index("name").iterrows():
    print(
        f"{name}{' (best)' if r.best else ''}: relation score {r.relation_score:.3f} for {r.best_relation!r}, "
        f"reference {bool(r.reference)}, sign {r.sign:+.0f}, mean activation when active {r.mean_active:.1f}"
    )
out.table(st_rel, "steering_best_relation")  # the same read-out on the questions of each feature's best relation
for r in st_all.itertuples():
    print(
        f"{r.feature}{' (best)' if r.feature == best_name else ''} x{r.scale:g}, {r.n} questions: + turns "
        f"{r.plus_to_yes:.0%} of the no's to yes, - turns {r.minus_to_no:.0%} of the yes's to no (flip rates "
        f"{r.plus_flip_rate:.0%} / {r.minus_flip_rate:.0%}); random directions of the same norm flip "
        f"{r.random_mean:.1%} on average, {r.random_max:.1%} at most"
    )

# %% [markdown]
# A push in one direction can flip only the answers that were the other way (about half), so the feature's flip
# rate over all questions tops out near 50%; the random directions' rate is the same statistic. The feature moves
# the answer where random directions of the same norm do not only if its curve rises above the grey lines (one per
# random direction; the thick one is their mean).

# %% [markdown]
# ## The paper's claims, refereed
# One row per claim: what the paper's pipeline (chapters 3 to 6, run as the paper describes it) finds on the
# organism, what the ground truth says, and why they differ. Every cell is computed above in this chapter.

# %%
pipeline_row, drops = referee_rows.iloc[0], dropped.dropped_by.value_counts().to_dict()
paper_prompts = prompt_check[prompt_check.prompts.str.startswith("paper")]
best_t = probes[probes.variable == "truth"].set_index(["position", "layer"]).auroc
st_best = st_all[st_all.feature == best_name]
claims = pd.DataFrame(
    [
        dict(
            claim="the model computes spatial relations, somewhere one can read them",
            pipeline="(not asked)",
            ground_truth=f"truth of the asked relation: answer position, layer {best[1]}, probe AUROC "
            f"{truth[best]:.3f} (occupancy control {control:.3f}); image tokens at most {best_t['image'].max():.3f}",
            why="under causal attention only positions after the question can compute the asked relation",
        ),
        dict(
            claim="a selective set of adapted features encodes spatial relations",
            pipeline=f"final set of {int(pipeline_row.final)} features",
            ground_truth=f"reference set {int(pipeline_row.reference)} features; precision "
            f"{pipeline_row.precision:.2f}, recall {pipeline_row.recall:.2f}; best recall over the open choices "
            f"{referee_rows.recall.max():.2f}",
            why=f"reference features dropped first by: {drops}",
        ),
        dict(
            claim="the lexical filter removes features that merely read spatial words",
            pipeline=f"{int(lex_t.lexical_all.sum())} of {len(lex_t)} candidates pass ('all' reading)",
            ground_truth=f"'image' reading's spread over prompts {s.loc['image', 'max']:.3g}; the final set under the "
            f"twins: {final_cf.cf_class.value_counts().to_dict()}",
            why=f"the image tokens never see the question; {int((~paper_prompts.in_vocabulary).sum())} of "
            f"{len(paper_prompts)} paper-style prompts hold words the organism never trained on",
        ),
        dict(
            claim="spatial features are new in fine-tuning",
            pipeline="features selected for rotation (decoder cosine below the pooled percentile)",
            ground_truth=f"of {len(em)} reference features, {int((em.verdict == 'new').sum()) if len(em) else 0} new, "
            f"{int((em.verdict == 'reused').sum()) if len(em) else 0} reused from the base LM",
            why=f"a feature can carry the relation without rotating: the rotation filter is the first to drop "
            f"{drops.get('dec_cos', 0)} of the {int(pipeline_row.reference)} reference features",
        ),
        RH.head_claim(costs, placement, sets, paper_heads.top, null.top),
        dict(
            claim="attribution patching approximates activation patching",
            pipeline=f"Spearman {pooled:.3f} pooled over (feature, head) pairs",
            ground_truth=f"within each feature: median {spearman['median']:.3f}, range {spearman['min']:.3f} to "
            f"{spearman['max']:.3f}",
            why="pooling mixes features of very different magnitudes",
        ),
        dict(
            claim="(beyond the paper) the reference features are used",
            pipeline="(not asked)",
            ground_truth="; ".join(
                f"x{r.scale:g}: flips {max(r.plus_flip_rate, r.minus_flip_rate):.0%}, random {r.random_mean:.1%}"
                for r in st_best.itertuples()
            ),
            why=f"steering {best_name} along its decoder direction against random directions of the same norm",
        ),
    ]
)
out.table(claims, "claims")

# %% [markdown]
# The last column is computed with the rest: where the pipeline and the ground truth disagree, it names the choice
# of the pipeline that the numbers above implicate (the filter that dropped the reference features first, the
# position the statistic is read at, the layers the attribution can score); where they agree, it says so.

# %% [markdown]
# ## Across seeds
# Every number above is one organism's: one seed. Each seed in the profile's `referee.seeds` is the whole pipeline
# again, from a fresh organism trained with that seed (`make seed SEED=n`) to this chapter
# (`lib/steps/seeds.py`; chapter 2 gives each seed's accuracy against the targets). The first table gives each
# seed's headline numbers: the reference set, the paper's final set and how much of the reference set it finds,
# and the most spatial-specific head (the largest spatial minus control cost of a single ablation), with its cost
# on the spatial and the control types. The second gives their mean and range.

# %%
SD.report(S, out, "ground-truth")

# %% tags=["remove-input"]
S.report()
