"""``minisgl serve``: the OpenAI-compatible HTTP server (process topology in server/launch.py)."""

from __future__ import annotations

import logging

from minisgl_cli.cli.options import with_config
from minisgl_cli.config import LoadedConfig


@with_config("engine", "server", "sampling")
def serve(cfg: LoadedConfig) -> int:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models),
    plus /generate, /health and /metrics.

    The sampling flags (--temperature, --max-tokens, ...) are defaults for requests that do not set them;
    unset ones come from the model's generation_config.json (--generation-config none: the built-in ones).
    Binds 127.0.0.1 unless --host says otherwise; use --api-key when other machines can reach the port.

    Example: minisgl serve --port 1919 --max-running-requests 64
    """
    from minisgl_cli.server.launch import serve as run_server

    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    return run_server(cfg, level)
