"""Our models in the places timm users plug models in: timm's data config, its optimiser
factory with layer decay, its feature wrappers, torchvision's FX feature extractor,
``torch.export`` with a dynamic batch, and the checks timm's own test suite applies to its
CaiT and DeiT models (tests/test_models.py in timm: forward, backward, cfgs, intermediates,
features, FX), with the input sizes timm uses there. Written in our own words.
"""

from __future__ import annotations

import json
import math

import pytest
import timm
import timm.data
import timm.optim
import torch
from conftest import randomize_
from PIL import Image
from timm.models._features import FeatureGetterNet, FeatureInfo
from torchvision.models.feature_extraction import (
    NodePathTracer,
    create_feature_extractor,
    get_graph_node_names,
)

import cait
from cait.models.cait import take_indices

# The sizes timm's model tests use: forward at most 384, backward 128, features 96, FX 128.
FWD_SIZE, BWD_SIZE, FEAT_SIZE, FX_SIZE = 384, 128, 96, 128
# A CaiT, a DeiT with distillation token and our demo variant in the default run; every
# other variant in the slow one (the largest take minutes on a CPU).
CHECKED = ["cait_xxs24_224", "deit_tiny_distilled_patch16_224", "cait_digits_16"]
ALL = cait.list_models()
OTHERS = sorted(set(ALL) - set(CHECKED))


def _input_size(model: cait.CaiT, target: int) -> tuple[int, int, int]:
    """timm's rule: the cfg's input size, capped at ``target`` unless the size is fixed."""
    size = model.default_cfg["input_size"]
    if model.default_cfg.get("fixed_input_size"):
        return size
    return tuple(min(s, target) for s in size)


def _images(model: cait.CaiT, target: int, batch: int = 1) -> torch.Tensor:
    c, h, w = _input_size(model, target)
    p = model.config.patch_size  # a size timm would cap to must stay a multiple of the patch
    return torch.randn(batch, c, h // p * p, w // p * p)


# ---------------------------------------------------------------- timm's data config


@pytest.mark.parametrize("name", ALL)
def test_resolve_data_config_gives_each_variants_eval_transform(name):
    variant = cait.get_variant(name)
    model = cait.create_model(name, depth=1)  # one block: the cfg does not depend on depth
    config = timm.data.resolve_data_config({}, model=model)
    spec = variant.input_spec
    assert config["input_size"] == (3, spec.img_size, spec.img_size)
    assert config["crop_pct"] == spec.crop_pct
    assert config["interpolation"] == spec.interpolation
    assert config["mean"] == spec.mean and config["std"] == spec.std
    assert config["crop_mode"] == "center"
    image = Image.new("RGB", (spec.img_size + 37, spec.img_size + 11), (120, 30, 200))
    tensor = timm.data.create_transform(**config)(image)
    assert tensor.shape == (3, spec.img_size, spec.img_size)
    expected = (torch.tensor([120, 30, 200]) / 255 - torch.tensor(spec.mean)) / torch.tensor(
        spec.std
    )
    torch.testing.assert_close(tensor[:, 5, 5], expected.float(), atol=1e-3, rtol=0)


def test_pretrained_cfg_follows_overrides_and_names_both_heads():
    model = cait.create_model("cait_xxs24_224", img_size=384, num_classes=7)
    cfg = model.pretrained_cfg
    assert cfg is model.default_cfg
    assert cfg["input_size"] == (3, 384, 384) and cfg["num_classes"] == 7
    assert cfg["hf_hub_id"] == "timm/cait_xxs24_224.fb_dist_in1k" and cfg["url"].endswith(".pth")
    assert cfg["fixed_input_size"] is False and cfg["architecture"] == "cait_xxs24_224"
    distilled = cait.create_model("deit_tiny_distilled_patch16_224")
    assert distilled.pretrained_cfg["classifier"] == ("head", "head_dist")
    assert distilled.get_classifier() == (distilled.head, distilled.head_dist)
    # a model made from a config alone gets its family's defaults
    bare = cait.CaiT(cait.CaiTConfig(img_size=32, patch_size=4, depth=1, embed_dim=48))
    assert bare.pretrained_cfg["input_size"] == (3, 32, 32)
    assert bare.pretrained_cfg["crop_pct"] == 1.0


def test_loaded_checkpoint_carries_its_input_spec(tmp_path):
    """A checkpoint of ours gives timm's data config its own size and statistics."""
    from safetensors.torch import save_file

    from cait.models.build import load_for_inference
    from cait.models.weights_file import checkpoint_metadata, model_spec

    model = cait.create_model("cait_digits_16")
    spec = cait.get_variant("cait_digits_16").input_spec.replace(crop_pct=0.9)
    meta = checkpoint_metadata(model_spec("cait_digits_16", model, {}), spec, list("0123456789"))
    path = tmp_path / "model.safetensors"
    save_file(
        model.state_dict(),
        str(path),
        metadata={k: json.dumps(v) for k, v in meta.items()},
    )
    loaded = load_for_inference(str(path)).model
    config = timm.data.resolve_data_config({}, model=loaded)
    assert config["input_size"] == (3, 16, 16) and config["crop_pct"] == 0.9
    assert config["mean"] == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- classifier and pooling


@pytest.mark.parametrize("name", ["cait_digits_16", "deit_tiny_distilled_patch16_224"])
def test_reset_classifier_replaces_every_head(name):
    model = cait.create_model(name, img_size=32 if name.startswith("deit") else 16)
    x = torch.randn(2, 3, model.config.img_size, model.config.img_size)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.config.num_classes == 3
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 3)
        model.set_distilled_training(True)
        out = model.train()(x)
    if model.config.distilled:
        assert model.head_dist.out_features == 3
        assert [o.shape for o in out] == [(2, 3), (2, 3)]
    else:
        assert out.shape == (2, 3)
    model.reset_classifier(0)
    with torch.no_grad():
        pooled = model.eval()(x)
        assert pooled.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(pooled, model.forward_head(model.forward_features(x), True))
    model.reset_classifier(0, "")
    with torch.no_grad():
        assert model(x).shape == model.forward_features(x).shape  # every token, unpooled


