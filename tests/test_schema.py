"""The config checker: types and choices from the annotations, plain data converted."""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import pytest
import yaml

from cait.models.config import ATTN_IMPLS, BRANCH_SCALES, AttnImpl, BranchScale, CaiTConfig
from cait.schema import check_fields, convert, convert_fields, from_dict
from cait.training.config import (
    DistillConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_recipe,
)

Colour = Literal["red", "green"]


@dataclass(frozen=True)
class Inner:
    size: int = 1
    scale: float = 1.0
    colour: Colour = "red"

    def __post_init__(self) -> None:
        check_fields(self, "inner")
        if self.size < 1:
            raise ValueError(f"inner.size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    flag: bool = False
    limit: float | None = None
    pair: tuple[float, float] = (0.0, 1.0)
    many: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        check_fields(self)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(colour="blue"), r"inner.colour must be one of \['red', 'green'\], got 'blue'"),
        (dict(size=2.0), "inner.size must be an integer, got 2.0"),
        (dict(size=True), "inner.size must be an integer, got True"),
        (dict(scale="1"), "inner.scale must be a number, got '1'"),
        (dict(size=0), "inner.size must be >= 1, got 0"),  # the class's own check still runs
    ],
)
def test_a_constructed_config_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Inner(**kwargs)


def test_construction_converts_nothing():
    assert Inner(scale=2).scale == 2 and type(Inner(scale=2).scale) is int  # an int is a number
    with pytest.raises(ValueError, match=r"pair must be a tuple, got \[0.0, 1.0\]"):
        Outer(pair=[0.0, 1.0])
    with pytest.raises(ValueError, match="inner must be an instance of Inner"):
        Outer(inner={"size": 2})
    with pytest.raises(ValueError, match="flag must be true or false, got 1"):
        Outer(flag=1)
    with pytest.raises(ValueError, match="limit must be a number, got 'a'"):
        Outer(limit="a")
    assert Outer(limit=None, extra={"a": [1]}).extra == {"a": [1]}


def test_plain_data_builds_a_nested_config():
    data = yaml.safe_load(
        "name: y\nlimit: 5e-4\npair: [0, 2]\nmany: [1, 2, 3]\ninner: {size: 3, colour: green}\n"
    )
    assert data["limit"] == "5e-4"  # YAML 1.1 reads a number without a dot as a string
    out = from_dict(Outer, data)
    assert out == Outer(
        name="y", limit=5e-4, pair=(0.0, 2.0), many=(1, 2, 3), inner=Inner(3, 1.0, "green")
    )
    assert type(out.limit) is float and type(out.pair[0]) is float and type(out.pair) is tuple


@pytest.mark.parametrize(
    "data,message",
    [
        ({"inner": {"colour": "blue"}}, r"inner.colour must be one of \['red', 'green'\]"),
        ({"inner": {"size": 0}}, "inner.size must be >= 1, got 0"),
        ({"inner": {"sise": 2}}, r"unknown config keys \['inner.sise'\]; known: \['colour'"),
        ({"nmae": "z"}, r"unknown config keys \['nmae'\]"),
        ({"inner": 3}, "inner must be a mapping, got 3"),
        ({"limit": "lots"}, "limit must be a number, got 'lots'"),
        ({"limit": True}, "limit must be a number, got True"),
        ({"pair": [1.0]}, r"pair must have 2 items, got \[1.0\]"),
        ({"pair": "ab"}, "pair must be a list, got 'ab'"),
        ({"many": [1, 2.5]}, r"many\[1\] must be an integer, got 2.5"),
        ({"extra": [1]}, r"extra must be a mapping, got \[1\]"),
        ({"name": 3}, "name must be a string, got 3"),
    ],
)
def test_plain_data_errors_name_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(Outer, data)


def test_convert_fields_checks_partial_data_without_building():
    assert convert_fields(Inner, {"scale": "1e-3"}, "args") == {"scale": 1e-3}
    with pytest.raises(ValueError, match=r"unknown config keys \['args.nope'\]"):
        convert_fields(Inner, {"nope": 1}, "args")
    assert convert(None, int | None, "x") is None
    with pytest.raises(ValueError, match="x must be an integer, got None"):
        convert(None, int, "x")


def test_literal_choices_are_compared_with_their_type():
    with pytest.raises(ValueError, match="must be one of"):
        convert(True, Literal[1, 2], "x")
    assert convert(1, Literal[1, 2], "x") == 1


def test_the_package_configs_use_the_checker():
    assert BRANCH_SCALES == get_args(BranchScale) and ATTN_IMPLS == get_args(AttnImpl)
    with pytest.raises(ValueError, match=r"attn_impl must be one of \['fast', 'plain', 'recomp"):
        CaiTConfig(attn_impl="flash")
    with pytest.raises(ValueError, match="must be an instance of DistillConfig"):
        TrainConfig(distill={"kind": "none"})
    with pytest.raises(ValueError, match="augment.re_mode must be one of"):
        config_from_dict({"augment": {"re_mode": "noise"}})
    config = config_from_dict({"optim": {"lr": "1e-3", "betas": [0.9, 0.95]}})
    assert config.optim.lr == 1e-3 and config.optim.betas == (0.9, 0.95)
    assert dataclasses.replace(config, epochs=3).epochs == 3


