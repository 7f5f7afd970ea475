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
#   book_outputs:
#     figures: [layer_profile, head_heatmap, top_heads, validation, attention_overlays]
#     tables: [head_scores, validation, ablation]
# ---

# %% [markdown]
# # Attribution patching to attention heads
#
# The paper's last claim: the spatial features are driven by a small group of mid-layer attention heads (its
# Figure 4 and ablation table). METHOD.md, step 4:
#
# * **Metric** of a final feature f at layer L_f with (unit) decoder direction d_f: m = Σ over the post-image
#   text positions of ⟨h_t(L_f), d_f⟩, h = `blocks.L_f.hook_resid_post`.
# * **Corrupted run**: every image embedding replaced by one mean image-token embedding (the mean over held-out
#   images, never the ones being corrupted); text unchanged.
# * **Attribution patching** (first-order estimate of activation patching): for every head h of every layer
#   l < L_f, score = mean over post-image positions of |Σ_k (z_corr − z_clean) · ∂m/∂z_clean|, z = the head's
#   slice of the input to the attention output projection (`hook_z`). A second variant takes the gradient on the
#   corrupted run. One clean forward, one corrupted forward and one backward per batch give every head at once.
# * **Aggregation** as in the source: each feature's head scores normalised to unit total, summed over features,
#   each head divided by the number of features above its layer.
# * **Validation** (beyond the paper): exhaustive activation patching of every head at every post-image position
#   on the same samples; Spearman correlation with the attribution scores, and the wall-time ratio.
# * **Causal checks** on the true/false statements (the VSR analogue): the top-k heads mean- and zero-ablated,
#   k random heads from the same layers, each final feature projected out of the residual stream at its layer,
#   and a non-spatial control task (colour and shape questions).

# %% tags=["parameters"]
profile = "default"

# %% tags=["hide-input"]
import time

import numpy as np
import pandas as pd
import torch

from lib.figures import attribution as FA
from lib.io.outputs import Outputs
from lib.kernels import attention as AN
from lib.kernels import attribution as AT
from lib.kernels import causal as CA
from lib.kernels.adapter import iter_batches, prepare
from lib.kernels.probing import feature_keys
from lib.steps import heads as HD
from lib.steps import seeds as SD
from lib.steps.study import Study

S = Study(profile)  # the pipeline of this profile: every step's result, cached (lib/steps)
P, out = S.P, Outputs("06_attribution", S.P.name)
vlm, D, adapted, sel = S.vlm, S.data, S.adapted_saes, S.selection
final, fallback = HD.attributed_features(sel.table)
if fallback:  # say so loudly: the chapter then attributes adapted features, not spatial ones
    print(
        f"THE FINAL SPATIAL SET IS EMPTY on profile {P.name!r}: attributing the {len(final)} adapted features "
        "with the highest visual energy instead, so that the method runs; read nothing spatial into this chapter"
    )
print(
    f"features attributed: {len(final)} at layers {sorted(final.layer.unique().tolist())}; "
    f"samples: {min(P.attribution.n_samples, len(D.statements))} statements"
)

# %% [markdown]
# ## Attribution scores

# %%
scores = S.head_scores
H = scores.table
L, n_heads = vlm.n_layers, vlm.n_heads
ranking = HD.head_ranking(H, L, n_heads, P.attribution.top_k)  # the paper's aggregation and its top k
agg, top, head_table, k = ranking.aggregate, ranking.top, ranking.table, len(ranking.top)
out.table(head_table, "head_scores")
print("top heads:", ", ".join(f"L{l}H{h}" for l, h in top))

# %%
score_lh = agg.score_lh.numpy()
resid = scores.timing["resid"].groupby("layer").score.mean()  # attribution to each layer's residual stream
out.figure(FA.plot_layer_profile(score_lh, agg.layer_profile_l.numpy(), resid, head_table, top, k), "layer_profile")
out.figure(FA.plot_head_heatmap(score_lh), "head_heatmap")
out.figure(FA.plot_top_heads(score_lh, top), "top_heads")

# %% [markdown]
# The layer profile sums each layer's aggregated head scores (bars; the dashed line is the attribution to each
# layer's whole residual stream, scaled to the same total), the heatmap shows every head, and the bars rank the
# best ones. Heads in the layer of a feature or above it are not scored (they cannot cause it); the last layer
# with a bar is the one below the deepest final feature.

# %% [markdown]
# ## Validation against exhaustive activation patching

# %%
validation = HD.validation_table(scores)
t = scores.timing
ratio = t["exhaustive_s"] / (t["attribution_s"] / 2)  # attribution_s times both gradient variants
out.table(validation, "validation")
print(
    f"Spearman rho, paper's score (clean gradient) vs exhaustive: {validation.spearman.iloc[0]:.3f} over "
    f"{len(H)} (feature, head) pairs; exhaustive patching took {ratio:.1f}x the time of one attribution variant "
    f"({t['exhaustive_s']:.1f} s vs {t['attribution_s'] / 2:.1f} s on {t['n_samples']} samples)"
)
out.figure(FA.plot_validation(H, validation.iloc[:2]), "validation")  # the paper's score, both gradients

