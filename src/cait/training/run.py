"""A whole training run: set-up, the epoch loop, checkpoints, records. ``train(config)``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

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
from cait.models.build import build_model, input_spec, model_spec
from cait.models.cait import CaiT
from cait.models.pretrained import load_pretrained
from cait.models.registry import InputSpec
from cait.training.checkpoint import load_checkpoint, save_checkpoint, save_safetensors
from cait.training.config import LR_BASE_BATCH, TrainConfig, scaled_lr
from cait.training.engine import evaluate, train_one_epoch
from cait.training.losses import DistillationLoss
from cait.training.optim import LRSchedule, ModelEma, build_optimizer
from cait.training.parallel import (
    load_optimizer_state,
    model_state_dict,
    optimizer_state_dict,
    unwrap,
    wrap_model,
)
from cait.training.records import plot_curves
from cait.training.teacher import load_teacher

__all__ = ["TrainResult", "resolve_data_settings", "train"]

logger = logging.getLogger(__name__)

# Per-epoch metrics that measure time, not learning: they differ between two identical runs.
TIMING_KEYS = ("images_per_s", "epoch_seconds")


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


def _seed_worker(worker_id: int) -> None:
    # torch seeds python's and its own RNG in each worker; numpy (used by some
    # augmentations) is seeded here from the same per-worker seed.
    np.random.seed(torch.initial_seed() % 2**32)


def _build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    args = dict(config.model_args)
    if args.get("num_classes", num_classes) != num_classes:
        raise ValueError(
            f"model_args.num_classes={args['num_classes']} but the data has {num_classes} classes"
        )
    args.pop("num_classes", None)
    return build_model(config.model, args, num_classes)


# Settings that may change on resume without changing what is computed.
_RESUME_FREE = {
    "resume",
    "stop_after",
    "output",
    "progress",
    "tensorboard",
    "wandb",
    "wandb_project",
    "wandb_mode",
    "threads",
    "log_interval",
    "data.workers",
    "dist_timeout",
    "parallel",  # DDP and FSDP compute the same steps (up to float rounding)
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model_args":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _warn_on_changed_settings(
    state: dict, config: TrainConfig, steps_per_epoch: int, world_size: int
) -> None:
    """Resume continues exactly only with the same settings; say which ones changed."""
    saved = _flatten(state["config"])
    now = _flatten(config.to_dict())
    changed = sorted(
        k
        for k in set(saved) | set(now)
        if k not in _RESUME_FREE and _plain(saved.get(k)) != _plain(now.get(k))
    )
    if changed:
        logger.warning(
            "resuming with changed settings, so the run will not match an uninterrupted one: %s",
            ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed),
        )
    sched = state.get("schedule", {})
    saved_world = sched.get("world_size", 1)
    if saved_world != world_size:
        logger.warning(
            "resuming a run of %d process(es) on %d: the global batch and the order of "
            "the images change, so the run will not match an uninterrupted one",
            saved_world,
            world_size,
        )
    if sched.get("steps_per_epoch") not in (None, steps_per_epoch):
        logger.warning(
            "steps per epoch changed from %s to %d: the schedule's clock shifts",
            sched["steps_per_epoch"],
            steps_per_epoch,
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_resume(state: dict, spec: dict, path: str) -> None:
    saved = state["config"]
    if saved.get("model") != spec["model"] or state.get("model_config") != spec["model_config"]:
        theirs = f"{saved.get('model')} {state.get('model_config')}"
        ours = f"{spec['model']} {spec['model_config']}"
        raise ValueError(
            f"--resume {path} holds a checkpoint of another model:\n"
            f"  checkpoint: {theirs}\n  this run:   {ours}"
        )


class _Recorder:
    """metrics.jsonl, TensorBoard and (optionally) Weights & Biases."""

    def __init__(self, config: TrainConfig, out: Path, history: list[dict]) -> None:
        self.path = out / "metrics.jsonl"
        # rewrite from the checkpoint's history: lines of epochs after it are dropped
        self.path.write_text("".join(json.dumps(m) + "\n" for m in history))
        self.tb = None
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        self.wandb = None
        if config.wandb:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("wandb logging was asked for but wandb is not installed") from err
            self.wandb = wandb.init(
                project=config.wandb_project,
                mode=config.wandb_mode,
                dir=str(out),
                config=config.to_dict(),
            )

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.tb is not None:
            self.tb.add_scalar("train/loss_step", loss, step)
            self.tb.add_scalar("train/lr", lr, step)

    def epoch(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
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


def train(config: TrainConfig) -> TrainResult:
    """Train (or fine-tune, or resume) a model as ``config`` says; see ``docs/TRAINING.md``.

    Under ``torchrun`` every process calls this: data-parallel training over all of them
    (``docs/DISTRIBUTED.md``); only rank 0 writes files.
    """
    with runtime.distributed(config.device, config.dist_timeout) as info:
        return _train(config, info)


def _train(config: TrainConfig, info: runtime.DistInfo) -> TrainResult:
    out = Path(config.output)
    main = info.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    device = runtime.setup(config.seed, config.device, config.amp, config.threads, info.local_rank)
    logger.info("config:\n%s", yaml.safe_dump(config.to_dict(), sort_keys=False))
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    # data first: a bad path or an empty class folder fails before anything else is built
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

    model = _build_model(config, len(classes))
    spec = model_spec(config.model, model, config.model_args)
    resume_state = None
    if config.resume:
        resume_state = load_checkpoint(config.resume)
        _check_resume(resume_state, spec, config.resume)
    elif config.init_from:
        if not isinstance(model, CaiT):
            raise ValueError(
                "--init-from loads CaiT/DeiT weights; it is not available for timm models"
            )
        report = load_pretrained(model, config.init_from)
        logger.info("initialised from %s (%s)", config.init_from, report)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
    model.to(device)
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
    model = wrap_model(model, config.parallel, info, device)
    plain = unwrap(model)  # the model itself: for evaluation, the EMA and the optimiser

    sampler = build_train_sampler(
        train_ds, config.augment.repeated_aug, config.seed, info.world_size, info.rank
    )
    loader_args = dict(
        batch_size=config.data.batch_size,
        num_workers=config.data.workers,
        collate_fn=collate_samples,
        pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker,
    )
    train_loader = DataLoader(train_ds, sampler=sampler, drop_last=True, **loader_args)
    val_loader = DataLoader(
        val_ds, sampler=ShardSampler(len(val_ds), info.world_size, info.rank), **loader_args
    )
    if len(train_loader) < config.optim.accum_steps:
        raise ValueError(
            f"{len(train_ds)} training images give {len(train_loader)} batches of "
            f"{config.data.batch_size}: fewer than optim.accum_steps={config.optim.accum_steps}"
        )
    steps_per_epoch = len(train_loader) // config.optim.accum_steps
    peak_lr = scaled_lr(config, info.world_size)
    schedule = LRSchedule(peak_lr, config.optim, steps_per_epoch, config.epochs)
    optimizer = build_optimizer(plain, config.optim, schedule(0))
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    mixup = build_mixup(config.augment, len(classes))
    # label smoothing is folded into mixup's soft targets when mixup is on
    smoothing = 0.0 if mixup is not None else config.augment.label_smoothing
    d = config.distill
    criterion = DistillationLoss(d.kind, d.alpha, d.tau, smoothing, d.normalisation)
    teacher = None
    if d.kind != "none":
        teacher = load_teacher(d.teacher, len(classes), settings, d.teacher_weights, device)
    global_batch = config.data.batch_size * config.optim.accum_steps * info.world_size
    how = (
        f"{config.optim.lr:.3g} x global batch {global_batch} / {LR_BASE_BATCH}"
        if config.optim.scale_lr
        else "optim.lr as given, not scaled"
    )
    logger.info("optimisation: peak lr %.3g (%s), %d steps/epoch", peak_lr, how, steps_per_epoch)

    start_epoch, step, history, best = 0, 0, [], -1.0
    if resume_state is not None:
        _warn_on_changed_settings(resume_state, config, steps_per_epoch, info.world_size)
        load_optimizer_state(model, optimizer, resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        if ema is not None and resume_state.get("ema") is not None:
            ema.load_state_dict(resume_state["ema"])
        start_epoch = resume_state["epoch"] + 1
        step = resume_state["step"]
        history = list(resume_state["history"])
        best = resume_state["best_top1"]
        _restore_rng(resume_state, info)
        logger.info("resumed from %s at epoch %d (step %d)", config.resume, start_epoch, step)

    recorder = _Recorder(config, out, history) if main else None
    skipped_seen: set[str] = set()
    upfront = getattr(train_ds, "skipped", []) + getattr(val_ds, "skipped", [])
    if main and resume_state is None:
        (out / "skipped_files.txt").unlink(missing_ok=True)
    if main and upfront and not (out / "skipped_files.txt").exists():
        with open(out / "skipped_files.txt", "w") as f:
            f.writelines(s + "\n" for s in upfront)
    skipped_seen.update(upfront)
    completed = True
    try:
        for epoch in range(start_epoch, config.epochs):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            stats, step = train_one_epoch(
                model,
                train_loader,
                optimizer,
                schedule,
                step,
                epoch,
                device,
                amp=config.amp,
                scaler=scaler,
                mixup=mixup,
                criterion=criterion,
                teacher=teacher,
                accum_steps=config.optim.accum_steps,
                clip_grad=config.optim.clip_grad,
                ema=ema,
                log_interval=config.log_interval,
                progress=config.progress and main,
                description=f"epoch {epoch + 1}/{config.epochs}",
                on_log=recorder.step if recorder is not None else None,
            )
            val = evaluate(plain, val_loader, device, config.amp)
            metrics = {
                "epoch": epoch + 1,
                "train_loss": stats.loss,
                "val_loss": val["loss"],
                "val_top1": val["top1"],
                "val_top5": val["top5"],
                "val_images": val["images"],
                "lr": stats.lr,
                "images_per_s": stats.images_per_s,
                "epoch_seconds": stats.seconds,
            }
            if ema is not None:
                ema_val = evaluate(ema.module, val_loader, device, config.amp)
                metrics["ema_val_top1"] = ema_val["top1"]
                metrics["ema_val_loss"] = ema_val["loss"]
            new_skips = sorted(set(stats.skipped + val["skipped"]) - skipped_seen)
            skipped_seen.update(new_skips)
            metrics["skipped_files"] = len(skipped_seen)
            if new_skips:
                logger.warning(
                    "skipped %d unreadable file(s):\n  %s", len(new_skips), "\n  ".join(new_skips)
                )
            if new_skips and main:
                with open(out / "skipped_files.txt", "a") as f:
                    f.writelines(s + "\n" for s in new_skips)
            history.append(metrics)
            logger.info(
                "epoch %d/%d: train_loss %.4f  val_loss %.4f  val_top1 %.2f  val_top5 %.2f%s"
                "  lr %.2e  %.0f images/s",
                epoch + 1,
                config.epochs,
                stats.loss,
                val["loss"],
                val["top1"],
                val["top5"],
                f"  ema_top1 {metrics['ema_val_top1']:.2f}" if ema is not None else "",
                stats.lr,
                stats.images_per_s,
            )
            is_best = val["top1"] > best
            best = max(best, val["top1"])
            # gathering the sharded state and the ranks' RNG states are collectives
            model_state = model_state_dict(model)
            optim_state = optimizer_state_dict(model, optimizer)
            rng_ranks = runtime.all_gather_objects(runtime.get_rng_state())
            state = {
                "model": model_state,
                "optimizer": optim_state,
                "schedule": {
                    "step": step,
                    "peak_lr": peak_lr,
                    "steps_per_epoch": steps_per_epoch,
                    "world_size": info.world_size,
                },
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "rng": rng_ranks[0],
                # every rank's RNG streams (rank 0's is "rng"), so a resumed run draws the
                # same augmentations on every rank
                "rng_ranks": rng_ranks if info.world_size > 1 else None,
                "epoch": epoch,
                "step": step,
                "history": history,
                "best_top1": best,
                "config": config.to_dict(),
                "model_config": spec["model_config"],
                "data_settings": settings.__dict__,
                "class_names": list(classes),
            }
            if main:
                save_checkpoint(state, out / "last.pt")
                if is_best:
                    save_checkpoint(state, out / "best.pt")
                recorder.epoch(metrics)
            if config.stop_after is not None and epoch + 1 - start_epoch >= config.stop_after:
                completed = epoch + 1 == config.epochs
                if not completed:
                    logger.info(
                        "stopping after %d epoch(s) as asked (stop_after); resume with --resume %s",
                        config.stop_after,
                        out / "last.pt",
                    )
                break
    finally:
        if recorder is not None:
            recorder.close()

    if completed:
        metadata = {
            "model": config.model,
            "model_config": spec["model_config"],
            "data_settings": settings.__dict__,
            "class_names": list(classes),
        }
        weights = model_state_dict(model)  # a collective under FSDP
        if main:
            save_safetensors(weights, out / "model.safetensors", metadata)
            if ema is not None:
                save_safetensors(ema.state_dict(), out / "model_ema.safetensors", metadata)
    if history and main:
        plot_curves(history, out / "curves.png")
    minutes, seconds = divmod(round(sum(m["epoch_seconds"] for m in history)), 60)
    logger.info(
        "done: %d min %d s of training, best val top-1 %.2f; outputs in %s",
        minutes,
        seconds,
        best,
        out,
    )
    return TrainResult(out, history, best, completed, model)


def _restore_rng(state: dict, info: runtime.DistInfo) -> None:
    """Each rank takes back its own RNG streams; from a checkpoint of another number of
    processes only rank 0 can (the others keep the streams seeded for them)."""
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == info.world_size:
        runtime.set_rng_state(ranks[info.rank])
    elif info.is_main:
        runtime.set_rng_state(state["rng"])
