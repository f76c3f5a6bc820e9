"""The web leaderboard: one self-contained HTML page generated from a leaderboard JSON.

    python -m fusion_bench.benchmark.web LEADERBOARD.json [OUT.html]    # any leaderboard JSON (also --combine's)
    fusion_bench leaderboard ... --web                                    # leaderboard.html beside the other outputs

The page works offline (inline CSS, JavaScript and SVG; nothing is fetched): a sortable table of the rows (click a
column header), an accuracy-against-cost scatter (merge time, peak memory, parameters; log axes where the values
span decades), per-task accuracy bars of the selected rows, filters by family (``kind``: reference, merging,
ensemble, mixing, ...) and by data tier (:func:`data_tier`), and a command builder: a method, a model pool and a
task pool with their options from the registry (help, type, default, choices and range from the typed config
dataclasses, :func:`option_schema`), producing the ``fusion_bench method=X modelpool=Y taskpool=Z key=value``
command to copy. The registry is embedded when the page is generated (:func:`registry_data`), so the page
describes the fusion_bench that wrote it.

Everything the page shows comes from :func:`page_data`; the script renders data as text (never as HTML), and the
embedded JSON is escaped so that no value can close the script element.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from fusion_bench.config_schema import range_text, to_plain
from fusion_bench.errors import ConfigError

#: data tiers, from the least to the most demanding: no data; unlabeled inputs (test-time adaptation, or the
#: train split's inputs without labels); the labelled validation split (hyperparameter selection); labelled
#: training data (fine-tuning, Fisher, ...). ``other``: a ``data`` text this module does not recognise.
TIERS: tuple[str, ...] = ("none", "unlabeled", "validation", "train", "other")
#: program (top-level) options that the builder does not offer: the groups themselves and what the CLI sets
_PROGRAM_SKIP = ("method", "modelpool", "taskpool", "output_dir", "fusionbench")


def _part_tier(part: str) -> str:
    p = part.strip().lower()
    if p in ("", "none"):
        return "none"
    if "unlabeled" in p or "unlabelled" in p:
        return "unlabeled"
    if "train" in p:
        return "train"
    if "validation" in p:
        return "validation"
    return "other"


def data_tier(data: str | None) -> str:
    """The tier of a leaderboard row's ``data`` text: the most demanding of its ``;``-separated parts.

    ``none`` -> none; ``test split (N unlabeled inputs)`` and ``train split (N unlabeled inputs)`` -> unlabeled;
    ``validation split (labelled, selects scaling_factor)`` -> validation; ``train split (...)`` with labels (or
    without a count: a method that uses the training data) -> train. So a tuned Fisher merge
    (``train split (1024 labelled inputs); validation split (...)``) is ``train``.
    """
    if data is None:
        return "none"
    parts = [_part_tier(p) for p in str(data).split(";")]
    known = [p for p in parts if p != "other"]
    if not known:
        return "other"
    return max(known, key=TIERS.index)


# ------------------------------------------------------------------------------------------------------------
# options of the typed config dataclasses
# ------------------------------------------------------------------------------------------------------------
def _json_safe(v: Any) -> Any:
    """Plain JSON data: non-finite floats -> None, tuples -> lists, unknown objects -> str."""
    v = to_plain(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_json_safe(x) for x in v]
    return str(v)


def _type_text(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def _kind(tp: Any) -> tuple[str, bool, list | None]:
    """(widget kind, nullable, literal choices) of a field annotation. Kinds: bool, int, float, str, choice,
    list, dict, any (free text in Hydra syntax)."""
    nullable = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        nullable = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return "any", nullable, None
        tp = rest[0]
        origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "choice", nullable, list(typing.get_args(tp))
    if tp is bool:
        return "bool", nullable, None
    if tp is int:
        return "int", nullable, None
    if tp is float:
        return "float", nullable, None
    if tp is str:
        return "str", nullable, None
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):  # noqa: UP006
        return "list", nullable, None
    if origin in (dict, typing.Mapping) or tp is dict:
        return "dict", nullable, None
    return "any", nullable, None


def option_schema(cls: type, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every init field of config dataclass ``cls`` as plain data for the command builder.

    Each entry: ``name``, ``type`` (the annotation as text), ``kind`` (the widget: bool, int, float, str, choice,
    list, dict, any), ``nullable``, ``default`` (``values[name]`` when given, e.g. a shipped pool YAML's value,
    else the dataclass default), ``required`` (no default), ``help`` (the field's help string), ``choices``
    (the declared ``choices`` or the ``Literal`` values, else None), ``range`` ({ge, gt, le, lt} or None) and
    ``range_text`` (``[0, 1]``, ``>= 1``...; from :func:`fusion_bench.config_schema.range_text`).
    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        required = False
        if values is not None and f.name in values:
            default = values[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default, required = None, True
        tp = hints.get(f.name, Any)
        kind, nullable, literal = _kind(tp)
        choices = f.metadata.get("choices")
        choices = list(choices) if choices is not None else literal
        if choices is not None and kind not in ("list", "dict"):
            kind = "choice"
        rng = f.metadata.get("range")
        out.append({"name": f.name, "type": _type_text(tp), "kind": kind, "nullable": nullable,
                    "default": _json_safe(default), "required": required, "help": f.metadata.get("help", ""),
                    "choices": _json_safe(choices), "range": _json_safe(dict(rng)) if rng else None,
                    "range_text": range_text(rng)})
    return out


def _yaml_header(path: Path) -> tuple[str, str]:
    """(command, description) from a shipped YAML's leading comment lines: the first names the command that
    uses it (tests/test_shipped_configs.py), the others describe it."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    command = lines[0] if lines else ""
    return command, " ".join(x for x in lines[1:] if x)


def _pools(group: str) -> list[dict[str, Any]]:
    """The shipped YAMLs of ``modelpool`` or ``taskpool`` with their class's options (defaults: the YAML's)."""
    import yaml

    from fusion_bench.cli import CONFIG_DIR

    if group == "modelpool":
        from fusion_bench.modelpool.base import ModelPool
        from fusion_bench.modelpool.registry import get_modelpool_class

        def cls_of(kind: str | None) -> type:
            return ModelPool if kind in (None, "default") else get_modelpool_class(kind)
    else:
        from fusion_bench.taskpool.base import TASKPOOLS

        def cls_of(kind: str | None) -> type:
            return TASKPOOLS.get(kind or "parameter_count")
    out = []
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            continue
        kind = values.get("type")
        pool_cls = cls_of(kind)
        config_cls = pool_cls.config_class
        command, description = _yaml_header(path)
        options = [o for o in option_schema(config_cls, values) if o["name"] not in ("name", "type")]
        for o in options:
            o["in_yaml"] = o["name"] in values  # else the override needs Hydra's '+' (the group node is struct)
        out.append({"name": path.stem, "type": kind or ("default" if group == "modelpool" else "parameter_count"),
                    "command": command, "description": description, "options": options})
    return out


def _program_options() -> list[dict[str, Any]]:
    """Top-level options of a run (seed, device, report_path, ...), from the program's config dataclass."""
    import yaml

    from fusion_bench.cli import CONFIG_DIR

    try:
        from fusion_bench.programs.fusion import ProgramConfig
    except ImportError:  # pragma: no cover - the program moved
        return []
    top = yaml.safe_load((CONFIG_DIR / "fusion_bench.yaml").read_text()) or {}
    groups = set()
    for d in top.get("defaults", []) or []:
        if isinstance(d, dict):
            groups.update(d)
    out = []
    for o in option_schema(ProgramConfig):
        if o["name"] in _PROGRAM_SKIP or o["name"] in groups or o["kind"] == "dict":
            continue
        o["in_yaml"] = o["name"] in top
        if o["in_yaml"]:
            o["default"] = _json_safe(top[o["name"]])
        out.append(o)
    return out


