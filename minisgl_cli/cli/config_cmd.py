"""``minisgl config``: inspect the effective configuration and where each value came from.

`config show` shows what a command would run with: the model's generation_config.json laid in (as
generation_config.py lays it) and what each "auto" of device, dtype and generation_config stands for on this
machine. It reads the model's config files only: no weights are loaded, a hub repo is taken from the local
cache only (never downloaded), and a GGUF that a command would convert first is not converted (what its
conversion will write is read from its metadata instead).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from minisgl_cli.cli import ui
from minisgl_cli.cli.options import with_config
from minisgl_cli.config import (
    SECTIONS,
    EngineConfig,
    LoadedConfig,
    format_value,
    section_settings,
    with_model_defaults,
)
from minisgl_cli.errors import MinisglError
from minisgl_cli.generation_config import (
    AUTO,
    GENERATION_CONFIG,
    find_generation_config,
    sampling_from_generation_config,
    with_generation_config,
)

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
        bool,
        typer.Option(
            "--json", help='Print JSON: {section: {key: {value, source}}}, plus "resolved" for an auto.'
        ),
    ] = False,
) -> None:
    """Show every setting's effective value and its source (default, the model's generation_config.json, file,
    env or flag); an "auto" device, dtype or generation_config with what it resolves to here.

    Example: MINISGL_PORT=8080 minisgl config show --config minisgl.toml --page-size 16
    """
    cfg, found = _with_model_generation_config(cfg)
    resolved = _resolved_device_and_dtype(cfg.config.engine)
    if found is not None:
        resolved["generation_config"] = found
    if as_json:
        document = {
            section: {
                spec.name: {
                    "value": getattr(getattr(cfg.config, section), spec.name),
                    "source": cfg.sources[spec.name],
                    **({"resolved": resolved[spec.name]} if spec.name in resolved else {}),
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
            (spec.name, _shown(getattr(values, spec.name), resolved.get(spec.name)), cfg.sources[spec.name])
            for spec in section_settings(section)
        ]
        ui.print_table(f"[{section}]", ("key", "value", "source"), rows)


def _shown(value: object, resolved: str | None) -> str:
    return format_value(value) + (f" ({resolved})" if resolved is not None else "")


def _with_model_generation_config(cfg: LoadedConfig) -> tuple[LoadedConfig, str | None]:
    """`cfg` over the model's generation config, as a command would run, and what generation_config "auto"
    found (None for a setting other than auto). A model that cannot be resolved is a yellow line, not an
    error: the rest of the config is still worth seeing."""
    from minisgl_cli.model_source import resolve_model, unconverted_gguf

    engine = cfg.config.engine
    if engine.generation_config != AUTO:
        return with_generation_config(cfg, None), None  # a path of its own: no model needed
    try:
        pending = unconverted_gguf(engine.model)
        if pending is None:
            model_dir = resolve_model(engine.model, engine.dummy_weights, download=False).path
            path = find_generation_config(AUTO, model_dir)
            return with_generation_config(cfg, model_dir), str(path) if path is not None else "none found"
        from minisgl_cli.convert import read_generation_config

        gguf, out = pending
        values = sampling_from_generation_config(read_generation_config(gguf), str(gguf))
        shown = f"{out / GENERATION_CONFIG} once {gguf.name} is converted"
        return with_model_defaults(cfg, values, f"generation_config {shown}"), shown
    except MinisglError as exc:
        ui.err_console.print(
            f"the model's generation_config.json was not read ({exc}): sampling shown without it",
            style="yellow",
            highlight=False,
            soft_wrap=True,
        )
        return cfg, None


def _resolved_device_and_dtype(engine: EngineConfig) -> dict[str, str]:
    """What an "auto" device and dtype resolve to here, as the engine resolves them (engine/device.py)."""
    import torch

    from minisgl_cli.engine.device import resolve_device, resolve_dtype

    # An explicit device is taken as named: whether this machine has it is for the command that uses it.
    device = resolve_device(AUTO) if engine.device == AUTO else torch.device(engine.device)
    resolved: dict[str, str] = {}
    if engine.device == AUTO:
        resolved["device"] = str(device)
    if engine.dtype == AUTO:
        resolved["dtype"] = str(resolve_dtype(AUTO, device)).removeprefix("torch.")
    return resolved
