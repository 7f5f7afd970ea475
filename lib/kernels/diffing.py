"""Feature diffing: compare each feature of the base SAE with itself after adaptation (METHOD.md, step 2).

Shape key: n = tokens, f = SAE features (width), d = model width.

The per-feature table (one row per layer x variant x feature) is the hub of the later chapters. Its columns:
    dec_cos, enc_cos      cosine between base and adapted decoder rows / encoder columns
    dec_rel_l2            ||W_dec_adapted[i] - W_dec_base[i]|| / ||W_dec_base[i]||
    visual_energy         E_v(i) = sum_img z_i^2 / (sum_img z_i^2 + sum_txt z_i^2) on held-out VLM activations
    visual_energy_raw     the authors' second definition: mean z_i^2 on the VLM stream vs on the text-only LM
                          stream, as a share m_vlm / (m_vlm + m_lm) so that both definitions live on [0, 1]
    freq_img, freq_txt    firing frequency (z > 0) on image / text tokens
    mean_abs_img, mean_abs_txt, img_txt_ratio
    image_dependence      (organism) relative change of z when the image is replaced by the mean image embedding

The figures of chapter 4 that read this table are lib/figures/diffing.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch
from scipy import stats

from lib.kernels.activations import lm_batches, vlm_batches
from lib.names import resid_name

EPS = 1e-12


def weight_diff(
    W_dec_base_fd: torch.Tensor, W_dec_adapt_fd: torch.Tensor, W_enc_base_df: torch.Tensor, W_enc_adapt_df: torch.Tensor
) -> pd.DataFrame:
    """Per-feature decoder cosine, encoder cosine and relative L2 change of the decoder row."""
    assert W_dec_base_fd.shape == W_dec_adapt_fd.shape, "base and adapted SAEs must have the same shape"
    cos = torch.nn.functional.cosine_similarity
    dec_cos = cos(W_dec_base_fd.double(), W_dec_adapt_fd.double(), dim=1)
    enc_cos = cos(W_enc_base_df.double(), W_enc_adapt_df.double(), dim=0)
    rel = (W_dec_adapt_fd - W_dec_base_fd).double().norm(dim=1) / (W_dec_base_fd.double().norm(dim=1) + EPS)
    return pd.DataFrame(
        {
            "feature": np.arange(len(dec_cos)),
            "dec_cos": dec_cos.numpy(),
            "enc_cos": enc_cos.numpy(),
            "dec_rel_l2": rel.numpy(),
        }
    )


class FeatureStats:
    """Streaming per-feature sums over tokens, split into image and text tokens.

    `update(z_nf, image_mask_n)` once per batch; `frame()` at the end. Memory is O(f), whatever the data size.
    Sums are kept in float64 so that millions of tokens add up exactly enough for ratios near 0 or 1.
    """

    def __init__(self, n_features: int):
        zeros = lambda: torch.zeros(n_features, dtype=torch.float64)  # noqa: E731
        self.sq_img, self.sq_txt = zeros(), zeros()
        self.abs_img, self.abs_txt = zeros(), zeros()
        self.fire_img, self.fire_txt = zeros(), zeros()
        self.n_img = self.n_txt = 0

    @torch.no_grad()
    def update(self, z_nf: torch.Tensor, image_mask_n: torch.Tensor) -> None:
        assert z_nf.shape[0] == image_mask_n.shape[0], f"{z_nf.shape} tokens vs mask {image_mask_n.shape}"
        z = z_nf.double()
        img, txt = z[image_mask_n], z[~image_mask_n]
        self.sq_img += img.square().sum(0)
        self.sq_txt += txt.square().sum(0)
        self.abs_img += img.abs().sum(0)
        self.abs_txt += txt.abs().sum(0)
        self.fire_img += (img > 0).sum(0)
        self.fire_txt += (txt > 0).sum(0)
        self.n_img += img.shape[0]
        self.n_txt += txt.shape[0]

    def frame(self) -> pd.DataFrame:
        total = self.sq_img + self.sq_txt
        # A feature that never fires has no visual energy to speak of: 0, not NaN, so it is never "visual".
        energy = torch.where(total > 0, self.sq_img / total.clamp_min(EPS), torch.zeros_like(total))
        n_img, n_txt = max(self.n_img, 1), max(self.n_txt, 1)
        mean_abs_img, mean_abs_txt = self.abs_img / n_img, self.abs_txt / n_txt
        return pd.DataFrame(
            {
                "visual_energy": energy.numpy(),
                "freq_img": (self.fire_img / n_img).numpy(),
                "freq_txt": (self.fire_txt / n_txt).numpy(),
                "mean_abs_img": mean_abs_img.numpy(),
                "mean_abs_txt": mean_abs_txt.numpy(),
                "img_txt_ratio": (mean_abs_img / mean_abs_txt.clamp_min(EPS)).numpy(),
                "mean_sq_vlm": ((self.sq_img + self.sq_txt) / (n_img + n_txt)).numpy(),
                # The raw sums every column above is derived from, so a selection can be recomputed from the table.
                "sum_sq_img": self.sq_img.numpy(),
                "sum_sq_txt": self.sq_txt.numpy(),
                "sum_abs_img": self.abs_img.numpy(),
                "sum_abs_txt": self.abs_txt.numpy(),
                "n_fire_img": self.fire_img.numpy().astype(np.int64),
                "n_fire_txt": self.fire_txt.numpy().astype(np.int64),
                "n_tokens_img": np.full(len(energy), self.n_img, dtype=np.int64),
                "n_tokens_txt": np.full(len(energy), self.n_txt, dtype=np.int64),
            }
        )


def raw_visual_energy(mean_sq_vlm: np.ndarray, mean_sq_lm: np.ndarray) -> np.ndarray:
    """The authors' alternative: the VLM stream's mean z^2 as a share of (VLM + text-only LM), 0 if both are 0."""
    total = mean_sq_vlm + mean_sq_lm
    return np.where(total > 0, mean_sq_vlm / np.maximum(total, EPS), 0.0)


def selection(table: pd.DataFrame, variant: str, eps: float, q: float) -> tuple[pd.DataFrame, float]:
    """The rows of `variant` with an `adapted` column, and the pooled cosine threshold it used."""
    rows = table[table.variant == variant].reset_index(drop=True).copy()
    if rows.empty:
        raise ValueError(f"no rows of variant {variant!r}; variants are {sorted(table.variant.unique())}")
    rows["adapted"] = select_adapted(rows, eps, q)
    return rows, pooled_percentile(rows.dec_cos, q)


def pooled_percentile(dec_cos: np.ndarray | pd.Series, q: float) -> float:
    """The q-th percentile of decoder cosine pooled over all features of all layers (the book's choice; the
    source also admits a per-layer percentile, shown as a check in the chapter). Linear interpolation (numpy's
    default)."""
    values = np.asarray(dec_cos, dtype=float)
    assert np.isfinite(values).all(), "decoder cosines must be finite"
    return float(np.percentile(values, q))


def select_adapted(table: pd.DataFrame, eps: float, q: float, per_layer: bool = False) -> pd.Series:
    """Adapted features: visual energy > eps and decoder cosine <= the q-th percentile of cosine.

    `table` holds the rows of ONE variant (the book uses text-only). With `per_layer=True` the percentile is taken
    within each layer instead of pooled over all layers."""
    assert table["variant"].nunique() <= 1 if "variant" in table else True, "select within one variant"
    if per_layer:
        threshold = table.groupby("layer")["dec_cos"].transform(lambda c: np.percentile(c, q))
    else:
        threshold = pooled_percentile(table["dec_cos"], q)
    return (table["visual_energy"] > eps) & (table["dec_cos"] <= threshold)


def robustness_sweep(table: pd.DataFrame, eps_grid, q_grid, eps0: float, q0: float) -> pd.DataFrame:
    """For every (eps, q): selected count, Jaccard with the default selection, and Pearson correlation of the
    per-layer counts with the default's (NaN when either profile of counts is constant)."""
    default = select_adapted(table, eps0, q0)
    layers = np.sort(table["layer"].unique())
    default_counts = table[default].groupby("layer").size().reindex(layers, fill_value=0).to_numpy()
    rows = []
    for eps, q in itertools.product(eps_grid, q_grid):
        sel = select_adapted(table, eps, q)
        union = (sel | default).sum()
        counts = table[sel].groupby("layer").size().reindex(layers, fill_value=0).to_numpy()
        if np.ptp(counts) == 0 or np.ptp(default_counts) == 0:
            corr = np.nan
        else:
            corr = stats.pearsonr(counts, default_counts).statistic
        rows.append(
            {
                "eps": eps,
                "q": q,
                "selected": int(sel.sum()),
                "jaccard": float((sel & default).sum() / union) if union else 1.0,
                "layer_corr": corr,
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# The per-feature table, streamed: one VLM forward per batch feeds every (layer, variant) accumulator.


def feature_table(
    vlm, base_saes: dict, adapted: dict[str, dict], heldout_pairs, heldout_text_pairs=None, batch_size: int = 8
) -> pd.DataFrame:
    """One row per (layer, variant, feature): weight diffs against the base SAE, and activation statistics of the
    ADAPTED SAE on held-out VLM activations (image / text split as the adapter's image mask says, BOS dropped).

    `base_saes[layer]` and `adapted[variant][layer]` are SAELens SAEs. With `heldout_text_pairs` (caption, question)
    the base LM's text stream is run too, for the authors' raw second-moment definition `visual_energy_raw`.
    Memory is O(layers x variants x width): activations are never kept.
    """
    layers = sorted(base_saes)
    keys = [(layer, v) for v in adapted for layer in layers]
    stats = {k: FeatureStats(base_saes[k[0]].cfg.d_sae) for k in keys}
    with torch.no_grad():
        for batch in vlm_batches(vlm, heldout_pairs, batch_size, layers):
            for li, layer in enumerate(layers):
                for v in adapted:
                    stats[(layer, v)].update(adapted[v][layer].encode(batch.x_lnd[li]), batch.image_mask_n)
        sq_lm = {k: torch.zeros(base_saes[k[0]].cfg.d_sae, dtype=torch.float64) for k in keys}
        n_lm = 0
        if heldout_text_pairs is not None:
            for batch in lm_batches(vlm, heldout_text_pairs, batch_size, layers):
                n_lm += batch.x_lnd.shape[1]
                for li, layer in enumerate(layers):
                    for v in adapted:
                        sq_lm[(layer, v)] += adapted[v][layer].encode(batch.x_lnd[li]).double().square().sum(0)
    frames = [
        feature_rows(layer, v, base_saes[layer], adapted[v][layer], stats[(layer, v)], sq_lm[(layer, v)], n_lm)
        for layer, v in keys
    ]
    return pd.concat(frames, ignore_index=True)


def feature_rows(layer: int, variant: str, base, sae, stats: FeatureStats, sq_lm_f: torch.Tensor, n_lm: int):
    """The feature table's rows of one SAE: weight diffs against its base SAE, its activation statistics, and (with
    n_lm > 0 text-stream tokens) the raw second-moment visual energy."""
    frame = weight_diff(
        base.W_dec.detach().cpu(), sae.W_dec.detach().cpu(), base.W_enc.detach().cpu(), sae.W_enc.detach().cpu()
    )
    frame = pd.concat([frame, stats.frame()], axis=1)
    if n_lm:
        frame["visual_energy_raw"] = raw_visual_energy(frame["mean_sq_vlm"].to_numpy(), (sq_lm_f / n_lm).numpy())
    frame.insert(0, "variant", variant)
    frame.insert(0, "layer", layer)
    return frame


@torch.no_grad()
def image_dependence(vlm, saes: dict, pairs, reference_images, batch_size: int = 8) -> pd.DataFrame:
    """Ground truth the organism allows: how much each feature's activation depends on the image CONTENT.

    Every pair runs twice: clean, and with every image embedding replaced by the mean image-token embedding of
    `reference_images` (the corruption of chapter 6; the text is unchanged). Per feature, over the post-image text
    positions (the question after the image and the answer position: where the attribution metric reads a
    feature): dependence = sum |z_clean - z_mean_image| / sum |z_clean| (0 for a feature that never fires there).
    A feature whose activation on the text reflects what is in the image changes when the image is averaged away;
    one that reads the words does not. On the image tokens themselves every input changes under the corruption, so
    they would say nothing. `saes[layer]` are SAELens SAEs (one variant)."""
    from lib.kernels.adapter import capture, prepare, replace_image_embeddings
    from lib.kernels.attribution import mean_image_embedding

    layers = sorted(saes)
    mean_d = mean_image_embedding(vlm, reference_images, batch_size)
    diff = {layer: torch.zeros(saes[layer].cfg.d_sae, dtype=torch.float64) for layer in layers}
    mass = {layer: torch.zeros_like(diff[layer]) for layer in layers}
    for lo in range(0, len(pairs), batch_size):
        chunk = [pairs[i] for i in range(lo, min(lo + batch_size, len(pairs)))]
        batch = prepare(vlm, [p[0] for p in chunk], [p[1] for p in chunk])
        clean = capture(vlm, batch, resid_layers=layers).resid
        with replace_image_embeddings(vlm, mean_d):
            corrupt = capture(vlm, batch, resid_layers=layers).resid
        keep_bs = batch.post_image_bs
        for layer in layers:
            name = resid_name(layer)
            sae = saes[layer]
            z_clean = sae.encode(clean[name][keep_bs].to(sae.dtype)).double()
            z_corrupt = sae.encode(corrupt[name][keep_bs].to(sae.dtype)).double()
            diff[layer] += (z_clean - z_corrupt).abs().sum(0).cpu()
            mass[layer] += z_clean.abs().sum(0).cpu()
    frames = []
    for layer in layers:
        dep = torch.where(mass[layer] > 0, diff[layer] / mass[layer].clamp_min(EPS), torch.zeros_like(mass[layer]))
        frames.append(pd.DataFrame({"layer": layer, "feature": np.arange(len(dep)), "image_dependence": dep.numpy()}))
    return pd.concat(frames, ignore_index=True)
