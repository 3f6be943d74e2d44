"""How an answer is shown while it streams: as live Markdown on a terminal, or as raw text."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, TextIO

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.text import Text

try:
    import termios
except ImportError:  # Windows: no termios, and its console does not echo into rich's live region
    termios = None  # type: ignore[assignment]

# Redraws per second: smooth to the eye, and the Markdown is parsed at most this often, not per token.
REFRESH_PER_SECOND = 8


class AnswerView(Protocol):
    def __enter__(self) -> AnswerView: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def write(self, text: str) -> None: ...

    def think(self, text: str) -> None:
        """The model's thinking: shown apart from the answer (dim), or not at all."""


class GrowingAnswer:
    """The answer so far, parsed as Markdown only when rich draws it.

    While it grows, only its last screenful is drawn: a live region taller than the screen cannot be
    redrawn in place (the terminal cannot move the cursor into what has scrolled away), so rich would
    either freeze on the top lines or repeat them. Once `done`, the whole answer is drawn, once.
    """

    def __init__(self) -> None:
        self.text = ""
        self.thinking = ""  # drawn dim above the answer
        self.done = False

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.text and not self.thinking:
            yield Text("" if self.done else "…", style="dim")
            return
        thought = (
            Text(self.thinking.strip() + "\n", style="dim italic") if self.thinking.strip() else Text("")
        )
        markdown = Group(thought, Markdown(self.text)) if self.thinking.strip() else Markdown(self.text)
        if self.done:
            yield markdown
            return
        lines = console.render_lines(markdown, options, pad=False)
        for line in lines[-max(options.size.height - 1, 1) :]:  # one row spare for the cursor
            yield from line
            yield Segment.line()


class MarkdownView:
    """rich Live over the growing answer, at a fixed refresh rate. Not transient: the final drawing, the
    whole answer, stays on screen.

    While it is drawn the terminal does not echo keys: a redraw returns to the top of the region by
    counting lines up from the cursor, and anything echoed moves the cursor. The "^C" of a Ctrl-C, echoed
    after a full-width line (Markdown pads its lines to the width), wraps onto a new line; the redraw then
    starts one line low, leaving the old top line above the new one: the answer's first line, twice.
    """

    def __init__(self, console: Console, keys: TextIO | None = None) -> None:
        self._answer = GrowingAnswer()
        self._live = Live(
            self._answer, console=console, refresh_per_second=REFRESH_PER_SECOND, transient=False
        )
        self._keys = keys or sys.stdin  # the terminal the keys are typed on
        self._echo_back: Callable[[], None] = _nothing

    def __enter__(self) -> MarkdownView:
        self._echo_back = _echo_off(self._keys)
        try:
            self._live.start(refresh=True)  # the placeholder at once, not a refresh period later
        except BaseException:
            self._echo_back()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._answer.done = True
        try:
            self._live.stop()  # its last refresh draws the whole answer
        finally:
            self._echo_back()

    def write(self, text: str) -> None:
        self._answer.text += text

    def think(self, text: str) -> None:
        self._answer.thinking += text


class PlainView:
    """The text deltas exactly as they come, then a newline: no escape codes, nothing added."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._written = ""  # the last delta

    def __enter__(self) -> PlainView:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # An answer that ended (or was stopped) gets its line even when empty; a failed one adds nothing.
        ended = exc is None or isinstance(exc, KeyboardInterrupt)
        if (ended or self._written) and not self._written.endswith("\n"):
            self._out.write("\n")
        self._out.flush()

    def write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()
        self._written = text

    def think(self, text: str) -> None:
        pass  # raw text out (a pipe, --plain): the answer alone, as a script reading it expects


def _nothing() -> None:
    pass


def _echo_off(keys: TextIO | None) -> Callable[[], None]:
    """Stop the terminal behind `keys` echoing what is typed; returns what turns echo back on. Keys typed
    meanwhile stay queued for the next prompt, and Ctrl-C still interrupts (signals are not echo)."""
    if termios is None or keys is None or not keys.isatty():
        return _nothing
    fd = keys.fileno()
    try:
        saved = termios.tcgetattr(fd)
        quiet = termios.tcgetattr(fd)
        quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)  # [3]: the local modes
        termios.tcsetattr(fd, termios.TCSANOW, quiet)  # not TCSAFLUSH: keep what was typed ahead
    except termios.error:  # not a terminal after all, or one that refuses: draw as before
        return _nothing

    def echo_back() -> None:
        try:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        except termios.error:
            pass

    return echo_back
