"""A real `minisgl serve` in a subprocess, for end-to-end tests: start it on a free port, find its URL and
child pids in its log, stop it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

_LISTENING = re.compile(r"Listening on (http://\S+?:\d+)")
_PROCESS = re.compile(r"([a-z]+(?:-\d+)?) \(pid (\d+)\)")


class ServerProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        full_env = {**os.environ, "COLUMNS": "250", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minisgl_cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match:
                self.url = match.group(1)
                self._listening.set()
        self._listening.set()  # the process ended: wake a waiter

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_listening(self, timeout: float = 120.0) -> str:
        if not self._listening.wait(timeout) or self.url is None:
            self.kill()
            raise RuntimeError(f"the server did not start:\n{self.log}")
        return self.url

    def child_pids(self) -> dict[str, int]:
        """role -> pid, from the startup log's `processes:` line."""
        line = next(line for line in self.lines if "processes:" in line)
        return {role: int(pid) for role, pid in _PROCESS.findall(line)}

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server never became healthy:\n{self.log}")

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self._known_children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _known_children(self) -> list[int]:
        try:
            return list(self.child_pids().values())
        except StopIteration:
            return []


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def running_server(*args: str) -> Iterator[ServerProcess]:
    """A started, healthy server for the block (a module fixture's body); killed, children too, after it."""
    srv = ServerProcess(*args)
    try:
        srv.wait_listening()
        srv.wait_healthy()
        yield srv
    finally:
        srv.kill()


def read_metrics(url: str) -> dict[str, float]:
    """The server's /metrics as {series with labels: value}."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
