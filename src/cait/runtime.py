"""Process-wide settings in one place: seeds, threads, device, precision. Logged at start."""

from __future__ import annotations

import logging
import platform
import random

import numpy as np
import torch

__all__ = [
    "autocast",
    "get_rng_state",
    "resolve_device",
    "seed_everything",
    "set_rng_state",
    "setup",
]

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


def inference_device(device: str, amp: str) -> torch.device:
    """The device for evaluation or prediction, checking the AMP mode (no reseeding)."""
    dev = resolve_device(device)
    if amp == "fp16" and dev.type != "cuda":
        raise ValueError("amp 'fp16' needs a CUDA device (use 'bf16' on the CPU)")
    return dev


def setup(seed: int, device: str, amp: str, threads: int | None = None) -> torch.device:
    """Seed every RNG, set threads and matmul precision, check the AMP mode; log it all."""
    dev = inference_device(device, amp)
    if threads is not None:
        torch.set_num_threads(threads)
    # full fp32 matmuls unless AMP is asked for: results must not depend on TF32 defaults
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    seed_everything(seed)
    logger.info(
        "runtime: python %s, torch %s, device %s, amp %s, threads %d, seed %d, TF32 off",
        platform.python_version(),
        torch.__version__,
        dev,
        amp,
        torch.get_num_threads(),
        seed,
    )
    return dev


def autocast(device: torch.device, amp: str) -> torch.autocast:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp != "none")


def get_rng_state() -> dict:
    """Every RNG's state as tensors and plain containers (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
