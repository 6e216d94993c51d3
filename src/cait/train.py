"""A whole training run: set-up, the epoch loop, checkpoints, records. ``train(config)``."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from cait import runtime
from cait.checkpoint import load_checkpoint, save_checkpoint, save_safetensors
from cait.data import (
    DataSettings,
    build_datasets,
    build_mixup,
    build_train_sampler,
    collate_samples,
    eval_transform,
    train_transform,
)
from cait.engine import evaluate, train_one_epoch
from cait.factory import build_model, default_settings, model_spec
from cait.losses import DistillationLoss
from cait.model import CaiT
from cait.optim import LRSchedule, ModelEma, build_optimizer
from cait.plots import plot_curves
from cait.teacher import load_teacher
from cait.train_config import LR_BASE_BATCH, TrainConfig, scaled_lr
from cait.weights import load_pretrained

__all__ = ["TrainResult", "resolve_data_settings", "train"]

logger = logging.getLogger(__name__)

# Per-epoch metrics that measure time, not learning: they differ between two identical runs.
TIMING_KEYS = ("images_per_s", "epoch_seconds")


@dataclass
class TrainResult:
    output: Path
    history: list[dict[str, Any]]
    best_top1: float
    completed: bool


def resolve_data_settings(config: TrainConfig) -> DataSettings:
    """Input settings: the config's ``data`` fields, else the model's defaults."""
    d = config.data
    base = default_settings(config.model, config.model_args)
    return DataSettings(
        img_size=d.img_size or base.img_size,
        crop_pct=d.crop_pct if d.crop_pct is not None else base.crop_pct,
        interpolation=d.interpolation or base.interpolation,
        mean=tuple(d.mean) if d.mean is not None else base.mean,
        std=tuple(d.std) if d.std is not None else base.std,
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
    state: dict, config: TrainConfig, steps_per_epoch: int, peak_lr: float
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
    """Train (or fine-tune, or resume) a model as ``config`` says; see ``docs/TRAINING.md``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "multi-process training is not supported yet: run a single process "
            f"(WORLD_SIZE={os.environ['WORLD_SIZE']})"
        )
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    device = runtime.setup(config.seed, config.device, config.amp, config.threads)
    logger.info("config:\n%s", yaml.safe_dump(config.to_dict(), sort_keys=False))
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
    model.to(device)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    logger.info(
        "model %s: %.2fM parameters", config.model, sum(p.numel() for p in model.parameters()) / 1e6
    )

    sampler = build_train_sampler(train_ds, config.augment.repeated_aug, config.seed)
    loader_args = dict(
        batch_size=config.data.batch_size,
        num_workers=config.data.workers,
        collate_fn=collate_samples,
        pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker,
    )
    train_loader = DataLoader(train_ds, sampler=sampler, drop_last=True, **loader_args)
    val_loader = DataLoader(val_ds, shuffle=False, **loader_args)
    if len(train_loader) < config.optim.accum_steps:
        raise ValueError(
            f"{len(train_ds)} training images give {len(train_loader)} batches of "
            f"{config.data.batch_size}: fewer than optim.accum_steps={config.optim.accum_steps}"
        )
    steps_per_epoch = len(train_loader) // config.optim.accum_steps
    peak_lr = scaled_lr(config)
    schedule = LRSchedule(peak_lr, config.optim, steps_per_epoch, config.epochs)
    optimizer = build_optimizer(model, config.optim, schedule(0))
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    mixup = build_mixup(config.augment, len(classes))
    # label smoothing is folded into mixup's soft targets when mixup is on
    smoothing = 0.0 if mixup is not None else config.augment.label_smoothing
    d = config.distill
    criterion = DistillationLoss(d.kind, d.alpha, d.tau, smoothing, d.normalisation)
    teacher = None
    if d.kind != "none":
        teacher = load_teacher(d.teacher, len(classes), settings, d.teacher_weights, device)
    global_batch = config.data.batch_size * config.optim.accum_steps
    how = (
        f"{config.optim.lr:.3g} x global batch {global_batch} / {LR_BASE_BATCH}"
        if config.optim.scale_lr
        else "optim.lr as given, not scaled"
    )
    logger.info("optimisation: peak lr %.3g (%s), %d steps/epoch", peak_lr, how, steps_per_epoch)

    start_epoch, step, history, best = 0, 0, [], -1.0
    if resume_state is not None:
        _warn_on_changed_settings(resume_state, config, steps_per_epoch, peak_lr)
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
    # the EMA starts from the weights training starts from (initialised, loaded or resumed)
    ema = ModelEma(model, config.ema_decay) if config.ema else None
    if resume_state is not None:
        if ema is not None and resume_state.get("ema") is not None:
            ema.load_state_dict(resume_state["ema"])
        start_epoch = resume_state["epoch"] + 1
        step = resume_state["step"]
        history = list(resume_state["history"])
        best = resume_state["best_top1"]
        runtime.set_rng_state(resume_state["rng"])
        logger.info("resumed from %s at epoch %d (step %d)", config.resume, start_epoch, step)

    recorder = _Recorder(config, out, history)
    skipped_seen: set[str] = set()
    upfront = getattr(train_ds, "skipped", []) + getattr(val_ds, "skipped", [])
    if resume_state is None:
        (out / "skipped_files.txt").unlink(missing_ok=True)
    if upfront and not (out / "skipped_files.txt").exists():
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
                progress=config.progress,
                description=f"epoch {epoch + 1}/{config.epochs}",
                on_log=recorder.step,
            )
            val = evaluate(model, val_loader, device, config.amp)
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
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": {"step": step, "peak_lr": peak_lr, "steps_per_epoch": steps_per_epoch},
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "rng": runtime.get_rng_state(),
                "epoch": epoch,
                "step": step,
                "history": history,
                "best_top1": best,
                "config": config.to_dict(),
                "model_config": spec["model_config"],
                "data_settings": settings.__dict__,
                "class_names": list(classes),
            }
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
        recorder.close()

    if completed:
        metadata = {
            "model": config.model,
            "model_config": spec["model_config"],
            "data_settings": settings.__dict__,
            "class_names": list(classes),
        }
        save_safetensors(model.state_dict(), out / "model.safetensors", metadata)
        if ema is not None:
            save_safetensors(ema.state_dict(), out / "model_ema.safetensors", metadata)
    if history:
        plot_curves(history, out / "curves.png")
    minutes, seconds = divmod(round(sum(m["epoch_seconds"] for m in history)), 60)
    logger.info(
        "done: %d min %d s of training, best val top-1 %.2f; outputs in %s",
        minutes,
        seconds,
        best,
        out,
    )
    return TrainResult(output=out, history=history, best_top1=best, completed=completed)
