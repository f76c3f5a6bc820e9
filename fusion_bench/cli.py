"""The ``fusion_bench`` command.

    fusion_bench method=ties_merging modelpool=<pool> taskpool=<pool> method.scaling_factor=0.3
    fusion_bench -m method.scaling_factor=0.1,0.3,0.5        # a sweep (Hydra multirun)
    fusion_bench --cfg job                                     # print the composed config
    fusion_bench --config-dir ./my_configs modelpool=mine      # add a config folder
    fusion_bench methods                                       # list registered methods
    fusion_bench leaderboard                                   # every method on the offline zoo

Configs are Hydra groups shipped inside the package (``fusion_bench/config``); method groups are
generated from the method registry, so every registered method is selectable as ``method=<name>``
with its documented defaults. The current directory is never searched for configs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from fusion_bench.errors import ConfigError, FusionBenchError, did_you_mean

CONFIG_DIR = Path(__file__).parent / "config"

SUBCOMMANDS = {
    "methods": "fusion_bench.cli_tools:list_methods_main",
    "leaderboard": "fusion_bench.benchmark.leaderboard:main",
    "zoo": "fusion_bench.benchmark.zoo:main",
    "mergekit": "fusion_bench.compat.mergekit:main",
}


def register_method_configs() -> None:
    """Put one config node per registered method into Hydra's ConfigStore (group ``method``)."""
    from hydra.core.config_store import ConfigStore

    from fusion_bench.config_schema import to_plain
    from fusion_bench.methods import get_method_class, list_methods

    cs = ConfigStore.instance()
    for name in list_methods():
        cls = get_method_class(name)
        node = {"name": name, **to_plain(cls.config_class())}
        cs.store(group="method", name=name, node=node, provider="fusion_bench")


def _split_args(argv: list[str]) -> tuple[list[str], str | None]:
    """Return (overrides, config_dir) from a Hydra command line (flags skipped)."""
    overrides, config_dir = [], None
    i = 0
    flags_with_value = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                        "--config-dir", "-cd", "--info", "-i"}
    while i < len(argv):
        a = argv[i]
        if a in ("--config-dir", "-cd") and i + 1 < len(argv):
            config_dir = argv[i + 1]
        if a.startswith("--config-dir="):
            config_dir = a.split("=", 1)[1]
        if a in flags_with_value:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        overrides.append(a)
        i += 1
    return overrides, config_dir


def _flags_first(argv: list[str]) -> list[str]:
    """Hydra's parser wants flags before overrides; accept them anywhere."""
    with_value = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                  "--config-dir", "-cd", "--experimental-rerun"}
    flags, rest = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in with_value and i + 1 < len(argv):
            flags += [a, argv[i + 1]]
            i += 2
            continue
        (flags if a.startswith("-") else rest).append(a)
        i += 1
    return flags + rest