def registry_data() -> dict[str, Any]:
    """The registry as plain data for the page: ``methods`` (name, family, summary, variant, requires_pretrained,
    uses_data, options), ``modelpools`` and ``taskpools`` (every shipped YAML: name, type, command, description,
    options with the YAML's values as defaults) and ``program`` (the top-level options)."""
    from fusion_bench.methods import get_method_class, list_methods

    methods = []
    for name in list_methods():
        cls = get_method_class(name)
        methods.append({"name": name, "family": cls.family, "summary": " ".join(cls.summary.split()),
                        "variant": " ".join(cls.variant.split()), "requires_pretrained": bool(cls.requires_pretrained),
                        "uses_data": bool(cls.uses_data), "options": option_schema(cls.config_class)})
    try:
        from importlib.metadata import version

        fb_version = version("fusion_bench")
    except Exception:  # pragma: no cover - run from a source tree without metadata
        fb_version = "unknown"
    return {"version": fb_version, "methods": methods, "modelpools": _pools("modelpool"),
            "taskpools": _pools("taskpool"), "program": _program_options()}


# ------------------------------------------------------------------------------------------------------------
# the leaderboard document
# ------------------------------------------------------------------------------------------------------------
def _label(row: dict[str, Any]) -> str:
    t = row.get("tuned")
    if isinstance(t, dict) and t.get("scaling_factor") is not None:
        return f"{row['method']} (λ={t['scaling_factor']:g})"
    return str(row["method"])


def suggested_pools(doc: dict[str, Any], registry: dict[str, Any]) -> dict[str, Any]:
    """The shipped model and task pool YAMLs of the leaderboard's zoo (``clip_zoo_tiny`` for the tiny CLIP zoo,
    ``text_zoo_lora`` for the text zoo's LoRA variant, ...), with the task pool overrides that reproduce the
    leaderboard's test set (``max_samples``, ``corruption``); None where no shipped YAML matches."""
    z = doc.get("zoo") or {}
    if z.get("track", "clip") not in ("clip", "text") or z.get("scale") not in ("full", "tiny"):
        return {"modelpool": None, "taskpool": None, "taskpool_options": {}}
    base = "text_zoo" if z.get("track") == "text" else "clip_zoo"
    if z.get("track") == "text" and z.get("variant") == "lora":
        base += "_lora"
    name = base + ("_tiny" if z.get("scale") == "tiny" else "")
    mps = {p["name"] for p in registry.get("modelpools", [])}
    tps = {p["name"]: p for p in registry.get("taskpools", [])}
    overrides = {}
    if name in tps:
        fields = {o["name"] for o in tps[name]["options"]}
        for key in ("max_samples", "corruption"):
            if z.get(key) is not None and key in fields:
                overrides[key] = z[key]
    return {"modelpool": name if name in mps else None, "taskpool": name if name in tps else None,
            "taskpool_options": overrides}


def page_data(doc: dict[str, Any], registry: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the page embeds: ``leaderboard`` (a copy of ``doc``, non-finite numbers as null, each row with
    ``label`` (name and tuned λ), ``tier`` (:func:`data_tier` of its ``data``) and ``index`` (its position in
    ``doc['rows']``)), ``registry`` (:func:`registry_data`), ``suggested`` (:func:`suggested_pools`), ``tiers``
    (the tier order) and the row ``families`` present."""
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or not isinstance(doc.get("tasks"), list):
        raise ConfigError("the leaderboard document needs 'tasks' and 'rows' lists: give a leaderboard.json written "
                          "by `fusion_bench leaderboard`.")
    lb = _json_safe(copy.deepcopy(doc))
    for i, r in enumerate(lb["rows"]):
        if not isinstance(r, dict) or "method" not in r:
            raise ConfigError(f"leaderboard row {i} has no 'method'; give a leaderboard.json written by "
                              "`fusion_bench leaderboard`.")
        r.setdefault("kind", "other")
        r.setdefault("accuracy", {})
        r["label"] = _label(r)
        r["tier"] = data_tier(r.get("data"))
        r["index"] = i
    registry = registry_data() if registry is None else registry
    families = []
    for r in lb["rows"]:
        if r["kind"] not in families:
            families.append(r["kind"])
    return {"leaderboard": lb, "registry": registry, "suggested": suggested_pools(lb, registry),
            "tiers": list(TIERS), "families": families}


def _script_json(data: Any) -> str:
    """JSON that is safe inside <script>: no '<', '>', '&' or line separators appear literally."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _escape_html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def page_title(doc: dict[str, Any]) -> str:
    z = doc.get("zoo") or {}
    zoo = f"text zoo ({z.get('variant', 'full')})" if z.get("track") == "text" else "CLIP zoo"
    return f"fusion_bench leaderboard: {zoo}, scale {z.get('scale', '?')}"


def render_html(doc: dict[str, Any], registry: dict[str, Any] | None = None) -> str:
    """The self-contained page for leaderboard document ``doc`` (see the module docstring)."""
    data = page_data(doc, registry)
    title = _escape_html(page_title(doc))
    return (_TEMPLATE.replace("__TITLE__", title).replace("__CSS__", _CSS).replace("__JS__", _JS)
            .replace("__DATA__", _script_json(data)))


def write_html(doc: dict[str, Any], path: str | Path, registry: dict[str, Any] | None = None) -> Path:
    """Write the page for ``doc`` to ``path`` atomically; returns the path."""
    from fusion_bench.io.atomic import atomic_file

    path = Path(path)
    html = render_html(doc, registry)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        f.write(html)
    return path


def read_leaderboard(path: str | Path) -> dict[str, Any]:
    """A leaderboard JSON (a file, or a folder holding ``leaderboard.json``); ConfigError naming it otherwise."""
    p = Path(path)
    if p.is_dir():
        p = p / "leaderboard.json"
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the leaderboard JSON {p} ({e.strerror or e}); give the leaderboard.json "
                          "(or its folder) written by `fusion_bench leaderboard --out`.") from None
    except ValueError as e:
        raise ConfigError(f"{p} is not JSON ({e}); give the leaderboard.json written by "
                          "`fusion_bench leaderboard --out`.") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or not isinstance(doc.get("tasks"), list):
        raise ConfigError(f"{p} is not a leaderboard document (no 'tasks' and 'rows'); give the leaderboard.json "
                          "written by `fusion_bench leaderboard --out`.")
    return doc