def test_library_messages_name_config_keys_not_flags():
    with pytest.raises(ValueError) as err:
        DistillConfig(kind="hard")
    assert "distill.teacher" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(ValueError) as err:
        DistillConfig(teacher="timm:resnet18")
    assert "distill.kind" in str(err.value) and "--" not in str(err.value)


def _alias_bomb(levels: int = 9, width: int = 9) -> list:
    """What ``yaml.safe_load`` makes of a 'billion laughs' document: each level a list of
    ``width`` references to the level below (9**9 leaves, a few hundred objects)."""
    value: Any = "lol"
    for _ in range(levels):
        value = [value] * width
    return value


@pytest.mark.parametrize(
    "check",
    [
        lambda v: from_dict(Outer, {"inner": {"scale": v}}),  # a scalar field
        lambda v: convert(v, tuple[int, int], "size"),  # a fixed-length tuple
        lambda v: convert(v, Literal["a", "b"], "choice"),
        lambda v: from_dict(Outer, v),  # not a mapping
    ],
)
def test_a_message_shows_a_bounded_part_of_an_unbounded_value(check):
    with pytest.raises(ValueError) as err:
        check(_alias_bomb())
    message = str(err.value)
    assert len(message) < 500 and "..." in message, message


def test_a_value_checks_message_is_bounded_too():
    from cait.models.checks import integer, sequence

    with pytest.raises(ValueError) as err:
        sequence(integer(0, 9), (1, 4))(_alias_bomb(), "model_config.depths")
    assert len(str(err.value)) < 500 and "model_config.depths" in str(err.value)
    with pytest.raises(ValueError, match=r"got 'x{20}\.\.\.x{20}'|got 'x+\.\.\.x+'"):
        integer(0, 9)("x" * 10**6, "depth")


# --- numbers that are not finite -------------------------------------------------------


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "-nan"])
def test_a_number_read_from_data_must_be_finite(value):
    with pytest.raises(ValueError, match="inner.scale must be a finite number, got"):
        from_dict(Outer, {"inner": {"scale": value}})
    with pytest.raises(ValueError, match=r"pair\[1\] must be a finite number"):
        from_dict(Outer, {"pair": [0.0, value]})


def test_an_integer_beyond_any_float_is_not_a_number():
    with pytest.raises(ValueError, match="inner.scale must be a number"):
        from_dict(Outer, {"inner": {"scale": 10**400}})


def _holds(kind: Any, what: Any) -> bool:
    """Whether the annotation ``kind`` is ``what`` or holds it (in a union, a tuple...)."""
    inner = [a for a in typing.get_args(kind) if a is not Ellipsis]
    return kind is what or typing.get_origin(kind) is what or any(_holds(a, what) for a in inner)


def _float_fields(cls: type, where: str = "") -> dict[str, bool]:
    """The dotted name of every field under ``cls`` that holds a float, and whether it is a
    tuple of them."""
    names = {}
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        name = f"{where}{f.name}"
        if dataclasses.is_dataclass(kind):
            names.update(_float_fields(kind, f"{name}."))
        elif _holds(kind, float):
            names[name] = _holds(kind, tuple)
    return names


TRAIN_FLOATS = {**_float_fields(TrainConfig), **_float_fields(CaiTConfig, "model_args.")}


def test_the_float_fields_are_found():
    expected = {"optim.lr", "optim.betas", "data.mean", "dist_timeout", "model_args.init_scale"}
    assert expected <= set(TRAIN_FLOATS)


@pytest.mark.parametrize("name", TRAIN_FLOATS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_no_config_field_takes_inf_or_nan(name, value):
    """No float of the training or model config has a meaning for inf or nan (a timeout,
    a clip norm, a drop rate: each wants a finite number), so each refuses them by name."""
    value = f"[{value}, {value}]" if TRAIN_FLOATS[name] else value
    data = apply_overrides({"model": "cait_digits_16"}, [f"{name}={value}"])
    with pytest.raises(ValueError, match=rf"^{name}(\[\d\])? must be a finite number, got"):
        config_from_dict(data)


# --- YAML aliases ----------------------------------------------------------------------

_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
)


def test_a_recipe_that_expands_to_a_billion_values_is_refused_fast(tmp_path):
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(_LAUGHS + "\n")
    start = time.monotonic()
    with pytest.raises(ValueError) as err:
        load_recipe(recipe)
    assert time.monotonic() - start < 3
    assert str(err.value) == (
        f"recipe {recipe} holds more than 100,000 values after expanding YAML aliases"
    )


def test_an_override_that_expands_to_a_billion_values_is_refused_fast():
    flow = "{" + ", ".join(_LAUGHS.splitlines()) + "}"  # the same document on one line
    start = time.monotonic()
    with pytest.raises(ValueError, match="^override model_args.depths holds more than 100,000"):
        apply_overrides({}, [f"model_args.depths={flow}"])
    assert time.monotonic() - start < 3


def test_aliases_within_the_limit_are_expanded():
    data = apply_overrides({}, ["augment.scale=[&low 0.5, *low]"])
    assert data["augment"]["scale"] == [0.5, 0.5]