def preflight(argv: list[str]) -> Any:
    """Compose the config once (first value of every sweep) and validate it before Hydra runs.

    Turns Hydra's composition errors into one clear line naming the key and the closest valid key,
    and checks method/modelpool/taskpool keys and types against their schemas.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    overrides, config_dir = _split_args(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise ConfigError(f"Cannot parse the command line: {str(e).splitlines()[0]}") from e
    single = []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            single.append(f"{o.get_key_element()}={first}")
        else:
            single.append(o.input_line)
    if config_dir:
        single.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            try:
                cfg = compose(config_name="fusion_bench", overrides=single)
            except (ConfigCompositionException, MissingConfigException) as e:
                raise _explain(e, single, compose) from None
    finally:
        GlobalHydra.instance().clear()
    validate_composed(cfg)
    return cfg


def _explain(e: Exception, overrides: list[str], compose) -> ConfigError:
    msg = str(e) + ("\n" + str(e.__cause__) if e.__cause__ is not None else "")
    m = re.search(r"Key '([^']+)' is not in struct\s+full_key: (\S+)", msg)
    if m:
        full = m.group(2)
        parent = full.rsplit(".", 1)[0] if "." in full else ""
        groups = [o for o in overrides if ("." not in o.split("=", 1)[0] or o.startswith("hydra."))
                  and not o.startswith(("+", "~"))]
        try:
            base = compose(config_name="fusion_bench", overrides=groups)
            node = base
            for part in parent.split(".") if parent else []:
                node = node[part]
            hint = did_you_mean(m.group(1), list(node.keys()))
        except Exception:
            hint = ""
        return ConfigError(f"Unknown config key '{full}'.{hint}")
    m = re.search(r"Could not find '([^/']+)/([^']+)'", msg) or re.search(r"In '[^']*': Could not find '([^/']+)/([^']+)'", msg)
    if m:
        group, name = m.group(1), m.group(2)
        avail = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)*)", msg)
        options = [ln.strip() for ln in avail.group(1).splitlines() if ln.strip()] if avail else []
        return ConfigError(f"Unknown {group} '{name}'.{did_you_mean(name, options)} Add your own with --config-dir DIR "
                           f"holding {group}/{name}.yaml.")
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return ConfigError(f"Invalid configuration: {first}")


def validate_composed(cfg: Any) -> None:
    """Check every group against its schema (unknown keys, types) without building anything heavy."""
    from fusion_bench.config_schema import build_config, to_plain
    from fusion_bench.methods import get_method_class
    from fusion_bench.modelpool.base import ModelPoolConfig
    from fusion_bench.modelpool.registry import get_modelpool_class
    from fusion_bench.programs.fusion import ProgramConfig
    from fusion_bench.taskpool.base import TASKPOOLS

    plain = to_plain({k: v for k, v in cfg.items() if k != "hydra"}) if "hydra" in cfg else None
    if plain is None:
        from omegaconf import OmegaConf

        plain = OmegaConf.to_container(cfg, resolve=False)
        plain.pop("hydra", None)
        plain["output_dir"] = None
    build_config(ProgramConfig, plain)
    method = dict(plain.get("method") or {})
    if "name" not in method:
        raise ConfigError("The config has no method.name; choose a method with method=<name> (see `fusion_bench methods`).")
    get_method_class(method["name"]).config_class and build_config(
        get_method_class(method["name"]).config_class, method, prefix="method", ignore=("name",))
    mp = dict(plain.get("modelpool") or {})
    mp_type = mp.get("type", "default")
    mp_cls = ModelPoolConfig if mp_type == "default" else getattr(get_modelpool_class(mp_type), "config_class", None)
    if mp_cls is not None:
        build_config(mp_cls, mp, prefix="modelpool", ignore=("type",))
    tp = dict(plain.get("taskpool") or {})
    tp_cls = TASKPOOLS.get(tp.get("type", "parameter_count")).config_class
    build_config(tp_cls, tp, prefix="taskpool", ignore=("type",))


def _remove_empty_run_dir(path: str | None) -> None:
    """A failed run leaves nothing behind: drop Hydra's run folder if it holds only Hydra's own files."""
    import shutil

    if not path:
        return
    d = Path(path)
    if d.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in d.iterdir()):
        import logging

        logging.shutdown()
        shutil.rmtree(d, ignore_errors=True)
        parent = d.parent
        while parent.name and parent.is_dir() and not any(parent.iterdir()) and parent.name not in (".", "/"):
            parent.rmdir()
            if parent.name in ("outputs", "multirun"):
                break
            parent = parent.parent


def _hydra_main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path=str(CONFIG_DIR), config_name="fusion_bench", version_base=None)
    def task(cfg: DictConfig) -> None:
        from fusion_bench.programs.fusion import run_program

        plain = OmegaConf.to_container(cfg, resolve=True)
        try:
            run_program(plain)
        except FusionBenchError as e:
            _remove_empty_run_dir(plain.get("output_dir"))
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    task()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        mod, fn = SUBCOMMANDS[argv[0]].split(":")
        try:
            sys.exit(getattr(importlib.import_module(mod), fn)(argv[1:]) or 0)
        except FusionBenchError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    register_method_configs()
    wants_help = any(a in ("--help", "-h", "--hydra-help", "--info", "-i") for a in argv)
    if not wants_help:
        try:
            preflight(argv)
        except FusionBenchError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    sys.argv = [sys.argv[0], *_flags_first(argv)]
    _hydra_main()


if __name__ == "__main__":  # pragma: no cover
    main()
