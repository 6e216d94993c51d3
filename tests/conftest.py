"""Shared helpers: random weights that make every branch count, the device parameter, and
small checks that several test files make (``from conftest import ...``, as tests/ is on the
path).

Tests that run on several devices take ``device`` from :data:`DEVICES`; the CUDA case
carries the ``gpu`` marker (``make test-gpu``) and is skipped without a CUDA device.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

# Gradio (tests/test_app.py) writes uploads and downloads under GRADIO_TEMP_DIR, by default
# /tmp/gradio, and never removes them; some of its modules read the variable on import, so
# it is set here, before any test module imports gradio, and the folder is removed at the end
_GRADIO_TEMP = None
if "GRADIO_TEMP_DIR" not in os.environ:
    _GRADIO_TEMP = os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="cait-tests-gradio-")

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_CASE = [pytest.mark.gpu, NEEDS_CUDA]
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=CUDA_CASE)]


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values so that no residual branch is negligible.

    timm initialises LayerScale to 1e-5, which would make most of the network invisible in
    the logits; here gammas are O(0.1-1), norms are near 1 and biases are non-zero, so a
    mistake in any block shows up in the output.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif name.startswith(("blocks", "blocks_token_only")) and "proj_" in name:
                # talking-heads mixing matrices: near identity plus noise, as in trained models
                p.copy_(torch.eye(p.shape[0]) + 0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model


def assert_same_weights(a: Path, b: Path) -> None:
    """The two safetensors files hold the same tensors, bit for bit."""
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    """The message of ``err``, checked to be one line holding every fragment."""
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _full_fp32():
    """fp32 products in full precision (no TF32) on CUDA, as ``cait.runtime.setup`` sets them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True, scope="session")
def _remove_gradio_files():
    """Gradio's files of this test session go with it."""
    yield
    if _GRADIO_TEMP is not None:
        shutil.rmtree(_GRADIO_TEMP, ignore_errors=True)
