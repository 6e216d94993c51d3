"""The paper's ablations on your own data: a grid of model configurations trained with the
same budget and seeds, summarised as a table and a plot.

The knobs are those of :class:`~cait.models.config.CaiTConfig`: the residual-branch scaling of
paper Section 2 / Table 1 (pre-norm, ReZero, SkipInit, fixup-style, LayerScale), the
class token's entry point (Section 3, early as in ViT/DeiT or late into class attention)
and talking heads. Grids are data (:data:`GRIDS`). Every run writes its own folder under
``OUTPUT/runs/CONFIG/seedS`` and, when done, a ``result.json``; a grid started again skips
finished runs and resumes an interrupted one from its ``last.pt``.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cait.models.registry import layerscale_init_for_depth
from cait.training.config import apply_overrides, config_from_dict
from cait.training.engine import NonFiniteLossError
from cait.training.records import EPOCH_SECONDS_KEY
from cait.training.run import train

__all__ = ["GRIDS", "AblationConfig", "Grid", "RunResult", "get_grid", "run_ablation"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AblationConfig:
    """One row of a grid: a name, what it changes, and the CaiTConfig overrides."""

    name: str
    note: str
    model_args: dict[str, Any]


@dataclass(frozen=True)
class Grid:
    """Configurations trained with one budget: the same model base, epochs, seeds and
    training settings (``train`` holds TrainConfig fields as a nested dict)."""

    name: str
    description: str
    model: str
    epochs: int
    seeds: tuple[int, ...]
    configs: tuple[AblationConfig, ...]
    train: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"


def _scales(depth: int, base: dict[str, Any] | None = None) -> list[AblationConfig]:
    """Pre-norm, ReZero, SkipInit, fixup-style scaling and LayerScale at one depth (paper
    Table 1 / Figure 1). LayerScale's epsilon follows the paper's rule for the depth; the
    scalar of SkipInit and fixup starts at the same value."""
    eps = layerscale_init_for_depth(depth)
    base = dict(base or {})
    return [
        AblationConfig(
            f"prenorm_d{depth}",
            "pre-norm, no scaling (DeiT)",
            {**base, "depth": depth, "branch_scale": "none"},
        ),
        AblationConfig(
            f"rezero_d{depth}",
            "ReZero: scalar from 0, no norm",
            {**base, "depth": depth, "branch_scale": "rezero"},
        ),
        AblationConfig(
            f"skipinit_d{depth}",
            f"SkipInit: scalar from {eps:g}, no norm",
            {**base, "depth": depth, "branch_scale": "skipinit", "init_scale": eps},
        ),
        AblationConfig(
            f"fixup_d{depth}",
            f"fixup-style: scalar from {eps:g}, pre-norm",
            {**base, "depth": depth, "branch_scale": "fixup", "init_scale": eps},
        ),
        AblationConfig(
            f"layerscale_d{depth}",
            f"LayerScale from {eps:g} (CaiT)",
            {**base, "depth": depth, "branch_scale": "layerscale", "init_scale": eps},
        ),
    ]


def _cait_steps(depth: int, base: dict[str, Any] | None = None) -> list[AblationConfig]:
    """From CaiT at ``depth`` back one step at a time: class token early (at the same number
    of blocks, no class attention) and talking heads off."""
    eps = layerscale_init_for_depth(depth)
    cait = {**(base or {}), "branch_scale": "layerscale", "init_scale": eps}
    return [
        AblationConfig(
            f"class_early_d{depth}",
            "CaiT, class token early, no CA stage",
            {**cait, "depth": depth + 2, "ca_depth": 0, "class_token": "early"},
        ),
        AblationConfig(
            f"no_talking_heads_d{depth}",
            "CaiT without talking heads",
            {**cait, "depth": depth, "talking_heads": False},
        ),
    ]


# Training settings of the digits grids: recipes/digits.yaml without the EMA (one
# evaluation per epoch instead of two) and with a 2-epoch warmup for the short budget.
_DIGITS_TRAIN: dict[str, Any] = {
    "ema": False,
    "tensorboard": False,
    "log_interval": 1000,
    "data": {"batch_size": 64},
    "optim": {"lr": 8.0e-3, "warmup_epochs": 2, "min_lr": 1.0e-5, "weight_decay": 0.05},
    "augment": {
        "scale": [0.7, 1.0],
        "ratio": [0.85, 1.18],
        "hflip": 0.0,
        "color_jitter": 0.3,
        "auto_augment": None,
        "re_prob": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "label_smoothing": 0.1,
        "repeated_aug": 1,
    },
}

# Table 1 of the paper compares the branch scalings on DeiT-S: class token early, 6 heads,
# no talking heads
_DEIT_S = {
    "num_classes": 1000,
    "num_heads": 6,
    "class_token": "early",
    "ca_depth": 0,
    "talking_heads": False,
}
_TINY_MODEL = {"embed_dim": 32, "num_heads": 2}

GRIDS: dict[str, Grid] = {
    g.name: g
    for g in (
        Grid(
            name="tiny",
            description="a smoke test of the machinery (CI): 3 configurations, 2 epochs",
            model="cait_digits_16",
            epochs=2,
            seeds=(0, 1),
            configs=(
                AblationConfig(
                    "prenorm_d2",
                    "pre-norm, no scaling",
                    {**_TINY_MODEL, "depth": 2, "branch_scale": "none"},
                ),
                AblationConfig(
                    "rezero_d2", "ReZero", {**_TINY_MODEL, "depth": 2, "branch_scale": "rezero"}
                ),
                AblationConfig(
                    "layerscale_d2",
                    "LayerScale (CaiT)",
                    {**_TINY_MODEL, "depth": 2, "branch_scale": "layerscale", "init_scale": 0.1},
                ),
            ),
            train=_DIGITS_TRAIN,
        ),
        Grid(
            name="default",
            description=(
                "the bundled digits on 2 CPU cores in under 30 minutes: pre-norm at depth "
                "4, 12 and 24; ReZero, SkipInit, fixup-style and LayerScale at depth 24; "
                "class token early and talking heads off at depth 24"
            ),
            model="cait_digits_16",
            epochs=12,
            seeds=(0, 1),
            configs=(
                AblationConfig(
                    "prenorm_d4",
                    "pre-norm, no scaling (DeiT)",
                    {"depth": 4, "branch_scale": "none"},
                ),
                AblationConfig(
                    "prenorm_d12",
                    "pre-norm, no scaling (DeiT)",
                    {"depth": 12, "branch_scale": "none"},
                ),
                *_scales(24),
                *_cait_steps(24),
            ),
            train=_DIGITS_TRAIN,
        ),
        Grid(
            name="paper",
            description=(
                "for a GPU: paper Table 1 (every branch scaling on DeiT-S, 384 wide, 6 heads, "
                "224 px, at depth 12, 18, 24 and 36) and CaiT-S24's steps back to the class "
                "token early and no talking heads, on an ImageNet-style folder with the "
                "DeiT/CaiT recipe"
            ),
            model="cait_s24_224",
            epochs=300,
            seeds=(0,),
            configs=tuple(c for d in (12, 18, 24, 36) for c in _scales(d, _DEIT_S))
            + tuple(_cait_steps(24, {"num_classes": 1000})),
            data="",
        ),
    )
}


def get_grid(name: str) -> Grid:
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; grids: {', '.join(GRIDS)}")
    return GRIDS[name]


@dataclass
class RunResult:
    """The outcome of one (configuration, seed) run."""

    config: str
    seed: int
    top1: float | None  # validation top-1 after the last epoch; None if it diverged
    best_top1: float | None
    epochs: int  # epochs completed (before the loss became NaN/inf, for a diverged run)
    train_seconds: float | None  # None if it diverged (the run's timings are not kept)
    diverged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _run_settings(
    grid: Grid, cfg: AblationConfig, overrides: list[str], **fields: Any
) -> dict[str, Any]:
    """TrainConfig fields of one run: the grid's, the run's, then the user's overrides."""
    base = _merge(grid.train, {"model": grid.model, "model_args": cfg.model_args, **fields})
    return apply_overrides(base, overrides)


