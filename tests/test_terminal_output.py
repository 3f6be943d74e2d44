"""What the terminal shows: `--help` of every command at 80 columns (in a pipe and on a pseudo-terminal),
tables in a pipe and on a narrow terminal, the chat banner's line breaks, and a Ctrl-C during a streamed
chat answer replayed through a small terminal emulator (the answer's first line must be there once)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
import typer
from rich.cells import cell_len
from rich.console import Console
from test_chat import STATS, STORY, spawn_chat

from minisgl_cli.chat.conversation import Conversation
from minisgl_cli.chat.repl import Output, Repl
from minisgl_cli.cli import ui
from minisgl_cli.cli.app import app
from minisgl_cli.config import SamplingConfig

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MINISGL_") and k != "COLUMNS"}
    return base | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


# ---- --help


def commands() -> Iterator[tuple[list[str], list[str]]]:
    """(path, every flag name) for the app and each of its commands and subcommands, from click's own tree."""

    def walk(command: Any, path: list[str], parent: Any) -> Iterator[tuple[list[str], list[str]]]:
        settings = getattr(command, "context_settings", None) or {}
        ctx = command.context_class(command, parent=parent, info_name=(path or ["minisgl"])[-1], **settings)
        flags = [
            name
            for param in command.get_params(ctx)
            if not getattr(param, "hidden", False)
            for name in (*param.opts, *param.secondary_opts)
            if name.startswith("-")
        ]
        yield path, flags
        for name, sub in (getattr(command, "commands", None) or {}).items():
            yield from walk(sub, [*path, name], ctx)

    return walk(typer.main.get_command(app), [], None)


COMMANDS = list(commands())


def test_the_command_tree_is_the_one_documented() -> None:
    paths = {" ".join(path) for path, _ in COMMANDS}
    expected = {"", "serve", "chat", "generate", "convert", "config", "config show", "bench"}
    expected |= {f"bench {name}" for name in ("offline", "latency", "serve", "prefix", "compare")}
    assert expected <= paths


def check_help(text: str, flags: list[str], width: int) -> None:
    """Every flag in full, no cut cell, no switch shown as taking a value, defaults as typed, lines fit."""
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag
    assert "…" not in text
    assert "<bool>" not in text and "BOOLEAN" not in text
    assert not re.search(r"\[default: \(", text)
    assert "Usage: minisgl" in text
    too_wide = [line for line in text.splitlines() if cell_len(line) > width]
    assert not too_wide, too_wide


@pytest.mark.parametrize("path,flags", COMMANDS, ids=[" ".join(p) or "minisgl" for p, _ in COMMANDS])
def test_help_at_80_columns_in_a_pipe(path: list[str], flags: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "minisgl_cli", *path, "--help"],
        capture_output=True,
        text=True,
        env=env(COLUMNS="80"),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    check_help(result.stdout, flags, 80)


def help_in_a_pipe(*path: str, columns: int = 80) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "minisgl_cli", *path, "--help"],
        capture_output=True,
        text=True,
        env=env(COLUMNS=str(columns)),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_shows_a_metavar_only_where_a_value_is_taken_and_keeps_the_panels() -> None:
    text = help_in_a_pipe("serve")
    lines = [line.strip("│ ") for line in text.splitlines()]
    # switches: both names, nothing after them on their line (the help goes beneath: no room beside)
    for switch in ("--dummy-weights / --no-dummy-weights", "--disable-overlap / --no-disable-overlap"):
        assert switch in lines
    for option in ("--page-size INTEGER", "--mem-fraction FLOAT", "--config PATH", "--host TEXT"):
        assert any(line.startswith(option + " ") for line in lines), option
    assert "--dtype auto|float32|bfloat16|float16" in lines
    for default in ("[default: auto]", "[default: 1919]", "[default: 0.85]", "[default: access-log]"):
        assert default in text
    for panel in ("Options", "Config", "Engine options", "Server options", "Sampling options"):
        assert re.search(rf"╭─ {panel} ─", text), panel
    # the description is kept, its paragraphs reflowed to the width
    assert "Serve a model over an OpenAI-compatible HTTP API" in text
    assert "Example: minisgl serve --port 1919 --max-running-requests 64" in text


def test_group_help_lists_its_commands_with_their_summaries() -> None:
    text = help_in_a_pipe("bench")
    for name in ("offline", "latency", "serve", "prefix", "compare"):
        assert re.search(rf"^│ {name} +\w", text, re.M), name
    assert "[required]" in help_in_a_pipe("bench", "compare")


