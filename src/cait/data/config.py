"""The augmentation config: plain, validated settings with no image library behind them
(the transforms that read it are in :mod:`cait.data.transforms`), so that a training config
and the command line's help can be built without importing timm or torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cait.schema import check_fields

__all__ = ["AugmentConfig", "EraseMode", "MixupMode"]


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
