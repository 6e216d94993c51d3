"""Explanations of a prediction the way CaiT computes it (docs/analysis.md has the equations).

Each method gives one relevance per patch token, a map of the patch grid, for a chosen
class (by default the predicted one):

- ``ca``: the class token's attention in the class-attention blocks (paper Section 5),
  the blocks chained with their residual path, as rollout chains them;
- ``rollout``: that class-attention row carried back through the self-attention blocks
  (Abnar & Zuidema 2020): each SA block's head-mixed attention (talking heads: after
  ``proj_w``) averaged over heads, plus the identity of the residual path, rows normalised,
  multiplied through the blocks;
- ``gradient``: attention weighted by its gradient with respect to the class logit,
  positive part, averaged over heads and chained the same way with the residual path but
  without the normalisation (Chefer et al. 2021, Eq. 5-6: ``R <- R + A R``);
- ``gradcam``: Grad-CAM (Selvaraju et al. 2017) in its token-wise form (HiResCAM,
  Draelos & Carin 2020: gradient times activation summed over the channels of each token,
  positive part) on the patch tokens as the class-attention stage reads them (after each
  CA block's ``norm1``), or on those a chosen earlier SA block outputs.

Everything comes from :meth:`cait.CaiT.forward_trace`, never from hooks: the trace's
attention tensors and branches stay in the autograd graph when gradients are on
(``gradcam`` reruns the class-attention stage from the trace's patch tokens, to hold
what each CA block's ``norm1`` makes of them as tensors of their own).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cait.analysis.attention import (
    MapStyle,
    SABlockOutOfRange,
    display_image,
    render_attention_grid,
)
from cait.analysis.output_folder import check_output_folder, write_output_folder
from cait.data import eval_transform, read_image
from cait.models.build import LoadedModel, load_for_inference
from cait.models.cait import CaiT, ModelTrace
from cait.models.layers import layer_scale

__all__ = [
    "DESCRIPTIONS",
    "METHODS",
    "Explanation",
    "Method",
    "class_relevance",
    "explain",
    "explain_batch",
    "gradient_weighted",
    "head_mixed_mean",
    "render_explanations",
    "rollout_map",
    "save_explanations",
]

logger = logging.getLogger(__name__)

Method = Literal["rollout", "gradient", "gradcam", "ca"]
METHODS: tuple[str, ...] = get_args(Method)
# What each method's picture says a colour is.
DESCRIPTIONS = {
    "rollout": "rollout: the CA row carried back through the SA blocks' attention",
    "gradient": "gradient: attention x its gradient (positive part), chained (Chefer et al.)",
    "gradcam": "gradcam: token-wise Grad-CAM on the patch tokens the CA stage reads",
    "ca": "ca: the class token's attention in the CA blocks, chained",
}
# The files save_explanations writes per image: STEM_explain.png and STEM_METHOD.npy.
_FILE = re.compile(r".+_(explain\.png|(" + "|".join(METHODS) + r")\.npy)")
_TOOL = "explain"
# Methods that need the gradient of the class logit (one backward pass).
_GRADIENT_METHODS = ("gradient", "gradcam")


@dataclass
class Explanation:
    """One image's map by one method: ``map`` ``(grid_h, grid_w)``, the relevance of each
    patch token for class ``target``; ``prediction`` is the model's top class."""

    method: str
    target: int
    prediction: int
    grid: tuple[int, int]
    map: np.ndarray


# ------------------------------------------------------------------------------- maths


def _row_normalised(a: Tensor) -> Tensor:
    return a / a.sum(dim=-1, keepdim=True)


def head_mixed_mean(attn: Tensor, proj_w: torch.nn.Linear | None) -> Tensor:
    """The attention that mixes the tokens of an SA block, averaged over heads: ``(B, N, N)``.

    ``attn`` ``(B, H, N, N)`` are the softmax probabilities the trace records; with talking
    heads the values are weighted by ``proj_w`` applied to them across heads (paper
    Section 3, :class:`~cait.models.layers.TalkingHeadAttention`), whose rows need not sum
    to 1 nor stay positive.
    """
    if proj_w is None:
        return attn.mean(dim=1)
    mixed = torch.einsum("bhij,gh->bgij", attn, proj_w.weight)  # (B, H, N, N)
    return mixed.mean(dim=1) + proj_w.bias.mean()


def gradient_weighted(attn: Tensor, grad: Tensor) -> Tensor:
    """Chefer et al. (2021), Eq. 5: ``E_h[(grad * attn)^+]``, ``(B, H, Q, K) -> (B, Q, K)``.

    With talking heads ``attn`` are the probabilities before ``proj_w``: summed over heads,
    ``grad * attn`` there equals ``grad * (mixed - bias)`` after it, as ``proj_w`` is
    linear (the positive part is taken per head of the probabilities).
    """
    return (grad * attn).clamp(min=0).mean(dim=1)


