"""Each step's cost (``cait bench --data DIR --stages N``): the CPU time per image of
decoding, crop+resize, flip, RandAugment, to-tensor, normalising, erasing, collation and
the batch step, for today's training transform and the fast path's variants
(:mod:`cait.data.decode`), on one thread. Loads timm: import it from here.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cait.data import AugmentConfig, ImageFolderDataset, build_datasets, collate_samples, load_image
from cait.data.decode import DeviceAugment, ResizedCrop, open_image
from cait.data.transforms import device_augment, fast_train_transform, train_transform
from cait.models.registry import InputSpec, get_variant

__all__ = [
    "StageResult",
    "decoder_table",
    "format_stage_table",
    "randaugment_op_table",
    "stage_breakdown",
]


@dataclass
class StageResult:
    """CPU milliseconds per image of each step, by transform, on one thread."""

    images: int
    rounds: int
    load_average: list[float]
    stages: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        return asdict(self)


_STAGE_NAMES = {
    "RandomResizedCropAndInterpolation": "crop+resize",
    "RandomHorizontalFlip": "flip",
    "RandAugment": "RandAugment",
    "MaybeToTensor": "to-tensor",
    "ToTensor": "to-tensor",
    "MaybePILToTensor": "to-tensor",
    "ToPlanarTensor": "to-tensor",
    "Normalize": "normalize",
    "RandomErasing": "erasing",
}


def _stage_transforms(spec: InputSpec, augment: AugmentConfig) -> dict[str, tuple]:
    """The transforms :func:`stage_breakdown` compares: (transform, batch step)."""
    fast = fast_train_transform
    dev = device_augment(spec, augment)
    plain = {"fast_ops": False}  # RandAugment by timm's kernels, as in today's
    return {
        "today": (train_transform(spec, augment), None),
        "pil-1-resize": (fast(spec, augment, draft=False, engine="pil", **plain), dev),
        "pil+gap3": (
            fast(spec, augment, draft=False, engine="pil", reducing_gap=3.0, **plain),
            dev,
        ),
        "torch-resize": (fast(spec, augment, draft=False, decoder="pil", **plain), dev),
        "torch+draft": (fast(spec, augment, decoder="pil", **plain), dev),
        "simplejpeg": (fast(spec, augment, **plain), dev),
        "+fast-ops": (fast(spec, augment), dev),
        "crop+flip": (fast(spec, augment, randaugment=False), DeviceAugment(spec.mean, spec.std)),
    }


# This thread's CPU time: the steps' own cost, which other processes on a shared machine
# change far less than they change the wall clock.
_cpu = time.thread_time


def _run_stages(path: Path, transform: Callable, clock: dict[str, float]) -> torch.Tensor:
    """One image through ``transform`` step by step, adding each step's seconds to ``clock``."""
    steps = transform.transforms
    start = _cpu()
    if isinstance(steps[0], ResizedCrop):  # decoding happens in the crop step: split it
        img, box = steps[0].plan(open_image(path))
        img = steps[0].decode(img, box)
        clock["decode"] += _cpu() - start
        start = _cpu()
        img = steps[0].resize(img, box)
        clock["crop+resize"] += _cpu() - start
    else:
        img = load_image(path)
        clock["decode"] += _cpu() - start
        start = _cpu()
        img = steps[0](img)
        clock["crop+resize"] += _cpu() - start
    for step in steps[1:]:
        start = _cpu()
        img = step(img)
        name = _STAGE_NAMES.get(type(step).__name__, type(step).__name__)
        clock[name] = clock.get(name, 0.0) + _cpu() - start
    return img


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _time_batch(
    paths: Sequence[Path], transform: Callable, step: Callable | None, clock: dict[str, float]
) -> None:
    """One batch through ``transform``, collation and the batch ``step``, timed by step."""
    out = [(_run_stages(p, transform, clock), 0, ()) for p in paths]
    start = _cpu()
    batch = collate_samples(out)[0]
    clock["collate"] = clock.get("collate", 0.0) + _cpu() - start
    if step is not None:
        start = _cpu()
        step(batch)
        clock["device step"] = clock.get("device step", 0.0) + _cpu() - start


