"""The model on tiny configs: intermediates, gradients for every knob, checks, utilities."""

from __future__ import annotations

import itertools

import pytest
import torch

import cait
from cait import CaiT, CaiTConfig

TINY = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5)


def tiny(**overrides) -> CaiT:
    return CaiT(CaiTConfig(**{**TINY, **overrides}))


def _randomize_scales(model: CaiT) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                p.uniform_(0.2, 0.8)


# class-token position and pooling combinations that the config allows
TOKEN_LAYOUTS = [
    dict(class_token="late", pooling="token", ca_depth=2),
    dict(class_token="late", pooling="avg", ca_depth=0),
    dict(class_token="early", pooling="token", ca_depth=0),
    dict(class_token="early", pooling="avg", ca_depth=0),
]
BRANCH_SCALES = ["layerscale", "none", "rezero", "skipinit", "fixup"]


@pytest.mark.parametrize(
    "layout,scale,talking",
    list(itertools.product(TOKEN_LAYOUTS, BRANCH_SCALES, [True, False])),
    ids=lambda v: (
        v
        if isinstance(v, str)
        else (f"th{int(v)}" if isinstance(v, bool) else "-".join(f"{x}" for x in v.values()))
    ),
)
def test_every_parameter_gets_a_gradient(layout, scale, talking):
    torch.manual_seed(0)
    model = tiny(branch_scale=scale, talking_heads=talking, init_scale=0.1, **layout).train()
    if scale == "rezero":
        # ReZero starts at exactly 0, which makes the branch weights' gradients exactly 0 at
        # step one; move off the init so that every parameter's gradient can be checked.
        _randomize_scales(model)
    x = torch.randn(3, 3, 16, 16)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        if name.endswith("proj_l.bias"):
            # a per-head constant added to every logit of a row: the softmax removes it,
            # so its gradient is exactly 0 (the fast path returns 0; see test_attention.py)
            assert p.grad.abs().max() < 1e-6, name
            continue
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_knob_layouts_change_the_parameters():
    late = tiny()
    early = tiny(class_token="early", ca_depth=0)
    avg = tiny(pooling="avg", ca_depth=0)
    plain = tiny(branch_scale="none", talking_heads=False)
    assert late.pos_embed.shape == (1, 16, 24) and early.pos_embed.shape == (1, 17, 24)
    assert avg.cls_token is None and len(avg.blocks_token_only) == 0
    assert len(late.blocks_token_only) == 2
    assert not any(k.endswith(("gamma_1", "proj_l.weight")) for k in plain.state_dict())


@pytest.mark.parametrize(
    "layout", TOKEN_LAYOUTS, ids=lambda d: f"{d['class_token']}-{d['pooling']}"
)
@pytest.mark.parametrize("talking", [True, False])
def test_intermediates_give_forward_logits_and_normalised_attention(layout, talking):
    torch.manual_seed(0)
    model = tiny(init_scale=0.5, talking_heads=talking, **layout).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
        out = model.forward_trace(x)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    n_sa = 16 + (1 if layout["class_token"] == "early" else 0)
    assert len(out.sa) == 2 and len(out.ca) == layout["ca_depth"]
    for trace in out.sa:
        assert trace.attn.shape == (2, 2, n_sa, n_sa)
        torch.testing.assert_close(trace.attn.sum(-1), torch.ones(2, 2, n_sa))
    for trace in out.ca:
        assert trace.attn.shape == (2, 2, 1, 17)
        torch.testing.assert_close(trace.attn.sum(-1), torch.ones(2, 2, 1))
    # the traces chain: each block's output is the next block's input stream
    for a, b in itertools.pairwise(out.sa):
        torch.testing.assert_close(a.output, b.stream)
    for a, b in itertools.pairwise(out.ca):
        torch.testing.assert_close(a.output, b.stream)
    assert out.grid == (4, 4)


def test_any_resolution_multiple_of_patch_size():
    model = tiny().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 24, 32)).shape == (1, 5)
        out = model.forward_trace(torch.randn(1, 3, 24, 32))
    assert out.sa[0].attn.shape[-1] == 6 * 8 and out.grid == (6, 8)


