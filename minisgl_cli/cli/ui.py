"""Terminal output for every subcommand: consoles, tables, progress bars, and the one error handler."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.segment import Segments
from rich.table import Table
from rich.text import Text

from minisgl_cli import log_format
from minisgl_cli.errors import MinisglError

try:  # recent typer ships its own copy of click; older releases use click itself
    from typer._click.exceptions import BadParameter, ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import BadParameter, ClickException, NoArgsIsHelpError

console = Console()  # results: stdout
err_console = Console(stderr=True)  # errors, logs and progress: stderr, so stdout stays parseable

LOG_LEVELS = ("debug", "info", "warning", "error")
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


_debug = False  # set by the global --debug; the env var is read too, for errors raised before it is parsed


def enable_debug() -> None:
    global _debug
    _debug = True


def _debug_enabled() -> bool:
    return _debug or os.environ.get("MINISGL_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def setup_logging(level: str) -> None:
    """Log to stderr in the format every process of every command shares (log_format.py)."""
    log_format.install(level, role="main")


def print_error(message: str) -> None:
    # soft_wrap: one logical line even when it is wider than the terminal (it may be piped or grepped).
    err_console.print(Text(f"error: {message}", style="bold red"), soft_wrap=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """End the current command with one red error line and exit status ``code``."""
    print_error(message)
    raise typer.Exit(code)


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows under the given headers; cells are shown with str(), never as rich markup.

    No header or cell is ever cut: on a terminal too narrow for the table they wrap (rich's default
    would end them in "…"); into a pipe or file, which has no width of its own (rich assumes 80), the
    table is laid out at its natural width, every cell on one line.
    """
    table = Table(title=None if title is None else Text(title), title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    if console.is_terminal:
        console.print(table)
        return
    unbounded = console.options.update_width(_NO_WIDTH_LIMIT)
    natural = console.options.update_width(console.measure(table, options=unbounded).maximum)
    # Rendered here at that width: console.print would cap it at console.width.
    console.print(Segments(console.render(table, natural)), soft_wrap=True)


_NO_WIDTH_LIMIT = 100_000  # wider than any table's natural width


class _RateColumn(ProgressColumn):
    """Items per second, in the task's `unit` where it has one ("412.0 tok/s"); rich's own speed column
    formats bytes."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit")
        per_s = f" {unit}/s" if unit else "/s"
        return Text("-" + per_s if speed is None else f"{speed:,.1f}{per_s}", style="progress.data.speed")


def progress(transient: bool = False) -> Progress:
    """A progress display with bar, done/total, rate and ETA; use as a context manager.

    Example: ``with progress() as p: task = p.add_task("generate", total=n); ...; p.advance(task)``.
    A task counting something other than items names it: ``add_task("minisgl", total=t, unit="tok")``.
    """
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        # Off when stderr is a file or pipe: no escape codes or stray blank lines in logs.
        disable=not err_console.is_terminal,
    )


def run(app: typer.Typer, argv: Sequence[str] | None = None) -> int:
    """Run the app and turn every way it can end into an exit status, reporting errors in one place.

    User mistakes and known failures get one red line (and the traceback with --debug); anything
    else is a bug and always shows its traceback.
    """
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="minisgl", standalone_mode=False)
    except MinisglError as e:
        _report(str(e))
        return e.exit_code
    except NoArgsIsHelpError as e:  # the help is already printed; not an error worth a red line
        return e.exit_code
    except ClickException as e:  # bad flag value, unknown option, missing argument
        _report(f"{_click_message(e)} (see '{_command_path(e)} --help')")
        return e.exit_code
    except KeyboardInterrupt:
        print_error("interrupted")
        return INTERRUPTED
    except typer.Abort:  # end of input (EOF) at a prompt
        print_error("aborted")
        return 1
    except Exception:
        err_console.print_exception()
        return 1
    # Non-standalone click returns the command's return value, or the code of a typer.Exit.
    code = result if isinstance(result, int) and not isinstance(result, bool) else 0
    if code == INTERRUPTED:  # typer turns Ctrl-C into Exit(130) before we can see the KeyboardInterrupt
        print_error("interrupted")
    return code


def _report(message: str) -> None:
    if _debug_enabled():
        err_console.print_exception()
    print_error(message)


# typer's message for a value outside a Literal's or Enum's choices: "'vllm' is not one of 'hf', 'x'."
_NOT_ONE_OF = re.compile(r"^(?P<value>.*) is not one of (?P<choices>'.*')\.?$")


def _click_message(error: ClickException) -> str:
    """click's message, a bad option value in our own errors' voice.

    Typer 0.29 validates option values through pydantic, whose text for a ValueError starts "Value error, "
    and whose sentences start with a capital: "Invalid value for '--baseline': Value error, 'vllm' is not
    one of 'hf'." reads here "invalid value for '--baseline': 'vllm' is not one of: hf".
    """
    message = error.format_message()
    if not isinstance(error, BadParameter) or not message.endswith(error.message):
        return message
    head = message.removesuffix(error.message)  # "Invalid value for '--baseline': "
    detail = error.message.removeprefix("Value error, ").rstrip(".")
    choices = _NOT_ONE_OF.match(detail)
    if choices is not None:
        names = re.findall(r"'([^']*)'", choices["choices"])
        detail = f"{choices['value']} is not one of: {', '.join(names)}"
    return (_lower_first(head) + _lower_first(detail)).rstrip(".")


def _lower_first(text: str) -> str:
    """A sentence's first word in lower case ("Input" -> "input"); an acronym ("JSON") keeps its capitals."""
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _command_path(error: ClickException) -> str:
    ctx = getattr(error, "ctx", None)
    return ctx.command_path if ctx is not None else "minisgl"
