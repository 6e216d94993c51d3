"""A whole training run, ``train(config)``: the outline of a run, one function per step."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cait import runtime
from cait.models.weights_file import checkpoint_metadata
from cait.training.checkpoint import (
    BEST,
    LAST,
    RunProgress,
    resume_run,
    run_state,
    save_checkpoint,
    save_run_checkpoint,
    save_run_weights,
)
from cait.training.config import TrainConfig
from cait.training.engine import (
    EpochPosition,
    EpochStats,
    Objective,
    evaluate,
    train_one_epoch,
)
from cait.training.optim import Optimisation
from cait.training.preemption import PreemptionWatch, TrainingInterrupted, TrainingPreempted
from cait.training.records import (
    CURVES,
    DATA_WAIT_KEY,
    EPOCH_SECONDS_KEY,
    IMAGES_PER_S_KEY,
    SKIPPED_FILES,
    Recorder,
    SkippedFiles,
    plot_curves,
)
from cait.training.run_folder import FolderAtStart, RunFolder
from cait.training.setup import (
    RunData,
    RunLoaders,
    RunModel,
    build_loaders,
    build_objective,
    build_optimisation,
    build_run_model,
    load_data,
    set_up,
)

__all__ = ["TrainResult", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """``model`` is the trained model as it was trained: inside DDP or sharded by FSDP
    under ``torchrun`` (then calling it is a collective: every rank must call it)."""

    output: Path
    history: list[dict[str, Any]]
    best_top1: float
    completed: bool
    model: nn.Module | None = None


@dataclass
class _Run:
    """What the epochs of a run need, set up once."""

    config: TrainConfig
    info: runtime.DistInfo
    device: torch.device
    out: Path
    data: RunData
    model: RunModel
    loaders: RunLoaders
    objective: Objective
    opt: Optimisation
    # rank 0's hold on the output folder (None on the other ranks)
    folder: RunFolder | None
    watch: PreemptionWatch

    @property
    def metadata(self) -> dict[str, Any]:
        return checkpoint_metadata(self.model.spec, self.data.settings, self.data.classes)


def train(config: TrainConfig) -> TrainResult:
    """Train (or fine-tune, or resume) a model as ``config`` says; see ``docs/TRAINING.md``.

    Under ``torchrun`` every process calls this: data-parallel training over all of them
    (``docs/DISTRIBUTED.md``); only rank 0 writes files. A signal in ``preempt_signals``
    ends it in :class:`TrainingPreempted` (with ``last.pt`` written), Ctrl-C in
    :class:`TrainingInterrupted`, which says what the output folder holds.
    """
    at_start = FolderAtStart.of(config)
    try:
        with (
            runtime.distributed(config.device, config.dist_timeout) as info,
            PreemptionWatch(config.preempt_signals) as watch,
        ):
            return _train(config, info, watch)
    except KeyboardInterrupt as interrupt:  # the folder is released: what does it hold?
        raise TrainingInterrupted(at_start.after_interrupt()) from interrupt


def _train(config: TrainConfig, info: runtime.DistInfo, watch: PreemptionWatch) -> TrainResult:
    with _hold_output_folder(config, info) as (config, folder):
        out, device = Path(config.output), set_up(config, info)
        # data first: a bad path or an empty class folder fails before anything else is built
        data = load_data(config)
        model = build_run_model(config, data, info, device)
        loaders = build_loaders(config, data, info, device)
        objective = build_objective(config, data, device)
        opt = build_optimisation(config, model, loaders, info)
        run = _Run(config, info, device, out, data, model, loaders, objective, opt, folder, watch)
        progress = _resume_or_start(run)
        recorder = Recorder(config, out, progress.history) if info.is_main else None
        skipped = _skipped_files(run)
        if folder is not None:
            folder.begin()  # the resume's checks passed: the run may write its folder
            _start_records(folder, recorder, skipped)
        try:
            completed = _train_epochs(run, progress, recorder, skipped)
        finally:
            if recorder is not None:
                recorder.close()
        _finish(run, progress, completed)
    return TrainResult(out, progress.history, progress.best_top1, completed, model.trained)


@contextlib.contextmanager
def _hold_output_folder(
    config: TrainConfig, info: runtime.DistInfo
) -> Iterator[tuple[TrainConfig, RunFolder | None]]:
    """Rank 0 takes the output folder's lock and, holding it, decides what the run may do
    with the folder (:mod:`cait.training.run_folder`): ``resume: auto`` resolved, a run it
    may not replace refused. Every rank gets rank 0's decision (the config to run with), so
    none decides from its own view of the folder and none waits for a rank that stopped."""
    folder = RunFolder(config.output) if info.is_main else None
    error: Exception | None = None
    decision: dict[str, Any] | None = None
    if folder is not None:
        try:
            folder.acquire()
            decision = {"resume": folder.prepare(config).resume}
        except (OSError, ValueError) as err:
            folder.release()
            error, decision = err, {"error": str(err)}
    decision = runtime.all_gather_objects(decision)[0]
    if error is not None:
        raise error
    if "error" in decision:
        raise ValueError(f"rank 0 could not take the output folder: {decision['error']}")
    try:
        yield dataclasses.replace(config, resume=decision["resume"]), folder
    finally:
        if folder is not None:
            folder.release()


def _resume_or_start(run: _Run) -> RunProgress:
    """A fresh run's progress, or the resumed run's with its state taken back."""
    state = run.model.resume_state
    if state is None:
        return RunProgress()
    progress = resume_run(state, run.model.trained, run.opt, run.config, run.info)
    logger.info(
        "resumed from %s at epoch %d (step %d)",
        run.config.resume,
        progress.start_epoch,
        progress.step,
    )
    return progress


def _skipped_files(run: _Run) -> SkippedFiles:
    """The unreadable files building the datasets left out, listed anew by a fresh run."""
    upfront = getattr(run.data.train, "skipped", []) + getattr(run.data.val, "skipped", [])
    return SkippedFiles(
        run.out / SKIPPED_FILES,
        upfront,
        fresh=run.model.resume_state is None,
        write=run.info.is_main,
    )


def _train_epochs(
    run: _Run, progress: RunProgress, recorder: Recorder | None, skipped: SkippedFiles
) -> bool:
    """The epochs from ``progress.start_epoch``; False when ``stop_after`` ends the run
    before its last epoch."""
    config = run.config
    run.watch.arm()  # a signal now stops the run after a step, with last.pt written
    for epoch in range(progress.start_epoch, config.epochs):
        _train_epoch(run, epoch, progress, recorder, skipped)
        if run.watch.agreed(run.device):  # a signal during evaluation or the checkpoint
            raise _preempted(run, progress.step, epoch + 1, within=False)
        if config.stop_after is not None and epoch + 1 - progress.start_epoch >= config.stop_after:
            completed = epoch + 1 == config.epochs
            if not completed:
                logger.info(
                    "stopping after %d epoch(s) as asked (stop_after); continue with resume=%s",
                    config.stop_after,
                    run.out / LAST,
                )
            return completed
    return True


def _train_epoch(
    run: _Run,
    epoch: int,
    progress: RunProgress,
    recorder: Recorder | None,
    skipped: SkippedFiles,
) -> None:
    """One epoch: train, evaluate, record, checkpoint."""
    config, main = run.config, run.info.is_main
    if hasattr(run.loaders.sampler, "set_epoch"):
        run.loaders.sampler.set_epoch(epoch)
    stats, progress.step = train_one_epoch(
        run.model.trained,
        run.loaders.train,
        run.opt,
        progress.step,
        epoch,
        run.device,
        objective=run.objective,
        amp=config.amp,
        log_interval=config.log_interval,
        progress=config.progress and main,
        description=f"epoch {epoch + 1}/{config.epochs}",
        on_log=recorder.step if recorder is not None else None,
        position=progress.position if epoch == progress.start_epoch else None,
        after_step=_within_epoch(run, epoch, progress, recorder, skipped),
    )
    metrics, val_skipped = _evaluate_epoch(run, epoch, stats)
    new_skips = skipped.add(stats.skipped + val_skipped)
    metrics["skipped_files"] = len(skipped)
    if new_skips:
        logger.warning(
            "skipped %d unreadable file(s):\n  %s", len(new_skips), "\n  ".join(new_skips)
        )
    progress.history.append(metrics)
    _log_epoch(metrics, config.epochs)
    is_best = metrics["val_top1"] > progress.best_top1
    progress.best_top1 = max(progress.best_top1, metrics["val_top1"])
    state = run_state(run.model.trained, run.opt, progress, epoch, config, run.metadata)
    if main:
        save_run_checkpoint(state, run.out, is_best)
        _checkpoint_written(run, [LAST, BEST] if is_best else [LAST], recorder, skipped)
        recorder.epoch(metrics)


def _checkpoint_written(
    run: _Run, written: list[str], recorder: Recorder, skipped: SkippedFiles
) -> None:
    """A run replacing another one takes over its folder with its first checkpoint, and
    its records start then."""
    run.folder.checkpoint_written(written)
    _start_records(run.folder, recorder, skipped)


def _start_records(folder: RunFolder, recorder: Recorder, skipped: SkippedFiles) -> None:
    """The records are written from the moment the run may write its folder (once)."""
    if folder.begun:
        recorder.start()
        skipped.start()


def _within_epoch(
    run: _Run,
    epoch: int,
    progress: RunProgress,
    recorder: Recorder | None,
    skipped: SkippedFiles,
) -> Callable[[int, Callable[[], EpochPosition]], None]:
    """What happens after each optimiser step of ``epoch`` but its last: ``last.pt`` every
    ``checkpoint_every_steps`` steps, and after a preemption signal (then the run stops)."""
    every = run.config.checkpoint_every_steps

    def after_step(step: int, position: Callable[[], EpochPosition]) -> None:
        stop = run.watch.agreed(run.device)
        if not stop and (every is None or step % every):
            return
        progress.step = step
        state = run_state(
            run.model.trained, run.opt, progress, epoch - 1, run.config, run.metadata, position()
        )
        if run.info.is_main:
            save_checkpoint(state, run.out / LAST)
            _checkpoint_written(run, [LAST], recorder, skipped)
            logger.info("step %d: wrote %s within epoch %d", step, run.out / LAST, epoch + 1)
        if stop:
            # every rank waits for rank 0's last.pt: a launcher stops the others' group as
            # soon as one process ends, which would cut the write short
            runtime.all_gather_objects(None)
            raise _preempted(run, step, epoch + 1, within=True)

    return after_step


def _preempted(run: _Run, step: int, epoch: int, within: bool) -> TrainingPreempted:
    where = f"within epoch {epoch}" if within else f"after epoch {epoch}"
    return TrainingPreempted(
        f"stopped by {run.watch.received or 'a signal to another process'} at step {step} "
        f"({where}); {run.out / LAST} holds it: continue with --resume auto"
    )


def _evaluate_epoch(run: _Run, epoch: int, stats: EpochStats) -> tuple[dict[str, Any], list[str]]:
    """The epoch's metrics (the model's and the EMA's on the validation split) and the
    validation files found unreadable."""
    val = evaluate(run.model.plain, run.loaders.val, run.device, run.config.amp)
    metrics = {
        "epoch": epoch + 1,
        "train_loss": stats.loss,
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "val_images": val["images"],
        "lr": stats.lr,
        IMAGES_PER_S_KEY: stats.images_per_s,
        EPOCH_SECONDS_KEY: stats.seconds,
        DATA_WAIT_KEY: stats.data_wait_share,
    }
    if run.opt.ema is not None:
        ema_val = evaluate(run.opt.ema.module, run.loaders.val, run.device, run.config.amp)
        metrics["ema_val_top1"] = ema_val["top1"]
        metrics["ema_val_loss"] = ema_val["loss"]
    return metrics, val["skipped"]


def _log_epoch(metrics: dict[str, Any], epochs: int) -> None:
    ema = metrics.get("ema_val_top1")
    logger.info(
        "epoch %d/%d: train_loss %.4f  val_loss %.4f  val_top1 %.2f  val_top5 %.2f%s"
        "  lr %.2e  %.0f images/s  %.0f%% of it waiting for data",
        metrics["epoch"],
        epochs,
        metrics["train_loss"],
        metrics["val_loss"],
        metrics["val_top1"],
        metrics["val_top5"],
        f"  ema_top1 {ema:.2f}" if ema is not None else "",
        metrics["lr"],
        metrics[IMAGES_PER_S_KEY],
        100 * metrics[DATA_WAIT_KEY],
    )


def _finish(run: _Run, progress: RunProgress, completed: bool) -> None:
    """The weights of a completed run, the curves and a summary."""
    if completed:
        save_run_weights(run.model.trained, run.opt.ema, run.out, run.metadata, run.info.is_main)
    if progress.history and run.info.is_main:
        plot_curves(progress.history, run.out / CURVES)
    minutes, seconds = divmod(round(sum(m[EPOCH_SECONDS_KEY] for m in progress.history)), 60)
    logger.info(
        "done: %d min %d s of training, best val top-1 %.2f; outputs in %s",
        minutes,
        seconds,
        progress.best_top1,
        run.out,
    )
