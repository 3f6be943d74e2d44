"""The ``minisgl`` executable: one Typer app, one module per subcommand.

Importing this module must stay cheap (no torch, no transformers) so that ``--help`` and shell
completion are instant: subcommands import heavy modules inside their functions.
"""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import typer

from minisgl_cli import __version__
from minisgl_cli.cli import bench, chat, config_cmd, convert, generate, help_format, serve, ui

app = typer.Typer(
    name="minisgl",
    help="minisgl: a fast LLM inference engine. Serve, chat, generate, benchmark and convert models.\n\n"
    "Example: minisgl config show --model HuggingFaceTB/SmolLM2-135M-Instruct",
    rich_markup_mode="rich",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        ui.console.print(f"minisgl {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
    log_level: Annotated[
        Literal[ui.LOG_LEVELS],
        typer.Option(
            "--log-level", envvar="MINISGL_LOG_LEVEL", help="Logging verbosity.", case_sensitive=False
        ),
    ] = "info",
    debug: Annotated[
        bool, typer.Option("--debug", envvar="MINISGL_DEBUG", help="Show tracebacks for handled errors.")
    ] = False,
) -> None:
    """Global options, applied before any subcommand runs."""
    ui.setup_logging(log_level)
    if debug:
        ui.enable_debug()


# Subcommands: one line each.
app.add_typer(config_cmd.app, name="config")
app.command("convert")(convert.convert)
app.command("generate")(generate.generate)
app.command("serve")(serve.serve)
app.command("chat")(chat.chat)
app.add_typer(bench.app, name="bench")
# Our help layout on every command: typer's cuts flag names and shows "<bool>" at 80 columns.
help_format.use_for(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    sys.exit(ui.run(app, argv))
