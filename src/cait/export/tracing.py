"""What the formats that trace the model (ONNX, torch.export) share: the example input, its
free dimensions, and torch.export's switch for symbolic image sizes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from cait.export.job import ExportJob

__all__ = ["example_and_shapes", "size_oblivious"]

# The seed of the traced example's images.
_SEED = 0


def example_and_shapes(job: ExportJob) -> tuple[Tensor, dict[int, Any]]:
    """The traced example ``(B, C, H, W)`` and its dynamic dimensions: the batch, and with
    ``dynamic_size`` height and width as multiples of the patch size.

    With ``dynamic_size`` the example is one patch larger than the model's own size, so
    that the trace takes the path that resizes the position embeddings; the checks run at
    the model's size (where the eager model skips the resize) and at a size never traced
    (:func:`cait.export.parity.check_sizes`).
    """
    from torch.export import Dim

    side = job.input_spec.img_size
    shapes: dict[int, Any] = {0: Dim("batch", min=1)}
    if job.dynamic_size:
        p = job.patch_size()
        shapes[2] = p * Dim("rows", min=1)
        shapes[3] = p * Dim("cols", min=1)
        side += p
    generator = torch.Generator().manual_seed(_SEED)
    example = torch.randn(job.batch, job.in_chans, side, side, generator=generator)
    return example, shapes


@contextmanager
def size_oblivious(enable: bool) -> Iterator[None]:
    """With symbolic image sizes, torch.export reasons about sizes "obliviously": it no
    longer assumes a symbolic size is not 1 where a tensor's layout would differ at 1
    (torch's 0/1 specialisation). Without it, a program traced at batch 2 with free height
    and width carries guards that reject batch 1 when it runs."""
    if not enable:
        yield
        return
    from torch.fx.experimental import _config as fx_config  # torch's switch for this

    with fx_config.patch(backed_size_oblivious=True):
        yield
