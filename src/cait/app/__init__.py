"""``cait app``: a web page that shows what a CaiT model predicts for an image and where its
attention goes (Gradio). This module is the page: its layout, its events and the server,
and the one module of the package that imports gradio (only ``cait app`` imports it);
:mod:`cait.app.served` holds the models it serves and one image's run through them,
:mod:`cait.app.uploads` what a request may name.

For an uploaded, pasted or example image the page shows the top-k classes as a chart; the
class-attention map of every CA block and head, and their mean, over the image as the model
saw it; a self-attention view (pick a block and a head, click a patch: where that patch
looks); the residual-branch ratios of this image; and the map of a chosen explanation
(:mod:`cait.analysis.explain`). As for ``cait predict``, the image is read and checked by
:func:`cait.inference.read_checked_image` and run once through the model by
:func:`cait.inference.predict_image` (top-k, and here the model's trace); the trace is
read by :mod:`cait.analysis.explore`; nothing goes through hooks.

The models are loaded once, before the server starts, and kept. Every event that runs a
model goes through Gradio's queue in one concurrency group, one event at a time: on a CPU
two forwards at once are no faster than one after the other, and a burst of requests waits
its turn instead of failing. The same analysis, as JSON, is the HTTP endpoint ``/predict``
(for ``gradio_client``; see the README).

Uploads are untrusted. A request names its image by a path, and the app reads only a
regular file inside its own upload folder (:func:`uploaded_file`, before anything opens
it); any other path gets one refusal that says nothing about the server's files. The file
is then read as RGB (grayscale, RGBA, palette and 16-bit images are converted), after a
look at its header refuses images of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (where
PIL itself only warns) and images smaller than one patch. The image events skip Gradio's
decoding (``preprocess=False``), so every other value a client sends them, and the
``/predict`` endpoint's, is checked here before use: the model, the SA block, the head.
Every refusal is a one-line message on the page (an error of the endpoint), logged in one
line; the server keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import reprlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from cait.analysis.explain import METHODS
from cait.analysis.explore import (
    Analysis,
    class_attention_pictures,
    explanation_view,
    patch_at,
    residual_plot,
    self_attention_view,
)
from cait.app.served import TOPK, AppModel, analyse, load_app_models, retrace
from cait.app.uploads import NOT_UPLOADED, check_image, uploaded, uploaded_file

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DIGIT_EXAMPLES",
    "EXAMPLES_DIR",
    "MEAN_OF_HEADS",
    "NOT_UPLOADED",
    "PHOTO_EXAMPLES",
    "TOPK",
    "AppModel",
    "analyse",
    "build_app",
    "check_image",
    "launch_app",
    "load_app_models",
    "retrace",
    "serve",
    "uploaded_file",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # this machine only; --host 0.0.0.0 opens it to the network
DEFAULT_PORT = 7860  # Gradio's own default
MEAN_OF_HEADS = "mean of heads"
# One group for every event that runs a model: they take turns (module docstring).
MODEL_QUEUE = "model"
# Pages whose last analysis the server keeps (Gradio's default is 10000): an xxs24 analysis
# holds about 2 MB, an m48 one about 45 MB.
STATE_SESSIONS = 64

# Example images shipped with the package: three of the bundled digits (scikit-learn's,
# written by cait.data.export_digits) and two photos from scikit-image's data module,
# released without copyright restrictions (chelsea: CC0, Stefan van der Walt; coffee: CC0,
# Rachel Michetti), resized to 256 pixels on the short side.
EXAMPLES_DIR = Path(__file__).parents[1] / "app_examples"  # src/cait/app_examples
DIGIT_EXAMPLES = sorted(EXAMPLES_DIR.glob("digit_*.png"))
PHOTO_EXAMPLES = sorted(EXAMPLES_DIR.glob("*.jpg"))

INTRO = (
    "# CaiT: what the class token looks at\n"
    "Drop, paste or upload an image, or pick an example. The class-attention maps "
    "show where the class token looks in each class-attention block and head; "
    "below them, click a patch to see where it looks in a self-attention block."
)


# ------------------------------------------------------------------ the client's choices


def _sa_block(value: object, depth: int) -> int:
    """The SA block slider's value (from 1), a raw number from the client, as an index from
    0 within the model."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"the SA block must be a number from 1 to {depth}")
    return min(max(int(value), 1), depth) - 1


def _head_choices(num_heads: int) -> list[str]:
    return [MEAN_OF_HEADS] + [f"head {h}" for h in range(num_heads)]


def _head_index(choice: object, num_heads: int) -> int | None:
    """The SA head dropdown's choice as a head index (``None``: the mean of the heads)."""
    choices = _head_choices(num_heads)
    if not choice or choice == MEAN_OF_HEADS:
        return None
    if choice not in choices:
        raise ValueError(f"the SA head must be one of {choices}")
    return choices.index(choice) - 1


