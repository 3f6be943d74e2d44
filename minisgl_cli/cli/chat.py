"""``minisgl chat``: a terminal chat with the in-process engine, or with any OpenAI-compatible server (--url)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from minisgl_cli.cli import ui
from minisgl_cli.cli.options import with_config
from minisgl_cli.config import LoadedConfig
from minisgl_cli.errors import MinisglError, UsageError
from minisgl_cli.wording import plural

if TYPE_CHECKING:
    from minisgl_cli.chat.backend import Backend
    from minisgl_cli.chat.inputs import Source

HISTORY_FILE = "chat_history"


@with_config("engine", "sampling")
def chat(
    cfg: LoadedConfig,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Chat with the OpenAI-compatible server at this URL (http://HOST:PORT) instead of running "
            "the model here; --model then names the server's model (default: the first it lists).",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", help="With --url: sent as 'Authorization: Bearer KEY'.", show_default=False
        ),
    ] = None,
    system: Annotated[
        str | None, typer.Option("--system", help="System prompt to start with.", show_default=False)
    ] = None,
    plain: Annotated[
        bool, typer.Option("--plain", help="Print answers as raw text instead of rendered Markdown.")
    ] = False,
    hide_thinking: Annotated[
        bool,
        typer.Option(
            "--hide-thinking", help="Do not show a reasoning model's thinking (shown dim above its answer)."
        ),
    ] = False,
    json_schema: Annotated[
        Path | None,
        typer.Option(
            "--json-schema",
            help="Answer with JSON matching the JSON schema in this file (/json-schema changes it).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Chat in the terminal: answers stream as they are generated, then tokens/s and time to first token.

    The sampling flags (--temperature, --max-tokens, ...) are the starting settings: /set changes them. In
    process, those not set come from the model's generation_config.json (--generation-config none: the
    built-in defaults).

    /help lists the commands. Alt+Enter, or a line holding only \"\"\", starts multi-line input.

    Ctrl-C stops an answer, Ctrl-D or /exit leaves.

    With stdin not a terminal, each line is a message and only the answers are printed.

    Example: minisgl chat --temperature 0.7, or minisgl chat --url http://127.0.0.1:1919
    """
    from minisgl_cli.chat.conversation import Conversation
    from minisgl_cli.chat.repl import Repl, piped_output, terminal_output
    from minisgl_cli.engine.structured import read_json_schema

    if api_key is not None and url is None:
        raise UsageError("--api-key is for a server: give its --url too")
    schema = read_json_schema(json_schema, "--json-schema") if json_schema is not None else None
    interactive = sys.stdin.isatty()
    if interactive:
        # Ctrl-C must stop an answer even when this process started with SIGINT ignored (a parent that ignores it
        # passes that on, and Python then installs no KeyboardInterrupt handler of its own).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if url is None:
        # Before the model loads, so a bad generation_config.json costs no wait. A server (--url) has its own.
        from minisgl_cli.generation_config import with_model_generation_config

        cfg = with_model_generation_config(cfg)
    backend = _connect(cfg, url, api_key)
    try:
        output = (
            terminal_output(ui.console, plain, show_thinking=not hide_thinking)
            if interactive
            else piped_output(ui.err_console)
        )
        sampling = {f.name for f in dataclasses.fields(cfg.config.sampling)}
        chosen = frozenset(name for name in sampling if cfg.sources[name] != "default")
        conversation = Conversation(cfg.config.sampling, system or None, json_schema=schema, chosen=chosen)
        repl = Repl(backend, conversation, output)
        repl.run(_source(interactive))
    finally:
        backend.close()
    if repl.failures and not interactive:
        raise MinisglError(f"{plural(repl.failures, 'piped line')} failed: see the errors above")


def _connect(cfg: LoadedConfig, url: str | None, api_key: str | None) -> Backend:
    if url is None:
        from minisgl_cli.chat.engine_backend import EngineBackend

        return EngineBackend.load(cfg.config.engine)
    from minisgl_cli.chat.openai_backend import OpenAIBackend

    # httpx logs every request at INFO, a line between every two answers. Kept for --log-level debug.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    # --model names the server's model only when given on the command line: a model path from a config
    # file or MINISGL_MODEL is meant for the in-process engine.
    model = cfg.config.engine.model if cfg.sources["model"].startswith("flag") else None
    return OpenAIBackend.connect(url, api_key, model)


def _source(interactive: bool) -> Source:
    from minisgl_cli.chat.inputs import PipedInput, TerminalInput
    from minisgl_cli.model_source import cache_dir

    return TerminalInput(cache_dir() / HISTORY_FILE) if interactive else PipedInput(sys.stdin)
