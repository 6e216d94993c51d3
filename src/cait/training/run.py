"""A whole training run, ``train(config)``: the outline of a run, one function per step."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from cait import runtime
from cait.data import (
    ShardSampler,
    build_datasets,
    build_mixup,
    build_train_sampler,
    collate_samples,
    eval_transform,
    train_transform,
)
from cait.models.build import build_model, input_spec
from cait.models.cait import CaiT
from cait.models.pretrained import load_pretrained
from cait.models.registry import InputSpec
from cait.models.weights_file import checkpoint_metadata, model_spec
from cait.training.checkpoint import (
    BEST,
    LAST,
    RunCheckpoint,
    RunProgress,
    check_resume,
    load_checkpoint,
    resume_run,
    run_state,
    save_checkpoint,
    save_run_checkpoint,
    save_run_weights,
)
from cait.training.config import LR_BASE_BATCH, TrainConfig, scaled_lr
from cait.training.engine import (
    EpochPosition,
    EpochStats,
    Objective,
    evaluate,
    train_one_epoch,
)
from cait.training.losses import DistillationLoss
from cait.training.optim import LRSchedule, ModelEma, Optimisation, build_optimizer
from cait.training.parallel import unwrap, wrap_model
from cait.training.preemption import PreemptionWatch, TrainingInterrupted, TrainingPreempted
from cait.training.records import (
    CURVES,
    EPOCH_SECONDS_KEY,
    IMAGES_PER_S_KEY,
    SKIPPED_FILES,
    Recorder,
    SkippedFiles,
    plot_curves,
)
from cait.training.run_folder import FolderAtStart, RunFolder
from cait.training.teacher import load_teacher

__all__ = ["TrainResult", "resolve_data_settings", "train"]

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


def resolve_data_settings(config: TrainConfig) -> InputSpec:
    """Input settings: the config's ``data`` fields, else the model's defaults."""
    d = config.data
    return input_spec(config.model, config.model_args).replace(
        img_size=d.img_size,
        crop_pct=d.crop_pct,
        interpolation=d.interpolation,
        mean=d.mean,
        std=d.std,
    )


@dataclass
class _Data:
    """The datasets, their input settings and class names."""

    settings: InputSpec
    train: Dataset
    val: Dataset
    classes: list[str]


@dataclass
class _Model:
    """The model as trained (wrapped for data parallelism) and ``plain``, the model itself
    (for evaluation, the EMA and the optimiser); what describes it in a checkpoint; and the
    run checkpoint it resumes from."""

    trained: nn.Module
    plain: nn.Module
    ema: ModelEma | None
    spec: dict[str, Any]
    resume_state: RunCheckpoint | None


@dataclass
class _Loaders:
    sampler: Sampler[int]
    train: DataLoader
    val: DataLoader


@dataclass
class _Run:
    """What the epochs of a run need, set up once."""

    config: TrainConfig
    info: runtime.DistInfo
    device: torch.device
    out: Path
    data: _Data
    model: _Model
    loaders: _Loaders
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
        out, device = Path(config.output), _set_up(config, info)
        # data first: a bad path or an empty class folder fails before anything else is built
        data = _load_data(config)
        model = _build_model(config, data, info, device)
        loaders = _build_loaders(config, data, info, device)
        objective = _build_objective(config, data, device)
        opt = _build_optimisation(config, model, loaders, info)
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


def _set_up(config: TrainConfig, info: runtime.DistInfo) -> torch.device:
    """The runtime (seeds, threads, device) and a summary of the run (the whole config goes
    to ``config.yaml``)."""
    device = runtime.setup(config.seed, config.device, config.amp, config.threads, info.local_rank)
    logger.info(
        "run: %s on %s, %d epochs, batch %d per process, %s; outputs and the full config "
        "(config.yaml) in %s",
        config.model,
        config.data.path,
        config.epochs,
        config.data.batch_size,
        f"resuming {config.resume}" if config.resume else "fresh start",
        config.output,
    )
    return device


def _load_data(config: TrainConfig) -> _Data:
    settings = resolve_data_settings(config)
    train_ds, val_ds, classes = build_datasets(
        config.data.path, train_transform(settings, config.augment), eval_transform(settings)
    )
    logger.info(
        "data: %s, %d train / %d val images, %d classes",
        config.data.path,
        len(train_ds),
        len(val_ds),
        len(classes),
    )
    return _Data(settings, train_ds, val_ds, list(classes))


def _new_model(config: TrainConfig, num_classes: int) -> nn.Module:
    args = dict(config.model_args)
    if args.get("num_classes", num_classes) != num_classes:
        raise ValueError(
            f"model_args.num_classes={args['num_classes']} but the data has {num_classes} classes"
        )
    args.pop("num_classes", None)
    return build_model(config.model, args, num_classes)


def _build_model(
    config: TrainConfig, data: _Data, info: runtime.DistInfo, device: torch.device
) -> _Model:
    """Build the model, take its weights (resumed or ``init_from``), start the EMA from
    them and wrap the model for data parallelism."""
    model = _new_model(config, len(data.classes))
    spec = model_spec(config.model, model, config.model_args)
    resume_state = None
    if config.resume:
        resume_state = load_checkpoint(config.resume)
        check_resume(resume_state, spec, config.resume)
        model.load_state_dict(resume_state.weights)
    elif config.init_from:
        if not isinstance(model, CaiT):
            raise ValueError(
                "init_from loads CaiT/DeiT weights; it is not available for timm models"
            )
        report = load_pretrained(model, config.init_from)
        logger.info("initialised from %s (%s)", config.init_from, report)
    model.to(device)
    if isinstance(model, CaiT) and model.config.distilled:
        # both heads' logits in training, for the distillation loss (DeiT); their mean in eval
        model.set_distilled_training(True)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    logger.info(
        "model %s: %.2fM parameters", config.model, sum(p.numel() for p in model.parameters()) / 1e6
    )
    # the EMA starts from the weights training starts from (initialised, loaded or resumed)
    ema = ModelEma(model, config.ema_decay) if config.ema else None
    if info.world_size > 1 and not info.is_main:
        # Every rank built the same weights from the same seed (FSDP needs that; DDP
        # broadcasts rank 0's anyway); from here on each rank draws its own augmentations.
        # Rank 0 keeps the single-process stream.
        runtime.seed_everything(config.seed + info.rank)
    trained = wrap_model(model, config.parallel, info, device)
    return _Model(trained, unwrap(trained), ema, spec, resume_state)


def _build_loaders(
    config: TrainConfig, data: _Data, info: runtime.DistInfo, device: torch.device
) -> _Loaders:
    """This rank's shards: shuffled (or repeated-augmentation) training batches, each
    image of the validation split once."""
    sampler = build_train_sampler(
        data.train, config.augment.repeated_aug, config.seed, info.world_size, info.rank
    )
    loader_args = dict(
        batch_size=config.data.batch_size,
        num_workers=config.data.workers,
        collate_fn=collate_samples,
        pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker,
    )
    train_loader = DataLoader(data.train, sampler=sampler, drop_last=True, **loader_args)
    val_loader = DataLoader(
        data.val, sampler=ShardSampler(len(data.val), info.world_size, info.rank), **loader_args
    )
    if len(train_loader) < config.optim.accum_steps:
        raise ValueError(
            f"{len(data.train)} training images give {len(train_loader)} batches of "
            f"{config.data.batch_size}: fewer than optim.accum_steps={config.optim.accum_steps}"
        )
    return _Loaders(sampler, train_loader, val_loader)


def _build_objective(config: TrainConfig, data: _Data, device: torch.device) -> Objective:
    """Mixup/CutMix, the loss and (for distillation) the frozen teacher."""
    mixup = build_mixup(config.augment, len(data.classes))
    # label smoothing is folded into mixup's soft targets when mixup is on
    smoothing = 0.0 if mixup is not None else config.augment.label_smoothing
    d = config.distill
    criterion = DistillationLoss(d.kind, d.alpha, d.tau, smoothing, d.normalisation)
    teacher = None
    if d.kind != "none":
        teacher = load_teacher(
            d.teacher, len(data.classes), data.settings, d.teacher_weights, device
        )
    return Objective(criterion, mixup, teacher)


def _build_optimisation(
    config: TrainConfig, model: _Model, loaders: _Loaders, info: runtime.DistInfo
) -> Optimisation:
    """The learning-rate schedule, the optimiser, the fp16 scaler and the EMA."""
    steps_per_epoch = len(loaders.train) // config.optim.accum_steps
    peak_lr = scaled_lr(config, info.world_size)
    schedule = LRSchedule(peak_lr, config.optim, steps_per_epoch, config.epochs)
    optimizer = build_optimizer(model.plain, config.optim, schedule(0))
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    global_batch = config.data.batch_size * config.optim.accum_steps * info.world_size
    how = (
        f"{config.optim.lr:.3g} x global batch {global_batch} / {LR_BASE_BATCH}"
        if config.optim.scale_lr
        else "optim.lr as given, not scaled"
    )
    logger.info("optimisation: peak lr %.3g (%s), %d steps/epoch", peak_lr, how, steps_per_epoch)
    return Optimisation(
        optimizer,
        schedule,
        scaler,
        model.ema,
        accum_steps=config.optim.accum_steps,
        clip_grad=config.optim.clip_grad,
    )


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
        "  lr %.2e  %.0f images/s",
        metrics["epoch"],
        epochs,
        metrics["train_loss"],
        metrics["val_loss"],
        metrics["val_top1"],
        metrics["val_top5"],
        f"  ema_top1 {ema:.2f}" if ema is not None else "",
        metrics["lr"],
        metrics[IMAGES_PER_S_KEY],
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


def _seed_worker(worker_id: int) -> None:
    # torch seeds python's and its own RNG in each worker; numpy (used by some
    # augmentations) is seeded here from the same per-worker seed.
    np.random.seed(torch.initial_seed() % 2**32)
