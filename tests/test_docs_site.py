"""The docs site (mkdocs.yml, fusion_bench/docsgen.py): `mkdocs build --strict` passes, and every registered method,
pool type and shipped pool config has its generated page, so a new one appears without edits here.

The build needs mkdocs-material (the `docs` extra); those tests skip with that reason when mkdocs is not importable.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fusion_bench import docsgen
from fusion_bench.config_schema import option, range_text
from fusion_bench.methods import base as methods_base
from fusion_bench.methods import get_method_class, list_methods
from fusion_bench.modelpool.registry import MODELPOOLS
from fusion_bench.taskpool.base import TASKPOOLS

ROOT = Path(__file__).resolve().parents[1]
HAVE_MKDOCS = importlib.util.find_spec("mkdocs") is not None and importlib.util.find_spec("material") is not None
needs_mkdocs = pytest.mark.skipif(not HAVE_MKDOCS, reason="mkdocs-material is not installed "
                                  "(pip install -e '.[docs]'); the docs site build is not tested")


def page_text(path: Path) -> str:
    """The visible text of a built page's article (tags dropped, entities decoded, whitespace collapsed)."""
    s = path.read_text(encoding="utf-8")
    s = s[s.find("<article"):s.find("</article>")]
    s = re.sub(r"</?(?:p|div|td|th|tr|li|ul|ol|pre|table|h[1-6]|br|hr|details|summary|blockquote)\b[^>]*>", " ", s)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", s)).split())


def option_cells(path: Path, anchor: str | None = None) -> set[str]:
    """The option names of a built page's options tables (the first cell of each row, as code); with ``anchor``,
    only in the section that starts at that heading id and ends at the next heading of its level."""
    s = path.read_text(encoding="utf-8")
    if anchor is not None:
        m = re.search(rf'<h([1-6]) id="{re.escape(anchor)}"', s)
        assert m, f"{path}: no heading #{anchor}"
        end = re.compile(rf"<h[1-{m.group(1)}][ >]").search(s, m.end())
        s = s[m.start():end.start() if end else len(s)]
    return set(re.findall(r"<tr>\s*<td><code>([A-Za-z_][A-Za-z0-9_]*)</code></td>", s))


