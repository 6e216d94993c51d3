"""Where the time of one batch goes in fp32 and in int8 (``torch.profiler``, the ops with
the most time of their own): the profile behind docs/DEPLOY.md's note on int8's speed.

    python examples/precision_profile.py [--model cait_xxs24_224] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import profile

from cait.bench.compare import CHECK_LAYERSCALE, set_layerscale
from cait.models.registry import create_model, get_variant
from cait.precision import quantize_int8


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="cait_xxs24_224")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    model = create_model(args.model).eval()
    set_layerscale(model, CHECK_LAYERSCALE)
    size = get_variant(args.model).img_size
    x = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    print(f"load average {os.getloadavg()}, {torch.get_num_threads()} threads")
    for name, m in (("fp32", model), ("int8", quantize_int8(model))):
        with torch.inference_mode():
            m(x)  # warm-up
            with profile() as prof:
                m(x)
        print(name)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
