"""Throughput and peak memory of a model, alone or side by side with timm: ``cait bench``
(timm's model, and the check that it computes what ours does, are :mod:`cait.bench.compare`).

Protocol (so that ratios survive a noisy, shared machine): every model is built in the same
process on the same random batch; after ``warmup`` untimed steps each, ``rounds`` timed
rounds run the models alternately (the order flips every round), each round timing
``steps`` consecutive steps. A model's figure is the median over rounds of its images/s;
the ratio is the ratio of the medians; ``round_ratio``, the median of the per-round ratios,
pairs measurements taken seconds apart and so resists slow drifts of the machine's load.

A step is ``model(images)`` under ``torch.inference_mode`` for inference, or forward, cross
entropy, backward and an AdamW step for training. ``dtype`` bf16/fp16 casts the model and
the images for inference (``autocast=True`` keeps fp32 weights and autocasts instead) and
always autocasts for training, which keeps fp32 master weights; ``int8`` (inference on the
CPU only) times a copy with int8 linear layers, activation scales measured per batch
(:func:`cait.precision.quantize_int8`, what ``--precision int8`` runs), on fp32 images.

Model FLOP utilisation: each model's FLOPs per image are counted once, on a ``meta`` copy
(:mod:`cait.bench.flops`); TFLOP/s is that times the median images/s, and MFU its share of
the device's dense peak rate in the step's precision (:data:`cait.bench.flops.PEAK_TFLOPS`;
none on the CPU).

Peak memory is measured once per model, in a separate step after warm-up: on CUDA,
``torch.cuda.max_memory_allocated`` above what was allocated before the step; on the CPU,
the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident set before the step, after returning freed
heap to the system (``malloc_trim``). CPU figures therefore count every allocation of the
step, including the allocator's and the BLAS library's scratch space.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cait import runtime
from cait.bench.compare import (
    CHECK_IMAGES,
    CHECK_LAYERSCALE,
    COMPARE_WITH,
    Compare,
    build_reference,
    check_agreement,
    class_logits,
    set_layerscale,
)
from cait.bench.flops import flops_per_image, peak_tflops
from cait.models.registry import create_model, get_variant
from cait.precision import check_precision, quantize_int8
from cait.threads import adapt as adapt_threads
from cait.threads import use_threads

__all__ = [
    "DTYPES",
    "BenchResult",
    "ModelTiming",
    "benchmark",
    "format_table",
]

logger = logging.getLogger(__name__)

# the precisions a benchmark runs in; int8 has no torch dtype of its own to cast to (the
# images stay fp32): it names the quantized model
DTYPES = {**runtime.DTYPES, "int8": torch.qint8}


@dataclass
class ModelTiming:
    """One model's figures: median and per-round images/s, peak memory in MiB, and its
    model FLOP utilisation (:mod:`cait.bench.flops`): GFLOP per image, TFLOP/s at the
    median, and their share of the device's peak (None where the peak is not known)."""

    impl: str
    dtype: str
    images_per_s: float
    rounds: list[float]
    peak_mem_mib: float | None
    gflop_per_image: float | None = None
    tflops: float | None = None
    mfu: float | None = None


