"""``cait app``: a web page that shows what a CaiT model predicts for an image and where its
attention goes (Gradio).

For an uploaded, pasted or example image the page shows the top-k classes as a chart; the
class-attention map of every CA block and head, and their mean, over the image as the model
saw it (paper Section 5, Figures 6 and 7); a self-attention view (pick a block and a head,
click a patch: where that patch looks); and the residual-branch ratios of this image
(Section 2). All of it comes from one :meth:`cait.CaiT.forward_trace` call per image, read
by the functions of :mod:`cait.analysis`; nothing goes through hooks.

The models are loaded once, before the server starts, and kept. Every event that runs a
model goes through Gradio's queue in one concurrency group, one event at a time: on a CPU
two forwards at once are no faster than one after the other, and a burst of requests waits
its turn instead of failing. The same analysis, as JSON, is the HTTP endpoint ``/predict``
(for ``gradio_client``; see the README).

Uploads are untrusted. A request names its image by a path, and the app reads only a
regular file inside its own upload folder (:func:`uploaded_file`, before anything opens
it); any other path gets one refusal that says nothing about the server's files. Each file
is read by :func:`cait.data.read_image` (which converts grayscale, RGBA, palette and 16-bit
images to RGB), after a look at its header refuses images of more than
``PIL.Image.MAX_IMAGE_PIXELS`` pixels (where PIL itself only warns) and images smaller than
one patch. Every refusal is a one-line message on the page; the server keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from cait.analysis.attention import (
    AttentionMaps,
    display_image,
    maps_from_trace,
    overlay_maps,
)
from cait.analysis.residuals import ResidualRatios, residual_figure, trace_ratios
from cait.data import UNREADABLE_IMAGE_ERRORS, DigitsDataset, eval_transform, read_image
from cait.models.build import LoadedModel, load_for_inference
from cait.models.cait import CaiT
from cait.threads import adapt as adapt_threads

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "NOT_UPLOADED",
    "AppModel",
    "Analysis",
    "analyse",
    "build_app",
    "check_image",
    "launch_app",
    "load_app_models",
    "residual_plot",
    "retrace",
    "self_attention_view",
    "serve",
    "uploaded_file",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # this machine only; --host 0.0.0.0 opens it to the network
DEFAULT_PORT = 7860  # Gradio's own default
TOPK = 5
# Side of each picture on the page: large enough to click one patch of a 14 x 14 grid (27
# pixels each), small enough that a 16-head model's maps fit a row of the gallery.
MAP_PX = 192
VIEW_PX = 384
MEAN_OF_HEADS = "mean of heads"
QUERY_COLOUR = (0, 255, 255)  # the outline of the clicked patch, apart from 'inferno'
# One group for every event that runs a model: they take turns (module docstring).
MODEL_QUEUE = "model"
# The answer to a request that names any file but one uploaded to this app (a path elsewhere,
# a folder, a link out of the upload folder, a named pipe, nothing at all): the same words
# for every reason, so that it tells nothing about the server's files.
NOT_UPLOADED = "This app reads only images uploaded to it (gradio_client: handle_file)."
# Pages whose last analysis the server keeps (Gradio's default is 10000): an xxs24 analysis
# holds about 2 MB, an m48 one about 45 MB.
STATE_SESSIONS = 64

# Example images shipped with the package: three of the bundled digits (scikit-learn's,
# written by cait.data.export_digits) and two photos from scikit-image's data module,
# released without copyright restrictions (chelsea: CC0, Stefan van der Walt; coffee: CC0,
# Rachel Michetti), resized to 256 pixels on the short side.
EXAMPLES_DIR = Path(__file__).with_name("app_examples")
DIGIT_EXAMPLES = sorted(EXAMPLES_DIR.glob("digit_*.png"))
PHOTO_EXAMPLES = sorted(EXAMPLES_DIR.glob("*.jpg"))


@dataclass
class AppModel:
    """One checkpoint the page serves: ``label`` names it in the model chooser, ``names``
    are its class names for display (unique)."""

    label: str
    loaded: LoadedModel
    names: list[str]

    @property
    def model(self) -> CaiT:
        return self.loaded.model  # checked to be a CaiT by load_app_models

    @property
    def digits(self) -> bool:
        """Whether the model tells the bundled digits apart (the digit examples fit it)."""
        return self.names == list(DigitsDataset.classes)

    def describe(self) -> str:
        c, s = self.model.config, self.loaded.settings
        grid = s.img_size // c.patch_size
        return (
            f"{s.img_size}x{s.img_size} input, {grid}x{grid} patches of {c.patch_size} px, "
            f"{c.depth} self-attention blocks of {c.num_heads} heads, {c.ca_depth} "
            f"class-attention blocks, {len(self.names)} classes"
        )


def _display_names(loaded: LoadedModel, num_classes: int) -> list[str]:
    """The class names, made unique (ImageNet has two 'crane's) by their index."""
    names = list(loaded.class_names or [str(i) for i in range(num_classes)])
    repeated = {n for n in names if names.count(n) > 1}
    return [f"{n} ({i})" if n in repeated else n for i, n in enumerate(names)]


def load_app_models(checkpoints: Sequence[str], model_name: str | None = None) -> list[AppModel]:
    """Load every checkpoint (ours, or official/timm weights with ``model_name``), so that a
    missing or unreadable one fails before any server starts."""
    if not checkpoints:
        raise ValueError("give at least one checkpoint")
    models: list[AppModel] = []
    for checkpoint in checkpoints:
        if model_name is None and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        loaded = load_for_inference(checkpoint, model_name)
        if not isinstance(loaded.model, CaiT):
            raise ValueError(f"{checkpoint}: the app shows cait models, not a timm: model")
        if loaded.model.config.in_chans != 3:
            raise ValueError(
                f"{checkpoint}: the app feeds RGB images, the model takes "
                f"{loaded.model.config.in_chans} channels"
            )
        label = str(checkpoint)
        taken = [m.label for m in models]
        if label in taken:
            label = f"{label} ({taken.count(label) + 1})"
        models.append(AppModel(label, loaded, _display_names(loaded, loaded.model.num_classes)))
    return models


def check_image(path: str | Path, patch_size: int) -> Image.Image:
    """Read an uploaded image as RGB, or raise ``ValueError`` with a one-line reason that
    names the file (not the server's copy of it)."""
    path = Path(path)
    name = path.name
    try:
        with Image.open(path) as header:  # reads the header only: the size costs nothing
            width, height = header.size
    except UNREADABLE_IMAGE_ERRORS as err:
        reason = str(err).replace(str(path), name)
        raise ValueError(f"{name} is not an image this app can read ({reason})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ValueError(
            f"{name} is {width}x{height} pixels, more than the {limit:,} pixels this app "
            "decodes (it could be a decompression bomb)"
        )
    if min(width, height) < patch_size:
        raise ValueError(
            f"{name} is {width}x{height} pixels, smaller than one {patch_size}x{patch_size} "
            "patch of this model"
        )
    try:
        return read_image(path)
    except ValueError as err:
        reason = str(err.__cause__ or err).replace(str(path), name)
        raise ValueError(f"{name} is not an image this app can read ({reason})") from None


@dataclass
class Analysis:
    """What the page shows for one image.

    ``predictions`` are the top-k classes, best first, as ``cait predict`` gives them;
    ``x`` is the normalised input ``(3, img_size, img_size)`` and ``shown`` the picture the
    model saw, ``(h, w, 3)`` in ``[0, 1]``; ``maps`` holds the class attention of every CA
    block and the self-attention of block ``sa_block``; ``query`` is the patch whose
    self-attention is shown.
    """

    predictions: list[dict[str, Any]]
    x: Tensor
    shown: np.ndarray
    maps: AttentionMaps
    sa_block: int
    query: int
    residuals: ResidualRatios
    seconds: float

    def top(self) -> dict[str, float]:
        """Class name -> probability, for Gradio's label chart."""
        return {p["name"]: p["probability"] for p in self.predictions}

    def to_dict(self) -> dict[str, Any]:
        """The answer of the ``/predict`` endpoint: plain JSON."""
        ca = self.maps.patch_maps() if self.maps.class_attention.size else np.zeros((0, 0))
        return {
            "predictions": self.predictions,
            "grid": list(self.maps.grid),
            "class_attention": np.round(ca, 6).tolist(),  # (L, H, grid_h, grid_w)
            "residual_ratios": {
                "stage": self.residuals.stages,
                "attn": self.residuals.attn,
                "mlp": self.residuals.mlp,
            },
        }


def _trace(model: CaiT, x: Tensor):
    adapt_threads()  # the thread count for this request, after other processes' load
    with torch.no_grad():
        return model.forward_trace(x[None])


def analyse(
    app_model: AppModel, image: Image.Image, sa_block: int | None = None, topk: int = TOPK
) -> Analysis:
    """Run the model once on ``image`` and gather everything the page shows.

    ``sa_block`` is the self-attention block to keep (default: the last one); the query
    patch starts at the centre of the grid.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    start = time.perf_counter()
    model = app_model.model
    block = len(model.blocks) - 1 if sa_block is None else sa_block
    settings = app_model.loaded.settings
    x = eval_transform(settings)(image)
    trace = _trace(model, x)
    probs = trace.logits[0].float().softmax(-1)
    values, indices = probs.topk(min(topk, probs.numel()))
    predictions = [
        {"class": i, "name": app_model.names[i], "probability": p}
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]
    maps = maps_from_trace(trace, model.config.num_class_tokens, block)
    rows, cols = maps.grid
    return Analysis(
        predictions=predictions,
        x=x,
        shown=display_image(x, settings.mean, settings.std),
        maps=maps,
        sa_block=block,
        query=(rows // 2) * cols + cols // 2,
        residuals=trace_ratios(trace),
        seconds=time.perf_counter() - start,
    )


def retrace(app_model: AppModel, analysis: Analysis, sa_block: int) -> Analysis:
    """The same analysis with the self-attention of another block (one more forward)."""
    trace = _trace(app_model.model, analysis.x)
    maps = maps_from_trace(trace, app_model.model.config.num_class_tokens, sa_block)
    return dataclasses.replace(analysis, maps=maps, sa_block=sa_block)


def class_attention_pictures(analysis: Analysis) -> list[tuple[Image.Image, str]]:
    """One picture per CA block and head, then the block's mean of heads, captioned
    ``block 1, head 0`` ... ``block 1, mean`` (blocks from 1, heads from 0)."""
    if not analysis.maps.class_attention.size:
        return []
    patch = analysis.maps.patch_maps()  # (L, H, gh, gw)
    pictures = []
    for block, heads in enumerate(patch):
        maps = np.concatenate([heads, heads.mean(axis=0, keepdims=True)])
        _, overlays = overlay_maps(analysis.shown, maps, MAP_PX)
        captions = [f"block {block + 1}, head {h}" for h in range(len(heads))]
        captions.append(f"block {block + 1}, mean")
        pictures += list(zip(overlays, captions, strict=True))
    return pictures


def self_attention_view(analysis: Analysis, head: int | None) -> Image.Image:
    """Where the query patch looks in the chosen SA block (``head`` ``None``: the mean of
    the heads), over the image, with the query patch outlined."""
    rows, cols = analysis.maps.grid
    maps = analysis.maps.patch_attention(analysis.query)  # (H, gh, gw)
    chosen = maps.mean(axis=0) if head is None else maps[head]
    _, (picture,) = overlay_maps(analysis.shown, chosen[None], VIEW_PX)
    r, c = divmod(analysis.query, cols)
    h, w = VIEW_PX / rows, VIEW_PX / cols
    box = (round(c * w), round(r * h), round((c + 1) * w) - 1, round((r + 1) * h) - 1)
    ImageDraw.Draw(picture).rectangle(box, outline=QUERY_COLOUR, width=2)
    return picture


def patch_at(analysis: Analysis, x: float, y: float) -> int:
    """The patch under the pixel ``(x, y)`` of the self-attention view."""
    rows, cols = analysis.maps.grid
    row = min(rows - 1, max(0, int(y * rows / VIEW_PX)))
    col = min(cols - 1, max(0, int(x * cols / VIEW_PX)))
    return row * cols + col


def uploaded_file(path: object, uploads: str | Path) -> Path:
    """The regular file ``path`` names inside the folder ``uploads``, links resolved,
    checked before anything opens it; anything else raises ``ValueError(NOT_UPLOADED)``.

    Gradio checks that a file came through its upload only for the payloads it decodes; the
    image events (``preprocess=False``) and ``/predict`` (a dict parameter) get the path as
    the client sent it, so the app checks it here.
    """
    try:
        real = Path(os.path.realpath(path, strict=True))  # type: ignore[arg-type]
        inside = real.is_relative_to(os.path.realpath(uploads))
        regular = stat.S_ISREG(real.stat().st_mode)  # a stat: a named pipe is not opened
    except (OSError, TypeError, ValueError):  # missing, a link loop, not a str, a NUL byte
        raise ValueError(NOT_UPLOADED) from None
    if not (inside and regular):
        raise ValueError(NOT_UPLOADED)
    return real


def _uploaded(payload: object, uploads: Path) -> Path | None:
    """The uploaded file of an image input's raw payload, ``None`` for no image. Its events
    skip Gradio's decoding, which fails on a file that is not an image with a generic error
    and no message."""
    if payload is None:
        return None
    return uploaded_file(payload.get("path") if isinstance(payload, dict) else None, uploads)


def _head_choices(model: CaiT) -> list[str]:
    return [MEAN_OF_HEADS] + [f"head {h}" for h in range(model.config.num_heads)]


def _head_index(choice: str | None) -> int | None:
    if not choice or choice == MEAN_OF_HEADS:
        return None
    return int(choice.removeprefix("head "))


def residual_plot(analysis: Analysis) -> Figure:
    """The residual-branch ratios of the analysed image (:func:`residual_figure`)."""
    return residual_figure([dataclasses.replace(analysis.residuals, label="this image")], (9, 3))


def _summary(app_model: AppModel, analysis: Analysis, image: Image.Image) -> str:
    best = analysis.predictions[0]
    return (
        f"**{best['name']}** ({best['probability']:.1%}) from `{app_model.label}`: "
        f"the {image.width}x{image.height} image was resized and cropped to "
        f"{analysis.x.shape[-1]}x{analysis.x.shape[-2]}; {analysis.seconds * 1000:.0f} ms."
    )


def build_app(models: Sequence[AppModel]) -> gr.Blocks:
    """The page for already loaded models (the first one is selected)."""
    if not models:
        raise ValueError("give at least one model")
    by_label = {m.label: m for m in models}
    first = models[0]
    nothing = (None, None, None, None)  # label, gallery, view, state

    def on_image(payload: dict | None, label: str, block: float, head: str | None):
        app_model = by_label[label]
        depth = len(app_model.model.blocks)
        try:
            path = _uploaded(payload, uploads)
            if path is None:
                return ("", *nothing)
            image = check_image(path, app_model.model.config.patch_size)
            analysis = analyse(app_model, image, min(int(block), depth) - 1)
        except ValueError as err:
            logger.info("refused an upload: %s", err)
            return (f"**Cannot use this image.** {err}", *nothing)
        return (
            _summary(app_model, analysis, image),
            analysis.top(),
            class_attention_pictures(analysis),
            self_attention_view(analysis, _head_index(head)),
            analysis,
        )

    def on_analysis(analysis: Analysis | None):
        return None if analysis is None else residual_plot(analysis)

    def on_model(label: str):
        app_model = by_label[label]
        depth = len(app_model.model.blocks)
        return (
            f"`{label}`: {app_model.describe()}.",
            gr.Slider(minimum=1, maximum=depth, value=depth),
            gr.Dropdown(choices=_head_choices(app_model.model), value=MEAN_OF_HEADS),
            gr.Gallery(columns=app_model.model.config.num_heads + 1),
            gr.Column(visible=app_model.digits),
            gr.Column(visible=not app_model.digits),
        )

    def on_block(analysis: Analysis | None, label: str, block: float, head: str | None):
        if analysis is None:
            return None, None
        analysis = retrace(by_label[label], analysis, int(block) - 1)
        return self_attention_view(analysis, _head_index(head)), analysis

    def on_head(analysis: Analysis | None, head: str | None):
        if analysis is None:
            return None
        return self_attention_view(analysis, _head_index(head))

    def on_click(analysis: Analysis | None, head: str | None, evt: gr.SelectData):
        if analysis is None:
            return None, None
        x, y = evt.index
        analysis = dataclasses.replace(analysis, query=patch_at(analysis, x, y))
        return self_attention_view(analysis, _head_index(head)), analysis

    def predict(image: dict, model: str = first.label, topk: int = TOPK) -> dict:
        """Top-k classes, class-attention maps (CA block, head, grid row, grid column) and
        residual ratios of one image, as JSON; ``image`` is a file (gradio_client's
        ``handle_file``), ``model`` the checkpoint as given to ``cait app``."""
        if model not in by_label:
            raise gr.Error(f"unknown model {model!r}; this app serves {list(by_label)}")
        app_model = by_label[model]
        try:
            path = _uploaded(image, uploads)
            if path is None:
                raise ValueError(NOT_UPLOADED)
            picture = check_image(path, app_model.model.config.patch_size)
            analysis = analyse(app_model, picture, topk=topk)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return {"model": model, **analysis.to_dict()}

    with gr.Blocks(title="CaiT: look inside", analytics_enabled=False) as app:
        uploads = Path(app.GRADIO_CACHE)  # where Gradio writes this app's uploads
        gr.Markdown(
            "# CaiT: what the class token looks at\n"
            "Drop, paste or upload an image, or pick an example. The class-attention maps "
            "show where the class token looks in each class-attention block and head; "
            "below them, click a patch to see where it looks in a self-attention block."
        )
        with gr.Row():
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
            with gr.Column(scale=1):
                status = gr.Markdown(elem_id="status")
                top = gr.Label(num_top_classes=TOPK, label="Top classes", elem_id="top")
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
                        _head_choices(first.model),
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
        gr.Markdown("Residual branches of this image: ||branch|| / ||stream|| per block")
        plot = gr.Plot(show_label=False, format="png", elem_id="residuals")
        state = gr.State(time_to_live=3600)  # the last analysis of this page, an hour

        outputs = [status, top, gallery, view, state]
        queued: dict[str, Any] = {"concurrency_id": MODEL_QUEUE, "api_visibility": "private"}
        # the page's own answer, also callable by clients (examples/app_speed.py times it);
        # the residual plot follows it (matplotlib takes longer than the model and the maps)
        image.change(
            on_image,
            [image, chooser, block, head],
            outputs,
            api_name="page",
            concurrency_id=MODEL_QUEUE,
            api_visibility="undocumented",
            preprocess=False,  # the image's file as uploaded: check_image reads it
            trigger_mode="always_last",  # an image dropped while one runs is answered next
        ).then(on_analysis, [state], [plot], api_visibility="private")
        chooser.change(
            on_model,
            [chooser],
            [info, block, head, gallery, digit_examples, photo_examples],
            api_visibility="private",
        ).then(on_image, [image, chooser, block, head], outputs, preprocess=False, **queued).then(
            on_analysis, [state], [plot], api_visibility="private"
        )
        block.release(on_block, [state, chooser, block, head], [view, state], **queued)
        head.input(on_head, [state, head], [view], api_visibility="private")
        view.select(on_click, [state, head], [view, state], api_visibility="private")
        gr.api(predict, api_name="predict", concurrency_id=MODEL_QUEUE)
    app.queue(default_concurrency_limit=1)
    return app


def serve(
    app: gr.Blocks,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    share: bool = False,
    block: bool = True,
) -> str:
    """Serve a page from :func:`build_app` on ``host:port`` (and on a public Gradio link
    with ``share``) and return its address. ``block=True`` serves until interrupted
    (Ctrl+C); ``block=False`` returns once the server runs (``app.close()`` ends it).
    """
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
        app.block_thread()
    return address


def launch_app(
    checkpoints: Sequence[str],
    model_name: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    share: bool = False,
) -> None:
    """``cait app``: load the checkpoints, then serve their page until interrupted."""
    if not 0 < port < 65536:  # before the models load
        raise ValueError(f"port must be in [1, 65535], got {port}")
    serve(build_app(load_app_models(checkpoints, model_name)), host, port, share)
