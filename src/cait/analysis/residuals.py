"""How much each residual branch adds to the stream (paper Section 2, Figure 4 style).

For every block and both branches, the ratio ``||branch|| / ||stream||`` of the norm of the
scaled branch output (after LayerScale, ReZero's or SkipInit's factor, none for pre-norm)
to the norm of the residual stream it is added to. The norms are the L2 norms over the
channels of each token; the ratio is taken per token and averaged over the tokens and the
images. The attention branch is compared with the stream entering the block, the MLP
branch with the stream entering the MLP (after the attention branch was added). In a
class-attention block the stream is the class token (and the distillation token).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from cait.analysis.output_folder import check_output_folder, write_output_folder
from cait.data import build_val_dataset, collate_samples, eval_transform, take
from cait.models.build import LoadedModel, load_for_inference
from cait.models.cait import CaiT, ModelTrace
from cait.models.layers import BlockTrace
from cait.progress import progress_bar

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the CLI
    from matplotlib.figure import Figure

__all__ = [
    "REPORT_FILES",
    "ResidualRatios",
    "branch_ratios",
    "residual_figure",
    "residual_ratios",
    "save_residual_report",
    "trace_ratios",
]

logger = logging.getLogger(__name__)

CSV_FIELDS = ("label", "stage", "block", "layer", "attn_ratio", "mlp_ratio")
# What save_residual_report writes: its output folder holds these and nothing else.
_CSV, _PNG = "residuals.csv", "residuals.png"
REPORT_FILES = (_CSV, _PNG)
_TOOL = "residuals"


@dataclass
class ResidualRatios:
    """Mean ratios for one model: one entry per block, SA blocks first, then CA blocks."""

    label: str
    stages: list[str]  # "sa" or "ca", per block
    attn: list[float]
    mlp: list[float]
    images: int

    def rows(self) -> list[dict]:
        """The CSV rows: ``layer`` counts all blocks from 1, ``block`` within its stage."""
        out, seen = [], {"sa": 0, "ca": 0}
        for layer, (stage, a, m) in enumerate(zip(self.stages, self.attn, self.mlp, strict=True)):
            seen[stage] += 1
            out.append(
                {
                    "label": self.label,
                    "stage": stage,
                    "block": seen[stage],
                    "layer": layer + 1,
                    "attn_ratio": a,
                    "mlp_ratio": m,
                }
            )
        return out


def _token_ratio_sum(branch: Tensor, stream: Tensor) -> Tensor:
    """Sum over images and tokens of ``||branch|| / ||stream||`` (norms over channels)."""
    ratio = branch.float().norm(dim=-1) / stream.float().norm(dim=-1).clamp_min(1e-12)
    return ratio.sum()


def branch_ratios(traces: list[BlockTrace]) -> tuple[Tensor, Tensor, int]:
    """Per-block sums of the attention and MLP ratios over a batch, and the tokens counted
    per block (for the mean, divide the sums by the count).

    Returns ``(attn_sums (L,), mlp_sums (L,), tokens (L,))``.
    """
    attn = torch.stack([_token_ratio_sum(t.attn_branch, t.stream) for t in traces])
    mlp = torch.stack([_token_ratio_sum(t.mlp_branch, t.mid_stream) for t in traces])
    tokens = torch.tensor([t.stream.shape[0] * t.stream.shape[1] for t in traces])
    return attn, mlp, tokens


def _stages(trace: ModelTrace) -> list[str]:
    return ["sa"] * len(trace.sa) + ["ca"] * len(trace.ca)


def trace_ratios(trace: ModelTrace, label: str = "image") -> ResidualRatios:
    """The mean ratios over the images of one :meth:`~cait.CaiT.forward_trace` result."""
    attn, mlp, tokens = branch_ratios(trace.sa + trace.ca)
    return ResidualRatios(
        label=label,
        stages=_stages(trace),
        attn=(attn / tokens).tolist(),
        mlp=(mlp / tokens).tolist(),
        images=trace.logits.shape[0],
    )


@torch.no_grad()
def residual_ratios(
    model: CaiT,
    loader: DataLoader,
    label: str = "model",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ResidualRatios:
    """Mean branch/stream norm ratios of every block over the images of ``loader``."""
    if not isinstance(model, CaiT):
        raise ValueError(f"residual ratios need a cait model, got {type(model)}")
    model.eval().to(device)
    attn_sum = mlp_sum = count = None
    images = 0
    stages: list[str] = []
    with progress_bar(len(loader), f"residuals {label}", progress) as bar:
        for batch, *_ in loader:
            bar.update(1)
            out = model.forward_trace(batch.to(device))
            stages = _stages(out)
            a, m, n = branch_ratios(out.sa + out.ca)
            attn_sum = a if attn_sum is None else attn_sum + a
            mlp_sum = m if mlp_sum is None else mlp_sum + m
            count = n if count is None else count + n
            images += batch.shape[0]
    if not images:
        raise ValueError("no images to measure the residual ratios on")
    return ResidualRatios(
        label=label,
        stages=stages,
        attn=(attn_sum / count).tolist(),
        mlp=(mlp_sum / count).tolist(),
        images=images,
    )


def residual_figure(results: list[ResidualRatios], size: tuple[float, float] = (11, 4)) -> Figure:
    """Attention and MLP ratios per layer, one line per model, log scale (``size`` in
    inches at 100 dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, branch in zip(axes, ("attn", "mlp"), strict=True):
        for r in results:
            values = getattr(r, branch)
            layers = range(1, len(values) + 1)
            (line,) = ax.plot(layers, values, marker=".", label=r.label)
            ca = [i for i, s in enumerate(r.stages) if s == "ca"]
            if ca:  # the class-attention blocks, marked with squares
                ax.plot([i + 1 for i in ca], [values[i] for i in ca], "s", color=line.get_color())
        ax.set_yscale("log")
        ax.set_xlabel("block (self-attention, then class-attention as squares)")
        ax.set_title("attention branch" if branch == "attn" else "MLP branch")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("||branch|| / ||residual stream||")
    axes[0].legend()
    fig.tight_layout()
    return fig


def plot_residual_ratios(results: list[ResidualRatios], path: str | Path) -> Path:
    """:func:`residual_figure` saved as a picture."""
    path = Path(path)
    residual_figure(results).savefig(path)
    return path


def _label_for(checkpoint: str) -> str:
    path = Path(checkpoint)
    # runs/NAME/model.safetensors -> NAME; an ablation run's runs/CONFIG/seedS/... ->
    # CONFIG/seedS; a bare weights file -> its stem
    if path.stem not in ("model", "model_ema", "best", "last"):
        return path.stem
    run = path.parent
    return f"{run.parent.name}/{run.name}" if run.name.startswith("seed") else run.name


def save_residual_report(
    checkpoints: list[str | LoadedModel],
    data: str,
    output: str | Path,
    labels: list[str] | None = None,
    model_name: str | None = None,
    num_images: int = 256,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> list[ResidualRatios]:
    """Measure every checkpoint on the first ``num_images`` validation images of ``data``
    (``digits`` or an ImageFolder root) and write ``residuals.csv`` and ``residuals.png``.

    The folder is written whole (:mod:`cait.analysis.output_folder`): one holding an
    earlier report is replaced only with ``overwrite``, one holding other files never.
    """
    if not checkpoints:
        raise ValueError("give at least one checkpoint")
    if labels is not None and len(labels) != len(checkpoints):
        raise ValueError(f"got {len(labels)} labels for {len(checkpoints)} checkpoints")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    check_output_folder(output, _TOOL, REPORT_FILES.__contains__, overwrite)  # before loading
    # load every model first, so that a bad checkpoint fails before any measuring
    loaded = [
        c if isinstance(c, LoadedModel) else load_for_inference(c, model_name) for c in checkpoints
    ]
    results = []
    for i, (ckpt, model) in enumerate(zip(checkpoints, loaded, strict=True)):
        label = labels[i] if labels else (_label_for(ckpt) if isinstance(ckpt, str) else str(i))
        if not isinstance(model.model, CaiT):
            raise ValueError(f"{label}: residual ratios need a cait model, not a timm: model")
        dataset = build_val_dataset(data, eval_transform(model.settings), model.folder_names)
        subset = take(dataset, num_images)
        loader = DataLoader(subset, batch_size=batch_size, collate_fn=collate_samples)
        results.append(residual_ratios(model.model, loader, label, device, progress))
    write_output_folder(
        output, _TOOL, REPORT_FILES.__contains__, overwrite, partial(_write_report, results)
    )
    logger.info("wrote %s and %s", *(Path(output) / name for name in REPORT_FILES))
    return results


def _write_report(results: list[ResidualRatios], folder: Path) -> None:
    with open(folder / _CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerows(r.rows())
    plot_residual_ratios(results, folder / _PNG)