@pytest.mark.parametrize(
    "shape,message",
    [
        ((1, 1, 16, 16), "expected 3 input channels, got 1"),
        ((1, 3, 18, 16), "multiples of the patch size 4, got 18x16"),
        ((3, 16, 16), "4-D image batch"),
    ],
)
def test_bad_input_raises_value_error(shape, message):
    with pytest.raises(ValueError, match=message):
        tiny()(torch.randn(*shape))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny(init_scale=0.5).train()
    x = torch.randn(2, 3, 16, 16)

    def grads():
        model.zero_grad()
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_gradient_checkpointing_recomputes_every_block(monkeypatch):
    model = tiny().train()
    model.set_grad_checkpointing(True)
    calls = []
    import cait.models.cait as model_module

    real = model_module.checkpoint
    monkeypatch.setattr(
        model_module, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k)
    )
    model(torch.randn(1, 3, 16, 16))
    assert calls == list(model.blocks) + list(model.blocks_token_only)


def test_intermediates_are_not_checkpointed(monkeypatch):
    # a recomputed block would append its trace twice; tracing runs every block once
    torch.manual_seed(0)
    model = tiny(init_scale=0.5).train()
    model.set_grad_checkpointing(True)
    import cait.models.cait as model_module

    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: pytest.fail("checkpointed"))
    x = torch.randn(2, 3, 16, 16)
    out = model.forward_trace(x)
    assert len(out.sa) == 2 and len(out.ca) == 2
    out.logits.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_reset_classifier_and_forward_head():
    model = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 17, 24)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 24)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.config.num_classes == 7
        model.reset_classifier(0)
        assert model(x).shape == (2, 24)


def test_no_weight_decay_names():
    model = tiny()
    names = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.gamma_1", "blocks_token_only.1.gamma_2"} <= names
    params = dict(model.named_parameters())
    assert all(n in params for n in names)


def test_layerscale_init_and_drop_path_schedule():
    model = tiny(init_scale=1e-5, drop_path_rate=0.2, depth=3)
    assert torch.all(model.blocks[0].gamma_1 == 1e-5)
    assert [b.drop_path.p for b in model.blocks] == [0.2, 0.2, 0.2]  # official: same rate
    assert all(b.drop_path.p == 0.0 for b in model.blocks_token_only)
    linear = tiny(drop_path_rate=0.2, depth=3, drop_path_schedule="linear")
    assert [b.drop_path.p for b in linear.blocks] == pytest.approx([0.0, 0.1, 0.2])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(img_size=18), "img_size must be a multiple of patch_size=4, got 18"),
        (dict(embed_dim=25), "embed_dim must be divisible by num_heads=2, got 25"),
        (dict(class_token="early"), "ca_depth must be 0, got 2"),
        (dict(ca_depth=0), "ca_depth must be >= 1, got 0"),
        (dict(pooling="avg"), "ca_depth must be 0, got 2"),
        (dict(branch_scale="post"), "branch_scale must be one of"),
        (dict(drop_path_rate=1.5), r"drop_path_rate must be in \[0, 1\), got 1.5"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        CaiTConfig(**{**TINY, **overrides})


def test_config_round_trips_through_a_dict():
    config = CaiTConfig(**TINY)
    assert CaiTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown CaiTConfig fields"):
        CaiTConfig.from_dict({**config.to_dict(), "depht": 3})


def test_variant_table():
    names = cait.list_models()
    assert (
        len(
            [
                n
                for n in names
                if n.startswith("cait_") and n.split("_")[-1] in ("224", "384", "448")
            ]
        )
        == 10
    )
    assert "deit_small_patch16_224" in names and "cait_tiny_32" in names
    assert cait.list_models("cait_m*") == ["cait_m36_384", "cait_m48_448"]
    v = cait.get_variant("cait_s36_384")
    assert v.config.init_scale == 1e-6 and v.crop_pct == 1.0 and v.url.endswith("S36_384.pth")
    assert cait.get_variant("deit_tiny_patch16_224").crop_pct == 0.875
    with pytest.raises(ValueError, match="did you mean"):
        cait.get_variant("cait_xxs24_244")
    with pytest.raises(ValueError, match="already registered"):
        cait.register_variant(v)
    model = cait.create_model("cait_tiny_32", depth=2, num_classes=3)
    assert len(model.blocks) == 2 and model.num_classes == 3
    with pytest.raises(ValueError, match="unknown CaiTConfig fields"):
        cait.create_model("cait_tiny_32", depht=2)