def test_global_pool_choices_and_errors():
    model = cait.create_model("cait_digits_16", global_pool="avg")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model.eval().forward_features(x)
        torch.testing.assert_close(
            model.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(dim=1)
        )
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(10, "max")
    with pytest.raises(ValueError, match="distilled"):
        cait.create_model("deit_tiny_distilled_patch16_224", global_pool="avg")
    with pytest.raises(ValueError, match="needs a class token"):
        cait.CaiT(cait.CaiTConfig(pooling="avg", ca_depth=0), global_pool="token")
    with pytest.raises(ValueError, match="checkpoints record the config only"):
        from cait.models.weights_file import model_spec

        model_spec("cait_digits_16", model, {})


# ---------------------------------------------------------------- layer decay


@pytest.mark.parametrize(
    "name", ["cait_xxs24_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]
)
def test_layer_decay_groups_equal_timms_own_model(name):
    """timm's optimiser factory groups our parameters exactly as it groups its own model's:
    the same number of groups, each with the same learning-rate scale and parameters."""

    def groups(model):
        opt = timm.optim.create_optimizer_v2(
            model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75
        )
        return sorted(
            (round(g["lr_scale"], 9), g["weight_decay"], sum(p.numel() for p in g["params"]))
            for g in opt.param_groups
        )

    ours, theirs = groups(cait.create_model(name)), groups(timm.create_model(name))
    assert len(ours) == len(theirs)
    assert ours == theirs
    if name == "cait_xxs24_224":
        assert len(ours) == 52  # 26 layers (embeddings, 24 blocks, head) x decay or not


def test_group_matcher_layer_ids():
    model = cait.create_model("cait_xxs24_224")
    layer = model.group_matcher()
    assert layer("cls_token") == layer("pos_embed") == layer("patch_embed.proj.weight") == 0
    assert layer("blocks.0.attn.qkv.weight") == 1 and layer("blocks.23.mlp.fc1.bias") == 24
    assert layer("blocks_token_only.0.attn.q.weight") == 23  # beside the last SA blocks
    assert layer("blocks_token_only.1.norm1.weight") == layer("norm.weight") == 24
    assert math.isinf(layer("head.weight"))


# ---------------------------------------------------------------- intermediates and features


def test_take_indices():
    assert take_indices(5, None) == ([0, 1, 2, 3, 4], 4)
    assert take_indices(5, 2) == ([3, 4], 4)
    assert take_indices(5, [0, -1, 2]) == ([0, 2, 4], 4)
    for bad in (0, 6, [5], [-6], []):
        with pytest.raises(ValueError):
            take_indices(5, bad)


@pytest.mark.parametrize("name", ["cait_xxs24_224", "deit_tiny_distilled_patch16_224"])
def test_forward_intermediates_equal_timms(name):
    """The same weights in timm's model and ours: the same per-block maps and final
    features, with every option of timm's contract."""
    overrides = dict(img_size=64, depth=4)
    theirs = randomize_(timm.create_model(name, **overrides)).eval()
    ours = cait.create_model(name, **overrides).eval()
    cait.load_pretrained(ours, theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    options = [
        {},
        {"indices": 2, "norm": True},
        {"indices": [0, 2], "stop_early": True},
        {"output_fmt": "NLC"},
        {"indices": [1], "intermediates_only": True},
    ]
    with torch.no_grad():
        for kwargs in options:
            a, b = (
                ours.forward_intermediates(x, **kwargs),
                theirs.forward_intermediates(x, **kwargs),
            )
            if not kwargs.get("intermediates_only"):
                torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5, msg=str(kwargs))
                a, b = a[1], b[1]
            assert len(a) == len(b)
            for f, g in zip(a, b, strict=True):
                torch.testing.assert_close(f, g, atol=1e-5, rtol=1e-5, msg=str(kwargs))


def test_forward_intermediates_rejects_unknown_format():
    model = cait.create_model("cait_digits_16")
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 16, 16), output_fmt="NHWC")


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("name", ["cait_xxs24_224", "deit_tiny_patch16_224"])
def test_timms_feature_getter_gives_per_block_maps(name, norm):
    """timm's FeatureGetterNet (its ``features_only`` wrapper for ViT-like models) prunes
    the model and returns NCHW maps of the chosen blocks, equal to the unpruned model's."""
    model = randomize_(cait.create_model(name, img_size=FEAT_SIZE)).eval()
    x = torch.randn(2, 3, FEAT_SIZE, FEAT_SIZE)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[3, 7, 11], norm=norm)[1]
    net = FeatureGetterNet(model, out_indices=[3, 7, 11], norm=norm).eval()
    assert len(model.blocks) == 12 and len(model.blocks_token_only) == 0  # pruned
    assert net.feature_info.channels() == [model.embed_dim] * 3
    assert net.feature_info.reduction() == [16] * 3
    with torch.no_grad():
        maps = net(x)
    assert [m.shape for m in maps] == [(2, model.embed_dim, 6, 6)] * 3
    for m, e in zip(maps, expected, strict=True):
        torch.testing.assert_close(m, e)


