"""A frozen teacher for distillation: from timm, torchvision, or one of our checkpoints.

The teacher runs in eval mode without gradients and sees the student's batch re-normalised
with its own mean/std (and resized when its input size differs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cait.data.classes import check_class_names
from cait.models.build import TORCHVISION_PREFIX, load_for_inference, torchvision_model
from cait.models.pretrained import read_state_dict
from cait.models.registry import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from cait.models.timm_interop import is_timm, timm_input_spec, timm_model

__all__ = ["Teacher", "load_teacher"]

logger = logging.getLogger(__name__)


class Teacher(nn.Module):
    """Wraps a frozen classifier; ``forward`` takes student-normalised images."""

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        student_mean: tuple[float, ...],
        student_std: tuple[float, ...],
        img_size: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.img_size = img_size
        # x_teacher = (x_student * s_std + s_mean - t_mean) / t_std = x_student * scale + shift
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(mean), torch.tensor(std)
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer(
            "shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False
        )

    def train(self, mode: bool = True) -> Teacher:
        # the teacher stays in eval mode whatever the student does
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = x * self.scale + self.shift
        if self.img_size is not None and x.shape[-1] != self.img_size:
            x = F.interpolate(
                x,
                size=(self.img_size, self.img_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return self.model(x).float()


def _load_weights(model: nn.Module, weights: str | None, source: str) -> None:
    if weights is None:
        raise ValueError(
            f"teacher {source} needs a weights file (distill.teacher_weights); training from "
            "an untrained teacher would distil noise"
        )
    state_dict = read_state_dict(weights)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"teacher weights {weights} do not fit {source}: {err}") from err


def load_teacher(
    source: str,
    num_classes: int,
    student: InputSpec,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    class_names: Sequence[str] | None = None,
    by_position: bool = False,
) -> Teacher:
    """Build a frozen teacher and check that it predicts ``num_classes`` classes; a teacher
    of ours must also name them as the data does (``class_names``), else its classes would
    be permuted against the student's (``by_position`` takes that with a warning). timm and
    torchvision teachers name no classes."""
    teacher_names = None
    if is_timm(source):
        model = timm_model(source, num_classes=num_classes)
        _load_weights(model, weights, source)
        spec = timm_input_spec(source)  # timm's pretrained config (ImageNet statistics without one)
        mean, std, size = spec.mean, spec.std, None
    elif source.startswith(TORCHVISION_PREFIX):
        model = torchvision_model(source, num_classes=num_classes)
        _load_weights(model, weights, source)
        mean, std, size = IMAGENET_MEAN, IMAGENET_STD, None
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(f"teacher checkpoint not found: {source}")
        loaded = load_for_inference(source)
        model, teacher_names = loaded.model, loaded.folder_names
        s = loaded.settings
        mean, std, size = s.mean, s.std, s.img_size
    teacher = Teacher(model, mean, std, student.mean, student.std, img_size=size).to(device)
    with torch.no_grad():
        probe = torch.zeros(1, 3, student.img_size, student.img_size, device=device)
        out_classes = teacher(probe).shape[-1]
    if out_classes != num_classes:
        raise ValueError(
            f"the teacher {source} predicts {out_classes} classes, the data has {num_classes}"
        )
    if teacher_names is not None and class_names is not None:
        labels = ("the teacher", "the data")
        check_class_names(teacher_names, class_names, labels, f"teacher {source}", by_position)
    logger.info(
        "teacher %s: %.2fM parameters, frozen",
        source,
        sum(p.numel() for p in teacher.model.parameters()) / 1e6,
    )
    return teacher