# %% [markdown]
# Each dot is one (feature, head) pair: the paper's score from attribution patching (y) against the same score
# measured by patching that head at each post-image position (x). The printed ρ and time ratio are the ones the
# issue asks for (goal ρ ≥ 0.9). Attribution is a first-order estimate, so it is worst where the corrupted run is
# far from the clean one; the corrupted-gradient variant is the check on that.

# %% [markdown]
# ### Speed against its ideal
# One batch, one feature (the deepest), the three methods timed in the same run (median of three repeats).
# Counting a backward pass as two forwards, attribution costs about 4 forward passes whatever the number of heads;
# exhaustive patching costs one forward per head, or per head and post-image position. The ideal speed-ups are
# therefore (heads scored) / 4 and (heads scored x positions) / 4.

# %%


def median_time(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


deepest = max(HD.features_of(adapted, P.diffing.variant, feature_keys(final)), key=lambda f: f.layer)
items = D.statements[: P.attribution.batch_size]
one = next(iter_batches(vlm, [s.image for s in items], [s.question for s in items], len(items)))
mean_d = HD.mean_image(vlm, D.heldout, P.attribution.batch_size)
n_scored = deepest.layer * n_heads
n_pos = int(one.post_image_bs.any(0).sum())  # positions patched one by one: post-image in any sequence
ideal = AT.ideal_speedups(n_scored, n_pos)
t_attr = median_time(lambda: AT.attribute(vlm, one, [deepest], mean_d))
t_head = median_time(lambda: AT.activation_patching(vlm, one, [deepest], mean_d))
t_pos = median_time(lambda: AT.activation_patching(vlm, one, [deepest], mean_d, per_position=True))
speed = pd.DataFrame(
    [
        dict(method="attribution", seconds=t_attr, speedup=1.0, ideal=1.0),
        dict(method="exhaustive per head", seconds=t_head, speedup=t_head / t_attr, ideal=ideal["per head"]),
        dict(
            method="exhaustive per head and position",
            seconds=t_pos,
            speedup=t_pos / t_attr,
            ideal=ideal["per head and position"],
        ),
    ]
)
speed["share_of_ideal"] = speed.speedup / speed.ideal
out.table(speed, "speed")
print(
    f"feature {deepest.name}: {n_scored} heads scored, {n_pos} post-image positions; speed-up per head "
    f"{speed.speedup[1]:.1f}x (ideal {speed.ideal[1]:.1f}x), per head and position {speed.speedup[2]:.1f}x "
    f"(ideal {speed.ideal[2]:.1f}x); lowest share of the ideal {speed.share_of_ideal[1:].min():.2f}"
)

# %% [markdown]
# The `share_of_ideal` column (its lowest value printed above) says how close each exhaustive method comes to the
# forward-pass count; a share of one half or more means attribution delivers at least half its ideal speed-up. The
# per-position run also does the per-head forwards, and both exhaustive runs do a clean and a corrupted forward
# first, so their cost is slightly above the count the ideal uses.

# %% [markdown]
# ## Causal checks: Table 2

# %%
causal = S.causal  # top heads and each attributed feature, with random controls (lib/steps/heads.py)
table2 = CA.ablation_table(causal)
out.table(table2, "ablation")
per_relation = causal[(causal.task == "statement") & causal.condition.isin(["clean", "top heads", "random heads"])]
print(
    per_relation.pivot_table(index=["condition", "ablation"], columns="relation", values="accuracy")
    .round(3)
    .to_string()
)

# %% [markdown]
# Table 2 of the book: accuracy and mean P(correct) on the statements (and on the control questions), clean and
# under each intervention; random heads and random features are averaged over their draws. The per-relation
# accuracies printed below it show which relations the top heads carry. The comparison that matters is top heads
# against random heads from the same layers: a drop only for the top heads, and only on the spatial task, is the
# paper's claim.

# %% [markdown]
# ## Where do the top heads look?

# %%
spatial_items = D.statements[:4]
control_items = D.controls[:4] if D.controls else []
bottom = [(r.layer, r.head) for r in head_table.tail(2).itertuples()]
show_heads = [top[0], *bottom]
rows = [("statement", s.image, s.question) for s in spatial_items] + [
    ("control", c.image, c.question) for c in control_items
]
batch = prepare(vlm, [r[1] for r in rows], [r[2] for r in rows])
att = AN.image_attention(vlm, batch, show_heads, AN.last_token_bs(batch))
fig = FA.plot_attention_overlays(
    [r[1] for r in rows],
    [r[2] for r in rows],
    show_heads,
    ["top"] + ["bottom"] * len(bottom),
    att.grid_bhyx.float().cpu().numpy(),
    att.image_mass_bh.double().cpu().numpy(),
)
out.figure(fig, "attention_overlays")

# %% [markdown]
# Attention from the answer position to the image patches, for the top head and the two lowest-ranked heads, on
# statements (top rows) and on colour/shape questions (bottom rows); the title gives the head's total attention
# on the image tokens.

# %%
if D.samples is not None:
    items = D.samples["statements"][: P.attribution.n_samples]
    grid_side = round(vlm.n_image_tokens**0.5)
    heads_all = [(l, h) for l in range(L) for h in range(n_heads)]
    masses = []
    for lo in range(0, len(items), P.attribution.batch_size):
        chunk = items[lo : lo + P.attribution.batch_size]
        b = prepare(vlm, [s.scene.render() for s in chunk], [s.question for s in chunk])
        a = AN.image_attention(vlm, b, heads_all, AN.last_token_bs(b))
        named = AN.attention_mass(a, [AN.scene_patches(s.scene, [s.subject, s.obj], grid_side) for s in chunk])
        masses.append((named / a.image_mass_bh.clamp_min(1e-9)).double())
    share_h = torch.cat(masses).mean(0)
    obj_share = pd.DataFrame(
        [
            dict(layer=l, head=h, share_on_named_objects=float(share_h[i]), top=(l, h) in top)
            for i, (l, h) in enumerate(heads_all)
        ]
    )
    out.table(obj_share, "object_attention")
    chance = np.mean([len(AN.scene_patches(s.scene, [s.subject, s.obj], grid_side)) / grid_side**2 for s in items])
    print(
        f"share of image attention on the two named objects: top heads "
        f"{obj_share[obj_share.top].share_on_named_objects.mean():.2f}, other heads "
        f"{obj_share[~obj_share.top].share_on_named_objects.mean():.2f}, uniform attention {chance:.2f}"
    )

# %% [markdown]
# The ground truth the organism adds: of each head's attention on the image (from the answer position of the
# statements), the share that falls on the patches of the two objects the statement names. A head that compares
# the two objects' positions should look at them: compare the top heads' share with the other heads' and with
# what uniform attention would give.

# %% [markdown]
# ## What the four chapters found
# One line per claim of the paper, each computed here from the cached results of the chapter that made it.

# %%
recon = S.reconstruction
fvu = recon[recon.stream == "vlm"].pivot_table(index=["layer", "split"], columns="sae", values="fvu")
text_fvu, full_fvu = fvu.xs("text", level="split"), fvu.xs("full", level="split")
med_cos = S.features.groupby("variant").dec_cos.median()
clean = table2.set_index(["condition", "ablation"])
stmt, ctrl = "statement: accuracy", "control: accuracy"
lines = [
    f"SAE adaptation: text-only SAE on VLM text tokens, FVU {text_fvu['base'].mean():.3f} (base) -> "
    f"{text_fvu['text-only'].mean():.3f} (adapted), lower at {int((text_fvu['text-only'] < text_fvu['base']).sum())}"
    f" of {len(text_fvu)} layers; random init {full_fvu['random'].mean():.3f} vs full {full_fvu['full'].mean():.3f}"
    " (all tokens, mean over layers)",
    "feature diffing: median decoder cosine "
    + ", ".join(f"{v} {med_cos[v]:.2f}" for v in ["text-only", "full", "image-only", "random"] if v in med_cos)
    + f"; {int(sel.table.adapted.sum())} adapted features",
    f"spatial probing: {int(sel.table.spatial.sum())} spatial candidates, final set {int(sel.table.final.sum())}",
    f"attribution: top heads {', '.join(f'L{l}H{h}' for l, h in top)}; Spearman rho with exhaustive patching "
    f"{validation.spearman.iloc[0]:.3f}",
]
if ("top heads", "mean") in clean.index and ctrl in clean:
    lines.append(
        f"ablation (mean): statements {clean.loc[('clean', ''), stmt]:.3f} clean -> "
        f"{clean.loc[('top heads', 'mean'), stmt]:.3f} top heads, {clean.loc[('random heads', 'mean'), stmt]:.3f} "
        f"random heads; control {clean.loc[('clean', ''), ctrl]:.3f} -> {clean.loc[('top heads', 'mean'), ctrl]:.3f}"
        f" top heads, {clean.loc[('random heads', 'mean'), ctrl]:.3f} random heads"
    )
print("\n".join(lines))

# %% [markdown]
# Read against the paper: the adaptation claims (text-only beats the base SAE on the VLM's text tokens; random
# initialisation lags) can be checked line by line above. The spatial claims depend on a VLM that has learned
# spatial relations: the organism of this build answers relational questions well above chance (chapter 2 prints
# which of its accuracy targets it misses), and the ground-truth check of chapter 5 says how far its final features are
# from encoding the true relation. The attribution is validated (ρ above), but the ablation decides whether the top
# heads are *specific*: a drop under top-head ablation that random heads from the same layers also cause, or that
# the control task suffers too, means the heads are needed for reading the image at all, not for space.

# %% [markdown]
# ## Across seeds
# Per seed in `referee.seeds` (each its own organism and pipeline; `lib/steps/seeds.py`): Spearman's ρ of the
# paper's score against exhaustive patching, and statement accuracy with the top heads mean-ablated against random
# heads from the same layers (Table 2); then the mean and range.

# %%
SD.report(S, out, "attribution")

# %% tags=["remove-input"]
S.report()
