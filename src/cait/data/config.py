"""The data and augmentation configs: plain, validated settings with no image library behind them
(the transforms that read it are in :mod:`cait.data.transforms`), so that a training config
and the command line's help can be built without importing timm or torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cait.schema import check_fields

__all__ = ["AugmentConfig", "DataConfig", "EraseMode", "MixupMode"]


# timm's modes: RandomErasing fills with a constant, a random colour per box or random
# pixels; Mixup draws one mixing factor per batch, per pair or per element.
EraseMode = Literal["const", "rand", "pixel"]
MixupMode = Literal["batch", "pair", "elem"]


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation, DeiT/CaiT recipe defaults (DeiT main.py), via timm's utilities."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.3
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    re_mode: EraseMode = "pixel"
    re_count: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: MixupMode = "batch"
    label_smoothing: float = 0.1
    repeated_aug: int = 3

    def __post_init__(self) -> None:
        check_fields(self, "augment")
        for name in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {v}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"augment.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.repeated_aug < 1:
            raise ValueError(
                f"augment.repeated_aug must be >= 1 (1 = off), got {self.repeated_aug}"
            )
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("augment.mixup and augment.cutmix must be >= 0")

    @property
    def mixes(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are batched.

    ``batch_size`` is per process: the global batch is ``batch_size x processes``.
    ``path`` names a source (:mod:`cait.data.sources`): ``digits`` (scikit-learn's bundled
    handwritten digits), an ImageFolder root with ``train/<class>/*`` and ``val/<class>/*``,
    ``shards:DIR``, ``hf:DIR`` or ``list:FILE``. ``img_size``, ``crop_pct``,
    ``interpolation``, ``mean`` and ``std`` default to the model variant's.
    ``classes_by_position`` lets a resume, a teacher or ``init_from`` whose class names
    differ from the data's map the classes by index, with a warning, where it would be
    refused (:mod:`cait.data.classes`).
    """

    path: str = "digits"
    batch_size: int = 64
    workers: int = 0
    img_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes_by_position: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"data.crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(f"data.img_size must be >= 1 (or unset), got {self.img_size}")
        if self.interpolation is not None and not self.interpolation:
            raise ValueError("data.interpolation must be a mode such as bicubic (or unset)")