@dataclass
class BenchResult:
    """Everything ``cait bench`` reports (``asdict`` gives the JSON)."""

    model: str
    attn_impl: str
    mode: str
    batch_size: int
    device: str
    compile: bool
    autocast: bool
    threads: int
    torch_version: str
    rounds: int
    steps: int
    warmup: int
    timings: list[ModelTiming] = field(default_factory=list)
    ratio: float | None = None
    round_ratio: float | None = None
    max_abs_diff: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _make_step(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    train: bool,
    dtype: torch.dtype,
    autocast: bool,
    device: torch.device,
) -> Callable[[], None]:
    """A closure running one timed step of ``model``, prepared for the mode and dtype."""
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "none")
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            with runtime.autocast(device, amp):
                loss = F.cross_entropy(class_logits(model(images)).float(), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    model.eval()
    if dtype == torch.qint8:
        model = quantize_int8(model)
    elif not autocast:
        model.to(dtype)
        images = images.to(dtype)

    def step() -> None:
        with torch.inference_mode(), runtime.autocast(device, amp if autocast else "none"):
            model(images)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_memory_mib(step: Callable[[], None], device: torch.device) -> float | None:
    """Memory one step needs above what is held before it (see the module docstring)."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        _trim_heap()
        before = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        step()
        return (_rss_kib("VmHWM") - before) / 1024
    except (OSError, RuntimeError) as err:
        logger.warning("peak memory not measured: %s", err)
        return None


def _check_options(
    dtype: str,
    compare_dtype: str,
    compare: str | None,
    batch_size: int,
    rounds: int,
    steps: int,
    warmup: int,
) -> None:
    """Raise ``ValueError`` for an option :func:`benchmark` cannot run with."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if compare_dtype not in DTYPES:
        raise ValueError(f"compare dtype must be one of {sorted(DTYPES)}, got {compare_dtype!r}")
    if compare is not None and compare not in COMPARE_WITH:
        raise ValueError(f"compare must be one of {list(COMPARE_WITH)}, got {compare!r}")
    if min(batch_size, rounds, steps) < 1 or warmup < 0:
        raise ValueError("batch size, rounds and steps must be >= 1 and warmup >= 0")


def _model_and_batch(
    model_name: str, batch_size: int, seed: int, overrides: dict[str, object]
) -> tuple[nn.Module, Tensor, Tensor]:
    """Our model (LayerScale at :data:`CHECK_LAYERSCALE`) and a random batch of images
    ``(B, C, H, W)`` and targets ``(B,)`` at the variant's resolution, on the CPU."""
    ours = create_model(model_name, **overrides)
    set_layerscale(ours, CHECK_LAYERSCALE)
    size = get_variant(model_name).img_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, ours.config.in_chans, size, size, generator=gen)
    targets = torch.randint(0, max(ours.num_classes, 1), (batch_size,), generator=gen)
    return ours, images, targets


def _warm_up(
    models: dict[str, tuple[nn.Module, str]],
    images: Tensor,
    targets: Tensor,
    *,
    train: bool,
    autocast: bool,
    compile: bool,
    warmup: int,
    device: torch.device,
) -> dict[str, Callable[[], None]]:
    """Each model's step (compiled when ``compile``), run ``warmup`` times untimed (at least
    once when compiled, so that compilation stays out of the timings)."""
    step_fns = {}
    for name, (model, dt) in models.items():
        if compile:
            model = torch.compile(model)
        step_fns[name] = _make_step(model, images, targets, train, DTYPES[dt], autocast, device)
        logger.info("warming up %s (%s, %d steps)", name, dt, warmup)
        for _ in range(max(warmup, 1 if compile else 0)):
            step_fns[name]()
        _sync(device)
    return step_fns