def plain(s: str) -> str:
    return " ".join(str(s).split())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{log[-4000:]}"
    warnings = [ln for ln in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", ln)]
    assert not warnings, "\n".join(warnings)
    return out


@needs_mkdocs
def _shipped(names):
    """Registered names without those a test module registered in this process (the site is built in a fresh one)."""
    return [n for n in names if get_method_class(n).__module__.split(".")[0] != "tests"]


def test_every_method_has_a_page_with_its_options(site):
    names = _shipped(list_methods())
    assert len(names) > 20
    problems = []
    for name in names:
        cls = get_method_class(name)
        page = site / "methods" / name / "index.html"
        if not page.exists():
            problems.append(f"{name}: no page")
            continue
        text = page_text(page)
        cells = option_cells(page)
        if plain(cls.variant) not in text:
            problems.append(f"{name}: variant missing")
        if f"fusion_bench method={name}" not in text:
            problems.append(f"{name}: no command")
        if docsgen.data_tier(cls) not in text:
            problems.append(f"{name}: no data tier")
        for f in dataclasses.fields(cls.config_class):
            help_ = plain(f.metadata.get("help", "")).replace("`", "")
            if f.name not in cells or help_ not in text.replace("`", ""):
                problems.append(f"{name}: option {f.name} or its help missing")
            rng = range_text(f.metadata.get("range"))
            if rng and rng not in text:
                problems.append(f"{name}: range {rng} of {f.name} missing")
    assert not problems, problems
    overview = page_text(site / "methods" / "index.html")
    assert all(n in overview for n in names)


@needs_mkdocs
def test_pools_getting_started_and_leaderboards(site):
    mp = page_text(site / "modelpools" / "index.html")
    tp = page_text(site / "taskpools" / "index.html")
    for kind, reg, text in (("modelpool", MODELPOOLS, mp), ("taskpool", TASKPOOLS, tp)):
        for name in reg.names():
            if reg.get(name).__module__.split(".")[0] == "tests":
                continue  # registered by another test module in this process; the site is built in a fresh one
            assert f"{kind}.type: {name}" in text
            cells = option_cells(site / f"{kind}s" / "index.html", f"{kind}-type-{name.replace('_', '-')}")
            missing = [f.name for f in dataclasses.fields(reg.get(name).config_class) if f.name not in cells]
            assert not missing, (kind, name, missing)
    for group, text in (("modelpool", mp), ("taskpool", tp)):
        for yaml in (ROOT / "fusion_bench" / "config" / group).glob("*.yaml"):
            assert yaml.stem in text, f"shipped {group} config {yaml.stem} is not on its page"
    gs = page_text(site / "getting-started" / "index.html")
    assert ("apt-get install -y -qq dataset-fashion-mnist && pip install torch==2.13.0 && pip install -e . && fusion_bench"
            in gs)
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q -x' in gs
    lb = page_text(site / "leaderboards" / "index.html")
    assert "task_arithmetic" in lb and (site / "img" / "leaderboard_1.png").read_bytes()[:4] == b"\x89PNG"
    for page in ("concepts", "guarantees", "mergekit", "fusionbench", "benchmark", "text_benchmark"):
        assert (site / page / "index.html").exists(), page


def test_method_commands_are_valid_command_lines():
    """The command on each method page composes and validates (the CLI's own pre-flight: config groups exist,
    keys and types are right); commands with a `<your pool>` placeholder are only checked to name the method."""
    from fusion_bench.cli import preflight, register_method_configs

    register_method_configs()
    full, holes = docsgen.documented_commands(ROOT, with_placeholders=True)
    bad = []
    for name in _shipped(list_methods()):
        cmds, _ = docsgen.method_commands(name, ROOT, full, holes)
        assert docsgen.command_args(cmds[0]).get("method") == name
        if "<" in cmds[0]:
            continue
        try:
            preflight(shlex.split(cmds[0])[1:])
        except Exception as e:  # noqa: BLE001
            bad.append(f"{name}: {cmds[0]}: {type(e).__name__}: {e}")
    assert not bad, "\n".join(bad)


def test_a_new_method_gets_a_page_and_a_nav_entry():
    """A method registered now (as a user's would be) gets its page with its options, help and range, and a nav
    entry, with no edit anywhere else."""

    @dataclass
    class _Cfg(methods_base.TensorwiseConfig):
        strength: float = option(0.25, ge=0.0, lt=2.0, help="How much of the <mean> task vector | is added.")

    @methods_base.register_method
    class _DocsProbe(methods_base.TensorwiseMerge):
        name = "zz_docs_probe"
        config_class = _Cfg
        requires_pretrained = True
        summary = "A probe method for the docs test."
        variant = "theta = theta_0 + strength * mean_i tau_i (probe)"

        def merge_tensor(self, key, base, tensors, names):
            return base + self.config.strength * sum(t - base for t in tensors) / len(tensors)

    try:
        page = docsgen.method_page("zz_docs_probe", ROOT)
        assert "| `strength` |" in page and "`0.25`" in page and "\\[0, 2\\)" in page
        assert "How much of the &lt;mean&gt; task vector \\| is added." in page
        assert "fusion_bench method=zz_docs_probe modelpool=clip_zoo taskpool=clip_zoo" in page
        nav = docsgen.expand_nav([{"Home": "index.md"}, {"Methods": "methods/index.md"}])
        merging = [sec for sec in nav[1]["Methods"] if "Merging" in sec][0]["Merging"]
        assert {"zz_docs_probe": "methods/zz_docs_probe.md"} in merging
        assert "[`zz_docs_probe`](zz_docs_probe.md)" in docsgen.methods_index()
    finally:
        methods_base._REGISTRY.pop("zz_docs_probe", None)


def test_leaderboard_tables_parse_the_readme_table():
    """The leaderboards page finds the README's table and reads the averages the plot uses from the right column."""
    tables = docsgen.leaderboard_tables(docsgen.section(ROOT, "Leaderboard"))
    assert len(tables) == 1
    cap, table = tables[0]
    lines = table.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    doc = docsgen.leaderboard_doc(table, {"scale": "full"})
    assert len(doc["rows"]) == len(lines) - 2
    for line, row in zip(lines[2:], doc["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert row["method"] == cells[0]
        assert row["average"] == pytest.approx(float(cells[head.index("avg")]) / 100)


def test_markdown_escaping():
    assert docsgen.md_text("a|b <x> *y* [z](w)") == "a\\|b &lt;x&gt; \\*y\\* \\[z\\]\\(w\\)"
    assert docsgen.md_rich("see ``a|b`` and :class:`C` now") == "see `a\\|b` and `C` now"


def test_a_new_docs_page_joins_the_nav(tmp_path):
    """A Markdown page added under docs/ without a nav entry is listed under "More" by its title (the strict build
    would otherwise refuse it); pages already in the nav and the hook folder are not."""
    (tmp_path / "listed.md").write_text("# Listed\n")
    (tmp_path / "new_topic.md").write_text("intro\n\n# A new topic\n")
    (tmp_path / "_hooks").mkdir()
    (tmp_path / "_hooks" / "notes.md").write_text("# hidden\n")
    nav = docsgen.expand_nav([{"Listed": "listed.md"}], tmp_path)
    assert nav == [{"Listed": "listed.md"}, {"More": [{"A new topic": "new_topic.md"}]}]
    assert docsgen.expand_nav([{"Listed": "listed.md"}, {"Topic": "new_topic.md"}], tmp_path)[-1] == {"Topic": "new_topic.md"}
