"""The CaiT model (Touvron et al., "Going deeper with Image Transformers", ICCV 2021).

Two stages (paper Section 3, Figure 2): self-attention blocks over the patch tokens only,
then a few class-attention blocks in which the class token summarises the frozen patches.
With the knobs of :class:`~cait.models.config.CaiTConfig` the same class also expresses ViT/DeiT
(class token early, no LayerScale, no talking heads) and the ablations of the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cait.models.config import CaiTConfig, pretrained_cfg
from cait.models.layers import (
    INIT_STD,
    LAYERNORM_EPS,
    BlockTrace,
    ClassAttentionBlock,
    PatchEmbed,
    SelfAttentionBlock,
    is_symbolic,
    patch_grid,
    resample_pos_embed,
)

__all__ = [
    "GLOBAL_POOLS",
    "CaiT",
    "GlobalPool",
    "Intermediates",
    "ModelTrace",
    "OutputFormat",
    "take_indices",
]

# How the head reads the final tokens (timm's ``global_pool``): the class token (with a
# distilled model, the class and distillation tokens), the mean of the patch tokens, or
# nothing (the head sees every token).
GlobalPool = Literal["token", "avg", ""]
GLOBAL_POOLS: tuple[str, ...] = get_args(GlobalPool)
# Layout of the per-block features of ``forward_intermediates``: maps ``(B, C, rows, cols)``
# or token sequences ``(B, rows * cols, C)``.
OutputFormat = Literal["NCHW", "NLC"]


def take_indices(count: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """Which of ``count`` blocks to take, as timm's feature API spells it: ``None`` all of
    them, an int ``n`` the last ``n``, a sequence those indices (negative ones count from
    the end). Returns the sorted indices and the largest."""
    if indices is None:
        taken = list(range(count))
    elif isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"cannot take the last {indices} of {count} blocks")
        taken = list(range(count - indices, count))
    else:
        taken = []
        for i in indices:
            if not -count <= i < count:
                raise ValueError(f"block index {i} is out of range for {count} blocks")
            taken.append(i % count)
        if not taken:
            raise ValueError("indices is empty: name at least one block")
        taken = sorted(set(taken))
    return taken, taken[-1]


@dataclass
class ModelTrace:
    """Everything ``CaiT.forward_trace`` records, in order of computation.

    ``sa`` has one :class:`~cait.models.layers.BlockTrace` per self-attention block (attention
    ``(B, H, N', N')`` with ``N'`` the tokens of the SA stage), ``ca`` one per class-attention
    block (attention ``(B, H, T, T + N)``, the class token first, then the distillation
    token when the model has one: ``T = 2``). ``features`` are the final
    normalised tokens ``(B, P + N, C)`` and ``logits`` equal those of ``forward``.
    """

    logits: Tensor
    features: Tensor
    sa: list[BlockTrace] = field(default_factory=list)
    ca: list[BlockTrace] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)


# The name the traces had before ``forward_intermediates`` took timm's contract.
Intermediates = ModelTrace


class CaiT(nn.Module):
    """Class-Attention in Image Transformers, built from a :class:`CaiTConfig`.

    The model speaks timm's model interface (``pretrained_cfg``, ``reset_classifier``,
    ``forward_intermediates``, ``group_matcher``, ...; docs/TIMM.md), so timm's data,
    feature, optimiser and export helpers take it as one of theirs. ``global_pool``
    (``token``, ``avg`` or ``""``) defaults to the config's ``pooling``.
    """

    def __init__(self, config: CaiTConfig, global_pool: GlobalPool | None = None) -> None:
        super().__init__()
        self.config = config
        D = config.embed_dim
        self.num_classes = config.num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = D
        self.num_prefix_tokens = config.num_class_tokens  # tokens before the patches
        self.grad_checkpointing = False
        # a distilled model returns both heads' logits in training only when asked (timm)
        self.distilled_training = False
        self.global_pool = self._checked_pool(
            config.pooling if global_pool is None else global_pool
        )
        self.pretrained_cfg: dict[str, Any] = pretrained_cfg(config)
        # one entry per SA block, as timm's feature wrappers read it
        self.feature_info = [
            {"num_chs": D, "reduction": config.patch_size, "module": f"blocks.{i}"}
            for i in range(config.depth)
        ]

        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, D)
        if config.has_class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        else:
            self.register_parameter("cls_token", None)
        if config.distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        else:
            self.register_parameter("dist_token", None)
        # CaiT gives the class token no position embedding (it enters after the SA stage);
        # ViT/DeiT ("early") give it the first slot.
        self.pos_embed = nn.Parameter(
            torch.zeros(1, config.num_prefix_tokens + config.num_patches, D)
        )
        self.pos_drop = nn.Dropout(config.pos_drop_rate)

        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                D,
                config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                drop=config.drop_rate,
                attn_drop=config.attn_drop_rate,
                drop_path=rate,
                branch_scale=config.branch_scale,
                init_scale=config.init_scale,
                talking_heads=config.talking_heads,
                fused=config.fused_attn,
                attn_impl=config.attn_impl,
            )
            for rate in self._drop_path_rates()
        )
        # The official CA blocks use no dropout and no drop-path (cait_models.py).
        self.blocks_token_only = nn.ModuleList(
            ClassAttentionBlock(
                D,
                config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                branch_scale=config.branch_scale,
                init_scale=config.init_scale,
                fused=config.fused_attn,
            )
            for _ in range(config.ca_depth)
        )
        self.norm = nn.LayerNorm(D, eps=LAYERNORM_EPS)
        self.head = nn.Linear(D, config.num_classes) if config.num_classes else nn.Identity()
        if config.distilled:
            self.head_dist = (
                nn.Linear(D, config.num_classes) if config.num_classes else nn.Identity()
            )
        self._init_weights()

    def _drop_path_rates(self) -> list[float]:
        """Per-SA-block stochastic depth; the official code uses the same rate everywhere."""
        c = self.config
        if c.drop_path_schedule == "uniform" or c.depth == 1:
            return [c.drop_path_rate] * c.depth
        return [c.drop_path_rate * i / (c.depth - 1) for i in range(c.depth)]

    def _init_weights(self) -> None:
        # Official init (cait_models.py, from ViT): trunc-normal(0.02) for Linear weights,
        # pos_embed and cls_token, zero biases, unit LayerNorm; the patch conv keeps
        # PyTorch's default.
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        for token in (self.cls_token, self.dist_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------ timm's model interface

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    def no_weight_decay(self) -> set[str]:
        """Parameters the recipe excludes from weight decay (besides every 1-D parameter)."""
        names = {"pos_embed"}
        names.update(n for n in ("cls_token", "dist_token") if getattr(self, n) is not None)
        names.update(n for n, _ in self.named_parameters() if n.endswith(("gamma_1", "gamma_2")))
        return names

    def group_matcher(self, coarse: bool = False) -> Callable[[str], float]:
        """Parameter name -> layer id, for layer-wise learning-rate decay (timm's
        ``param_groups_layer_decay``, our ``optim.layer_decay``).

        The embeddings and tokens are layer 0 and SA block ``i`` is layer ``i + 1``. The CA
        blocks share the ids of the last SA blocks and the final norm that of the last
        block, as timm groups its CaiT and ViT/DeiT models. The head comes last. ``coarse``
        changes nothing: every block is its own group either way.
        """
        depth, ca_depth = len(self.blocks), len(self.blocks_token_only)
        stem = ("cls_token", "dist_token", "pos_embed", "patch_embed.")

        def layer_id(name: str) -> float:
            if name.startswith(stem):
                return 0
            if name.startswith("blocks."):
                return int(name.split(".")[1]) + 1
            if name.startswith("blocks_token_only."):
                return max(1, int(name.split(".")[1]) + depth - ca_depth + 1)
            if name.startswith("norm."):
                return depth
            return math.inf

        return layer_id

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each SA and CA block in the backward pass instead of storing activations."""
        self.grad_checkpointing = enable

    def set_distilled_training(self, enable: bool = True) -> None:
        """With a distillation token, training-mode forward passes return both heads'
        logits ``(cls, dist)`` for a distillation loss (DeiT); otherwise, and in eval mode,
        their mean. Our trainer turns it on for distilled models."""
        self.distilled_training = enable

    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        """The head; with a distillation token, the class and distillation heads."""
        if self.config.distilled:
            return self.head, self.head_dist
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: GlobalPool | None = None) -> None:
        """Freshly initialised heads for ``num_classes`` classes (``0`` gives the pooled
        features), the distillation head included; ``global_pool`` also changes the pooling
        when given."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if global_pool is not None:
            self.global_pool = self._checked_pool(global_pool)
        self.config = self.config.replace(num_classes=num_classes)
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)
        if self.config.distilled:
            self.head_dist = self._new_head(num_classes)

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop what ``forward_intermediates(indices=...)`` does not need: the SA blocks
        after the last index, the final norm (``prune_norm``), and with ``prune_head`` the
        heads and, when the class token enters late, the class token(s) and the CA stage.
        Returns the indices taken (timm's feature wrappers call this)."""
        taken, last = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            if self.config.class_token == "late":
                self.blocks_token_only = nn.ModuleList()
                self.cls_token = self.dist_token = None
                self.num_prefix_tokens = 0
            self.reset_classifier(0, "")
        return taken

    # ----------------------------------------------------------------- public utilities

    def pos_embed_for(self, rows: int, cols: int) -> Tensor:
        """Position embeddings for a ``rows x cols`` patch grid, resized when it differs."""
        c = self.config
        height, width = rows * c.patch_size, cols * c.patch_size
        return _position_embeddings(
            self.pos_embed, height, width, c.patch_size, c.grid_size, c.num_prefix_tokens
        )

    def _checked_pool(self, pool: str) -> str:
        if pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {list(GLOBAL_POOLS)}, got {pool!r}")
        if pool == "token" and not self.config.has_class_token:
            raise ValueError("global_pool='token' needs a class token; this model has none")
        if pool == "avg" and self.config.distilled:
            raise ValueError(
                "a distilled model reads its class and distillation tokens: global_pool "
                f"must be 'token' or '', got {pool!r}"
            )
        return pool

    def _new_head(self, num_classes: int) -> nn.Module:
        if not num_classes:
            return nn.Identity()
        ref = self.pos_embed
        head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        nn.init.trunc_normal_(head.weight, std=INIT_STD)
        nn.init.zeros_(head.bias)
        return head

    # ------------------------------------------------------------------------- forward

    def _class_tokens(self, batch: int) -> Tensor:
        """The class token, and the distillation token after it: ``(B, T, C)``."""
        tokens = [t for t in (self.cls_token, self.dist_token) if t is not None]
        return torch.cat(tokens, dim=1).expand(batch, -1, -1)

    def _embed(self, images: Tensor) -> Tensor:
        """Images ``(B, in_chans, H_img, W_img)`` -> tokens with position embeddings."""
        x = self.patch_embed(images)  # (B, N, C); validates the input
        if self.config.class_token == "early":
            x = torch.cat((self._class_tokens(x.shape[0]), x), dim=1)  # (B, T + N, C)
        c = self.config  # position embeddings resized to the image's patch grid
        height, width = images.shape[-2], images.shape[-1]
        pos = _position_embeddings(
            self.pos_embed, height, width, c.patch_size, c.grid_size, c.num_prefix_tokens
        )
        return self.pos_drop(x + pos)

    def _run(
        self,
        block: SelfAttentionBlock | ClassAttentionBlock,
        *args: Tensor,
        trace: list[BlockTrace] | None = None,
    ) -> Tensor:
        """One block, checkpointed when enabled and gradients are on.

        A traced block runs as it is: recomputing it would append its trace a second time.
        """
        if trace is None and self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args, trace=trace)

    def _class_stage(self, x: Tensor, ca: list[BlockTrace] | None = None) -> Tensor:
        """Patch tokens ``(B, N, C)`` -> ``(B, T + N, C)``: the class token(s) read the frozen
        patches in the CA blocks (paper Figure 2) and go in front of them. Tokens that
        entered early, or a model without class token, pass through."""
        if self.config.class_token != "late" or self.cls_token is None:
            return x
        cls = self._class_tokens(x.shape[0])  # (B, T, C): class (and distillation) token
        for block in self.blocks_token_only:
            cls = self._run(block, x, cls, trace=ca)
        return torch.cat((cls, x), dim=1)

    def _stages(
        self,
        images: Tensor,
        sa: list[BlockTrace] | None = None,
        ca: list[BlockTrace] | None = None,
    ) -> Tensor:
        """Images -> normalised tokens ``(B, P + N, C)`` in CaiT's two stages (paper Section 3).

        Self-attention over the patches, then class attention in which the class token reads
        the frozen patches (Figure 2). Given lists, each block appends its trace to ``sa`` or
        ``ca``; a traced block is never checkpointed.
        """
        x = self._embed(images)  # (B, N, C), or (B, T + N, C) with the class token early
        for block in self.blocks:  # SA stage: self-attention over the patches
            x = self._run(block, x, trace=sa)
        return self.norm(self._class_stage(x, ca))  # (B, P + N, C)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(B, in_chans, H_img, W_img)`` -> normalised tokens ``(B, P + N, C)``."""
        return self._stages(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Tokens ``(B, P + N, C)`` -> logits ``(B, classes)``, pooled by ``global_pool``.

        ``pre_logits`` gives the pooled features the head would read. A distilled model
        pools its class and distillation tokens: the mean of both heads' logits (or of both
        tokens, for ``pre_logits``), and the pair ``(cls_logits, dist_logits)`` in training
        mode after :meth:`set_distilled_training` (DeiT). With ``global_pool=""`` every
        token goes through the head.
        """
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.global_pool == "token" and self.config.distilled:
            if pre_logits:
                return (x[:, 0] + x[:, 1]) / 2
            logits, dist_logits = self.head(x[:, 0]), self.head_dist(x[:, 1])
            if self.distilled_training and self.training:
                return logits, dist_logits
            return (logits + dist_logits) / 2
        elif self.global_pool == "token":
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: OutputFormat = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature contract: the output of SA blocks ``indices`` (all by default, the
        last ``n`` for an int), as maps ``(B, C, rows, cols)`` (``NCHW``) or patch tokens
        ``(B, rows * cols, C)`` (``NLC``), class tokens left out. ``norm`` passes each
        through the final norm; ``stop_early`` skips the blocks after the last index.
        Returns ``(forward_features output, features)``, or the features alone with
        ``intermediates_only``. For attention maps and residual branches see
        :meth:`forward_trace`.
        """
        if output_fmt not in get_args(OutputFormat):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taken, last = take_indices(len(self.blocks), indices)
        rows, cols = patch_grid(x.shape[-2], x.shape[-1], self.config.patch_size)
        prefix = self.config.num_prefix_tokens  # class tokens that entered early
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        features = []
        x = self._embed(x)
        for i, block in enumerate(blocks):
            x = self._run(block, x)
            if i in taken:
                features.append((self.norm(x) if norm else x)[:, prefix:])  # (B, N, C)
        if output_fmt == "NCHW":
            features = [f.unflatten(1, (rows, cols)).permute(0, 3, 1, 2) for f in features]
        if intermediates_only:
            return features
        return self.norm(self._class_stage(x)), features

    def forward_trace(self, x: Tensor) -> ModelTrace:
        """The forward pass with every block's attention and residual branches recorded.

        Call ``model.eval()`` first for deterministic traces, and wrap the call in
        ``torch.no_grad()`` unless gradients are wanted. The logits equal those of
        ``forward`` (up to the float rounding of the plain attention path it uses).
        """
        sa: list[BlockTrace] = []
        ca: list[BlockTrace] = []
        features = self._stages(x, sa, ca)  # (B, P + N, C)
        return ModelTrace(
            logits=self.forward_head(features),
            features=features,
            sa=sa,
            ca=ca,
            grid=self.patch_embed.grid(*x.shape[-2:]),
        )


@torch.fx.wrap
def _position_embeddings(
    pos_embed: Tensor, height: int, width: int, patch_size: int, grid_size: int, prefix: int
) -> Tensor:
    """The position embeddings for an image of ``height x width``: ``pos_embed`` as it is
    for the ``grid_size`` grid it was made for, resized for another (its ``prefix`` slots of
    class tokens kept as they are). A function of its own so that torch.fx records one call
    where the image size, known only at run time, decides whether to resize."""
    grid = patch_grid(height, width, patch_size)
    # an exported or compiled graph with a symbolic image size resizes at every size: a
    # shortcut for the native size would become a guard that rejects all the others
    if not is_symbolic(height, width) and grid == (grid_size, grid_size):
        return pos_embed
    return resample_pos_embed(pos_embed, grid, prefix, old_grid=(grid_size, grid_size))
