"""The chat loop: read an entry, run it as a command or as the next turn, show the answer and its stats.

Interactive (stdin is a terminal): a banner, prompt_toolkit input, live Markdown (or raw text with --plain)
and a dim stats line; Ctrl-C stops an answer and keeps what was shown. Piped: stdout gets the answers only,
one after another; notes and stats go to stderr, and any failure makes the exit status 1 at the end.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from minisgl_cli.chat import commands, transcript
from minisgl_cli.chat.backend import Backend
from minisgl_cli.chat.commands import Command
from minisgl_cli.chat.conversation import Conversation
from minisgl_cli.chat.inputs import Entry, Source
from minisgl_cli.chat.render import AnswerView, MarkdownView, PlainView
from minisgl_cli.chat.stats import STOPPED, Meter
from minisgl_cli.cli.ui import print_error
from minisgl_cli.config import format_value
from minisgl_cli.errors import MinisglError
from minisgl_cli.wording import plural


@dataclass
class Output:
    answers: TextIO  # raw answers (PlainView)
    console: Console  # Markdown answers (MarkdownView), the banner, command feedback and stats
    markdown: bool  # live Markdown rather than raw text
    interactive: bool  # a person at a terminal: Ctrl-C stops an answer instead of the program
    show_thinking: bool = True  # the model's thinking, dim above its answer (Markdown view only)


class Repl:
    def __init__(self, backend: Backend, conversation: Conversation, output: Output) -> None:
        self.backend = backend
        self.conversation = conversation
        self.out = output
        self.failures = 0  # commands and turns that ended in an error

    def run(self, source: Source) -> None:
        """Until the input ends or /exit."""
        if self.out.interactive:
            self._banner()
        while (entry := source.read()) is not None:
            try:
                if not self._handle(entry):
                    return
            except KeyboardInterrupt:
                if not self.out.interactive:
                    raise
            except MinisglError as exc:
                print_error(str(exc))
                self.failures += 1

    def _handle(self, entry: Entry) -> bool:
        """Run one entry; False to leave."""
        if not entry.text.strip():
            return True
        if not entry.literal and commands.is_command(entry.text):
            return self._command(commands.parse_command(entry.text))
        self._turn(entry.text)
        return True

    def _command(self, command: Command) -> bool:
        conversation = self.conversation
        match command:
            case commands.Exit():
                return False
            case commands.Help():
                self._help()
            case commands.Reset():
                conversation.reset()
                self._note("conversation cleared")
            case commands.SetSystem(text):
                conversation.system = text
                self._note("system prompt set" if text else "system prompt removed")
            case commands.ShowSettings():
                self._note(self._settings_line())
            case commands.Set(name, value):
                conversation.change(name, value)
                self._note(f"{name} = {format_value(value)}")
            case commands.SetJsonSchema(schema):
                conversation.json_schema = schema
                self._note("answers are JSON matching the schema" if schema else "answers are free text")
            case commands.Save(path):
                transcript.save(conversation, path, self.backend.model)
                self._note(f"saved {plural(len(conversation.messages()), 'message')} to {path}")
            case commands.Load(path):
                self.conversation = transcript.load(path, conversation.settings)
                self.conversation.chosen |= conversation.chosen  # what was chosen before stays chosen
                self._note(f"loaded {plural(len(self.conversation.messages()), 'message')} from {path}")
        return True

    def _turn(self, prompt: str) -> None:
        """Stream the answer to `prompt`. A failed turn leaves the conversation as it was; a stopped one
        keeps the text shown so far."""
        meter = Meter()
        parts: list[str] = []
        try:
            with self._answer_view() as view:
                for delta in self.backend.stream(
                    self.conversation.messages(prompt),
                    self.conversation.settings,
                    self.conversation.json_schema,
                    chosen=self.conversation.chosen,
                ):
                    meter.observe(delta)
                    if delta.reasoning and self.out.show_thinking:
                        view.think(delta.reasoning)
                    if delta.text:
                        parts.append(delta.text)
                        view.write(delta.text)
        except KeyboardInterrupt:
            if not self.out.interactive:
                raise
            meter.stats.finish_reason = STOPPED
        self.conversation.add_turn(prompt, "".join(parts))
        self._note(meter.stats.summary())

    def _answer_view(self) -> AnswerView:
        return MarkdownView(self.out.console) if self.out.markdown else PlainView(self.out.answers)

    def _help(self) -> None:
        table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
        for usage, what in commands.HELP:
            table.add_row(Text(usage, style="bold"), Text(what))
        self.out.console.print(table)

    def _settings_line(self) -> str:
        settings = self.conversation.settings
        return ", ".join(f"{name} = {format_value(getattr(settings, name))}" for name in commands.SETTABLE)

    def _banner(self) -> None:
        pieces = [
            "minisgl chat",
            f"{self.backend.model} ({self.backend.location})",
            "/help lists the commands",
            "Ctrl-D leaves",
        ]
        lines = banner_lines(pieces, self.out.console.width)
        # Not soft-wrapped, unlike other notes: a piece wider than the terminal still breaks between words.
        self.out.console.print(Text("\n".join(lines), style="dim"), highlight=False)

    def _note(self, text: str) -> None:
        self.out.console.print(Text(text, style="dim"), soft_wrap=True, highlight=False)


def banner_lines(pieces: list[str], width: int, separator: str = " · ") -> list[str]:
    """The pieces joined by `separator`, a new line started between pieces wherever the next would not fit
    (the terminal itself would break the line mid-word)."""
    lines: list[str] = []
    for piece in pieces:
        if lines and cell_len(lines[-1] + separator + piece) <= width:
            lines[-1] += separator + piece
        else:
            lines.append(piece)
    return lines


def terminal_output(console: Console, plain: bool, show_thinking: bool = True) -> Output:
    markdown = not plain and console.is_terminal
    return Output(sys.stdout, console, markdown=markdown, interactive=True, show_thinking=show_thinking)


def piped_output(notes: Console) -> Output:
    """Answers alone on stdout; everything else on `notes` (stderr)."""
    return Output(sys.stdout, notes, markdown=False, interactive=False)