def class_relevance(ca_rows: list[Tensor], num_patches: int, normalise: bool = True) -> Tensor:
    """The class token's relevance over the patches after the class-attention stage.

    ``ca_rows``: per CA block, the rows of the ``T`` class tokens ``(B, T, T + N)`` (the
    mean of the heads, or its gradient-weighted form). Each block's residual path keeps
    the token itself: rows ``e_t + a_t`` over ``[class tokens, patches]``, divided by their
    sum when ``normalise`` (rollout; Chefer et al. add without it). The patches pass the CA
    stage unchanged, so a class token's relevance ``R_t`` (``0`` before the first block: it
    starts as a learned constant) becomes ``sum_s A[t, s] R_s + A[t, T:]``. Returns the
    first class token's ``(B, N)``.
    """
    if not ca_rows:
        raise ValueError("the model has no class-attention blocks")
    B, T, _ = ca_rows[0].shape
    relevance = ca_rows[0].new_zeros(B, T, num_patches)  # (B, T, N)
    eye = torch.eye(T, dtype=relevance.dtype, device=relevance.device)
    for rows in ca_rows:
        total = 1 + rows.sum(dim=-1, keepdim=True) if normalise else 1  # (B, T, 1)
        tokens = (rows[:, :, :T] + eye) / total  # (B, T, T): each class token's own path
        relevance = tokens @ relevance + rows[:, :, T:] / total
    return relevance[:, 0]


def rollout_map(sa: list[Tensor], ca_rows: list[Tensor], normalise: bool = True) -> Tensor:
    """Rollout: the CA stage's relevance (:func:`class_relevance`) carried back through the
    SA blocks, ``r_0 = r_L (A_L ... A_1)`` with ``A_b = I + sa[b]``, rows divided by their
    sums when ``normalise`` (Abnar & Zuidema; Chefer et al. add without it).

    ``sa``: per SA block the token-mixing attention ``(B, N', N')``; ``ca_rows`` as for
    :func:`class_relevance`, or empty when the class token entered early (ViT/DeiT): then
    its own row of the product, over all ``N'`` tokens (the patches are the last ``N``).
    """
    if not sa and not ca_rows:
        raise ValueError("the model has no attention to roll out")
    n = sa[0].shape[-1] if sa else ca_rows[0].shape[-1] - ca_rows[0].shape[1]
    eye = torch.eye(n, dtype=(sa or ca_rows)[0].dtype, device=(sa or ca_rows)[0].device)
    if ca_rows:
        relevance = class_relevance(ca_rows, n, normalise)[:, None]  # (B, 1, N)
    else:
        relevance = eye[:1].expand(sa[0].shape[0], 1, n)  # the early class token's row
    for a in reversed(sa):  # from the last block back to the patch embedding
        relevance = relevance @ (_row_normalised(eye + a) if normalise else eye + a)
    return relevance[:, 0]


# --------------------------------------------------------------------------- the model


def _targets(logits: Tensor, target: int | Tensor | None) -> Tensor:
    """The class explained per image: ``target`` (one class, or one per image) or the top
    class."""
    if target is None:
        return logits.argmax(dim=1)
    targets = torch.as_tensor(target, device=logits.device).expand(logits.shape[0])
    classes = logits.shape[1]
    if ((targets < 0) | (targets >= classes)).any():
        raise ValueError(f"the class must be in 0..{classes - 1}, got {target}")
    return targets


