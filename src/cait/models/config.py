"""The model configuration: one frozen, validated dataclass.

Only the model takes a config; layers take explicit arguments. The fields are the paper's
architecture plus the ablation knobs of its Section 2 and Section 3 (residual-branch scaling,
talking heads, where the class token enters, pooling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from cait.schema import check_fields, reject_unknown

__all__ = [
    "ATTN_IMPLS",
    "CAIT_CROP_PCT",
    "DEIT_CROP_PCT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InputSpec",
    "pretrained_cfg",
    "BRANCH_SCALES",
    "CLASS_TOKEN_POSITIONS",
    "AttnImpl",
    "BranchScale",
    "CaiTConfig",
    "ClassTokenPosition",
    "default_input_spec",
    "DROP_PATH_SCHEDULES",
    "DropPathSchedule",
    "POOLINGS",
    "Pooling",
]

# Each closed set of choices is defined once, as the Literal that annotates its field; the
# tuples are its values (layers check their arguments against them).
BranchScale = Literal["layerscale", "none", "rezero", "skipinit", "fixup"]
ClassTokenPosition = Literal["late", "early"]
Pooling = Literal["token", "avg"]
DropPathSchedule = Literal["uniform", "linear"]
# How talking heads are computed (see ``cait.models.layers.TalkingHeadAttention``); same maths.
AttnImpl = Literal["fast", "plain", "recompute"]

BRANCH_SCALES: tuple[str, ...] = get_args(BranchScale)
CLASS_TOKEN_POSITIONS: tuple[str, ...] = get_args(ClassTokenPosition)
POOLINGS: tuple[str, ...] = get_args(Pooling)
DROP_PATH_SCHEDULES: tuple[str, ...] = get_args(DropPathSchedule)
ATTN_IMPLS: tuple[str, ...] = get_args(AttnImpl)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Evaluation crop ratios: CaiT models are evaluated on the full resized image (crop 1.0,
# README_cait.md); DeiT models use the classic 0.875 center crop (DeiT main.py).
CAIT_CROP_PCT = 1.0
DEIT_CROP_PCT = 0.875


@dataclass(frozen=True)
class InputSpec:
    """What a model expects of its input images: side length, the eval crop ratio (resize
    to ``img_size / crop_pct``, then center-crop), the resize interpolation and the
    per-channel normalisation. Each variant carries one; checkpoints record it."""

    img_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def replace(self, **changes: Any) -> InputSpec:
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in changes.items()}
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        """From :meth:`to_dict`'s output (lists, as JSON and YAML give them, become tuples)."""
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})


