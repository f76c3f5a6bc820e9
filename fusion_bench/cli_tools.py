"""Small CLI helpers (``fusion_bench methods``)."""

from __future__ import annotations


def methods_markdown() -> str:
    """The methods table of the README (``fusion_bench methods --markdown``)."""
    from fusion_bench.methods import get_method_class, list_methods

    rows = ["| method | family | needs base | uses data | variant |", "|---|---|---|---|---|"]
    for name in list_methods():
        cls = get_method_class(name)
        variant = " ".join(cls.variant.split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {cls.family} | {'yes' if cls.requires_pretrained else 'no'} | "
                    f"{'yes' if cls.uses_data else 'no'} | {variant} |")
    return "\n".join(rows)


def list_methods_main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        print(methods_markdown())
        return 0
    from rich.console import Console
    from rich.table import Table

    from fusion_bench.config_schema import describe
    from fusion_bench.methods import get_method_class, list_methods

    console = Console(width=max(120, Console().width))
    if argv:
        for name in argv:
            cls = get_method_class(name)
            console.print(f"[bold]{name}[/bold] ({cls.family}): {cls.summary}\n  variant: {cls.variant}")
            t = Table("option", "type", "default", "help")
            for fname, tp, default, help_ in describe(cls.config_class):
                t.add_row(fname, tp, repr(default), help_)
            console.print(t)
        return 0
    t = Table("method", "family", "needs base", "uses data", "summary")
    for name in list_methods():
        cls = get_method_class(name)
        t.add_row(name, cls.family, "yes" if cls.requires_pretrained else "no", "yes" if cls.uses_data else "no", cls.summary)
    console.print(t)
    return 0