def _timed_rounds(
    step_fns: dict[str, Callable[[], None]],
    rounds: int,
    steps: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Images/s of each model in each round; the models alternate, in an order that flips
    every round (see the module docstring)."""
    per_round: dict[str, list[float]] = {name: [] for name in step_fns}
    order = list(step_fns)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                adapt_threads()  # as training does between steps (cait.threads)
                step_fns[name]()
            _sync(device)
            per_round[name].append(steps * batch_size / (time.perf_counter() - start))
        logger.info(
            "round %d/%d: %s",
            r + 1,
            rounds,
            ", ".join(f"{n} {v[-1]:.2f} img/s" for n, v in per_round.items()),
        )
    return per_round


def _record_timings(
    result: BenchResult,
    models: dict[str, tuple[nn.Module, str]],
    per_round: dict[str, list[float]],
    peaks: dict[str, float | None],
) -> None:
    """Each model's median and rounds into ``result``, and the ratios beside timm's."""
    for name, (_, dt) in models.items():
        result.timings.append(
            ModelTiming(
                impl=name,
                dtype=dt,
                images_per_s=statistics.median(per_round[name]),
                rounds=per_round[name],
                peak_mem_mib=peaks[name],
            )
        )
    if "timm" in models:
        result.ratio = result.timings[0].images_per_s / result.timings[1].images_per_s
        result.round_ratio = statistics.median(
            a / b for a, b in zip(per_round["cait"], per_round["timm"], strict=True)
        )


def benchmark(
    model_name: str,
    batch_size: int = 32,
    dtype: str = "fp32",
    device: str = "cpu",
    compile: bool = False,
    train: bool = False,
    compare: Compare | None = None,
    compare_dtype: str | None = None,
    autocast: bool = False,
    rounds: int = 5,
    steps: int = 2,
    warmup: int = 2,
    seed: int = 0,
    threads: int | None = None,
    **overrides: object,
) -> BenchResult:
    """Images/s and peak memory of ``model_name``, alternated with timm's when ``compare``.

    ``compare="timm"`` builds timm's model of the same name with the same weights, checks
    in fp32 on the device that the logits of the batch's first :data:`CHECK_IMAGES` images
    agree, then times both (timm in ``compare_dtype``, by default
    ``dtype``). ``overrides`` are config fields for our model (e.g. ``attn_impl``);
    ``threads`` pins torch's intra-op threads (default: the process's thread policy, which
    the CLI sets to follow other processes' load; :mod:`cait.threads`).
    """
    compare_dtype = compare_dtype or dtype
    _check_options(dtype, compare_dtype, compare, batch_size, rounds, steps, warmup)
    dev = runtime.inference_device(device, "fp16" if "fp16" in (dtype, compare_dtype) else "none")
    if "int8" in (dtype, compare_dtype):
        if train:
            raise ValueError("int8 is an inference precision: training runs in fp32, bf16, fp16")
        check_precision("int8", dev)
    runtime.seed_everything(seed)
    if threads is not None:
        use_threads(threads)

    ours, images, targets = _model_and_batch(model_name, batch_size, seed, overrides)
    result = BenchResult(
        model=model_name,
        attn_impl=ours.config.attn_impl,
        mode="train" if train else "inference",
        batch_size=batch_size,
        device=str(dev),
        compile=compile,
        autocast=autocast or train,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        rounds=rounds,
        steps=steps,
        warmup=warmup,
    )
    images, targets = images.to(dev), targets.to(dev)
    models: dict[str, tuple[nn.Module, str]] = {"cait": (ours.to(dev), dtype)}
    if compare == "timm":
        ref = build_reference(model_name, ours.state_dict()).to(dev)
        check = images[:CHECK_IMAGES]
        result.max_abs_diff, result.top1_agreement = check_agreement(ours, ref, check)
        models["timm"] = (ref, compare_dtype)

    step_fns = _warm_up(
        models,
        images,
        targets,
        train=train,
        autocast=autocast,
        compile=compile,
        warmup=warmup,
        device=dev,
    )
    peaks = {name: _peak_memory_mib(fn, dev) for name, fn in step_fns.items()}
    per_round = _timed_rounds(step_fns, rounds, steps, batch_size, dev)
    result.threads = torch.get_num_threads()  # where the thread policy ended (cait.threads)
    _record_timings(result, models, per_round, peaks)
    _record_utilisation(result, models, tuple(images.shape[1:]), train, dev)
    return result


def _record_utilisation(
    result: BenchResult,
    models: dict[str, tuple[nn.Module, str]],
    image_shape: tuple[int, ...],
    train: bool,
    device: torch.device,
) -> None:
    """Each timing's FLOPs per image (counted once per model), TFLOP/s and MFU."""
    for timing, (model, dt) in zip(result.timings, models.values(), strict=True):
        flops = flops_per_image(model, image_shape, train)
        timing.gflop_per_image = flops / 1e9
        timing.tflops = flops * timing.images_per_s / 1e12
        peak = peak_tflops(device, dt)
        timing.mfu = timing.tflops / peak if peak else None


def format_table(result: BenchResult) -> str:
    """The result as a small text table (what ``cait bench`` prints without ``--json``)."""
    r = result
    lines = [
        f"{r.model} ({r.attn_impl} attention)  {r.mode}  batch {r.batch_size}  "
        f"device {r.device}  threads {r.threads}  compile {r.compile}  torch {r.torch_version}  "
        f"({r.rounds} rounds x {r.steps} steps, {r.warmup} warm-up)",
        f"{'impl':<6}{'dtype':>6}{'images/s':>11}{'min':>9}{'max':>9}{'peak MiB':>10}"
        f"{'TFLOP/s':>9}{'MFU':>7}",
    ]
    for t in r.timings:
        peak = f"{t.peak_mem_mib:.0f}" if t.peak_mem_mib is not None else "-"
        tflops = f"{t.tflops:.3g}" if t.tflops is not None else "-"
        mfu = f"{t.mfu:.1%}" if t.mfu is not None else "-"
        lines.append(
            f"{t.impl:<6}{t.dtype:>6}{t.images_per_s:>11.2f}{min(t.rounds):>9.2f}"
            f"{max(t.rounds):>9.2f}{peak:>10}{tflops:>9}{mfu:>7}"
        )
    if r.ratio is not None:
        lines.append(
            f"cait / timm: {r.ratio:.2f}x (medians), {r.round_ratio:.2f}x (median of per-round "
            f"ratios); fp32 logits max |diff| "
            f"{r.max_abs_diff:.2e}, top-1 agreement {r.top1_agreement:.0%}"
        )
    return "\n".join(lines)
