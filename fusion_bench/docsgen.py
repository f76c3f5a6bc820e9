"""Pages of the documentation site generated from the registries (``mkdocs build``; mkdocs.yml's hook).

Every registered method gets a page (its paper and variant, family, data tier, options with their type,
default, range and help from the typed config dataclass, and a command line), every registered model pool
and task pool type a section (its options) and every shipped pool config a row. The getting-started page,
the home page and the leaderboards are cut from the README and the benchmark documents, so the site never
restates what they say. Nothing here imports mkdocs: :func:`generated_pages` returns ``{path: text or
bytes}`` and :func:`expand_nav` fills mkdocs.yml's placeholders; the hook (``docs/_hooks/``) hands both to
mkdocs. A new method, pool or shipped config appears without edits.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: the groups of methods in the site: the family folders under fusion_bench/methods/, in this order, with their
#: titles (a method outside these folders is grouped under its ``family``; unknown groups come last, sorted)
GROUP_TITLES = {"merging": "Merging", "subspace": "Subspace and masks", "data": "Using training data",
                "test_time": "Test-time adaptation", "ensemble": "Ensembles", "mixing": "Mixing and upscaling",
                "continual": "Continual merging", "compression": "Compression", "training": "Training",
                "reference": "Reference"}
#: the shipped configs folder, relative to the repository root
CONFIG_DIR = Path("fusion_bench") / "config"
#: the placeholders of mkdocs.yml's nav that :func:`expand_nav` replaces
NAV_PLACEHOLDERS = ("methods/index.md",)


# ----------------------------------------------------------------------------------------------
# text helpers
# ----------------------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|])")


def md_text(s: Any) -> str:
    """``s`` as literal Markdown text on one line (safe in a table cell): Markdown's special characters
    escaped, ``<``/``>`` as entities, whitespace collapsed."""
    s = re.sub(r"\s+", " ", str(s))
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", s)


def md_rich(s: Any) -> str:
    r"""Like :func:`md_text`, but inline code written as ``\`\`x\`\```, ``\`x\``` or ``:role:\`x\``` (docstrings,
    help strings) stays code."""
    s = " ".join(str(s).split())
    out, pos = [], 0
    for m in re.finditer(r"(?::[a-z]+:)?``(.+?)``|(?::[a-z]+:)?`([^`]+)`", s):
        out.append(md_text(s[pos:m.start()]) + md_code(m.group(1) or m.group(2)))
        pos = m.end()
    out.append(md_text(s[pos:]))
    return "".join(out)


def md_code(s: Any) -> str:
    """``s`` as inline code, safe in a table cell (``|`` becomes ``\\|``, backticks are fenced around)."""
    s = " ".join(str(s).split()).replace("|", "\\|")
    fence = "``" if "`" in s else "`"
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def method_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Method names by group title (:data:`GROUP_TITLES`: the family folder, else the ``family``), in site order."""
    from fusion_bench.methods import get_method_class

    by: dict[str, list[str]] = {}
    for n in names:
        cls = get_method_class(n)
        by.setdefault(method_folder(cls) or cls.family, []).append(n)
    order = [g for g in GROUP_TITLES if g in by] + sorted(set(by) - set(GROUP_TITLES))
    return {GROUP_TITLES.get(g, g): sorted(by[g]) for g in order}


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
def method_folder(cls: type) -> str:
    """The family folder under ``fusion_bench/methods/`` that holds the method (``merging``, ``test_time``, ...)."""
    parts = cls.__module__.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["fusion_bench", "methods"] else ""


def data_tier(cls: type) -> str:
    """What data a method reads beyond the checkpoints, as one short phrase: ``data-free``, ``task training
    data``, ``unlabeled test inputs (test-time adaptation)``, ``calibration data``, ``labelled training data
    (trains models)``. A method class may state its own with a ``data_tier`` class attribute."""
    own = getattr(cls, "data_tier", None)
    if isinstance(own, str) and own:
        return own
    if not cls.uses_data:
        return "data-free"
    folder = method_folder(cls)
    if cls.family == "training" or folder == "training":
        return "labelled training data (trains models)"
    if folder == "test_time":
        return "unlabeled test inputs (test-time adaptation)"
    if cls.family == "mixing":
        return "unlabeled test inputs (trains routers)"
    if cls.family == "compression":
        return "calibration data"
    if folder == "data":
        return "task training data"
    return "task data"


def option_rows(config_class: type) -> list[dict[str, str]]:
    """One row per option of a config dataclass: name, type, default, range, choices, help. Built on
    :func:`fusion_bench.config_schema.describe` (the ``fusion_bench methods <name>`` table), with the range
    in its own column."""
    from fusion_bench.config_schema import describe, range_text

    fields = {f.name: f for f in dataclasses.fields(config_class)}
    rows = []
    for name, tp, default, help_ in describe(config_class):
        md = fields[name].metadata
        rng = range_text(md.get("range"))
        suffix = f" (range: {rng})"
        if rng and help_.endswith(suffix):
            help_ = help_[: -len(suffix)]
        choices = ", ".join(repr(c) for c in md.get("choices", ()))
        rows.append({"name": name, "type": tp, "default": "required" if default == "<required>" else repr(default),
                     "range": rng, "choices": choices, "help": help_})
    return rows


def options_table(config_class: type, prefix: str) -> str:
    """The options of a config dataclass as a Markdown table (option names without the ``prefix.``)."""
    rows = option_rows(config_class)
    if not rows:
        return "No options.\n"
    out = [f"| `{prefix}.` option | type | default | range / choices | help |", "|---|---|---|---|---|"]
    for r in rows:
        allowed = r["range"] or (f"one of {r['choices']}" if r["choices"] else "")
        out.append(f"| {md_code(r['name'])} | {md_code(r['type'])} | {md_code(r['default'])} | "
                   f"{md_text(allowed)} | {md_rich(r['help'])} |")
    return "\n".join(out) + "\n"


def _code_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks of a Markdown text."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def _command_lines(text: str) -> list[str]:
    """The ``fusion_bench ...`` command lines of a code block, continuation lines joined, comments cut."""
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in text.splitlines():
        line = re.split(r"\s#\s|\s{2,}#", line, maxsplit=1)[0].strip()
        for part in re.split(r"\s*(?:&&|;)\s*", line):
            if part.startswith("fusion_bench "):
                out.append(" ".join(part.split()))
    return out


def _shipped(group: str, root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / CONFIG_DIR / group).glob("*.yaml"))}


def documented_commands(root: Path, with_placeholders: bool = False) -> Any:
    """Every complete ``fusion_bench ...`` command of the README, docs/*.md (code blocks) and the first comment
    lines of the shipped pool configs, in that order. With ``with_placeholders``: (the complete ones, the ones
    with a ``<...>`` placeholder)."""
    texts = [(root / "README.md").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in sorted((root / "docs").glob("*.md"))]
    cmds = [c for t in texts for block in _code_blocks(t) for c in _command_lines(block)]
    for group in ("modelpool", "taskpool"):
        for p in _shipped(group, root).values():
            first = p.read_text(encoding="utf-8").splitlines()[:1]
            if first and first[0].startswith("# fusion_bench "):
                cmds.append(" ".join(re.split(r"\s{2,}\(", first[0][2:], maxsplit=1)[0].split()))
    seen: set[str] = set()
    full, holes = [], []
    for c in cmds:
        if c in seen or re.search(r"\.\.\.|\$|ZOO_DIR", c):
            continue
        seen.add(c)
        (holes if "<" in c else full).append(c)
    return (full, holes) if with_placeholders else full


def command_args(cmd: str) -> dict[str, str]:
    """``key=value`` arguments of a command line (shell-split; ``'~taskpool'`` gives ``{'~taskpool': ''}``)."""
    try:
        words = shlex.split(cmd)
    except ValueError:
        words = cmd.split()
    out = {}
    for w in words[1:]:
        k, _, v = w.partition("=")
        out[k] = v
    return out


def _offline_rank(args: dict[str, str]) -> int:
    pool = args.get("modelpool", "")
    if pool == "clip_zoo" and args.get("taskpool") == "clip_zoo":
        return 0
    if pool.startswith(("clip_zoo", "text_zoo", "tiny_lm")):
        return 1
    return 2


def _fallback_command(cls: type) -> tuple[str, str | None]:
    """A command for a method no document gives one for: the offline CLIP zoo (continual: with the continual
    program), the tiny language models of the README for compression, a causal-LM pool for the other mixing
    methods; for the zoo, the reason the method does not apply there with its defaults (else None)."""
    name = cls.name
    if cls.family == "compression":
        return (f"fusion_bench method={name} modelpool=tiny_lm_merged taskpool=causal_lm_perplexity "
                f"merged_model_path=outputs/tiny_lm_{name}",
                "`tiny_lm_merged` is the tiny merged Llama that the README's offline language-model example writes "
                "(see Getting started); use your own causal-LM pool for real models"
                + (", a mixture-of-experts one (Mixtral, Qwen2-MoE) for this method." if name.startswith("expert_")
                   else "."))
    if cls.family == "mixing":
        return (f"fusion_bench method={name} modelpool=causal_lm_merge '~taskpool' evaluate=false "
                f"merged_model_path=outputs/{name}",
                "Put your base model and fine-tunes in the `causal_lm_merge` pool (see Model pools).")
    cmd = f"fusion_bench method={name} modelpool=clip_zoo taskpool=clip_zoo"
    if cls.family == "continual":
        cmd += " program=continual"
    note = None
    try:
        from fusion_bench.benchmark.leaderboard import applicability
        from fusion_bench.benchmark.tasks import TASK_NAMES

        names = list(TASK_NAMES)
        note = applicability(cls, names, True)
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        # a method for one or two models of the pool: name them, and check that this applies
        for key, value, text in (("models", names[:2], f"'method.models=[{','.join(names[:2])}]'"),
                                 ("model", names[0], f"method.model={names[0]}")):
            if note and f"method.{key}=" in note and key in fields:
                cls(**{key: value}).check_pool(names, True)
                cmd += " " + text
                note = None
    except Exception as e:  # noqa: BLE001 (a note on the page, never a failed build)
        note = note or f"(could not check the zoo: {type(e).__name__}: {e})"
    if note:
        note = "On the offline CLIP zoo with the default options: " + note
    return cmd, note


def method_commands(name: str, root: Path, documented: list[str] | None = None,
                    placeholders: list[str] | None = None) -> tuple[list[str], str | None]:
    """Command lines that run method ``name``, best first, and a note on the first (or None): the documented
    ones (README, docs, shipped configs) that name a model pool and a task pool (or drop it with
    ``'~taskpool'``), offline benchmark first, then those with a placeholder pool (``<your pool>``); when none is
    documented, :func:`_fallback_command`."""
    from fusion_bench.methods import get_method_class

    if documented is None:
        documented, placeholders = documented_commands(root, with_placeholders=True)
    found = []
    for i, c in enumerate(documented + (placeholders or [])):
        a = command_args(c)
        if a.get("method") == name and "modelpool" in a and ("taskpool" in a or "~taskpool" in a):
            rank = _offline_rank(a) if i < len(documented) else 3
            found.append((rank, i, c))
    cls = get_method_class(name)
    if found and min(found)[0] > 0 and cls.family not in ("compression", "mixing"):
        cmd, note = _fallback_command(cls)
        if note is None:  # the offline benchmark's pools apply: they come first
            found.append((0.5, -1, cmd))
    if found:
        cmds = [c for _, _, c in sorted(found)]
        note = "Replace the `<...>` placeholders with your pools." if "<" in cmds[0] else None
        return cmds, note
    cmd, note = _fallback_command(cls)
    return [cmd], note


def doc_title(path: Path) -> str:
    """The first ``# `` heading of a Markdown file (its file name when it has none)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.name


def mentioned_in(name: str, root: Path) -> list[str]:
    """docs/*.md pages that name the method (as inline code or ``method=name``)."""
    pat = re.compile(rf"`{re.escape(name)}`|method={re.escape(name)}\b")
    return [p.name for p in sorted((root / "docs").glob("*.md")) if pat.search(p.read_text(encoding="utf-8"))]


def method_page(name: str, root: Path, documented: tuple[list[str], list[str]] | None = None) -> str:
    """The page of one registered method (Markdown)."""
    from fusion_bench.methods import get_method_class

    cls = get_method_class(name)
    folder = method_folder(cls)
    src = cls.__module__.replace(".", "/") + ".py"
    full, holes = documented if documented is not None else documented_commands(root, with_placeholders=True)
    cmds, note = method_commands(name, root, full, holes)
    out = [f"# `{name}`", ""]
    if cls.summary:
        out += [md_rich(cls.summary), ""]
    out += [f"- **family**: {md_text(cls.family)}" + (f" (folder {md_code('methods/' + folder)})" if folder else ""),
            f"- **data tier**: {md_text(data_tier(cls))}",
            f"- **needs the base model** (`_pretrained_`): {'yes' if cls.requires_pretrained else 'no'}",
            f"- **deterministic**: {'yes' if cls.deterministic else 'no (seeded by `seed=`)'}",
            f"- **class**: {md_code(cls.__module__ + '.' + cls.__qualname__)} in {md_code(src)}", "",
            "## Paper and variant", "", md_rich(cls.variant), "",
            "## Options", "",
            f"Set on the command line as `method.<option>=<value>`; `fusion_bench methods {name}` prints the same "
            "table. A value of the wrong type, outside its range, NaN or inf is refused before any work starts.", "",
            options_table(cls.config_class, "method"),
            "## Run it", "", "```bash", cmds[0], "```", ""]
    if note:
        out += [f"!!! note\n    {md_rich(note)}", ""]
    if any("modelpool=clip_zoo " in c + " " for c in cmds[:1]):
        out += ["`modelpool=clip_zoo_tiny taskpool=clip_zoo_tiny` runs the same in seconds on the scaled-down zoo "
                "(a smoke test, not a benchmark). Add `dry_run=true` to validate the config and the checkpoints "
                "only.", ""]
    if len(cmds) > 1:
        out += ["Other documented command lines:", "", "```bash", *cmds[1:6], "```", ""]
    docs = mentioned_in(name, root)
    if docs:
        out += ["## Discussed in", ""] + [f"- [{md_text(doc_title(root / 'docs' / d))}](../{d})" for d in docs] + [""]
    return "\n".join(out)


def methods_index() -> str:
    """The methods overview: the README's table (:func:`fusion_bench.cli_tools.methods_markdown`) with each
    name linked to its page, and the families."""
    from fusion_bench.cli_tools import methods_markdown
    from fusion_bench.methods import get_method_class, list_methods

    names = list_methods()
    table = methods_markdown()
    for n in names:
        table = table.replace(f"| `{n}` |", f"| [`{n}`]({n}.md) |", 1)
    fams = method_groups(names)
    out = ["# Methods", "",
           f"{len(names)} registered methods, each on its own page generated from the method registry: the paper "
           "and the exact variant implemented, the options with their types, defaults, ranges and help (from the "
           "method's typed config dataclass), the data it reads and a command line that runs it. "
           "`fusion_bench methods` prints the same list.", "",
           "Data tiers: " + "; ".join(sorted({f"**{data_tier(get_method_class(n))}**" for n in names})) + ".", "",
           "| group | methods |", "|---|---|"]
    for f, ns in fams.items():
        out.append(f"| {f} | " + ", ".join(f"[`{n}`]({n}.md)" for n in ns) + " |")
    out += ["", "## All methods", "", table, ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# pools
# ----------------------------------------------------------------------------------------------
def _doc_first_paragraph(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""


def _yaml_type(path: Path) -> str | None:
    m = re.search(r"^type:\s*([A-Za-z0-9_.\-]+)", path.read_text(encoding="utf-8"), flags=re.M)
    return m.group(1) if m else None


def _yaml_comments(path: Path) -> tuple[str, str]:
    """(the command of the first comment line, the description: the command's note in parentheses and the
    next comment lines)."""
    cmd, desc = "", []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if i == 0 and text.startswith("fusion_bench "):
            cmd, _, note = text.partition("  ")
            note = note.strip()
            if note.startswith("(") and note.endswith(")"):
                note = note[1:-1].strip()
                desc.append(note[:1].upper() + note[1:] + ".")
        elif text.startswith("fusion_bench ") or ":" in text.split(" ")[0]:
            break
        else:
            desc.append(text)
    return cmd, " ".join(desc)


def pools_page(kind: str, root: Path) -> str:
    """The page of the model pools (``kind='modelpool'``) or task pools (``'taskpool'``): the registered types
    with their options, then every shipped config of the group."""
    if kind == "modelpool":
        from fusion_bench.modelpool.base import ModelPool
        from fusion_bench.modelpool.registry import MODELPOOLS as reg

        title, base = "Model pools", ModelPool
        intro = ("A model pool names the checkpoints to fuse; `_pretrained_` is the base model. Nothing is loaded "
                 "until a method asks. Choose a shipped pool with `modelpool=<name>`, or write your own YAML and "
                 "pass `--config-dir`. `modelpool.type` picks a specialised class below; without it the generic "
                 "pool loads any checkpoint.")
    else:
        from fusion_bench.taskpool.base import TASKPOOLS as reg

        title, base = "Task pools", None
        intro = ("A task pool evaluates the fused model: per-task metrics and their averages. Choose a shipped pool "
                 "with `taskpool=<name>` (or drop evaluation with `'~taskpool' evaluate=false`); "
                 "`taskpool.type` picks the evaluator class below.")
    shipped = _shipped(kind, root)
    types_of = {n: _yaml_type(p) for n, p in shipped.items()}
    other = "taskpool" if kind == "modelpool" else "modelpool"
    out = [f"# {title}", "", intro, "", "## Shipped configs", "",
           f"The `{other}` column names the {other} that the config's first comment line (the command that uses "
           "it) pairs it with.", "",
           f"| `{kind}=` | type | description | `{other}=` |", "|---|---|---|---|"]
    for n, p in shipped.items():
        cmd, desc = _yaml_comments(p)
        args = command_args(cmd) if cmd else {}
        pair = md_code(args[other]) if args.get(other) else ("none (`'~taskpool'`)" if f"~{other}" in args else "")
        t = types_of[n]
        tcell = f"[{t}](#{kind}-type-{t.replace('_', '-')})" if t in reg.names() else (md_code(t) if t else "generic")
        out.append(f"| {md_code(n)} | {tcell} | {md_rich(desc)} | {pair} |")
    out += ["", "## Types and their options", ""]
    entries: list[tuple[str, type]] = ([("generic", base)] if base is not None else []) + [(n, reg.get(n)) for n in reg.names()]
    for n, cls in entries:
        anchor = f"{kind}-type-{n.replace('_', '-')}"
        used = [s for s, t in types_of.items() if t == n or (n == "generic" and t is None)]
        out += [f"### `{n}` {{ #{anchor} }}", ""]
        out += [f"`{kind}.type: {n}`" if n != "generic" else f"No `{kind}.type`.",
                f"Class {md_code(cls.__module__ + '.' + cls.__qualname__)}.", ""]
        doc = _doc_first_paragraph(cls)
        if doc:
            out += [md_rich(doc), ""]
        if used:
            out += ["Shipped configs: " + ", ".join(md_code(s) for s in used) + ".", ""]
        out += [options_table(cls.config_class, kind), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# README sections and leaderboards
# ----------------------------------------------------------------------------------------------
def readme_sections(root: Path) -> dict[str, str]:
    """The README's ``## `` sections by title (their text without the title line); ``""`` is the intro."""
    text = (root / "README.md").read_text(encoding="utf-8")
    parts = re.split(r"^## (.+)\n", text, flags=re.M)
    out = {"": parts[0].split("\n", 1)[1] if parts[0].startswith("# ") else parts[0]}
    for title, body in zip(parts[1::2], parts[2::2]):
        out[title.strip()] = body
    return out


def rebase_links(md: str) -> str:
    """The README's links into ``docs/`` made relative to a page at the site's root."""
    return re.sub(r"\]\(docs/", "](", md)


def section(root: Path, prefix: str) -> str:
    """The README section whose title starts with ``prefix``, its links made relative to the site."""
    for title, body in readme_sections(root).items():
        if title.startswith(prefix):
            return rebase_links(body).strip() + "\n"
    raise KeyError(f"README.md has no section starting with '## {prefix}'")


def leaderboard_tables(md: str) -> list[tuple[str, str]]:
    """(caption, table) for every leaderboard table of a Markdown text (a table whose header starts with
    ``| method | kind |`` and has ``avg``, ``merge s`` and ``peak MB``); the caption is the paragraph before it."""
    lines = md.splitlines()
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        head = [c.strip() for c in line.strip().strip("|").split("|")]
        if head[:2] == ["method", "kind"] and {"avg", "merge s", "peak MB"} <= set(head):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            cap = []
            while k >= 0 and lines[k].strip() and not lines[k].startswith(("```", "#", "|")):
                cap.insert(0, lines[k])
                k -= 1
            out.append((" ".join(" ".join(cap).split()), "\n".join(lines[i:j])))
            i = j
        else:
            i += 1
    return out


def _num(cell: str) -> float | None:
    try:
        return float(cell.strip())
    except ValueError:
        return None


def leaderboard_doc(table: str, zoo: dict[str, Any]) -> dict[str, Any]:
    """A leaderboard document (the subset :func:`fusion_bench.benchmark.leaderboard.plot` reads) from a
    leaderboard Markdown table."""
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table.splitlines()]
    head, body = rows[0], rows[2:]
    col = {h: i for i, h in enumerate(head)}
    doc_rows = []
    for r in body:
        avg = _num(r[col["avg"]])
        doc_rows.append({"method": r[0], "kind": r[1], "average": None if avg is None else avg / 100,
                         "merge_time_s": _num(r[col["merge s"]]), "peak_rss_mb": _num(r[col["peak MB"]])})
    return {"rows": doc_rows, "zoo": zoo}


def leaderboard_png(table: str, zoo: dict[str, Any]) -> bytes:
    """The leaderboard's accuracy-against-cost plot (:func:`fusion_bench.benchmark.leaderboard.plot`) as PNG bytes."""
    from fusion_bench.benchmark.leaderboard import plot

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "plot.png"
        plot(leaderboard_doc(table, zoo), path)
        return path.read_bytes()


def leaderboards(root: Path, plots: bool = True) -> tuple[str, dict[str, bytes]]:
    """The leaderboards page (the README's CLIP-zoo table and the text benchmark's tables, each with its
    accuracy-against-cost plot) and the plots ``{path: png}``."""
    sources = [("Offline CLIP zoo", "benchmark.md", {"scale": "full"},
                leaderboard_tables(section(root, "Leaderboard")))]
    text_md = root / "docs" / "text_benchmark.md"
    if text_md.exists():
        for cap, tab in leaderboard_tables(text_md.read_text(encoding="utf-8")):
            variant = "lora" if "lora" in cap.lower() else "full"
            sources.append((f"MiniLM text zoo ({'LoRA' if variant == 'lora' else 'full fine-tuning'})",
                            "text_benchmark.md", {"scale": "full", "track": "text", "variant": variant},
                            [(cap, tab)]))
    out = ["# Leaderboards", "",
           "The current leaderboards of the offline benchmarks, copied at build time from the README and "
           "[text_benchmark.md](text_benchmark.md), each with its plot of average accuracy against merge time and "
           "peak memory (the `leaderboard.png` that `fusion_bench leaderboard` writes, redrawn from the table). "
           "Rows marked (λ=...) had their `scaling_factor` chosen on the validation split.", ""]
    images: dict[str, bytes] = {}
    n = 0
    for title, page, zoo, tables in sources:
        for cap, tab in tables:
            n += 1
            slug = f"leaderboard_{n}.png"
            out += [f"## {title}", "", f"From [{page}]({page}). " + cap, ""]
            if plots:
                images[f"img/{slug}"] = leaderboard_png(tab, zoo)
                out += [f"![{title}: average accuracy against merge time and peak memory](img/{slug})", ""]
            out += [tab, ""]
    return "\n".join(out), images


# ----------------------------------------------------------------------------------------------
# the site
# ----------------------------------------------------------------------------------------------
def home_page(root: Path) -> str:
    from fusion_bench.methods import list_methods

    return "\n".join([
        "# fusion_bench", "", rebase_links(readme_sections(root)[""]).strip(), "",
        "## Where to go", "",
        "- [Getting started](getting-started.md): install, the two commands (main job and tests), everyday use.",
        "- [Concepts](concepts.md): the flow (model pool → method → task pool → report) and the layers.",
        f"- [Methods](methods/index.md): all {len(list_methods())} registered methods, one page each.",
        "- [Model pools](modelpools.md) and [task pools](taskpools.md).",
        "- [Leaderboards](leaderboards.md) and the [offline CLIP benchmark](benchmark.md).",
        "- [Guarantees](guarantees.md), [mergekit](mergekit.md) and [FusionBench](fusionbench.md) compatibility.",
        ""])


def getting_started(root: Path) -> str:
    return "\n".join([
        "# Getting started", "",
        "## The two commands", "", section(root, "The two commands"),
        "## Using it", "", section(root, "Using it"),
        "## Large models, mergekit configs, benchmarks", "", section(root, "Large models"), ""])


def writing_a_method(root: Path) -> str:
    return "\n".join(["# Writing a new method", "", section(root, "Writing a new method"),
                      "## Layout", "", section(root, "Layout"), ""])


def generated_pages(root: str | Path, plots: bool = True) -> dict[str, str | bytes]:
    """Every generated page and image of the site, ``{path under docs: Markdown text or PNG bytes}``."""
    from fusion_bench.methods import list_methods

    root = Path(root)
    documented = documented_commands(root, with_placeholders=True)
    pages: dict[str, str | bytes] = {
        "index.md": home_page(root),
        "getting-started.md": getting_started(root),
        "writing-a-method.md": writing_a_method(root),
        "methods/index.md": methods_index(),
        "modelpools.md": pools_page("modelpool", root),
        "taskpools.md": pools_page("taskpool", root),
    }
    for n in list_methods():
        pages[f"methods/{n}.md"] = method_page(n, root, documented)
    lb, images = leaderboards(root, plots=plots)
    pages["leaderboards.md"] = lb
    pages.update(images)
    return pages


def _nav_paths(items: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(items, list):
        for it in items:
            out |= _nav_paths(it)
    elif isinstance(items, dict):
        for v in items.values():
            out |= _nav_paths(v)
    elif isinstance(items, str):
        out.add(items)
    return out


def expand_nav(nav: list[Any], docs_dir: str | Path | None = None) -> list[Any]:
    """mkdocs.yml's nav with the entry ``methods/index.md`` replaced by the overview and one section per
    method group (:func:`method_groups`; one page per registered method). With ``docs_dir``, its Markdown files
    that the nav does not list (a page added later) are appended under "More", named by their titles, so that
    a new page is in the navigation without an edit of mkdocs.yml."""
    from fusion_bench.methods import list_methods

    def walk(items: list[Any]) -> list[Any]:
        out = []
        for it in items:
            if isinstance(it, dict) and len(it) == 1:
                (title, val), = it.items()
                if val == "methods/index.md":
                    fams = method_groups(list_methods())
                    val = [{"Overview": "methods/index.md"}] + [
                        {f: [{n: f"methods/{n}.md"} for n in ns]} for f, ns in fams.items()]
                elif isinstance(val, list):
                    val = walk(val)
                out.append({title: val})
            else:
                out.append(it)
        return out

    nav = walk(list(nav))
    if docs_dir is not None:
        listed = _nav_paths(nav)
        d = Path(docs_dir)
        extra = [p.relative_to(d).as_posix() for p in sorted(d.rglob("*.md"))
                 if not any(part.startswith(("_", ".")) for part in p.relative_to(d).parts)]
        extra = [e for e in extra if e not in listed]
        if extra:
            nav.append({"More": [{doc_title(d / e): e} for e in extra]})
    return nav


__all__ = ["data_tier", "documented_commands", "expand_nav", "generated_pages", "leaderboard_tables", "md_text",
           "method_commands", "method_page", "methods_index", "option_rows", "pools_page"]
