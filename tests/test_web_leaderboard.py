"""The web leaderboard (fusion_bench.benchmark.web): the data the page embeds (no browser), then the page itself in
headless Chromium driven by Selenium: it renders every row of a real tiny-zoo leaderboard, sorts, filters, draws
one scatter point per row with a cost and per-task bars, and its command builder writes a command that runs.

The browser tests need Debian's ``chromium`` and ``chromium-driver`` and PyPI's ``selenium`` (no download at run
time); they are skipped, with the reason, where those are missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from fusion_bench.benchmark import web
from fusion_bench.config_schema import describe, option
from fusion_bench.errors import ConfigError

TUNE_GRID = [0.1, 0.3]
LB_METHODS = ["simple_average", "task_arithmetic", "ties_merging", "simple_ensemble"]


# --------------------------------------------------------------------------------------------------------------
# a real leaderboard on the tiny zoo (module scope: built once)
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lb(tmp_path_factory, tiny_clip_zoo):
    """(zoo root, leaderboard document, its folder): four methods on the tiny CLIP zoo, scaling_factor tuned on
    the validation split over a two-value grid (so rows of the tiers none, validation and train appear)."""
    from fusion_bench.benchmark.leaderboard import run_leaderboard

    base = tmp_path_factory.mktemp("web_lb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSION_BENCH_CACHE", str(base / "cache"))
        zoo = tiny_clip_zoo
        doc = run_leaderboard("tiny", str(zoo.root), base / "lb", methods=LB_METHODS, max_samples=20, tune=True,
                              tune_grid=TUNE_GRID, log=lambda s: None)
    return zoo.root, doc, base / "lb"


@pytest.fixture(scope="module")
def registry():
    return web.registry_data()


# --------------------------------------------------------------------------------------------------------------
# the data the page embeds (no browser)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, tier", [
    ("none", "none"), (None, "none"),
    ("test split (8000 unlabeled inputs)", "unlabeled"),
    ("train split (2048 unlabeled inputs)", "unlabeled"),
    ("validation split (labelled, selects scaling_factor)", "validation"),
    ("train split (fine-tuning)", "train"),
    ("train split", "train"),
    ("train + test split (8000 labelled inputs)", "train"),
    ("train split (1024 labelled inputs); validation split (labelled, selects scaling_factor)", "train"),
    ("test split (133 unlabeled inputs); validation split (labelled, selects scaling_factor)", "validation"),
    ("something else", "other"),
])
def test_data_tier(data, tier):
    assert web.data_tier(data) == tier


@dataclasses.dataclass
class _Demo:
    need: str = option(help="required")
    ratio: float = option(0.5, ge=0, le=1, help="a ratio")
    steps: int = option(10, gt=0, help="steps")
    mode: str = option("a", choices=("a", "b"), help="the mode")
    lit: Literal["x", "y"] = option("y", help="a literal")
    flag: bool = option(False, help="a flag")
    names: list[str] = option(["p", "q"], help="names")
    table: dict[str, int] = option({}, help="a table")
    maybe: float | None = option(None, help="optional number")
    either: list[str] | str | None = option(None, help="several types")


def test_option_schema_reads_the_typed_dataclass():
    s = {o["name"]: o for o in web.option_schema(_Demo)}
    assert list(s) == [f.name for f in dataclasses.fields(_Demo)]
    assert {k: o["kind"] for k, o in s.items()} == {
        "ratio": "float", "steps": "int", "mode": "choice", "lit": "choice", "flag": "bool", "names": "list",
        "table": "dict", "maybe": "float", "either": "any", "need": "str"}
    assert s["ratio"]["range"] == {"ge": 0, "le": 1} and s["ratio"]["range_text"] == "[0, 1]"
    assert s["steps"]["range_text"] == "> 0"
    assert s["mode"]["choices"] == ["a", "b"] and s["lit"]["choices"] == ["x", "y"]
    assert s["maybe"]["nullable"] and not s["ratio"]["nullable"] and s["either"]["nullable"]
    assert s["names"]["default"] == ["p", "q"] and s["table"]["default"] == {}
    assert s["need"]["required"] and s["need"]["default"] is None and not s["ratio"]["required"]
    assert s["flag"]["help"] == "a flag"
    # a pool YAML's values replace the defaults
    assert {o["name"]: o["default"] for o in web.option_schema(_Demo, {"ratio": 0.25})}["ratio"] == 0.25
    json.dumps(web.option_schema(_Demo), allow_nan=False)


def test_registry_data_matches_the_registry(registry):
    from fusion_bench.cli import CONFIG_DIR
    from fusion_bench.methods import get_method_class, list_methods

    assert [m["name"] for m in registry["methods"]] == list_methods()
    for m in registry["methods"]:
        cls = get_method_class(m["name"])
        assert m["family"] == cls.family and m["uses_data"] == cls.uses_data
        # the same names, defaults and help as the dataclass' own documentation (config_schema.describe)
        doc = {name: (default, help_) for name, _, default, help_ in describe(cls.config_class)}
        assert [o["name"] for o in m["options"]] == list(doc), m["name"]
        for o in m["options"]:
            default, help_ = doc[o["name"]]
            if not o["required"]:
                assert o["default"] == web._json_safe(default), (m["name"], o["name"])
            assert help_.startswith(o["help"]) and o["help"], (m["name"], o["name"])
            if o["kind"] == "choice":
                asso = o["choices"]
                assert asso and (o["default"] in asso or (o["nullable"] and o["default"] is None)), (m["name"], o)
    for group in ("modelpool", "taskpool"):
        assert [p["name"] for p in registry[group + "s"]] == sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    tiny = {o["name"]: o for o in next(p for p in registry["taskpools"] if p["name"] == "clip_zoo_tiny")["options"]}
    assert tiny["scale"]["default"] == "tiny" and tiny["scale"]["in_yaml"]   # the YAML's value, not the class's
    assert tiny["max_samples"]["in_yaml"] and "name" not in tiny and "type" not in tiny
    prog = {o["name"]: o for o in registry["program"]}
    assert prog["seed"]["kind"] == "int" and prog["report_path"]["nullable"] and "method" not in prog
    json.dumps(registry, allow_nan=False)


def test_suggested_pools(registry):
    doc = {"zoo": {"track": "clip", "scale": "tiny", "max_samples": 20, "corruption": None}, "tasks": [], "rows": []}
    assert web.suggested_pools(doc, registry) == {"modelpool": "clip_zoo_tiny", "taskpool": "clip_zoo_tiny",
                                                  "taskpool_options": {"max_samples": 20}}
    doc["zoo"] = {"track": "text", "scale": "tiny", "variant": "lora", "max_samples": None}
    assert web.suggested_pools(doc, registry)["modelpool"] == "text_zoo_lora_tiny"
    doc["zoo"] = {"track": "text", "scale": "full", "variant": "full", "max_samples": None}
    assert web.suggested_pools(doc, registry)["taskpool"] == "text_zoo"
    doc["zoo"] = {"track": "somewhere", "scale": "huge"}
    assert web.suggested_pools(doc, registry)["modelpool"] is None


def _embedded(html: str):
    m = re.search(r'<script id="fb-data" type="application/json">(.*?)</script>', html, re.S)
    assert m, "the page embeds its data"
    return json.loads(m.group(1))


def test_page_embeds_the_leaderboard_safely(lb, registry):
    _, doc, _ = lb
    hostile = json.loads(json.dumps(doc))
    hostile["rows"][2]["method"] = "</script><script>alert('x')</script> & <!--"
    hostile["rows"][2]["average"] = math.nan
    html = web.render_html(hostile, registry)
    # the name cannot close the data element nor open a comment: '<' and '>' are escaped inside the JSON
    assert html.count("<script") == 2 and html.count("</script>") == 2 and "<!--" not in html
    data = _embedded(html)
    rows = data["leaderboard"]["rows"]
    assert rows[2]["method"] == hostile["rows"][2]["method"] and rows[2]["average"] is None  # NaN -> null
    assert [r["method"] for r in rows[3:]] == [r["method"] for r in doc["rows"][3:]]
    assert [r["tier"] for r in rows] == [web.data_tier(r["data"]) for r in doc["rows"]]
    assert [r["index"] for r in rows] == list(range(len(rows)))
    assert data["registry"] == json.loads(json.dumps(registry))
    assert doc["rows"][2]["method"] != hostile["rows"][2]["method"]  # the caller's document is not changed
    # offline: nothing is fetched (the only URL is the SVG namespace, an identifier)
    assert set(re.findall(r"https?://[^\s'\"`)]+", html)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", html)


def test_cli_on_a_combined_leaderboard(lb, tmp_path, capsys):
    from fusion_bench.benchmark.leaderboard import combine_leaderboards

    _, doc, folder = lb
    combined = combine_leaderboards([folder, folder], tmp_path / "combined")
    assert combined.get("combined_from")
    assert web.main([str(tmp_path / "combined")]) == 0  # the folder: leaderboard.html beside its JSON
    html = (tmp_path / "combined" / "leaderboard.html").read_text()
    assert [r["method"] for r in _embedded(html)["leaderboard"]["rows"]] == [r["method"] for r in combined["rows"]]
    assert web.main([str(folder / "leaderboard.json"), str(tmp_path / "x" / "page.html")]) == 0
    assert "written" in capsys.readouterr().out and (tmp_path / "x" / "page.html").stat().st_size > 10_000
    (tmp_path / "bad.json").write_text("[1, 2]")
    for bad in (tmp_path / "missing.json", tmp_path / "bad.json"):
        with pytest.raises(ConfigError, match="leaderboard"):
            web.main([str(bad), str(tmp_path / "out.html")])
    assert not (tmp_path / "out.html").exists()


# --------------------------------------------------------------------------------------------------------------
# the page in headless Chromium
# --------------------------------------------------------------------------------------------------------------
def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "chromium is not installed (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "chromedriver is not installed (apt-get install chromium-driver)"
    return None


@pytest.fixture(scope="module")
def page(lb, registry, tmp_path_factory):
    """(driver, document, zoo root, page path): the page of the tiny leaderboard loaded in headless Chromium."""
    why = _browser_missing()
    if why:
        pytest.skip(f"browser test skipped: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root, doc, _ = lb
    path = web.write_html(doc, tmp_path_factory.mktemp("web_page") / "leaderboard.html", registry)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
              "--host-resolver-rules=MAP * ~NOTFOUND"):  # no network: the page must not need any
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(path.as_uri())
        assert driver.execute_script("return document.body.getAttribute('data-ready')") == "1"
        yield driver, doc, root, path
    finally:
        driver.quit()


def _rows(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#lb-table tbody tr')].map(r => r.dataset.method)")


def _column(driver, key) -> list:
    return driver.execute_script(
        "return [...document.querySelectorAll('#lb-table tbody td[data-key=\"' + arguments[0] + '\"]')]"
        ".map(td => td.dataset.value)", key)


def _click(driver, css):
    driver.execute_script("document.querySelector(arguments[0]).click()", css)


def _set(driver, css, value):
    """Type into an input / choose in a select like a user (events fire)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    el = driver.find_element(By.CSS_SELECTOR, css)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); "
                          "let d = arguments[0].closest('details'); if (d) d.open = true;", el)
    if el.tag_name == "select":
        Select(el).select_by_value(value)
    else:  # select all and type over it (clear() fires no input event)
        el.send_keys(Keys.CONTROL, "a")
        el.send_keys(Keys.DELETE)
        if value:
            el.send_keys(value)
        assert el.get_attribute("value") == value


