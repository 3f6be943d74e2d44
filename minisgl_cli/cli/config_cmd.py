"""``minisgl config``: inspect the effective configuration and where each value came from."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from minisgl_cli.cli import ui
from minisgl_cli.cli.options import with_config
from minisgl_cli.config import SECTIONS, LoadedConfig, format_value, section_settings

app = typer.Typer(
    help="Inspect the configuration.\n\nExample: minisgl config show --port 8080",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


@app.command()
@with_config(*SECTIONS)
def show(
    cfg: LoadedConfig,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: {section: {key: {value, source}}}.")
    ] = False,
) -> None:
    """Show every setting's effective value and its source (default, file, env or flag).

    Example: MINISGL_PORT=8080 minisgl config show --config minisgl.toml --page-size 16
    """
    if as_json:
        document = {
            section: {
                spec.name: {
                    "value": getattr(getattr(cfg.config, section), spec.name),
                    "source": cfg.sources[spec.name],
                }
                for spec in section_settings(section)
            }
            for section in SECTIONS
        }
        # Plain print, not rich: the output is for machines and must not be wrapped or coloured.
        print(json.dumps(document, indent=2))
        return
    for section in SECTIONS:
        values = getattr(cfg.config, section)
        rows = [
            (spec.name, format_value(getattr(values, spec.name)), cfg.sources[spec.name])
            for spec in section_settings(section)
        ]
        ui.print_table(f"[{section}]", ("key", "value", "source"), rows)
