"""Class-attention maps (paper Section 5, Figures 6 and 7): where each head of each
class-attention block looks, overlaid on the image.

The maps come from :meth:`cait.CaiT.forward_trace`, never from hooks. In a CA block
the class token is the only query (paper Eq. 6-8); its attention row covers the class
token(s) and the ``N`` patches and sums to 1. The patch part, reshaped to the patch grid,
is the map that is drawn.

In every picture blocks are numbered from 1, as in the paper's figures (SA block 1 is
``model.blocks[0]``; the ``sa_block`` arguments are such 0-based indices), and heads from 0;
each grid's legend says so, below its colour scale.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from cait.analysis.output_folder import check_output_folder, write_output_folder
from cait.data import eval_transform, read_image
from cait.models.build import LoadedModel, load_for_inference
from cait.models.cait import CaiT, ModelTrace

__all__ = [
    "AttentionMaps",
    "GridLayout",
    "MapStyle",
    "SABlockOutOfRange",
    "attention_maps",
    "display_image",
    "maps_from_trace",
    "overlay_maps",
    "render_attention_grid",
    "save_attention_maps",
]

logger = logging.getLogger(__name__)

# Side of one picture in the saved grids, in pixels: large enough to see the patch grid of
# a 16 x 16 digit model and small enough that a 16-head, 2-block M48 grid stays < 4k wide.
CELL_PX = 192
TITLE_PX = 16  # a line of PIL's default bitmap font
PAD_PX = 4
OVERLAY_ALPHA = 0.6  # weight of the coloured map over the grey image
LINE_PX = 14  # a line of text in the legend
# the band under a grid: the colour scale, its tick labels, then three lines of text
LEGEND_PX = 4 + 10 + 18 + 3 * LINE_PX
LEGEND_WIDTH_PX = 480  # the longest line of the legend, so that a 1-head grid shows it whole
COLOURBAR_PX = (256, 10)  # width and height of the colour scale
COLOUR_MAP = "inferno"

# How a map of the token grid is drawn at picture size: "blocks", one flat square per patch
# token (nearest neighbour: what the model sees, a 4 x 4 grid for the demo model), or
# "smooth", bilinear interpolation between the token centres (an overlay in the style of
# the paper's figures, which hides the grid).
MapStyle = Literal["blocks", "smooth"]
_RESAMPLING = {"blocks": "nearest", "smooth": "bilinear"}
# The files save_attention_maps writes per image: STEM_class_attention.png/.npy and
# STEM_sa{k}.png/.npy; an output folder of only these holds earlier maps.
_MAP_FILE = re.compile(r".+_(class_attention|sa[0-9]+)\.(png|npy)")
_TOOL = "attention"
NUMBERING = "blocks are numbered from 1, as in the paper's figures; heads from 0"


@dataclass
class AttentionMaps:
    """Attention of one image.

    ``class_attention``: ``(L, H, T, T + N)``, the attention probabilities of the ``L``
    class-attention blocks (rows: the ``T`` class/distillation tokens as queries; columns:
    those tokens, then the ``N`` patches in row-major grid order). ``self_attention``:
    ``(H, N', N')`` for the chosen SA block, or ``None``. ``grid``: the patch grid.
    """

    class_attention: np.ndarray
    self_attention: np.ndarray | None
    grid: tuple[int, int]
    num_class_tokens: int
    prediction: int

    def patch_maps(self) -> np.ndarray:
        """The class token's attention over the patches: ``(L, H, grid_h, grid_w)``."""
        T = self.num_class_tokens
        L, H = self.class_attention.shape[:2]
        return self.class_attention[:, :, 0, T:].reshape(L, H, *self.grid)

    def self_attention_maps(self) -> np.ndarray:
        """Mean attention each patch receives in the chosen SA block: ``(H, grid_h, grid_w)``.

        The average over all query patches of their attention rows; with the class token
        early (ViT/DeiT), the class token's own row instead, as in the CA maps.
        """
        if self.self_attention is None:
            raise ValueError("no self-attention block was recorded (pass sa_block)")
        n = self.grid[0] * self.grid[1]
        prefix = self.self_attention.shape[-1] - n  # class tokens in the SA stage (early)
        attn = self.self_attention
        rows = attn[:, 0, prefix:] if prefix else attn[:, prefix:, prefix:].mean(axis=1)
        return rows.reshape(-1, *self.grid)

    def patch_attention(self, patch: int) -> np.ndarray:
        """Where one patch looks in the chosen SA block: the attention row of patch
        ``patch`` (row-major in the grid) as a query, over the patches: ``(H, grid_h, grid_w)``.

        With the class token early the row also gives weight to the class token; the
        patch part is returned as it is (it sums to less than 1).
        """
        if self.self_attention is None:
            raise ValueError("no self-attention block was recorded (pass sa_block)")
        n = self.grid[0] * self.grid[1]
        if not 0 <= patch < n:
            raise ValueError(f"patch must be in [0, {n - 1}], got {patch}")
        prefix = self.self_attention.shape[-1] - n
        return self.self_attention[:, prefix + patch, prefix:].reshape(-1, *self.grid)


