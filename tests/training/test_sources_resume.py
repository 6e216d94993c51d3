"""Training from every source: a run stopped within an epoch and resumed ends bit-identical
to an uninterrupted one (threads pinned), for the streamed shards as for indexed splits."""

from __future__ import annotations

import pytest
from conftest import assert_same_weights
from test_preemption import _signal_at_step
from test_train import digits_config

from cait.data.sources import open_source
from cait.data.sources.convert import write_as
from cait.training.preemption import TrainingPreempted
from cait.training.run import train

# 1437 digits in batches of 64: 22 steps an epoch; stopped at step 9, within the first
# epoch, with a checkpoint every 4 steps (the last one at step 8 is replaced by step 9's)
_SETTINGS = (
    "epochs=2",
    "model_args.drop_path_rate=0.1",
    "checkpoint_every_steps=4",
    "model_args.depth=1",
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sources")
    digits = open_source("digits")
    return {form: write_as(digits, form, root / form) for form in ("shards", "hf", "list")}


def _stopped_and_resumed_equals_whole(tmp_path, monkeypatch, data: str, *extra: str) -> None:
    settings = (*_SETTINGS, f"data.path={data}", *extra)
    full = tmp_path / "full"
    train(digits_config(full, *settings))
    with monkeypatch.context() as m:
        _signal_at_step(m, 9)
        with pytest.raises(TrainingPreempted, match="within epoch 1"):
            train(digits_config(tmp_path, *settings))
    train(digits_config(tmp_path, *settings, "resume=auto"))
    assert_same_weights(tmp_path / "run" / "model.safetensors", full / "run" / "model.safetensors")


def test_a_run_from_shards_stopped_within_an_epoch_resumes_exactly(sources, tmp_path, monkeypatch):
    # one epoch: the stop and the resume are within it; loader workers plan their parts
    _stopped_and_resumed_equals_whole(
        tmp_path, monkeypatch, sources["shards"], "data.workers=2", "epochs=1"
    )


@pytest.mark.slow
@pytest.mark.parametrize("form", ("hf", "list"))
def test_a_run_from_an_indexed_source_stopped_within_an_epoch_resumes_exactly(
    sources, form, tmp_path, monkeypatch
):
    _stopped_and_resumed_equals_whole(tmp_path, monkeypatch, sources[form])


@pytest.mark.slow
def test_a_run_with_the_fast_decode_path_stopped_within_an_epoch_resumes_exactly(
    sources, tmp_path, monkeypatch
):
    """data.decode=fast with the paper's augmentation: the sources hand the transform
    undecoded files, RandAugment runs in the loader workers and the batches are normalised
    and erased after the loader (DeviceAugment); the resume is still exact."""
    augment = ("augment.auto_augment=rand-m9-mstd0.5-inc1", "augment.re_prob=0.5")
    fast = ("data.decode=fast", "data.workers=2", "epochs=1", "augment.hflip=0.5", *augment)
    _stopped_and_resumed_equals_whole(tmp_path, monkeypatch, sources["list"], *fast)
