"""How long `cait app` takes to answer one image, for cait_digits_16 and cait_xxs24_224.

Three figures per model, each the median of ``--rounds`` runs after two warm-up runs:

- ``analyse``: :func:`cait.app.analyse` in this process (the forward pass with its trace,
  top-k, the attention maps and the residual ratios), on an image already read;
- ``page``: the page's own event through ``gradio_client`` against a local server: the
  upload, Gradio's queue, reading the file, the analysis, drawing every class-attention
  map and the self-attention view, and fetching the pictures back (the answer a person
  waits for);
- ``plot``: the residual plot the page draws next, in this process (matplotlib, then
  Gradio's conversion to PNG);
- ``api``: the ``/predict`` endpoint through ``gradio_client`` (the analysis as JSON).

The issue's targets, on 2 CPU cores: under 0.5 s for cait_digits_16 and under 3 s for
cait_xxs24_224. Weights do not change the time: the digits model is runs/demo's when it
exists, and xxs24 gets random weights saved as an official-format file (so the ImageNet
class names and the ``--model`` path are those of real use).

    .venv/bin/python examples/app_speed.py [--rounds 10] [--threads N]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import torch

from cait.app import (
    DIGIT_EXAMPLES,
    MEAN_OF_HEADS,
    PHOTO_EXAMPLES,
    analyse,
    build_app,
    check_image,
    load_app_models,
    residual_plot,
    serve,
)
from cait.models.registry import create_model, get_variant
from cait.models.weights_file import checkpoint_metadata, model_spec, save_safetensors
from cait.threads import use_threads

DEMO = Path("runs/demo/model.safetensors")


def _median_seconds(fn: Callable[[], object], rounds: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _checkpoints(folder: Path) -> list[tuple[str, str | None, Path]]:
    """(checkpoint, --model, example image) for the two models."""
    if DEMO.is_file():
        digits = DEMO
    else:
        model = create_model("cait_digits_16")
        spec = model_spec("cait_digits_16", model, {})
        meta = checkpoint_metadata(
            spec, get_variant("cait_digits_16").input_spec, list("0123456789")
        )
        digits = folder / "digits.safetensors"
        save_safetensors(model.state_dict(), digits, meta)
    xxs24 = folder / "XXS24_224.pth"
    torch.save({"model": create_model("cait_xxs24_224").state_dict()}, xxs24)
    return [
        (str(digits), None, DIGIT_EXAMPLES[0]),
        (str(xxs24), "cait_xxs24_224", PHOTO_EXAMPLES[0]),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_model(checkpoint: str, model_name: str | None, image: Path, rounds: int) -> str:
    """The three figures for one model, as a line of text."""
    from gradio_client import Client, handle_file

    (app_model,) = load_app_models([checkpoint], model_name)
    picture = check_image(image, app_model.model.config.patch_size)
    analysed = _median_seconds(lambda: analyse(app_model, picture), rounds)
    plot = gr.Plot(format="png")
    analysis = analyse(app_model, picture)
    plotted = _median_seconds(lambda: plot.postprocess(residual_plot(analysis)), rounds)

    app = build_app([app_model])
    port = _free_port()
    serve(app, port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        label, file = app_model.label, handle_file(str(image))
        depth = len(app_model.model.blocks)
        page = _median_seconds(
            lambda: client.predict(file, label, depth - 1, MEAN_OF_HEADS, api_name="/page"), rounds
        )
        api = _median_seconds(lambda: client.predict(file, label, api_name="/predict"), rounds)
    finally:
        app.close()
    return (
        f"{Path(checkpoint).name:<24} {app_model.describe()}\n"
        f"  analyse {analysed * 1000:5.0f} ms   page {page * 1000:5.0f} ms   "
        f"plot {plotted * 1000:5.0f} ms   api {api * 1000:5.0f} ms   "
        f"(median of {rounds}, {torch.get_num_threads()} threads)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, help="pin torch's threads (default: adaptive)")
    args = parser.parse_args()
    use_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for checkpoint, model_name, image in _checkpoints(Path(tmp)):
            print(time_model(checkpoint, model_name, image, args.rounds), flush=True)


if __name__ == "__main__":
    main()
