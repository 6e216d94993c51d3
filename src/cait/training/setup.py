"""What a training run needs, built once before its first step: the runtime, the data and
its input settings, the model (resumed, initialised or fresh; wrapped for data
parallelism; its EMA), the loaders of this rank's shards, the objective (mixup, the loss,
the teacher) and the optimisation (schedule, optimiser, scaler). :func:`cait.training.run.train`
calls these in order."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cait import runtime
from cait.data import build_datasets, build_mixup, eval_transform, make_loader, train_transform
from cait.data.classes import check_class_names
from cait.models.build import build_model, input_spec
from cait.models.cait import CaiT
from cait.models.pretrained import load_pretrained
from cait.models.registry import InputSpec
from cait.models.weights_file import class_names_of, model_spec, read_checkpoint_metadata
from cait.training.checkpoint import (
    RunCheckpoint,
    check_resume,
    load_checkpoint,
)
from cait.training.config import LR_BASE_BATCH, TrainConfig, scaled_lr
from cait.training.engine import (
    Objective,
)
from cait.training.losses import DistillationLoss
from cait.training.optim import LRSchedule, ModelEma, Optimisation, build_optimizer
from cait.training.parallel import unwrap, wrap_model
from cait.training.teacher import load_teacher

__all__ = [
    "RunData",
    "RunLoaders",
    "RunModel",
    "build_loaders",
    "build_objective",
    "build_optimisation",
    "build_run_model",
    "load_data",
    "resolve_data_settings",
    "set_up",
]

logger = logging.getLogger(__name__)


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
class RunData:
    """The datasets, their input settings and class names."""

    settings: InputSpec
    train: Dataset
    val: Dataset
    classes: list[str]


@dataclass
class RunModel:
    """The model as trained (wrapped for data parallelism) and ``plain``, the model itself
    (for evaluation, the EMA and the optimiser); what describes it in a checkpoint; and the
    run checkpoint it resumes from."""

    trained: nn.Module
    plain: nn.Module
    ema: ModelEma | None
    spec: dict[str, Any]
    resume_state: RunCheckpoint | None


@dataclass
class RunLoaders:
    """This rank's loaders; ``sampler`` sets the training loader's epoch (the sampler of an
    indexed split, or a streamed split itself)."""

    sampler: Any
    train: DataLoader
    val: DataLoader


def set_up(config: TrainConfig, info: runtime.DistInfo) -> torch.device:
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


def load_data(config: TrainConfig) -> RunData:
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
    return RunData(settings, train_ds, val_ds, list(classes))


def _new_model(config: TrainConfig, num_classes: int) -> nn.Module:
    args = dict(config.model_args)
    if args.get("num_classes", num_classes) != num_classes:
        raise ValueError(
            f"model_args.num_classes={args['num_classes']} but the data has {num_classes} classes"
        )
    args.pop("num_classes", None)
    return build_model(config.model, args, num_classes)


def _check_init_classes(init_from: str, classes: list[str], by_position: bool) -> None:
    """``init_from`` weights of ours with as many classes as the data keep their head, so
    their class names must be the data's (or ``by_position`` be set); with another count
    the head starts afresh and names do not matter. Official, timm and downloaded weights
    name no classes."""
    metadata = read_checkpoint_metadata(init_from)
    if metadata is None or len(class_names_of(metadata)) != len(classes):
        return
    labels = ("the checkpoint", "the data")
    check_class_names(
        class_names_of(metadata), classes, labels, f"init_from={init_from}", by_position
    )


def build_run_model(
    config: TrainConfig, data: RunData, info: runtime.DistInfo, device: torch.device
) -> RunModel:
    """Build the model, take its weights (resumed or ``init_from``), start the EMA from
    them and wrap the model for data parallelism."""
    model = _new_model(config, len(data.classes))
    spec = model_spec(config.model, model, config.model_args)
    resume_state = None
    if config.resume:
        resume_state = load_checkpoint(config.resume)
        by_position = config.data.classes_by_position
        check_resume(resume_state, spec, config.resume, data.classes, by_position)
        model.load_state_dict(resume_state.weights)
    elif config.init_from:
        if not isinstance(model, CaiT):
            raise ValueError(
                "init_from loads CaiT/DeiT weights; it is not available for timm models"
            )
        _check_init_classes(config.init_from, data.classes, config.data.classes_by_position)
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
    return RunModel(trained, unwrap(trained), ema, spec, resume_state)


def build_loaders(
    config: TrainConfig, data: RunData, info: runtime.DistInfo, device: torch.device
) -> RunLoaders:
    """This rank's shards: shuffled (or repeated-augmentation) training batches, each
    image of the validation split once (:func:`cait.data.make_loader`, for any source)."""
    common = dict(
        workers=config.data.workers,
        rank=info.rank,
        world=info.world_size,
        pin_memory=device.type == "cuda",
    )
    train = make_loader(
        data.train,
        config.data.batch_size,
        train=True,
        seed=config.seed,
        repeats=config.augment.repeated_aug,
        **common,
    )
    val = make_loader(data.val, config.data.batch_size, **common)
    if len(train.loader) < config.optim.accum_steps:
        raise ValueError(
            f"{_count(data.train)} training images give {len(train.loader)} batches of "
            f"{config.data.batch_size}: fewer than optim.accum_steps={config.optim.accum_steps}"
        )
    return RunLoaders(train.epochs, train.loader, val.loader)


def _count(dataset: Dataset) -> int:
    return getattr(dataset, "total", None) or len(dataset)  # type: ignore[arg-type]


def build_objective(config: TrainConfig, data: RunData, device: torch.device) -> Objective:
    """Mixup/CutMix, the loss and (for distillation) the frozen teacher."""
    mixup = build_mixup(config.augment, len(data.classes))
    # label smoothing is folded into mixup's soft targets when mixup is on
    smoothing = 0.0 if mixup is not None else config.augment.label_smoothing
    d = config.distill
    criterion = DistillationLoss(d.kind, d.alpha, d.tau, smoothing, d.normalisation)
    teacher = None
    if d.kind != "none":
        teacher = load_teacher(
            d.teacher,
            len(data.classes),
            data.settings,
            d.teacher_weights,
            device,
            class_names=data.classes,
            by_position=config.data.classes_by_position,
        )
    return Objective(criterion, mixup, teacher)


def build_optimisation(
    config: TrainConfig, model: RunModel, loaders: RunLoaders, info: runtime.DistInfo
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
