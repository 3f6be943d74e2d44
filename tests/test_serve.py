"""`minisgl serve` end to end: a real server subprocess on the embedded SmolLM2, driven over loopback with the
official `openai` client and httpx. References: the in-process LLM (same engine, no server in between) for
greedy text and token counts, and the model's tokenizer for prompt token counts."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from server_helpers import ServerProcess, pid_alive, read_metrics, running_server

from minisgl_cli.engine.request import SamplingParams

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
COUNTING = "Count from one to ten: 1, 2, 3,"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    # --max-tokens: the default for requests that omit it (kept small: the fuzzer sends many such requests)
    with running_server(
        "--max-running-requests", "64", "--kv-cache-tokens", "32768", "--max-tokens", "16"
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> Any:
    """The in-process engine on the same model: what the server must reproduce for greedy requests."""
    from minisgl_cli.engine.llm import LLM

    return LLM(str(smollm2_dir))


# ---- OpenAI semantics


def test_models_lists_the_served_model(client: openai.OpenAI, model_name: str) -> None:
    assert model_name == "smollm2-135m-instruct"
    assert [m.id for m in client.models.list().data] == [model_name]


def test_chat_greedy_equals_the_in_process_engine(
    client: openai.OpenAI, model_name: str, reference: Any
) -> None:
    reply = client.chat.completions.create(model=model_name, messages=CHAT, temperature=0, max_tokens=24)
    expected = reference.generate(CHAT, SamplingParams(temperature=0, max_tokens=24))[0]
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(reference.encode(CHAT))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_prompt_tokens_equal_the_tokenizers_count(
    client: openai.OpenAI, model_name: str, smollm2_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    reply = client.chat.completions.create(model=model_name, messages=CHAT, temperature=0, max_tokens=2)
    assert reply.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    completion = client.completions.create(model=model_name, prompt=COUNTING, temperature=0, max_tokens=2)
    assert completion.usage.prompt_tokens == len(tok.encode(COUNTING))


def test_streaming_chat_concatenates_to_the_full_answer(client: openai.OpenAI, model_name: str) -> None:
    kwargs: dict[str, Any] = {"model": model_name, "messages": CHAT, "temperature": 0, "max_tokens": 24}
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_streaming_completion_and_token_counts(client: openai.OpenAI, model_name: str) -> None:
    stream = client.completions.create(
        model=model_name,
        prompt=COUNTING,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 12
    full = client.completions.create(
        model=model_name, prompt=COUNTING, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert full.choices[0].finish_reason == "length"


def test_server_sampling_defaults_apply(client: openai.OpenAI, model_name: str) -> None:
    reply = client.completions.create(model=model_name, prompt=COUNTING, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 16  # serve --max-tokens 16
    assert reply.choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text(client: openai.OpenAI, model_name: str) -> None:
    free = client.completions.create(model=model_name, prompt=COUNTING, max_tokens=16, temperature=0)
    assert " 5," in free.choices[0].text  # the model counts on; the stops below cut into that
    for stop in (" 5", [" 7", " 5,"]):
        reply = client.completions.create(
            model=model_name, prompt=COUNTING, max_tokens=16, temperature=0, stop=stop
        )
        cut = free.choices[0].text.index(" 5")
        assert reply.choices[0].text == free.choices[0].text[:cut]
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens < free.usage.completion_tokens


def test_n_choices_and_seeds_reproduce(client: openai.OpenAI, model_name: str) -> None:
    kwargs: dict[str, Any] = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Tell me a story about a cat."}],
        "temperature": 1.0,
        "max_tokens": 24,
        "seed": 1234,
    }
    first = client.chat.completions.create(**kwargs, n=2)
    again = client.chat.completions.create(**kwargs, n=2)
    assert sorted(c.index for c in first.choices) == [0, 1]
    texts = [c.message.content for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.message.content for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]  # two samples, not one twice
    # choice i runs with seed + i: the same as single requests with those seeds
    single = [client.chat.completions.create(**{**kwargs, "seed": 1234 + i}) for i in range(2)]
    assert [s.choices[0].message.content for s in single] == texts
    assert first.usage.completion_tokens == sum(s.usage.completion_tokens for s in single)
    assert first.usage.prompt_tokens == single[0].usage.prompt_tokens
    other = client.chat.completions.create(**{**kwargs, "seed": 99})
    assert other.choices[0].message.content not in texts


def test_logprobs(client: openai.OpenAI, model_name: str) -> None:
    reply = client.chat.completions.create(
        model=model_name, messages=CHAT, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
    assert "".join(e.token for e in entries) == reply.choices[0].message.content


def test_native_generate_returns_text_and_ids(server: ServerProcess, reference: Any) -> None:
    body = {"text": COUNTING, "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
    reply = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    expected = reference.generate(COUNTING, SamplingParams(temperature=0, max_tokens=8))[0]
    assert reply["output_ids"] == expected.token_ids
    assert reply["text"] == expected.text
    assert reply["meta_info"]["prompt_tokens"] == len(reference.encode(COUNTING))


def test_prefix_cache_reports_cached_tokens(client: openai.OpenAI, model_name: str) -> None:
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 20}, *CHAT]
    client.chat.completions.create(model=model_name, messages=messages, temperature=0, max_tokens=2)
    again = client.chat.completions.create(model=model_name, messages=messages, temperature=0, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


# ---- errors


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]


def test_invalid_parameters_are_400(client: openai.OpenAI, model_name: str) -> None:
    for kwargs, param in (
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 5}, "presence_penalty"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model_name, messages=CHAT, **kwargs)
        assert info.value.status_code == 400
        assert _error(info.value)["param"] == param, kwargs
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=[{"role": "user"}])  # no content


def test_malformed_json_is_400(server: ServerProcess) -> None:
    for body in (b"{not json", b"[1, 2]", b'{"model": 3}'):
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert reply.status_code == 400, body
        assert reply.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-5", messages=CHAT)
    assert "gpt-5" in _error(info.value)["message"]


def test_context_length_is_400(client: openai.OpenAI, model_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=100_000)
    assert _error(info.value)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="hello " * 9000, max_tokens=1)
    assert _error(info.value)["code"] == "context_length_exceeded"


def test_bad_token_ids_are_400(client: openai.OpenAI, model_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt=[1, 2, 10**9], max_tokens=1)
    assert "out of range" in _error(info.value)["message"]


# ---- disconnects, load, fuzz


async def _stream_and_drop(url: str, model: str, chunks_before_drop: int) -> None:
    body = {
        "model": model,
        "prompt": COUNTING,
        "max_tokens": 400,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen >= chunks_before_drop:
                        return  # leaving the block closes the connection mid-stream


def _wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        values = read_metrics(url)
        if (
            values.get("minisgl_num_requests_running") == 0
            and values.get("minisgl_kv_cache_usage_ratio") == 0
        ):
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine did not go idle: {values}")
        time.sleep(0.2)


def test_disconnected_streams_free_their_kv(server: ServerProcess, model_name: str) -> None:
    async def run() -> None:
        await asyncio.gather(*(_stream_and_drop(server.url, model_name, 2 + i) for i in range(6)))

    asyncio.run(run())
    _wait_idle(server.url)  # 400-token requests would hold KV for many seconds had they not been aborted


async def _client_round(url: str, model: str, rng: random.Random) -> int:
    n = rng.randint(2, 12)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Say something about the number {rng.randint(0, 999)}."}],
        "max_tokens": n,
        "ignore_eos": True,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(timeout=300) as http:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            usage = None
            done = False
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    usage = chunk.get("usage") or usage
    assert done and usage is not None
    assert usage["completion_tokens"] == n
    return n


def test_64_concurrent_streams_three_rounds(server: ServerProcess, model_name: str) -> None:
    rng = random.Random(0)

    async def run() -> list[int]:
        done: list[int] = []
        for _ in range(3):
            done += await asyncio.gather(*(_client_round(server.url, model_name, rng) for _ in range(64)))
        return done

    before = read_metrics(server.url)
    done = asyncio.run(run())
    assert len(done) == 192
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    after = _wait_idle(server.url)
    key = 'minisgl_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert after[key] - before.get(key, 0) == 192
    assert after["minisgl_generation_tokens_total"] - before["minisgl_generation_tokens_total"] == sum(done)


def _bounded(case: Any) -> None:
    """Small outputs: the fuzzer checks input handling, not generation length."""
    body = case.body if isinstance(case.body, dict) else {}
    for holder, key, most in (
        (body, "max_tokens", 8),
        (body, "max_completion_tokens", 8),
        (body, "n", 2),
        (body.get("sampling_params"), "max_new_tokens", 8),
    ):
        if isinstance(holder, dict) and isinstance(holder.get(key), int) and holder[key] > most:
            holder[key] = most


def test_fuzzing_the_openapi_schema_finds_no_5xx(server: ServerProcess) -> None:
    # Hypothesis drives each operation's strategy directly (schemathesis' pytest plugin for schemas known only
    # at run time does not work with every pytest release).
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/generate"}
    calls: dict[str, int] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: Any) -> None:
            _bounded(case)
            case.call_and_validate(checks=[not_a_server_error], timeout=60)
            calls[case.operation.label] = calls.get(case.operation.label, 0) + 1

        fuzz()
    assert len(calls) == len(operations), calls  # a GET without parameters has a single case
    assert all(count >= 5 for label, count in calls.items() if label.startswith("POST")), calls
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


# ---- a second server: API key, queue limit, and a worker that dies


@pytest.fixture(scope="module")
def small_server() -> Iterator[ServerProcess]:
    srv = ServerProcess("--api-key", "sekrit", "--max-running-requests", "1", "--max-queue", "1")
    try:
        srv.wait_listening()
        yield srv
    finally:
        srv.kill()


def test_api_key_is_required(small_server: ServerProcess) -> None:
    url = f"{small_server.url}/v1"
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    assert _error(info.value)["code"] == "invalid_api_key"
    missing = httpx.post(f"{url}/chat/completions", json={"model": "x", "messages": CHAT}, timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=url, api_key="sekrit", max_retries=0)
    assert good.models.list().data[0].id == "smollm2-135m-instruct"
    assert httpx.get(f"{small_server.url}/health", timeout=10).status_code == 200  # open without a key


def test_full_queue_is_503_with_retry_after(small_server: ServerProcess) -> None:
    headers = {"Authorization": "Bearer sekrit"}
    body = {"model": "smollm2-135m-instruct", "prompt": COUNTING, "max_tokens": 64, "ignore_eos": True}

    async def one(http: httpx.AsyncClient) -> httpx.Response:
        return await http.post(f"{small_server.url}/v1/completions", json=body, headers=headers)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http) for _ in range(6)))

    replies = asyncio.run(run())
    statuses = sorted(r.status_code for r in replies)
    # At most one request waits in the scheduler's queue (running ones are not waiting): the rest are turned
    # away at once, and what was accepted runs to completion.
    assert 200 in statuses and 503 in statuses and set(statuses) == {200, 503}, statuses
    busy = next(r for r in replies if r.status_code == 503)
    assert busy.headers["retry-after"]
    assert busy.json()["error"]["message"]
    ok = [r.json() for r in replies if r.status_code == 200]
    assert all(r["usage"]["completion_tokens"] == 64 for r in ok)


def test_a_dead_worker_turns_health_503_and_the_server_exits(small_server: ServerProcess) -> None:
    import os
    import signal

    pids = small_server.child_pids()
    os.kill(pids["scheduler"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    status = None
    while time.monotonic() < deadline and status != 503:
        try:
            status = httpx.get(f"{small_server.url}/health", timeout=5).status_code
        except httpx.HTTPError:
            break
        time.sleep(0.1)
    assert status == 503
    code = small_server.proc.wait(60)
    assert code != 0
    assert "scheduler process died" in small_server.log
    time.sleep(0.5)
    assert not any(pid_alive(pid) for pid in pids.values())


# ---- lifecycle


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_drains_then_stops_every_process(sig: str) -> None:
    import signal

    srv = ServerProcess("--num-tokenizers", "2")
    try:
        url = srv.wait_listening()
        pids = srv.child_pids()
        assert set(pids) == {"scheduler", "tokenizer-0", "tokenizer-1"}
        body = {
            "text": COUNTING,
            "sampling_params": {"max_new_tokens": 40, "ignore_eos": True},
            "stream": True,
        }
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            srv.proc.send_signal(getattr(signal, sig))  # mid-stream: the request still finishes
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["meta_info"]["completion_tokens"] == 40
        assert srv.proc.wait(60) == 0
        time.sleep(0.5)
        assert not any(pid_alive(pid) for pid in pids.values())
        port = int(url.rsplit(":", 1)[1])
        with socket.socket() as sock:
            # as a restarted server binds it: SO_REUSEADDR passes closed connections in TIME_WAIT, not a listener
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
    finally:
        srv.kill()


def test_startup_errors_are_one_line(tmp_path: Path) -> None:
    srv = ServerProcess("-m", str(tmp_path / "missing"), "--host", "0.0.0.0")
    code = srv.proc.wait(60)
    assert code == 2
    assert "without --api-key" in srv.log  # the warning comes first
    assert srv.log.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in srv.log

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = ServerProcess("--port", str(port))
        assert busy.proc.wait(60) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in busy.log


def test_bench_serve_against_the_live_server(server: ServerProcess, tmp_path: Path) -> None:
    import subprocess
    import sys

    from minisgl_cli.bench.workload import random_workload

    before = read_metrics(server.url)
    out = tmp_path / "serve.json"
    args = ["--num-prompts", "6", "--max-concurrency", "3", "--input-len", "16,32", "--output-len", "4,8"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "minisgl_cli",
            "bench",
            "serve",
            "--url",
            server.url,
            *args,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())["results"][0]
    # The same workload the command builds: random ids in [1000, 10000), seed 0.
    workload = random_workload(6, (16, 32), (4, 8), 10_000, 0, first_id=1_000)
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["input_tokens"] == workload.input_tokens
    assert result["output_tokens"] == workload.output_tokens
    after = _wait_idle(server.url)
    assert (
        after["minisgl_generation_tokens_total"] - before["minisgl_generation_tokens_total"]
        == workload.output_tokens
    )
    assert result["p99_ttft_ms"] >= result["median_ttft_ms"] > 0


# ---- structured outputs and logit_bias, through the openai client

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 1, "maximum": 110},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "minItems": 1, "maxItems": 2},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "pets", "home"],
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
PERSON_CHAT = [{"role": "user", "content": "Invent a person and describe them as JSON."}]


def _streamed_text(client: openai.OpenAI, **kwargs: Any) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def test_json_schema_outputs_validate_streamed_and_not_beside_free_requests(
    client: openai.OpenAI, model_name: str
) -> None:
    """Several constrained requests at once, at several seeds and temperatures, with unconstrained ones in the
    same batches: every constrained answer is JSON that validates, every free answer is what it is alone."""
    import concurrent.futures

    import jsonschema

    def constrained(i: int) -> tuple[str, str | None]:
        kwargs = dict(model=model_name, messages=PERSON_CHAT, response_format=PERSON_FORMAT, max_tokens=120,
                      temperature=(0.0, 0.6, 1.0)[i % 3], seed=i)  # fmt: skip
        if i % 2:
            return _streamed_text(client, **kwargs)
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content or "", choice.finish_reason

    def free() -> str:
        out = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=12, temperature=0)
        return out.choices[0].message.content or ""

    alone = free()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(constrained, i) for i in range(6)] + [pool.submit(free) for _ in range(3)]
        results = [job.result() for job in jobs]
    for text, finish in results[:6]:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert results[6:] == [alone] * 3


def test_regex_choice_and_completions_constraints(client: openai.OpenAI, model_name: str) -> None:
    import re

    out = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=40,
                                         extra_body={"guided_regex": r"[A-Z][a-z]{1,10}, [A-Z][a-z]{1,10}"})  # fmt: skip
    assert re.fullmatch(r"[A-Z][a-z]{1,10}, [A-Z][a-z]{1,10}", out.choices[0].message.content or "")
    out = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=20, temperature=1.0,
                                         extra_body={"structured_outputs": {"choice": ["Paris", "Lyon"]}})  # fmt: skip
    assert out.choices[0].message.content in ("Paris", "Lyon")
    # The openai client's completions take response_format only as an extra (OpenAI's own API lacks it there).
    done = client.completions.create(model=model_name, prompt="A person as JSON:", max_tokens=60, temperature=0,
                                     extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
    assert done.choices[0].finish_reason == "stop", done.choices[0].text
    assert isinstance(json.loads(done.choices[0].text), dict)


def test_bad_constraints_and_tools_are_400_naming_the_field(client: openai.OpenAI, model_name: str) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=CHAT, response_format=bad)  # type: ignore[arg-type]
    assert (
        _error(info.value)["param"].startswith("response_format")
        and "nonsense" in _error(info.value)["message"]
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=CHAT, extra_body={"guided_regex": "a(b"})
    assert _error(info.value)["param"] == "guided_regex"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as info:  # SmolLM2's template shows no tool format to parse
        client.chat.completions.create(model=model_name, messages=CHAT, tools=[tool])  # type: ignore[list-item]
    assert _error(info.value)["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=CHAT, tools=[tool],  # type: ignore[list-item]
                                       tool_choice={"type": "function", "function": {"name": "g"}})  # fmt: skip
    assert _error(info.value)["param"] == "tool_choice" and "'g'" in _error(info.value)["message"]


def test_logit_bias_bans_the_greedy_first_token(
    client: openai.OpenAI, model_name: str, reference: Any
) -> None:
    first = client.completions.create(
        model=model_name, prompt=COUNTING, max_tokens=1, temperature=0, logprobs=0
    )
    token = reference.tokenizer.convert_tokens_to_ids(reference.tokenizer.tokenize(first.choices[0].text))[0]
    banned = client.completions.create(model=model_name, prompt=COUNTING, max_tokens=1, temperature=0,
                                       logit_bias={str(token): -100})  # fmt: skip
    assert banned.choices[0].text != first.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt=COUNTING, logit_bias={"99999999": 1})
    assert _error(info.value)["param"] == "logit_bias"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
    "additionalProperties": False}}}  # fmt: skip
WEATHER_CHAT = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def _streamed_calls(client: openai.OpenAI, **kwargs: Any) -> tuple[list[tuple[str, str]], str | None]:
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                slot = calls.setdefault(call.index, ["", ""])
                slot[0] += (call.function.name or "") if call.function else ""
                slot[1] += (call.function.arguments or "") if call.function else ""
            finish = choice.finish_reason or finish
    return [(name, args) for name, args in (calls[i] for i in sorted(calls))], finish


def test_named_and_required_tool_calls_validate_streamed_and_not(
    client: openai.OpenAI, model_name: str
) -> None:
    """A grammar built from the tools' schemas makes even this small model's calls valid."""
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, CLOCK_TOOL)}
    named = {"type": "function", "function": {"name": "get_weather"}}
    for temperature in (0.0, 1.0):
        kwargs = dict(model=model_name, messages=WEATHER_CHAT, tools=[WEATHER_TOOL, CLOCK_TOOL], max_tokens=60,
                      temperature=temperature, seed=3)  # fmt: skip
        choice = client.chat.completions.create(tool_choice=named, **kwargs).choices[0]  # type: ignore[arg-type]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.id.startswith("call_") and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), schemas["get_weather"])
        streamed, finish = _streamed_calls(client, tool_choice=named, **kwargs)
        assert finish == "tool_calls" and streamed == [(call.function.name, call.function.arguments)]
        required = client.chat.completions.create(tool_choice="required", **kwargs).choices[0]  # type: ignore[arg-type]
        assert required.finish_reason == "tool_calls" and required.message.tool_calls
        for made in required.message.tool_calls:
            jsonschema.validate(json.loads(made.function.arguments), schemas[made.function.name])
        single = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kwargs)  # type: ignore[arg-type]
        assert len(single.choices[0].message.tool_calls or []) == 1


def test_a_tool_result_round_trips(client: openai.OpenAI, model_name: str) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model=model_name, messages=WEATHER_CHAT, tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                           tool_choice=named, max_tokens=60, temperature=0)  # type: ignore[arg-type]  # fmt: skip
    message = first.choices[0].message
    history = [*WEATHER_CHAT, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18 C and sunny"}]  # type: ignore[index]  # fmt: skip
    answer = client.chat.completions.create(model=model_name, messages=history, max_tokens=20, temperature=0)  # type: ignore[arg-type]
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