def _check_rate(field: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{field} must be in [0, 1), got {value}")


@dataclass(frozen=True)
class CaiTConfig:
    """Architecture of a CaiT model (and of the ViT/DeiT models the knobs can express).

    Defaults are CaiT-S24 at 224 (paper Table 3). ``depth`` counts the self-attention (SA)
    blocks over patch tokens; ``ca_depth`` counts the class-attention (CA) blocks, the
    paper's ``depth_token_only`` (2 in every released model, Section 3).

    Ablation knobs (paper Figure 1 and Section 4.1):

    - ``branch_scale``: how each residual branch is scaled before it is added.
      ``layerscale`` (Fig. 1d): ``x + diag(gamma) * F(norm(x))``, gamma a vector initialised
      to ``init_scale``; ``none`` (Fig. 1a, ViT/DeiT): ``x + F(norm(x))``; ``rezero``
      (Fig. 1b, ReZero): ``x + alpha * F(x)``, alpha a scalar initialised to 0, no norm;
      ``skipinit`` (Fig. 1b, SkipInit-style): like ``rezero`` but alpha starts at
      ``init_scale``; ``fixup`` (Fig. 1c): ``x + alpha * F(norm(x))``, a scalar alpha
      initialised to ``init_scale`` with the pre-norm kept (the block weights keep the
      default init, hence "fixup-style").
    - ``talking_heads``: mix heads before and after the softmax in the SA blocks
      (Shazeer et al. 2020; paper Section 3). Class attention never uses it.
    - ``class_token``: ``late`` (CaiT, a class-attention stage of ``ca_depth`` blocks after
      the SA stage) or ``early`` (ViT/DeiT: the class token is concatenated at the input,
      has its own position-embedding slot and goes through every SA block; ``ca_depth``
      must be 0).
    - ``pooling``: ``token`` reads the class token; ``avg`` averages the patch tokens. With
      ``class_token="late"`` average pooling means no class token at all, so ``ca_depth``
      must be 0.
    - ``distilled``: a second learned token, the distillation token, with its own head
      ``head_dist`` (DeiT). With ``class_token="late"`` it enters the class-attention stage
      beside the class token: both query ``[cls, dist, patches]`` and both are updated by
      the CA blocks. This design is ours: the released CaiT code has no distillation token.
      With ``class_token="early"`` it is DeiT's layout (second position slot).

    Implementation choices (same maths, not architecture): ``fused_attn`` uses PyTorch's
    fused attention where there are no talking heads (class attention, ViT/DeiT);
    ``attn_impl`` picks the talking-heads computation: ``fast`` (contiguous head mixing),
    ``plain`` (the reference structure) or ``recompute`` (keeps no ``(B, H, N, N)`` tensor
    for the backward pass, which recomputes the attention, to train at larger batches).
    Configs saved before ``attn_impl`` existed load with the default.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 24
    num_heads: int = 8
    ca_depth: int = 2
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    branch_scale: BranchScale = "layerscale"
    init_scale: float = 1e-5
    talking_heads: bool = True
    class_token: ClassTokenPosition = "late"
    pooling: Pooling = "token"
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_path_schedule: DropPathSchedule = "uniform"
    fused_attn: bool = True
    distilled: bool = False
    attn_impl: AttnImpl = "fast"

    def __post_init__(self) -> None:
        check_fields(self)  # types, and the Literal choices
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.ca_depth < 0:
            raise ValueError(f"ca_depth must be >= 0, got {self.ca_depth}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size must be a multiple of patch_size={self.patch_size}, got {self.img_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads={self.num_heads}, got {self.embed_dim}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.init_scale < 0:
            raise ValueError(f"init_scale must be >= 0, got {self.init_scale}")
        if self.attn_impl == "recompute" and self.attn_drop_rate > 0.0:
            raise ValueError(
                "attn_impl='recompute' keeps no dropout mask: attn_drop_rate must be 0, "
                f"got {self.attn_drop_rate}"
            )
        for name in ("drop_rate", "pos_drop_rate", "attn_drop_rate", "drop_path_rate"):
            _check_rate(name, getattr(self, name))
        if self.class_token == "early" and self.ca_depth:
            raise ValueError(
                f"class_token='early' carries the class token through the SA blocks, so "
                f"ca_depth must be 0, got {self.ca_depth}"
            )
        if self.class_token == "late" and self.pooling == "token" and not self.ca_depth:
            raise ValueError(
                "class_token='late' with pooling='token' needs a class-attention stage: "
                f"ca_depth must be >= 1, got {self.ca_depth}"
            )
        if self.distilled and self.pooling != "token":
            raise ValueError(
                "distilled=True reads the class and distillation tokens: pooling must be "
                f"'token', got {self.pooling!r}"
            )
        if self.class_token == "late" and self.pooling == "avg" and self.ca_depth:
            raise ValueError(
                "pooling='avg' ignores the class token, so a late class-attention stage would "
                f"be unused: ca_depth must be 0, got {self.ca_depth}"
            )

    @property
    def num_class_tokens(self) -> int:
        """Class token plus distillation token (0 without class token)."""
        return (1 + int(self.distilled)) if self.has_class_token else 0

    @property
    def grid_size(self) -> int:
        """Patches per side at the configured resolution."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def has_class_token(self) -> bool:
        return self.class_token == "early" or self.pooling == "token"

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the SA stage (they also own a pos-embed slot)."""
        return self.num_class_tokens if self.class_token == "early" else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaiTConfig:
        """The config of a plain dict (checkpoint metadata): unknown fields raise, and the
        values must have their declared types already (nothing is converted)."""
        reject_unknown(cls, data, what="CaiTConfig fields")
        return cls(**data)

    def replace(self, **overrides: Any) -> CaiTConfig:
        """A copy with ``overrides`` applied; unknown field names raise ``ValueError``."""
        reject_unknown(type(self), overrides, what="CaiTConfig fields")
        return dataclasses.replace(self, **overrides)


def default_input_spec(config: CaiTConfig) -> InputSpec:
    """The input spec of a model known only by its config: ImageNet statistics, bicubic
    resizing and the crop of its family (1.0 for CaiT, 0.875 for ViT/DeiT)."""
    crop = DEIT_CROP_PCT if config.class_token == "early" else CAIT_CROP_PCT
    return InputSpec(config.img_size, crop, "bicubic", IMAGENET_MEAN, IMAGENET_STD)


def pretrained_cfg(
    config: CaiTConfig,
    spec: InputSpec | None = None,
    *,
    architecture: str | None = None,
    url: str | None = None,
    hf_hub_id: str | None = None,
) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of a model: what ``timm.data.resolve_data_config`` reads
    (input size, crop, interpolation, mean, std), the names of the first conv and of the
    classifier(s), the class count and where the weights are. ``spec`` defaults to
    :func:`default_input_spec`. Position embeddings are resized to any input that the
    patch size divides, so the input size is not fixed."""
    spec = spec or default_input_spec(config)
    size = (config.in_chans, spec.img_size, spec.img_size)
    classifier: str | tuple[str, str] = ("head", "head_dist") if config.distilled else "head"
    return {
        "architecture": architecture,
        "url": url or "",
        "hf_hub_id": hf_hub_id,
        "num_classes": config.num_classes,
        "input_size": size,
        "fixed_input_size": False,
        "pool_size": None,
        "crop_pct": spec.crop_pct,
        "crop_mode": "center",
        "interpolation": spec.interpolation,
        "mean": tuple(spec.mean),
        "std": tuple(spec.std),
        "first_conv": "patch_embed.proj",
        "classifier": classifier,
        "license": "apache-2.0",
    }
