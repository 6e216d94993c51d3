"""The talking-heads kernels as ``torch.library`` ops: registration checked by ``opcheck``,
one node of a compiled graph (no graph break, no Python path traced), compiled equal to
eager, and kept out of ``torch.export`` programs (which hold standard ops only)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import randomize_

import cait
from cait.kernels import native, ops
from cait.models.layers import TalkingHeadAttention

TOL = dict(atol=1e-5, rtol=1e-5)

needs_native = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None or os.environ.get("CAIT_NATIVE") == "0",
    reason="no C++ compiler (or CAIT_NATIVE=0): the CPU kernel is not built here",
)


def _op_args(keep: bool, B: int = 2, N: int = 5, H: int = 3, hd: int = 4) -> tuple:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * hd, generator=g, requires_grad=True)
    weights = [torch.randn(*s, generator=g, requires_grad=True) for s in [(H, H), (H,)] * 2]
    return (qkv, *weights, H, keep)


def _op_nodes(graph: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in graph.graph.nodes if str(n.target).startswith("cait.")]


@needs_native
@pytest.mark.parametrize("keep", [True, False], ids=["keep", "recompute"])
def test_cpu_op_passes_opcheck(keep):
    """Schema, fake implementation, autograd registration and tracing (torch's own checks)."""
    assert native.available()
    torch.library.opcheck(ops.talking_heads_cpu, _op_args(keep))


@needs_native
def test_compiled_graph_holds_the_cpu_op_whole():
    """Forward and training: one graph, no break, and the C++ op in it (before the op was
    registered, the compiler traced the Python path: no cait op in the graph)."""
    assert native.available()
    model = cait.create_model("cait_digits_16")
    x = torch.randn(2, 3, 16, 16)
    for train in (False, True):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.train(train))(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        nodes = _op_nodes(explanation.graphs[0])
        assert nodes == ["cait.talking_heads_cpu.default"] * model.config.depth, nodes


@needs_native
@pytest.mark.parametrize("impl", ["fast", "recompute"])
def test_compiled_attention_equals_eager(impl):
    """One talking-heads layer compiled whole (``fullgraph``): output and every gradient
    equal to eager's within fp32 rounding, with and without kept tensors."""
    torch._dynamo.reset()
    eager = randomize_(TalkingHeadAttention(24, 3, impl=impl))
    compiled = torch.compile(eager, fullgraph=True)
    x = torch.randn(3, 7, 24)
    g_out = torch.randn(3, 7, 24)
    results = []
    for module in (eager, compiled):
        xi = x.clone().requires_grad_()
        out = module(xi)[0]
        params = [xi, *eager.parameters()]
        results.append([out, *torch.autograd.grad(out, params, g_out)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], eager(x)[0], **TOL)


def test_exported_program_holds_standard_ops_only():
    """``torch.export`` traces the Python path, so ONNX and pt2 need no cait op."""
    layer = randomize_(TalkingHeadAttention(24, 3)).eval()
    x = torch.randn(2, 7, 24)
    program = torch.export.export(layer, (x,))
    assert _op_nodes(program.graph_module) == []
    torch.testing.assert_close(program.module()(x)[0], layer(x)[0], **TOL)
