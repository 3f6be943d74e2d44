"""`minisgl bench serve` against a fake OpenAI-compatible server (FastAPI under uvicorn, in a thread).

The fake server streams one chunk per token (or several tokens per chunk with running usage), honours
max_tokens, sends the usage chunk, and records what it was sent and how many requests it had in flight.
Assertions are about counts, request bodies, schedules and the consistency of the timings (p99 >= p90 >=
median, TTFT <= E2E, TPOT by its definition), never about how fast anything was.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from typer.testing import CliRunner

from minisgl_cli.bench.report import SERVING_KEYS, build_report, serving_notes, serving_tables
from minisgl_cli.bench.serving import (
    LatencyStats,
    RequestRecord,
    Slo,
    Target,
    arrival_offsets,
    parse_slo,
    run_serving,
    summarize,
)
from minisgl_cli.bench.workload import (
    BenchRequest,
    ChatRequest,
    load_serve_workload,
    random_workload,
    sharegpt_workload,
)
from minisgl_cli.cli import bench, ui
from minisgl_cli.config import BenchConfig
from minisgl_cli.errors import MinisglError, UsageError
from minisgl_cli.openai_http import list_models

MODEL = "fake-model"


# ---- the fake server


@dataclass
class FakeState:
    delay_s: float = 0.0  # before each content chunk
    tokens_per_chunk: int = (
        1  # > 1: chunks carry several tokens and a running usage (vLLM's continuous stats)
    )
    fail_every: int = 0  # every Nth request received gets HTTP 500
    cap_tokens: int | None = None  # stop early, as a server that ignores ignore_eos would
    drop_done: bool = False  # end the stream without "data: [DONE]"
    hold_until: int = 0  # hold the first requests until this many are in flight (5 s at most)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    enough: asyncio.Event = field(default_factory=asyncio.Event)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def fake_app(holder: dict[str, FakeState]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": MODEL, "object": "model"}, {"id": "other", "object": "model"}],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return _respond(holder["state"], await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return _respond(holder["state"], await request.json(), chat=True)

    return app


def _respond(state: FakeState, body: dict[str, Any], chat: bool) -> Response:
    state.bodies.append(body)
    if state.fail_every and len(state.bodies) % state.fail_every == 0:
        return JSONResponse(
            {"error": {"message": "injected failure", "type": "server_error"}}, status_code=500
        )
    prompt_tokens = len(body["messages"][0]["content"].split()) if chat else len(body["prompt"])
    n = body["max_tokens"] if state.cap_tokens is None else min(body["max_tokens"], state.cap_tokens)

    def chunk(text: str, usage: dict[str, int] | None = None) -> str:
        choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
        return _sse({"choices": [choice], **({"usage": usage} if usage else {})})

    async def events() -> AsyncIterator[str]:
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        if state.in_flight >= state.hold_until:
            state.enough.set()
        try:
            if not state.enough.is_set():
                try:
                    await asyncio.wait_for(state.enough.wait(), timeout=5.0)
                except asyncio.TimeoutError:  # the builtin TimeoutError only from 3.11
                    pass
            yield ": keep-alive comment\n\n"
            if chat:  # OpenAI opens a chat stream with the role and empty content: not a token
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            sent = 0
            while sent < n:
                k = min(state.tokens_per_chunk, n - sent)
                sent += k
                await asyncio.sleep(state.delay_s)
                running = {"completion_tokens": sent} if state.tokens_per_chunk > 1 else None
                yield chunk("tok " * k, running)
        finally:
            # Before the last events: the client frees its concurrency slot only after reading them.
            state.in_flight -= 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        yield _sse({"choices": [], "usage": usage})
        if not state.drop_done:
            yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@dataclass
class FakeServer:
    url: str
    holder: dict[str, FakeState]

    @property
    def state(self) -> FakeState:
        return self.holder["state"]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    holder = {"state": FakeState()}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(fake_app(holder), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    yield FakeServer(f"http://127.0.0.1:{port}", holder)
    uv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def fake(server: FakeServer) -> FakeServer:
    server.holder["state"] = FakeState()  # each test starts from a clean recording
    return server


@pytest.fixture(scope="module")
def dead_url() -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}"


def _workload(n: int, seed: int = 0) -> list[BenchRequest]:
    return random_workload(n, (3, 12), (2, 7), 1000, seed, first_id=100).requests


def _run(server: FakeServer, requests: list[Any], **kwargs: Any) -> tuple[list[RequestRecord], float]:
    rate = kwargs.pop("request_rate", None)
    return run_serving(Target(server.url, MODEL), requests, arrival_offsets(len(requests), rate, 0), **kwargs)


def _check_distribution(stats: LatencyStats | None) -> None:
    assert stats is not None
    assert 0 <= stats.median_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.mean_ms >= 0


# ---- arrivals, SLOs, statistics (no server)


def test_arrival_offsets_are_a_seeded_poisson_schedule() -> None:
    offsets = arrival_offsets(2000, 4.0, seed=3)
    assert offsets[0] == 0.0 and len(offsets) == 2000
    gaps = np.diff(offsets)
    assert (gaps >= 0).all()
    assert arrival_offsets(2000, 4.0, seed=3) == offsets  # the same seed, the same schedule
    assert arrival_offsets(2000, 4.0, seed=4) != offsets
    # Exponential gaps of mean 1 / rate: over 1999 draws the sample mean and std are within 10% of 0.25 s
    # (their standard error is 2.2%), and the coefficient of variation of an exponential is 1.
    assert gaps.mean() == pytest.approx(0.25, rel=0.1)
    assert gaps.std() == pytest.approx(0.25, rel=0.1)
    # Doubling the rate halves every gap of the same seed's schedule.
    assert arrival_offsets(50, 8.0, seed=3) == pytest.approx([t / 2 for t in offsets[:50]])
    assert arrival_offsets(5, None, seed=3) == [0.0] * 5
    assert arrival_offsets(1, 2.0, seed=0) == [0.0]
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(UsageError, match="--request-rate"):
            arrival_offsets(5, bad, seed=0)


def test_parse_slo() -> None:
    assert parse_slo("ttft=200,tpot=50") == Slo(ttft_ms=200.0, tpot_ms=50.0)
    assert parse_slo("e2e=1500.5") == Slo(e2e_ms=1500.5)
    assert parse_slo(" TTFT = 10 , e2e=20") == Slo(ttft_ms=10.0, e2e_ms=20.0)


@pytest.mark.parametrize(
    "text", ["", "ttft", "ttft=", "ttft=abc", "ttft=0", "tpot=-5", "itl=5", "ttft=1,ttft=2"]
)
def test_parse_slo_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="--slo"):
        parse_slo(text)


def test_latency_stats_by_hand() -> None:
    stats = LatencyStats.of([0.005, 0.001, 0.004, 0.002, 0.003])
    assert stats is not None
    # Linear interpolation at rank p/100 * (n - 1): p90 -> 3.6 -> 4 + 0.6 * (5 - 4) ms; p99 -> 3.96.
    assert (stats.mean_ms, stats.median_ms) == (pytest.approx(3.0), pytest.approx(3.0))
    assert (stats.p90_ms, stats.p99_ms) == (pytest.approx(4.6), pytest.approx(4.96))
    assert LatencyStats.of([]) is None


def test_summarize_by_hand() -> None:
    records = [
        RequestRecord(4, 0.0, input_tokens=10, output_tokens=4, ttft_s=0.1, e2e_s=0.4, itl_s=(0.1,) * 3),
        RequestRecord(5, 0.0, input_tokens=20, output_tokens=3, ttft_s=0.3, e2e_s=0.5, itl_s=(0.1, 0.1)),
        RequestRecord(1, 0.1, input_tokens=5, output_tokens=1, ttft_s=0.2, e2e_s=0.2),
        RequestRecord(3, 0.5, error="HTTP 500: later", e2e_s=0.1),
        RequestRecord(3, 0.2, error="HTTP 503: first", e2e_s=0.3),
    ]
    assert [r.tpot_s for r in records[:3]] == [pytest.approx(0.1), pytest.approx(0.1), None]
    result = summarize(records, elapsed_s=2.0, slo=Slo(ttft_ms=250, tpot_ms=100.0001))
    assert (result.num_requests, result.completed, result.failed) == (5, 3, 2)
    assert result.first_error == "HTTP 503: first"  # failed at 0.5 s, before the other's 0.6 s
    assert result.short_outputs == 1  # 3 of 5 tokens
    assert (result.input_tokens, result.output_tokens) == (35, 8)
    assert result.requests_per_s == 1.5
    assert (result.input_tok_per_s, result.output_tok_per_s, result.total_tok_per_s) == (17.5, 4.0, 21.5)
    # TTFT 0.1 and 0.2 s are within 250 ms (the single-token request has no TPOT to miss); 0.3 s is not.
    assert result.good_requests == 2 and result.goodput_requests_per_s == 1.0
    assert result.ttft is not None and result.ttft.mean_ms == pytest.approx(200.0)
    assert result.itl is not None and result.itl.mean_ms == pytest.approx(100.0)
    assert result.tpot is not None and result.tpot.median_ms == pytest.approx(100.0)
    assert result.e2e is not None and result.e2e.median_ms == pytest.approx(400.0)
    assert summarize(records, 2.0).good_requests is None


def test_serving_report_tables_notes_and_record() -> None:
    records = [
        RequestRecord(4, 0.0, input_tokens=10, output_tokens=4, ttft_s=0.1, e2e_s=0.4, itl_s=(0.1,) * 3),
        RequestRecord(4, 0.0, error="HTTP 500: boom", e2e_s=0.1),
    ]
    result = summarize(records, elapsed_s=2.0, slo=Slo(ttft_ms=50))
    throughput, latencies = serving_tables(result)
    assert throughput.columns == ("throughput", "value")
    assert throughput.rows == [
        ("requests", "2"),
        ("completed", "1"),
        ("failed", "1"),
        ("time (s)", "2.00"),
        ("req/s", "0.50"),
        ("input tok/s", "5.0"),
        ("output tok/s", "2.0"),
        ("total tok/s", "7.0"),
        ("goodput req/s", "0.00"),
    ]
    assert latencies.columns == ("latency (ms)", "mean", "median", "p90", "p99")
    assert [row[0] for row in latencies.rows] == ["TTFT", "ITL", "TPOT", "E2E"]
    assert latencies.rows[0] == ("TTFT", "100.00", "100.00", "100.00", "100.00")
    assert serving_notes(result) == ["1 of 2 requests failed; first error: HTTP 500: boom"]
    nothing = summarize(records[1:], elapsed_s=1.0)
    assert "goodput req/s" not in [label for label, _ in serving_tables(nothing)[0].rows]
    assert serving_tables(nothing)[1].rows[0] == ("TTFT", "-", "-", "-", "-")
    report = build_report("serve", {"model": MODEL}, [result], [])
    (row,) = report["results"]
    assert tuple(row) == SERVING_KEYS
    assert row["mean_ttft_ms"] == pytest.approx(100.0) and row["goodput_requests_per_s"] == 0.0
    assert report["machine"]["torch"] is None and report["machine"]["gpu_count"] is None
    assert build_report("serve", {}, [nothing], [])["results"][0]["p99_e2e_ms"] is None
    json.dumps(report)


def test_sharegpt_workload(tmp_path: Path) -> None:
    path = tmp_path / "sharegpt.json"
    conversations = [
        {"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": "answer"}]}
        for i in range(6)
    ]
    conversations.insert(2, {"conversations": [{"from": "gpt", "value": "no human turn"}]})
    conversations.insert(4, {"id": "no conversations"})
    conversations.append(
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "late"}]}
    )
    path.write_text(json.dumps(conversations))
    picked = sharegpt_workload(path, 5, (2, 9), seed=1)
    assert picked == sharegpt_workload(path, 5, (2, 9), seed=1)
    texts = [r.text for r in picked]
    assert len(set(texts)) == 5 and set(texts) <= {f"question {i}" for i in range(6)} | {"late"}
    assert all(2 <= r.output_len <= 9 for r in picked)
    assert sorted(r.text for r in sharegpt_workload(path, 7, (1, 1), seed=0)) == sorted(
        [f"question {i}" for i in range(6)] + ["late"]
    )
    with pytest.raises(UsageError, match="has 7 conversations with a human turn"):
        sharegpt_workload(path, 8, (1, 1), seed=0)
    with pytest.raises(UsageError, match="does not exist"):
        sharegpt_workload(tmp_path / "missing.json", 1, (1, 1), seed=0)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a readable JSON file"):
        sharegpt_workload(tmp_path / "bad.json", 1, (1, 1), seed=0)


def test_serve_workload_random_ids_skip_the_bottom_tenth() -> None:
    cfg = BenchConfig(num_prompts=40, input_len="5,9", output_len="3", dataset_seed=2)
    requests = load_serve_workload(cfg, None, vocab_size=500)
    assert all(isinstance(r, BenchRequest) and 5 <= r.input_len <= 9 and r.output_len == 3 for r in requests)
    ids = [t for r in requests for t in r.prompt_ids]
    assert min(ids) >= 50 and max(ids) < 500
    assert requests == random_workload(40, (5, 9), (3, 3), 500, 2, first_id=50).requests
    # first_id 0 is the old behaviour exactly: the same seed gives the same prompts as before.
    assert random_workload(4, (3, 5), (2, 2), 384, 7) == random_workload(
        4, (3, 5), (2, 2), 384, 7, first_id=0
    )


def test_client_imports_neither_torch_nor_the_engine() -> None:
    code = (
        "import sys, minisgl_cli.bench.serving;"
        "assert not any(m == 'torch' or m.startswith('minisgl_cli.engine') for m in sys.modules), 'engine';"
        "import minisgl_cli.bench.report, minisgl_cli.cli.bench;"
        "assert 'torch' not in sys.modules, 'torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- against the fake server


def test_token_totals_bodies_and_timing_consistency(fake: FakeServer) -> None:
    fake.state.delay_s = 0.002
    requests = _workload(10, seed=5)
    done: list[int] = []
    records, elapsed = _run(fake, requests, on_done=done.append)
    assert done == [1] * 10 and all(r.ok for r in records)
    result = summarize(records, elapsed)
    assert (result.completed, result.failed, result.short_outputs) == (10, 0, 0)
    assert result.input_tokens == sum(r.input_len for r in requests)
    assert result.output_tokens == sum(r.output_len for r in requests)
    assert [r.output_tokens for r in records] == [r.output_len for r in requests]  # request order kept
    bodies = sorted(fake.state.bodies, key=lambda b: b["prompt"])
    expected = sorted(requests, key=lambda r: r.prompt_ids)
    for body, request in zip(bodies, expected, strict=True):
        assert body == {
            "model": MODEL,
            "max_tokens": request.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "prompt": request.prompt_ids,
        }
    for r in records:
        assert 0 < r.ttft_s <= r.e2e_s and r.start_s >= 0
        assert len(r.itl_s) == r.output_tokens - 1  # one chunk per token
        assert sum(r.itl_s) <= r.e2e_s - r.ttft_s
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / (r.output_tokens - 1))
        assert r.start_s + r.e2e_s <= elapsed
    for stats in (result.ttft, result.itl, result.tpot, result.e2e):
        _check_distribution(stats)
    assert result.ttft.mean_ms <= result.e2e.mean_ms  # type: ignore[union-attr]


def test_chunks_of_several_tokens_share_their_gap(fake: FakeServer) -> None:
    fake.state.tokens_per_chunk = 3
    (record,), _ = _run(fake, [BenchRequest([101, 102], 7)])
    assert record.ok and record.output_tokens == 7
    itl = record.itl_s
    assert len(itl) == 6
    # Chunks of 3, 3 and 1 tokens: the first chunk's two extra tokens came with it (no wait), the second
    # chunk's gap is split in three equal parts, the third's is one token's.
    assert itl[:2] == (0.0, 0.0)
    assert itl[2] == itl[3] == itl[4] > 0 and itl[5] > 0
    assert sum(itl) <= record.e2e_s - record.ttft_s


def test_max_concurrency_caps_requests_in_flight(fake: FakeServer) -> None:
    # The server holds the first requests until 3 are in flight, so the cap is reached whatever the timing.
    fake.state.hold_until = 3
    fake.state.delay_s = 0.001
    records, _ = _run(fake, _workload(12), max_concurrency=3)
    assert all(r.ok for r in records) and len(fake.state.bodies) == 12
    assert fake.state.max_in_flight == 3


def test_without_a_cap_or_rate_every_request_is_in_flight_at_once(fake: FakeServer) -> None:
    fake.state.hold_until = 8
    records, _ = _run(fake, _workload(8))
    assert all(r.ok for r in records) and fake.state.max_in_flight == 8


def test_request_rate_sends_on_the_poisson_schedule(fake: FakeServer) -> None:
    requests = _workload(6)
    records, _ = _run(fake, requests, request_rate=200.0)
    offsets = arrival_offsets(6, 200.0, 0)
    assert all(r.ok for r in records)
    # Nothing leaves before it is due (the event loop may only be late).
    assert all(r.start_s >= due for r, due in zip(records, offsets, strict=True))


def test_http_500_counts_as_a_failure(fake: FakeServer) -> None:
    fake.state.fail_every = 3
    requests = _workload(9, seed=1)
    records, elapsed = _run(fake, requests, max_concurrency=1)  # one at a time: the failing ones are known
    result = summarize(records, elapsed)
    assert (result.completed, result.failed) == (6, 3)
    assert [r.ok for r in records] == [True, True, False] * 3
    assert result.first_error == "HTTP 500: injected failure"
    ok = [q for q, r in zip(requests, records, strict=True) if r.ok]
    assert result.output_tokens == sum(q.output_len for q in ok)
    assert result.input_tokens == sum(q.input_len for q in ok)


def test_short_outputs_succeed_but_are_reported(fake: FakeServer) -> None:
    fake.state.cap_tokens = 3
    requests = [BenchRequest([200, 201], n) for n in (2, 3, 5, 6)]
    records, elapsed = _run(fake, requests)
    result = summarize(records, elapsed)
    assert result.completed == 4 and result.short_outputs == 2
    assert [r.output_tokens for r in records] == [2, 3, 3, 3]
    assert "2 completed requests got fewer tokens than asked" in serving_notes(result)[0]


def test_a_stream_without_done_is_a_failure(fake: FakeServer) -> None:
    fake.state.drop_done = True
    records, _ = _run(fake, _workload(2))
    assert [r.error for r in records] == ["the stream ended before 'data: [DONE]'"] * 2


def test_sharegpt_requests_go_to_chat_completions(fake: FakeServer) -> None:
    requests = [ChatRequest("one two three", 4), ChatRequest("four five", 2)]
    records, elapsed = run_serving(Target(fake.url, MODEL, temperature=0.5), requests, [0.0, 0.0])
    result = summarize(records, elapsed)
    assert result.completed == 2
    assert (result.input_tokens, result.output_tokens) == (5, 6)  # the server's usage counts
    assert [len(r.itl_s) for r in records] == [3, 1]  # the role chunk with empty content is not a token
    body = next(b for b in fake.state.bodies if b["max_tokens"] == 4)
    assert body["messages"] == [{"role": "user", "content": "one two three"}]
    assert body["temperature"] == 0.5 and body["ignore_eos"] is True and "prompt" not in body


def test_list_models_of_a_live_server(fake: FakeServer, dead_url: str) -> None:
    assert list_models(fake.url) == [MODEL, "other"]
    with pytest.raises(MinisglError, match="cannot reach a server at"):
        list_models(dead_url)
    with pytest.raises(MinisglError, match="answered HTTP 404"):
        list_models(fake.url + "/not-openai")


# ---- the command


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


def run_bench(*args: str | Path) -> CliResult:
    """`minisgl bench ARGS` in this process, through the app's one error handler (real exit codes)."""
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # a group, as in the real app, so that `bench` is a subcommand
        pass

    app.add_typer(bench.app, name="bench")
    with CliRunner().isolation() as (out, err, _):
        code = ui.run(app, ["bench", *map(str, args)])
        sys.stdout.flush()
        sys.stderr.flush()
        return CliResult(code, out.getvalue().decode(), err.getvalue().decode())


