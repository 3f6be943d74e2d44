"""The one format of every log line, in every process: time, level, the process's role, message.

    2025-06-01 12:00:00.123 INFO    scheduler: running 12 reqs, waiting 3, prompt 1,234 tok/s, ...

`minisgl serve` runs several processes (the API, the scheduler ranks, the tokenizer workers) that all write
to the same stderr; one plain format, with the role that wrote each line, keeps that log greppable. Plain
rather than rich: a rich handler wraps lines at the terminal's width, which splits them in a file or pipe.
Third-party loggers (uvicorn's among them) propagate to the root logger and get the same format, and so do
Python's warnings.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)-7s %(role)s: %(message)s"
_role = "main"  # the role this process's lines name; the server's processes set their own


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to sys.stderr as it is when a line is logged (a test's capture, a redirect), not as it was when
    logging was set up."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # logging.StreamHandler assigns one on construction: sys.stderr is read on each line instead


class _AddRole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


def install(level: str, role: str) -> None:
    """Log to stderr in FORMAT at `level` (debug, info, ...), as `role`; replaces the root's handlers."""
    set_role(role)
    formatter = logging.Formatter(FORMAT)
    formatter.default_msec_format = "%s.%03d"  # 12:00:00.123, not logging's 12:00:00,123
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    handler.addFilter(_AddRole())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # uvicorn's loggers keep their own handlers and stop propagating once anything runs uvicorn with its
    # default log config (in this process, earlier): give them back to the root handler.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    logging.captureWarnings(True)  # Python's warnings too, rather than raw text between the lines


def set_role(role: str) -> None:
    """Name this process's lines `role` from now on ("api", "scheduler", "tokenizer-0", ...)."""
    global _role
    _role = role
