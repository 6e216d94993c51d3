"""Training checkpoints: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = ["load_checkpoint", "save_checkpoint", "save_safetensors"]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` via a temporary file and an atomic rename, so that a
    process killed mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint as saved by :func:`save_checkpoint` (tensors and plain data)."""
    from cait.weights import load_file_safely

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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp), meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
