"""The ``cait`` command line: each command parses its flags, builds a config and calls one
library function (``cait --help`` lists them)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import os
import sys
import textwrap
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import yaml
from safetensors import SafetensorError

from cait.analysis.ablation import GRIDS, run_ablation
from cait.analysis.attention import MapStyle, SABlockOutOfRange, save_attention_maps
from cait.analysis.residuals import save_residual_report
from cait.bench import (
    COMPARE_WITH,
    DTYPES,
    benchmark,
    benchmark_under_load,
    format_load_table,
    format_table,
)
from cait.export import DEFAULT_EXAMPLE_BATCH, FORMATS, export_checkpoint
from cait.inference import evaluate_checkpoint, predict
from cait.models.build import convert_checkpoint
from cait.models.config import AttnImpl
from cait.models.registry import variant_rows, variant_table
from cait.runtime import Amp, Device, DeviceType, torchrun_command
from cait.threads import use_threads
from cait.training.checkpoint import LAST
from cait.training.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_recipe,
)
from cait.training.engine import NonFiniteLossError
from cait.training.losses import DistillKind
from cait.training.preemption import TrainingPreempted
from cait.training.run import train

__all__ = ["main"]

# Every closed set of choices comes from the Literal the library defines for it.
_DEVICES = get_args(Device)
_DEVICE_TYPES = get_args(DeviceType)  # the analysis commands and bench take no "auto"
_AMPS = get_args(Amp)


def _cmd_models(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(variant_rows(args.pattern), indent=2))
    else:
        print(variant_table(args.pattern))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    state_dict = convert_checkpoint(args.src, args.dst, model_name=args.model)
    print(f"wrote {len(state_dict)} tensors to {args.dst}")
    return 0


# train flags -> config keys; a flag given on the command line overrides the recipe
_TRAIN_FLAGS = {
    "model": "model",
    "data": "data.path",
    "output": "output",
    "epochs": "epochs",
    "batch_size": "data.batch_size",
    "resume": "resume",
    "init_from": "init_from",
    "seed": "seed",
    "device": "device",
    "amp": "amp",
    "workers": "data.workers",
    "teacher": "distill.teacher",
    "teacher_weights": "distill.teacher_weights",
    "distillation": "distill.kind",
    "distill_alpha": "distill.alpha",
    "distill_tau": "distill.tau",
    "threads": "threads",
    "overwrite": "overwrite",
}


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe, then explicit flags, then ``--set`` overrides, validated."""
    data = load_recipe(args.recipe) if args.recipe else {}
    # a flag not given is None (store_true flags: False); 0 is a value (--workers 0)
    given = {name: getattr(args, name) for name in _TRAIN_FLAGS}
    flags = [
        f"{_TRAIN_FLAGS[name]}={json.dumps(value)}"
        for name, value in given.items()
        if value is not None and value is not False
    ]
    if args.no_progress:
        flags.append("progress=false")
    return config_from_dict(apply_overrides(data, flags + list(args.set)))


def _cmd_train(args: argparse.Namespace) -> int:
    config = train_config_from_args(args)
    if args.nproc and "WORLD_SIZE" not in os.environ:  # relaunch under torchrun, without --nproc
        i = next(i for i, a in enumerate(args.argv) if a.split("=")[0] == "--nproc")
        rest = args.argv[:i] + args.argv[i + (1 if "=" in args.argv[i] else 2) :]
        command = torchrun_command(args.nproc, rest)
        # torchrun takes this process's place (same pid), so a scheduler's SIGTERM or a
        # Ctrl-C reaches torchrun, which passes it on to its workers
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)
    args.train_start = _TrainStart.of(config)  # for the message after Ctrl-C
    result = train(config)
    if os.environ.get("RANK", "0") != "0":
        return 0
    last = result.history[-1] if result.history else {}
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in result.output.iterdir())
    print(f"outputs in {result.output}: {', '.join(n for n in written if n[0] != '.')}")
    if last:
        print(f"final val top-1 {last['val_top1']:.2f}% (best {result.best_top1:.2f}%)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    r = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        model_name=args.model,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
        crop_pct=args.crop_pct,
    )
    summary = {k: r[k] for k in ("top1", "top5", "loss", "images")}
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  "
            f"on {r['images']} images  ({r['images_per_s']:.0f} images/s)"
        )
        if r["skipped"]:
            print(f"skipped {len(r['skipped'])} unreadable file(s)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    results = predict(
        args.checkpoint, args.images, topk=args.topk, model_name=args.model, device=args.device
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["image"])
        for p in r["predictions"]:
            print(f"  {p['probability']:7.2%}  {p['name']}")
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    try:
        results = _save_attention_maps(args)
    except SABlockOutOfRange as err:  # the library counts blocks from 0, the flag from 1
        raise ValueError(
            f"--sa-block must be in 1..{err.depth} (this model's self-attention blocks), "
            f"got {args.sa_block}"
        ) from None
    for r in results:
        written = [r[k] for k in ("class_attention_png", "self_attention_png") if k in r]
        print(f"{r['image']}: predicted {r['name']} -> {', '.join(written)}")
    return 0