def _run_one(
    grid: Grid,
    cfg: AblationConfig,
    seed: int,
    epochs: int,
    data: str,
    run_dir: Path,
    overrides: list[str],
    **kw: Any,
) -> RunResult:
    done = run_dir / "result.json"
    if done.is_file():
        logger.info("%s seed %d: done before, kept", cfg.name, seed)
        return RunResult(**json.loads(done.read_text()))
    resume = run_dir / "last.pt"
    settings = _run_settings(
        grid,
        cfg,
        overrides,
        epochs=epochs,
        seed=seed,
        output=str(run_dir),
        resume=str(resume) if resume.is_file() else None,
        data={"path": data},
        **kw,
    )
    config = config_from_dict(settings)
    logger.info(
        "%s seed %d: %s%s", cfg.name, seed, cfg.note, " (resuming)" if config.resume else ""
    )
    try:
        result = train(config)
    except NonFiniteLossError as err:
        logger.warning("%s seed %d diverged: %s", cfg.name, seed, err)
        metrics = run_dir / "metrics.jsonl"
        completed = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        outcome = RunResult(cfg.name, seed, None, None, completed, None, diverged=True)
    else:
        h = result.history
        outcome = RunResult(
            cfg.name,
            seed,
            top1=h[-1]["val_top1"],
            best_top1=result.best_top1,
            epochs=len(h),
            train_seconds=sum(m[EPOCH_SECONDS_KEY] for m in h),
        )
    done.parent.mkdir(parents=True, exist_ok=True)  # a run can fail before train() makes it
    done.write_text(json.dumps(outcome.to_dict(), indent=2))
    return outcome