def _check_input(model: CaiT, images: Tensor, method: str, block: int | None) -> None:
    if not isinstance(model, CaiT):
        raise ValueError(f"explanations need a cait model with forward_trace, got {type(model)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    p = model.config.patch_size
    if images.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
    if min(images.shape[-2:]) < p:
        size = "x".join(str(s) for s in images.shape[-2:])
        raise ValueError(f"the image is {size} pixels, smaller than one {p}x{p} patch")
    if block is not None and not 0 <= block < len(model.blocks):
        raise SABlockOutOfRange(block, len(model.blocks))  # the Grad-CAM block
    if method != "gradcam" and not model.config.has_class_token:
        raise ValueError(f"{method} follows the class token; this model has none (use gradcam)")


def _attention_maps(model: CaiT, trace: ModelTrace, method: str, score: Tensor) -> Tensor:
    """``ca``, ``rollout`` or ``gradient`` from a trace: ``(B, N)``."""
    sa_attn = [t.attn for t in trace.sa]
    ca_attn = [t.attn for t in trace.ca]
    if method == "gradient":
        grads = torch.autograd.grad(score, sa_attn + ca_attn)
        weighted = [gradient_weighted(a, g) for a, g in zip(sa_attn + ca_attn, grads, strict=True)]
        sa, ca_rows = weighted[: len(sa_attn)], weighted[len(sa_attn) :]
    else:
        talking = model.config.talking_heads
        sa = [
            head_mixed_mean(a, b.attn.proj_w if talking else None)
            for a, b in zip(sa_attn, model.blocks, strict=True)
        ]
        ca_rows = [a.mean(dim=1) for a in ca_attn]  # (B, T, T + N)
    if method == "ca":
        if not ca_rows:
            raise ValueError("the model has no class-attention blocks (class token early)")
        return class_relevance(ca_rows, trace.grid[0] * trace.grid[1])
    n = trace.grid[0] * trace.grid[1]  # the patches come last (after early class tokens)
    return rollout_map(sa, ca_rows, normalise=method != "gradient")[:, -n:]


def _token_wise(tokens: Tensor, grad: Tensor) -> Tensor:
    """The token-wise form of Grad-CAM (HiResCAM, Draelos & Carin 2020): per token, the sum
    over channels of gradient times activation, positive part. ``(B, N, C) -> (B, N)``."""
    return (grad * tokens).sum(dim=-1).clamp(min=0)


def _class_stage_logits(model: CaiT, trace: ModelTrace, read: list[Tensor]) -> Tensor:
    """The logits recomputed from the class-attention stage on, with ``read[k]``
    ``(B, N, C)`` standing for the patch rows of ``norm1(u)`` in CA block ``k``: the
    equations of :class:`~cait.models.layers.ClassAttentionBlock` in eval mode (drop-path
    is the identity); a test checks the maps against hooks on the model's own norms."""
    tokens = trace.ca[0].stream.detach()  # (B, T, C): the class token(s), learned constants
    for block, patches in zip(model.blocks_token_only, read, strict=True):
        queries = block.norm1(tokens)
        u = torch.cat((queries, patches), dim=1)  # norm1(u): the class tokens, the patches
        update, _ = block.attn(u, num_queries=tokens.shape[1], queries=queries)
        tokens = tokens + layer_scale(update, block.gamma_1)
        tokens = tokens + layer_scale(block.mlp(block.norm2(tokens)), block.gamma_2)
    # the head reads the class token(s) only: a late CA stage goes with token pooling
    return model.forward_head(model.norm(tokens))


def _grad_cam_class_stage(model: CaiT, trace: ModelTrace, targets: Tensor) -> Tensor:
    """Token-wise Grad-CAM on the patch tokens as the class-attention stage reads them,
    ``Z_k = norm1_k(X)`` in each CA block ``k``, the sums over channels added over the
    blocks before the positive part: ``(B, N)``.

    Not on ``X``, the last SA block's output, itself: only LayerNorms read it, whose output
    does not change when a token is scaled, so ``sum_c X * dy/dX`` vanishes (up to the
    norm's epsilon) for every token.
    """
    patches = trace.sa[-1].output.detach()  # (B, N, C): the CA stage's frozen patches
    read = [block.norm1(patches).detach().requires_grad_() for block in model.blocks_token_only]
    logits = _class_stage_logits(model, trace, read)
    grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), read)
    # each token's first-order contribution through all the blocks, then its positive part
    return _token_wise(torch.cat(read, dim=-1), torch.cat(grads, dim=-1))


def _grad_cam_block(trace: ModelTrace, score: Tensor, block: int) -> Tensor:
    """Token-wise Grad-CAM on the patch tokens SA block ``block`` outputs: ``(B, N)``.

    The gradient with respect to the block's output is that with respect to its MLP
    branch, the last term added to it (the trace holds that exact tensor).
    """
    traced = trace.sa[block]
    (grad,) = torch.autograd.grad(score, traced.mlp_branch)  # (B, N', C)
    n = trace.grid[0] * trace.grid[1]
    return _token_wise(traced.output[:, -n:], grad[:, -n:])  # the patch tokens


