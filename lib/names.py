"""The book's one vocabulary: hook names, SAELens file names and the colours of the SAE variants, each defined once.

A flat module of constants and tiny functions (SAELens' `constants.py` habit), importable from anywhere without
pulling in torch or matplotlib: every module that names a hook, reads an SAE folder or colours a variant imports the
name from here instead of spelling it out.
"""

# ---------------------------------------------------------------------------------------------------------------
# Hook names (TransformerLens' spelling; lib/kernels/adapter.py reads a Hugging Face LLaVA under these names)

RESID_POST = "blocks.{layer}.hook_resid_post"  # residual stream after decoder block `layer`, before the final norm
ATTN_Z = "blocks.{layer}.attn.hook_z"  # per-head input of the attention output projection of block `layer`


def resid_name(layer: int) -> str:
    return RESID_POST.format(layer=layer)


def z_name(layer: int) -> str:
    return ATTN_Z.format(layer=layer)


# ---------------------------------------------------------------------------------------------------------------
# SAELens' on-disk format of one SAE (equal to sae_lens.constants.SAE_CFG_FILENAME / SAE_WEIGHTS_FILENAME; a test
# checks that they stay equal)

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"

# Token splits of the SAE metrics (lib/kernels/sae_training.py); each split has its own mean
SPLITS = ("full", "image", "text")

# ---------------------------------------------------------------------------------------------------------------
# Colours: one per SAE variant across every figure of the book, so a reader can follow a variant from plot to plot

VARIANT_COLORS = {
    "base": "#444444",
    "full": "#1f77b4",
    "random": "#999999",
    "text-only": "#2ca02c",
    "image-only": "#d62728",
}
ADAPTED_COLOR = "#ff7f0e"  # the adapted (visual, rotated) features of the diffing step
