"""``cait export``: a checkpoint as ONNX, torch.export (.pt2) or a folder timm loads, each
checked against the eager model's logits."""

from __future__ import annotations

import argparse

from cait.cli._common import CHECKPOINT_HELP, MODEL_HELP, force_flag, positive_int, threads_flag

__all__ = ["EXAMPLES", "PURPOSE", "add_flags", "run"]

PURPOSE = "export to ONNX, torch.export (.pt2) or a folder timm loads"
EXAMPLES = """
cait export runs/demo/model.safetensors --format onnx --output demo.onnx --dynamic-size
cait export runs/demo/model.safetensors --format timm --output demo_timm
cait export runs/demo/model.safetensors --format onnx --output demo_int8.onnx --quantize int8
"""


def add_flags(p: argparse.ArgumentParser) -> None:
    from cait.export import DEFAULT_EXAMPLE_BATCH, FORMATS

    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--output", required=True, help="the .onnx or .pt2 file, or the timm folder")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--batch",
        type=positive_int,
        default=DEFAULT_EXAMPLE_BATCH,
        help="batch size of the traced example (the export takes any)",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: torch's)")
    p.add_argument("--dynamic-size", action="store_true", help="any height and width too")
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="ONNX only: int8 weights, dynamic activations (ONNX Runtime), refused when its "
        "top-1 agreement with fp32 is low",
    )
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the timm folder to this repo")
    force_flag(p, "an earlier export at --output (never a folder of other files)")
    threads_flag(p)


def run(args: argparse.Namespace) -> int:
    from cait.export import export_checkpoint
    from cait.threads import use_threads

    use_threads(args.threads)
    try:
        r = export_checkpoint(
            args.checkpoint,
            args.format,
            args.output,
            model_name=args.model,
            batch=args.batch,
            opset=args.opset,
            dynamic_size=args.dynamic_size,
            overwrite=args.force,
            push_to_hub=args.push_to_hub,
            quantize=args.quantize,
        )
    except ValueError as err:  # a multi-line message (a weights mismatch) on one line
        raise ValueError("; ".join(s.strip() for s in str(err).splitlines() if s.strip())) from err
    shapes = "any batch" + (", any height and width" if r.dynamic_size else "")
    detail = (
        f", opset {r.opset}" if r.opset else f", timm {r.architecture}" if r.architecture else ""
    )
    print(f"wrote {r.output} ({r.format}{detail}, {shapes})")
    figures = ", ".join(
        f"batch {c.batch} at {c.size[0]}x{c.size[1]}: {c.max_abs_diff:.2e}" for c in r.checks
    )
    if r.quantized is not None:
        q = r.quantized
        print(
            f"{r.quantize}: top-1 agreement {q.agreement:.1%} with fp32 on {q.images} random "
            f"images, max |logits - eager logits| {q.max_abs_diff:.3g}"
        )
    else:
        print(
            f"max |logits - eager logits| ({r.reference}): {figures} (tolerance {r.tolerance:.0e})"
        )
    if r.pushed_to:
        print(f"pushed to {r.pushed_to}")
    return 0