def _heads(analysis: Analysis) -> int:
    """The heads of the analysis's SA block (those of the model it came from)."""
    return len(analysis.maps.self_attention)  # (H, N', N')


def _summary(app_model: AppModel, analysis: Analysis, image: Image.Image) -> str:
    best = analysis.predictions[0]
    return (
        f"**{best['name']}** ({best['probability']:.1%}) from `{app_model.label}`: "
        f"the {image.width}x{image.height} image was resized and cropped to "
        f"{analysis.x.shape[-1]}x{analysis.x.shape[-2]}; {analysis.seconds * 1000:.0f} ms."
    )


# ---------------------------------------------------------------------------- the events

NOTHING = (None, None, None, None)  # no top classes, maps, view or analysis


class _Events:
    """The page's answers, for the served models and the app's upload folder. Their inputs
    are the client's: a model label, a path, a block or a head is checked before use."""

    def __init__(self, models: Sequence[AppModel], uploads: Path) -> None:
        self.by_label = {m.label: m for m in models}
        self.uploads = uploads

    def _model(self, label: object) -> AppModel:
        if not isinstance(label, str) or label not in self.by_label:
            served = list(self.by_label)
            raise ValueError(f"unknown model {reprlib.repr(label)}; this app serves {served}")
        return self.by_label[label]

    def image(self, payload: object, label: object, block: object, head: object) -> tuple:
        """A new image (uploaded, pasted, an example) or a model chosen for it."""
        try:
            app_model = self._model(label)
            path = uploaded(payload, self.uploads)
            if path is None:
                return ("", *NOTHING)
            sa_block = _sa_block(block, len(app_model.model.blocks))
            head_index = _head_index(head, app_model.model.config.num_heads)
            image = check_image(path, app_model.model.config.patch_size)
            analysis = analyse(app_model, image, sa_block)
        except ValueError as err:
            logger.info("refused an image: %s", err)
            return (f"**Cannot use this image.** {err}", *NOTHING)
        return (
            _summary(app_model, analysis, image),
            analysis.top(),
            class_attention_pictures(analysis),
            self_attention_view(analysis, head_index),
            analysis,
        )

    def model(self, label: str) -> tuple:
        """Another model chosen: its description, blocks, heads and examples."""
        app_model = self._model(label)
        depth = len(app_model.model.blocks)
        return (
            f"`{label}`: {app_model.describe()}.",
            gr.Slider(minimum=1, maximum=depth, value=depth),
            gr.Dropdown(
                choices=_head_choices(app_model.model.config.num_heads), value=MEAN_OF_HEADS
            ),
            gr.Gallery(columns=app_model.model.config.num_heads + 1),
            gr.Column(visible=app_model.digits),
            gr.Column(visible=not app_model.digits),
        )

    def block(self, analysis: Analysis | None, label: str, block: float, head: str | None):
        """Another SA block: one more forward for its attention."""
        if analysis is None:
            return None, None
        app_model = self._model(label)
        analysis = retrace(app_model, analysis, _sa_block(block, len(app_model.model.blocks)))
        return self_attention_view(analysis, _head_index(head, _heads(analysis))), analysis

    def head(self, analysis: Analysis | None, head: str | None):
        if analysis is None:
            return None
        return self_attention_view(analysis, _head_index(head, _heads(analysis)))

    def click(self, analysis: Analysis | None, head: str | None, evt: gr.SelectData):
        """A patch clicked in the self-attention view: where it looks."""
        if analysis is None:
            return None, None
        x, y = evt.index
        analysis = dataclasses.replace(analysis, query=patch_at(analysis, x, y))
        return self_attention_view(analysis, _head_index(head, _heads(analysis))), analysis

    def explain(self, analysis: Analysis | None, label: object, method: object):
        """The chosen method's map of the analysed image: one more forward (and backward)."""
        if analysis is None:
            return None
        picture, caption = explanation_view(analysis, self._model(label).model, method)
        return gr.Image(picture, label=caption)

    def answer(self, image: object, model: object, topk: object) -> dict:
        """The ``/predict`` endpoint's answer (:meth:`Analysis.to_dict`)."""
        app_model = self._model(model)
        if isinstance(topk, bool) or not isinstance(topk, int):
            raise ValueError("topk must be an integer >= 1")
        path = uploaded(image, self.uploads)
        if path is None:
            raise ValueError(NOT_UPLOADED)
        picture = check_image(path, app_model.model.config.patch_size)
        return {"model": model, **analyse(app_model, picture, topk=topk).to_dict()}


