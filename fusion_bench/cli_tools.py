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
    from rich.markup import escape
    from rich.table import Table

    from fusion_bench.config_schema import describe
    from fusion_bench.methods import get_method_class, list_methods

    console = Console(width=max(120, Console().width))
    if argv:
        for name in argv:
            cls = get_method_class(name)
            # metadata is plain text: escape it, or Rich reads '[u_ij >= p]' as markup (and may fail on it)
            console.print(f"[bold]{escape(name)}[/bold] ({escape(cls.family)}): {escape(cls.summary)}\n"
                          f"  variant: {escape(cls.variant)}")
            t = Table("option", "type", "default", "help")
            for fname, tp, default, help_ in describe(cls.config_class):
                t.add_row(escape(fname), escape(tp), escape(repr(default)), escape(help_))
            console.print(t)
        return 0
    t = Table("method", "family", "needs base", "uses data", "summary")
    for name in list_methods():
        cls = get_method_class(name)
        t.add_row(escape(name), escape(cls.family), "yes" if cls.requires_pretrained else "no",
                  "yes" if cls.uses_data else "no", escape(cls.summary))
    console.print(t)
    return 0
