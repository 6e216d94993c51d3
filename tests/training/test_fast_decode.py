"""``data.decode: fast``: the training transform's fast path (uint8 out of the loader,
normalised and erased on the device) trains; the reference path stays the default."""

from __future__ import annotations

import pytest
import torch
from test_train import digits_config

from cait.training.run import train
from cait.training.setup import build_objective, load_data


def test_the_fast_decode_path_gives_uint8_batches_that_the_objective_normalises(tmp_path):
    config = digits_config(tmp_path, "data.decode=fast", "augment.re_prob=0.5")
    data = load_data(config)
    image, _, _ = data.train[0]
    assert image.dtype == torch.uint8 and image.shape == (
        3,
        data.settings.img_size,
        data.settings.img_size,
    )
    objective = build_objective(config, data, torch.device("cpu"))
    batch = torch.stack([data.train[i][0] for i in range(8)])
    out = objective.on_device(batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    mean = torch.tensor(data.settings.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.settings.std).view(1, 3, 1, 1)
    normalised = (batch.float() / 255 - mean) / std
    kept = out == normalised  # erasing replaced some boxes: the rest is normalised alone
    assert kept.float().mean() > 0.5 and not kept.all()


def test_a_run_with_the_fast_decode_path_trains(tmp_path):
    result = train(digits_config(tmp_path, "data.decode=fast", "epochs=2", "model_args.depth=1"))
    assert result.completed and result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_the_reference_path_is_the_default_and_other_values_are_refused(tmp_path):
    assert digits_config(tmp_path).data.decode == "reference"
    with pytest.raises(ValueError, match="decode"):
        digits_config(tmp_path, "data.decode=turbo")