def test_page_renders_every_row(page):
    driver, doc, _, _ = page
    assert _rows(driver) == [r["method"] for r in doc["rows"]]
    avg = [float(v) if v else None for v in _column(driver, "average")]
    assert avg == [r["average"] for r in doc["rows"]]
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


@pytest.mark.parametrize("key", ["average", "merge_time_s", "acc:letters"])
def test_sorting_by_a_column(page, key):
    driver, doc, _, _ = page

    def value(r):
        return r["accuracy"].get(key[4:]) if key.startswith("acc:") else r.get(key)

    present = [value(r) for r in doc["rows"] if value(r) is not None]
    n_missing = len(doc["rows"]) - len(present)
    for _ in range(2):  # first click: one direction, second: the other
        _click(driver, f'#lb-table th[data-key="{key}"]')
        direction = driver.execute_script(f'return document.querySelector(\'#lb-table th[data-key="{key}"]\')'
                                          ".getAttribute('aria-sort')")
        shown = _column(driver, key)
        assert [float(v) for v in shown[:len(present)]] == sorted(present, reverse=direction == "descending")
        assert shown[len(present):] == [""] * n_missing  # missing values last, both ways
        assert sorted(_rows(driver)) == sorted(r["method"] for r in doc["rows"])
    assert direction == "ascending"  # numbers start descending (best first), the second click reverses


