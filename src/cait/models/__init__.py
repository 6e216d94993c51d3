"""What the paper defines: the config, the layers, the model, the variant table, its weights.

``registry`` holds the variants (each with its input spec), ``pretrained`` reads and loads
weights, ``weights_file`` is what a checkpoint holds (its metadata, ``.safetensors`` and
``.pt``), and ``build`` answers "give me the model for this name or checkpoint".
"""

from cait.models.build import (
    LoadedModel,
    build_model,
    convert_checkpoint,
    input_spec,
    load_for_inference,
)
from cait.models.cait import CaiT, Intermediates, ModelTrace
from cait.models.config import CaiTConfig
from cait.models.layers import BlockTrace, resample_pos_embed
from cait.models.pretrained import LoadReport, load_pretrained, read_state_dict
from cait.models.registry import (
    InputSpec,
    Variant,
    create_model,
    get_variant,
    list_models,
    register_variant,
)

__all__ = [
    "BlockTrace",
    "CaiT",
    "CaiTConfig",
    "InputSpec",
    "Intermediates",
    "ModelTrace",
    "LoadReport",
    "LoadedModel",
    "Variant",
    "build_model",
    "convert_checkpoint",
    "create_model",
    "get_variant",
    "input_spec",
    "list_models",
    "load_for_inference",
    "load_pretrained",
    "read_state_dict",
    "register_variant",
    "resample_pos_embed",
]