# ---------------------------------------------------------------- torch.fx


def _fx_model(model: torch.nn.Module, train: bool) -> torch.fx.GraphModule:
    """torchvision's feature extractor returning the model's outputs, as timm's tests build
    it (the train graph's outputs are found from its output node)."""
    train_nodes, eval_nodes = get_graph_node_names(model)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer().trace(model)
        nodes = list(reversed(graph.nodes))
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in nodes[0]._input_nodes]
    return create_feature_extractor(
        model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]]
    )


def _cat(outputs):
    outputs = tuple(outputs.values()) if isinstance(outputs, dict) else outputs
    return torch.cat(outputs) if isinstance(outputs, tuple) else outputs


@pytest.mark.parametrize("name", CHECKED)
def test_fx_forward_equals_eager(name):
    model = randomize_(cait.create_model(name)).eval()
    x = _images(model, FX_SIZE)
    with torch.inference_mode():
        expected = _cat(model(x))
        traced = _fx_model(model, train=False)
        assert torch.equal(_cat(traced(x)), expected)
        # the traced graph keeps the input checks and resizes position embeddings
        with pytest.raises(ValueError, match="multiples of the patch size"):
            traced(x[..., :-1])


@pytest.mark.parametrize("name", CHECKED)
def test_fx_backward_reaches_every_parameter(name):
    model = cait.create_model(name, num_classes=42).train()
    model.set_distilled_training(True)
    traced = _fx_model(model, train=True)
    out = _cat(traced(_images(model, FX_SIZE, batch=2)))
    out.mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