def test_filters_hide_the_right_rows(page):
    driver, doc, _, _ = page
    tiers = {r["method"]: web.data_tier(r["data"]) for r in doc["rows"]}
    kinds = {r["method"]: r["kind"] for r in doc["rows"]}
    assert {"none", "validation", "train"} <= set(tiers.values())
    _click(driver, 'input[data-filter="family"][value="reference"]')
    assert sorted(_rows(driver)) == sorted(m for m in kinds if kinds[m] != "reference")
    _click(driver, 'input[data-filter="tier"][value="validation"]')
    expected = sorted(m for m in kinds if kinds[m] != "reference" and tiers[m] != "validation")
    assert sorted(_rows(driver)) == expected and expected
    n_points = driver.execute_script("return document.querySelectorAll('#scatter circle.pt').length")
    assert n_points == len(expected)  # the scatter follows the filters
    _set(driver, "#filter-text", "ensemble")
    assert _rows(driver) == ["simple_ensemble"]
    _set(driver, "#filter-text", "")
    _click(driver, 'input[data-filter="family"][value="reference"]')
    _click(driver, 'input[data-filter="tier"][value="validation"]')
    assert sorted(_rows(driver)) == sorted(kinds)


@pytest.mark.parametrize("x", ["merge_time_s", "peak_rss_mb", "extra_parameters"])
def test_scatter_has_one_point_per_row_with_a_cost(page, x):
    driver, doc, _, _ = page
    _set(driver, "#scatter-x", x)
    points = driver.execute_script("return [...document.querySelectorAll('#scatter circle.pt')].map(c => c.dataset.method)")
    expected = [r["method"] for r in doc["rows"] if r["kind"] != "reference" and r.get(x) is not None
                and r["average"] is not None]
    assert sorted(points) == sorted(expected) and points
    refs = driver.execute_script("return [...document.querySelectorAll('#scatter line.ref')].map(c => c.dataset.method)")
    assert sorted(refs) == sorted(r["method"] for r in doc["rows"] if r["kind"] == "reference")
    ys = driver.execute_script("return [...document.querySelectorAll('#scatter circle.pt')].map(c => +c.getAttribute('cy'))")
    by_method = dict(zip(points, ys))  # a higher accuracy is drawn higher (smaller y)
    rows = sorted((r for r in doc["rows"] if r["method"] in by_method), key=lambda r: r["average"])
    assert all(by_method[a["method"]] >= by_method[b["method"]] for a, b in zip(rows, rows[1:]))
    _set(driver, "#scatter-x", "merge_time_s")


