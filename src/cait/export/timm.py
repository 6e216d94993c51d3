"""The ``timm`` format: a folder in the Hugging Face Hub layout timm reads (``config.json`` and
``model.safetensors`` under timm's parameter names); the check builds timm's own model with
``timm.create_model("local-dir:FOLDER", pretrained=True)``. The mapping itself is
:mod:`cait.models.timm_interop`'s; timm is imported only when the check runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cait.export.job import ExportError, ExportJob
from cait.files import error_line
from cait.models.cait import CaiT
from cait.models.hub import HUB_CONFIG, HUB_WEIGHTS
from cait.models.timm_interop import (
    OTHER_FORMATS_HINT,
    timm_from_folder,
    timm_hub_config,
    timm_state_dict,
    write_hub_folder,
)

__all__ = ["TIMM_FOLDER_FILES", "load_timm", "write_timm"]

# What a timm export folder holds: all that an earlier export may be replaced with.
TIMM_FOLDER_FILES = frozenset({HUB_CONFIG, HUB_WEIGHTS})


def write_timm(job: ExportJob, folder: Path) -> dict[str, Any]:
    """Write ``job.model`` into ``folder`` as timm's model; returns timm's architecture."""
    model = job.model
    if not isinstance(model, CaiT):
        raise ExportError(
            f"the timm format maps cait models to timm's; {type(model).__name__} is not one: "
            f"{OTHER_FORMATS_HINT}"
        )
    config = timm_hub_config(
        model, job.input_spec, job.label_names, job.label_descriptions, job.dynamic_size
    )
    write_hub_folder(folder, config, timm_state_dict(model))
    return {"architecture": config["architecture"]}


def load_timm(folder: Path) -> nn.Module:
    """timm's own model built from ``folder``."""
    try:
        return timm_from_folder(folder)
    except Exception as err:  # timm's own checks (missing keys, arguments) end here
        raise ExportError(f"timm could not build the exported folder ({error_line(err)})") from err
