"""What every format's writer gets: the model and the export's options (:class:`ExportJob`),
and the error every step of an export raises (:class:`ExportError`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from cait.models.cait import CaiT
from cait.models.registry import InputSpec

__all__ = ["DEFAULT_EXAMPLE_BATCH", "ExportError", "ExportJob"]

# The batch of the traced example input: torch.export fixes a dimension it sees at 0 or 1.
DEFAULT_EXAMPLE_BATCH = 2


class ExportError(ValueError):
    """The exporter cannot express the model, or the exported model disagrees with it."""


@dataclass(frozen=True)
class ExportJob:
    """One export's model (in eval mode) and options, as a format's writer reads them.

    ``input_spec`` gives the image size of the example input and of the checks (and the
    preprocessing a format may record); ``batch`` is the traced example's batch size.
    ``dynamic_size`` leaves height and width free (multiples of the patch size); ``opset``
    is ONNX's. ``label_names`` and ``label_descriptions`` name the model's indices.
    ``quantize`` (``int8``) quantizes what is written (ONNX only).
    """

    model: nn.Module
    input_spec: InputSpec
    batch: int = DEFAULT_EXAMPLE_BATCH
    opset: int | None = None
    dynamic_size: bool = False
    label_names: Sequence[str] | None = None
    label_descriptions: Sequence[str] | None = None
    quantize: str | None = None

    @property
    def in_chans(self) -> int:
        """The model's input channels (a timm model's from its pretrained config)."""
        if isinstance(self.model, CaiT):
            return self.model.config.in_chans
        cfg = getattr(self.model, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return int(cfg["input_size"][0])
        return 3

    def patch_size(self) -> int:
        """The step that free heights and widths take; only cait models tell it, so
        :class:`ExportError` for any other."""
        if not isinstance(self.model, CaiT):
            raise ExportError(
                f"dynamic height and width are exported for cait models only, "
                f"not {type(self.model).__name__}"
            )
        return self.model.config.patch_size
