"""Memory a model holds from forward to backward, per talking-heads path and for timm.

Counts the storage of every tensor autograd saves for the backward pass during one
training-mode forward (``torch.autograd.graph.saved_tensors_hooks``), each storage once,
leaving out the parameters themselves (their autocast copies count). This is the memory
the paths differ in; the peak of a training step adds the backward pass's temporaries
(``cait bench --train`` measures that). Runs on the CPU or a GPU:

    python examples/saved_memory.py --model cait_s24_384 --batch-size 1
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch import nn

import cait


def saved_mib(model: nn.Module, images: torch.Tensor, amp: torch.dtype | None) -> float:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None),
    ):
        model.train()(images)
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cait_s24_384")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    size = cait.get_variant(args.model).img_size
    images = torch.randn(args.batch_size, 3, size, size, device=args.device)
    print(f"{args.model}, batch {args.batch_size}, amp {args.amp}, {args.device}: MiB saved")
    figures = {}
    for impl in ("plain", "fast", "recompute"):
        model = cait.create_model(args.model, attn_impl=impl).to(args.device)
        figures[impl] = saved_mib(model, images, amp)
    figures["timm"] = saved_mib(timm.create_model(args.model).to(args.device), images, amp)
    for name, mib in figures.items():
        print(f"  {name:<10}{mib:9.1f}  {mib / figures['timm']:.2f}x timm")


if __name__ == "__main__":
    main()
