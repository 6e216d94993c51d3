"""How faithful each explanation is: deletion and insertion curves (Petsiuk et al. 2018,
RISE) over the patches, and their areas.

For one image, a map orders the patch tokens from most to least relevant. Deletion removes
them in that order and reads the probability of the explained class after each step;
insertion starts from an image with every patch removed and reveals them in that order.
A faithful map makes the deletion curve fall fast (a small area) and the insertion curve
rise fast (a large area). A removed patch is set to 0 after normalisation, the mean colour
of the model's input spec. A random ordering (seeded) is the baseline every method should
beat. Areas are by the trapezoid rule over the fraction of patches removed (or revealed),
from 0 to 1.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from cait.analysis.explain import METHODS, explain_batch
from cait.analysis.output_folder import check_output_folder, write_output_folder
from cait.data import build_val_dataset, eval_transform
from cait.models.build import LoadedModel, load_for_inference
from cait.models.cait import CaiT

__all__ = [
    "RANDOM",
    "Faithfulness",
    "MethodScore",
    "curve_area",
    "faithfulness",
    "format_table",
    "perturbation_curves",
    "save_faithfulness",
]

logger = logging.getLogger(__name__)

RANDOM = "random"  # the ordering every method is compared with
BASELINE_VALUE = 0.0  # a removed patch, after normalisation: the input spec's mean colour
DEFAULT_STEPS = 32  # points per curve at most (every patch is one step on smaller grids)
DEFAULT_LIMIT = 100  # images scored by default
BATCH = 16  # images explained and perturbed at once
_FILES = re.compile(r"faithfulness\.(csv|png)")
_TOOL = "explain"


@dataclass
class MethodScore:
    """One method's mean areas over ``images`` images, and its mean curves at ``fractions``
    of the patches removed (deletion) or revealed (insertion)."""

    method: str
    deletion: float
    insertion: float
    images: int
    deletion_curve: np.ndarray
    insertion_curve: np.ndarray


@dataclass
class Faithfulness:
    """The scores of every method and of the random ordering (last)."""

    scores: list[MethodScore]
    fractions: np.ndarray

    def score(self, method: str) -> MethodScore:
        return next(s for s in self.scores if s.method == method)

    def most_faithful(self) -> str:
        """The method (not the random ordering) with the largest insertion minus deletion
        area: both curves in one number."""
        methods = [s for s in self.scores if s.method != RANDOM]
        return max(methods, key=lambda s: s.insertion - s.deletion).method


def curve_area(fractions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Area under ``values`` (``(..., S)``) over ``fractions`` (``(S,)``), trapezoid rule."""
    widths = np.diff(fractions)  # (S - 1,)
    return ((values[..., 1:] + values[..., :-1]) / 2 * widths).sum(axis=-1)


def _step_counts(num_patches: int, steps: int) -> np.ndarray:
    """How many patches are removed at each point of a curve: 0 to all of them."""
    points = min(steps, num_patches) + 1
    return np.unique(np.linspace(0, num_patches, points).round().astype(int))


@torch.no_grad()
def perturbation_curves(
    model: CaiT,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    steps: int = DEFAULT_STEPS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deletion and insertion curves of normalised ``images`` ``(B, C, H, W)`` ordered by
    ``maps`` ``(B, grid_h, grid_w)`` (most relevant first; ties in grid order): the
    probability of class ``targets`` ``(B,)`` after each step, ``(B, S)`` each, and the
    fractions of patches removed or revealed ``(S,)``."""
    B, _, H, W = images.shape
    gh, gw = maps.shape[-2:]
    n = gh * gw
    order = maps.reshape(B, n).argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)  # (B, N): the step at which each patch goes
    counts = _step_counts(n, steps)
    k = torch.as_tensor(counts, device=images.device)
    gone = (rank[:, None, :] < k[None, :, None]).reshape(B, len(counts), 1, gh, gw)
    gone = F.interpolate(gone.flatten(0, 1).float(), size=(H, W), mode="nearest").bool()
    gone = gone.reshape(B, len(counts), 1, H, W)  # (B, S, 1, H, W): the patches removed
    x = images[:, None]  # (B, 1, C, H, W)
    deleted = torch.where(gone, BASELINE_VALUE, x)
    inserted = torch.where(gone, x, BASELINE_VALUE)
    curves = []
    for batch in (deleted, inserted):
        logits = model(batch.flatten(0, 1)).float()  # (B * S, classes)
        probs = logits.softmax(dim=1).reshape(B, len(counts), -1)
        index = targets[:, None, None].expand(B, len(counts), 1)
        curves.append(probs.gather(2, index)[..., 0].cpu().numpy())
    return curves[0], curves[1], counts / n


def faithfulness(
    model: CaiT,
    images: Sequence[Tensor] | Dataset,
    methods: Sequence[str] = METHODS,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    device: str = "cpu",
    block: int | None = None,
) -> Faithfulness:
    """Deletion and insertion areas of each method over ``images`` (normalised tensors, or
    a dataset of ``(tensor, label)``), for each image's predicted class, with a random
    ordering (seeded by ``seed``) as the last row; ``block`` is Grad-CAM's SA block."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {m!r}")
    if not len(images):
        raise ValueError("no images to score")
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    names = [*methods, RANDOM]
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in names}
    fractions = np.zeros(0)
    for start in range(0, len(images), BATCH):
        items = [images[i] for i in range(start, min(start + BATCH, len(images)))]
        x = torch.stack([i[0] if isinstance(i, tuple | list) else i for i in items]).to(device)
        with torch.no_grad():
            targets = model(x).argmax(dim=1)  # the predicted classes, explained by all
        grid = model.patch_embed.grid(*x.shape[-2:])
        for method in names:
            if method == RANDOM:
                maps = torch.rand(len(x), *grid, generator=generator).to(device)
            else:
                maps, _, _ = explain_batch(model, x, method, targets, block)
            deletion, insertion, fractions = perturbation_curves(model, x, maps, targets, steps)
            curves[method].append((deletion, insertion))
        logger.info("faithfulness: %d of %d images", start + len(x), len(images))
    scores = []
    for method in names:
        deletion = np.concatenate([d for d, _ in curves[method]])  # (images, S)
        insertion = np.concatenate([i for _, i in curves[method]])
        scores.append(
            MethodScore(
                method=method,
                deletion=float(curve_area(fractions, deletion).mean()),
                insertion=float(curve_area(fractions, insertion).mean()),
                images=len(deletion),
                deletion_curve=deletion.mean(axis=0),
                insertion_curve=insertion.mean(axis=0),
            )
        )
    return Faithfulness(scores, fractions)


