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

from fusion_bench.compat.fusionbench import translate_command_line as fusionbench_command_line
from fusion_bench.errors import ConfigError, FusionBenchError, did_you_mean

CONFIG_DIR = Path(__file__).parent / "config"

SUBCOMMANDS = {
    "methods": "fusion_bench.cli_tools:list_methods_main",
    "leaderboard": "fusion_bench.benchmark.leaderboard:main",
    "zoo": "fusion_bench.benchmark.zoo:main",
    "mergekit": "fusion_bench.compat.mergekit:main",
    "extract-lora": "fusion_bench.compat.lora_extract:main",
}


def register_method_configs() -> None:
    """Put one config node per registered method into Hydra's ConfigStore (group ``method``)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from fusion_bench.config_schema import to_plain
    from fusion_bench.methods import get_method_class, list_methods

    cs = ConfigStore.instance()
    for name in list_methods():
        cls = get_method_class(name)
        node = OmegaConf.create({"name": name, **to_plain(cls.config_class())})
        for value in node.values():
            if OmegaConf.is_dict(value):  # free-form mapping options (e.g. base_options) take new keys
                OmegaConf.set_struct(value, False)
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
    if config_dir is not None and not Path(config_dir).is_dir():
        raise ConfigError(f"--config-dir {config_dir}: no such folder. Give a folder holding modelpool/, taskpool/ "
                          "or method/ YAML files.")
    single, sweeps = [], []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            for v in values:
                _check_group_value(o.get_key_element(), v)
            single.append(f"{o.get_key_element()}={values[0]}")
            sweeps.append((len(single) - 1, o.get_key_element(), values[1:]))
        else:
            if o.value_type is not None and isinstance(o.value(), str):
                _check_group_value(o.get_key_element(), o.value())
            single.append(o.input_line)
    if config_dir:
        single.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    # the first value of every sweep together, then each further sweep value on its own (a sweep whose
    # second value is invalid fails here, before any run starts)
    variants = [single]
    for i, key, rest in sweeps:
        for v in rest:
            variants.append([*single[:i], f"{key}={v}", *single[i + 1:]])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            first = None
            for ov in variants:
                try:
                    cfg = compose(config_name="fusion_bench", overrides=ov)
                except (ConfigCompositionException, MissingConfigException) as e:
                    raise _explain(e, ov, compose) from None
                except Exception as e:  # YAML syntax errors and other parse failures of a config file
                    raise ConfigError(_one_line(f"Cannot read the configuration: {e}")) from e
                try:
                    validate_composed(cfg)
                except FusionBenchError as e:
                    if len(variants) > 1 and ov is not single:
                        swept = ov[[j for j, a in enumerate(ov) if a != single[j]][0]]
                        raise type(e)(f"{e} (sweep value {swept})") from None
                    raise
                first = first if first is not None else cfg
    finally:
        GlobalHydra.instance().clear()
    return first


_GROUPS = ("method", "modelpool", "taskpool", "program")


def _check_group_value(key: str, value: str) -> None:
    """A config group's option names a YAML inside the config folders; it may not leave them."""
    group = key.lstrip("+~")
    if group.split("@")[0] not in _GROUPS:
        return
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "~")) or ".." in parts or ":" in value:
        raise ConfigError(f"{group}={value}: a config name cannot leave the config folders (no '..', absolute paths "
                          f"or drive letters). Put your YAML in a folder DIR as DIR/{group}/NAME.yaml and run "
                          f"`fusion_bench --config-dir DIR {group}=NAME`.")


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
    program = plain.pop("program", None)
    validate_program(program)
    build_config(ProgramConfig, plain)
    method = dict(plain.get("method") or {})
    if "name" not in method:
        raise ConfigError("The config has no method.name; choose a method with method=<name> (see `fusion_bench methods`).")
    if (program or {}).get("name") == "continual" and get_method_class(method["name"]).family != "continual":
        from fusion_bench.methods import list_methods

        raise ConfigError(f"program=continual needs a continual method, not method={method['name']}; choose one of: "
                          f"{', '.join(list_methods('continual'))}.")
    get_method_class(method["name"]).config_class and build_config(
        get_method_class(method["name"]).config_class, method, prefix="method", ignore=("name",))
    mp = dict(plain.get("modelpool") or {})
    mp_type = mp.get("type", "default")
    mp_cls = ModelPoolConfig if mp_type == "default" else getattr(get_modelpool_class(mp_type), "config_class", None)
    if mp_cls is not None:
        build_config(mp_cls, mp, prefix="modelpool", ignore=("type",))
    # configs are data: class names go through the allow-list before any pool is built
    from fusion_bench.modelpool.base import MODEL_CLASSES, check_architecture
    from fusion_bench.models.registry import is_allowed_ref

    check_architecture(mp.get("architecture"))
    if mp.get("model_class") is not None:
        is_allowed_ref(mp["model_class"], "modelpool.model_class", MODEL_CLASSES)
    tp = dict(plain.get("taskpool") or {})
    tp_cls = TASKPOOLS.get(tp.get("type", "parameter_count")).config_class
    build_config(tp_cls, tp, prefix="taskpool", ignore=("type",))


