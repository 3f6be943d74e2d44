"""What every engine process of the server does first and last: signals, logging, and its startup report.

The launcher owns shutdown: Ctrl-C reaches the whole process group, so children ignore SIGINT and stop on
the SIGTERM the launcher sends once the HTTP server has drained. SIGTERM only sets a flag that the child's
loop checks between steps (raising from a signal handler could interrupt ZMQ or a model step halfway). A
child also stops when the launcher dies without saying so (SIGKILL, a crash): Linux delivers SIGTERM on the
parent's death, and the loops check their parent as a fallback where that is unavailable.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import zmq

from minisgl_cli import log_format
from minisgl_cli.engine.tp_ranks import die_with_parent
from minisgl_cli.errors import MinisglError
from minisgl_cli.server.messages import Failed, Ready, pack

_stop_requested = threading.Event()


def prepare_child(log_level: str) -> int:
    """Set up a freshly spawned engine process; returns the launcher's pid, for `keep_running`."""
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _request_stop)
    die_with_parent()  # where it is unavailable, the keep_running checks remain
    # The launcher names each process "minisgl-<role>"; its lines carry the role, like the launcher's own.
    log_format.install(log_level, multiprocessing.current_process().name.removeprefix("minisgl-"))
    return parent


def keep_running(parent: int) -> bool:
    """False once SIGTERM arrived or the launcher is gone."""
    return not _stop_requested.is_set() and os.getppid() == parent


def report(address: str, message: Ready | Failed) -> None:
    """Tell the launcher this process is ready, or why it could not start."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(address)
    sock.send(pack(message))
    sock.close()


@contextmanager
def startup_failures(address: str, role: str) -> Iterator[None]:
    """A MinisglError while starting (model missing, does not fit) goes to the launcher as one line and ends
    this process with status 1; anything else is a bug and also reports its type."""
    try:
        yield
    except MinisglError as exc:
        report(address, Failed(role, str(exc), exc.exit_code))
        sys.exit(1)
    except Exception as exc:
        logging.getLogger(__name__).exception("%s failed to start", role)
        report(address, Failed(role, f"{role} failed to start: {type(exc).__name__}: {exc}"))
        sys.exit(1)


def _request_stop(signum: int, frame: FrameType | None) -> None:
    _stop_requested.set()
