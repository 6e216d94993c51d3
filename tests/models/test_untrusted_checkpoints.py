"""Checkpoints are untrusted input (issue 19): their metadata is data checked against a closed
schema before anything is built, the sizes it implies are compared with the file's tensors
before any allocation, a ``timm:`` model is built from allow-listed fields only, a local
path is never sent to the network, and inference loads strictly (no random head)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import one_line
from safetensors.torch import save_file

import cait
from cait.models.build import build_model, convert_checkpoint, load_for_inference
from cait.models.hub import is_hub_id
from cait.models.pretrained import load_pretrained, read_state_dict
from cait.models.registry import create_model, get_variant
from cait.models.weights_file import checkpoint_metadata, model_spec, save_safetensors

NAME = "cait_digits_16"
ARGS = {"embed_dim": 16, "depth": 1, "ca_depth": 1, "num_heads": 2, "num_classes": 3}
CLASSES = ["a", "b", "c"]


def _model(**overrides) -> cait.CaiT:
    return create_model(NAME, **{**ARGS, **overrides})


def _metadata(model: torch.nn.Module | None = None) -> dict:
    """What a training run writes: name, full config, input spec, class names."""
    model = model or _model()
    return checkpoint_metadata(model_spec(NAME, model, {}), get_variant(NAME).input_spec, CLASSES)


def _write(path, tensors: dict, metadata: dict, encoded: dict | None = None) -> str:
    """A safetensors file with ``metadata`` JSON-encoded (``encoded`` entries as they are)."""
    header = {k: json.dumps(v) for k, v in metadata.items()}
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), {**header, **(encoded or {})}
    )
    return str(path)


def _run(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter; its last stdout line is a JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_checkpoint_cait_writes_passes_the_schema(tmp_path):
    model = _model()
    path = tmp_path / "model.safetensors"
    save_safetensors(model.state_dict(), path, _metadata(model))
    loaded = load_for_inference(str(path))
    assert loaded.class_names == CLASSES and loaded.settings == get_variant(NAME).input_spec
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


# ------------------------------------------------------------------ 1. a closed schema


def _set(meta: dict, dotted: str, value) -> dict:
    """``meta`` with ``dotted`` (``model_config.embed_dim``) set to ``value``."""
    meta = json.loads(json.dumps(meta))
    *parents, last = dotted.split(".")
    target = meta
    for key in parents:
        target = target[key]
    target[last] = value
    return meta


# (field, value, what the message says of them): the first part follows "bad checkpoint
# metadata: " directly, so it names the field; the rest name the value
BAD_METADATA = [
    ("evil", {"x": 1}, ["unknown header entries ['evil']"]),
    ("model", "not_a_variant", ["unknown model 'not_a_variant'"]),
    ("model", ["cait_digits_16"], ["model must be a model name, got ['cait_digits_16']"]),
    ("model", "torchvision:resnet18", ["unknown model 'torchvision:resnet18'"]),
    ("model", "timm:no_such_timm_model", ["model 'timm:no_such_timm_model' is not in timm's"]),
    ("model_config", [16, 1], ["model_config must be a mapping", "got [16, 1]"]),
    ("model_config.bogus", 1, ["model_config: unknown CaiTConfig fields ['bogus']"]),
    # not divisible by 2 heads
    ("model_config.embed_dim", 15, ["model_config: embed_dim must be divisible", "got 15"]),
    ("model_config.depth", -1, ["model_config: depth must be a positive", "got -1"]),
    # past the bound on blocks
    ("model_config.depth", 1001, ["model_config.depth must be at most 1000", "got 1001"]),
    ("model_config.num_classes", True, ["model_config: num_classes must be", "got True"]),
    ("model_config.patch_size", 0, ["model_config: patch_size must be a positive", "got 0"]),
    ("data_settings.img_size", 10**6, ["data_settings.img_size must be", "got 1000000"]),
    ("data_settings.crop_pct", 0.0, ["data_settings.crop_pct must be", "got 0.0"]),
    (
        "data_settings.interpolation",
        "../../etc/passwd",
        ["data_settings.interpolation must be one of", "got '../../etc/passwd'"],
    ),
    ("data_settings.std", [0.5, 0.0, 0.5], ["data_settings.std[1] must be", "got 0.0"]),
    ("data_settings.mean", [0.5, 0.5], ["data_settings.mean and data_settings.std", "got 2 and"]),
    ("data_settings.extra", 1, ["data_settings must have exactly the fields", "unknown ['extra']"]),
    # 2 names, 3 classes
    ("class_names", ["a", "b"], ["class_names must name the model's 3 classes", "got 2 names"]),
    ("class_names", ["a", "b", 3], ["class_names must be a list of strings", "got ['a', 'b', 3]"]),
    ("class_names", "abc", ["class_names must be a list of strings", "got 'abc'"]),
]


@pytest.mark.parametrize(("field", "value", "said"), BAD_METADATA)
def test_bad_metadata_is_refused_in_one_line_naming_file_and_field(tmp_path, field, value, said):
    model = _model()
    path = _write(
        tmp_path / "crafted.safetensors", model.state_dict(), _set(_metadata(model), field, value)
    )
    with pytest.raises(ValueError) as err:
        load_for_inference(path)
    first, *rest = said
    one_line(err, f"crafted.safetensors: bad checkpoint metadata: {first}", *rest)


def test_a_missing_data_settings_field_is_named(tmp_path):
    model = _model()
    meta = _metadata(model)
    del meta["data_settings"]["crop_pct"]
    path = _write(tmp_path / "crafted.safetensors", model.state_dict(), meta)
    with pytest.raises(ValueError) as err:
        load_for_inference(path)
    one_line(err, "crafted.safetensors", "data_settings", "crop_pct")


def test_broken_json_in_the_header_names_the_file_and_the_key(tmp_path):
    model = _model()
    meta = _metadata(model)
    path = _write(
        tmp_path / "crafted.safetensors",
        model.state_dict(),
        {k: v for k, v in meta.items() if k != "class_names"},
        encoded={"class_names": "['a', 'b', 'c'"},
    )
    with pytest.raises(ValueError) as err:
        load_for_inference(path)
    one_line(err, "crafted.safetensors", "class_names", "JSON")


@pytest.mark.parametrize("layout", ["today", "before the seams change"])
def test_run_checkpoint_metadata_goes_through_the_same_schema(tmp_path, layout):
    model = _model()
    path = tmp_path / "last.pt"
    meta = {**_metadata(model), "class_names": ["a"]}
    if layout == "today":
        contents = {"model": model.state_dict(), "metadata": meta, "run": {"config": {}}}
    else:  # the metadata beside the run's fields, the name in the run's config
        entries = {k: v for k, v in meta.items() if k != "model"}
        contents = {"model": model.state_dict(), "config": {"model": NAME}, **entries}
    torch.save(contents, path)
    with pytest.raises(ValueError) as err:
        load_for_inference(str(path))
    one_line(err, "last.pt: bad checkpoint metadata: class_names")


# ---------------------------------------------------------- 2. sizes before allocation

_SIZE_BOMB = """
import json, resource, sys
import cait.models.build as build

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize"))