def _save_attention_maps(args: argparse.Namespace) -> list[dict]:
    return save_attention_maps(
        args.checkpoint,
        args.images,
        args.output,
        model_name=args.model,
        sa_block=None if args.sa_block is None else args.sa_block - 1,  # an index from 0
        img_size=args.img_size,
        device=args.device,
        style=args.style,
    )


def _cmd_residuals(args: argparse.Namespace) -> int:
    results = save_residual_report(
        args.checkpoint,
        args.data,
        args.output,
        labels=args.label,
        model_name=args.model,
        num_images=args.num_images,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
    )
    for r in results:
        print(
            f"{r.label}: {len(r.attn)} blocks on {r.images} images, attention ratio "
            f"{min(r.attn):.3g}..{max(r.attn):.3g}, MLP ratio {min(r.mlp):.3g}..{max(r.mlp):.3g}"
        )
    print(f"wrote {args.output}/residuals.csv and {args.output}/residuals.png")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    if args.list:
        for g in GRIDS.values():
            print(
                f"{g.name:<9}{len(g.configs)} configurations x {len(g.seeds)} seed(s), "
                f"{g.epochs} epochs: {g.description}"
            )
        return 0
    if args.output is None:
        raise ValueError("--output is required (the folder for runs and results)")
    run_ablation(
        args.grid,
        args.data,
        args.output,
        seeds=args.seeds,
        epochs=args.epochs,
        device=args.device,
        progress=not args.no_progress,
        overrides=args.set,
    )
    print((Path(args.output) / "results.md").read_text())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    overrides = {"attn_impl": args.attn_impl} if args.attn_impl else {}
    options = dict(
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        compile=args.compile,
        train=args.train,
        compare=args.compare,
        compare_dtype=args.compare_dtype,
        autocast=args.autocast,
        rounds=args.rounds,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        **overrides,
    )
    if args.load:
        loaded = benchmark_under_load(args.model, args.load, **options)
        print(json.dumps(loaded.to_dict(), indent=2) if args.json else format_load_table(loaded))
        return 0
    result = benchmark(args.model, **options)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
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
    print(f"max |logits - eager logits| ({r.reference}): {figures} (tolerance {r.tolerance:.0e})")
    if r.pushed_to:
        print(f"pushed to {r.pushed_to}")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    try:  # gradio takes seconds to import: only for this command
        from cait.app import launch_app
    except ImportError as err:
        raise ValueError(f"cait app needs `pip install cait[app]` ({err})") from err

    launch_app(args.checkpoint, args.model, host=args.host, port=args.port, share=args.share)
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse then prints a one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_positive_int,
        help="torch intra-op threads (default: as many as the cores other processes leave "
        "free, up to torch's count, re-checked every 2 s; OMP_NUM_THREADS also pins it)",
    )


# commands that compute in this process with torch's threads (train sets them from its
# config, in cait.runtime.setup)
_THREADED_COMMANDS = ("eval", "predict", "attention", "residuals", "export", "bench", "app")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (when it has one worth showing); the
    examples in the epilogs keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # by identity, not `in (None, False, ...)`: 0 == False, so a default of 0 was hidden
        shown = not (
            default is None or default is False or default == [] or default == argparse.SUPPRESS
        )
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _version() -> str:
    try:
        return importlib.metadata.version("cait")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "(not installed)"


def _train_default(key: str) -> str:
    """A training option's default: the recipe's value, else the config's."""
    value: object = TrainConfig().to_dict()
    for part in key.split("."):
        value = value[part]  # type: ignore[index]
    return f"(default: the recipe's, else {value})"


_MODEL_HELP = "the variant, for official or timm weights that carry no config (see cait models)"
_CHECKPOINT_HELP = (
    "model.safetensors, last.pt or best.pt of a cait run; or official/timm weights "
    "(a file, an http(s) URL or hf-hub:OWNER/NAME) with --model"
)


