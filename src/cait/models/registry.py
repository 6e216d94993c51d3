"""The variant table: every model name maps to its config and its weight metadata.

Variants are data. The ten released CaiT models are spelled exactly as timm spells them;
their sizes, LayerScale init, resolutions and reported top-1 come from the paper (Table 3)
and timm's model cards (``../shared/CAIT_FACTS.md``). DeiT-Ti/S are rows expressed with the
ablation knobs, and a few small variants serve CPU work and the demos.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Any

import torch

from cait.models.cait import CaiT, GlobalPool
from cait.models.config import (
    CAIT_CROP_PCT,
    DEIT_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CaiTConfig,
    InputSpec,
    pretrained_cfg,
)
from cait.models.pretrained import load_pretrained

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InputSpec",
    "Variant",
    "create_model",
    "get_variant",
    "layerscale_init_for_depth",
    "list_models",
    "parameter_count_m",
    "register_variant",
    "variant_rows",
    "variant_table",
]

_OFFICIAL_URL = "https://dl.fbaipublicfiles.com/deit/{}.pth"


def layerscale_init_for_depth(depth: int) -> float:
    """The paper's rule for the LayerScale init epsilon (Section 2.2).

    0.1 up to depth 18, 1e-5 at depth 24, 1e-6 deeper. (The released XXS-36 models use
    1e-5, the table below keeps what the weights were trained with.)
    """
    if depth <= 18:
        return 0.1
    if depth <= 24:
        return 1e-5
    return 1e-6


@dataclass(frozen=True)
class Variant:
    """One row of the table: a named config plus where its weights are and how to use them.

    ``top1`` is the reported ImageNet-1k top-1 (timm evaluation), ``params_m`` the parameter
    count in millions and ``gmacs`` the multiply-accumulates per image at ``config.img_size``.
    """

    name: str
    config: CaiTConfig
    url: str | None = None
    hf_hub_id: str | None = None
    top1: float | None = None
    params_m: float | None = None
    gmacs: float | None = None
    crop_pct: float = CAIT_CROP_PCT
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""

    @property
    def img_size(self) -> int:
        return self.config.img_size

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(self.img_size, self.crop_pct, self.interpolation, self.mean, self.std)

    def pretrained_cfg(self, config: CaiTConfig | None = None) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` for this variant, built with ``config`` (the variant's
        own by default; a model built with overrides passes its own, for its input size and
        class count)."""
        config = config or self.config
        return pretrained_cfg(
            config,
            self.input_spec.replace(img_size=config.img_size),
            architecture=self.name,
            url=self.url,
            hf_hub_id=self.hf_hub_id,
        )


_VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Add a row to the table; a name that is already taken raises ``ValueError``."""
    if variant.name in _VARIANTS:
        raise ValueError(f"a variant named {variant.name!r} is already registered")
    _VARIANTS[variant.name] = variant
    return variant


# name, embed dim, SA depth, heads, resolution, LayerScale init, official file, top-1,
# params (M), GMACs. All: patch 16, head dim 48, 2 class-attention blocks, distilled weights.
_RELEASED_CAIT = [
    ("cait_xxs24_224", 192, 24, 4, 224, 1e-5, "XXS24_224", 78.40, 11.96, 2.53),
    ("cait_xxs24_384", 192, 24, 4, 384, 1e-5, "XXS24_384", 80.95, 12.03, 9.63),
    ("cait_xxs36_224", 192, 36, 4, 224, 1e-5, "XXS36_224", 79.75, 17.30, 3.77),
    ("cait_xxs36_384", 192, 36, 4, 384, 1e-5, "XXS36_384", 82.20, 17.37, 14.35),
    ("cait_xs24_384", 288, 24, 6, 384, 1e-5, "XS24_384", 84.06, 26.67, 19.28),
    ("cait_s24_224", 384, 24, 8, 224, 1e-5, "S24_224", 83.48, 46.92, 9.35),
    ("cait_s24_384", 384, 24, 8, 384, 1e-5, "S24_384", 85.05, 47.06, 32.17),
    ("cait_s36_384", 384, 36, 8, 384, 1e-6, "S36_384", 85.46, 68.37, 47.99),
    ("cait_m36_384", 768, 36, 16, 384, 1e-6, "M36_384", 86.06, 271.22, 173.11),
    ("cait_m48_448", 768, 48, 16, 448, 1e-6, "M48_448", 86.48, 356.46, 329.41),
]
for _name, _dim, _depth, _heads, _img, _eps, _file, _top1, _params, _gmacs in _RELEASED_CAIT:
    register_variant(
        Variant(
            name=_name,
            config=CaiTConfig(
                img_size=_img,
                patch_size=16,
                embed_dim=_dim,
                depth=_depth,
                num_heads=_heads,
                ca_depth=2,
                init_scale=_eps,
            ),
            url=_OFFICIAL_URL.format(_file),
            hf_hub_id=f"timm/{_name}.fb_dist_in1k",
            top1=_top1,
            params_m=_params,
            gmacs=_gmacs,
            description="released CaiT, distilled from RegNetY-16GF on ImageNet-1k",
        )
    )

# DeiT (Touvron et al. 2021) as a row of knobs: class token at the input with its own
# position slot, plain pre-norm residuals, no talking heads, no class-attention stage.
# name, embed dim, heads, official file, top-1, params (M), GMACs, distillation token
_DEIT = [
    ("deit_tiny_patch16_224", 192, 3, "deit_tiny_patch16_224-a1311bcf", 72.2, 5.72, 1.26, False),
    ("deit_small_patch16_224", 384, 6, "deit_small_patch16_224-cd65a155", 79.9, 22.05, 4.61, False),
    (
        "deit_tiny_distilled_patch16_224",
        192,
        3,
        "deit_tiny_distilled_patch16_224-b40b3cf7",
        74.5,
        5.91,
        1.27,
        True,
    ),
    (
        "deit_small_distilled_patch16_224",
        384,
        6,
        "deit_small_distilled_patch16_224-649709d9",
        81.2,
        22.44,
        4.63,
        True,
    ),
]
for _name, _dim, _heads, _file, _top1, _params, _gmacs, _distilled in _DEIT:
    register_variant(
        Variant(
            name=_name,
            config=CaiTConfig(
                img_size=224,
                patch_size=16,
                embed_dim=_dim,
                depth=12,
                num_heads=_heads,
                ca_depth=0,
                branch_scale="none",
                talking_heads=False,
                class_token="early",
                distilled=_distilled,
            ),
            url=_OFFICIAL_URL.format(_file),
            hf_hub_id=f"timm/{_name}.fb_in1k",
            top1=_top1,
            params_m=_params,
            gmacs=_gmacs,
            crop_pct=DEIT_CROP_PCT,
            description="DeiT expressed with the ablation knobs"
            + (", with DeiT's distillation token" if _distilled else ""),
        )
    )

# Small CaiT models for CPU work on 32x32 inputs (patch 4: an 8x8 grid of 64 tokens). Head
# dim 48 as in the released models; LayerScale init by the paper's depth rule. No weights.
_SMALL = [
    ("cait_tiny_32", 96, 6, 2),
    ("cait_small_32", 192, 12, 4),
]
for _name, _dim, _depth, _heads in _SMALL:
    register_variant(
        Variant(
            name=_name,
            config=CaiTConfig(
                img_size=32,
                patch_size=4,
                num_classes=10,
                embed_dim=_dim,
                depth=_depth,
                num_heads=_heads,
                ca_depth=2,
                init_scale=layerscale_init_for_depth(_depth),
            ),
            description="small CaiT for 32x32 inputs on the CPU (no released weights)",
        )
    )

# The demo model for the bundled digits (8x8 scans brought to 16x16): a 4x4 grid of 16
# tokens keeps a training epoch short on a CPU (docs/BENCHMARKS.md). Grayscale digits are fed as
# 3 equal channels, normalised with mean/std 0.5.
register_variant(
    Variant(
        name="cait_digits_16",
        config=CaiTConfig(
            img_size=16,
            patch_size=4,
            num_classes=10,
            embed_dim=96,
            depth=6,
            num_heads=2,
            ca_depth=2,
            init_scale=layerscale_init_for_depth(6),
        ),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        description="the demo CaiT for the bundled 8x8 digits at 16x16 (no released weights)",
    )
)


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _VARIANTS if fnmatch.fnmatch(n, pattern))


def get_variant(name: str) -> Variant:
    """The table row for ``name``; an unknown name raises ``ValueError`` with suggestions."""
    try:
        return _VARIANTS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_VARIANTS), n=3)
        hint = f"; did you mean {close}?" if close else f"; known: {list_models()}"
        raise ValueError(f"unknown model {name!r}{hint}") from None


def create_model(
    name: str,
    pretrained: bool | str = False,
    global_pool: GlobalPool | None = None,
    **overrides: Any,
) -> CaiT:
    """Build a variant, with config fields overridden by keyword.

    ``pretrained=True`` loads the variant's released weights (needs the network, or the
    file in torch hub's cache); a string is any source :func:`cait.load_pretrained` takes.
    ``global_pool`` is timm's (``token``, ``avg`` or ``""``; the config's pooling by
    default). The model's ``pretrained_cfg`` is the variant's, at the model's input size.
    """
    variant = get_variant(name)
    model = CaiT(variant.config.replace(**overrides), global_pool=global_pool)
    model.pretrained_cfg = variant.pretrained_cfg(model.config)
    if pretrained:
        if isinstance(pretrained, str):
            source = pretrained
        elif variant.url is not None:
            source = variant.url
        else:
            raise ValueError(f"{name!r} has no released weights")
        load_pretrained(model, source)
    return model


def parameter_count_m(variant: Variant) -> float:
    """The variant's parameter count in millions: the table's figure, or counted on a model
    built on the meta device (no memory, milliseconds) for rows that have none."""
    if variant.params_m is not None:
        return variant.params_m
    with torch.device("meta"):
        model = CaiT(variant.config)
    return sum(p.numel() for p in model.parameters()) / 1e6


# The columns of `cait models` and of README.md's variant table, in order: heading, value.
_COLUMNS: list[tuple[str, str]] = [
    ("name", "name"),
    ("embed dim", "embed_dim"),
    ("SA depth", "depth"),
    ("heads", "heads"),
    ("img", "img_size"),
    ("LayerScale ε", "init_scale"),
    ("params", "params_m"),
    ("top-1", "top1"),
]
_NONE = "–"  # an empty cell: no LayerScale (DeiT), no reported top-1 (no released weights)


def variant_rows(pattern: str = "*") -> list[dict[str, Any]]:
    """One dict per variant matching ``pattern``, in the table's order: its name, sizes,
    LayerScale ε (None without LayerScale), parameters in millions (counted where the table
    has no figure), reported top-1, crop ratio and weights URL."""
    rows = []
    for name, v in _VARIANTS.items():
        if not fnmatch.fnmatch(name, pattern):
            continue
        c = v.config
        rows.append(
            {
                "name": name,
                "img_size": c.img_size,
                "embed_dim": c.embed_dim,
                "depth": c.depth,
                "heads": c.num_heads,
                "init_scale": c.init_scale if c.branch_scale == "layerscale" else None,
                "params_m": round(parameter_count_m(v), 2),
                "top1": v.top1,
                "crop_pct": v.crop_pct,
                "url": v.url,
            }
        )
    return rows


def _cell(key: str, value: Any) -> str:
    if value is None:
        return _NONE
    if key == "init_scale":  # 1e-05 -> 1e-5, as the paper writes it
        return re.sub(r"e-0*(\d)", r"e-\1", f"{value:g}")
    if key == "params_m":
        return f"{value:.2f}M"
    if key == "top1":
        return f"{value:.2f}"  # timm's figures have two decimals (DeiT's paper one: 72.2)
    return str(value)


def variant_table(pattern: str = "*", markdown: bool = False) -> str:
    """The variant table (README.md's, and what ``cait models`` prints): one row per variant
    matching ``pattern`` in the table's order, with the columns of :data:`_COLUMNS`. As plain
    text the columns are aligned (names left, numbers right); ``markdown`` gives a Markdown
    table. No trailing newline."""
    header = [heading for heading, _ in _COLUMNS]
    body = [[_cell(key, row[key]) for _, key in _COLUMNS] for row in variant_rows(pattern)]
    if markdown:
        rows = ["| " + " | ".join(cells) + " |" for cells in [header, *body]]
        return "\n".join([rows[0], "|---" * len(header) + "|", *rows[1:]])
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    lines = []
    for cells in [header, *body]:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        lines.append("  ".join([first, *rest]).rstrip())
    return "\n".join(lines)