def run_ablation(
    grid: str | Grid,
    data: str | None,
    output: str | Path,
    seeds: int | None = None,
    epochs: int | None = None,
    device: str = "auto",
    progress: bool = True,
    overrides: list[str] | None = None,
) -> list[RunResult]:
    """Train every configuration of ``grid`` with every seed, then write ``results.md``,
    ``results.json`` and ``results.png`` to ``output``.

    ``seeds`` (a count) and ``epochs`` shrink or grow the grid's budget; ``data`` defaults to
    the grid's (the digits for ``tiny`` and ``default``; ``paper`` needs a folder).
    ``overrides`` are ``KEY=VALUE`` training settings applied to every run (read by
    ``apply_overrides``), e.g. ``data.batch_size=256`` or ``amp=bf16``.
    """
    overrides = list(overrides or [])
    grid = get_grid(grid) if isinstance(grid, str) else grid
    data = data or grid.data
    if not data:
        raise ValueError(f"grid {grid.name!r} needs data (an ImageFolder root)")
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    seed_list = tuple(range(seeds)) if seeds is not None else grid.seeds
    epochs = epochs or grid.epochs
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    # validate every configuration before the first (possibly long) run starts
    for cfg in grid.configs:
        config_from_dict(_run_settings(grid, cfg, overrides))
    start = time.perf_counter()
    results = []
    total = len(grid.configs) * len(seed_list)
    for cfg in grid.configs:
        for seed in seed_list:
            logger.info("run %d/%d", len(results) + 1, total)
            run_dir = out / "runs" / cfg.name / f"seed{seed}"
            results.append(
                _run_one(
                    grid,
                    cfg,
                    seed,
                    epochs,
                    data,
                    run_dir,
                    overrides,
                    device=device,
                    progress=progress,
                )
            )
    elapsed = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps([r.to_dict() for r in results], indent=2))
    write_results_table(grid, results, out / "results.md", data, epochs, elapsed)
    plot_results(grid, results, out / "results.png")
    logger.info("grid %s done in %.0f s; table in %s", grid.name, elapsed, out / "results.md")
    return results


@dataclass
class _Summary:
    config: AblationConfig
    top1: list[float]
    diverged: int
    seconds: list[float]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.top1) if self.top1 else None

    @property
    def std(self) -> float:
        return statistics.stdev(self.top1) if len(self.top1) > 1 else 0.0


def summarise(grid: Grid, results: list[RunResult]) -> list[_Summary]:
    """One summary per configuration, in the grid's order."""
    rows = []
    for cfg in grid.configs:
        mine = [r for r in results if r.config == cfg.name]
        rows.append(
            _Summary(
                cfg,
                [r.top1 for r in mine if not r.diverged and r.top1 is not None],
                sum(r.diverged for r in mine),
                [r.train_seconds for r in mine if not r.diverged],
            )
        )
    return rows


def _model_args_text(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in args.items())


def write_results_table(
    grid: Grid,
    results: list[RunResult],
    path: str | Path,
    data: str,
    epochs: int,
    elapsed: float,
) -> Path:
    """``results.md``: one row per configuration, mean and spread of top-1 over the seeds."""
    seeds = sorted({r.seed for r in results})
    train_minutes = sum(r.train_seconds for r in results if not r.diverged) / 60
    lines = [
        f"# Ablation grid `{grid.name}`",
        "",
        f"{grid.description}.",
        "",
        f"Model base `{grid.model}`, data `{data}`, {epochs} epoch(s) per run, seeds "
        f"{', '.join(map(str, seeds))}. Top-1 is the validation top-1 after the last epoch "
        "(mean ± standard deviation over the seeds; min-max beside it). "
        f"Training time {train_minutes:.1f} min in all; this call took {elapsed / 60:.1f} min "
        "(runs finished before a resume are not counted in the latter).",
        "",
        "| configuration | what it is | top-1 (%) | min-max | diverged | s/run | overrides |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summarise(grid, results):
        top1 = f"{s.mean:.2f} ± {s.std:.2f}" if s.mean is not None else "-"
        spread = f"{min(s.top1):.2f}-{max(s.top1):.2f}" if s.top1 else "-"
        secs = f"{statistics.fmean(s.seconds):.0f}" if s.seconds else "-"
        lines.append(
            f"| {s.config.name} | {s.config.note} | {top1} | {spread} | "
            f"{s.diverged}/{s.diverged + len(s.top1)} | {secs} | "
            f"{_model_args_text(s.config.model_args)} |"
        )
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_results(grid: Grid, results: list[RunResult], path: str | Path) -> Path:
    """Top-1 per configuration: one dot per seed, a bar at the mean; diverged runs as x."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = summarise(grid, results)
    fig = Figure(figsize=(8, 0.45 * len(rows) + 1.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for y, s in enumerate(rows):
        if s.top1:
            ax.barh(y, s.mean, color="tab:blue", alpha=0.35)
            ax.plot(s.top1, [y] * len(s.top1), "o", color="tab:blue", markersize=4)
        if s.diverged:
            ax.plot([0] * s.diverged, [y] * s.diverged, "x", color="tab:red")
    ax.set_yticks(range(len(rows)), [s.config.name for s in rows])
    ax.invert_yaxis()
    finite = [v for s in rows for v in s.top1]
    if finite:
        low = min(finite)
        ax.set_xlim(max(0.0, low - 0.2 * (100 - low) - 1), 100)
    ax.set_xlabel("validation top-1 (%)")
    ax.set_title(f"ablation grid '{grid.name}'")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
