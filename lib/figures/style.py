"""The book's figure style as the figure functions use it: one colour per SAE variant and the look of an image panel.

The colours themselves are constants of lib/names.py (the one vocabulary); the theme every figure is drawn under
(seaborn's whitegrid, dpi, bold titles) is set by `lib.io.outputs.style()` when a chapter opens its `Outputs`.
"""

from __future__ import annotations

from matplotlib.axes import Axes

from lib.names import VARIANT_COLORS


def variant_color(name: str) -> str | None:
    """The colour of an SAE variant; None (matplotlib's next colour) for a name outside the palette."""
    return VARIANT_COLORS.get(name)


def image_axes(ax: Axes) -> None:
    """An axes that shows an image: no ticks and no grid over the pixels."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