def _api(events: _Events, default: str) -> Callable[..., dict]:
    """The ``/predict`` endpoint: its signature and docstring are its API page."""

    def predict(image: dict, model: str = default, topk: int = TOPK) -> dict:
        """Top-k classes, class-attention maps (CA block, head, grid row, grid column) and
        residual ratios of one image, as JSON; ``image`` is a file (gradio_client's
        ``handle_file``), ``model`` the checkpoint as given to ``cait app``."""
        try:
            return events.answer(image, model, topk)
        except ValueError as err:
            logger.info("refused a request: %s", err)
            raise gr.Error(str(err), print_exception=False) from None  # no traceback

    return predict


# ---------------------------------------------------------------------------- the layout


@dataclass
class _Parts:
    """The page's components that events read or change."""

    chooser: gr.Dropdown
    info: gr.Markdown
    image: gr.Image
    digit_examples: gr.Column
    photo_examples: gr.Column
    status: gr.Markdown
    top: gr.Label
    gallery: gr.Gallery
    block: gr.Slider
    head: gr.Dropdown
    view: gr.Image
    method: gr.Radio
    explained: gr.Image
    plot: gr.Plot
    state: gr.State


def _input_column(models: Sequence[AppModel]) -> dict[str, Any]:
    """The model chooser, its description, the image box and the examples that fit."""
    first = models[0]
    with gr.Column(scale=1):
        chooser = gr.Dropdown(
            [m.label for m in models],
            value=first.label,
            label="Model",
            visible=len(models) > 1,
            elem_id="model",
        )
        info = gr.Markdown(f"`{first.label}`: {first.describe()}.", elem_id="info")
        image = gr.Image(
            type="filepath",
            sources=["upload", "clipboard"],
            label="Image",
            height=280,
            elem_id="image",
        )
        with gr.Column(visible=first.digits) as digit_examples:
            gr.Examples([[str(p)] for p in DIGIT_EXAMPLES], [image], label="Digits")
        with gr.Column(visible=not first.digits) as photo_examples:
            gr.Examples([[str(p)] for p in PHOTO_EXAMPLES], [image], label="Photos")
    return dict(
        chooser=chooser,
        info=info,
        image=image,
        digit_examples=digit_examples,
        photo_examples=photo_examples,
    )


def _answer_column() -> dict[str, Any]:
    """The one-line summary (or refusal) and the top classes."""
    with gr.Column(scale=1):
        status = gr.Markdown(elem_id="status")
        top = gr.Label(num_top_classes=TOPK, label="Top classes", elem_id="top")
    return dict(status=status, top=top)


def _maps_row(first: AppModel) -> dict[str, Any]:
    """The class-attention gallery; the self-attention view with its block and head."""
    depth = len(first.model.blocks)
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Class attention: each CA block (from 1) and head (from 0), and the mean",
                columns=first.model.config.num_heads + 1,
                height="auto",
                format="png",
                allow_preview=False,
                elem_id="ca-maps",
            )
        with gr.Column(scale=2):
            with gr.Row():
                # numbered from 1, as the CA blocks' captions and the paper's figures
                block = gr.Slider(
                    1, depth, value=depth, step=1, label="SA block", elem_id="sa-block"
                )
                head = gr.Dropdown(
                    _head_choices(first.model.config.num_heads),
                    value=MEAN_OF_HEADS,
                    label="SA head",
                    elem_id="sa-head",
                )
            view = gr.Image(
                type="pil",
                format="png",
                interactive=False,
                label="Self-attention: click a patch",
                elem_id="sa-view",
            )
    return dict(gallery=gallery, block=block, head=head, view=view)


def _explain_row() -> dict[str, Any]:
    """The method chooser and the chosen method's map."""
    with gr.Row():
        method = gr.Radio(list(METHODS), value=METHODS[0], label="Explain by", elem_id="method")
        explained = gr.Image(type="pil", format="png", interactive=False, elem_id="explained")
    return dict(method=method, explained=explained)


def _residuals_row() -> dict[str, Any]:
    """The residual plot, and the page's last analysis (kept an hour)."""
    gr.Markdown("Residual branches of this image: ||branch|| / ||stream|| per block")
    plot = gr.Plot(show_label=False, format="png", elem_id="residuals")
    state = gr.State(time_to_live=3600)
    return dict(plot=plot, state=state)