def stage_breakdown(
    data: str,
    model: str = "cait_xxs24_224",
    images: int = 256,
    rounds: int = 3,
    batch_size: int = 32,
) -> StageResult:
    """CPU milliseconds per image of each step (decode, crop+resize, flip, RandAugment,
    to-tensor, normalize, erasing, collate, device step) of today's training transform and
    of the fast path's variants, on ``images`` training files, in this thread (``torch``
    on one thread), the transforms taking turns batch by batch."""
    torch.set_num_threads(1)
    spec = get_variant(model).input_spec
    train, _, _ = build_datasets(data, None, None)
    if not isinstance(train, ImageFolderDataset):
        raise ValueError(f"--stages reads the files of a folder, not {data}")
    chosen = random.Random(0).sample(train.samples, min(images, len(train.samples)))
    paths = [p for p, _ in chosen]
    transforms = _stage_transforms(spec, AugmentConfig())
    clocks = {name: {"decode": 0.0, "crop+resize": 0.0} for name in transforms}
    load = [os.getloadavg()[0]]
    names = list(transforms)
    for r in range(rounds):
        for i in range(0, len(paths), batch_size):
            # the transforms take turns batch by batch, each drawing the same crops and ops
            turn = (i // batch_size) % len(names)
            for name in names[turn:] + names[:turn]:
                _seed_all(r * len(paths) + i)
                _time_batch(paths[i : i + batch_size], *transforms[name], clocks[name])
    load.append(os.getloadavg()[0])
    per_image = 1000 / (len(paths) * rounds)
    stages = {
        name: {
            **{k: v * per_image for k, v in clock.items()},
            "total": sum(clock.values()) * per_image,
        }
        for name, clock in clocks.items()
    }
    return StageResult(len(paths), rounds, load, stages)


def format_stage_table(result: StageResult) -> str:
    """Milliseconds per image, one column per transform, and images/s on one core."""
    names = list(result.stages)
    steps = list(dict.fromkeys(k for s in result.stages.values() for k in s if k != "total"))
    lines = [
        f"CPU ms per image, {result.images} images x {result.rounds} rounds, one thread, load "
        f"average " + " -> ".join(f"{x:.2f}" for x in result.load_average),
        f"{'step':<14}" + "".join(f"{n:>14}" for n in names),
    ]
    for step in [*steps, "total"]:
        lines.append(
            f"{step:<14}" + "".join(f"{result.stages[n].get(step, 0.0):>14.2f}" for n in names)
        )
    lines.append(
        f"{'img/s/core':<14}" + "".join(f"{1000 / result.stages[n]['total']:>14.1f}" for n in names)
    )
    return "\n".join(lines)


def _decoders() -> dict[str, Callable[[bytes], np.ndarray]]:
    """Each JPEG decoder there is here, bytes to a ``(H, W, 3)`` uint8 array."""
    import io
    import warnings

    def pil(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    found: dict[str, Callable[[bytes], np.ndarray]] = {"pil": pil}
    try:
        import simplejpeg

        for name, fast in (("", {}), ("+fastdct", {"fastdct": True})):
            for up, more in (("", {}), ("+fastupsample", {"fastupsample": True})):
                options = {**fast, **more}
                found[f"simplejpeg{name}{up}"] = lambda d, o=options: simplejpeg.decode_jpeg(d, **o)
    except ImportError:
        pass
    try:
        from torchvision.io import decode_jpeg

        def tv(data: bytes) -> np.ndarray:
            with warnings.catch_warnings():  # deprecated since torchvision 0.29
                warnings.simplefilter("ignore")
                raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return decode_jpeg(raw).permute(1, 2, 0).numpy()

        found["torchvision.io"] = tv
    except ImportError:
        pass
    return found


def decoder_table(data: str, images: int = 300, rounds: int = 3) -> str:
    """CPU milliseconds per image of decoding ``images`` training JPEGs of folder ``data``
    whole (bytes in memory, one thread) by each decoder there is, the decoders taking
    turns round by round, and each one's largest and mean difference from PIL's pixels."""
    train, _, _ = build_datasets(data, None, None)
    if not isinstance(train, ImageFolderDataset):
        raise ValueError(f"the decoder table reads the files of a folder, not {data}")
    chosen = random.Random(0).sample(train.samples, min(images, len(train.samples)))
    blobs = [Path(p).read_bytes() for p, _ in chosen]
    decoders = _decoders()
    seconds = dict.fromkeys(decoders, 0.0)
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        names = list(decoders)[r % len(decoders) :] + list(decoders)[: r % len(decoders)]
        for name in names:
            start = _cpu()
            for blob in blobs:
                decoders[name](blob)
            seconds[name] += _cpu() - start
    load.append(os.getloadavg()[0])
    lines = [
        f"decode whole, {len(blobs)} files x {rounds} rounds, one thread, load average "
        + " -> ".join(f"{x:.2f}" for x in load),
        f"{'decoder':<32}{'ms/image':>9}{'max diff':>10}{'mean diff':>11}",
    ]
    reference = [decoders["pil"](b).astype(np.int16) for b in blobs[:100]]
    for name, spent in seconds.items():
        diffs = [
            np.abs(decoders[name](b).astype(np.int16) - ref)
            for b, ref in zip(blobs[:100], reference, strict=True)
        ]
        lines.append(
            f"{name:<32}{1000 * spent / (len(blobs) * rounds):>9.3f}"
            f"{max(int(d.max()) for d in diffs):>10}{np.mean([d.mean() for d in diffs]):>11.3f}"
        )
    return "\n".join(lines)


def randaugment_op_table(data: str, images: int = 100, rounds: int = 4) -> str:
    """CPU milliseconds of each RandAugment op of the recipe on ``images`` 224 x 224 crops
    of folder ``data``'s training files (one thread), by timm's kernel and by the fast
    training transform's (:mod:`cait.data.randaugment` where it has one), taking turns."""
    train, _, _ = build_datasets(data, None, None)
    if not isinstance(train, ImageFolderDataset):
        raise ValueError(f"the op table reads the files of a folder, not {data}")
    chosen = random.Random(0).sample(train.samples, min(images, len(train.samples)))
    crops = [load_image(p).resize((224, 224), Image.Resampling.BICUBIC) for p, _ in chosen]
    spec, augment = get_variant("cait_xxs24_224").input_spec, AugmentConfig()
    timm_ops = _randaugment(train_transform(spec, augment)).ops
    fast_ops = _randaugment(fast_train_transform(spec, augment)).ops
    seconds = {(op.name, which): 0.0 for op in timm_ops for which in ("timm", "fast")}
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for theirs, ours in zip(timm_ops, fast_ops, strict=True):
            for which, op in (("timm", theirs), ("fast", ours))[:: 1 if r % 2 else -1]:
                random.seed(r)
                start = _cpu()
                level = op.level_fn(op.magnitude, op.hparams) if op.level_fn else ()
                for crop in crops:
                    op.aug_fn(crop, *level, **op.kwargs)
                seconds[op.name, which] += _cpu() - start
    load.append(os.getloadavg()[0])
    per_call = 1000 / (len(crops) * rounds)
    lines = [
        f"RandAugment ops at magnitude {timm_ops[0].magnitude}, {len(crops)} crops x {rounds} "
        "rounds, one thread, load average " + " -> ".join(f"{x:.2f}" for x in load),
        f"{'op':<22}{'timm ms':>9}{'fast ms':>9}",
    ]
    for op in timm_ops:
        timm_ms, fast_ms = seconds[op.name, "timm"] * per_call, seconds[op.name, "fast"] * per_call
        lines.append(f"{op.name:<22}{timm_ms:>9.3f}{fast_ms:>9.3f}")
    share = 2 * timm_ops[0].prob / len(timm_ops)  # two ops drawn, each run with prob
    for which in ("timm", "fast"):
        mean = share * sum(v for (_, w), v in seconds.items() if w == which) * per_call
        lines.append(f"expected per image ({which}): {mean:.3f} ms")
    return "\n".join(lines)


def _randaugment(transform: Callable) -> Any:
    """The RandAugment step of a timm transform."""
    return next(t for t in transform.transforms if type(t).__name__ == "RandAugment")