class SABlockOutOfRange(ValueError):
    """``sa_block`` (an index from 0) names no self-attention block of the model; ``depth``
    says how many it has, for a caller that counts them from 1 (``cait attention``)."""

    def __init__(self, sa_block: int, depth: int) -> None:
        super().__init__(f"sa_block must be in [0, {depth - 1}], got {sa_block}")
        self.sa_block, self.depth = sa_block, depth


@torch.no_grad()
def attention_maps(model: CaiT, image: Tensor, sa_block: int | None = None) -> AttentionMaps:
    """The attention maps of one normalised image ``(in_chans, H_img, W_img)``."""
    if not isinstance(model, CaiT):
        raise ValueError(f"attention maps need a cait model with forward_trace, got {type(model)}")
    was_training = model.training
    model.eval()
    try:
        out = model.forward_trace(image[None])
    finally:
        model.train(was_training)
    return maps_from_trace(out, model.config.num_class_tokens, sa_block)


def maps_from_trace(
    trace: ModelTrace, num_class_tokens: int, sa_block: int | None = None
) -> AttentionMaps:
    """The maps of the first image of a :meth:`~cait.CaiT.forward_trace` result.

    ``num_class_tokens`` is the model's ``config.num_class_tokens``; ``sa_block`` picks the
    self-attention block to keep (``None``: none; :class:`SABlockOutOfRange` when the
    model has no such block).
    """
    if sa_block is not None and not 0 <= sa_block < len(trace.sa):
        raise SABlockOutOfRange(sa_block, len(trace.sa))
    if not trace.ca and sa_block is None:
        raise ValueError(
            "this model has no class-attention blocks (class token early or avg pooling); "
            "choose a self-attention block to draw instead (sa_block)"
        )
    ca = (
        torch.stack([t.attn[0] for t in trace.ca]).float().cpu().numpy()
        if trace.ca
        else np.zeros((0, 0, 0, 0), np.float32)
    )
    sa = trace.sa[sa_block].attn[0].float().cpu().numpy() if sa_block is not None else None
    return AttentionMaps(
        class_attention=ca,
        self_attention=sa,
        grid=trace.grid,
        num_class_tokens=num_class_tokens,
        prediction=int(trace.logits[0].argmax()),
    )


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid of titled square cells (one picture per cell), with the
    legend band (colour scale and numbering) below them."""

    rows: int
    cols: int
    cell: int = CELL_PX

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the whole picture."""
        return (
            max(PAD_PX + self.cols * (self.cell + PAD_PX), 2 * PAD_PX + LEGEND_WIDTH_PX),
            PAD_PX + self.rows * (TITLE_PX + self.cell + PAD_PX) + LEGEND_PX,
        )

    @property
    def legend_top(self) -> int:
        return self.size[1] - LEGEND_PX

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of a cell's picture (below its title)."""
        left = PAD_PX + col * (self.cell + PAD_PX)
        top = PAD_PX + row * (TITLE_PX + self.cell + PAD_PX) + TITLE_PX
        return left, top, left + self.cell, top + self.cell


def _heat(values: np.ndarray) -> np.ndarray:
    """Map ``[0, 1]`` values to RGB with matplotlib's 'inferno' colour map."""
    from matplotlib import colormaps

    return colormaps[COLOUR_MAP](values)[..., :3]


def _upsample(maps: np.ndarray, size: int, style: MapStyle = "blocks") -> np.ndarray:
    """``(K, gh, gw)`` -> ``(K, size, size)`` drawn in ``style``, each map divided by its own
    maximum (so its peak is 1)."""
    if style not in _RESAMPLING:
        raise ValueError(f"style must be one of {list(_RESAMPLING)}, got {style!r}")
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    peak = t.flatten(1).amax(dim=1).clamp_min(1e-12)
    mode = _RESAMPLING[style]
    corners = None if mode == "nearest" else False
    up = F.interpolate(t, size=(size, size), mode=mode, align_corners=corners)[:, 0]
    return (up / peak[:, None, None]).clamp(0, 1).numpy()


