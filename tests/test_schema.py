"""The config checker: types and choices from the annotations, plain data converted."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import pytest
import yaml

from cait.models.config import ATTN_IMPLS, BRANCH_SCALES, AttnImpl, BranchScale, CaiTConfig
from cait.schema import check_fields, convert, convert_fields, from_dict
from cait.training.config import DistillConfig, TrainConfig, config_from_dict

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