def main(argv: list[str] | None = None) -> int:
    """``python -m fusion_bench.benchmark.web LEADERBOARD.json [OUT.html]``; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m fusion_bench.benchmark.web",
                                 description="Write the self-contained web leaderboard (leaderboard.html) of a "
                                 "leaderboard JSON.")
    ap.add_argument("leaderboard", help="leaderboard.json (or the folder holding it), e.g. from --combine")
    ap.add_argument("out", nargs="?", default=None, help="the HTML file (default: leaderboard.html beside the JSON)")
    args = ap.parse_args(argv)
    src = Path(args.leaderboard)
    doc = read_leaderboard(src)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "leaderboard.html"
    write_html(doc, out)
    print(f"written {out} ({len(doc['rows'])} rows, {len(doc['tasks'])} tasks)")
    return 0


# ------------------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------------------
_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<header>
  <h1 id="title">__TITLE__</h1>
  <p id="zoo-info" class="muted"></p>
</header>
<main>
<section id="filters" aria-label="filters">
  <fieldset><legend>family</legend><div id="filter-family"></div></fieldset>
  <fieldset><legend>data tier</legend><div id="filter-tier"></div></fieldset>
  <fieldset><legend>method</legend><input id="filter-text" type="search" placeholder="name contains..."></fieldset>
  <p id="row-count" class="muted"></p>
</section>
<section id="table-section">
  <h2>Results</h2>
  <p class="muted">Click a column header to sort (again to reverse; missing values last). Click a row to show it in
  the per-task bars; <b>cmd</b> fills the command builder with that row's method and options.</p>
  <div class="scroll"><table id="lb-table"><thead></thead><tbody></tbody></table></div>
</section>
<section id="charts">
  <div class="chart-box">
    <h2>Accuracy against cost</h2>
    <div class="controls">
      <label>x <select id="scatter-x"></select></label>
      <label>y <select id="scatter-y"></select></label>
      <label><input id="scatter-logx" type="checkbox"> log x</label>
      <label><input id="scatter-labels" type="checkbox" checked> labels</label>
    </div>
    <div id="scatter"></div>
    <p id="scatter-note" class="muted"></p>
  </div>
  <div class="chart-box">
    <h2>Per-task accuracy</h2>
    <p class="muted">Selected rows (click rows of the table or points of the scatter).</p>
    <div id="bars"></div>
  </div>
</section>
<section id="builder">
  <h2>Command builder</h2>
  <p class="muted">Choose a method, a model pool and a task pool; options left at their default are not written.
  Options and their help come from the registry of fusion_bench <span id="fb-version"></span>.</p>
  <div class="builder-grid">
    <label>family <select id="b-family"></select></label>
    <label>method <select id="b-method"></select></label>
    <label>model pool <select id="b-modelpool"></select></label>
    <label>task pool <select id="b-taskpool"></select></label>
  </div>
  <div id="b-method-info" class="info"></div>
  <div id="b-pool-info" class="info"></div>
  <details open id="b-method-details"><summary>method options</summary><div id="b-method-opts"></div></details>
  <details id="b-modelpool-details"><summary>model pool options</summary><div id="b-modelpool-opts"></div></details>
  <details id="b-taskpool-details"><summary>task pool options</summary><div id="b-taskpool-opts"></div></details>
  <details id="b-program-details"><summary>run options (seed, device, report_path, ...)</summary>
    <div id="b-program-opts"></div></details>
  <div id="b-errors" role="alert"></div>
  <div class="cmd-box"><pre id="cmd"></pre>
    <div><button id="copy-cmd" type="button">Copy</button> <button id="reset-cmd" type="button">Reset options</button>
    <span id="copy-status" class="muted"></span></div></div>
</section>
<section id="notes"></section>
</main>
<footer class="muted" id="footer"></footer>
<script id="fb-data" type="application/json">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

_CSS = r"""
:root { --fg:#1d232b; --muted:#5d6875; --bg:#fff; --line:#d9dee4; --head:#f3f5f8; --sel:#fff4c2; --err:#b3261e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg);
       margin: 0 auto; max-width: 1500px; padding: 0 18px 40px; }