def test_help_at_40_columns_still_cuts_nothing() -> None:
    flags = dict((" ".join(path), flags) for path, flags in COMMANDS)["serve"]
    text = help_in_a_pipe("serve", columns=40)
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag
    assert "…" not in text
    assert all(cell_len(line) <= 40 for line in text.splitlines())


@pytest.mark.parametrize(
    "path", [[], ["serve"], ["bench", "offline"]], ids=["minisgl", "serve", "bench offline"]
)
def test_help_at_80_columns_on_a_terminal(path: list[str]) -> None:
    """On a pseudo-terminal rich takes the width from the terminal (no COLUMNS) and adds colours."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "minisgl_cli", *path, "--help"],
        env=env(TERM="xterm"),
        encoding="utf-8",
        dimensions=(40, 80),
        timeout=60,
    )
    output = child.read()
    child.close()
    assert child.exitstatus == 0, output
    text = ANSI.sub("", output).replace("\r\n", "\n")
    flags = dict((" ".join(p), f) for p, f in COMMANDS)[" ".join(path)]
    check_help(text, flags, 80)


# ---- tables

LONG_HEADERS = [
    "request throughput (req/s)",
    "output token throughput (tok/s)",
    "mean time to first token (ms)",
    "median inter-token latency (ms)",
]
LONG_ROW = ["minisgl-with-a-rather-long-system-name", "12.345", "1234.567", "5.678"]


def table_lines(text: str) -> list[list[str]]:
    """The cells of each table line that has any, stripped."""
    return [
        [cell.strip() for cell in re.split("[│┃]", line)[1:-1]]
        for line in text.splitlines()
        if "│" in line or "┃" in line
    ]


def test_a_table_in_a_pipe_keeps_every_header_and_cell_whole() -> None:
    # A real pipe and the module's own console, as `minisgl bench ... > out.txt` gets it.
    script = (
        "from minisgl_cli.cli import ui; "
        f"ui.print_table('results', {LONG_HEADERS!r}, [{LONG_ROW!r}, ['hf', '1', '2', '3']])"
    )
    for extra in ({}, {"COLUMNS": "80"}):
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env(**extra)
        )
        assert result.returncode == 0, result.stderr
        rows = table_lines(result.stdout)
        assert rows == [LONG_HEADERS, LONG_ROW, ["hf", "1", "2", "3"]], result.stdout
        assert "…" not in result.stdout


def test_a_table_on_a_narrow_terminal_wraps_headers_instead_of_cutting_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(ui, "console", console)
    ui.print_table(None, LONG_HEADERS + ["p99 end-to-end latency (ms)"], [LONG_ROW + ["99999.123"]])
    text = console.file.getvalue()
    assert "…" not in text
    assert all(cell_len(line) <= 80 for line in text.splitlines())
    # Each header is all there, over several lines of its column.
    header_lines = [cells for cells in table_lines(text.split("┡")[0])]
    headers = [" ".join(filter(None, column)) for column in zip(*header_lines, strict=True)]
    assert headers == LONG_HEADERS + ["p99 end-to-end latency (ms)"]


# ---- the chat banner


class NamedBackend:
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    location = "in-process"

    def close(self) -> None:
        pass


class NoInput:
    def read(self) -> None:
        return None


@pytest.mark.parametrize("width", [40, 60, 80, 91])
def test_the_banner_breaks_lines_between_words(width: int) -> None:
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    output = Output(io.StringIO(), console, markdown=False, interactive=True)
    Repl(NamedBackend(), Conversation(SamplingConfig()), output).run(NoInput())  # type: ignore[arg-type]
    lines = ANSI.sub("", console.file.getvalue()).splitlines()
    assert lines and all(cell_len(line) <= width for line in lines), lines
    # Every word whole; a line break may stand in for a " · " between two pieces.
    words = [word for line in lines for word in line.split() if word != "·"]
    expected = (
        "minisgl chat · HuggingFaceTB/SmolLM2-135M-Instruct (in-process) · /help lists the commands"
        " · Ctrl-D leaves"
    )
    assert words == [word for word in expected.split() if word != "·"], lines
    assert not any(line.strip().startswith("·") or line.rstrip().endswith("·") for line in lines), lines


# ---- Ctrl-C during a streamed answer


class Screen:
    """Just enough of a VT100 to replay what the REPL drew: text with auto-wrap, CR, LF, BS, and the cursor
    and erase sequences that rich and prompt_toolkit send. Lines scrolled off the top are kept."""

    TOKEN = re.compile(r"\x1b\[([?0-9;]*)([@-~])|\x1b[()][0-9A-Za-z]|\x1b.|[\s\S]")

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.grid = [[" "] * cols for _ in range(rows)]
        self.scrolled: list[str] = []
        self.y = self.x = 0
        self.wrap_next = False  # the cursor is past the last column: the next character starts a new line
        self.autowrap = True

    def lines(self) -> list[str]:
        return self.scrolled + ["".join(row).rstrip() for row in self.grid]

    def feed(self, data: str) -> None:
        for match in self.TOKEN.finditer(data):
            if match.group(2) is not None:
                self._csi(match.group(1), match.group(2))
            elif not match.group().startswith("\x1b"):
                self._char(match.group())

    def _line_feed(self) -> None:
        if self.y < self.rows - 1:
            self.y += 1
            return
        self.scrolled.append("".join(self.grid.pop(0)).rstrip())
        self.grid.append([" "] * self.cols)

    def _char(self, char: str) -> None:
        if char == "\r":
            self.x, self.wrap_next = 0, False
        elif char == "\n":
            self._line_feed()
            self.wrap_next = False
        elif char == "\b":
            self.x, self.wrap_next = max(self.x - 1, 0), False
        elif char >= " ":
            if self.wrap_next:
                self.x, self.wrap_next = 0, False
                self._line_feed()
            self.grid[self.y][self.x] = char
            if self.x < self.cols - 1:
                self.x += 1
            elif self.autowrap:
                self.wrap_next = True

    def _csi(self, params: str, final: str) -> None:
        if params.startswith("?"):
            if params == "?7":
                self.autowrap = final == "h"
            return
        numbers = [int(n) if n else 0 for n in params.split(";")] if params else []
        n = max(numbers[0] if numbers else 1, 1)
        if final != "m":  # colours leave the cursor where it is; every move or erase ends a pending wrap
            self.wrap_next = False
        if final == "A":
            self.y = max(self.y - n, 0)
        elif final == "B":
            self.y = min(self.y + n, self.rows - 1)
        elif final == "C":
            self.x = min(self.x + n, self.cols - 1)
        elif final == "D":
            self.x = max(self.x - n, 0)
        elif final == "G":
            self.x = min(n - 1, self.cols - 1)
        elif final in "Hf":
            row, col = (numbers + [1, 1])[:2]
            self.y, self.x = min(max(row, 1), self.rows) - 1, min(max(col, 1), self.cols) - 1
        elif final == "K":
            mode = numbers[0] if numbers else 0
            start, end = {0: (self.x, self.cols), 1: (0, self.x + 1), 2: (0, self.cols)}[mode]
            self.grid[self.y][start:end] = [" "] * (end - start)
        elif final == "J":
            mode = numbers[0] if numbers else 0
            if mode == 0:
                self.grid[self.y][self.x :] = [" "] * (self.cols - self.x)
                for row in self.grid[self.y + 1 :]:
                    row[:] = [" "] * self.cols
            elif mode == 2:
                self.grid = [[" "] * self.cols for _ in range(self.rows)]


def test_screen_replays_wrap_and_redraw_in_place() -> None:
    screen = Screen(3, 5)
    screen.feed("abcde")  # the full line: the cursor waits at its end
    screen.feed("f\r\nxy\x1b[1A\r\x1b[2Kzz")
    assert screen.lines() == ["abcde", "zz", "xy"]


def test_ctrl_c_during_an_answer_leaves_its_first_line_once(tmp_path: Path, smollm2_dir: Path) -> None:
    child = spawn_chat(tmp_path, "--temperature", "0", "--max-tokens", "400")
    drawn = io.StringIO()
    child.logfile_read = drawn
    child.sendline(STORY)
    child.expect_exact("…")  # the answer's placeholder, until its first token
    child.expect(r"\w+ \w+ \w+")  # the answer has begun, and is long: 400 tokens at most
    child.sendintr()
    child.expect(STATS)
    child.expect_exact("stopped")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()

    screen = Screen(50, 200)  # spawn_chat's terminal
    screen.feed(drawn.getvalue())
    lines = screen.lines()
    asked = next(i for i, line in enumerate(lines) if STORY in line)
    stats = next(i for i, line in enumerate(lines) if i > asked and STATS.search(line))
    answer = [line for line in lines[asked + 1 : stats] if line.strip()]
    assert answer, lines[asked:stats]
    assert answer.count(answer[0]) == 1, answer
