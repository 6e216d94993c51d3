"""A run's records: metrics.jsonl, TensorBoard, Weights & Biases, skipped_files.txt and the
curves as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from cait.files import atomic_write
from cait.training.config import TrainConfig

__all__ = [
    "CURVES",
    "DATA_WAIT_KEY",
    "EPOCH_SECONDS_KEY",
    "IMAGES_PER_S_KEY",
    "METRICS",
    "RECORDS",
    "SKIPPED_FILES",
    "TIMING_KEYS",
    "Recorder",
    "SkippedFiles",
    "plot_curves",
]

# The records' names in the run's folder
METRICS = "metrics.jsonl"
SKIPPED_FILES = "skipped_files.txt"
CURVES = "curves.png"
_TENSORBOARD = "tensorboard"
_WANDB = "wandb"  # W&B's own folder under the ``dir`` it is given
RECORDS = (METRICS, SKIPPED_FILES, CURVES, _TENSORBOARD, _WANDB)

# Per-epoch metrics that measure time, not learning: they differ between two identical runs.
IMAGES_PER_S_KEY = "images_per_s"
EPOCH_SECONDS_KEY = "epoch_seconds"
# the share of the epoch's training time spent waiting for the loader's next batch: near 1,
# the device is starved for data (add loader workers, or make shards)
DATA_WAIT_KEY = "data_wait_share"
TIMING_KEYS = (IMAGES_PER_S_KEY, EPOCH_SECONDS_KEY, DATA_WAIT_KEY)


class Recorder:
    """metrics.jsonl, TensorBoard and (optionally) Weights & Biases; rank 0 keeps one.

    Nothing is written before :meth:`start` (a run replacing another starts its records
    after its first checkpoint, so a failure before it leaves the old run's as they were);
    step scalars logged before it wait in memory.
    """

    def __init__(self, config: TrainConfig, out: Path, history: list[dict]) -> None:
        self.config = config
        self.out = out
        self.path = out / METRICS
        self.history = list(history)
        self.started = False
        self.tb = None
        self.wandb = None
        self._pending_steps: list[tuple[int, float, float]] = []

    def start(self) -> None:
        """Write metrics.jsonl from the history so far (lines of epochs after a resumed
        checkpoint are dropped) and open TensorBoard and W&B."""
        if self.started:
            return
        self.started = True
        lines = "".join(json.dumps(m) + "\n" for m in self.history)
        atomic_write(self.path, lambda tmp: tmp.write_text(lines))
        config = self.config
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / _TENSORBOARD))
        if config.wandb:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("wandb logging was asked for but wandb is not installed") from err
            self.wandb = wandb.init(
                project=config.wandb_project,
                mode=config.wandb_mode,
                dir=str(self.out),
                config=config.to_dict(),
            )
        for step in self._pending_steps:
            self.step(*step)
        self._pending_steps.clear()

    def step(self, step: int, loss: float, lr: float) -> None:
        if not self.started:
            self._pending_steps.append((step, loss, lr))
        elif self.tb is not None:
            self.tb.add_scalar("train/loss_step", loss, step)
            self.tb.add_scalar("train/lr", lr, step)

    def epoch(self, metrics: dict) -> None:
        self.start()  # (when not yet started) the history before this epoch
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self._epoch_scalars(metrics)

    def _epoch_scalars(self, metrics: dict) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "epoch"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"epoch/{k}", v, metrics["epoch"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=metrics["epoch"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class SkippedFiles:
    """Every unreadable file a run left out, each once, listed in ``skipped_files.txt``.

    A fresh run starts the list anew; a resumed one keeps it (the files found unreadable
    while building the datasets are listed once, by whichever run found them first). Only
    the process with ``write`` set (rank 0) touches the file, and only after :meth:`start`
    (names found before it wait in memory).
    """

    def __init__(self, path: Path, upfront: list[str], *, fresh: bool, write: bool) -> None:
        self.path = path
        self.write = write
        self.fresh = fresh
        self.started = False
        self.order: list[str] = list(dict.fromkeys(upfront))
        self.upfront = len(self.order)
        self.seen: set[str] = set(self.order)

    def start(self) -> None:
        """Begin the file: anew for a fresh run, else keep it (adding the upfront names
        when it has none) and append what was found meanwhile."""
        if self.started:
            return
        self.started = True
        if not self.write:
            return
        if self.fresh:
            self.path.unlink(missing_ok=True)
        names = self.order if not self.path.exists() else self.order[self.upfront :]
        if names:
            with open(self.path, "a") as f:
                f.writelines(s + "\n" for s in names)

    def __len__(self) -> int:
        return len(self.seen)

    def add(self, names: Iterable[str]) -> list[str]:
        """Record ``names``; returns those not seen before, sorted."""
        new = sorted(set(names) - self.seen)
        self.seen.update(new)
        self.order.extend(new)
        if new and self.write and self.started:
            with open(self.path, "a") as f:
                f.writelines(s + "\n" for s in new)
        return new


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