# a guard for the machine, not the measure: code that allocates the model runs out here
limit = vm_bytes() + 3 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = peak_mb()
try:
    build.load_for_inference(sys.argv[1])
    outcome = "loaded"
except Exception as err:
    outcome = f"{type(err).__name__}: {err}"
print(json.dumps({"outcome": outcome, "grew_mb": peak_mb() - before}))
"""


def test_a_size_bomb_is_refused_before_allocating(tmp_path):
    """An 856-byte file whose metadata asks for embed_dim 9600 (4.4 GB per block) is
    refused from the header alone, with the peak RSS growing by less than 300 MB."""
    meta = _set(_metadata(), "model_config.embed_dim", 9600)
    meta = _set(meta, "model_config.num_heads", 8)
    path = _write(tmp_path / "bomb.safetensors", {"cls_token": torch.zeros(1, 1, 4)}, meta)
    assert os.path.getsize(path) < 1000
    result = _run(_SIZE_BOMB, path)
    assert result["outcome"].startswith("ValueError: "), result
    assert "bomb.safetensors" in result["outcome"] and "cls_token" in result["outcome"]
    assert "\n" not in result["outcome"]
    assert result["grew_mb"] < 300, result


def test_tensors_of_another_size_than_the_metadata_names_tensor_and_shapes(tmp_path):
    path = _write(tmp_path / "m.safetensors", _model(embed_dim=32).state_dict(), _metadata())
    with pytest.raises(ValueError) as err:
        load_for_inference(path)
    one_line(err, "m.safetensors", "cls_token", "(1, 1, 32)", "(1, 1, 16)")


# ------------------------------------------------ 3. timm models from allow-listed fields

_TIMM_CHECKPOINT_PATH = """
import json, os, sys
ckpt, pkl, marker = sys.argv[1:4]
opened = []

def audit(event, args):
    if event == "open" and args and os.path.basename(str(args[0])) == os.path.basename(pkl):
        opened.append(str(args[0]))

sys.addaudithook(audit)
from cait.models.build import load_for_inference
try:
    load_for_inference(ckpt)
    outcome = "loaded"
except Exception as err:
    outcome = f"{type(err).__name__}: {err}"