def test_per_task_bars_of_the_selected_rows(page):
    driver, doc, _, _ = page
    for m in ("task_arithmetic", "simple_average"):
        _click(driver, f'#lb-table tbody tr[data-method="{m}"]')
    bars = driver.execute_script("return [...document.querySelectorAll('#bars rect.bar')]"
                                 ".map(b => [b.dataset.method, b.dataset.task, +b.getAttribute('height')])")
    assert sorted({b[0] for b in bars}) == ["simple_average", "task_arithmetic"]
    assert len(bars) == 2 * (len(doc["tasks"]) + 1)  # every task and the average
    rows = {r["method"]: r for r in doc["rows"]}
    # heights are proportional to the accuracies
    h = {(m, t): v for m, t, v in bars}
    for m in ("task_arithmetic", "simple_average"):
        for t in doc["tasks"]:
            assert h[(m, t)] == pytest.approx(h[(m, "average")] * rows[m]["accuracy"][t] / rows[m]["average"], abs=0.05) \
                if rows[m]["average"] else True
    for m in ("task_arithmetic", "simple_average"):  # deselect
        _click(driver, f'#lb-table tbody tr[data-method="{m}"]')


def test_hydra_values_parse_back(page):
    """The builder's value quoting, read back by Hydra's own override parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    driver = page[0]
    values = ["auto", "bf16-mixed", "32", "cuda:0", "/tmp/a dir/x.safetensors", "it's", "back\\slash", "end\\",
              "a,b", "true", "null", "", "cost $5 `x`", 'say "hi"!', 0.25, -3, 1e-7, True, None, [1, "a b", None],
              {"k": 0.5, "j": "x y"}]
    parser = OverridesParser.create()
    for v in values:
        text = driver.execute_script("return window.fbWeb.hydraValue(arguments[0])", v)
        assert parser.parse_override(f"key={text}").value() == v, (v, text)
        arg = driver.execute_script("return window.fbWeb.shellQuote(arguments[0])", f"key={text}")
        assert shlex.split(arg) == [f"key={text}"]


_ALL_ARGS = """
const fam = document.getElementById('b-family'), out = {methods: {}, modelpools: {}, taskpools: {}};
document.getElementById('reset-cmd').click();
fam.value = ''; fam.dispatchEvent(new Event('change'));
const pick = (id, v) => { const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event('change')); };
const R = window.fbWeb.data.registry;
pick('b-modelpool', 'clip_zoo_tiny'); pick('b-taskpool', 'clip_zoo_tiny');
for (const m of R.methods) { pick('b-method', m.name); out.methods[m.name] = window.fbWeb.buildCommand({all: true}); }
pick('b-method', 'simple_average');
for (const p of R.modelpools) { pick('b-modelpool', p.name); pick('b-taskpool', 'clip_zoo_tiny');
  out.modelpools[p.name] = window.fbWeb.buildCommand({all: true}); }
