"""Every shipped config composes and validates; every method of the registry is selectable."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from fusion_bench.cli import CONFIG_DIR, register_method_configs, validate_composed
from fusion_bench.methods import list_methods

register_method_configs()


def _yamls(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _compose(overrides):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return compose(config_name="fusion_bench", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


MODELPOOLS = _yamls("modelpool")
TASKPOOLS = _yamls("taskpool")
DEFAULT_MP = "clip_zoo" if "clip_zoo" in MODELPOOLS else (MODELPOOLS[0] if MODELPOOLS else None)
DEFAULT_TP = "clip_zoo" if "clip_zoo" in TASKPOOLS else (TASKPOOLS[0] if TASKPOOLS else None)
pytestmark = pytest.mark.skipif(DEFAULT_MP is None or DEFAULT_TP is None,
                                reason="no modelpool/taskpool YAML shipped yet")


@pytest.mark.parametrize("method", list_methods())
def test_every_method_composes(method):
    cfg = _compose([f"method={method}", f"modelpool={DEFAULT_MP}", f"taskpool={DEFAULT_TP}"])
    assert cfg.method.name == method
    validate_composed(cfg)


@pytest.mark.parametrize("pool", MODELPOOLS)
def test_every_modelpool_composes(pool):
    validate_composed(_compose([f"modelpool={pool}", f"taskpool={DEFAULT_TP}"]))


@pytest.mark.parametrize("pool", TASKPOOLS)
def test_every_taskpool_composes(pool):
    validate_composed(_compose([f"modelpool={DEFAULT_MP}", f"taskpool={pool}"]))


@pytest.mark.parametrize("path", sorted(Path(CONFIG_DIR).rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_yaml_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "fusion_bench" in first, f"{path} should begin with the command that uses it"
