"""The models ``cait app`` serves, and one image's run through one of them: the model's
prediction and trace (:func:`cait.inference.predict_image`, as ``cait predict`` runs it),
read by :mod:`cait.analysis.explore` into what the page shows."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cait.analysis.explore import Analysis, explore, with_sa_block
from cait.data import DigitsDataset
from cait.inference import predict_image, trace_input
from cait.models.build import LoadedModel, load_for_inference
from cait.models.cait import CaiT
from cait.precision import prepare_model

__all__ = ["TOPK", "AppModel", "analyse", "load_app_models", "retrace"]

TOPK = 5  # the classes the page and /predict show by default


@dataclass
class AppModel:
    """One checkpoint the page serves: ``label`` names it in the model chooser, ``names``
    are its class names for display (unique); its model runs inside ``autocast()`` (the
    precision it was loaded in, :mod:`cait.precision`)."""

    label: str
    loaded: LoadedModel
    names: list[str]
    autocast: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext

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


def load_app_models(
    checkpoints: Sequence[str], model_name: str | None = None, precision: str = "fp32"
) -> list[AppModel]:
    """Load every checkpoint (ours, or official/timm weights with ``model_name``), so that a
    missing or unreadable one fails before any server starts; each runs on the CPU in
    ``precision`` (fp32, bf16, int8: :func:`cait.precision.prepare_model`)."""
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
        prepared = prepare_model(loaded.model, precision, loaded_device(loaded))
        names = _display_names(loaded, loaded.model.num_classes)
        loaded = dataclasses.replace(loaded, model=prepared.model)
        models.append(AppModel(label, loaded, names, prepared.autocast))
    return models


def loaded_device(loaded: LoadedModel) -> torch.device:
    """The device a loaded model is on (the CPU for a model without parameters)."""
    return next(loaded.model.parameters(), torch.empty(0)).device


def analyse(
    app_model: AppModel, image: Image.Image, sa_block: int | None = None, topk: int = TOPK
) -> Analysis:
    """Run the model once on ``image`` and gather everything the page shows.

    ``sa_block`` is the self-attention block to keep (default: the last one); the query
    patch starts at the centre of the grid.
    """
    start = time.perf_counter()
    model = app_model.model
    with app_model.autocast():
        answer = predict_image(app_model.loaded, image, topk, app_model.names, trace=True)
    return explore(
        answer.trace,  # type: ignore[arg-type]  # asked for
        answer.x,
        predictions=answer.predictions,
        settings=app_model.loaded.settings,
        num_class_tokens=model.config.num_class_tokens,
        sa_block=len(model.blocks) - 1 if sa_block is None else sa_block,
        seconds=time.perf_counter() - start,
    )


def retrace(app_model: AppModel, analysis: Analysis, sa_block: int) -> Analysis:
    """The same analysis with the self-attention of another block (one more forward)."""
    with app_model.autocast():
        trace = trace_input(app_model.model, analysis.x)
    return with_sa_block(analysis, trace, app_model.model.config.num_class_tokens, sa_block)