print(json.dumps({"outcome": outcome, "opened": opened, "marker": os.path.exists(marker)}))
"""


class _Payload:
    """Unpickled, it creates the marker (a directory): proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_timm_checkpoint_path_in_metadata_is_refused_and_nothing_is_opened(tmp_path):
    marker = tmp_path / "code_ran"
    pkl = tmp_path / "payload.pth"
    pkl.write_bytes(pickle.dumps({"state_dict": _Payload(str(marker))}, protocol=2))
    model = build_model("timm:resnet10t", {}, 3)
    spec = model_spec("timm:resnet10t", model, {})
    spec["model_config"]["checkpoint_path"] = str(pkl)
    meta = checkpoint_metadata(spec, get_variant(NAME).input_spec, CLASSES)
    ckpt = _write(tmp_path / "timm.safetensors", model.state_dict(), meta)
    result = _run(_TIMM_CHECKPOINT_PATH, ckpt, str(pkl), str(marker))
    assert result["outcome"].startswith("ValueError: "), result
    assert "timm.safetensors" in result["outcome"] and "checkpoint_path" in result["outcome"]
    assert result["opened"] == [] and not result["marker"] and not marker.exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("pretrained", True),
        ("checkpoint_path", "weights.pth"),
        ("pretrained_cfg_overlay", {"file": "weights.pth"}),
        ("features_only", True),
        ("cache_dir", "/tmp"),
        ("drop_rate", "0.1"),  # an allowed field with a value of the wrong type
        ("img_size", [224, "x"]),
    ],
)
def test_training_builds_a_timm_model_from_allowed_fields_only(field, value):
    with pytest.raises(ValueError) as err:
        build_model("timm:resnet10t", {field: value}, 3)
    one_line(err, field)


def test_a_timm_checkpoint_cait_writes_loads_back(tmp_path):
    args = {"drop_rate": 0.1, "global_pool": "avg"}
    model = build_model("timm:resnet10t", args, 3)
    meta = checkpoint_metadata(
        model_spec("timm:resnet10t", model, args), get_variant(NAME).input_spec, CLASSES
    )
    path = tmp_path / "model.safetensors"
    save_safetensors(model.state_dict(), path, meta)
    loaded = load_for_inference(str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


# ------------------------------------------------ 4. local paths never go to the network


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a local path was sent to the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.chdir(tmp_path)


MISTYPED = "runs/smal"
NOT_FOUND = (
    f"checkpoint not found: {MISTYPED} (no such file; a Hugging Face Hub repository is "
    f"written hf-hub:{MISTYPED})"
)


@pytest.mark.parametrize(
    "load",
    [
        read_state_dict,
        lambda source: load_pretrained(_model(), source),
        lambda source: load_for_inference(source, NAME),
        lambda source: convert_checkpoint(source, "out.safetensors"),
    ],
    ids=["read_state_dict", "load_pretrained", "load_for_inference", "convert_checkpoint"],
)
def test_a_mistyped_local_path_is_not_found_not_sent_to_the_hub(no_network, load):
    with pytest.raises(FileNotFoundError) as err:
        load(MISTYPED)
    assert str(err.value) == NOT_FOUND


def test_a_hub_repository_is_written_hf_hub(no_network):
    assert is_hub_id("hf-hub:timm/cait_xxs24_224.fb_dist_in1k")
    assert not is_hub_id("timm/cait_xxs24_224.fb_dist_in1k")
    assert not is_hub_id(MISTYPED)
    assert not is_hub_id("hf-hub:../..")
    with pytest.raises(ValueError) as err:
        read_state_dict("hf-hub:../..")
    one_line(err, "hf-hub:../..", "not a Hugging Face Hub repository")


def test_a_directory_is_not_a_checkpoint(no_network, tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError) as err:
        read_state_dict("runs")
    one_line(err, "runs", "directory")


# ---------------------------------------------------- 5. inference loads strictly


def test_inference_never_replaces_a_head_of_the_wrong_shape(tmp_path):
    tensors = _model(num_classes=5).state_dict()
    path = _write(tmp_path / "m.safetensors", tensors, _metadata())  # metadata: 3 classes
    with pytest.raises(ValueError) as err:
        load_for_inference(path)
    one_line(err, "m.safetensors", "head.weight", "(5, 16)", "(3, 16)")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_inference_refuses_missing_and_unexpected_tensors(tmp_path, change):
    tensors = dict(_model().state_dict())
    if change == "missing":
        del tensors["norm.bias"]
        named = "norm.bias"
    else:
        tensors["blocks.7.gamma_1"] = torch.ones(16)
        named = "blocks.7.gamma_1"
    path = _write(tmp_path / "m.safetensors", tensors, _metadata())
    with pytest.raises(ValueError) as err:
        load_for_inference(path)
    one_line(err, "m.safetensors", named)


def test_weights_without_metadata_take_their_head_but_nothing_else_adapts(tmp_path):
    """``--model NAME``: the head's size comes from the file; a position embedding of
    another grid is an error, not silently resampled."""
    seven = create_model(NAME, num_classes=7)
    path = tmp_path / "weights.pth"
    torch.save(seven.state_dict(), path)
    loaded = load_for_inference(str(path), NAME)
    assert loaded.model.num_classes == 7
    torch.testing.assert_close(loaded.model.head.weight, seven.head.weight)

    torch.save(create_model(NAME, img_size=32).state_dict(), path)  # an 8x8 grid, not 4x4
    with pytest.raises(ValueError) as err:
        load_for_inference(str(path), NAME)
    one_line(err, "weights.pth", "pos_embed", "(1, 64, 96)", "(1, 16, 96)")


def test_fine_tuning_still_resets_the_head(tmp_path):
    """init_from keeps its documented head reset; only inference is strict."""
    path = tmp_path / "weights.pth"
    torch.save(_model(num_classes=5).state_dict(), path)
    report = load_pretrained(_model(), str(path))
    assert report.reset_head
