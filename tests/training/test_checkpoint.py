"""The run-checkpoint schema: the state a run writes, reading it back, resume checks, weights."""

from __future__ import annotations

import logging
import random
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cait import runtime
from cait.models.build import load_for_inference
from cait.models.registry import InputSpec, create_model
from cait.models.weights_file import checkpoint_metadata, model_spec, read_checkpoint_metadata
from cait.training.checkpoint import (
    RUN_FIELDS,
    RunCheckpoint,
    RunProgress,
    check_resume,
    load_checkpoint,
    resume_run,
    run_state,
    save_checkpoint,
    save_run_checkpoint,
    save_run_weights,
    warn_on_changed_settings,
)
from cait.training.config import TrainConfig
from cait.training.optim import LRSchedule, ModelEma, Optimisation, build_optimizer

NAME = "cait_digits_16"
ARGS = {"depth": 1, "embed_dim": 16, "num_heads": 2, "ca_depth": 1}
SETTINGS = InputSpec(16, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLASSES = [str(i) for i in range(10)]
# the entries of last.pt / best.pt: the weights, the model's metadata, the run's state
FILE_KEYS = ["model", "metadata", "run"]
# every entry of the run's state, in the order they are written
RUN_KEYS = [
    "optimizer",
    "schedule",
    "scaler",
    "ema",
    "rng",
    "rng_ranks",
    "epoch",
    "epoch_position",  # where each rank stands, in a checkpoint written within an epoch
    "step",
    "history",
    "best_top1",
    "config",
]


def _setup(model_args=ARGS):
    config = TrainConfig(model=NAME, model_args=dict(model_args), epochs=3)
    model = create_model(NAME, **model_args)
    schedule = LRSchedule(1e-3, config.optim, steps_per_epoch=4, epochs=config.epochs)
    opt = Optimisation(
        build_optimizer(model, config.optim, schedule(0)),
        schedule,
        ema=ModelEma(model, 0.9),
    )
    spec = model_spec(NAME, model, config.model_args)
    return config, model, opt, spec


def _train_a_step(model, opt):
    model.train()
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    opt.step(model, 0)


def _state_after_one_epoch():
    config, model, opt, spec = _setup()
    _train_a_step(model, opt)
    progress = RunProgress(start_epoch=0, step=4, history=[{"epoch": 1}], best_top1=12.5)
    metadata = checkpoint_metadata(spec, SETTINGS, CLASSES)
    return run_state(model, opt, progress, 0, config, metadata), model, opt, spec


def test_a_run_state_round_trips_with_every_key(tmp_path):
    state, model, opt, _ = _state_after_one_epoch()
    assert list(state.run) == RUN_KEYS == list(RUN_FIELDS)
    schedule = state.run["schedule"]
    assert schedule == {"step": 4, "peak_lr": 1e-3, "steps_per_epoch": 4, "world_size": 1}
    assert state.run["rng_ranks"] is None and state.run["scaler"] is None
    metadata = checkpoint_metadata(model_spec(NAME, model, ARGS), SETTINGS, CLASSES)
    assert state.run["config"]["model"] == NAME and state.metadata == metadata
    save_run_checkpoint(state, tmp_path, is_best=False)
    assert not (tmp_path / "best.pt").exists()
    # the file: the weights, the metadata and the run's state, each under its own entry
    on_disk = torch.load(tmp_path / "last.pt", weights_only=True)
    assert list(on_disk) == FILE_KEYS and list(on_disk["run"]) == RUN_KEYS
    assert on_disk["metadata"] == metadata
    back = load_checkpoint(tmp_path / "last.pt")
    assert list(back.run) == RUN_KEYS
    for key, value in model.state_dict().items():
        assert torch.equal(back.weights[key], value), key
    for key, value in opt.ema.state_dict().items():
        assert torch.equal(back.run["ema"][key], value), key
    assert back.run["optimizer"]["param_groups"] == opt.optimizer.state_dict()["param_groups"]
    assert (back.run["epoch"], back.run["step"], back.run["best_top1"]) == (0, 4, 12.5)
    assert back.metadata == metadata
    # the model it describes can be rebuilt from the file alone
    assert read_checkpoint_metadata(tmp_path / "last.pt") == metadata
    loaded = load_for_inference(str(tmp_path / "last.pt"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_resume_takes_back_the_optimiser_the_ema_the_progress_and_the_rng(tmp_path):
    state, model, opt, _ = _state_after_one_epoch()
    save_checkpoint(state, tmp_path / "last.pt")
    after = (torch.rand(3), random.random(), np.random.rand())  # what the run draws next
    saved = load_checkpoint(tmp_path / "last.pt")
    config, fresh, fresh_opt, _ = _setup()  # building the model draws from the RNG
    fresh.load_state_dict(saved.weights)
    progress = resume_run(saved, fresh, fresh_opt, config, runtime.DistInfo())
    assert progress == RunProgress(start_epoch=1, step=4, history=[{"epoch": 1}], best_top1=12.5)
    redrawn = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(redrawn[0], after[0]) and redrawn[1:] == after[1:]
    moments = fresh_opt.optimizer.state_dict()["state"]
    for i, s in opt.optimizer.state_dict()["state"].items():
        assert torch.equal(moments[i]["exp_avg"], s["exp_avg"])
        assert torch.equal(moments[i]["exp_avg_sq"], s["exp_avg_sq"])
    for key, value in opt.ema.state_dict().items():
        assert torch.equal(fresh_opt.ema.state_dict()[key], value), key


def test_the_resume_check_refuses_another_model(tmp_path):
    state, _, _, spec = _state_after_one_epoch()
    check_resume(state, spec, tmp_path / "last.pt")  # the same model passes
    _, _, _, deeper = _setup({**ARGS, "depth": 2})
    with pytest.raises(ValueError, match="resume=.*last.pt holds a checkpoint of another model"):
        check_resume(state, deeper, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="another model"):
        check_resume(state, {**spec, "model": "cait_tiny_32"}, tmp_path / "last.pt")


def test_files_that_are_not_run_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    with pytest.raises(ValueError, match="holds weights only"):
        load_checkpoint(weights)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a cait training checkpoint"):
        load_checkpoint(plain)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ValueError, match="not a cait training checkpoint"):
        load_checkpoint(listed)
    weights_alone = tmp_path / "weights_alone.pt"  # the layout, with no run state in it
    state, _, _, _ = _state_after_one_epoch()
    torch.save({"model": state.weights, "metadata": state.metadata}, weights_alone)
    with pytest.raises(ValueError, match="not a cait training checkpoint"):
        load_checkpoint(weights_alone)
    hostile = tmp_path / "hostile.pt"
    run = {"config": {}, "x": PurePosixPath("x")}  # not plain data
    torch.save({"model": {}, "metadata": state.metadata, "run": run}, hostile)
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(hostile)


def test_changed_settings_are_named_and_free_ones_are_not(caplog):
    state, _, _, _ = _state_after_one_epoch()
    free = TrainConfig(
        model=NAME, model_args=dict(ARGS), epochs=3, output="elsewhere", progress=False
    )
    with caplog.at_level(logging.WARNING):
        warn_on_changed_settings(state, free, steps_per_epoch=4, world_size=1)
    assert caplog.text == ""
    changed = TrainConfig(model=NAME, model_args=dict(ARGS), epochs=5)
    with caplog.at_level(logging.WARNING):
        warn_on_changed_settings(state, changed, steps_per_epoch=3, world_size=2)
    assert "epochs: 3 -> 5" in caplog.text
    assert "resuming a run of 1 process(es) on 2" in caplog.text
    assert "steps per epoch changed from 4 to 3" in caplog.text


def test_run_weights_carry_the_model_metadata(tmp_path):
    _, model, opt, spec = _setup()
    metadata = checkpoint_metadata(spec, SETTINGS, CLASSES)
    save_run_weights(model, opt.ema, tmp_path, metadata, write=True)
    assert read_checkpoint_metadata(tmp_path / "model.safetensors") == {
        **metadata,
        "data_settings": {**SETTINGS.to_dict(), "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    assert (tmp_path / "model_ema.safetensors").is_file()
    loaded = load_for_inference(str(tmp_path / "model.safetensors"))
    assert loaded.settings == SETTINGS and loaded.class_names == CLASSES
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    save_run_weights(model, None, tmp_path / "other", metadata, write=False)  # not rank 0
    assert not (tmp_path / "other").exists()


def test_a_file_with_a_model_config_but_no_model_name_is_refused_by_name(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model_config": {}, "data_settings": {}, "class_names": []}, path)
    with pytest.raises(ValueError, match="odd.pt looks like a cait checkpoint but lacks"):
        load_for_inference(str(path))


def _old_layout(state: RunCheckpoint) -> dict:
    """``state`` as cait wrote run checkpoints before the metadata and the run's state had
    entries of their own (tests/fixtures/pre_seams): side by side at the top level, with the
    model's name in the run's config only."""
    entries = {k: v for k, v in state.metadata.items() if k != "model"}
    return {"model": state.weights, **state.run, **entries}


def test_a_checkpoint_in_the_old_layout_reads_as_in_the_new(tmp_path):
    state, model, _, _ = _state_after_one_epoch()
    torch.save(_old_layout(state), tmp_path / "old.pt")
    save_checkpoint(state, tmp_path / "new.pt")
    old, new = load_checkpoint(tmp_path / "old.pt"), load_checkpoint(tmp_path / "new.pt")
    assert old.metadata == new.metadata == state.metadata
    assert list(old.run) == list(new.run) == RUN_KEYS
    assert old.run["history"] == new.run["history"] and old.run["step"] == new.run["step"]
    assert old.weights.keys() == new.weights.keys() == model.state_dict().keys()
    assert all(torch.equal(old.weights[k], new.weights[k]) for k in new.weights)
    for name in ("old.pt", "new.pt"):
        assert read_checkpoint_metadata(tmp_path / name) == state.metadata


def test_the_layouts_entries_are_checked(tmp_path):
    state, _, _, _ = _state_after_one_epoch()
    extra = tmp_path / "extra.pt"
    torch.save({"model": state.weights, "metadata": state.metadata, "run": {}, "x": 1}, extra)
    with pytest.raises(ValueError, match=r"extra.pt: unknown entries \['x'\]"):
        load_checkpoint(extra)
    listed = tmp_path / "listed.pt"
    torch.save({"model": state.weights, "metadata": [1, 2], "run": state.run}, listed)
    with pytest.raises(ValueError, match="listed.pt: bad checkpoint metadata: the metadata must"):
        load_for_inference(str(listed))