def _wire(events: _Events, p: _Parts) -> None:
    """Which event runs which answer; those that run a model take turns (MODEL_QUEUE)."""
    outputs = [p.status, p.top, p.gallery, p.view, p.state]
    image_inputs = [p.image, p.chooser, p.block, p.head]
    private: dict[str, Any] = {"api_visibility": "private"}
    queued: dict[str, Any] = {"concurrency_id": MODEL_QUEUE, **private}

    def plot(analysis: Analysis | None):  # slower than the model and the maps: it follows
        return None if analysis is None else residual_plot(analysis)

    explain = dict(fn=events.explain, inputs=[p.state, p.chooser, p.method], **queued)
    # the page's own answer, also callable by clients (examples/app_speed.py times it)
    p.image.change(
        events.image,
        image_inputs,
        outputs,
        api_name="page",
        concurrency_id=MODEL_QUEUE,
        api_visibility="undocumented",
        preprocess=False,  # the image's file as uploaded: check_image reads it
        trigger_mode="always_last",  # an image dropped while one runs is answered next
    ).then(plot, [p.state], [p.plot], **private).then(outputs=[p.explained], **explain)
    model_parts = [p.info, p.block, p.head, p.gallery, p.digit_examples, p.photo_examples]
    p.chooser.change(events.model, [p.chooser], model_parts, **private).then(
        events.image, image_inputs, outputs, preprocess=False, **queued
    ).then(plot, [p.state], [p.plot], **private).then(outputs=[p.explained], **explain)
    p.method.change(outputs=[p.explained], **explain)
    p.block.release(
        events.block, [p.state, p.chooser, p.block, p.head], [p.view, p.state], **queued
    )
    p.head.input(events.head, [p.state, p.head], [p.view], **private)
    p.view.select(events.click, [p.state, p.head], [p.view, p.state], **private)


def build_app(models: Sequence[AppModel]) -> gr.Blocks:
    """The page for already loaded models (the first one is selected)."""
    if not models:
        raise ValueError("give at least one model")
    with gr.Blocks(title="CaiT: look inside", analytics_enabled=False) as app:
        events = _Events(models, Path(app.GRADIO_CACHE))  # where Gradio writes uploads
        gr.Markdown(INTRO)
        with gr.Row():
            parts = _input_column(models) | _answer_column()
        parts |= _maps_row(models[0]) | _explain_row() | _residuals_row()
        _wire(events, _Parts(**parts))
        gr.api(_api(events, models[0].label), api_name="predict", concurrency_id=MODEL_QUEUE)
    app.queue(default_concurrency_limit=1)
    return app


# ------------------------------------------------------------------------------ serving


def serve(
    app: gr.Blocks,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    share: bool = False,
    block: bool = True,
) -> str:
    """Serve a page from :func:`build_app` on ``host:port`` (and on a public Gradio link
    with ``share``) and return its address. ``block=True`` serves until interrupted
    (Ctrl+C); ``block=False`` returns once the server runs (``app.close()`` ends it)."""
    if not 0 < port < 65536:
        raise ValueError(f"port must be in [1, 65535], got {port}")
    # Gradio checks its own start through httpx, which logs every request at INFO
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            share=share,
            prevent_thread_lock=True,
            quiet=True,  # its hints name launch() arguments; the address is logged below
            allowed_paths=[str(EXAMPLES_DIR)],
            ssr_mode=False,  # no Node.js server: the page is rendered in the browser
            footer_links=["api"],
            run_history=False,  # uploads stay out of the browser's storage
            # each page keeps its last analysis (an input tensor, one SA block's attention)
            state_session_capacity=STATE_SESSIONS,
            # system fonts: the default theme's web fonts need the internet
            theme=gr.themes.Default(
                font=["ui-sans-serif", "system-ui", "sans-serif"],
                font_mono=["ui-monospace", "monospace"],
            ),
        )
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise ValueError(f"cannot serve on {host}:{port}: {str(err).split('. ')[0]}") from err
    address = f"http://{host}:{port}/"
    logger.info("serving on %s%s", address, f" and {app.share_url}" if app.share_url else "")
    if block:
        logger.info("Ctrl+C stops it")
        _serve_until_interrupted(app)
    return address


# How often the blocking wait looks whether the server still runs (gradio's own interval).
_POLL_S = 0.1


def _serve_until_interrupted(app: gr.Blocks) -> None:
    """Wait while ``app`` serves; on Ctrl-C close it and let KeyboardInterrupt go on to the
    caller (the command line's exit 130). Gradio's ``block_thread`` swallows it, prints a
    line of its own and returns, so ``cait app`` ended as if it had succeeded."""
    from gradio.tunneling import CURRENT_TUNNELS  # a --share link's tunnel processes

    try:
        while app.is_running:
            time.sleep(_POLL_S)
    finally:
        app.close(verbose=False)
        for tunnel in CURRENT_TUNNELS:
            tunnel.kill()


def launch_app(
    checkpoints: Sequence[str],
    model_name: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    share: bool = False,
    precision: str = "fp32",
) -> None:
    """``cait app``: load the checkpoints (to run in ``precision``), then serve their page."""
    if not 0 < port < 65536:  # before the models load
        raise ValueError(f"port must be in [1, 65535], got {port}")
    serve(build_app(load_app_models(checkpoints, model_name, precision)), host, port, share)
