"""Class-attention maps (paper Section 5, Figures 6 and 7): where each head of each
class-attention block looks, overlaid on the image.

The maps come from :meth:`cait.CaiT.forward_trace`, never from hooks. In a CA block
the class token is the only query (paper Eq. 6-8); its attention row covers the class
token(s) and the ``N`` patches and sums to 1. The patch part, reshaped to the patch grid,
is the map that is drawn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from cait.data import eval_transform, read_image
from cait.models.build import LoadedModel, load_for_inference
from cait.models.cait import CaiT, ModelTrace

__all__ = [
    "AttentionMaps",
    "GridLayout",
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


@torch.no_grad()
def attention_maps(model: CaiT, image: Tensor, sa_block: int | None = None) -> AttentionMaps:
    """The attention maps of one normalised image ``(in_chans, H_img, W_img)``."""
    if not isinstance(model, CaiT):
        raise ValueError(f"attention maps need a cait model with forward_trace, got {type(model)}")
    depth = len(model.blocks)
    if sa_block is not None and not 0 <= sa_block < depth:
        raise ValueError(f"sa_block must be in [0, {depth - 1}], got {sa_block}")
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
    self-attention block to keep (``None``: none).
    """
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
    """Pixel geometry of a grid of titled square cells (one picture per cell)."""

    rows: int
    cols: int
    cell: int = CELL_PX

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the whole picture."""
        return (
            PAD_PX + self.cols * (self.cell + PAD_PX),
            PAD_PX + self.rows * (TITLE_PX + self.cell + PAD_PX),
        )

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of a cell's picture (below its title)."""
        left = PAD_PX + col * (self.cell + PAD_PX)
        top = PAD_PX + row * (TITLE_PX + self.cell + PAD_PX) + TITLE_PX
        return left, top, left + self.cell, top + self.cell


def _heat(values: np.ndarray) -> np.ndarray:
    """Map ``[0, 1]`` values to RGB with matplotlib's 'inferno' colour map."""
    from matplotlib import colormaps

    return colormaps["inferno"](values)[..., :3]


def _upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """``(K, gh, gw)`` -> ``(K, size, size)``, bilinear, each map scaled to a maximum of 1."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    peak = up.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (up / peak[:, None, None]).numpy()


def overlay_maps(
    image: np.ndarray, maps: np.ndarray, size: int = CELL_PX
) -> tuple[Image.Image, list[Image.Image]]:
    """The image as a ``size x size`` picture, and each map over a grey copy of it.

    ``image`` is ``(h, w, 3)`` in ``[0, 1]``; ``maps`` is ``(K, gh, gw)``. Each map is
    upsampled bilinearly and scaled to its own maximum, so colours compare places within a
    map, not between maps.
    """
    pic = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    grey = np.asarray(pic.convert("L"), dtype=np.float32)[..., None].repeat(3, -1) / 255
    heat = _upsample(maps, size)
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
) -> Image.Image:
    """A grid picture: each row shows the image, then each map of that row over it
    (:func:`overlay_maps`); ``maps`` is ``(rows, K, gh, gw)``."""
    rows, k = maps.shape[:2]
    layout = GridLayout(rows, k + 1, cell)
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r in range(rows):
        pic, overlays = overlay_maps(image, maps[r], cell)
        for c, (tile, title) in enumerate(
            zip([pic, *overlays], [row_titles[r], *col_titles], strict=True)
        ):
            left, top, _, _ = layout.box(r, c)
            canvas.paste(tile, (left, top))
            draw.text((left + 2, top - TITLE_PX + 2), title, fill="black", font=font)
    return canvas


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
) -> list[dict]:
    """Draw and save the attention maps of each image; returns what was written per image.

    ``model`` is a checkpoint path (ours, or official/timm weights with ``model_name``) or a
    :class:`~cait.inference.LoadedModel`. For each image ``STEM`` the folder gets
    ``STEM_class_attention.png`` (rows: CA blocks; columns: the image, each head, the mean
    of the heads) and ``STEM_class_attention.npy`` (the raw ``(L, H, T, T + N)``
    probabilities); with ``sa_block`` also ``STEM_sa{k}.png`` and ``STEM_sa{k}.npy``
    (``(H, N', N')``). ``img_size`` evaluates at another resolution than the model's own
    (a multiple of the patch size; the position embedding is resized on the fly).
    """
    loaded = model if isinstance(model, LoadedModel) else load_for_inference(model, model_name)
    if not isinstance(loaded.model, CaiT):
        raise ValueError("attention maps need a cait model, not a timm: model")
    settings = loaded.settings.replace(img_size=img_size)
    transform = eval_transform(settings)
    net = loaded.model.to(device)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    # read every image first, so that a bad file fails before anything is written
    pictures = [read_image(p) for p in images]
    results = []
    for path, stem, picture in zip(images, _unique_stems(images), pictures, strict=True):
        x = transform(picture)
        maps = attention_maps(net, x.to(device), sa_block)
        shown = display_image(x, settings.mean, settings.std)
        name = loaded.class_names[maps.prediction] if loaded.class_names else str(maps.prediction)
        record: dict = {"image": str(path), "prediction": maps.prediction, "name": name}
        if maps.class_attention.size:
            L, H = maps.class_attention.shape[:2]
            patch = maps.patch_maps()  # (L, H, gh, gw)
            grid = np.concatenate([patch, patch.mean(axis=1, keepdims=True)], axis=1)
            picture_out = render_attention_grid(
                shown,
                grid,
                [f"CA block {i + 1}, predicted {name}" for i in range(L)],
                [f"head {h}" for h in range(H)] + ["mean of heads"],
            )
            png = out_dir / f"{stem}_class_attention.png"
            picture_out.save(png)
            np.save(out_dir / f"{stem}_class_attention.npy", maps.class_attention)
            record["class_attention_png"] = str(png)
        if sa_block is not None:
            sa = maps.self_attention_maps()  # (H, gh, gw)
            grid = np.concatenate([sa, sa.mean(axis=0, keepdims=True)])[None]
            picture_out = render_attention_grid(
                shown,
                grid,
                [f"SA block {sa_block}: attention received"],
                [f"head {h}" for h in range(sa.shape[0])] + ["mean of heads"],
            )
            png = out_dir / f"{stem}_sa{sa_block}.png"
            picture_out.save(png)
            np.save(out_dir / f"{stem}_sa{sa_block}.npy", maps.self_attention)
            record["self_attention_png"] = str(png)
        results.append(record)
        logger.info("%s: predicted %s; maps in %s", path, name, out_dir)
    return results
