"""The Typer app: version, help, `config show`, the one error path, and the @with_config decorator.

End-to-end cases run `python -m minisgl_cli` in a subprocess (real exit codes, real stderr); the
decorator and error helper are also driven in-process through ui.run on small throwaway apps.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pytest
import typer

from minisgl_cli import __version__
from minisgl_cli.cli import ui
from minisgl_cli.cli.app import app
from minisgl_cli.cli.options import with_config
from minisgl_cli.config import LoadedConfig
from minisgl_cli.errors import MinisglError, UsageError

REPO = Path(__file__).resolve().parents[1]


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MINISGL_")}
    base |= {
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "COLUMNS": str(columns),
        "MINISGL_CACHE": str(cwd / "cache"),
    }
    return subprocess.run(
        [sys.executable, "-m", "minisgl_cli", *args],
        capture_output=True,
        text=True,
        env=base | (env or {}),
        cwd=cwd,
        timeout=120,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MINISGL_"):
            monkeypatch.delenv(name)


# --- the real executable ---------------------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    result = cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == f"minisgl {__version__}\n"


def test_help_lists_config_with_examples(tmp_path: Path) -> None:
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert re.search(r"^\W*config\s+Inspect the configuration", result.stdout, re.M)
    assert "Example:" in result.stdout
    for flag in ("--log-level", "--debug", "--version", "--install-completion"):
        assert flag in result.stdout

    show = cli("config", "show", "--help", cwd=tmp_path)
    assert show.returncode == 0
    assert "Example:" in show.stdout
    # One option per config field, with -m, --x/--no-x flags, built-in defaults and escaped brackets.
    for text in (
        "--page-size",
        "-m",
        "--no-dummy-weights",
        "--max-running-requests",
        "--request-rate",
        "[default: 1919]",
    ):
        assert text in show.stdout
    assert "[engine], [server], [sampling], [bench]" in show.stdout


def test_no_arguments_prints_help(tmp_path: Path) -> None:
    result = cli(cwd=tmp_path)
    assert "Usage: minisgl" in result.stdout
    assert "error:" not in result.stderr
    assert result.returncode == 2  # click's convention for no_args_is_help


def test_every_command_documents_an_example() -> None:
    # Catches subcommands registered later without an "Example:" in their help.
    def walk(command: object) -> Iterator[object]:
        yield command
        for sub in getattr(command, "commands", {}).values():
            yield from walk(sub)

    commands = list(walk(typer.main.get_command(app)))
    assert len(commands) >= 3  # minisgl, config, config show
    for command in commands:
        text = (command.help or "") + (command.epilog or "")  # type: ignore[attr-defined]
        assert "Example:" in text, command.name  # type: ignore[attr-defined]


def test_importing_the_app_stays_light(tmp_path: Path) -> None:
    code = (
        "import sys, minisgl_cli.cli.app; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_config_show_attributes_file_env_and_flag(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(
        "[engine]\npage_size = 16\ndummy_weights = true\n[server]\nport = 8000\n"
    )
    env = {"MINISGL_PORT": "9000", "MINISGL_TEMPERATURE": "0.5"}
    args = ("config", "show", "--config", "m.toml", "--top-p", "0.9", "--no-dummy-weights", "-m", "x.gguf")
    result = cli(*args, "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert list(doc) == ["engine", "server", "sampling", "bench"]
    file_source = f"file {tmp_path / 'm.toml'}"
    assert doc["engine"]["page_size"] == {"value": 16, "source": file_source}
    assert doc["engine"]["dummy_weights"] == {"value": False, "source": "flag --dummy-weights"}
    assert doc["engine"]["model"] == {"value": "x.gguf", "source": "flag --model"}
    assert doc["engine"]["kv_cache_gb"] == {"value": None, "source": "default"}
    assert doc["server"]["port"] == {"value": 9000, "source": "env MINISGL_PORT"}
    assert doc["server"]["host"] == {"value": "127.0.0.1", "source": "default"}
    assert doc["sampling"]["temperature"] == {"value": 0.5, "source": "env MINISGL_TEMPERATURE"}
    assert doc["sampling"]["top_p"] == {"value": 0.9, "source": "flag --top-p"}

    table = cli(*args, cwd=tmp_path, env=env)
    assert table.returncode == 0, table.stderr
    rows = {cells[0]: cells[1:] for cells in _table_rows(table.stdout)}
    assert rows["page_size"] == ["16", file_source]
    assert rows["port"] == ["9000", "env MINISGL_PORT"]
    assert rows["top_p"] == ["0.9", "flag --top-p"]
    assert rows["kv_cache_gb"] == ["none", "default"]
    for title in ("[engine]", "[server]", "[sampling]", "[bench]"):
        assert title in table.stdout


def _table_rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("│ ").split("│")] for line in text.splitlines() if line.startswith("│")
    ]


def test_config_file_from_env(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text("[bench]\nnum_prompts = 7\n")
    result = cli("config", "show", "--json", cwd=tmp_path, env={"MINISGL_CONFIG": "m.toml"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bench"]["num_prompts"] == {
        "value": 7,
        "source": f"file {tmp_path / 'm.toml'}",
    }


@pytest.mark.parametrize(
    ("args", "env", "fragments"),
    [
        (("config", "show", "--port", "abc"), {}, ("--port",)),  # type conversion by the CLI parser
        (("config", "show", "--dtype", "f8"), {}, ("--dtype", "f8")),
        (("config", "show", "--port", "-1"), {}, ("flag --port = -1: expected an integer in [0, 65535]",)),
        (("config", "show", "--bogus"), {}, ("--bogus",)),
        (("--log-level", "loud", "config", "show"), {}, ("--log-level",)),
        (
            ("config", "show"),
            {"MINISGL_PORT": "abc"},
            ('environment variable MINISGL_PORT = "abc": expected an integer',),
        ),
        (("config", "show"), {"MINISGL_PROT": "1"}, ("MINISGL_PROT is not a minisgl setting",)),
        (("config", "show"), {"MINISGL_LOG_LEVEL": "loud"}, ("MINISGL_LOG_LEVEL",)),
        (("config", "show", "--config", "missing.toml"), {}, ("missing.toml does not exist",)),
        (("chat", "--json-schema", "missing.json"), {}, ("--json-schema: cannot read missing.json",)),
    ],
)
def test_user_mistakes_exit_2_with_one_line(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], fragments: tuple[str, ...]
) -> None:
    # A narrow terminal must not wrap the message onto a second line.
    assert_one_error_line(cli(*args, cwd=tmp_path, env=env, columns=40), 2, *fragments)


@pytest.mark.parametrize(("args", "env"), [(("--debug",), {}), ((), {"MINISGL_DEBUG": "1"})])
def test_debug_shows_the_traceback(tmp_path: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
    result = cli(*args, "config", "show", "--port", "-1", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert "UsageError" in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1] == "error: flag --port = -1: expected an integer in [0, 65535]"
    )


def test_shell_completion_offers_field_choices(tmp_path: Path) -> None:
    env = {
        "_MINISGL_COMPLETE": "complete_bash",
        "COMP_WORDS": "minisgl config show --dtype ",
        "COMP_CWORD": "4",
    }
    result = cli(cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["auto", "float32", "bfloat16", "float16"]


# --- in process: the error helper and the decorator --------------------------------------------------


def _single_command_app(command: object) -> typer.Typer:
    toy = typer.Typer(rich_markup_mode="rich")
    toy.command()(command)  # type: ignore[arg-type]
    return toy


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (MinisglError("model does not fit"), 1, "error: model does not fit"),
        (UsageError("bad thing"), 2, "error: bad thing"),
        (KeyboardInterrupt(), 130, "error: interrupted"),
    ],
)
def test_handled_errors(
    capsys: pytest.CaptureFixture[str], raised: BaseException, code: int, line: str
) -> None:
    def boom() -> None:
        raise raised

    assert ui.run(_single_command_app(boom), []) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [line]


def test_fail_exits_with_its_code(capsys: pytest.CaptureFixture[str]) -> None:
    def give_up() -> None:
        ui.fail("no GPU with enough memory", code=3)

    assert ui.run(_single_command_app(give_up), []) == 3
    assert capsys.readouterr().err.strip().splitlines() == ["error: no GPU with enough memory"]


def test_unexpected_exceptions_are_bugs_with_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> None:
        raise ZeroDivisionError("oops")

    assert ui.run(_single_command_app(broken), []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "oops" in err


def test_with_config_keeps_own_arguments_and_passes_cfg(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    seen: list[tuple[str, int, LoadedConfig]] = []

    @with_config("engine", "server")
    def serve(
        path: Annotated[str, typer.Argument(help="A positional argument of the command itself.")],
        cfg: LoadedConfig,
        repeat: Annotated[int, typer.Option(help="An option of the command itself.")] = 1,
    ) -> None:
        """Example: serve x"""
        seen.append((path, repeat, cfg))

    (tmp_path / "c.toml").write_text("[engine]\ndummy_weights = true\npage_size = 4\n")
    argv = [
        "in.jsonl",
        "--repeat",
        "3",
        "-m",
        "tiny",
        "--no-dummy-weights",
        "--port",
        "81",
        "--config",
        str(tmp_path / "c.toml"),
    ]
    assert ui.run(_single_command_app(serve), argv) == 0
    ((path, repeat, cfg),) = seen
    assert (path, repeat) == ("in.jsonl", 3)
    assert (cfg.config.engine.model, cfg.config.engine.dummy_weights, cfg.config.server.port) == (
        "tiny",
        False,
        81,
    )
    assert cfg.config.engine.page_size == 4 and cfg.sources["page_size"] == f"file {tmp_path / 'c.toml'}"
    assert cfg.sources["dummy_weights"] == "flag --dummy-weights"
    assert cfg.sources["tp"] == "default"

    # A command only gets the options of the sections it asked for.
    assert ui.run(_single_command_app(serve), ["x", "--top-p", "0.5"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_with_config_rejects_bad_declarations() -> None:
    def no_cfg(port: int = 1) -> None: ...

    def clash(cfg: LoadedConfig, port: int = 1) -> None: ...

    with pytest.raises(TypeError, match="cfg"):
        with_config("server")(no_cfg)
    with pytest.raises(TypeError, match="port"):
        with_config("server")(clash)
    with pytest.raises(ValueError, match="unknown config sections"):
        with_config("servers")


def test_log_level_configures_logging(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    assert ui.run(app, ["--log-level", "error", "config", "show", "--json"]) == 0
    assert logging.getLogger().level == logging.ERROR
    monkeypatch.setenv("MINISGL_LOG_LEVEL", "warning")
    assert ui.run(app, ["config", "show", "--json"]) == 0
    assert logging.getLogger().level == logging.WARNING
    capsys.readouterr()
    logging.getLogger("minisgl.test").warning("cache is cold")
    logging.getLogger("minisgl.test").info("not shown at warning level")
    err = capsys.readouterr().err
    assert "cache is cold" in err and "not shown" not in err


def test_print_table_shows_cells_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    ui.print_table("[t]", ["key", "value"], [["a", "[bold]x[/bold]"], ["b", 2]])
    out = capsys.readouterr().out
    assert "[t]" in out and "[bold]x[/bold]" in out
    assert _table_rows(out) == [["a", "[bold]x[/bold]"], ["b", "2"]]


def test_progress_is_silent_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with ui.progress() as bar:
        task = bar.add_task("generate", total=3)
        bar.advance(task)
    assert capsys.readouterr().err == ""


def test_progress_shows_counts_rate_and_eta(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ui.err_console, "_force_terminal", True)
    with ui.progress() as bar:
        task = bar.add_task("generate", total=3)
        for _ in range(3):
            bar.advance(task)
    err = capsys.readouterr().err
    assert re.search(r"generate .* 3/3 ([\d,]+\.\d|-)/s .*eta", err), err