def _command(sub: argparse._SubParsersAction, name: str, purpose: str, examples: str):
    return sub.add_parser(
        name,
        help=purpose,
        description=purpose[0].upper() + purpose[1:] + ".",
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=_HelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cait",
        description="CaiT image classifiers (Touvron et al., 2021): train, evaluate, predict, "
        "look inside (attention maps, residual ratios), export and benchmark.",
        epilog="Run 'cait COMMAND --help' for a command's options. A user error prints one "
        "line and exits with status 2 (-v shows its traceback); Ctrl-C exits with 130.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    parser.add_argument("--version", action="version", version=f"cait {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "models", "list the model variants", "cait models 'cait_s*'")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'cait_s*'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_models)

    p = _command(
        sub,
        "convert",
        "convert an official checkpoint to safetensors",
        "cait convert XXS24_224.pth xxs24.safetensors --model cait_xxs24_224",
    )
    p.add_argument("src", help="official .pth, plain state dict, http(s) URL or hf-hub:OWNER/NAME")
    p.add_argument("dst", help="the .safetensors file to write")
    p.add_argument("--model", help="a variant to check the weights against (strict load)")
    p.set_defaults(func=_cmd_convert)

    p = _command(
        sub,
        "train",
        "train or fine-tune a model",
        """
        cait train --recipe recipes/digits.yaml --data digits --output runs/digits
        cait train --recipe recipes/digits.yaml --data digits --output runs/digits --resume auto
        cait train --recipe recipes/imagenet_pretrain.yaml --data /data/imagenet \\
            --output runs/s24 --set optim.lr=1e-3 --nproc 8
        """,
    )
    p.add_argument("--recipe", help="a YAML recipe (see recipes/); flags and --set override it")
    p.add_argument(
        "--model", help=f"a variant (cait models) or timm:NAME {_train_default('model')}"
    )
    p.add_argument(
        "--data", help=f"an image folder (train/ and val/) or digits {_train_default('data.path')}"
    )
    p.add_argument(
        "--output", help=f"the run folder (checkpoints, records) {_train_default('output')}"
    )
    p.add_argument(
        "--epochs", type=_positive_int, help=f"epochs to train {_train_default('epochs')}"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        help=f"images per process and step {_train_default('data.batch_size')}",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config field, e.g. optim.lr=1e-3 (repeatable; docs/TRAINING.md)",
    )
    p.add_argument(
        "--resume",
        metavar="LAST_PT|auto",
        help="continue a run from its last.pt; 'auto': the output folder's run if it has one, "
        "else start fresh (what a restarted or requeued job uses)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run the output folder holds (its files go once this run's first "
        "checkpoint is written); without it such a folder is refused",
    )
    p.add_argument(
        "--init-from",
        help="fine-tune from weights: a file, an http(s) URL or hf-hub:OWNER/NAME (the head "
        "is replaced when the class count differs)",
    )
    p.add_argument("--seed", type=int, help=f"random seed {_train_default('seed')}")
    p.add_argument("--device", choices=_DEVICES, help=f"where to run {_train_default('device')}")
    p.add_argument("--amp", choices=_AMPS, help=f"mixed precision {_train_default('amp')}")
    p.add_argument(
        "--workers",
        type=int,
        help=f"data-loading processes {_train_default('data.workers')}",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--teacher", help="distil from timm:NAME, torchvision:NAME or a cait checkpoint")
    p.add_argument("--teacher-weights", help="a weights file for a timm/torchvision teacher")
    p.add_argument(
        "--distillation",
        choices=get_args(DistillKind),
        help=f"the distillation loss {_train_default('distill.kind')}",
    )
    p.add_argument(
        "--distill-alpha",
        type=float,
        help=f"weight of the distillation term {_train_default('distill.alpha')}",
    )
    p.add_argument(
        "--distill-tau",
        type=float,
        help=f"temperature of soft distillation {_train_default('distill.tau')}",
    )
    p.add_argument(
        "--nproc",
        type=_positive_int,
        help="N data-parallel processes on this machine, via torchrun (default: one process)",
    )
    _threads_flag(p)
    p.set_defaults(func=_cmd_train)

    p = _command(
        sub,
        "eval",
        "evaluate a checkpoint on a validation split",
        """
        cait eval --checkpoint runs/demo/model.safetensors --data digits
        cait eval --checkpoint XXS24_224.pth --model cait_xxs24_224 --data /data/imagenet
        """,
    )
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--data", required=True, help="an image folder (its val/ is used) or digits")
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--device", choices=_DEVICES, default="auto", help="where to run")
    p.add_argument("--amp", choices=_AMPS, default="none", help="mixed precision")
    p.add_argument(
        "--crop-pct", type=float, help="the centre crop's ratio (default: the checkpoint's)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _threads_flag(p)
    p.set_defaults(func=_cmd_eval)

    p = _command(
        sub,
        "predict",
        "the top classes of image files",
        "cait predict --checkpoint runs/demo/model.safetensors runs/demo/samples/*.png",
    )
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--topk", type=_positive_int, default=5, help="classes shown per image")
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--device", choices=_DEVICES, default="auto", help="where to run")
    p.add_argument("--json", action="store_true", help="print JSON")
    _threads_flag(p)
    p.set_defaults(func=_cmd_predict)

    p = _command(
        sub,
        "attention",
        "class-attention maps of images, drawn over them",
        """
        cait attention --checkpoint runs/demo/model.safetensors runs/demo/samples/*.png \\
            --output runs/demo/attention --sa-block 2
        """,
    )
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--output", required=True, help="folder for the PNG grids and .npy maps")
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument(
        "--sa-block",
        type=_positive_int,
        help="also draw self-attention block N, counted from 1 as in the pictures and the "
        "paper (default: class attention only)",
    )
    p.add_argument(
        "--style",
        choices=get_args(MapStyle),
        default="blocks",
        help="each token as a block of pixels, or a smoothed overlay",
    )
    p.add_argument(
        "--img-size", type=_positive_int, help="run at this resolution (default: the model's)"
    )
    p.add_argument("--device", choices=_DEVICE_TYPES, default="cpu", help="where to run")
    _threads_flag(p)
    p.set_defaults(func=_cmd_attention)

    p = _command(
        sub,
        "residuals",
        "how much each block's residual branches add to the stream (norm ratios)",
        """
        cait residuals --checkpoint runs/a/model.safetensors runs/b/model.safetensors \\
            --label layerscale rezero --data digits --output runs/residuals
        """,
    )
    p.add_argument(
        "--checkpoint", required=True, nargs="+", help="one or more checkpoints to compare"
    )
    p.add_argument("--label", nargs="+", help="a name per checkpoint (default: their paths)")
    p.add_argument("--data", required=True, help="an image folder (its val/ is used) or digits")
    p.add_argument("--output", required=True, help="folder for residuals.csv and .png")
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument(
        "--num-images", type=_positive_int, default=256, help="validation images to average"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch")
    p.add_argument("--device", choices=_DEVICE_TYPES, default="cpu", help="where to run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _threads_flag(p)
    p.set_defaults(func=_cmd_residuals)

    p = _command(
        sub,
        "ablate",
        "train a grid of ablation configurations and tabulate them",
        """
        cait ablate --list
        cait ablate --grid tiny --output runs/ablation
        """,
    )
    p.add_argument("--grid", default="default", help="tiny, default or paper (see --list)")
    p.add_argument("--data", help="an image folder or digits (default: the grid's)")
    p.add_argument("--output", help="folder for the runs, results.md and results.png")
    p.add_argument("--seeds", type=_positive_int, help="number of seeds (default: the grid's)")
    p.add_argument("--epochs", type=_positive_int, help="epochs per run (default: the grid's)")
    p.add_argument("--device", choices=_DEVICES, default="auto", help="where to run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training setting for every run, e.g. data.batch_size=256 (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="list the grids and exit")
    p.set_defaults(func=_cmd_ablate)

    p = _command(
        sub,
        "export",
        "export to ONNX, torch.export (.pt2) or a folder timm loads",
        """
        cait export runs/demo/model.safetensors --format onnx --output demo.onnx --dynamic-size
        cait export runs/demo/model.safetensors --format timm --output demo_timm
        """,
    )
    p.add_argument("checkpoint", help=_CHECKPOINT_HELP)
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--output", required=True, help="the .onnx or .pt2 file, or the timm folder")
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=DEFAULT_EXAMPLE_BATCH,
        help="batch size of the traced example (the export takes any)",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: torch's)")
    p.add_argument("--dynamic-size", action="store_true", help="any height and width too")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the timm folder to this repo")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    _threads_flag(p)
    p.set_defaults(func=_cmd_export)

    p = _command(
        sub,
        "bench",
        "images/s and peak memory, optionally beside timm",
        """
        cait bench --model cait_xxs24_224 --compare timm
        cait bench --model cait_s24_224 --device cuda --dtype bf16 --train --compare timm
        """,
    )
    p.add_argument("--model", required=True, help="a variant (see cait models)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per step")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="precision")
    p.add_argument("--device", choices=_DEVICE_TYPES, default="cpu", help="where to run")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--train", action="store_true", help="time a full training step")
    p.add_argument("--compare", choices=COMPARE_WITH, help="time timm's model alternately")
    p.add_argument("--compare-dtype", choices=list(DTYPES), help="timm's dtype (default: ours)")
    p.add_argument("--autocast", action="store_true", help="autocast instead of casting")
    p.add_argument(
        "--attn-impl",
        choices=get_args(AttnImpl),
        help="the talking-heads implementation (default: the variant's)",
    )
    p.add_argument("--rounds", type=_positive_int, default=5, help="timed rounds (median reported)")
    p.add_argument("--steps", type=_positive_int, default=2, help="steps per timed round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument(
        "--load",
        type=int,
        default=0,
        metavar="N",
        help="time it idle, then again beside N busy processes it starts and stops itself",
    )
    _threads_flag(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_bench)

    p = _command(
        sub,
        "app",
        "a web page: the prediction and attention maps of any image",
        "cait app --checkpoint runs/demo/model.safetensors   # then open http://127.0.0.1:7860",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="a checkpoint to serve; repeat it for a model chooser",
    )
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also a public gradio.live link")
    _threads_flag(p)
    p.set_defaults(func=_cmd_app)
    return parser


# Exit statuses: 2 for a failure the user can fix (a bad path, value or file; argparse's
# own), 75 for a run stopped by a preemption signal with its last.pt written (EX_TEMPFAIL
# of sysexits.h: try again, with --resume auto), 130 for Ctrl-C (128 + SIGINT, the shell's
# convention).
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
# What a user's input can raise: a bad value or file (ValueError and the errors of YAML and
# safetensors), a path that is missing, unreadable or not writable, a full disk, an
# unreachable URL (OSError), a run that diverged. Anything else is a bug: a traceback.
_USER_ERRORS = (ValueError, OSError, yaml.YAMLError, SafetensorError, NonFiniteLossError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user's error ends in one line on stderr (its traceback with
    ``-v``) and exit status 2, Ctrl-C in exit status 130."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    rank = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""  # set by torchrun
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s",
    )
    prefix = f"{rank}cait {args.command}"
    try:
        if args.command in _THREADED_COMMANDS:
            use_threads(args.threads)
        return args.func(args)
    except TrainingPreempted as stop:
        print(f"{prefix}: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print(f"{prefix}: interrupted{_after_interrupt(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _USER_ERRORS as err:
        if args.verbose:
            traceback.print_exc()
        print(f"{prefix}: error: {_in_flags(_one_line(err))}", file=sys.stderr)
        return EXIT_USER_ERROR


def _one_line(err: BaseException) -> str:
    """An error as one line: an OSError names its file and reason in words, a multi-line
    message is joined with '; '."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{err.filename}: {err.strerror}"  # not "[Errno 13] Permission denied: '...'"
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror
    else:
        text = str(err) or type(err).__name__
    if isinstance(err, yaml.YAMLError):
        text = f"invalid YAML: {text}"
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """Which file ``path`` is, as far as a checkpoint's atomic rename changes it (device,
    inode, modification time); None when there is none."""
    try:
        st = path.stat()
    except OSError:  # none, or an output that is no folder (train reports that)
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


@dataclasses.dataclass(frozen=True)
class _TrainStart:
    """What the message after Ctrl-C needs from the start of ``cait train``."""

    output: Path
    overwrite: bool
    last: tuple[int, int, int] | None  # last.pt's identity before the run

    @classmethod
    def of(cls, config: TrainConfig) -> _TrainStart:
        output = Path(config.output)
        return cls(output, config.overwrite, _file_identity(output / LAST))


def _after_interrupt(args: argparse.Namespace) -> str:
    """What an interrupted command leaves: for training, the run to continue."""
    start: _TrainStart | None = getattr(args, "train_start", None)
    if args.command != "train" or start is None:
        return ""
    last = start.output / LAST
    now = _file_identity(last)
    if now is None:
        return f"; no checkpoint was written yet, so {start.output} holds none"
    if now == start.last and start.overwrite:
        # an earlier run's last.pt, kept until this run's first checkpoint (RunFolder):
        # resuming it would continue the run that --overwrite was to replace
        return (
            f"; this run wrote no checkpoint, so {start.output} holds the earlier run, "
            "left as it was (nothing replaced)"
        )
    return f"; {last} holds the run's last checkpoint: continue with --resume auto"


# Library messages name a function's parameter; on the command line it is this flag.
_PARAMETER_FLAGS = {"`model_name`": "--model NAME", "`overwrite`": "--force"}


def _in_flags(message: str) -> str:
    for parameter, flag in _PARAMETER_FLAGS.items():
        message = message.replace(parameter, flag)
    return message


if __name__ == "__main__":
    sys.exit(main())