pick('b-modelpool', 'clip_zoo_tiny');
for (const p of R.taskpools) { pick('b-taskpool', p.name); out.taskpools[p.name] = window.fbWeb.buildCommand({all: true}); }
document.getElementById('reset-cmd').click();
return out;
"""


def test_builder_writes_every_option_as_hydra_and_the_schemas_accept(page, registry):
    """Every option of every method, model pool and task pool (and the run's), written at its default by the
    builder: Hydra's parser reads back values that the config dataclass turns into its defaults; and one command
    per pool type and per option kind composes in Hydra (with '+' for keys the shipped YAML lacks) and passes the
    CLI's validation."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fusion_bench.cli import CONFIG_DIR, register_method_configs, validate_composed
    from fusion_bench.config_schema import build_config, to_plain
    from fusion_bench.methods import get_method_class
    from fusion_bench.modelpool.base import ModelPool
    from fusion_bench.modelpool.registry import get_modelpool_class
    from fusion_bench.programs.fusion import ProgramConfig
    from fusion_bench.taskpool.base import TASKPOOLS

    driver = page[0]
    built = driver.execute_script(_ALL_ARGS)
    parser = OverridesParser.create()

    def values(args, prefix):
        out = {}
        for a in args:
            o = parser.parse_override(a)
            key = o.key_or_group
            if key.startswith(prefix) and "." not in key[len(prefix):]:
                assert (a[0] == "+") == bool(o.is_add()) and not o.is_delete()
                out[key[len(prefix):]] = o.value()
        return out

    n = 0
    for name, run in built["methods"].items():
        assert run["args"][:2] == ["fusion_bench", f"method={name}"] and not run["errors"], (name, run["errors"])
        cls = get_method_class(name).config_class
        got = values(run["args"][4:], "method.")
        assert set(got) == {o["name"] for o in next(m for m in registry["methods"] if m["name"] == name)["options"]}
        assert to_plain(build_config(cls, got)) == to_plain(cls()), name  # the written defaults are the defaults
        n += len(got)
    prog = values(built["methods"]["simple_average"]["args"][4:], "")
    assert to_plain(build_config(ProgramConfig, prog)) == to_plain(build_config(ProgramConfig, {
        k: v for k, v in (yaml.safe_load((CONFIG_DIR / "fusion_bench.yaml").read_text())).items() if k in prog}))
    for group, cls_of in (("modelpool", lambda t: ModelPool if t in (None, "default") else get_modelpool_class(t)),
                          ("taskpool", lambda t: TASKPOOLS.get(t or "parameter_count"))):
        for name, run in built[group + "s"].items():
            assert not run["errors"], (group, name, run["errors"])
            shipped = yaml.safe_load((CONFIG_DIR / group / f"{name}.yaml").read_text())
            got = values(run["args"][4:], group + ".")
            cls = cls_of(shipped.get("type")).config_class
            ignore = ("name", "type")
            assert to_plain(build_config(cls, {**shipped, **got}, ignore=ignore)) == \
                to_plain(build_config(cls, shipped, ignore=ignore)), (group, name)
            n += len(got)
    assert n > 500

    # Hydra composes: one command per pool type, and methods until every option kind has been written
    picks, seen = [], set()
    for group in ("modelpool", "taskpool"):
        types = set()
        for p in registry[group + "s"]:
            if p["type"] not in types:
                types.add(p["type"])
                picks.append(built[group + "s"][p["name"]]["args"])
    for m in registry["methods"]:
        sig = {(o["kind"], o["nullable"], o["default"] is None) for o in m["options"]}
        if not sig <= seen:
            seen |= sig
            picks.append(built["methods"][m["name"]]["args"])
    register_method_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            for args in picks:
                validate_composed(compose(config_name="fusion_bench", overrides=args[1:]))
    finally:
        GlobalHydra.instance().clear()


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[0] == "fusion_bench"
    exe = Path(sys.executable).with_name("fusion_bench")
    exe = str(exe) if exe.exists() else shutil.which("fusion_bench")
    assert exe, "the fusion_bench command is installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([exe, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_command_builder_command_runs(page, tmp_path, capsys):
    driver, doc, root, path = page
    from selenium.webdriver.common.by import By

    # a row's cmd button: that method with the leaderboard's pools and test set
    _click(driver, '#lb-table tbody tr[data-method="ties_merging"] button.row-cmd')
    cmd = driver.find_element(By.ID, "cmd").text
    ties = next(r for r in doc["rows"] if r["method"] == "ties_merging")
    assert cmd.startswith("fusion_bench method=ties_merging modelpool=clip_zoo_tiny taskpool=clip_zoo_tiny")
    assert "taskpool.max_samples=20" in cmd
    from fusion_bench.methods import get_method_class

    lam = ties["hyperparameters"]["scaling_factor"]
    default = get_method_class("ties_merging").config_class().scaling_factor
    assert lam in TUNE_GRID
    assert (f"method.scaling_factor={lam:g}" in cmd) == (lam != default)  # only what differs from the default

    # a method chosen by hand, with options of the method, both pools and the run
    _click(driver, "#reset-cmd")
    _set(driver, "#b-family", "merging")
    _set(driver, "#b-method", "task_arithmetic")
    _set(driver, "#b-modelpool", "clip_zoo_tiny")
    _set(driver, "#b-taskpool", "clip_zoo_tiny")
    _set(driver, '[data-opt="method.scaling_factor"]', "abc")
    assert "method.scaling_factor=abc must be a number" in driver.find_element(By.ID, "b-errors").text
    _set(driver, '[data-opt="method.scaling_factor"]', "5000")
    assert "out of range" in driver.find_element(By.ID, "b-errors").text
    _set(driver, '[data-opt="method.scaling_factor"]', "0.25")
    assert driver.find_element(By.ID, "b-errors").text == ""
    report = tmp_path / "run dir" / "report.json"  # a space: the command must quote it
    for key, value in (("modelpool.root", str(root)), ("modelpool.build", "false"), ("taskpool.root", str(root)),
                       ("taskpool.build", "false"), ("taskpool.max_samples", "10"), ("report_path", str(report)),
                       ("seed", "3"), ("print_table", "false")):
        _set(driver, f'[data-opt="{key}"]', value)
    cmd = driver.find_element(By.ID, "cmd").text
    assert cmd.startswith("fusion_bench method=task_arithmetic modelpool=clip_zoo_tiny taskpool=clip_zoo_tiny ")
    assert "method.scaling_factor=0.25" in cmd and "seed=3" in cmd
    assert driver.execute_script("return window.fbWeb.buildCommand().command") == cmd

    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    rep = json.loads(report.read_text())
    assert rep["method"]["hyperparameters"]["scaling_factor"] == 0.25
    assert sorted(rep["evaluation"]["tasks"]) == sorted(doc["tasks"])
    assert rep["seed"] == 3

    # screenshot of the whole page (kept in pytest's temporary folder)
    shot = tmp_path / "web_leaderboard.png"
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(height + 40, 6000))
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep = os.environ.get("FUSION_BENCH_TEST_ARTIFACTS")  # pytest keeps only its last three temporary folders
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shot = Path(shutil.copy(shot, Path(keep) / shot.name))
        path = Path(shutil.copy(path, Path(keep) / "web_leaderboard.html"))
    with capsys.disabled():  # printed past pytest's capture, so that the path shows without -s
        print(f"\nweb leaderboard screenshot: {shot}\nweb leaderboard page: {path}\nbuilt command: {cmd}")
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors



