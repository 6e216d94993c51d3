"""The ``cait`` command line: parse, build a config, call one library function."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import yaml
from safetensors import SafetensorError

from cait.analysis.ablation import GRIDS, run_ablation
from cait.analysis.attention import save_attention_maps
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
from cait.models.registry import get_variant, list_models
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
    rows = []
    for name in list_models(args.pattern):
        v = get_variant(name)
        c = v.config
        rows.append(
            {
                "name": name,
                "img_size": c.img_size,
                "embed_dim": c.embed_dim,
                "depth": c.depth,
                "heads": c.num_heads,
                "init_scale": c.init_scale if c.branch_scale == "layerscale" else None,
                "params_m": v.params_m,
                "top1": v.top1,
                "crop_pct": v.crop_pct,
                "url": v.url,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'name':<24}{'img':>5}{'dim':>5}{'depth':>6}{'heads':>6}"
        f"{'eps':>8}{'params':>9}{'top1':>7}{'crop':>6}"
    )
    for r in rows:
        eps = f"{r['init_scale']:.0e}" if r["init_scale"] is not None else "-"
        params = f"{r['params_m']:.2f}M" if r["params_m"] is not None else "-"
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
        print(
            f"{r['name']:<24}{r['img_size']:>5}{r['embed_dim']:>5}{r['depth']:>6}{r['heads']:>6}"
            f"{eps:>8}{params:>9}{top1:>7}{r['crop_pct']:>6}"
        )
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
    flags = [
        f"{key}={json.dumps(getattr(args, name))}"
        for name, key in _TRAIN_FLAGS.items()
        if getattr(args, name) not in (None, False)
    ]
    if args.no_progress:
        flags.append("progress=false")
    return config_from_dict(apply_overrides(data, flags + list(args.set)))


def _cmd_train(args: argparse.Namespace) -> int:
    config = train_config_from_args(args)
    if args.nproc and "WORLD_SIZE" not in os.environ:  # relaunch under torchrun, without --nproc
        i = next(i for i, a in enumerate(args.argv) if a.split("=")[0] == "--nproc")
        rest = args.argv[:i] + args.argv[i + (1 if "=" in args.argv[i] else 2) :]
        return subprocess.call(torchrun_command(args.nproc, rest))
    args.run_output = config.output  # for the message after Ctrl-C
    result = train(config)
    if os.environ.get("RANK", "0") != "0":
        return 0
    last = result.history[-1] if result.history else {}
    print(
        f"outputs in {result.output}: last.pt, best.pt, metrics.jsonl, curves.png"
        + (", model.safetensors" if result.completed else "")
    )
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
    results = save_attention_maps(
        args.checkpoint,
        args.images,
        args.output,
        model_name=args.model,
        sa_block=args.sa_block,
        img_size=args.img_size,
        device=args.device,
    )
    for r in results:
        written = [r[k] for k in ("class_attention_png", "self_attention_png") if k in r]
        print(f"{r['image']}: predicted {r['name']} -> {', '.join(written)}")
    return 0


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
    from cait.app import launch_app  # gradio takes seconds to import: only for this command

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cait", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model variants")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'cait_s*'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("convert", help="convert an official checkpoint to safetensors")
    p.add_argument("src", help="official .pth, plain state dict, URL or Hub id")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--model", help="variant to validate the weights against (strict load)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("train", help="train or fine-tune a model")
    p.add_argument("--model", help="variant name (see `cait models`) or timm:NAME")
    p.add_argument("--data", help="ImageFolder root (train/ and val/) or 'digits'")
    p.add_argument("--output", help="run folder for checkpoints and records")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int, help="per-process batch size")
    p.add_argument("--recipe", help="YAML recipe (see recipes/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. optim.lr=1e-3 (repeatable)",
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
    p.add_argument("--init-from", help="fine-tune from a checkpoint, weights file, URL or Hub id")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=_DEVICES)
    p.add_argument("--amp", choices=_AMPS)
    p.add_argument("--workers", type=int, help="data-loading processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--teacher", help="timm:NAME, torchvision:NAME or one of our checkpoints")
    p.add_argument("--teacher-weights", help="weights file for a timm/torchvision teacher")
    p.add_argument("--distillation", choices=get_args(DistillKind))
    p.add_argument("--distill-alpha", type=float, help="weight of the distillation term")
    p.add_argument("--distill-tau", type=float, help="temperature of soft distillation")
    p.add_argument("--nproc", type=_positive_int, help="N processes on this machine, via torchrun")
    _threads_flag(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a validation split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="ImageFolder root (uses val/) or 'digits'")
    p.add_argument("--model", help="variant, for official/timm weights without a config")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", choices=_DEVICES, default="auto")
    p.add_argument("--amp", choices=_AMPS, default="none")
    p.add_argument("--crop-pct", type=float, help="override the variant's eval crop ratio")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _threads_flag(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="top-k classes for image files")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=_positive_int, default=5, help="classes shown per image")
    p.add_argument("--model", help="variant, for official/timm weights without a config")
    p.add_argument("--device", choices=_DEVICES, default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    _threads_flag(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("attention", help="class-attention maps of images, drawn over them")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--output", required=True, help="folder for the PNG grids and .npy maps")
    p.add_argument("--model", help="variant, for official/timm weights without a config")
    p.add_argument("--sa-block", type=int, help="also draw this self-attention block (from 0)")
    p.add_argument("--img-size", type=_positive_int, help="evaluate at this resolution instead")
    p.add_argument("--device", choices=_DEVICE_TYPES, default="cpu")
    _threads_flag(p)
    p.set_defaults(func=_cmd_attention)

    p = sub.add_parser("residuals", help="residual-branch / stream norm ratios per block")
    p.add_argument("--checkpoint", required=True, nargs="+", help="one or more checkpoints")
    p.add_argument("--label", nargs="+", help="a name per checkpoint for the plot")
    p.add_argument("--data", required=True, help="ImageFolder root (uses val/) or 'digits'")
    p.add_argument("--output", required=True, help="folder for residuals.csv/.png")
    p.add_argument("--model", help="variant, for official/timm weights without a config")
    p.add_argument(
        "--num-images", type=_positive_int, default=256, help="validation images to average"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--device", choices=_DEVICE_TYPES, default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _threads_flag(p)
    p.set_defaults(func=_cmd_residuals)

    p = sub.add_parser("ablate", help="train a grid of ablation configurations, tabulate")
    p.add_argument("--grid", default="default", help="tiny, default or paper (see --list)")
    p.add_argument("--data", help="ImageFolder root or 'digits' (default: the grid's)")
    p.add_argument("--output", help="folder for the runs, results.md and results.png")
    p.add_argument("--seeds", type=_positive_int, help="number of seeds (default: the grid's)")
    p.add_argument("--epochs", type=_positive_int, help="epochs per run (default: the grid's)")
    p.add_argument("--device", choices=_DEVICES, default="auto")
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

    p = sub.add_parser("export", help="export to ONNX, torch.export (.pt2) or a timm folder")
    p.add_argument("checkpoint", help="our checkpoint, or official/timm weights with --model")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help=".onnx or .pt2 file, or the timm folder")
    p.add_argument("--model", help="variant, for official/timm weights without a config")
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

    p = sub.add_parser("bench", help="images/s and peak memory, optionally beside timm")
    p.add_argument("--model", required=True, help="variant name (see `cait models`)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", choices=_DEVICE_TYPES, default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--train", action="store_true", help="time a full training step")
    p.add_argument("--compare", choices=COMPARE_WITH, help="time timm's model alternately")
    p.add_argument("--compare-dtype", choices=list(DTYPES), help="timm's dtype")
    p.add_argument("--autocast", action="store_true", help="autocast instead of casting")
    p.add_argument("--attn-impl", choices=get_args(AttnImpl), help="talking heads")
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

    p = sub.add_parser("app", help="a web page: predictions and attention maps of any image")
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="a checkpoint to serve; repeat it for a model chooser",
    )
    p.add_argument("--model", help="variant, for official/timm weights without a config")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (this machine)")
    p.add_argument("--port", type=int, default=7860)
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


def _after_interrupt(args: argparse.Namespace) -> str:
    """What an interrupted command leaves: for training, the run to continue."""
    output = getattr(args, "run_output", None)
    if args.command != "train" or output is None:
        return ""
    last = Path(output) / LAST
    if not last.is_file():
        return f"; no epoch had finished, so {output} holds no checkpoint"
    return f"; {last} holds the last finished epoch: continue with --resume auto"


# Library messages name a function's parameter; on the command line it is this flag.
_PARAMETER_FLAGS = {"`model_name`": "--model NAME", "`overwrite`": "--force"}


def _in_flags(message: str) -> str:
    for parameter, flag in _PARAMETER_FLAGS.items():
        message = message.replace(parameter, flag)
    return message


if __name__ == "__main__":
    sys.exit(main())
