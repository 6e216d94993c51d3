"""CaiT: Class-Attention in Image Transformers (Touvron et al., ICCV 2021) in PyTorch.

The package in five wings, imports pointing one way (a test keeps it so):
``kernels`` <- ``models`` <- ``data`` <- ``training`` <- ``analysis``, ``inference``,
``bench`` <- ``cli``; see the README's "Layout" section. ``import cait`` loads the model
side only; training is ``cait.training.train`` (it imports timm's data pipeline).
"""

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
