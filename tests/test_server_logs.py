"""The server's log at the default level (issue 18): one start-up line, an access line per request (none for
/health), the scheduler's state line while requests run and not while idle, a summary at shutdown, every
line in one format on stderr.

End to end on a real `minisgl serve` (a tiny random model, CPU) whose stderr is read apart from its stdout;
the state line's interval logic and wording, the access log and the format are unit-tested on their own,
with a fake clock and no timings in the assertions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import httpx
import pytest
from model_helpers import make_tiny_model

from minisgl_cli import log_format
from minisgl_cli.engine.scheduler import SchedulerStats
from minisgl_cli.server.access_log import AccessLog
from minisgl_cli.server.state_log import StateLog

# time, level, role, message: "2025-06-01 12:00:00.123 INFO    scheduler: ..."
LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) +"
    r"(?P<role>[a-z]+(?:-\d+)?): (?P<message>.*)$"
)
STATE = re.compile(
    r"^running (?P<running>\d+) reqs?, waiting (?P<waiting>\d+), prompt (?P<prompt>[\d,.]+) tok/s, "
    r"generation (?P<generation>[\d,.]+) tok/s, KV (?P<kv>\d+\.\d)% used, prefix-cache hit (?P<hit>\d+\.\d%|n/a)$"
)
ACCESS = re.compile(
    r"^(?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d{3}) in \d+\.\d ms from (?P<client>\S+)$"
)
SHUTDOWN = re.compile(r"^shutting down: served (\d+) requests?, (\d+) generated tokens? in \d+\.\d s$")
MAX_RUNNING = 8
MAX_TOKENS = 160


# ---- the state line: wording and interval (fake clock)


def _stats(
    running: int = 0,
    waiting: int = 0,
    prefilled: int = 0,
    generated: int = 0,
    pages_used: int = 0,
    hit: int = 0,
    queried: int = 0,
) -> SchedulerStats:
    return SchedulerStats(
        num_running=running,
        num_waiting=waiting,
        tokens_prefilled=prefilled,
        tokens_decoded=generated,
        tokens_generated=generated,
        num_preemptions=0,
        pages_used=pages_used,
        pages_total=400,
        prefix_hit_tokens=hit,
        prefix_queried_tokens=queried,
    )


def test_the_state_line_has_every_field_over_the_interval() -> None:
    log = StateLog(10.0)
    assert log.due(0.0, busy=True) is False
    assert log.due(10.0, busy=True) is True
    stats = _stats(
        running=12, waiting=3, prefilled=12_340, generated=4_560, pages_used=150, hit=42, queried=100
    )
    assert log.line(10.0, stats, busy=True) == (
        "running 12 reqs, waiting 3, prompt 1,234 tok/s, generation 456 tok/s, KV 37.5% used, "
        "prefix-cache hit 42.0%"
    )
    # The next interval's rates and hit rate are its own: differences from the counters at the last line.
    later = _stats(running=1, prefilled=12_350, generated=4_580, pages_used=2, hit=42, queried=100)
    assert log.due(20.0, busy=True)
    assert log.line(20.0, later, busy=True) == (
        "running 1 req, waiting 0, prompt 1.0 tok/s, generation 2.0 tok/s, KV 0.5% used, prefix-cache hit n/a"
    )


def test_an_idle_engine_logs_one_last_line_then_nothing_until_work_arrives() -> None:
    log = StateLog(1.0)
    assert not log.due(0.0, busy=False)  # idle from the start: nothing to say
    assert not log.due(5.0, busy=False)
    assert not log.due(5.5, busy=True)  # work arrives: its first interval starts now, not at 0
    assert log.due(6.5, busy=True)
    log.line(6.5, _stats(running=1, prefilled=10, generated=3), busy=True)
    assert not log.due(7.0, busy=False)  # the last request finished: one more line when the interval is up
    assert log.due(7.5, busy=False)
    last = log.line(7.5, _stats(prefilled=10, generated=5), busy=False)
    assert last.startswith("running 0 reqs, waiting 0, prompt 0.0 tok/s, generation 2.0 tok/s")
    assert not any(log.due(t, busy=False) for t in (8.5, 100.0, 1e6))
    # Work again after a long idle spell: the rates are over the busy time only.
    assert not log.due(1e6 + 0.5, busy=True)
    assert log.due(1e6 + 1.5, busy=False)  # a request that came and went between two checks still counts
    assert "generation 10.0 tok/s" in log.line(1e6 + 1.5, _stats(prefilled=10, generated=15), busy=False)


def test_interval_zero_turns_the_state_line_off() -> None:
    log = StateLog(0.0)
    assert not any(log.due(t, busy=True) for t in (0.0, 10.0, 1e9))


def test_slow_rates_keep_a_decimal_and_an_empty_pool_is_zero_percent() -> None:
    log = StateLog(1.0)
    assert log.due(0.0, busy=True) is False and log.due(2.0, busy=True) is True
    line = log.line(2.0, dataclasses.replace(_stats(generated=3), pages_total=0), busy=True)
    assert "generation 1.5 tok/s" in line and "KV 0.0% used" in line


# ---- the access log and the common format


async def _app(scope: dict, receive: Callable, send: Callable) -> None:
    if scope["path"] == "/boom":
        raise RuntimeError("boom")
    status = 404 if scope["path"] == "/missing" else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _access_records(enabled: bool, caplog: pytest.LogCaptureFixture, *paths: str) -> list[logging.LogRecord]:
    async def scenario() -> None:
        transport = httpx.ASGITransport(app=AccessLog(_app, enabled=enabled), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for path in paths:
                method = "POST" if path.startswith("/v1/") else "GET"
                await client.request(method, path)

    with caplog.at_level(logging.DEBUG, logger="minisgl.access"):
        asyncio.run(scenario())
    return [r for r in caplog.records if r.name == "minisgl.access"]


def test_access_lines_name_method_path_status_and_client(caplog: pytest.LogCaptureFixture) -> None:
    records = _access_records(True, caplog, "/v1/completions", "/missing?x=1", "/boom", "/health", "/metrics")
    lines = [(r.levelno, ACCESS.match(r.getMessage())) for r in records]
    assert all(match is not None for _, match in lines), [r.getMessage() for r in records]
    got = [(level, m["method"], m["path"], m["status"]) for level, m in lines]  # type: ignore[index]
    assert got == [
        (logging.INFO, "POST", "/v1/completions", "200"),
        (logging.INFO, "GET", "/missing?x=1", "404"),
        (logging.INFO, "GET", "/boom", "500"),  # raised before answering: the server answers 500
        (logging.DEBUG, "GET", "/health", "200"),  # polled: only at debug level
        (logging.DEBUG, "GET", "/metrics", "200"),
    ]
    assert lines[0][1]["client"] == "127.0.0.1:123"  # type: ignore[index]  # httpx's ASGI client address


def test_the_access_log_switched_off_logs_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    records = _access_records(False, caplog, "/v1/completions", "/health")
    assert [r.levelno for r in records] == [logging.DEBUG, logging.DEBUG]


def test_every_logger_writes_the_common_format(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    log_format.install("info", "tokenizer-0")
    logging.getLogger("minisgl.test").info("hello")
    logging.getLogger("uvicorn.error").warning("from uvicorn")  # propagates to the root handler
    logging.getLogger("minisgl.test").debug("not at info")
    log_format.set_role("api")
    logging.getLogger("minisgl.test").error("as the api")
    lines = capsys.readouterr().err.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m["level"], m["role"], m["message"]) for m in parsed] == [  # type: ignore[index]
        ("INFO", "tokenizer-0", "hello"),
        ("WARNING", "tokenizer-0", "from uvicorn"),
        ("ERROR", "api", "as the api"),
    ]


# ---- end to end


@dataclass
class _Server:
    """`minisgl serve` with its stdout and stderr read apart."""

    proc: subprocess.Popen[str]
    err: list[str] = field(default_factory=list)
    out: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    @classmethod
    def start(cls, *args: str) -> _Server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minisgl_cli", "serve", "--port", "0", "--device", "cpu", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "COLUMNS": "80"},  # narrow: the lines must not wrap at the terminal's width
        )
        server = cls(proc)
        for stream, lines in ((proc.stdout, server.out), (proc.stderr, server.err)):
            reader = threading.Thread(target=_read_lines, args=(stream, lines), daemon=True)
            reader.start()
            server.readers.append(reader)
        return server

    def messages(self, role: str | None = None) -> list[str]:
        parsed = [LINE.match(line.rstrip("\n")) for line in list(self.err)]
        return [m["message"] for m in parsed if m and (role is None or m["role"] == role)]

    def state_lines(self) -> list[re.Match[str]]:
        return [m for m in map(STATE.match, self.messages("scheduler")) if m]

    def wait_for(self, what: str, ready: Callable[[], object], timeout: float = 120.0) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = ready()
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"no {what} in the server's log:\n{''.join(self.err)}")

    def url(self) -> str:
        def listening() -> str | None:
            found = [re.search(r"Listening on (http://\S+?:\d+)", m) for m in self.messages("api")]
            return next((m.group(1) for m in found if m), None)

        return str(self.wait_for("start-up line", listening))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            for reader in self.readers:  # to the end of the pipes (the children write to them too)
                reader.join(10)


def _read_lines(stream: TextIO, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@dataclass
class _Run:
    server: _Server
    url: str
    sent: int  # completion requests, all answered 200
    generated: int  # their completion tokens, as usage reported them
    state_lines_when_idle: int  # state lines logged when the final idle one had been seen
    exit_code: int = -1


def _complete(url: str, i: int) -> int:
    body = {"prompt": f"Count: {i}, 2, 3,", "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
    if i % 2:
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    else:
        chat = {**body, "messages": [{"role": "user", "content": body.pop("prompt")}]}
        reply = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120)
    assert reply.status_code == 200, reply.text
    return int(reply.json()["usage"]["completion_tokens"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("logs-model"), "llama")


@pytest.fixture(scope="module")
def run(model_dir: Path) -> Iterator[_Run]:
    """A server with a 0.2 s --log-interval: polled /health, rounds of concurrent requests until a state line
    shows them running, an idle spell, SIGTERM."""
    server = _Server.start(
        "-m", str(model_dir), "--log-interval", "0.2", "--kv-cache-tokens", "4096",
        "--max-running-requests", str(MAX_RUNNING),
    )  # fmt: skip
    try:
        url = server.url()
        for _ in range(5):
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        sent = generated = 0
        with ThreadPoolExecutor(6) as pool:
            for _ in range(5):  # on a fast machine a round may end before a state line catches it running
                generated += sum(pool.map(lambda i: _complete(url, i), range(sent, sent + 6)))
                sent += 6
                if any(int(m["running"]) > 0 for m in server.state_lines()):
                    break
        # The last round's final line comes at most an interval (and an idle poll) after it ended.
        time.sleep(1.0)
        server.wait_for("idle state line", lambda: _idle(server.state_lines()))
        idle_count = len(server.state_lines())
        for _ in range(10):  # 2 s idle, 10 intervals, with health checks going on
            httpx.get(f"{url}/health", timeout=10)
            time.sleep(0.2)
        result = _Run(server, url, sent, generated, idle_count)
        result.exit_code = server.stop()
        yield result
    finally:
        server.stop()


def _idle(lines: list[re.Match[str]]) -> bool:
    return bool(lines) and lines[-1]["running"] == "0" and lines[-1]["waiting"] == "0"


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_every_line_is_on_stderr_in_the_common_format(run: _Run) -> None:
    assert run.exit_code == 0
    assert run.server.out == []
    bad = [line for line in run.server.err if not LINE.match(line.rstrip("\n"))]
    assert bad == [], "".join(run.server.err)
    roles = {LINE.match(line)["role"] for line in run.server.err}  # type: ignore[index]
    assert roles <= {"api", "scheduler", "tokenizer-0"} and {"api", "scheduler"} <= roles


def test_one_start_up_line_says_what_is_served_and_where(run: _Run) -> None:
    startup = [m for m in run.server.messages("api") if m.startswith("serving ")]
    assert len(startup) == 1
    line = startup[0]
    assert re.search(r"^serving tiny-llama\S*: float32 on cpu, tp 1, KV cache [\d,]+ tokens, ", line), line
    assert f"max {MAX_RUNNING} running requests" in line and "context length 512" in line
    assert re.search(r"processes: scheduler \(pid \d+\), tokenizer-0 \(pid \d+\)\.", line), line
    assert line.endswith(f"Listening on {run.url} (OpenAI API under /v1; Ctrl-C stops)")


def test_state_lines_while_busy_have_plausible_numbers(run: _Run) -> None:
    lines = run.server.state_lines()
    for m in lines:
        assert 0 <= int(m["running"]) <= MAX_RUNNING and int(m["waiting"]) >= 0
        assert 0.0 <= float(m["kv"]) <= 100.0
        assert m["hit"] == "n/a" or 0.0 <= float(m["hit"][:-1]) <= 100.0
    busy = [m for m in lines if int(m["running"]) > 0]
    assert busy, lines
    assert all(_number(m["generation"]) > 0 for m in busy)  # running requests decode
    assert any(float(m["kv"]) > 0 for m in busy)
    assert any(_number(m["prompt"]) > 0 for m in lines)


def test_the_idle_line_is_the_last_state_line(run: _Run) -> None:
    lines = run.server.state_lines()
    assert _idle(lines)
    assert len(lines) == run.state_lines_when_idle  # 10 intervals idle (with /health polls): no line


def test_access_lines_for_every_post_and_none_for_health(run: _Run) -> None:
    access = [m for m in map(ACCESS.match, run.server.messages("api")) if m]
    posts = [m for m in access if m["method"] == "POST"]
    assert len(posts) == run.sent
    assert {m["path"] for m in posts} == {"/v1/completions", "/v1/chat/completions"}
    assert {m["status"] for m in posts} == {"200"}
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", m["client"]) for m in posts)
    assert not any("/health" in line for line in run.server.err)  # polled 15 times, at info: silent


def test_the_shutdown_line_counts_requests_and_tokens(run: _Run) -> None:
    found = [m for m in map(SHUTDOWN.match, run.server.messages("scheduler")) if m]
    assert len(found) == 1
    assert (int(found[0][1]), int(found[0][2])) == (run.sent, run.generated)
    assert run.generated == run.sent * MAX_TOKENS


def test_the_switches_turn_access_and_state_lines_off(model_dir: Path) -> None:
    server = _Server.start("-m", str(model_dir), "--log-interval", "0", "--no-access-log")
    try:
        assert _complete(server.url(), 1) == MAX_TOKENS
    finally:
        code = server.stop()
    assert code == 0
    messages = server.messages()
    assert not any(ACCESS.match(m) for m in messages)
    assert not any(STATE.match(m) for m in messages)
    assert any(re.match(r"shutting down: served 1 request, 160 generated tokens", m) for m in messages)
