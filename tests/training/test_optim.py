"""Training maths: schedule, parameter groups, EMA, accumulation, AMP, config parsing."""

from __future__ import annotations

import math

import pytest
import torch

import cait
from cait.data import RepeatedAugSampler
from cait.training.config import (
    OptimConfig,
    apply_overrides,
    config_from_dict,
    scaled_lr,
)
from cait.training.engine import train_one_epoch
from cait.training.optim import (
    LRSchedule,
    ModelEma,
    Optimisation,
    build_optimizer,
    param_groups,
)

TINY = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=4)


def test_cosine_schedule_values():
    c = OptimConfig(warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    s = LRSchedule(peak_lr=1e-3, config=c, steps_per_epoch=10, epochs=12)
    assert s(0) == pytest.approx(1e-6)
    assert s(10) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)  # halfway through warmup
    assert s(20) == pytest.approx(1e-3)  # end of warmup: the peak
    assert s(70) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half of the cosine
    assert s(120) == pytest.approx(1e-5)  # the end: the minimum


def test_step_and_constant_schedules():
    step = LRSchedule(
        1e-3,
        OptimConfig(schedule="step", warmup_epochs=0, decay_epochs=10, decay_rate=0.5),
        steps_per_epoch=4,
        epochs=60,
    )
    assert [step(e * 4) for e in (0, 9, 10, 25)] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])
    const = LRSchedule(1e-3, OptimConfig(schedule="constant", warmup_epochs=0), 4, 10)
    assert const(0) == const(39) == 1e-3


def test_lr_scales_with_the_global_batch():
    config = config_from_dict({"data": {"batch_size": 64}, "optim": {"lr": 5e-4, "accum_steps": 2}})
    assert scaled_lr(config) == pytest.approx(5e-4 * 128 / 512)
    assert scaled_lr(config, world_size=4) == pytest.approx(5e-4 * 512 / 512)
    unscaled = config_from_dict({"optim": {"lr": 5e-6, "scale_lr": False}})
    assert scaled_lr(unscaled) == 5e-6


def test_no_weight_decay_on_1d_params_pos_embed_cls_token_and_gammas():
    model = cait.CaiT(cait.CaiTConfig(**TINY))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {
        "pos_embed",
        "cls_token",
        "blocks.0.gamma_1",
        "norm.weight",
        "head.bias",
    } <= no_decay_names
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert "blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_ema_is_the_exponential_average():
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * start + 0.1 * (start + 1.0))
    assert not ema.module.weight.requires_grad


def _batches(n, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 4, (batch,), generator=g), [])
        for _ in range(n)
    ]


def _one_epoch(batches, accum, amp="none", clip=None):
    torch.manual_seed(0)
    model = cait.CaiT(cait.CaiTConfig(**TINY, init_scale=0.5))
    opt = build_optimizer(model, OptimConfig(), lr=1e-3)
    sched = LRSchedule(1e-3, OptimConfig(warmup_epochs=0, schedule="constant"), 1, 1)
    optimisation = Optimisation(opt, sched, accum_steps=accum, clip_grad=clip)
    stats, step = train_one_epoch(
        model, batches, optimisation, 0, 0, torch.device("cpu"), amp=amp, progress=False
    )
    return model, stats, step


def test_gradient_accumulation_equals_one_big_batch():
    small = _batches(2, 8)
    big = [(torch.cat([small[0][0], small[1][0]]), torch.cat([small[0][1], small[1][1]]), [])]
    m_accum, stats, step = _one_epoch(small, accum=2)
    m_big, _, _ = _one_epoch(big, accum=1)
    assert step == 1 and stats.steps == 1 and stats.images == 16
    for (name, a), b in zip(m_accum.named_parameters(), m_big.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_clipping_limits_the_update():
    batches = _batches(1, 8)
    torch.manual_seed(0)
    model = cait.CaiT(cait.CaiTConfig(**TINY, init_scale=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    sched = LRSchedule(1.0, OptimConfig(warmup_epochs=0, schedule="constant"), 1, 1)
    optimisation = Optimisation(opt, sched, clip_grad=0.01)
    train_one_epoch(model, batches, optimisation, 0, 0, torch.device("cpu"), progress=False)
    delta = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
    )
    assert delta.norm().item() == pytest.approx(0.01, rel=1e-3)  # SGD step = lr * clipped grad


def test_bf16_autocast_trains_on_cpu():
    model, stats, _ = _one_epoch(_batches(2, 4), accum=1, amp="bf16")
    assert math.isfinite(stats.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights fp32


def test_repeated_aug_sampler():
    s = RepeatedAugSampler(12, repeats=3, seed=0)
    first = list(s)
    assert len(first) == 12 and len(set(first)) == 4
    assert all(first[i] == first[i + 1] == first[i + 2] for i in range(0, 12, 3))
    assert list(RepeatedAugSampler(12, 3, seed=1)) != first
    s.set_epoch(1)
    assert list(s) != first
    ranks = [list(RepeatedAugSampler(12, 3, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert all(len(r) == 6 for r in ranks)
    assert sorted(ranks[0] + ranks[1]) == sorted(first)


def test_overrides_are_typed_and_checked():
    config = config_from_dict(
        apply_overrides(
            {}, ["model_args.init_scale=1e-6", "optim.lr=1e-3", "augment.scale=[0.5, 1]"]
        )
    )
    assert config.model_args == {"init_scale": 1e-6}
    assert config.optim.lr == 1e-3 and config.augment.scale == (0.5, 1.0)
    for bad, message in [
        ("model_args.ca_depth=1.5", "model_args.ca_depth must be an integer"),
        ("model_args.depht=2", r"unknown config keys \['model_args.depht'\]"),
        ("model_args.img_size=30", "img_size must be a multiple of patch_size"),
        ("optim.schedule=linear", "optim.schedule must be one of"),
        ("amp=fp8", "amp must be one of"),
        ("epochs=0", "epochs must be >= 1"),
        ("model=cait_xxs", "unknown model"),
    ]:
        with pytest.raises(ValueError, match=message):
            config_from_dict(apply_overrides({}, [bad]))
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["epochs"])


@pytest.mark.parametrize(
    "field, value, message",
    [("img_size", 0, "data.img_size must be >= 1"), ("interpolation", "", "data.interpolation")],
)
def test_data_settings_that_cannot_mean_the_models_default_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({"data": {field: value}})
