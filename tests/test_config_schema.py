"""Typed config validation: unknown keys name the closest key, types are checked and coerced."""

from dataclasses import dataclass

import pytest

from fusion_bench.config_schema import build_config, describe, option
from fusion_bench.errors import ConfigError


@dataclass
class Cfg:
    scaling_factor: float = option(0.3, help="lambda")
    density: float = option(0.2, help="kept fraction")
    steps: int = option(10, help="steps")
    flag: bool = option(False, help="a flag")
    mode: str = option("sum", help="mode", choices=("sum", "mean"))
    names: list[str] = option([], help="names")
    maybe: str | None = option(None, help="optional")


def test_defaults_and_values():
    c = build_config(Cfg, {"scaling_factor": 1, "steps": 3.0, "flag": "true", "names": ("a", "b"), "maybe": "x"})
    assert c.scaling_factor == 1.0 and isinstance(c.scaling_factor, float)
    assert c.steps == 3 and isinstance(c.steps, int)
    assert c.flag is True and c.names == ["a", "b"] and c.maybe == "x"
    assert build_config(Cfg).density == 0.2


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"method\.scaling_facter.*Did you mean 'scaling_factor'"):
        build_config(Cfg, {"scaling_facter": 0.1}, prefix="method")


@pytest.mark.parametrize("key,value,msg", [
    ("scaling_factor", "abc", "expected a number"),
    ("steps", 1.5, "expected an integer"),
    ("flag", "yes please", "expected true or false"),
    ("names", "abc", "expected a list"),
    ("mode", "summ", "Did you mean 'sum'"),
    ("steps", True, "expected an integer"),
])
def test_wrong_types_are_errors(key, value, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        build_config(Cfg, {key: value}, prefix="method")
    assert f"method.{key}" in str(e.value)


def test_overrides_win_and_ignore():
    c = build_config(Cfg, {"density": 0.5, "name": "x"}, ignore=("name",), density=0.7)
    assert c.density == 0.7


def test_describe_lists_help():
    rows = {r[0]: r for r in describe(Cfg)}
    assert rows["scaling_factor"][3] == "lambda" and rows["names"][2] == []
