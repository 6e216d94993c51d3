"""The CaiT model (Touvron et al., "Going deeper with Image Transformers", ICCV 2021).

Two stages (paper Section 3, Figure 2): self-attention blocks over the patch tokens only,
then a few class-attention blocks in which the class token summarises the frozen patches.
With the knobs of :class:`~cait.models.config.CaiTConfig` the same class also expresses ViT/DeiT
(class token early, no LayerScale, no talking heads) and the ablations of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cait.models.config import CaiTConfig
from cait.models.layers import (
    INIT_STD,
    LAYERNORM_EPS,
    BlockTrace,
    ClassAttentionBlock,
    PatchEmbed,
    SelfAttentionBlock,
    resample_pos_embed,
)

__all__ = ["CaiT", "Intermediates"]


@dataclass
class Intermediates:
    """Everything ``CaiT.forward_intermediates`` records, in order of computation.

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


class CaiT(nn.Module):
    """Class-Attention in Image Transformers, built from a :class:`CaiTConfig`."""

    def __init__(self, config: CaiTConfig) -> None:
        super().__init__()
        self.config = config
        D = config.embed_dim
        self.num_classes = config.num_classes
        self.num_features = D
        self.grad_checkpointing = False

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

    # ----------------------------------------------------------------- public utilities

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the output of ``forward_features``."""
        return self.config.num_class_tokens

    def no_weight_decay(self) -> set[str]:
        """Parameters the recipe excludes from weight decay (besides every 1-D parameter)."""
        names = {"pos_embed"}
        names.update(n for n in ("cls_token", "dist_token") if getattr(self, n) is not None)
        names.update(n for n, _ in self.named_parameters() if n.endswith(("gamma_1", "gamma_2")))
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each SA and CA block in the backward pass instead of storing activations."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one (``0`` gives features only)."""
        self.config = self.config.replace(num_classes=num_classes)
        self.num_classes = num_classes
        if num_classes:
            ref = self.norm.weight
            self.head = nn.Linear(
                self.num_features, num_classes, device=ref.device, dtype=ref.dtype
            )
            nn.init.trunc_normal_(self.head.weight, std=INIT_STD)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    def pos_embed_for(self, rows: int, cols: int) -> Tensor:
        """Position embeddings for a ``rows x cols`` patch grid, resized when it differs."""
        g = self.config.grid_size
        if (rows, cols) == (g, g):
            return self.pos_embed
        return resample_pos_embed(
            self.pos_embed, (rows, cols), self.config.num_prefix_tokens, old_grid=(g, g)
        )

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
        grid = self.patch_embed.grid(*images.shape[-2:])  # (rows, cols) of patches
        return self.pos_drop(x + self.pos_embed_for(*grid))

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
        if self.config.class_token == "late" and self.cls_token is not None:
            cls = self._class_tokens(x.shape[0])  # (B, T, C): class (and distillation) token
            for block in self.blocks_token_only:  # CA stage: the class token reads the patches
                cls = self._run(block, x, cls, trace=ca)
            x = torch.cat((cls, x), dim=1)  # (B, T + N, C)
        return self.norm(x)  # (B, P + N, C)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(B, in_chans, H_img, W_img)`` -> normalised tokens ``(B, P + N, C)``."""
        return self._stages(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Tokens ``(B, P + N, C)`` -> logits ``(B, classes)`` (or pooled features).

        A distilled model returns ``(cls_logits, dist_logits)`` in training mode and their
        mean in eval mode (DeiT); ``pre_logits`` gives the class-token features.
        """
        if self.config.pooling == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
            return x if pre_logits else self.head(x)
        if pre_logits:
            return x[:, 0]
        logits = self.head(x[:, 0])
        if not self.config.distilled:
            return logits
        dist_logits = self.head_dist(x[:, 1])
        if self.training:
            return logits, dist_logits
        return (logits + dist_logits) / 2

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor) -> Intermediates:
        """The forward pass with every block's attention and residual branches recorded.

        Call ``model.eval()`` first for deterministic traces, and wrap the call in
        ``torch.no_grad()`` unless gradients are wanted. The logits equal those of
        ``forward`` (up to the float rounding of the plain attention path it uses).
        """
        sa: list[BlockTrace] = []
        ca: list[BlockTrace] = []
        features = self._stages(x, sa, ca)  # (B, P + N, C)
        return Intermediates(
            logits=self.forward_head(features),
            features=features,
            sa=sa,
            ca=ca,
            grid=self.patch_embed.grid(*x.shape[-2:]),
        )
