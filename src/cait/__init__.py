"""CaiT: Class-Attention in Image Transformers (Touvron et al., ICCV 2021) in PyTorch."""

from cait.config import CaiTConfig
from cait.layers import resample_pos_embed
from cait.model import CaiT, Intermediates
from cait.variants import Variant, create_model, get_variant, list_models, register_variant
from cait.weights import LoadReport, convert_checkpoint, load_pretrained, read_state_dict

__version__ = "0.1.0"

__all__ = [
    "CaiT",
    "CaiTConfig",
    "Intermediates",
    "LoadReport",
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
