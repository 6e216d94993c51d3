"""Layer-wise learning-rate decay: the groups against timm's, the schedule, resume, a run."""

from __future__ import annotations

import collections
import math

import pytest
import timm
import timm.optim
import torch.distributed as dist
from test_train import digits_config  # tests/training is on the path (no __init__)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cait.training.checkpoint import load_checkpoint
from cait.training.config import OptimConfig, apply_overrides, config_from_dict
from cait.training.optim import LRSchedule, build_optimizer, param_groups
from cait.training.parallel import load_optimizer_state
from cait.training.run import train

TIMM_CAIT = "cait_xxs24_224"  # untrained: only its parameter names and shapes matter here


@pytest.fixture(scope="module")
def timm_cait() -> nn.Module:
    return timm.create_model(TIMM_CAIT)


def _summary(groups: list[dict]) -> collections.Counter:
    """The multiset of (lr scale, weight decay, number of parameters) over the groups."""
    return collections.Counter(
        (round(g.get("lr_scale", 1.0), 12), g["weight_decay"], len(g["params"])) for g in groups
    )


def _group_of(groups: list[dict], model: nn.Module, name: str) -> dict:
    param = dict(model.named_parameters())[name]
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


def test_the_groups_are_timms(timm_cait):
    ours = param_groups(timm_cait, 0.05, layer_decay=0.75)
    reference = timm.optim.create_optimizer_v2(
        timm_cait, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75
    ).param_groups
    # 24 SA blocks + stem + head = 26 layers, each with a decayed and an excluded group
    assert len(ours) == len(reference) == 52
    assert _summary(ours) == _summary(reference)
    every = [p for g in ours for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(timm_cait.parameters()))


def test_without_layer_decay_the_two_groups_stay(timm_cait):
    groups = param_groups(timm_cait, 0.05)
    assert [set(g) for g in groups] == [{"params", "weight_decay"}] * 2
    names = {id(p): n for n, p in timm_cait.named_parameters()}
    skip = {"pos_embed", "cls_token"}  # timm's no_weight_decay(); both are 3-D
    assert set(timm_cait.no_weight_decay()) == skip
    decayed = [n for n, p in timm_cait.named_parameters() if p.ndim > 1 and n not in skip]
    assert [names[id(p)] for p in groups[0]["params"]] == decayed
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    optimizer = build_optimizer(timm_cait, OptimConfig(), 1e-3)
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(g["params"]) for g in groups]
    assert all("lr_scale" not in g for g in optimizer.param_groups)


def test_the_schedule_sets_each_groups_rate_times_its_scale(timm_cait):
    config = OptimConfig(layer_decay=0.75, warmup_epochs=0, schedule="constant")
    optimizer = build_optimizer(timm_cait, config, lr=1.0)
    schedule = LRSchedule(2e-3, config, steps_per_epoch=1, epochs=1)
    assert schedule.apply(optimizer, 0) == 2e-3
    groups = optimizer.param_groups
    for g in groups:
        assert g["lr"] == pytest.approx(2e-3 * g["lr_scale"], rel=1e-12)
    head = _group_of(groups, timm_cait, "head.weight")
    stem = _group_of(groups, timm_cait, "patch_embed.proj.weight")
    assert head["lr_scale"] == 1.0 and head["lr"] == 2e-3
    assert stem["lr_scale"] == min(g["lr_scale"] for g in groups) == pytest.approx(0.75**25)
    # the last SA block, the last CA block and the final norm share the layer below the head
    for name in ("blocks.23.mlp.fc1.weight", "blocks_token_only.1.attn.q.weight"):
        assert _group_of(groups, timm_cait, name)["lr_scale"] == 0.75
    assert _group_of(groups, timm_cait, "norm.weight")["lr_scale"] == 0.75


