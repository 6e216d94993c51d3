"""Training checkpoints: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cait.files import atomic_write, load_file_safely

__all__ = ["load_checkpoint", "save_checkpoint", "save_safetensors"]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` via a temporary file and an atomic rename, so that a
    process killed mid-write leaves the previous file intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint as saved by :func:`save_checkpoint` (tensors and plain data)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        raise ValueError(
            f"{path} holds weights only; resuming needs a training checkpoint (last.pt)"
        )
    state = load_file_safely(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a cait training checkpoint (no 'model'/'config' entries)")
    return state


def save_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any]
) -> None:
    """Weights only, as safetensors, with JSON-encoded metadata (config, class names)."""
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), meta))