def validate_program(program: Any) -> None:
    """The ``program`` group: ``fusion`` (the default: fuse once, evaluate) or ``continual`` (docs/continual.md)."""
    from fusion_bench.config_schema import build_config

    program = dict(program or {"name": "fusion"})
    name = program.get("name", "fusion")
    if name == "fusion":
        if set(program) - {"name"}:
            raise ConfigError(f"program=fusion has no option '{sorted(set(program) - {'name'})[0]}' (program options "
                              "belong to program=continual).")
    elif name == "continual":
        from fusion_bench.programs.continual import ContinualProgramConfig

        build_config(ContinualProgramConfig, program, prefix="program")
    else:
        raise ConfigError(f"Unknown program '{name}'.{did_you_mean(str(name), ['fusion', 'continual'])}")


def _remove_empty_run_dir(path: str | None) -> None:
    """A failed run leaves nothing behind: drop Hydra's run folder if it holds only Hydra's own files."""
    import shutil

    if not path:
        return
    d = Path(path)
    if d.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in d.iterdir()):
        import logging

        # detach Hydra's file handlers that write into the folder: a closed FileHandler reopens its file on the
        # next record (from any library in this process) and would fail once the folder is gone
        root = d.resolve()
        loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]
        for lg in loggers:
            for h in list(lg.handlers):
                if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().is_relative_to(root):
                    lg.removeHandler(h)
                    h.close()
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

        plain: dict = {}
        _terminate_as_exception()
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)
            program = plain.pop("program", None) or {"name": "fusion"}
            if program.get("name") == "continual":
                from fusion_bench.programs.continual import run_continual

                run_continual(plain, program)
            else:
                run_program(plain)
            if plain.get("dry_run"):  # a dry run writes nothing, not even Hydra's run folder
                _remove_empty_run_dir(plain.get("output_dir"))
        except BaseException as e:
            if isinstance(e, SystemExit) and e.code in (0, None):
                raise
            _remove_empty_run_dir(plain.get("output_dir") if isinstance(plain, dict) else None)
            fail(e)

    task()