@pytest.mark.parametrize("value", [0, 1.5, -1])
def test_layer_decay_outside_zero_to_one_is_refused(value):
    with pytest.raises(ValueError, match=r"optim.layer_decay must be in \(0, 1\]"):
        OptimConfig(layer_decay=value)
    with pytest.raises(ValueError, match=r"optim.layer_decay must be in \(0, 1\]"):
        config_from_dict(apply_overrides({}, [f"optim.layer_decay={value}"]))
    assert OptimConfig(layer_decay=1.0).layer_decay == 1.0


class _PatternMatcher(nn.Linear):
    """A model whose group_matcher gives timm's other form, a dict of regexes."""

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^weight", "blocks": [(r"^bias", None)]}


def test_a_model_without_layers_is_refused_by_name():
    with pytest.raises(ValueError, match="layer_decay needs .*group_matcher.*Linear has none"):
        param_groups(nn.Linear(3, 2), 0.05, layer_decay=0.75)
    with pytest.raises(ValueError, match="_PatternMatcher's gives a dict of patterns"):
        param_groups(_PatternMatcher(3, 2), 0.05, layer_decay=0.75)


def test_the_model_inside_ddp_gets_the_same_groups(timm_cait, tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        wrapped = DistributedDataParallel(timm_cait)
        for layer_decay in (None, 0.75):
            inside = param_groups(wrapped, 0.05, layer_decay)
            plain = param_groups(timm_cait, 0.05, layer_decay)
            assert [[id(p) for p in g["params"]] for g in inside] == [
                [id(p) for p in g["params"]] for g in plain
            ]
            assert [g.get("lr_scale") for g in inside] == [g.get("lr_scale") for g in plain]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("saved, now", [(None, 0.75), (0.75, None), (0.75, 0.65)])
def test_an_optimiser_state_of_other_groups_is_refused(timm_cait, saved, now):
    """Another layer_decay with the same group sizes (0.75 -> 0.65) would load silently in
    torch, each group keeping its saved scale."""
    state = build_optimizer(timm_cait, OptimConfig(layer_decay=saved), 1e-3).state_dict()
    optimizer = build_optimizer(timm_cait, OptimConfig(layer_decay=now), 1e-3)
    with pytest.raises(ValueError, match="resume with the optim.layer_decay the checkpoint"):
        load_optimizer_state(timm_cait, optimizer, state)


def test_an_optimiser_state_of_the_same_groups_loads(timm_cait):
    state = build_optimizer(timm_cait, OptimConfig(layer_decay=0.75), 1e-3).state_dict()
    optimizer = build_optimizer(timm_cait, OptimConfig(layer_decay=0.75), 1e-3)
    load_optimizer_state(timm_cait, optimizer, state)
    assert [g["lr_scale"] for g in optimizer.param_groups] == [
        g["lr_scale"] for g in state["param_groups"]
    ]


def test_a_run_with_layer_decay_trains_and_resumes_only_with_it(tmp_path):
    """Our CaiT's group_matcher through train(): one epoch of two, then a resume."""
    first = train(digits_config(tmp_path, "optim.layer_decay=0.75", "epochs=2", "stop_after=1"))
    state = load_checkpoint(first.output / "last.pt")
    groups = state.run["optimizer"]["param_groups"]
    # cait_digits_16 cut to 2 SA blocks: stem, 2 blocks, head
    assert sorted({g["lr_scale"] for g in groups}) == [0.75**3, 0.75**2, 0.75, 1.0]
    assert all(
        g["lr"] == pytest.approx(state.run["history"][-1]["lr"] * g["lr_scale"]) for g in groups
    )
    resume = f"resume={first.output / 'last.pt'}"
    with pytest.raises(ValueError, match="resume with the optim.layer_decay"):
        train(digits_config(tmp_path, "epochs=2", resume))
    resumed = train(digits_config(tmp_path, "optim.layer_decay=0.75", "epochs=2", resume))
    assert resumed.completed
    history = load_checkpoint(resumed.output / "last.pt").run["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(math.isfinite(row["train_loss"]) for row in history)
