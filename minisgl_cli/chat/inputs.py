"""Where prompts come from: prompt_toolkit on a terminal, or lines piped into stdin.

Both hand the REPL one Entry at a time and share the multi-line block rule: a line holding only \"\"\" starts a
block, the next such line ends it, and everything between is one message, taken literally (never a command).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

BLOCK_FENCE = '"""'


@dataclass(frozen=True)
class Entry:
    text: str
    literal: bool = False  # a \"\"\" block: a message even if it starts with "/"


class Source(Protocol):
    def read(self) -> Entry | None:
        """The next message or command; None when the input ends (Ctrl-D, end of the piped input)."""
        ...


class BlockJoiner:
    """Assembles \"\"\" blocks from lines; other lines pass through."""

    def __init__(self) -> None:
        self._block: list[str] | None = None

    @property
    def in_block(self) -> bool:
        return self._block is not None

    def feed(self, line: str) -> Entry | None:
        """The entry this line completes, or None while a block is still open."""
        if line.strip() == BLOCK_FENCE:
            if self._block is None:
                self._block = []
                return None
            return self._close()
        if self._block is None:
            return Entry(line)
        self._block.append(line)
        return None

    def finish(self) -> Entry | None:
        """At the end of the input: a block left open is taken as if it had been closed."""
        return self._close() if self._block is not None else None

    def cancel(self) -> None:
        self._block = None

    def _close(self) -> Entry:
        assert self._block is not None
        text = "\n".join(self._block)
        self._block = None
        return Entry(text, literal=True)


class PipedInput:
    """One entry per line of a non-terminal stdin (or any lines)."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines: Iterator[str] = iter(lines)
        self._joiner = BlockJoiner()

    def read(self) -> Entry | None:
        for line in self._lines:
            entry = self._joiner.feed(line.rstrip("\r\n"))
            if entry is not None:
                return entry
        return self._joiner.finish()


class TerminalInput:
    """prompt_toolkit line editing with a history file; Alt+Enter (or Esc then Enter) inserts a newline,
    Ctrl-C clears the line (and an open block), Ctrl-D on an empty line ends the input."""

    def __init__(self, history_file: Path) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, History, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

        bindings = KeyBindings()

        # Alt+Enter reaches the terminal as Escape followed by Enter, so this one binding covers both.
        @bindings.add("escape", "enter")
        def _newline(event: KeyPressEvent) -> None:
            event.current_buffer.insert_text("\n")

        history: History
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history_file.touch()
            history = FileHistory(str(history_file))
        except OSError:  # a read-only cache dir costs the history, not the chat
            history = InMemoryHistory()
        self._session: PromptSession[str] = PromptSession(
            history=history, key_bindings=bindings, prompt_continuation="... "
        )
        self._joiner = BlockJoiner()

    def read(self) -> Entry | None:
        from prompt_toolkit.formatted_text import FormattedText

        while True:
            prompt = "... " if self._joiner.in_block else ">>> "
            try:
                line = self._session.prompt(FormattedText([("ansigreen bold", prompt)]))
            except KeyboardInterrupt:
                self._joiner.cancel()
                continue
            except EOFError:
                return None
            entry = self._joiner.feed(line)
            if entry is not None:
                return entry
