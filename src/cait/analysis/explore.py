"""One image looked at closely, as ``cait app`` shows it: the class-attention map of every
CA block and head over the image (paper Section 5, Figures 6 and 7), where one clicked
patch looks in a chosen self-attention block, the image's residual-branch ratios
(Section 2), and an explanation of the prediction by a chosen method
(:mod:`cait.analysis.explain`).

Everything is read from one :meth:`cait.CaiT.forward_trace` result by the functions of
:mod:`cait.analysis.attention` and :mod:`cait.analysis.residuals`; the trace itself comes
from :mod:`cait.inference`. Nothing here draws a page.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from cait.analysis.attention import (
    AttentionMaps,
    display_image,
    maps_from_trace,
    overlay_maps,
)
from cait.analysis.explain import DESCRIPTIONS, METHODS, explain
from cait.analysis.residuals import ResidualRatios, residual_figure, trace_ratios
from cait.models.cait import CaiT, ModelTrace
from cait.models.config import InputSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MAP_PX",
    "VIEW_PX",
    "Analysis",
    "class_attention_pictures",
    "explanation_view",
    "explore",
    "patch_at",
    "residual_plot",
    "self_attention_view",
    "with_sa_block",
]

# Side of each picture: large enough to click one patch of a 14 x 14 grid (27 pixels
# each), small enough that a 16-head model's maps fit a row of the app's gallery.
MAP_PX = 192
VIEW_PX = 384
QUERY_COLOUR = (0, 255, 255)  # the outline of the clicked patch, apart from 'inferno'


@dataclass
class Analysis:
    """What the app shows for one image.

    ``predictions`` are the top-k classes, best first, as ``cait predict`` gives them;
    ``x`` is the normalised input ``(3, img_size, img_size)`` and ``shown`` the picture the
    model saw, ``(h, w, 3)`` in ``[0, 1]``; ``maps`` holds the class attention of every CA
    block and the self-attention of block ``sa_block``; ``query`` is the patch whose
    self-attention is shown.
    """

    predictions: list[dict[str, Any]]
    x: Tensor
    shown: np.ndarray
    maps: AttentionMaps
    sa_block: int
    query: int
    residuals: ResidualRatios
    seconds: float

    def top(self) -> dict[str, float]:
        """Class name -> probability, for a label chart."""
        return {p["name"]: p["probability"] for p in self.predictions}

    def to_dict(self) -> dict[str, Any]:
        """The answer of the app's ``/predict`` endpoint: plain JSON."""
        ca = self.maps.patch_maps() if self.maps.class_attention.size else np.zeros((0, 0))
        return {
            "predictions": self.predictions,
            "grid": list(self.maps.grid),
            "class_attention": np.round(ca, 6).tolist(),  # (L, H, grid_h, grid_w)
            "residual_ratios": {
                "stage": self.residuals.stages,
                "attn": self.residuals.attn,
                "mlp": self.residuals.mlp,
            },
        }


def explore(
    trace: ModelTrace,
    x: Tensor,
    *,
    predictions: list[dict[str, Any]],
    settings: InputSpec,
    num_class_tokens: int,
    sa_block: int,
    seconds: float = 0.0,
) -> Analysis:
    """The analysis of the image whose input ``x`` gave ``trace``: the maps of every CA
    block and of SA block ``sa_block`` (from 0), the query patch at the centre of the grid.
    ``settings`` undo the normalisation for display; ``num_class_tokens`` is the model's."""
    maps = maps_from_trace(trace, num_class_tokens, sa_block)
    rows, cols = maps.grid
    return Analysis(
        predictions=predictions,
        x=x,
        shown=display_image(x, settings.mean, settings.std),
        maps=maps,
        sa_block=sa_block,
        query=(rows // 2) * cols + cols // 2,
        residuals=trace_ratios(trace),
        seconds=seconds,
    )


def with_sa_block(
    analysis: Analysis, trace: ModelTrace, num_class_tokens: int, sa_block: int
) -> Analysis:
    """The same analysis with the self-attention of block ``sa_block`` from a new trace of
    the same input."""
    maps = maps_from_trace(trace, num_class_tokens, sa_block)
    return dataclasses.replace(analysis, maps=maps, sa_block=sa_block)


def class_attention_pictures(analysis: Analysis) -> list[tuple[Image.Image, str]]:
    """One picture per CA block and head, then the block's mean of heads, captioned
    ``block 1, head 0`` ... ``block 1, mean`` (blocks from 1, heads from 0)."""
    if not analysis.maps.class_attention.size:
        return []
    patch = analysis.maps.patch_maps()  # (L, H, gh, gw)
    pictures = []
    for block, heads in enumerate(patch):
        maps = np.concatenate([heads, heads.mean(axis=0, keepdims=True)])
        _, overlays = overlay_maps(analysis.shown, maps, MAP_PX)
        captions = [f"block {block + 1}, head {h}" for h in range(len(heads))]
        captions.append(f"block {block + 1}, mean")
        pictures += list(zip(overlays, captions, strict=True))
    return pictures


def self_attention_view(analysis: Analysis, head: int | None) -> Image.Image:
    """Where the query patch looks in the chosen SA block (``head`` ``None``: the mean of
    the heads), over the image, with the query patch outlined."""
    rows, cols = analysis.maps.grid
    maps = analysis.maps.patch_attention(analysis.query)  # (H, gh, gw)
    chosen = maps.mean(axis=0) if head is None else maps[head]
    _, (picture,) = overlay_maps(analysis.shown, chosen[None], VIEW_PX)
    r, c = divmod(analysis.query, cols)
    h, w = VIEW_PX / rows, VIEW_PX / cols
    box = (round(c * w), round(r * h), round((c + 1) * w) - 1, round((r + 1) * h) - 1)
    ImageDraw.Draw(picture).rectangle(box, outline=QUERY_COLOUR, width=2)
    return picture


def patch_at(analysis: Analysis, x: float, y: float) -> int:
    """The patch under the pixel ``(x, y)`` of the self-attention view."""
    rows, cols = analysis.maps.grid
    row = min(rows - 1, max(0, int(y * rows / VIEW_PX)))
    col = min(cols - 1, max(0, int(x * cols / VIEW_PX)))
    return row * cols + col


def residual_plot(analysis: Analysis) -> Figure:
    """The residual-branch ratios of the analysed image (:func:`residual_figure`)."""
    return residual_figure([dataclasses.replace(analysis.residuals, label="this image")], (9, 3))


def explanation_view(analysis: Analysis, model: CaiT, method: str) -> tuple[Image.Image, str]:
    """The map of ``method`` (:data:`~cait.analysis.explain.METHODS`) for the predicted class
    over the image, and a caption saying what it shows. ``model`` is the analysed one."""
    if method not in METHODS:
        raise ValueError(f"the method must be one of {list(METHODS)}")
    x = analysis.x.to(next(model.parameters()).device)
    found = explain(model, x, method)
    _, (picture,) = overlay_maps(analysis.shown, found.map[None], VIEW_PX)
    name = analysis.predictions[0]["name"]
    return picture, f"{DESCRIPTIONS[method]}; for the class {name}, peak {found.map.max():.3g}"