class Terminated(BaseException):
    """SIGTERM (timeout, SLURM, Docker) raised as an exception in the main thread, so that every writer's
    cleanup runs as it unwinds and the run folder is removed like after any other failure."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate_as_exception() -> None:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def on_term(signum, frame):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
            raise Terminated(signum)

        signal.signal(signal.SIGTERM, on_term)


def debug_enabled() -> bool:
    """Tracebacks instead of one-line errors: ``--debug``, ``FUSION_BENCH_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``."""
    import os

    return any(os.environ.get(v, "") not in ("", "0") for v in ("FUSION_BENCH_DEBUG", "HYDRA_FULL_ERROR"))


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


_OS_FIXES = {
    "ENOSPC": "free disk space or write somewhere else",
    "EDQUOT": "free disk space (quota) or write somewhere else",
    "EROFS": "the file system is read-only: write somewhere else",
    "EACCES": "check the permissions or write somewhere else",
    "EPERM": "check the permissions or write somewhere else",
    "ENOTDIR": "a part of the path is a file, not a folder: choose another path",
    "EISDIR": "the path is a folder where a file was expected: choose another path",
    "ENOENT": "check the path",
    "EEXIST": "the path exists already: choose another path",
    "ENAMETOOLONG": "use a shorter path",
    "EMFILE": "too many open files: raise the limit (ulimit -n)",
}


def error_line(e: BaseException) -> tuple[str, int]:
    """The one ``error:`` line for an exception and the exit code (2: the user's input or environment,
    1: a bug of fusion_bench, 130: interrupted)."""
    import errno

    if isinstance(e, KeyboardInterrupt):
        return "error: interrupted; nothing was written under the final output names.", 130
    if isinstance(e, Terminated):
        return "error: terminated (SIGTERM); nothing was written under the final output names.", 128 + e.signum
    if isinstance(e, SystemExit):
        return f"error: stopped (exit code {e.code}).", e.code if isinstance(e.code, int) else 2
    if isinstance(e, FusionBenchError):
        return f"error: {_one_line(e)}", 2
    if isinstance(e, OSError):
        code = errno.errorcode.get(e.errno or 0, "")
        where = " ".join(str(f) for f in (e.filename, e.filename2) if f)
        fix = _OS_FIXES.get(code, "check the path and the disk")
        what = e.strerror or _one_line(e) or type(e).__name__
        return f"error: {what}{': ' + where if where else ''} ({code or type(e).__name__}); {fix}.", 2
    if isinstance(e, MemoryError):
        return ("error: out of memory. Use engine=streaming with merged_model_path=..., a smaller dtype "
                "(modelpool.dtype=bfloat16) or fewer models."), 2
    if type(e).__module__.split(".")[0] in ("yaml", "omegaconf", "hydra"):
        return f"error: invalid configuration: {_one_line(e)}", 2
    return (f"error: internal error ({type(e).__name__}: {_one_line(e)[:300]}). This is a bug in fusion_bench: "
            "rerun with --debug for the traceback and report it."), 1


def fail(e: BaseException) -> None:
    """Print the one-line error for ``e`` and exit; re-raise (full traceback) in debug mode."""
    if debug_enabled():
        raise e
    line, code = error_line(e)
    try:
        sys.stdout.flush()
    except Exception:  # pragma: no cover - a closed stdout
        pass
    print(line, file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ["FUSION_BENCH_DEBUG"] = "1"
        os.environ["HYDRA_FULL_ERROR"] = "1"
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        mod, fn = SUBCOMMANDS[argv[0]].split(":")
        try:
            code = getattr(importlib.import_module(mod), fn)(argv[1:]) or 0
        except SystemExit:
            raise
        except BaseException as e:
            fail(e)
        sys.exit(code)
    try:
        register_method_configs()
        for a in _split_args(argv)[0]:  # config names stay inside the config folders, whoever's names they are
            key, _, value = a.partition("=")
            for v in value.split(","):
                _check_group_value(key, v)
        argv = fusionbench_command_line(argv)  # FusionBench's names and defaults -> ours (docs/fusionbench.md)
        wants_help = any(a in ("--help", "-h", "--hydra-help", "--info", "-i") for a in argv)
        if not wants_help:
            preflight(argv)
    except SystemExit:
        raise
    except BaseException as e:
        fail(e)
    sys.argv = [sys.argv[0], *_flags_first(argv)]
    _hydra_main()


if __name__ == "__main__":  # pragma: no cover
    main()
