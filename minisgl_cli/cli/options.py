"""``@with_config(...)``: give a Typer command one option per config field, and a loaded config.

Typer builds a command's options from its signature, so the decorator rewrites ``__signature__``:
each subcommand declares only its own arguments plus ``cfg: LoadedConfig``, and gets ``--config``
and every field of the sections it names, all derived from the field declarations in config.py.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import typer
from rich.markup import escape

from minisgl_cli.config import SECTIONS, Setting, load_config, section_settings

CONFIG_PARAM = "config_file"
_SHORT_ALIASES = {"model": ("-m",)}


def _option(spec: Setting) -> inspect.Parameter:
    """The keyword parameter Typer turns into the option for one config field (default None: not given)."""
    names: tuple[str, ...] = (spec.flag, *_SHORT_ALIASES.get(spec.name, ()))
    if spec.type is bool:
        # --x / --no-x: --no-x lets the command line switch off what a file or env switched on.
        names = (f"{spec.flag}/--no-{spec.flag[2:]}",)
    value_type: Any = Literal[spec.choices] if spec.choices else spec.type
    # The built-in default is shown as text only: the real default stays None, so an absent flag
    # overrides nothing. A switch's default is named as the flag that gives it: "no-dummy-weights".
    if spec.type is bool:
        shown: str | bool = spec.flag[2:] if spec.default else f"no-{spec.flag[2:]}"
    else:
        shown = spec.default is not None and str(spec.default)
    info = typer.Option(
        *names,
        help=escape(spec.help),  # help is plain text, not rich markup: "[0, 1]" must print as is
        show_default=shown,
        rich_help_panel=f"{spec.section.capitalize()} options",
    )
    return inspect.Parameter(
        spec.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[value_type | None, info],
    )


def _config_option() -> inspect.Parameter:
    info = typer.Option(
        "--config",
        help=escape(
            "TOML file with [engine], [server], [sampling], [bench] tables (default: $MINISGL_CONFIG). "
            "Every option can also be set as env MINISGL_<OPTION>, e.g. MINISGL_PAGE_SIZE=16; flags win."
        ),
        show_default=False,
        rich_help_panel="Config",
    )
    return inspect.Parameter(
        CONFIG_PARAM,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Path | None, info],
    )


def with_config(*sections: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``--config`` and the named sections' options to a command that takes ``cfg: LoadedConfig``.

    Example::

        @with_config("engine", "sampling")
        def generate(path: Annotated[Path, typer.Argument()], cfg: LoadedConfig) -> None: ...
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; known: {list(SECTIONS)}")
    specs = [spec for section in sections for spec in section_settings(section)]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command)
        if "cfg" not in signature.parameters:
            raise TypeError(f"{command.__name__} must take a 'cfg: LoadedConfig' parameter")
        added = [_config_option(), *(_option(spec) for spec in specs)]
        clashes = {p.name for p in added} & set(signature.parameters)
        if clashes:
            raise TypeError(
                f"{command.__name__} has parameters that clash with config options: {sorted(clashes)}"
            )
        # Typer reads evaluated annotations (Annotated metadata included) from the signature.
        hints = get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
        own = [p for p in own if p.name != "cfg"]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            config_file = kwargs.pop(CONFIG_PARAM, None)
            flags = {spec.name: kwargs.pop(spec.name, None) for spec in specs}
            return command(*args, **kwargs, cfg=load_config(config_file, flags))

        # The command's own parameters first: positional ones must precede the keyword-only options.
        params = own + added
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