def test_command_prints_tables_and_writes_json(fake: FakeServer, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    args = ("--num-prompts", "6", "--input-len", "3,8", "--output-len", "2,5", "--dataset-seed", "3")
    res = run_bench(
        "serve", "--url", fake.url + "/v1", *args, "--vocab-size", "600", "--max-concurrency", "2",
        "--slo", "ttft=60000,tpot=60000", "--json", out,
    )  # fmt: skip
    assert res.code == 0, res.stderr
    assert f"bench serve: {MODEL} at {fake.url}" in res.stdout
    for label in ("│ completed ", "│ goodput req/s ", "│ TTFT ", "│ ITL ", "│ TPOT ", "│ E2E ", " p99 "):
        assert label in res.stdout, res.stdout
    report = json.loads(out.read_text())
    assert list(report) == ["schema_version", "command", "machine", "config", "results", "comparisons"]
    assert (report["schema_version"], report["command"], report["comparisons"]) == (1, "serve", [])
    machine = report["machine"]
    assert (machine["torch"], machine["transformers"], machine["gpu"], machine["gpu_count"]) == (None,) * 4
    assert isinstance(machine["cpu_count"], int) and isinstance(machine["minisgl"], str)
    assert report["config"] == {
        "model": MODEL,
        "url": fake.url,
        "bench": {
            "dataset": "random",
            "dataset_path": None,
            "num_prompts": 6,
            "input_len": "3,8",
            "output_len": "2,5",
            "dataset_seed": 3,
            "vocab_size": 600,
            "request_rate": None,
            "max_concurrency": 2,
            "temperature": 0.0,
            "slo": {"ttft_ms": 60000.0, "tpot_ms": 60000.0, "e2e_ms": None},
        },
    }
    (row,) = report["results"]
    assert tuple(row) == SERVING_KEYS
    workload = load_serve_workload(
        BenchConfig(num_prompts=6, input_len="3,8", output_len="2,5", dataset_seed=3), None, 600
    )
    assert (row["num_requests"], row["completed"], row["failed"], row["first_error"]) == (6, 6, 0, None)
    assert row["input_tokens"] == sum(r.input_len for r in workload)
    assert row["output_tokens"] == sum(r.output_len for r in workload)
    assert sorted(b["prompt"] for b in fake.state.bodies) == sorted(r.prompt_ids for r in workload)
    assert row["requests_per_s"] == pytest.approx(6 / row["elapsed_s"])
    assert 0 <= row["goodput_requests_per_s"] <= row["requests_per_s"]
    assert row["median_ttft_ms"] <= row["p90_ttft_ms"] <= row["p99_ttft_ms"]
    assert fake.state.max_in_flight <= 2


def test_command_plot_writes_a_png(fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # matplotlib's font cache goes here rather than under ~, were matplotlib first loaded by this test.
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    out = tmp_path / "serve.png"
    args = ("--num-prompts", "5", "--input-len", "3", "--output-len", "4", "--plot", out)
    res = run_bench("serve", "--url", fake.url, *args)
    assert res.code == 0, res.stderr
    assert f"wrote {out}" in res.stderr
    import matplotlib.image

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out).shape == (864, 1200, 4)  # 2 x 2 panels of 5 x 3.6 inches at 120 dpi


def test_command_plot_without_matplotlib_exits_2_before_contacting_the_server(
    dead_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    res = run_bench("serve", "--url", dead_url, "--plot", tmp_path / "p.png")
    assert res.code == 2, res.stderr  # after the probe of the dead URL it would be 1
    assert res.error_lines == ['error: --plot needs matplotlib: pip install "minisgl[plot]"']


def test_command_reports_failures(fake: FakeServer) -> None:
    fake.state.fail_every = 2
    res = run_bench("serve", "--url", fake.url, "--num-prompts", "4", "--input-len", "3", "--output-len", "2")
    assert res.code == 0, res.stderr
    assert "2 of 4 requests failed; first error: HTTP 500: injected failure" in res.stdout


def test_command_sharegpt(fake: FakeServer, tmp_path: Path) -> None:
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a b c"}]}] * 3))
    res = run_bench(
        "serve", "--url", fake.url, "--model", "other", "--dataset", "sharegpt", "--dataset-path", path,
        "--num-prompts", "3", "--output-len", "2",
    )  # fmt: skip
    assert res.code == 0, res.stderr
    assert [b["model"] for b in fake.state.bodies] == ["other"] * 3
    assert all(b["messages"] == [{"role": "user", "content": "a b c"}] for b in fake.state.bodies)


def test_unreachable_or_foreign_server_exits_1_with_one_error_line(fake: FakeServer, dead_url: str) -> None:
    for url, fragment in (
        (dead_url, "cannot reach a server at"),
        (fake.url + "/nothing", "answered HTTP 404"),
    ):
        res = run_bench("serve", "--url", url, "--num-prompts", "2", "--input-len", "3", "--output-len", "2")
        assert res.code == 1, res.stderr
        assert len(res.error_lines) == 1 and fragment in res.error_lines[0], res.stderr
        assert "Traceback" not in res.stderr and res.stdout == ""
    assert fake.state.bodies == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--slo", "ttft=fast"), "--slo"),
        (("--slo", "p50=3"), "--slo"),
        (("--request-rate", "0"), "--request-rate"),
        (("--request-rate", "-2"), "--request-rate"),
        (("--max-concurrency", "0"), "--max-concurrency"),
        (("--input-len", "9,3"), "--input-len"),
        (("--output-len", "0"), "--output-len"),
        (("--num-prompts", "0"), "--num-prompts"),
        (("--dataset", "sharegpt"), "add --dataset-path"),
        (("--dataset", "sharegpt", "--dataset-path", "x.json", "--input-len", "5"), "--input-len is for"),
        (("--dataset-path", "x.json"), "--dataset-path is for --dataset sharegpt"),
        (("--dataset", "alpaca"), "dataset 'alpaca' is not supported by bench serve"),
        (("--dataset-seed", "-1"), "dataset seed must be >= 0"),
        (("--vocab-size", "1"), "--vocab-size"),
        (("--temperature", "-1"), "--temperature"),
        (("--json", "no/such/dir/r.json"), "does not exist"),
    ],
)
def test_invalid_arguments_exit_2_before_contacting_the_server(
    dead_url: str, args: tuple[str, ...], fragment: str
) -> None:
    # The URL is dead: an argument checked only after the probe would exit 1, not 2.
    res = run_bench("serve", "--url", dead_url, *args)
    assert res.code == 2, res.stderr
    assert len(res.error_lines) == 1 and fragment in res.error_lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_url_without_scheme_exits_2() -> None:
    res = run_bench("serve", "--url", "localhost:1919")
    assert res.code == 2 and len(res.error_lines) == 1 and "--url" in res.error_lines[0], res.stderr


def test_url_is_required() -> None:
    res = run_bench("serve", "--num-prompts", "2")
    assert res.code == 2 and "--url" in res.stderr