def overlay_maps(
    image: np.ndarray, maps: np.ndarray, size: int = CELL_PX, style: MapStyle = "blocks"
) -> tuple[Image.Image, list[Image.Image]]:
    """The image as a ``size x size`` picture, and each map over a grey copy of it.

    ``image`` is ``(h, w, 3)`` in ``[0, 1]``; ``maps`` is ``(K, gh, gw)``. Each map is
    drawn in ``style`` (:data:`MapStyle`: one square per token, or smoothed) and divided by
    its own maximum, so colours compare places within a map, not between maps (the colour
    scale of :func:`render_attention_grid` runs from 0 to the map's peak).
    """
    pic = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    grey = np.asarray(pic.convert("L"), dtype=np.float32)[..., None].repeat(3, -1) / 255
    heat = _upsample(maps, size, style)
    overlays = []
    for k in range(len(maps)):
        blend = (1 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * _heat(heat[k])
        overlays.append(Image.fromarray((blend * 255).round().astype(np.uint8)))
    return pic, overlays


def render_attention_grid(
    image: np.ndarray,
    maps: np.ndarray,
    row_titles: list[str],
    col_titles: list[str],
    cell: int = CELL_PX,
    style: MapStyle = "blocks",
    legend: str = "",
) -> Image.Image:
    """A grid picture: each row shows the image, then each map of that row over it
    (:func:`overlay_maps`, in ``style``), titled with the map's peak value; below the grid
    the colour scale (0 to each map's peak) and ``legend``. ``maps`` is
    ``(rows, K, gh, gw)``."""
    rows, k = maps.shape[:2]
    layout = GridLayout(rows, k + 1, cell)
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r in range(rows):
        pic, overlays = overlay_maps(image, maps[r], cell, style)
        titles = [f"{t}, peak {m.max():.2f}" for t, m in zip(col_titles, maps[r], strict=True)]
        for c, (tile, title) in enumerate(
            zip([pic, *overlays], [row_titles[r], *titles], strict=True)
        ):
            left, top, _, _ = layout.box(r, c)
            canvas.paste(tile, (left, top))
            draw.text((left + 2, top - TITLE_PX + 2), title, fill="black", font=font)
    _draw_legend(canvas, layout.legend_top, style, legend, font)
    return canvas


def _draw_legend(
    canvas: Image.Image, top: int, style: MapStyle, legend: str, font: ImageFont.ImageFont
) -> None:
    """The colour scale with its ticks, what a colour means, how the maps are drawn, and
    ``legend``, in the band from ``top`` down."""
    width, height = COLOURBAR_PX
    left, bar_top = PAD_PX, top + 4
    ramp = _heat(np.linspace(0, 1, width))[None].repeat(height, axis=0)  # (height, width, 3)
    canvas.paste(Image.fromarray((ramp * 255).round().astype(np.uint8)), (left, bar_top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((left, bar_top, left + width - 1, bar_top + height - 1), outline="black")
    for value, label in ((0.0, "0"), (0.5, "0.5"), (1.0, "peak")):
        x = left + round(value * (width - 1))
        draw.line((x, bar_top + height, x, bar_top + height + 3), fill="black")
        shift = {0.0: 0, 0.5: 6, 1.0: 22}[value]  # keep the label inside the bar's span
        draw.text((x - shift, bar_top + height + 3), label, fill="black", font=font)
    drawn = "one square per patch token" if style == "blocks" else "smoothed between tokens"
    notes = [
        f"colour: attention to a patch, from 0 to the map's peak (in its title); {drawn}",
        *([legend] if legend else []),
        NUMBERING,
    ]
    for k, line in enumerate(notes):  # under the colour scale and its tick labels
        draw.text((left, bar_top + height + 18 + k * LINE_PX), line, fill="black", font=font)


def display_image(tensor: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Undo the normalisation: the picture the model saw, ``(h, w, 3)`` in ``[0, 1]``."""
    m = torch.tensor(mean)[:, None, None]
    s = torch.tensor(std)[:, None, None]
    img = (tensor.cpu() * s + m).clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0).numpy()


def _unique_stems(paths: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def save_attention_maps(
    model: LoadedModel | str,
    images: list[str],
    output: str | Path,
    model_name: str | None = None,
    sa_block: int | None = None,
    img_size: int | None = None,
    device: str = "cpu",
    style: MapStyle = "blocks",
    *,
    overwrite: bool = False,
) -> list[dict]:
    """Draw and save the attention maps of each image; returns what was written per image.

    ``model`` is a checkpoint path (ours, or official/timm weights with ``model_name``) or a
    :class:`~cait.inference.LoadedModel`. For each image ``STEM`` the folder gets
    ``STEM_class_attention.png`` (rows: CA blocks; columns: the image, each head, the mean
    of the heads) and ``STEM_class_attention.npy`` (the raw ``(L, H, T, T + N)``
    probabilities); with ``sa_block`` (an index into ``model.blocks``, from 0) also
    ``STEM_sa{k}.png`` and ``STEM_sa{k}.npy`` (``(H, N', N')``) where ``k = sa_block + 1``
    is the block's number in the pictures (from 1, as in the paper). ``img_size`` evaluates
    at another resolution than the model's own (a multiple of the patch size; the position
    embedding is resized on the fly). ``style`` draws each map as one square per token
    (``"blocks"``) or smoothed (``"smooth"``).

    The folder is written whole (:mod:`cait.analysis.output_folder`): one holding earlier
    maps is replaced only with ``overwrite``, one holding other files never.
    """
    if style not in _RESAMPLING:
        raise ValueError(f"style must be one of {list(_RESAMPLING)}, got {style!r}")
    check_output_folder(output, _TOOL, _is_map_file, overwrite)  # before any loading
    loaded = model if isinstance(model, LoadedModel) else load_for_inference(model, model_name)
    if not isinstance(loaded.model, CaiT):
        raise ValueError("attention maps need a cait model, not a timm: model")
    settings = loaded.settings.replace(img_size=img_size)
    transform = eval_transform(settings)
    net = loaded.model.to(device)
    # read every image first, so that a bad file fails before anything is written
    pictures = [read_image(p) for p in images]
    out_dir = Path(output)

    def draw_all(folder: Path) -> list[dict]:
        results = []
        for path, stem, picture in zip(images, _unique_stems(images), pictures, strict=True):
            x = transform(picture)
            maps = attention_maps(net, x.to(device), sa_block)
            shown = display_image(x, settings.mean, settings.std)
            names = loaded.class_names
            name = names[maps.prediction] if names else str(maps.prediction)
            record: dict = {"image": str(path), "prediction": maps.prediction, "name": name}
            for key, file in _draw_maps(maps, shown, name, stem, sa_block, style, folder):
                record[key] = str(out_dir / file)
            results.append(record)
            logger.info("%s: predicted %s; maps in %s", path, name, out_dir)
        return results

    return write_output_folder(output, _TOOL, _is_map_file, overwrite, draw_all)


def _draw_maps(
    maps: AttentionMaps,
    shown: np.ndarray,
    name: str,
    stem: str,
    sa_block: int | None,
    style: MapStyle,
    folder: Path,
) -> list[tuple[str, str]]:
    """Write one image's class-attention grid (and its ``sa_block`` grid) with their raw
    maps in ``folder``; returns the pictures as (record key, file name)."""
    written = []
    if maps.class_attention.size:
        L, H = maps.class_attention.shape[:2]
        patch = maps.patch_maps()  # (L, H, gh, gw)
        grid = np.concatenate([patch, patch.mean(axis=1, keepdims=True)], axis=1)
        picture_out = render_attention_grid(
            shown,
            grid,
            [f"CA block {i + 1}, predicted {name}" for i in range(L)],
            [f"head {h}" for h in range(H)] + ["mean of heads"],
            style=style,
            legend="the class token's attention to each patch",
        )
        picture_out.save(folder / f"{stem}_class_attention.png")
        np.save(folder / f"{stem}_class_attention.npy", maps.class_attention)
        written.append(("class_attention_png", f"{stem}_class_attention.png"))
    if sa_block is not None:
        sa = maps.self_attention_maps()  # (H, gh, gw)
        grid = np.concatenate([sa, sa.mean(axis=0, keepdims=True)])[None]
        number = sa_block + 1
        picture_out = render_attention_grid(
            shown,
            grid,
            [f"SA block {number}: attention received"],
            [f"head {h}" for h in range(sa.shape[0])] + ["mean of heads"],
            style=style,
            legend="the mean attention each patch receives from all patches",
        )
        picture_out.save(folder / f"{stem}_sa{number}.png")
        np.save(folder / f"{stem}_sa{number}.npy", maps.self_attention)
        written.append(("self_attention_png", f"{stem}_sa{number}.png"))
    return written


def _is_map_file(name: str) -> bool:
    """Whether ``name`` is one of the files :func:`save_attention_maps` writes."""
    return _MAP_FILE.fullmatch(name) is not None