# ---------------------------------------------------------------- torch.export


def test_export_with_dynamic_batch_runs_at_batch_1_and_7():
    """The default fast attention path exports with the batch left symbolic."""
    model = randomize_(cait.create_model("cait_xxs24_224", depth=2, img_size=64)).eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    with torch.no_grad():
        program = torch.export.export(
            model, (torch.randn(3, 3, 64, 64),), dynamic_shapes=({0: batch},)
        ).module()
        for size in (1, 7):
            x = torch.randn(size, 3, 64, 64)
            torch.testing.assert_close(program(x), model(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- timm's model tests


def _model_checks(name: str) -> None:
    """What timm's tests/test_models.py checks of its CaiT/DeiT models, in one pass."""
    # forward, and the same output with gradient checkpointing
    model = cait.create_model(name).eval()
    x = _images(model, FWD_SIZE)
    with torch.no_grad():
        out = model(x)
        assert out.shape[0] == 1 and not torch.isnan(out).any()
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
    model.set_grad_checkpointing(False)

    # backward with 42 classes: every parameter gets a gradient
    model = cait.create_model(name, num_classes=42).train()
    xb = _images(model, BWD_SIZE, batch=2)
    outputs = _cat(model(xb))
    outputs.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()

    # cfgs (timm's "non-standard" checks for ViT-like models)
    model = cait.create_model(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state = model.state_dict()
    cfg = model.default_cfg
    x = _images(model, 320)
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        assert features.shape[-1] == model.num_features
        assert pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == pre.shape and out.shape[-1] == model.head_hidden_size
        out = cait.create_model(name, num_classes=0).eval()(x)
        assert out.shape[-1] == model.num_features
    classifiers = (
        cfg["classifier"] if isinstance(cfg["classifier"], tuple) else (cfg["classifier"],)
    )
    assert all(c + ".weight" in state for c in classifiers)
    assert cfg["first_conv"] + ".weight" in state

    # forward_intermediates and feature_info
    model = cait.create_model(name).eval()
    x = _images(model, FEAT_SIZE)
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(maps) == len(info.channels()) >= 3
        for c, r, m in zip(info.channels(), info.reduction(), maps, strict=True):
            assert m.shape[:2] == (1, c)
            assert m.shape[2] <= math.ceil(x.shape[2] / r) + 1
            assert m.shape[3] <= math.ceil(x.shape[3] / r) + 1
            assert not torch.isnan(m).any()
        assert torch.allclose(final, model.forward_features(x))
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)

    # features-only wrapper
    net = FeatureGetterNet(cait.create_model(name), out_indices=3).eval()
    with torch.no_grad():
        maps = net(x)
    assert [m.shape[1] for m in maps] == net.feature_info.channels()


@pytest.mark.parametrize("name", CHECKED)
def test_passes_timms_model_checks(name):
    _model_checks(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_every_variant_passes_timms_model_checks(name):
    _model_checks(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_every_variant_traces_with_fx(name):
    test_fx_forward_equals_eager(name)
    test_fx_backward_reaches_every_parameter(name)
