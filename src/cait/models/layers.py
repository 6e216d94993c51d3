"""The building blocks of CaiT, each usable and testable on its own.

Shapes: ``B`` batch, ``N`` tokens, ``C`` channels (embedding dim), ``H`` heads,
``hd = C // H`` head dim, ``T`` class tokens that query in class attention.

Parameter names follow the official ``cait_models.py`` (``qkv``, ``proj_l``, ``proj_w``,
``q``/``k``/``v``, ``gamma_1``/``gamma_2``, ``mlp.fc1``/``mlp.fc2``) so that the released
weights load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cait.kernels.talking_heads import talking_heads_attention
from cait.models.config import ATTN_IMPLS, BRANCH_SCALES

__all__ = [
    "LAYERNORM_EPS",
    "INIT_STD",
    "BlockTrace",
    "ClassAttention",
    "ClassAttentionBlock",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "SelfAttentionBlock",
    "TalkingHeadAttention",
    "check_images",
    "drop_path",
    "layer_scale",
    "is_symbolic",
    "make_branch_scale",
    "patch_grid",
    "resample_pos_embed",
    "uses_pre_norm",
]

# LayerNorm epsilon of every norm in CaiT and DeiT: ``partial(nn.LayerNorm, eps=1e-6)`` in
# the official cait_models.py / models.py.
LAYERNORM_EPS = 1e-6
# Truncated-normal std for Linear weights, pos_embed and cls_token (official ``_init_weights``,
# inherited from ViT).
INIT_STD = 0.02


# torch.fx (torchvision's create_feature_extractor, timm's FX feature wrappers) traces
# Python control flow on values it cannot see. The functions below branch on shapes, devices
# or flags, so a traced graph calls them as they are (each one node, run at call time):
# the input checks, the fast attention kernel and stochastic depth keep working there.
torch.fx.wrap("talking_heads_attention")


@torch.fx.wrap
def check_images(x: Tensor, in_chans: int, patch_size: int) -> Tensor:
    """``x`` unchanged if it is a ``(B, in_chans, H, W)`` batch whose sides ``patch_size``
    divides; otherwise a ``ValueError`` that says what was expected."""
    if x.ndim != 4:
        raise ValueError(
            f"expected a 4-D image batch (B, {in_chans}, H, W), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]}")
    patch_grid(x.shape[2], x.shape[3], patch_size)
    return x


def is_symbolic(*sizes: int) -> bool:
    """Whether any size is a symbol (``torch.export`` or ``torch.compile`` with a dynamic
    dimension) rather than a number: a Python branch on it would become a guard that fixes
    it."""
    return any(isinstance(s, torch.SymInt) for s in sizes)


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The ``(rows, cols)`` of patches in an image; a side the patch size does not divide
    raises ``ValueError``."""
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"input height and width must be multiples of the patch size {patch_size}, "
            f"got {height}x{width}"
        )
    return height // patch_size, width // patch_size


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: ``(B, in_chans, H_img, W_img) -> (B, N, C)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` for an image, validating its size."""
        return patch_grid(height, width, self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = check_images(x, self.in_chans, self.patch_size)
        x = self.proj(x)  # (B, C, H_img/p, W_img/p)
        # token-major in memory: a transposed view would carry a channel-first layout into
        # the residual stream, and every LayerNorm (forward and backward) would copy it
        return x.flatten(2).transpose(1, 2).contiguous()  # (B, N, C)


@torch.fx.wrap
def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016): drop the whole branch per sample with prob. ``p``.

    Kept samples are scaled by ``1 / (1 - p)`` so that the expectation is unchanged.
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module form of :func:`drop_path`."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """The feed-forward branch: ``fc2(drop(gelu(fc1(x))))`` with hidden size ``ratio * C``."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def make_branch_scale(mode: str, dim: int, init_scale: float) -> nn.Parameter | None:
    """The learned factor applied to a residual branch (paper Figure 1).

    ``layerscale``: a vector of size ``dim`` (the diagonal of LayerScale), filled with
    ``init_scale``; ``rezero``: a scalar starting at 0; ``skipinit`` and ``fixup``: a scalar
    starting at ``init_scale``; ``none``: no factor. The factor is a plain parameter of the
    block (not a submodule) because the official weights name it ``blocks.{i}.gamma_1``.
    """
    if mode not in BRANCH_SCALES:
        raise ValueError(f"branch_scale must be one of {BRANCH_SCALES}, got {mode!r}")
    if mode == "layerscale":
        return nn.Parameter(torch.full((dim,), float(init_scale)))
    if mode == "rezero":
        return nn.Parameter(torch.zeros(1))
    if mode in ("skipinit", "fixup"):
        return nn.Parameter(torch.full((1,), float(init_scale)))
    return None


def uses_pre_norm(mode: str) -> bool:
    """ReZero and SkipInit remove the pre-norm (paper Figure 1b); the others keep it."""
    return mode not in ("rezero", "skipinit")


def layer_scale(x: Tensor, gamma: Tensor | None) -> Tensor:
    """LayerScale: ``diag(gamma) x`` over the channel (last) dim; identity without gamma."""
    return x if gamma is None else gamma * x


def _mix_heads(attn: Tensor, mix: nn.Linear) -> Tensor:
    """Talking heads: each output head is a learned combination of all input heads.

    ``(B, H, N, N) -> (B, H, N, N)``, ``out[b, g] = sum_h W[g, h] attn[b, h] + bias[g]``.
    The weight is taken in ``attn``'s dtype (what autocast does too): int8 models run the
    attention on bf16 ``q, k, v`` with fp32 mixing layers (``cait.precision.int8``).
    """
    out = torch.einsum("bhij,gh->bgij", attn, mix.weight.to(attn.dtype))
    return out + mix.bias[None, :, None, None]


class TalkingHeadAttention(nn.Module):
    """Multi-head self-attention with talking heads (paper Section 3; Shazeer et al. 2020).

    Logits ``q k^T / sqrt(hd)`` are mixed across heads by ``proj_l`` before the softmax and
    the probabilities by ``proj_w`` after it. With ``talking_heads=False`` this is the plain
    ViT/DeiT attention (and has no ``proj_l``/``proj_w``). ``fused`` selects PyTorch's fused
    ``scaled_dot_product_attention`` where the maths allows it (no talking heads, no
    attention map requested).

    ``impl`` chooses how talking heads are computed; all give the same result:

    - ``plain``: the reference structure, head mixing as an einsum (always used when the
      attention map is requested);
    - ``fast``: head-major attention with the head mixing as one matrix product each and
      a written-out backward pass (:func:`cait.kernels.talking_heads.talking_heads_attention`);
      with attention dropout in training it falls back to ``plain``;
    - ``recompute``: ``fast``, but nothing of size ``(B, H, N, N)`` is kept for the
      backward pass, which recomputes the logits and probabilities (against two such
      tensors per block for ``fast`` and three or more for ``plain``); needs
      ``attn_drop == 0``.

    On CUDA, ``fast`` and ``recompute`` both run the fused Triton kernels, which write no
    ``(B, H, N, N)`` tensor and keep none (:mod:`cait.kernels.triton_talking_heads`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        talking_heads: bool = True,
        fused: bool = True,
        impl: str = "fast",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads={num_heads}, got {dim}")
        if impl not in ATTN_IMPLS:
            raise ValueError(f"impl must be one of {ATTN_IMPLS}, got {impl!r}")
        if impl == "recompute" and attn_drop > 0.0:
            raise ValueError(
                f"impl='recompute' keeps no dropout mask: attn_drop must be 0, got {attn_drop}"
            )
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.talking_heads = talking_heads
        self.fused = fused
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        if talking_heads:
            self.proj_l = nn.Linear(num_heads, num_heads)
            self.proj_w = nn.Linear(num_heads, num_heads)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, return_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(B, N, C) -> (B, N, C)``; also the softmax probabilities ``(B, H, N, N)`` when asked.

        The returned probabilities are those of the softmax (after the pre-softmax mixing);
        each row sums to 1. With talking heads, ``proj_w`` then mixes them across heads.
        """
        B, N, C = x.shape
        H = self.num_heads
        qkv = self.qkv(x)  # (B, N, 3C)
        p = self.attn_drop.p if self.training else 0.0
        if self.talking_heads and self.impl != "plain" and not return_attn and p == 0.0:
            x = talking_heads_attention(
                qkv,
                H,
                self.proj_l.weight,
                self.proj_l.bias,
                self.proj_w.weight,
                self.proj_w.bias,
                self.scale,
                recompute=self.impl == "recompute",
            )  # (B, N, C)
            return self.proj_drop(self.proj(x)), None
        q, k, v = qkv.reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B,H,N,hd)
        attn = None
        if self.fused and not self.talking_heads and not return_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, N, hd)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            if self.talking_heads:
                logits = _mix_heads(logits, self.proj_l)
            attn = logits.softmax(dim=-1)
            weights = _mix_heads(attn, self.proj_w) if self.talking_heads else attn
            x = self.attn_drop(weights).to(v.dtype) @ v  # (B, H, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x)), attn


class ClassAttention(nn.Module):
    """Class attention (paper Section 3, Eq. 6-8): the first ``T`` tokens query all tokens.

    Input ``(B, T + N, C)``, the class token(s) first; output ``(B, T, C)``. Only the class
    tokens are queries, so the cost is linear in ``N``. No talking heads here.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads={num_heads}, got {dim}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused = fused
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: Tensor,
        num_queries: int = 1,
        return_attn: bool = False,
        queries: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Returns the update of the class tokens and, when asked, ``(B, H, T, T + N)``.

        ``queries`` may hold ``x[:, :T]`` as a tensor of its own (contiguous): projecting a
        slice of ``x`` makes ``torch.export`` assume a batch other than 1 (the slice is
        contiguous only for one image), which a symbolic image size cannot avoid.
        """
        B, N, C = x.shape
        H, T = self.num_heads, num_queries
        queries = x[:, :T] if queries is None else queries  # (B, T, C)
        q = self.q(queries).reshape(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).reshape(B, N, H, C // H).transpose(1, 2)  # (B, H, N, hd)
        v = self.v(x).reshape(B, N, H, C // H).transpose(1, 2)  # (B, H, N, hd)
        attn = None
        if self.fused and not return_attn:
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, T, hd)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T, N)
            out = self.attn_drop(attn) @ v  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(out)), attn


@dataclass
class BlockTrace:
    """What one residual block did, for introspection (see ``CaiT.forward_trace``).

    ``stream`` is the residual stream entering the block; ``attn_branch`` and ``mlp_branch``
    are the scaled branch outputs added to it (after drop-path, which is the identity in
    eval mode), so the block's output is ``stream + attn_branch + mlp_branch``. ``attn`` holds
    the attention probabilities: ``(B, H, N, N)`` in an SA block, ``(B, H, T, T + N)`` in a
    CA block, where the stream is the ``T`` class tokens.
    """

    stream: Tensor
    attn_branch: Tensor
    mlp_branch: Tensor
    attn: Tensor

    @property
    def mid_stream(self) -> Tensor:
        """The residual stream entering the MLP branch."""
        return self.stream + self.attn_branch

    @property
    def output(self) -> Tensor:
        return self.stream + self.attn_branch + self.mlp_branch


class _ResidualBlock(nn.Module):
    """What SA and CA blocks share: two pre-norm branches, each scaled and drop-pathed."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        drop: float,
        drop_path: float,
        branch_scale: str,
        init_scale: float,
    ) -> None:
        super().__init__()
        pre_norm = uses_pre_norm(branch_scale)
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS) if pre_norm else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS) if pre_norm else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)
        self.gamma_1 = make_branch_scale(branch_scale, dim, init_scale)
        self.gamma_2 = make_branch_scale(branch_scale, dim, init_scale)

    def _add(
        self, x: Tensor, gamma: Tensor | None, branch: Tensor, keep: bool
    ) -> tuple[Tensor, Tensor | None]:
        """``x + drop_path(gamma * branch)``, and the scaled branch itself when ``keep``.

        Without a branch to keep and with nothing dropped, the add is one pass (``addcmul``,
        see docs/BENCHMARKS.md). A kept branch is the exact tensor added to ``x``: recovering
        it as ``output - x`` would lose all its precision at a LayerScale of 1e-5.
        """
        dropping = self.drop_path.training and self.drop_path.p > 0.0
        if gamma is not None and not dropping and not keep:
            return torch.addcmul(x, gamma, branch), None
        scaled = self.drop_path(layer_scale(branch, gamma))
        return x + scaled, (scaled if keep else None)


class SelfAttentionBlock(_ResidualBlock):
    """An SA block over patch tokens (paper Eq. 4-5 with LayerScale), ``(B, N, C) -> same``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        branch_scale: str = "layerscale",
        init_scale: float = 1e-5,
        talking_heads: bool = True,
        fused: bool = True,
        attn_impl: str = "fast",
    ) -> None:
        super().__init__(dim, mlp_ratio, drop, drop_path, branch_scale, init_scale)
        self.attn = TalkingHeadAttention(
            dim,
            num_heads,
            qkv_bias,
            attn_drop,
            drop,
            talking_heads=talking_heads,
            fused=fused,
            impl=attn_impl,
        )

    def forward(self, x: Tensor, trace: list[BlockTrace] | None = None) -> Tensor:
        """The two residual equations of an SA block with LayerScale (paper Section 2):

        ``x = x + drop_path(gamma_1 * SA(norm1(x)))``;
        ``x = x + drop_path(gamma_2 * FFN(norm2(x)))``.

        Given a ``trace`` list, appends this block's :class:`BlockTrace` to it (the attention
        map then comes from the plain attention path).
        """
        keep = trace is not None
        # the input and the attention output are held only for a trace: the untraced forward
        # pass is memory-bound, and two more (B, N, C) tensors alive through the MLP cost
        # measurable speed (docs/BENCHMARKS.md, "Before and after the package layout")
        stream = x if keep else None  # (B, N, C)
        a, attn = self.attn(self.norm1(x), return_attn=keep)
        x, attn_branch = self._add(x, self.gamma_1, a, keep)
        del a
        x, mlp_branch = self._add(x, self.gamma_2, self.mlp(self.norm2(x)), keep)
        if trace is not None:
            trace.append(BlockTrace(stream, attn_branch, mlp_branch, attn))
        return x


class ClassAttentionBlock(_ResidualBlock):
    """A CA block (paper Section 3): updates the class token(s) only; patches stay frozen.

    ``x (B, N, C)`` patches, ``tokens (B, T, C)`` -> ``tokens (B, T, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        branch_scale: str = "layerscale",
        init_scale: float = 1e-5,
        fused: bool = True,
    ) -> None:
        super().__init__(dim, mlp_ratio, drop, drop_path, branch_scale, init_scale)
        self.attn = ClassAttention(dim, num_heads, qkv_bias, attn_drop, drop, fused=fused)

    def forward(self, x: Tensor, tokens: Tensor, trace: list[BlockTrace] | None = None) -> Tensor:
        """The two residual equations of a CA block (paper Section 3), with ``u = [tokens, x]``:

        ``tokens = tokens + drop_path(gamma_1 * CA(norm1(u)))``;
        ``tokens = tokens + drop_path(gamma_2 * FFN(norm2(tokens)))``.

        Given a ``trace`` list, appends this block's :class:`BlockTrace` to it, with the class
        tokens as its stream.
        """
        keep = trace is not None
        stream = tokens  # (B, T, C)
        # norm1(u) row by row: the class tokens' rows, normalised on their own, are the
        # queries as a tensor of their own (see ClassAttention), then the patches' rows
        queries = self.norm1(tokens)  # (B, T, C)
        u = torch.cat((queries, self.norm1(x)), dim=1)  # norm1(u), (B, T + N, C)
        a, attn = self.attn(u, num_queries=tokens.shape[1], return_attn=keep, queries=queries)
        tokens, attn_branch = self._add(tokens, self.gamma_1, a, keep)  # (B, T, C)
        tokens, mlp_branch = self._add(tokens, self.gamma_2, self.mlp(self.norm2(tokens)), keep)
        if trace is not None:
            trace.append(BlockTrace(stream, attn_branch, mlp_branch, attn))
        return tokens


def resample_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    old_grid: tuple[int, int] | None = None,
) -> Tensor:
    """Resize absolute position embeddings to another patch grid, bicubically.

    ``pos_embed (1, P + rows * cols, C) -> (1, P + new_rows * new_cols, C)``; the ``P`` prefix
    slots (the class token's in ViT/DeiT; none in CaiT) are kept as they are. The old grid is
    taken as square when not given. Interpolation runs in float32 with antialiasing, the
    resampling used by timm and by the DeiT/CaiT fine-tuning at higher resolution.
    """
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n_old = grid_tokens.shape[1]
    if old_grid is None:
        side = int(round(n_old**0.5))
        if side * side != n_old:
            raise ValueError(
                f"cannot infer a square patch grid from {n_old} position embeddings; pass old_grid"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_old:
        raise ValueError(f"old_grid {old_grid} does not match {n_old} position embeddings")
    if not is_symbolic(*new_grid) and tuple(old_grid) == tuple(new_grid):
        return pos_embed  # (a symbolic grid is resampled at any size, rather than guarded)
    C = pos_embed.shape[-1]
    grid = grid_tokens.float().reshape(1, old_grid[0], old_grid[1], C).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C).to(pos_embed.dtype)
    return torch.cat((prefix, grid), dim=1)
