"""Slash commands: a line starting with "/" parsed into a command, its argument checked before it runs.

Every mistake is a UsageError with one line that says what was expected, so the REPL can print it and go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minisgl_cli.config import SETTINGS, check_value
from minisgl_cli.engine.structured import read_json_schema
from minisgl_cli.errors import UsageError

# What /set may change: the sampling settings a person tunes while chatting.
SETTABLE = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed")


@dataclass(frozen=True)
class Exit:
    pass


@dataclass(frozen=True)
class Help:
    pass


@dataclass(frozen=True)
class Reset:
    pass


@dataclass(frozen=True)
class SetSystem:
    text: str | None  # None: no system prompt


@dataclass(frozen=True)
class ShowSettings:
    pass


@dataclass(frozen=True)
class Set:
    name: str  # one of SETTABLE
    value: int | float | None  # already checked against the setting's limits


@dataclass(frozen=True)
class SetJsonSchema:
    schema: dict[str, Any] | None  # None: answers are free text again


@dataclass(frozen=True)
class Save:
    path: Path


@dataclass(frozen=True)
class Load:
    path: Path


Command = Exit | Help | Reset | SetSystem | ShowSettings | Set | SetJsonSchema | Save | Load

# (usage, what it does), in the order /help lists them.
HELP: tuple[tuple[str, str], ...] = (
    ("/help", "this list"),
    ("/reset", "forget the conversation (the system prompt and settings stay)"),
    ("/system TEXT", "set the system prompt; /system alone removes it"),
    ("/set NAME VALUE", f"change a setting: {', '.join(SETTABLE)} (seed none: unseeded)"),
    ("/set", "show the settings"),
    ("/json-schema FILE", "answer with JSON matching the schema in FILE; /json-schema off: free text again"),
    ("/save FILE", "write the transcript: .json (loadable) or .md"),
    ("/load FILE", "continue a conversation saved with /save FILE.json"),
    ("/exit, /quit", "leave (Ctrl-D too)"),
    ('"""', 'on its own line: start a multi-line message, ended by another """ line'),
    ("Alt+Enter", "insert a newline; Ctrl-C stops an answer or clears the line"),
)


def is_command(text: str) -> bool:
    return text.startswith("/")


def parse_command(text: str) -> Command:
    """The command a "/..." line asks for; UsageError naming the problem if it is unknown or malformed."""
    # Split at the first blank or newline: an argument may span lines (Alt+Enter), e.g. a long /system.
    name, *rest = text.strip().split(maxsplit=1) or [""]
    arg = rest[0] if rest else ""
    match name:
        case "/exit" | "/quit":
            return _bare(name, arg, Exit())
        case "/help":
            return _bare(name, arg, Help())
        case "/reset":
            return _bare(name, arg, Reset())
        case "/system":
            return SetSystem(arg or None)
        case "/set":
            return _parse_set(arg) if arg else ShowSettings()
        case "/json-schema":
            return SetJsonSchema(
                None if arg.strip().lower() == "off" else read_json_schema(_path(name, arg), name)
            )
        case "/save":
            return Save(_path(name, arg))
        case "/load":
            return Load(_path(name, arg))
    raise UsageError(f"unknown command {name}: type /help for the list")


def _bare(name: str, arg: str, command: Command) -> Command:
    if arg:
        raise UsageError(f"{name} takes no argument")
    return command


def _path(name: str, arg: str) -> Path:
    if not arg:
        raise UsageError(f"{name} needs a file name, e.g. {name} chat.json")
    return Path(arg).expanduser()


def _parse_set(arg: str) -> Set:
    words = arg.split()
    if len(words) != 2:
        raise UsageError(f"usage: /set NAME VALUE, with NAME one of {', '.join(SETTABLE)}")
    name, text = words
    if name not in SETTABLE:
        raise UsageError(f"/set {name}: not a setting; one of {', '.join(SETTABLE)}")
    # The limits are the config's own declarations, so /set accepts what --temperature etc. accept.
    spec = SETTINGS[name]
    where = f"/set {name} {text}"
    if spec.optional and text.lower() == "none":
        return Set(name, None)
    try:
        value = spec.type(text)
    except ValueError:
        raise UsageError(f"{where}: expected {spec.expected}") from None
    return Set(name, check_value(spec, value, where))
