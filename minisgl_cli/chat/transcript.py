"""/save and /load: a conversation as a file.

JSON (.json) is the loadable form: OpenAI-shaped messages (the system prompt first), so other tools can read it,
plus the settings /set can change. Markdown (.md, .markdown) is for people to read and is never loaded back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from minisgl_cli.chat.commands import SETTABLE
from minisgl_cli.chat.conversation import ASSISTANT, SYSTEM, USER, Conversation, Message
from minisgl_cli.config import SETTINGS, SamplingConfig, check_value, format_value
from minisgl_cli.errors import MinisglError, UsageError

JSON_SUFFIXES = (".json",)
MARKDOWN_SUFFIXES = (".md", ".markdown")
_TITLES = {SYSTEM: "System", USER: "User", ASSISTANT: "Assistant"}


def save(conversation: Conversation, path: Path, model: str) -> None:
    """Write the conversation to `path`, as JSON or Markdown by its extension."""
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        text = to_json(conversation, model)
    elif suffix in MARKDOWN_SUFFIXES:
        text = to_markdown(conversation, model)
    else:
        raise UsageError(f"/save {path}: the file name must end in .json (loadable) or .md")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise MinisglError(f"cannot write {path}: {exc.strerror or exc}") from None


def to_json(conversation: Conversation, model: str) -> str:
    settings = {name: getattr(conversation.settings, name) for name in SETTABLE}
    data = {"model": model, "settings": settings, "messages": conversation.messages()}
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def to_markdown(conversation: Conversation, model: str) -> str:
    # The answers are Markdown already: they go in as they are, under one heading per message.
    parts = [f"# Chat with {model}\n"]
    for message in conversation.messages():
        parts.append(f"## {_TITLES[message['role']]}\n\n{message['content']}\n")
    return "\n".join(parts)


def load(path: Path, settings: SamplingConfig) -> Conversation:
    """The conversation saved in a JSON transcript; its settings override `settings`.

    Checked whole before anything changes: UsageError naming the first problem.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"/load {path}: no such file") from None
    except OSError as exc:
        raise MinisglError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"/load {path}: not JSON (only transcripts saved as .json can be loaded)") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise UsageError(f'/load {path}: no "messages" list, so not a transcript written by /save')
    messages = [_message(path, i, m) for i, m in enumerate(data["messages"])]
    system = messages.pop(0).content if messages and messages[0].role == SYSTEM else None
    for i, message in enumerate(messages):
        expected = USER if i % 2 == 0 else ASSISTANT
        if message.role != expected:
            raise UsageError(
                f"/load {path}: message {i + (system is not None)} is a {message.role} message where "
                f"a {expected} one should be (a system message first, then user and assistant in turn)"
            )
    if len(messages) % 2:
        raise UsageError(f"/load {path}: the last user message has no answer")
    changes = _settings(path, data.get("settings", {}))
    return Conversation(dataclasses.replace(settings, **changes), system, messages, chosen=frozenset(changes))


def _message(path: Path, index: int, raw: Any) -> Message:
    if not isinstance(raw, dict) or raw.get("role") not in _TITLES or not isinstance(raw.get("content"), str):
        raise UsageError(
            f"/load {path}: message {index} is not "
            '{"role": "system", "user" or "assistant", "content": TEXT}'
        )
    return Message(raw["role"], raw["content"])


def _settings(path: Path, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UsageError(f'/load {path}: "settings" must be an object')
    changes: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SETTABLE:
            raise UsageError(f"/load {path}: unknown setting {name!r}; known: {', '.join(SETTABLE)}")
        where = f"/load {path}: settings.{name} = {format_value(value)}"
        changes[name] = check_value(SETTINGS[name], value, where)
    return changes