h1 { font-size: 22px; margin: 18px 0 2px; } h2 { font-size: 17px; margin: 18px 0 6px; }
.muted { color: var(--muted); }
#filters { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
fieldset { border: 1px solid var(--line); border-radius: 6px; padding: 4px 10px 6px; margin: 0; }
fieldset label { margin-right: 10px; white-space: nowrap; }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 7px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: var(--head); position: sticky; top: 0; cursor: pointer; user-select: none; font-weight: 600; }
th[aria-sort="ascending"]::after { content: " \25B2"; font-size: 10px; }
th[aria-sort="descending"]::after { content: " \25BC"; font-size: 10px; }
td.str, th.str { text-align: left; }
td.data { max-width: 340px; overflow: hidden; text-overflow: ellipsis; }
tr.reference td { background: #f7f9fb; font-style: italic; }
tr.selected td { background: var(--sel); }
tbody tr:hover td { background: #eef4ff; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 5px; vertical-align: middle; }
#charts svg { max-width: 100%; height: auto; }
#charts { display: flex; flex-wrap: wrap; gap: 18px; }
.chart-box { flex: 1 1 600px; min-width: 0; }
.controls label { margin-right: 12px; }
svg text { font: 11px system-ui, sans-serif; fill: var(--fg); }
svg .axis line, svg .axis path { stroke: #888; }
svg .grid { stroke: #e6e9ed; }
svg .ref { stroke: #888; stroke-dasharray: 5 4; }
svg circle.pt { stroke: #222; stroke-width: .6; cursor: pointer; }
svg circle.pt.selected { stroke-width: 2.4; }
svg circle.pt.clamped { fill-opacity: .25; }
.builder-grid { display: flex; flex-wrap: wrap; gap: 14px; margin-bottom: 8px; }
.builder-grid select { max-width: 340px; }
.info { margin: 4px 0 8px; }
table.opts td, table.opts th { text-align: left; white-space: normal; vertical-align: top; cursor: default; position: static; }
table.opts td.help { color: var(--muted); max-width: 640px; }
table.opts input[type=text] { width: 220px; font-family: ui-monospace, monospace; }
table.opts tr.changed td:first-child { font-weight: 700; }
input.invalid, select.invalid { outline: 2px solid var(--err); }
#b-errors { color: var(--err); margin: 6px 0; }
.cmd-box { background: #0f1720; color: #e6edf3; border-radius: 6px; padding: 10px 12px; margin-top: 8px; }
.cmd-box pre { margin: 0 0 8px; white-space: pre-wrap; word-break: break-all; font: 13px/1.5 ui-monospace, monospace; }
.cmd-box .muted { color: #9fb0c2; }
code { font-family: ui-monospace, monospace; font-size: 12.5px; }
button { cursor: pointer; }
td button { font-size: 11px; padding: 0 5px; }
footer { margin-top: 26px; font-size: 12px; }
"""

_JS = r"""
(function () {
'use strict';
const DATA = JSON.parse(document.getElementById('fb-data').textContent);
const LB = DATA.leaderboard, REG = DATA.registry, TASKS = LB.tasks, ROWS = LB.rows;
const COLORS = {reference: '#7f7f7f', merging: '#1f77b4', ensemble: '#ff7f0e', mixing: '#2ca02c',
  compression: '#9467bd', continual: '#8c564b', training: '#e377c2'};
const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf'];
const SVGNS = 'http://www.w3.org/2000/svg';
const $ = (id) => document.getElementById(id);
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) { if (v !== undefined && v !== null) e.setAttribute(k, v); }
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function sv(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) { if (v !== undefined && v !== null) e.setAttribute(k, v); }
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
const famColor = (k) => COLORS[k] || '#d62728';

// ---------------------------------------------------------------- formatting
const isNum = (v) => typeof v === 'number' && isFinite(v);
const pct = (v) => isNum(v) ? (100 * v).toFixed(2) : '-';
const fix = (d) => (v) => isNum(v) ? v.toFixed(d) : '-';
const intf = (v) => isNum(v) ? Math.round(v).toLocaleString('en-US') : '-';
function bytes(v) {
  if (!isNum(v)) return '-';
  if (v === 0) return '0';
  for (const [u, s] of [['GB', 1e9], ['MB', 1e6], ['kB', 1e3]]) { if (v >= s) return (v / s).toFixed(1) + ' ' + u; }
  return Math.round(v) + ' B';
}
const yesno = (v) => v ? 'needed' : 'no';

// ---------------------------------------------------------------- table
const COLS = [
  {key: 'label', title: 'method', cls: 'str', get: (r) => r.label, fmt: (v) => v},
  {key: 'kind', title: 'family', cls: 'str', get: (r) => r.kind, fmt: (v) => v},
  {key: 'tier', title: 'data tier', cls: 'str', get: (r) => r.tier, fmt: (v) => v},
  ...TASKS.map((t) => ({key: 'acc:' + t, title: t, get: (r) => (r.accuracy || {})[t], fmt: pct, tip: 'accuracy (%) on ' + t})),
  {key: 'average', title: 'avg', fmt: pct, tip: 'average accuracy (%) over the tasks'},
  {key: 'normalized', title: 'norm', fmt: pct, tip: 'mean over tasks of accuracy / fine-tuned accuracy (%)'},
  {key: 'gain_kept', title: 'gain kept', fmt: pct, tip: '(avg - pretrained avg) / (fine-tuned avg - pretrained avg), %'},
  {key: 'merge_time_s', title: 'merge s', fmt: fix(2), tip: 'merge wall time (s)'},
  {key: 'peak_rss_mb', title: 'peak MB', fmt: fix(0), tip: 'peak resident memory of the run (MB)'},
  {key: 'extra_parameters', title: 'extra params', fmt: intf, tip: 'parameters beyond one model'},
  {key: 'extra_storage_bytes', title: 'extra storage', fmt: bytes, tip: 'bytes stored beyond one model'},
  {key: 'needs_task_id', title: 'task id', get: (r) => !!r.needs_task_id, fmt: yesno, tip: 'the deployed result must be told the task'},
  {key: 'total_parameters', title: 'total params', fmt: intf},
  {key: 'active_parameters', title: 'active params', fmt: intf, tip: 'parameters one input uses'},
  {key: 'inference_cost_ratio', title: 'inference ×', fmt: fix(2), tip: 'forward time relative to one model'},
  {key: 'data', title: 'data', cls: 'str data', get: (r) => r.data, fmt: (v) => v === null || v === undefined ? '-' : v},
];
COLS.forEach((c) => { if (!c.get) c.get = (r) => r[c.key]; });
const state = {sortKey: null, sortDir: 0, families: new Set(DATA.families), tiers: new Set(), text: '', selected: []};
ROWS.forEach((r) => state.tiers.add(r.tier));

function cmpValues(a, b) {
  const na = a === null || a === undefined, nb = b === null || b === undefined;
  if (na || nb) return 0;
  if (typeof a === 'boolean') a = a ? 1 : 0;
  if (typeof b === 'boolean') b = b ? 1 : 0;
  if (typeof a === 'number' && typeof b === 'number') return a - b;
  return String(a).localeCompare(String(b));
}
function visibleRows() {
  const t = state.text.trim().toLowerCase();
  return ROWS.filter((r) => state.families.has(r.kind) && state.tiers.has(r.tier)
    && (!t || r.label.toLowerCase().includes(t)));
}
function sortedRows(rows) {
  if (!state.sortKey) return rows.slice();
  const col = COLS.find((c) => c.key === state.sortKey);
  const isNull = (v) => v === null || v === undefined;
  return rows.slice().sort((x, y) => {
    const a = col.get(x), b = col.get(y);
    if (isNull(a) || isNull(b)) return (isNull(a) ? 1 : 0) - (isNull(b) ? 1 : 0);  // missing values last
    return state.sortDir * cmpValues(a, b);
  });
}
function buildHead() {
  const tr = el('tr');
  for (const c of COLS) {
    const th = el('th', {'data-key': c.key, class: c.cls || null, title: c.tip || null, scope: 'col'}, c.title);
    th.addEventListener('click', () => {
      if (state.sortKey === c.key) state.sortDir = -state.sortDir;
      else { state.sortKey = c.key; state.sortDir = c.cls && c.cls.startsWith('str') ? 1 : -1; }
      renderAll();
    });
    tr.appendChild(th);
  }
  tr.appendChild(el('th', {class: 'str'}, ''));
  $('lb-table').tHead.appendChild(tr);
}
function renderTable(rows) {
  for (const th of $('lb-table').tHead.querySelectorAll('th[data-key]')) {
    if (th.dataset.key === state.sortKey) th.setAttribute('aria-sort', state.sortDir > 0 ? 'ascending' : 'descending');
    else th.removeAttribute('aria-sort');
  }
  const body = $('lb-table').tBodies[0];
  body.textContent = '';
  const methods = new Set(REG.methods.map((m) => m.name));
  for (const r of rows) {
    const tr = el('tr', {'data-method': r.method, 'data-index': r.index,
      class: [r.kind, state.selected.includes(r.index) ? 'selected' : ''].join(' ').trim()});
    for (const c of COLS) {
      const v = c.get(r);
      const td = el('td', {'data-key': c.key, class: c.cls || null,
        'data-value': v === null || v === undefined ? '' : (typeof v === 'object' ? JSON.stringify(v) : String(v))}, c.fmt(v));
      if (c.key === 'label') td.prepend(el('span', {class: 'swatch', style: 'background:' + famColor(r.kind)}));
      if (c.key === 'data' && v) td.title = v;
      tr.appendChild(td);
    }
    const td = el('td', {class: 'str'});
    if (methods.has(r.method)) {
      const b = el('button', {type: 'button', class: 'row-cmd', title: 'fill the command builder with this row'}, 'cmd');
      b.addEventListener('click', (ev) => { ev.stopPropagation(); builderFromRow(r); });
      td.appendChild(b);
    }
    tr.appendChild(td);
    tr.addEventListener('click', () => toggleSelect(r.index));
    body.appendChild(tr);
  }
  const nf = (LB.failed || []).length;
  $('row-count').textContent = rows.length + ' of ' + ROWS.length + ' rows shown' + (nf ? `; ${nf} failed job(s), listed below` : '');
}
function toggleSelect(i) {
  const k = state.selected.indexOf(i);
  if (k >= 0) state.selected.splice(k, 1); else { state.selected.push(i); if (state.selected.length > 8) state.selected.shift(); }
  renderAll();
}

// ---------------------------------------------------------------- filters
function buildFilters() {
  const mk = (box, values, set, name, label) => {
    for (const v of values) {
      const n = ROWS.filter((r) => (name === 'family' ? r.kind : r.tier) === v).length;
      const cb = el('input', {type: 'checkbox', 'data-filter': name, value: v, id: 'f-' + name + '-' + v});
      cb.checked = true;
      cb.addEventListener('change', () => { if (cb.checked) set.add(v); else set.delete(v); renderAll(); });
      const lab = el('label', {for: cb.id});
      lab.appendChild(cb);
      if (name === 'family') lab.appendChild(el('span', {class: 'swatch', style: 'background:' + famColor(v)}));
      lab.appendChild(document.createTextNode(label(v) + ' (' + n + ')'));
      box.appendChild(lab);
    }
  };
  mk($('filter-family'), DATA.families, state.families, 'family', (v) => v);
  mk($('filter-tier'), DATA.tiers.filter((t) => state.tiers.has(t)), state.tiers, 'tier', (v) => v);
  $('filter-text').addEventListener('input', (e) => { state.text = e.target.value; renderAll(); });
}

// ---------------------------------------------------------------- charts
const XAXES = [['merge_time_s', 'merge wall time (s)'], ['peak_rss_mb', 'peak memory (MB)'],
  ['extra_parameters', 'extra parameters'], ['total_parameters', 'total parameters'],
  ['inference_cost_ratio', 'inference cost (× one model)'], ['evaluation_time_s', 'evaluation time (s)']];
const YAXES = [['average', 'average accuracy (%)'], ['normalized', 'normalized accuracy (%)'], ['gain_kept', 'gain kept (%)']];
function niceStep(span, n) {
  const raw = span / Math.max(1, n), p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * p;
}
function linTicks(lo, hi, n) {
  const s = niceStep(hi - lo || 1, n), out = [];
  for (let v = Math.ceil(lo / s) * s; v <= hi + 1e-9 * s; v += s) out.push(+v.toPrecision(12));
  return out;
}
function logTicks(lo, hi) {
  const out = [], a = Math.floor(Math.log10(lo)), b = Math.ceil(Math.log10(hi));
  const mult = b - a <= 2 ? [1, 2, 5] : [1];
  for (let e = a; e <= b; e++) for (const m of mult) { const v = m * Math.pow(10, e); if (v >= lo && v <= hi) out.push(v); }
  return out;
}
function tickText(v) {
  if (Math.abs(v) >= 1e6 || (Math.abs(v) < 1e-3 && v !== 0)) return v.toExponential(0);
  if (Math.abs(v) >= 1e3) return Math.round(v).toLocaleString('en-US');
  return String(+v.toPrecision(3));
}
function autoLog(key) {
  const xs = ROWS.filter((r) => r.kind !== 'reference').map((r) => r[key]).filter((v) => isNum(v) && v > 0);
  return xs.length > 1 && Math.max(...xs) / Math.min(...xs) > 20;
}
function renderScatter(rows) {
  const xKey = $('scatter-x').value, yKey = $('scatter-y').value, logx = $('scatter-logx').checked;
  const W = 640, H = 400, m = {l: 56, r: 16, t: 12, b: 44};
  const box = $('scatter'); box.textContent = '';
  const svg = sv('svg', {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'accuracy against cost'});
  const refs = rows.filter((r) => r.kind === 'reference' && isNum(r[yKey]));
  const pts = rows.filter((r) => r.kind !== 'reference' && isNum(r[xKey]) && isNum(r[yKey]));
  const noY = rows.filter((r) => r.kind !== 'reference' && isNum(r[xKey]) && !isNum(r[yKey])).length;
  const ys = pts.map((r) => 100 * r[yKey]).concat(refs.map((r) => 100 * r[yKey]));
  const xs = pts.map((r) => r[xKey]);
  const pos = xs.filter((v) => v > 0);
  let x0, x1;
  if (logx && pos.length) { x0 = Math.min(...pos) / 1.6; x1 = Math.max(...pos) * 1.6; }
  else { x0 = Math.min(0, ...xs); x1 = xs.length ? Math.max(...xs) * 1.06 : 1; if (x1 <= x0) x1 = x0 + 1; }
  let y0 = ys.length ? Math.min(...ys) : 0, y1 = ys.length ? Math.max(...ys) : 100;
  const pad = Math.max(2, (y1 - y0) * 0.08); y0 -= pad; y1 += pad;
  const useLog = logx && pos.length > 0;
  const fx = (v) => {
    if (useLog) { const c = Math.max(v, x0); return m.l + (Math.log10(c) - Math.log10(x0)) / (Math.log10(x1) - Math.log10(x0)) * (W - m.l - m.r); }
    return m.l + (v - x0) / (x1 - x0) * (W - m.l - m.r);
  };
  const fy = (v) => H - m.b - (v - y0) / (y1 - y0) * (H - m.t - m.b);
  const axis = sv('g', {class: 'axis'});
  for (const t of (useLog ? logTicks(x0, x1) : linTicks(x0, x1, 6))) {
    axis.appendChild(sv('line', {class: 'grid', x1: fx(t), x2: fx(t), y1: m.t, y2: H - m.b}));
    axis.appendChild(sv('text', {x: fx(t), y: H - m.b + 14, 'text-anchor': 'middle'}, tickText(t)));
  }
  for (const t of linTicks(y0, y1, 6)) {
    axis.appendChild(sv('line', {class: 'grid', x1: m.l, x2: W - m.r, y1: fy(t), y2: fy(t)}));
    axis.appendChild(sv('text', {x: m.l - 5, y: fy(t) + 4, 'text-anchor': 'end'}, tickText(t)));
  }
  axis.appendChild(sv('line', {x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b}));
  axis.appendChild(sv('line', {x1: m.l, x2: m.l, y1: m.t, y2: H - m.b}));
  const xl = XAXES.find((a) => a[0] === xKey)[1] + (useLog ? ', log scale' : '');
  axis.appendChild(sv('text', {x: (m.l + W - m.r) / 2, y: H - 8, 'text-anchor': 'middle'}, xl));
  axis.appendChild(sv('text', {x: 14, y: (m.t + H - m.b) / 2, 'text-anchor': 'middle',
    transform: `rotate(-90 14 ${(m.t + H - m.b) / 2})`}, YAXES.find((a) => a[0] === yKey)[1]));
  svg.appendChild(axis);
  const placed = [];  // label boxes already drawn: a label moves to the next free slot beside its point
  const refLabels = new Map();  // reference rows at the same height share one label
  for (const r of refs) {
    const y = fy(100 * r[yKey]);
    svg.appendChild(sv('line', {class: 'ref', x1: m.l, x2: W - m.r, y1: y, y2: y, 'data-method': r.method}));
    const k = Math.round(y);
    refLabels.set(k, (refLabels.has(k) ? refLabels.get(k) + ' = ' : '') + r.label);
  }
  for (const [y, text] of [...refLabels.entries()].sort((a, b) => a[0] - b[0])) {
    const w = 6.2 * text.length + 4;
    let ty = y - 3;
    while (placed.some((b) => ty - 10 < b[1] + 12 && b[1] < ty + 2)) ty += 12;  // below a label it would cover
    placed.push([W - m.r - 4 - w, ty - 10, w]);
    svg.appendChild(sv('text', {x: W - m.r - 4, y: ty, 'text-anchor': 'end', fill: '#666', class: 'ref-label'}, text));
  }
  const showLabels = $('scatter-labels').checked;
  const labelAt = (x, y, text) => {
    const w = 6.2 * text.length + 4, left = x + 7 + w > W - m.r;
    const bx = left ? x - 7 - w : x + 7;
    for (const dy of [-5, 13, -17, 25, -29, 37]) {
      const by = y + dy - 10;
      if (!placed.some((b) => bx < b[0] + b[2] && b[0] < bx + w && by < b[1] + 12 && b[1] < by + 12)) {
        placed.push([bx, by, w]);
        return {x: left ? x - 7 : x + 7, y: y + dy, anchor: left ? 'end' : 'start'};
      }
    }
    return null;  // no free slot: the point's tooltip names it
  };
  for (const r of pts) {
    const x = fx(r[xKey]), y = fy(100 * r[yKey]);
    const clamped = useLog && r[xKey] <= 0;
    const c = sv('circle', {cx: x, cy: y, r: 5, fill: famColor(r.kind), 'data-method': r.method, 'data-index': r.index,
      class: ['pt', clamped ? 'clamped' : '', state.selected.includes(r.index) ? 'selected' : ''].join(' ').trim()});
    c.appendChild(sv('title', {}, `${r.label} (${r.kind}, data: ${r.tier})\n${xl}: ${r[xKey]}\n${YAXES.find((a) => a[0] === yKey)[1]}: ${(100 * r[yKey]).toFixed(2)}`));
    c.addEventListener('click', () => toggleSelect(r.index));
    svg.appendChild(c);
    const at = showLabels ? labelAt(x, y, r.label) : null;
    if (at) svg.appendChild(sv('text', {x: at.x, y: at.y, 'text-anchor': at.anchor, class: 'pt-label'}, r.label));
  }
  box.appendChild(svg);
  const missing = rows.filter((r) => r.kind !== 'reference' && !isNum(r[xKey])).length;
  $('scatter-note').textContent = `${pts.length} points; dashed lines: reference rows` +
    (missing ? `; ${missing} row(s) without this cost are not drawn` : '') +
    (noY ? `; ${noY} row(s) without this accuracy` : '') +
    (useLog && pts.some((r) => r[xKey] <= 0) ? '; pale points: a cost of 0, drawn at the left edge' : '');
}
function renderBars(rows) {
  const box = $('bars'); box.textContent = '';
  let sel = state.selected.map((i) => ROWS[i]).filter((r) => rows.includes(r));
  if (!sel.length) {
    const refs = rows.filter((r) => r.kind === 'reference' && isNum(r.average)).slice(0, 2);
    const best = rows.filter((r) => r.kind !== 'reference' && isNum(r.average)).sort((a, b) => b.average - a.average)[0];
    sel = best ? refs.concat([best]) : refs;
  }
  const W = 640, H = 360, m = {l: 44, r: 10, t: 10, b: 86};
  const svg = sv('svg', {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'per-task accuracy'});
  const cats = TASKS.concat(['average']);
  const gw = (W - m.l - m.r) / cats.length, bw = Math.max(2, (gw - 6) / Math.max(1, sel.length));
  const fy = (v) => H - m.b - v / 100 * (H - m.t - m.b);
  for (const t of [0, 20, 40, 60, 80, 100]) {
    svg.appendChild(sv('line', {class: 'grid', x1: m.l, x2: W - m.r, y1: fy(t), y2: fy(t)}));
    svg.appendChild(sv('text', {x: m.l - 5, y: fy(t) + 4, 'text-anchor': 'end'}, t));
  }
  cats.forEach((t, ti) => {
    const gx = m.l + ti * gw + 3;
    sel.forEach((r, si) => {
      const v = t === 'average' ? r.average : (r.accuracy || {})[t];
      if (!isNum(v)) return;
      const rect = sv('rect', {class: 'bar', x: gx + si * bw, y: fy(100 * v), width: bw - 1, height: fy(0) - fy(100 * v),
        fill: PALETTE[si % PALETTE.length], 'data-method': r.method, 'data-task': t});
      rect.appendChild(sv('title', {}, `${r.label} on ${t}: ${(100 * v).toFixed(2)} %`));
      svg.appendChild(rect);
    });
    const tx = gx + gw / 2 - 3;
    svg.appendChild(sv('text', {x: tx, y: H - m.b + 12, 'text-anchor': 'end', transform: `rotate(-35 ${tx} ${H - m.b + 12})`}, t));
  });
  svg.appendChild(sv('line', {class: 'axis', x1: m.l, x2: W - m.r, y1: fy(0), y2: fy(0), stroke: '#888'}));
  box.appendChild(svg);
  const legend = el('div', {class: 'legend'});
  sel.forEach((r, si) => {
    const s = el('span', {style: 'margin-right:12px'});
    s.appendChild(el('span', {class: 'swatch', style: 'border-radius:2px;background:' + PALETTE[si % PALETTE.length]}));
    s.appendChild(document.createTextNode(r.label));
    legend.appendChild(s);
  });
  box.appendChild(legend);
}

function renderAll() {
  const rows = sortedRows(visibleRows());
  renderTable(rows);
  renderScatter(rows);
  renderBars(rows);
}

// ---------------------------------------------------------------- command builder
// A value as a Hydra override value (data, never code): strings that Hydra would read as something else
// (numbers, booleans, null, paths, text with spaces or commas, ${...}) are single-quoted.
function hydraValue(v) {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  if (typeof v === 'number') return isFinite(v) ? String(v) : (isNaN(v) ? 'nan' : (v > 0 ? 'inf' : '-inf'));
  if (Array.isArray(v)) return '[' + v.map(hydraValue).join(',') + ']';
  if (typeof v === 'object') return '{' + Object.entries(v).map(([k, x]) => hydraKey(k) + ':' + hydraValue(x)).join(',') + '}';
  const s = String(v);
  if (/^[A-Za-z_][A-Za-z0-9_\-]*$/.test(s) && !/^(true|false|null|nan|inf)$/i.test(s)) return s;
  // Hydra's quoted strings: a run of backslashes before a quote (or the closing quote) is doubled, a quote is
  // escaped, other backslashes stay literal; '\${' keeps ${...} from being read as an interpolation
  const body = s.replace(/(\\+)(?='|$)/g, '$1$1').replace(/'/g, "\\'").replace(/\$\{/g, '\\${');
  return "'" + body + "'";
}
function hydraKey(k) { return /^[A-Za-z_][A-Za-z0-9_\-]*$/.test(k) ? k : hydraValue(String(k)); }
// POSIX shell quoting: bare when safe, else double quotes when nothing in the text is special inside them
// (a Hydra-quoted value reads key='...'), else single quotes (as Python's shlex.quote)
function shellQuote(s) {
  if (s === '') return "''";
  if (/^[A-Za-z0-9_@%+=:,.\/\-]+$/.test(s)) return s;
  if (/^[^"$`\\!]*$/.test(s)) return '"' + s + '"';
  return "'" + s.replace(/'/g, "'\"'\"'") + "'";
}
const B = {values: {}};  // "<prefix><name>" -> the widget's current text / value
const byName = (list, name) => list.find((x) => x.name === name);

function optDefaultText(o) {
  if (o.kind === 'bool' || o.kind === 'choice') return o.default === null ? 'null' : hydraValue(o.default);
  if (o.default === null || o.default === undefined) return '';
  if (o.kind === 'str') return String(o.default);
  if (o.kind === 'int' || o.kind === 'float') return String(o.default);
  return hydraValue(o.default);
}
// the override value text for widget text `t` of option o, or {error}
function optValue(o, t) {
  if (o.kind === 'bool' || o.kind === 'choice') return {text: t};
  if (o.kind === 'int' || o.kind === 'float') {
    const s = t.trim();
    if (s === '') return o.nullable ? {text: 'null'} : {error: 'needs a number'};
    const re = o.kind === 'int' ? /^[+-]?\d+$/ : /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;
    if (!re.test(s)) return {error: o.kind === 'int' ? 'must be an integer' : 'must be a number'};
    const v = Number(s), g = o.range || {};
    const out = ('ge' in g && !(v >= g.ge)) || ('gt' in g && !(v > g.gt)) || ('le' in g && !(v <= g.le)) || ('lt' in g && !(v < g.lt));
    if (out) return {error: 'is out of range: it must be in ' + o.range_text};
    return {text: s};
  }
  if (o.kind === 'str') {
    if (t === '' && o.nullable) return {text: 'null'};
    return {text: hydraValue(t)};
  }
  const s = t.trim();
  if (s === '') return o.nullable ? {text: 'null'} : {error: 'needs a value (Hydra syntax, e.g. [a,b] or {k:1})'};
  return {text: s};
}
function isDefault(o, t) {
  if (o.kind === 'int' || o.kind === 'float') {
    const d = optDefaultText(o);
    if (t.trim() === '' || d === '') return t.trim() === d;
    return Number(t) === Number(d);
  }
  return t === optDefaultText(o);
}
function optWidget(o, prefix) {
  const key = prefix + o.name, id = 'opt-' + key.replace(/[^A-Za-z0-9_-]/g, '_');
  let w;
  if (o.kind === 'bool' || o.kind === 'choice') {
    w = el('select', {id, 'data-opt': key});
    const vals = o.kind === 'bool' ? [true, false] : o.choices.slice();
    if (o.nullable && !vals.includes(null)) vals.push(null);
    for (const v of vals) w.appendChild(el('option', {value: hydraValue(v)}, v === null ? 'null' : String(v)));
  } else {
    w = el('input', {id, type: 'text', 'data-opt': key, placeholder: o.nullable ? 'null' : '', spellcheck: 'false'});
  }
  w.value = key in B.values ? B.values[key] : optDefaultText(o);
  const ev = w.tagName === 'SELECT' ? 'change' : 'input';
  w.addEventListener(ev, () => { B.values[key] = w.value; renderCommand(); });
  return w;
}
function optTable(opts, prefix, boxId) {
  const box = $(boxId); box.textContent = '';
  if (!opts.length) { box.appendChild(el('p', {class: 'muted'}, 'no options')); return; }
  const t = el('table', {class: 'opts'});
  const hr = el('tr');
  for (const h of ['option', 'value', 'type', 'default', 'allowed', 'help']) hr.appendChild(el('th', {}, h));
  t.appendChild(hr);
  for (const o of opts) {
    const tr = el('tr', {'data-opt-row': prefix + o.name});
    const name = el('td'); name.appendChild(el('code', {}, o.name)); tr.appendChild(name);
    const v = el('td'); v.appendChild(optWidget(o, prefix)); tr.appendChild(v);
    tr.appendChild(el('td', {}, o.type));
    tr.appendChild(el('td', {}, o.required ? '(required)' : (o.default === null ? 'null' : hydraValue(o.default))));
    tr.appendChild(el('td', {}, o.choices ? o.choices.map((c) => c === null ? 'null' : String(c)).join(' | ') : (o.range_text || '')));
    tr.appendChild(el('td', {class: 'help'}, o.help));
    t.appendChild(tr);
  }
  box.appendChild(t);
}
function fillSelect(sel, items, label) {
  const cur = sel.value; sel.textContent = '';
  for (const it of items) sel.appendChild(el('option', {value: it.name}, label ? label(it) : it.name));
  if (items.some((x) => x.name === cur)) sel.value = cur;
}
function builderMethods() {
  const fam = $('b-family').value;
  return REG.methods.filter((m) => fam === '' || m.family === fam);
}
function onMethodChange() {
  const m = byName(REG.methods, $('b-method').value);
  const info = $('b-method-info'); info.textContent = '';
  if (!m) return;
  info.appendChild(el('b', {}, m.name + ' '));
  info.appendChild(document.createTextNode(`(${m.family}; needs the pretrained model: ${m.requires_pretrained ? 'yes' : 'no'}; ` +
    `uses data: ${m.uses_data ? 'yes' : 'no'}): ${m.summary}`));
  info.appendChild(el('br'));
  info.appendChild(el('span', {class: 'muted'}, 'variant: ' + m.variant));
  optTable(m.options, 'method.', 'b-method-opts');
  renderCommand();
}
function poolInfo() {
  const info = $('b-pool-info'); info.textContent = '';
  for (const [g, sel] of [['modelpools', 'b-modelpool'], ['taskpools', 'b-taskpool']]) {
    const p = byName(REG[g], $(sel).value);
    if (!p) continue;
    const d = el('div');
    d.appendChild(el('b', {}, p.name + ' '));
    d.appendChild(document.createTextNode(`(type ${p.type}) ${p.description}`));
    info.appendChild(d);
  }
}
function onPoolChange(group) {
  const p = byName(REG[group + 's'], $('b-' + group).value);
  optTable(p ? p.options : [], group + '.', 'b-' + group + '-opts');
  poolInfo();
  renderCommand();
}
// the overrides of the options that differ from their default (every option with `all`, for the tests)
function overrides(opts, prefix, errors, all) {
  const out = [];
  for (const o of opts) {
    const key = prefix + o.name;
    const w = document.querySelector(`[data-opt="${CSS.escape(key)}"]`);
    if (!w) continue;
    const t = w.value;
    const row = w.closest('tr');
    if (isDefault(o, t) && !o.required && !all) { w.classList.remove('invalid'); if (row) row.classList.remove('changed'); continue; }
    const r = optValue(o, t);
    if (r.error) { w.classList.add('invalid'); errors.push(`${key}=${t} ${r.error}`); continue; }
    w.classList.remove('invalid'); if (row) row.classList.add('changed');
    out.push((o.in_yaml === false ? '+' : '') + key + '=' + r.text);
  }
  return out;
}
function buildCommand(opt) {
  const errors = [], all = !!(opt && opt.all);
  const m = byName(REG.methods, $('b-method').value);
  const mp = byName(REG.modelpools, $('b-modelpool').value), tp = byName(REG.taskpools, $('b-taskpool').value);
  const args = ['fusion_bench', 'method=' + (m ? m.name : '?')];
  if (mp) args.push('modelpool=' + mp.name);
  if (tp) args.push('taskpool=' + tp.name);
  if (m) args.push(...overrides(m.options, 'method.', errors, all));
  if (mp) args.push(...overrides(mp.options, 'modelpool.', errors, all));
  if (tp) args.push(...overrides(tp.options, 'taskpool.', errors, all));
  args.push(...overrides(REG.program, '', errors, all));
  return {command: args.map(shellQuote).join(' '), args, errors};
}
function renderCommand() {
  const r = buildCommand();
  $('cmd').textContent = r.command;
  const e = $('b-errors'); e.textContent = '';
  for (const x of r.errors) e.appendChild(el('div', {class: 'error'}, x + ' (left out of the command)'));
  $('copy-status').textContent = '';
}
function setOption(key, value) {
  B.values[key] = value;
  const w = document.querySelector(`[data-opt="${CSS.escape(key)}"]`);
  if (w) w.value = value;
}
function builderFromRow(r) {
  $('b-family').value = '';
  fillSelect($('b-method'), builderMethods());
  B.values = {};
  const m = byName(REG.methods, r.method);
  if (!m) return;
  $('b-method').value = m.name;
  const sug = DATA.suggested;
  if (sug.modelpool) $('b-modelpool').value = sug.modelpool;
  if (sug.taskpool) $('b-taskpool').value = sug.taskpool;
  for (const o of m.options) {
    const hp = r.hyperparameters || {};
    if (!(o.name in hp)) continue;
    const v = hp[o.name];
    B.values['method.' + o.name] = (o.kind === 'bool' || o.kind === 'choice') ? hydraValue(v)
      : (v === null ? '' : (o.kind === 'str' ? String(v) : (o.kind === 'int' || o.kind === 'float') ? String(v) : hydraValue(v)));
  }
  for (const [k, v] of Object.entries(sug.taskpool_options || {})) B.values['taskpool.' + k] = String(v);
  onMethodChange(); onPoolChange('modelpool'); onPoolChange('taskpool'); programOpts();
  $('builder').scrollIntoView();
}
function programOpts() { optTable(REG.program, '', 'b-program-opts'); renderCommand(); }
function buildBuilder() {
  $('fb-version').textContent = REG.version;
  const fams = [...new Set(REG.methods.map((m) => m.family))].sort();
  fillSelect($('b-family'), [{name: ''}].concat(fams.map((f) => ({name: f}))), (x) => x.name || 'all families');
  fillSelect($('b-method'), builderMethods(), (m) => `${m.name} (${m.family}${m.uses_data ? ', uses data' : ''})`);
  fillSelect($('b-modelpool'), REG.modelpools, (p) => `${p.name} (${p.type})`);
  fillSelect($('b-taskpool'), REG.taskpools, (p) => `${p.name} (${p.type})`);
  const sug = DATA.suggested;
  const best = ROWS.filter((r) => r.kind !== 'reference' && isNum(r.average) && byName(REG.methods, r.method))
    .sort((a, b) => b.average - a.average)[0];
  if (best) $('b-method').value = best.method;
  if (sug.modelpool) $('b-modelpool').value = sug.modelpool;
  if (sug.taskpool) $('b-taskpool').value = sug.taskpool;
  for (const [k, v] of Object.entries(sug.taskpool_options || {})) B.values['taskpool.' + k] = String(v);
  $('b-family').addEventListener('change', () => {
    fillSelect($('b-method'), builderMethods(), (m) => `${m.name} (${m.family}${m.uses_data ? ', uses data' : ''})`);
    onMethodChange();
  });
  $('b-method').addEventListener('change', onMethodChange);
  $('b-modelpool').addEventListener('change', () => {
    onPoolChange('modelpool');
    // the task pool named in the model pool YAML's first line, when it is shipped
    const p = byName(REG.modelpools, $('b-modelpool').value);
    const hit = p && /taskpool=([A-Za-z0-9_.\-]+)/.exec(p.command);
    if (hit && byName(REG.taskpools, hit[1]) && $('b-taskpool').value !== hit[1]) { $('b-taskpool').value = hit[1]; onPoolChange('taskpool'); }
  });
  $('b-taskpool').addEventListener('change', () => onPoolChange('taskpool'));
  $('copy-cmd').addEventListener('click', copyCommand);
  $('reset-cmd').addEventListener('click', () => {
    B.values = {}; onMethodChange(); onPoolChange('modelpool'); onPoolChange('taskpool'); programOpts();
  });
  onMethodChange(); onPoolChange('modelpool'); onPoolChange('taskpool'); programOpts();
}
function copyCommand() {
  const text = $('cmd').textContent, status = $('copy-status');
  const fallback = () => {
    const ta = el('textarea'); ta.value = text; document.body.appendChild(ta); ta.select();
    let ok = false; try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
    ta.remove();
    status.textContent = ok ? 'copied' : 'select the command and copy it';
  };
  if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(() => { status.textContent = 'copied'; }, fallback);
  else fallback();
}

// ---------------------------------------------------------------- page
function renderInfo() {
  const z = LB.zoo || {};
  const parts = [`track ${z.track || 'clip'}`, `scale ${z.scale}`];
  if (z.variant) parts.push(`variant ${z.variant}`);
  if (z.corruption) parts.push(`corruption ${z.corruption}`);
  if (z.max_samples) parts.push(`at most ${z.max_samples} test examples per task`);
  parts.push(`${TASKS.length} tasks`, `${ROWS.length} rows`);
  if (LB.tune) parts.push(`tuned: ${LB.tune.option} on the ${LB.tune.split} split`);
  if (isNum(LB.total_time_s)) parts.push(`total time ${LB.total_time_s.toFixed(1)} s`);
  if (LB.combined_from) parts.push(`combined from ${LB.combined_from.length} runs`);
  $('zoo-info').textContent = parts.join(' · ');
  const notes = $('notes');
  if (LB.targets && LB.targets.length) {
    notes.appendChild(el('h2', {}, 'Quality targets'));
    const ul = el('ul');
    for (const t of LB.targets) {
      ul.appendChild(el('li', {}, `${t.met ? 'met' : 'NOT met'}: ${t.name}: ${isNum(t.value) ? (100 * t.value).toFixed(1) : 'undefined'}` +
        ` (required >= ${(100 * t.target).toFixed(0)}); ${t.detail}`));
    }
    notes.appendChild(ul);
  }
  const o = LB.order_vs_fusionbench;
  if (o) {
    notes.appendChild(el('h2', {}, 'Order beside FusionBench (CLIP ViT-B/32, 8 tasks)'));
    notes.appendChild(el('p', {}, `Kendall's tau ${isNum(o.kendall_tau) ? o.kendall_tau.toFixed(2) : '-'} (1 = the same order). ` +
      'Here: ' + o.here.join(' > ') + '. FusionBench: ' + o.fusionbench.join(' > ') + '.'));
  }
  const failed = LB.failed || [];  // jobs that raised (a re-run runs them again)
  if (failed.length) {
    notes.appendChild(el('h2', {}, `Failed jobs (${failed.length})`));
    const ul = el('ul', {id: 'failed'});
    for (const f of failed) {
      const li = el('li'); li.appendChild(el('code', {}, f.label || f.method));
      li.appendChild(document.createTextNode(': ' + String(f.error || '').split(/\s+/).join(' ')));
      ul.appendChild(li);
    }
    notes.appendChild(ul);
    $('row-count').dataset.failed = failed.length;
  }
  const failedNames = new Set(failed.map((f) => f.method));
  const sk = Object.entries(LB.skipped || {}).filter(([k]) => !failedNames.has(k) || ROWS.some((r) => r.method === k));
  if (sk.length) {
    const d = el('details'); d.appendChild(el('summary', {}, `Not run (${sk.length})`));
    const ul = el('ul', {id: 'skipped'});
    for (const [k, v] of sk) { const li = el('li'); li.appendChild(el('code', {}, k)); li.appendChild(document.createTextNode(': ' + v)); ul.appendChild(li); }
    d.appendChild(ul); notes.appendChild(d);
  }
  $('footer').textContent = `Generated by fusion_bench ${REG.version} (python -m fusion_bench.benchmark.web); ` +
    'self-contained: works offline.';
}
function init() {
  for (const [k, t] of XAXES) $('scatter-x').appendChild(el('option', {value: k}, t));
  for (const [k, t] of YAXES) $('scatter-y').appendChild(el('option', {value: k}, t));
  $('scatter-logx').checked = autoLog('merge_time_s');
  $('scatter-x').addEventListener('change', () => { $('scatter-logx').checked = autoLog($('scatter-x').value); renderAll(); });
  for (const id of ['scatter-y', 'scatter-logx', 'scatter-labels']) $(id).addEventListener('change', renderAll);
  renderInfo();
  buildHead();
  buildFilters();
  renderAll();
  buildBuilder();
  window.fbWeb = {hydraValue, shellQuote, buildCommand, state, data: DATA};
  document.body.setAttribute('data-ready', '1');
}
init();
})();
"""


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess in the tests
    import sys

    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException as e:
        from fusion_bench.cli import fail

        fail(e)
