"""``--help`` that reads at any width and in a pipe: full flag names, a metavar only where a value is taken.

typer's rich help lays every panel out as one table and lets rich squeeze it: at 80 columns flag names end
in "…", every switch shows "<bool>" as if it took a value, and a text default reads "[default: (auto)]".
This layout keeps typer's look (usage, description, one panel per ``rich_help_panel``, a commands panel)
but only ever wraps help text: a name never shrinks, and one too long for its column gets a line of its own
with its help beneath. ``use_for(app)`` installs it on every command of an app.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import typer
from rich.console import Console, Group
from rich.errors import MarkupError
from rich.padding import Padding
from rich.panel import Panel
from rich.text import Text
from typer.core import TyperCommand, TyperGroup
from typer.models import DefaultPlaceholder

ARGUMENTS = "Arguments"
OPTIONS = "Options"
COMMANDS = "Commands"

PANEL_EDGES = 4  # a panel's two borders and its padding of one column on each side
GAP = 2  # between a name and its help
UNDER_INDENT = 4  # help under its name (too narrow for two columns) is indented this much
MIN_HELP_WIDTH = 24  # a help column narrower than this reads worse than help under its name

# Recent typer (with its own copy of click) names a value after its Python type ("<int>", "<int range>"),
# click in its own words ("INTEGER", "INTEGER RANGE"); help shows click's words, and the range as a note.
_TYPE_WORDS = {
    "str": "TEXT",
    "int": "INTEGER",
    "float": "FLOAT",
    "bool": "BOOLEAN",
    "path": "PATH",
    "int range": "INTEGER",
    "float range": "FLOAT",
    "integer range": "INTEGER",
}

_STYLE_LONG = "bold cyan"
_STYLE_SHORT = "bold green"
_STYLE_NEGATIVE = "bold magenta"
_STYLE_METAVAR = "bold yellow"
_STYLE_NOTE = "dim"


@dataclass
class Row:
    """One entry of a panel before layout: what to type, what it does, and its bracketed notes."""

    name: Text
    help: Text
    notes: list[str] = field(default_factory=list)  # "[default: auto]", "[required]", ...


class HelpCommand(TyperCommand):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        print_help(self, ctx)


class HelpGroup(TyperGroup):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        print_help(self, ctx)


def use_for(app: typer.Typer) -> None:
    """Give `app`, its sub-apps and all their commands this help (those that chose a class keep it).

    Call once the app is assembled: typer builds the click commands from these records on each run.
    """
    if _unset(app.info.cls):
        app.info.cls = HelpGroup
    for group in app.registered_groups:
        if group.typer_instance is not None:
            use_for(group.typer_instance)
    for command in app.registered_commands:
        if _unset(command.cls):
            command.cls = HelpCommand


def _unset(cls: Any) -> bool:
    # typer records "no class chosen" as None, as a DefaultPlaceholder, or as its own default class
    return cls is None or isinstance(cls, DefaultPlaceholder) or cls in (TyperCommand, TyperGroup)


def print_help(command: Any, ctx: Any, console: Console | None = None) -> None:
    """Usage, description, then the panels, to stdout (as typer's own help does)."""
    console = console or Console(highlight=False)
    markup = getattr(command, "rich_markup_mode", None) == "rich"
    usage = Text("Usage: ", style="yellow")
    # click wraps the usage at its own idea of the width; rich wraps it again at ours
    usage.append(" ".join(command.get_usage(ctx).removeprefix("Usage: ").split()), style="bold")
    console.print(Padding(usage, (1, 1)))
    description = _description(command, markup)
    if description is not None:
        console.print(Padding(description, (0, 1, 1, 1)))

    inner = console.width - PANEL_EDGES
    panels = _parameter_panels(command, ctx, markup)
    column = _name_column([row for rows in panels.values() for row in rows], inner)
    for title, rows in panels.items():
        _print_panel(console, title, rows, column, inner)
    if hasattr(command, "list_commands"):
        panels = _command_panels(command, ctx, markup)
        column = _name_column([row for rows in panels.values() for row in rows], inner)
        for title, rows in panels.items():
            _print_panel(console, title, rows, column, inner)
    if command.epilog:
        console.print(Padding(_rich_text("\n\n".join(_paragraphs(command.epilog)), markup), 1))


# ---- what goes in the panels


def _parameter_panels(command: Any, ctx: Any, markup: bool) -> dict[str, list[Row]]:
    """Panel title -> rows: arguments first, then the plain options, then each named panel as first met."""
    arguments: dict[str, list[Row]] = {ARGUMENTS: []}
    options: dict[str, list[Row]] = {OPTIONS: []}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        is_argument = param.param_type_name == "argument"
        panels, default = (arguments, ARGUMENTS) if is_argument else (options, OPTIONS)
        title = _panel_title(param, default)
        name = _argument_name(param) if is_argument else _option_name(param, ctx)
        help = _rich_text("\n".join(_paragraphs(getattr(param, "help", None) or "")), markup)
        panels.setdefault(title, []).append(Row(name, help, _notes(param, ctx)))
    return {title: rows for title, rows in (arguments | options).items() if rows}


def _command_panels(group: Any, ctx: Any, markup: bool) -> dict[str, list[Row]]:
    panels: dict[str, list[Row]] = {COMMANDS: []}
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        summary = _paragraphs(command.short_help or command.help or "")
        row = Row(Text(name, style=_STYLE_LONG), _rich_text(summary[0] if summary else "", markup))
        if command.deprecated:
            row.notes.append("(deprecated)")
        panels.setdefault(_panel_title(command, COMMANDS), []).append(row)
    return {title: rows for title, rows in panels.items() if rows}


def _panel_title(item: Any, default: str) -> str:
    title = getattr(item, "rich_help_panel", None)  # typer leaves a DefaultPlaceholder where none was given
    return title if isinstance(title, str) and title else default


def _option_name(param: Any, ctx: Any) -> Text:
    """``--model, -m TEXT``, ``--dummy-weights / --no-dummy-weights``, ``--help, -h``."""
    longs = [opt for opt in param.opts if opt.startswith("--")]
    shorts = [opt for opt in param.opts if not opt.startswith("--")]
    name = Text(", ").join(
        [Text(o, style=_STYLE_LONG) for o in longs] + [Text(o, style=_STYLE_SHORT) for o in shorts]
    )
    if param.secondary_opts:
        name.append(" / ")
        name.append_text(Text(", ").join(Text(o, style=_STYLE_NEGATIVE) for o in param.secondary_opts))
    metavar = _metavar(param, ctx)
    if metavar:
        name.append(" ")
        name.append(metavar, style=_STYLE_METAVAR)
    return name


def _argument_name(param: Any) -> Text:
    name = param.metavar or param.name.upper()
    return Text(name + ("..." if param.nargs != 1 else ""), style=_STYLE_LONG)


def _metavar(param: Any, ctx: Any) -> str | None:
    """What the option's value looks like (``INTEGER``, ``auto|fa2|fa3``); None for a switch."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    if param.metavar:
        return param.metavar
    if hasattr(param, "display_type_rich"):  # recent typer: "<int>", "<auto|fa2|fa3>", "<list[str]>"
        label = param.display_type_rich(ctx) or ""
        many = label.endswith("...")
        label = label.removesuffix("...").removeprefix("<").removesuffix(">")
        label = re.sub(r"^list\[(.*)\]$", r"\1", label)  # a repeatable option takes one value each time
    else:  # typer over click: "INTEGER", "[auto|fa2|fa3]", "TEXT..."
        try:
            label = param.make_metavar(ctx)
        except TypeError:  # click < 8.2 takes no context
            label = param.make_metavar()
        many = label.endswith("...")
        label = label.removesuffix("...").removeprefix("[").removesuffix("]")
    if not label:
        return None
    if "|" not in label:  # choices are shown as they are typed; type names in click's words ("int,int")
        label = ",".join(_TYPE_WORDS.get(part.lower(), part.upper()) for part in label.split(","))
    return label + ("..." if many else "")


def _notes(param: Any, ctx: Any) -> list[str]:
    notes = []
    envvar = getattr(param, "envvar", None)
    if envvar and getattr(param, "show_envvar", False):
        notes.append(f"[env var: {envvar if isinstance(envvar, str) else ', '.join(envvar)}]")
    default = _default(param, ctx)
    if default is not None:
        notes.append(f"[default: {default}]")
    value_range = _range(param)
    if value_range:
        notes.append(f"[{value_range}]")
    if param.required:
        notes.append("[required]")
    return notes


def _default(param: Any, ctx: Any) -> str | None:
    """The default as the user would type it; None where there is none worth showing."""
    shown = getattr(param, "show_default", None)
    if isinstance(shown, str):  # already the text to show (options.py: a built-in default, not the real one)
        return shown or None
    if not (shown or ctx.show_default):
        return None
    value = param.default
    if value is None or callable(value):
        return None
    if getattr(param, "is_flag", False):
        if not param.secondary_opts:
            return None  # a switch is off unless given
        return (param.opts if value else param.secondary_opts)[0].lstrip("-")
    values = value if isinstance(value, (list, tuple)) else [value]
    text = ", ".join(str(v.value if isinstance(v, Enum) else v) for v in values)
    return text or None


def _range(param: Any) -> str | None:
    """``x>=1``, in the installed typer's or click's own words."""
    describe = getattr(param, "_get_number_range_help_str", None)  # recent typer
    if describe is not None:
        return describe()
    describe = getattr(getattr(param, "type", None), "_describe_range", None)  # click's IntRange, FloatRange
    return describe() if describe is not None else None


def _description(command: Any, markup: bool) -> Text | None:
    """The first paragraph, then the rest dim, each reflowed to the width."""
    paragraphs = _paragraphs(command.help or "")
    if not paragraphs:
        return None
    text = Text()
    if command.deprecated:
        text.append("(deprecated) ", style="red")
    text.append_text(_rich_text(paragraphs[0], markup))
    for paragraph in paragraphs[1:]:
        text.append("\n\n")
        text.append_text(_rich_text(paragraph, markup, style="dim"))
    return text


def _paragraphs(text: str) -> list[str]:
    """Docstring paragraphs with their single line breaks joined (source line lengths are not the
    terminal's); a paragraph that starts with click's \\b marker keeps its lines."""
    text = inspect.cleandoc(text).partition("\f")[0]
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return [
        p.removeprefix("\b").strip("\n") if p.startswith("\b") else " ".join(p.split()) for p in paragraphs
    ]


def _rich_text(text: str, markup: bool, style: str = "") -> Text:
    if markup:
        try:
            return Text.from_markup(text, style=style)
        except MarkupError:  # brackets that were meant literally
            pass
    return Text(text, style=style)


# ---- layout


def _name_column(rows: Sequence[Row], inner: int) -> int:
    """Where help starts: after the longest name, but at most 2/5 of the panel (a longer name gets a line
    of its own); 0 when that leaves too little for help, which then goes under each name."""
    longest = max((row.name.cell_len for row in rows), default=0)
    column = min(longest, max(20, inner * 2 // 5)) + GAP
    return column if inner - column >= MIN_HELP_WIDTH else 0


def _print_panel(console: Console, title: str, rows: Sequence[Row], column: int, inner: int) -> None:
    lines = [line for row in rows for line in _row_lines(console, row, column, inner)]
    console.print(
        Panel(Group(*lines), title=Text(title), title_align="left", border_style="dim", padding=(0, 1))
    )


def _row_lines(console: Console, row: Row, column: int, inner: int) -> list[Text]:
    indent = column or UNDER_INDENT
    help_lines = _wrap_help(console, row, max(inner - indent, 1))
    names = list(row.name.wrap(console, inner))  # more than one line only when the panel is narrower
    lines: list[Text] = []
    if column and len(names) == 1 and names[0].cell_len <= column - GAP and help_lines:
        first = names[0]
        first.append(" " * (column - first.cell_len))
        first.append_text(help_lines.pop(0))
        lines.append(first)
    else:
        lines.extend(names)
    lines.extend(Text(" " * indent) + line for line in help_lines)
    return lines


def _wrap_help(console: Console, row: Row, width: int) -> list[Text]:
    """The help wrapped at word boundaries, each note kept whole on the line it fits."""
    lines = [line for line in row.help.wrap(console, width)] if row.help.plain else []
    for line in lines:
        line.rstrip()
    for note in row.notes:
        piece = Text(note, style=_STYLE_NOTE)
        if lines and lines[-1].cell_len + 1 + piece.cell_len <= width:
            lines[-1].append(" ")
            lines[-1].append_text(piece)
        else:
            lines.extend(piece.wrap(console, width))
    return lines