def format_table(result: Faithfulness) -> str:
    """The table as text: one row per method, the random ordering last, then the verdict."""
    lines = [
        f"{'method':<10} {'deletion AUC (lower better)':>28} {'insertion AUC (higher better)':>30}"
        f" {'insertion - deletion':>21} {'images':>7}"
    ]
    for s in result.scores:
        lines.append(
            f"{s.method:<10} {s.deletion:>28.4f} {s.insertion:>30.4f}"
            f" {s.insertion - s.deletion:>21.4f} {s.images:>7}"
        )
    rand = result.score(RANDOM)
    beaten = [
        s.method
        for s in result.scores
        if s.method != RANDOM and s.deletion < rand.deletion and s.insertion > rand.insertion
    ]
    lines.append(
        f"most faithful: {result.most_faithful()} (largest insertion - deletion); "
        f"better than random on both curves: {', '.join(beaten) or 'none'}"
    )
    return "\n".join(lines)


def _write_table(result: Faithfulness, folder: Path) -> None:
    with open(folder / "faithfulness.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "deletion_auc", "insertion_auc", "images"])
        for s in result.scores:
            writer.writerow([s.method, f"{s.deletion:.6f}", f"{s.insertion:.6f}", s.images])
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for s in result.scores:
            curve = s.deletion_curve if kind == "deletion" else s.insertion_curve
            area = s.deletion if kind == "deletion" else s.insertion
            style = "--" if s.method == RANDOM else "-"
            ax.plot(result.fractions, curve, style, label=f"{s.method} ({area:.3f})")
        removed = "removed" if kind == "deletion" else "revealed"
        ax.set(xlabel=f"fraction of patches {removed}", title=f"{kind} (area in brackets)")
        ax.legend()
    axes[0].set_ylabel("probability of the predicted class")
    fig.tight_layout()
    fig.savefig(folder / "faithfulness.png", dpi=100)
    plt.close(fig)


def _subset(dataset: Dataset, limit: int) -> list:
    """``limit`` images spread evenly over the dataset (its order may follow the classes)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    index = np.unique(np.linspace(0, len(dataset) - 1, min(limit, len(dataset))).round())
    return [dataset[int(i)] for i in index]


def save_faithfulness(
    model: LoadedModel | str | Path,
    data: str,
    output: str | Path | None = None,
    model_name: str | None = None,
    methods: Sequence[str] = METHODS,
    limit: int = DEFAULT_LIMIT,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    img_size: int | None = None,
    device: str = "cpu",
    block: int | None = None,
    *,
    overwrite: bool = False,
) -> Faithfulness:
    """Score every method on ``limit`` images of the validation split of ``data`` (as
    :func:`cait.data.build_val_dataset` reads it; ``block``: Grad-CAM's SA block, from 0)
    and, with ``output``, write
    ``faithfulness.csv`` and ``faithfulness.png`` (the mean curves) there, a folder
    written whole (:mod:`cait.analysis.output_folder`)."""
    if output is not None:
        check_output_folder(output, _TOOL, _is_table_file, overwrite)  # before any loading
    loaded = model if isinstance(model, LoadedModel) else load_for_inference(str(model), model_name)
    if not isinstance(loaded.model, CaiT):
        raise ValueError("explanations need a cait model, not a timm: model")
    transform = eval_transform(loaded.settings.replace(img_size=img_size))
    dataset = build_val_dataset(data, transform, loaded.folder_names)
    images = _subset(dataset, limit)
    result = faithfulness(loaded.model, images, methods, steps, seed, device, block)
    if output is not None:
        write_output_folder(
            output, _TOOL, _is_table_file, overwrite, lambda f: _write_table(result, f)
        )
    return result


def _is_table_file(name: str) -> bool:
    return _FILES.fullmatch(name) is not None