def explain_batch(
    model: CaiT,
    images: Tensor,
    method: str,
    target: int | Tensor | None = None,
    block: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Maps of normalised images ``(B, in_chans, H, W)`` by ``method``: returns the maps
    ``(B, grid_h, grid_w)``, the classes explained ``(B,)`` and the logits ``(B, classes)``.

    ``target``: one class for all images, one per image, or ``None`` (each image's top
    class); ``block``: the SA block (from 0) whose patch tokens Grad-CAM reads (default:
    the last one, whose tokens it takes as the class-attention stage reads them, after each
    CA block's ``norm1``; a model without CA blocks: its output). The model runs in eval
    mode; its training mode is restored after.
    """
    _check_input(model, images, method, block)
    was_training = model.training
    model.eval()
    try:
        with torch.set_grad_enabled(method in _GRADIENT_METHODS):
            trace = model.forward_trace(images)
            targets = _targets(trace.logits, target)
            score = trace.logits.gather(1, targets[:, None]).sum()  # images are independent
            last = len(model.blocks) - 1
            if method == "gradcam" and trace.ca and block in (None, last):
                maps = _grad_cam_class_stage(model, trace, targets)
            elif method == "gradcam":
                maps = _grad_cam_block(trace, score, last if block is None else block)
            else:
                maps = _attention_maps(model, trace, method, score)
    finally:
        model.train(was_training)
    grid = trace.grid
    return maps.detach().reshape(-1, *grid), targets.detach(), trace.logits.detach()


def explain(
    model: CaiT,
    image: Tensor,
    method: str,
    target: int | None = None,
    block: int | None = None,
) -> Explanation:
    """The map of one normalised image ``(in_chans, H, W)`` by ``method``
    (:func:`explain_batch`)."""
    maps, targets, logits = explain_batch(model, image[None], method, target, block)
    return Explanation(
        method=method,
        target=int(targets[0]),
        prediction=int(logits[0].argmax()),
        grid=(maps.shape[1], maps.shape[2]),
        map=maps[0].float().cpu().numpy(),
    )


# --------------------------------------------------------------------------- pictures


def render_explanations(
    shown: np.ndarray, explanations: Sequence[Explanation], title: str, style: MapStyle = "blocks"
) -> Image.Image:
    """One row: the image as the model saw it (``(h, w, 3)`` in ``[0, 1]``), then each
    method's map over it, in the style of ``cait attention`` (colour scale below)."""
    maps = np.stack([e.map for e in explanations])[None]  # (1, methods, gh, gw)
    legend = "relevance of each patch for the class: " + "; ".join(e.method for e in explanations)
    return render_attention_grid(
        shown,
        maps,
        [title],
        [e.method for e in explanations],
        style=style,
        legend=legend,
    )


def save_explanations(
    model: LoadedModel | str | Path,
    images: Sequence[str],
    output: str | Path,
    methods: Sequence[str] = METHODS,
    target: int | None = None,
    block: int | None = None,
    model_name: str | None = None,
    img_size: int | None = None,
    device: str = "cpu",
    style: MapStyle = "blocks",
    *,
    overwrite: bool = False,
) -> list[dict]:
    """Draw each image's maps by ``methods`` and save them; returns what was written.

    For each image ``STEM`` the folder gets ``STEM_explain.png`` (the image, then one map
    per method over it, with a colour scale) and ``STEM_METHOD.npy`` (each raw map,
    ``(grid_h, grid_w)``). ``target`` is the class explained (default: the prediction);
    ``block`` the SA block (from 0) Grad-CAM reads. The folder is written whole
    (:mod:`cait.analysis.output_folder`).
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {m!r}")
    check_output_folder(output, _TOOL, _is_explain_file, overwrite)  # before any loading
    loaded = model if isinstance(model, LoadedModel) else load_for_inference(str(model), model_name)
    if not isinstance(loaded.model, CaiT):
        raise ValueError("explanations need a cait model, not a timm: model")
    settings = loaded.settings.replace(img_size=img_size)
    transform = eval_transform(settings)
    net = loaded.model.to(device)
    pictures = [read_image(p) for p in images]  # a bad file fails before anything is written
    patch = net.config.patch_size
    for path, picture in zip(images, pictures, strict=True):
        if min(picture.size) < patch:  # resizing it up would explain an invented image
            width, height = picture.size
            raise ValueError(
                f"{path} is {width}x{height} pixels, smaller than one {patch}x{patch} patch"
            )
    stems = [Path(p).stem for p in images]
    stems = [s if stems.count(s) == 1 else f"{s}_{i}" for i, s in enumerate(stems)]
    names = loaded.class_names

    def draw_all(folder: Path) -> list[dict]:
        results = []
        for path, stem, picture in zip(images, stems, pictures, strict=True):
            x = transform(picture).to(device)
            found = [explain(net, x, m, target, block) for m in methods]
            k, top = found[0].target, found[0].prediction
            name = names[k] if names else str(k)
            title = f"class {name}" + ("" if k == top else f" (predicted {top})")
            render_explanations(
                display_image(x, settings.mean, settings.std), found, title, style
            ).save(folder / f"{stem}_explain.png")
            for e in found:
                np.save(folder / f"{stem}_{e.method}.npy", e.map)
            results.append(
                {
                    "image": str(path),
                    "target": k,
                    "prediction": top,
                    "name": name,
                    "picture": str(Path(output) / f"{stem}_explain.png"),
                }
            )
            logger.info("%s: explained class %s in %s", path, name, output)
        return results

    return write_output_folder(output, _TOOL, _is_explain_file, overwrite, draw_all)


def _is_explain_file(name: str) -> bool:
    return _FILE.fullmatch(name) is not None
