"""Training curves as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(history: list[dict], path: str | Path) -> Path:
    """Loss (train and val) and validation top-1 (model and EMA) per epoch."""
    # a Figure with its own Agg canvas: no pyplot, so the caller's backend is untouched
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [m["epoch"] for m in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [m["train_loss"] for m in history], label="train loss")
    ax_loss.plot(epochs, [m["val_loss"] for m in history], label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [m["val_top1"] for m in history], label="val top-1")
    if any("ema_val_top1" in m for m in history):
        ax_acc.plot(epochs, [m.get("ema_val_top1") for m in history], label="EMA val top-1")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 (%)")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
