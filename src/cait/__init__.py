"""CaiT: Class-Attention in Image Transformers (Touvron et al., ICCV 2021) in PyTorch.

The package in five wings, imports pointing one way (a test keeps it so):
``kernels`` <- ``models`` <- ``data`` <- ``training`` <- ``analysis``, ``inference``,
``bench`` <- ``cli``; see the README's "Layout" section. ``import cait`` loads nothing
heavy: the names below load the model side (and torch) on first use; training is
``cait.training.train`` (it imports timm's data pipeline).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from cait.models import (
        CaiT,
        CaiTConfig,
        InputSpec,
        Intermediates,
        LoadReport,
        ModelTrace,
        Variant,
        convert_checkpoint,
        create_model,
        get_variant,
        list_models,
        load_pretrained,
        read_state_dict,
        register_variant,
        resample_pos_embed,
    )


__version__ = "0.1.0"

__all__ = [
    "CaiT",
    "CaiTConfig",
    "InputSpec",
    "Intermediates",
    "LoadReport",
    "ModelTrace",
    "Variant",
    "convert_checkpoint",
    "create_model",
    "get_variant",
    "list_models",
    "load_pretrained",
    "read_state_dict",
    "register_variant",
    "resample_pos_embed",
]


def __getattr__(name: str) -> Any:
    """The public names load ``cait.models`` (and torch) on first use (PEP 562), so that
    ``import cait`` and ``cait --help`` cost no torch, and a Ctrl-C while starting is caught
    by the command line instead of ending in a traceback from torch's import."""
    if name in __all__:
        value = getattr(importlib.import_module("cait.models"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cait' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