def test_failed_jobs_and_hostile_text_show_as_text(page, registry, tmp_path):
    """Failed jobs are listed; names and errors that look like HTML or script stay text (nothing runs)."""
    driver, doc, _, path = page
    evil = "<img src=x onerror=\"window.__pwned=1\"></script><script>window.__pwned=2</script>"
    bad = json.loads(json.dumps(doc))
    bad["rows"][-1]["method"] = evil
    bad["rows"][-1]["data"] = evil
    bad["failed"] = [{"method": "regmean", "label": "regmean", "kind": "merging", "error": "boom " + evil}]
    bad["skipped"] = {"regmean": "failed on the zoo", "fisher_merging": evil}
    other = web.write_html(bad, tmp_path / "evil.html", registry)
    try:
        driver.get(other.as_uri())
        assert driver.execute_script("return document.body.getAttribute('data-ready')") == "1"
        assert driver.execute_script("return window.__pwned === undefined && document.querySelectorAll('img').length === 0"
                                     " && document.scripts.length === 2")
        assert _rows(driver)[-1] == evil
        failed = driver.execute_script("return [...document.querySelectorAll('#failed li')].map(li => li.textContent)")
        assert failed == ["regmean: boom " + evil]
        skipped = driver.execute_script("return [...document.querySelectorAll('#skipped li')].map(li => li.textContent)")
        assert skipped == [f"fisher_merging: {evil}"]  # a failed method is listed once, under the failures
        assert "1 failed job" in driver.find_element("id", "row-count").text
    finally:
        driver.get(path.as_uri())


def test_leaderboard_cli_writes_the_page(lb, tmp_path):
    """``fusion_bench leaderboard ... --web`` writes leaderboard.html beside the other outputs (here on --combine)."""
    from fusion_bench.benchmark.leaderboard import main as leaderboard_main

    _, doc, folder = lb
    assert leaderboard_main(["--combine", str(folder), "--out", str(tmp_path / "c"), "--web"]) == 0
    html = (tmp_path / "c" / "leaderboard.html").read_text()
    assert [r["method"] for r in _embedded(html)["leaderboard"]["rows"]] == [r["method"] for r in doc["rows"]]
    assert leaderboard_main(["--combine", str(folder), "--out", str(tmp_path / "d")]) == 0
    assert not (tmp_path / "d" / "leaderboard.html").exists()
