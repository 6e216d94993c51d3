"""The model code of another commit against this checkout's, in one process, same weights.

Ratios between processes drift on a shared machine (docs/BENCHMARKS.md); two versions of
the model in one process, timed in alternate rounds whose order flips, cancel that drift.
The other version is copied under the name ``cait_before`` (its ``cait`` imports renamed)
and shares this checkout's C++ kernel (two kernels cannot both register ``torch.ops.cait``),
so what is compared is the Python model code around the kernel:

    git worktree add /tmp/before <commit>
    .venv/bin/python examples/model_speed_before_after.py /tmp/before/src cait_xxs24_224
    .venv/bin/python examples/model_speed_before_after.py /tmp/before/src cait_xxs24_224 --train

``--same`` times two models of this checkout against each other instead (the noise floor).
The other version must be one with the flat layout or this one (its ``create_model`` is
taken from its top-level package).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cait

_IMPORT = re.compile(r"\b(from|import) cait\b")


def import_before(src: Path) -> object:
    """The package under ``src/cait`` as ``cait_before``, sharing this checkout's kernel."""
    root = Path(tempfile.mkdtemp(prefix="cait_before_"))
    shutil.copytree(src / "cait", root / "cait_before")
    for path in (root / "cait_before").rglob("*.py"):
        path.write_text(_IMPORT.sub(r"\1 cait_before", path.read_text()))
    for native in (root / "cait_before").rglob("native.py"):
        with open(native, "a") as f:  # every later _load() call asks this checkout's loader
            f.write("\n\ndef _load():\n    import cait.kernels.native\n\n")
            f.write("    return cait.kernels.native.available()\n")
    sys.path.insert(0, str(root))
    import cait_before

    return cait_before


def _step(model: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    if not train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode():
                model(x)

        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    target = torch.zeros(x.shape[0], dtype=torch.long)

    def train_step() -> None:
        out = model(x)
        F.cross_entropy(out[0] if isinstance(out, tuple) else out, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the other version's src/ folder")
    parser.add_argument("model", help="variant name")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--train", action="store_true", help="time a training step")
    parser.add_argument("--same", action="store_true", help="this checkout against itself")
    args = parser.parse_args()

    torch.manual_seed(0)
    before = cait if args.same else import_before(args.before)
    models = {"before": before.create_model(args.model), "after": cait.create_model(args.model)}
    models["after"].load_state_dict(models["before"].state_dict())
    with torch.no_grad():  # a LayerScale at which every branch counts, as `cait bench` sets
        for model in models.values():
            for name, p in model.named_parameters():
                if name.endswith(("gamma_1", "gamma_2")):
                    p.fill_(0.1)
    size = models["after"].config.img_size
    x = torch.randn(args.batch_size, 3, size, size)
    with torch.inference_mode():
        a, b = (m.eval()(x[:2]) for m in models.values())
    print(f"largest logit difference: {(a - b).abs().max().item():.3g}")
    steps = {name: _step(m, x, args.train) for name, m in models.items()}
    for step in steps.values():  # warm-up
        step()
        step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
    ratios = [a / b for a, b in zip(rates["after"], rates["before"], strict=True)]
    print(
        f"{args.model} {'training' if args.train else 'inference'} batch {args.batch_size}: "
        f"before {statistics.median(rates['before']):.2f} img/s, "
        f"after {statistics.median(rates['after']):.2f} img/s; after/before per round: "
        f"median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
