"""`minisgl chat`: the pieces without a model (commands, conversation, transcripts, input blocks, stats, the
loop over a recording backend, the OpenAI backend over a mock transport), then the real REPL end to end on the
embedded SmolLM2: through a pseudo-terminal (pexpect), with piped stdin, and against a live `minisgl serve`.
The reference for every answer is the in-process LLM run greedily on the conversation the REPL should have
sent, so an answer that matches proves what the earlier turns were."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pexpect
import pytest
from rich.console import Console
from server_helpers import ServerProcess, running_server

from minisgl_cli.chat import commands, transcript
from minisgl_cli.chat.backend import Delta
from minisgl_cli.chat.commands import (
    Exit,
    Help,
    Load,
    Reset,
    Save,
    Set,
    SetSystem,
    ShowSettings,
    parse_command,
)
from minisgl_cli.chat.conversation import Conversation
from minisgl_cli.chat.inputs import BlockJoiner, Entry, PipedInput
from minisgl_cli.chat.openai_backend import OpenAIBackend
from minisgl_cli.chat.render import GrowingAnswer
from minisgl_cli.chat.repl import Output, Repl
from minisgl_cli.chat.stats import STOPPED, Meter, TurnStats
from minisgl_cli.config import SamplingConfig
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import MinisglError, UsageError

REPO = Path(__file__).resolve().parents[1]
Q1 = "Hi! My name is Alice and I live in Paris."
Q2 = "What is my name?"
STORY = "Write a very long story about a dragon and a knight, with many chapters."
STATS = re.compile(r"(\d+) tokens? · [\d.]+ tok/s · TTFT \d+ ms")


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ---- commands


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/exit", Exit()),
        ("/quit", Exit()),
        ("/help", Help()),
        ("/reset", Reset()),
        ("/system  Be brief.\nAnd kind. ", SetSystem("Be brief.\nAnd kind.")),
        ("/system", SetSystem(None)),
        ("/set", ShowSettings()),
        ("/set temperature 0.5", Set("temperature", 0.5)),
        ("/set temperature 0", Set("temperature", 0.0)),
        ("/set top_p 1", Set("top_p", 1.0)),
        ("/set top_k -1", Set("top_k", -1)),
        ("/set max_tokens 4", Set("max_tokens", 4)),
        ("/set seed 7", Set("seed", 7)),
        ("/set seed none", Set("seed", None)),
        ("/save ~/chat.md", Save(Path.home() / "chat.md")),
        ("/load chat.json", Load(Path("chat.json"))),
    ],
)
def test_commands_parse(line: str, expected: commands.Command) -> None:
    assert commands.is_command(line)
    assert parse_command(line) == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/set temperature -1", "/set temperature -1: expected a number in [0, 100]"),
        ("/set temperature hot", "/set temperature hot: expected a number in [0, 100]"),
        ("/set temperature nan", "/set temperature nan: expected a number in [0, 100]"),
        ("/set top_p 0", "/set top_p 0: expected a number in (0, 1]"),
        ("/set top_k -2", "/set top_k -2: expected an integer >= -1"),
        ("/set max_tokens 0", "/set max_tokens 0: expected an integer >= 1"),
        ("/set max_tokens 1.5", "/set max_tokens 1.5: expected an integer >= 1"),
        ("/set seed none-ish", "/set seed none-ish: expected an integer"),
        ("/set temperature", "usage: /set NAME VALUE, with NAME one of temperature, top_p"),
        ("/set colour red", "/set colour: not a setting; one of temperature, top_p"),
        ("/exit now", "/exit takes no argument"),
        ("/save", "/save needs a file name"),
        ("/bogus", "unknown command /bogus: type /help for the list"),
    ],
)
def test_bad_commands_get_one_line_saying_why(line: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_command(line)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


# ---- the conversation and its transcripts


def sample_conversation() -> Conversation:
    settings = SamplingConfig(temperature=0.5, max_tokens=64, seed=3, repetition_penalty=1.2)
    conversation = Conversation(settings, "You are terse.")
    conversation.add_turn(Q1, "Hello Alice.")
    conversation.add_turn(Q2, "**Alice**.\n\n- a list item")
    return conversation


def test_messages_put_the_system_prompt_first_then_the_turns_then_the_prompt() -> None:
    conversation = sample_conversation()
    assert conversation.messages("Bye") == [
        {"role": "system", "content": "You are terse."},
        user(Q1),
        assistant("Hello Alice."),
        user(Q2),
        assistant("**Alice**.\n\n- a list item"),
        user("Bye"),
    ]
    conversation.reset()  # the turns go; the system prompt and settings stay
    assert conversation.messages("Hi") == [{"role": "system", "content": "You are terse."}, user("Hi")]
    assert conversation.settings.temperature == 0.5
    conversation.system = None
    assert conversation.messages("Hi") == [user("Hi")]
    assert conversation.chosen == frozenset()
    conversation.change("max_tokens", 4)
    assert conversation.settings.max_tokens == 4 and conversation.chosen == {"max_tokens"}  # /set chooses it
    with pytest.raises(UsageError):  # the config's own check, again
        conversation.change("temperature", -1.0)


def test_json_transcript_round_trips(tmp_path: Path) -> None:
    conversation = sample_conversation()
    path = tmp_path / "chat.json"
    transcript.save(conversation, path, "smollm2")
    data = json.loads(path.read_text())
    assert data["model"] == "smollm2"
    assert data["messages"] == conversation.messages()
    assert data["settings"] == {
        "temperature": 0.5,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "max_tokens": 64,
        "seed": 3,
    }
    # Loaded over other settings: the file's win; what /set cannot change (repetition_penalty) is kept.
    loaded = transcript.load(path, SamplingConfig(repetition_penalty=1.5))
    assert loaded.system == conversation.system
    assert loaded.turns == conversation.turns
    assert loaded.settings == SamplingConfig(temperature=0.5, max_tokens=64, seed=3, repetition_penalty=1.5)
    assert loaded.chosen == set(data["settings"])  # a transcript's settings were chosen when it was saved


def test_markdown_transcript_has_a_heading_per_message(tmp_path: Path) -> None:
    path = tmp_path / "chat.MD"
    transcript.save(sample_conversation(), path, "smollm2")
    assert path.read_text() == (
        "# Chat with smollm2\n\n"
        "## System\n\nYou are terse.\n\n"
        f"## User\n\n{Q1}\n\n"
        "## Assistant\n\nHello Alice.\n\n"
        f"## User\n\n{Q2}\n\n"
        "## Assistant\n\n**Alice**.\n\n- a list item\n"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("# Chat\n", "not JSON"),
        ('{"turns": []}', 'no "messages" list'),
        ('{"messages": [{"role": "user"}]}', "message 0 is not"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "message 0 is a assistant message"),
        (
            '{"messages": [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}]}',
            "message 1",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "the last user message has no answer"),
        ('{"messages": [], "settings": {"temperature": -1}}', "settings.temperature = -1: expected a number"),
        ('{"messages": [], "settings": {"stream": true}}', "unknown setting 'stream'"),
    ],
)
def test_load_refuses_what_save_would_not_write(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "chat.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=re.escape(message)):
        transcript.load(path, SamplingConfig())


def test_save_needs_a_known_extension(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"must end in \.json .* or \.md"):
        transcript.save(sample_conversation(), tmp_path / "chat.txt", "m")
    assert not (tmp_path / "chat.txt").exists()


# ---- input


def test_a_triple_quote_block_is_one_literal_message() -> None:
    lines = ["first", '"""', "/not a command", "", "  indented", '  """  ', "/reset", '"""', "open"]
    source = PipedInput(line + "\n" for line in lines)
    entries = []
    while (entry := source.read()) is not None:
        entries.append(entry)
    assert entries == [
        Entry("first"),
        Entry("/not a command\n\n  indented", literal=True),
        Entry("/reset"),
        Entry("open", literal=True),  # a block still open when the input ends is taken as it is
    ]


def test_block_joiner_cancel_drops_the_open_block() -> None:
    joiner = BlockJoiner()
    assert joiner.feed('"""') is None and joiner.in_block
    assert joiner.feed("half") is None
    joiner.cancel()
    assert not joiner.in_block
    assert joiner.feed("next") == Entry("next")


# ---- stats


def test_stats_line_hand_computed() -> None:
    stats = TurnStats(tokens=5, ttft=0.5, seconds=1.5, finish_reason="length")
    # 4 tokens after the first one in 1.0 s
    assert stats.summary() == "5 tokens · 4.0 tok/s · TTFT 500 ms · max_tokens reached"
    assert TurnStats(tokens=1, ttft=0.25, seconds=0.25).summary() == "1 token · TTFT 250 ms"
    assert TurnStats(finish_reason=STOPPED).summary() == "0 tokens · stopped"


def test_meter_takes_the_servers_count_and_times_the_first_token() -> None:
    meter = Meter()
    meter.observe(Delta("", 0))  # a role-only chunk: no token yet
    assert meter.stats.ttft is None
    meter.observe(Delta("Hi", 1))
    meter.observe(Delta("", 3, "stop"))  # the usage report corrects the count
    assert meter.stats.tokens == 3 and meter.stats.finish_reason == "stop"
    assert meter.stats.ttft is not None and 0 <= meter.stats.ttft <= meter.stats.seconds


# ---- rendering


def test_a_growing_answer_shows_its_last_screenful_until_done() -> None:
    answer = GrowingAnswer()
    answer.text = "\n\n".join(f"paragraph {i}" for i in range(10))  # 19 lines

    def drawn() -> list[str]:
        console = Console(file=io.StringIO(), width=30, height=6, force_terminal=True, color_system=None)
        console.print(answer)
        return [line.rstrip() for line in console.file.getvalue().splitlines()]

    # 5 rows: the screen's 6 less one for the cursor, so the live region is redrawn in place
    assert drawn() == ["paragraph 7", "", "paragraph 8", "", "paragraph 9"]
    answer.done = True
    assert drawn() == "\n\n".join(f"paragraph {i}" for i in range(10)).splitlines()


# ---- the loop, over a backend that records what it is sent


class RecordingBackend:
    model = "recorder"
    location = "here"

    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies  # per turn: a list of deltas (an exception in it is raised at that point)
        self.sent: list[list[dict[str, str]]] = []
        self.settings: list[SamplingConfig] = []
        self.schemas: list[dict[str, Any] | None] = []

    def stream(
        self,
        messages: list[dict[str, str]],
        settings: SamplingConfig,
        json_schema: dict[str, Any] | None = None,
        chosen: frozenset[str] = frozenset(),
    ) -> Iterator[Delta]:
        self.sent.append(messages)
        self.settings.append(settings)
        self.schemas.append(json_schema)
        for item in self.replies.pop(0):
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        pass


def run_repl(
    backend: RecordingBackend, lines: list[str], *, interactive: bool = False
) -> tuple[Repl, str, str]:
    answers, notes = io.StringIO(), io.StringIO()
    console = Console(file=notes, force_terminal=False, width=200)
    repl = Repl(
        backend,
        Conversation(SamplingConfig(temperature=0.0)),
        Output(answers, console, markdown=False, interactive=interactive),
    )
    repl.run(PipedInput(lines))
    return repl, answers.getvalue(), notes.getvalue()


def test_each_turn_is_sent_the_ones_before_and_a_failed_turn_is_dropped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = RecordingBackend(
        [
            [Delta("Hello ", 1), Delta("Alice.", 2, "stop")],
            [Delta("Par", 1), MinisglError("the server answered HTTP 400: too long")],
            [Delta("Alice", 1), Delta("", 1, "length")],
        ]
    )
    repl, answers, notes = run_repl(
        backend, [Q1, "/set max_tokens 4", "/set top_p 2", "x " * 5, Q2, "/bogus", "/exit", "never read"]
    )
    assert backend.sent == [
        [user(Q1)],
        [user(Q1), assistant("Hello Alice."), user("x " * 5)],
        [user(Q1), assistant("Hello Alice."), user(Q2)],  # the failed turn left nothing behind
    ]
    assert [s.max_tokens for s in backend.settings] == [256, 4, 4]
    assert answers == "Hello Alice.\nPar\nAlice\n"  # partial text of the failed turn, and no blank line
    assert "2 tokens" in notes and "1 token · " in notes and "max_tokens = 4" in notes
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: /set top_p 2: expected a number in (0, 1]",
        "error: the server answered HTTP 400: too long",
        "error: unknown command /bogus: type /help for the list",
    ]
    assert repl.failures == 3


def test_json_schema_command_constrains_the_next_answers_until_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    (tmp_path / "city.json").write_text(json.dumps(schema))
    (tmp_path / "bad.json").write_text('{"type": "nonsense"}')
    backend = RecordingBackend([[Delta("a", 1, "stop")], [Delta("b", 1, "stop")], [Delta("c", 1, "stop")]])
    repl, _, notes = run_repl(backend, [
        Q1, f"/json-schema {tmp_path / 'city.json'}", Q2, f"/json-schema {tmp_path / 'bad.json'}",
        "/json-schema off", Q1,
    ])  # fmt: skip
    assert backend.schemas == [None, schema, None]
    assert "answers are JSON matching the schema" in notes and "answers are free text" in notes
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f'error: invalid JSON schema in /json-schema {tmp_path / "bad.json"}: Unsupported type "nonsense"'
    ]
    assert repl.failures == 1


def test_openai_backend_sends_the_json_schema_as_response_format() -> None:
    transport, bodies = mock_server(
        httpx.Response(200, text=sse({"choices": []}), headers={"content-type": "text/event-stream"}),
        models=["m"],
    )
    backend = OpenAIBackend.connect("http://example.test:8000", transport=transport)
    schema = {"type": "array", "items": {"type": "integer"}}
    list(backend.stream([user("hi")], SamplingConfig(), schema))
    assert bodies[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema},
    }


def test_ctrl_c_keeps_the_partial_answer_when_interactive() -> None:
    backend = RecordingBackend([[Delta("Once upon", 1), KeyboardInterrupt()], [Delta("ok", 1)]])
    repl, answers, notes = run_repl(backend, [STORY, "Go on"], interactive=True)
    assert backend.sent[1] == [user(STORY), assistant("Once upon"), user("Go on")]
    assert "1 token · " in notes and "stopped" in notes
    assert repl.failures == 0
    # Piped, Ctrl-C ends the program (the CLI's handler reports it).
    with pytest.raises(KeyboardInterrupt):
        run_repl(RecordingBackend([[KeyboardInterrupt()]]), [STORY])


def test_save_and_load_through_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    backend = RecordingBackend([[Delta("A1", 1)], [Delta("A2", 1)]])
    run_repl(backend, [Q1, "/system Be kind.", f"/save {path}", "/reset", f"/load {path}", Q2])
    assert backend.sent[1] == [{"role": "system", "content": "Be kind."}, user(Q1), assistant("A1"), user(Q2)]


# ---- the OpenAI backend over a mock transport


def sse(*events: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def mock_server(
    chat: httpx.Response, models: list[str] | None = None
) -> tuple[httpx.MockTransport, list[Any]]:
    bodies: list[Any] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in models or ["m1"]]})
        bodies.append(json.loads(request.content))
        return chat

    return httpx.MockTransport(handle), bodies


def test_openai_backend_streams_deltas_and_takes_the_usage_count() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    events = sse(
        chunk,
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}},
    )
    transport, bodies = mock_server(
        httpx.Response(200, text=": keep-alive\n\n" + events, headers={"content-type": "text/event-stream"}),
        models=["first", "second"],
    )
    backend = OpenAIBackend.connect("http://example.test:8000/v1/", transport=transport)
    assert (backend.model, backend.location) == ("first", "http://example.test:8000")
    settings = SamplingConfig(temperature=0.0, max_tokens=8, top_k=5, seed=4)
    deltas = list(backend.stream([user("hi")], settings, chosen=frozenset({"temperature", "top_k"})))
    assert deltas == [
        Delta("", 0, None),
        Delta("Hel", 1, None),
        Delta("lo", 2, "length"),
        Delta("", 3, None),
    ]
    # max_tokens always; the rest only when the user chose them (the unchosen seed and top_p are the
    # server's to default, e.g. from the model's generation_config.json).
    assert bodies == [
        {
            "model": "first",
            "messages": [user("hi")],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.0,
            "top_k": 5,
            "max_tokens": 8,
        }
    ]


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            httpx.Response(401, json={"error": {"message": "missing or incorrect API key", "code": "x"}}),
            "the server answered HTTP 401: missing or incorrect API key; check --api-key",
        ),
        (
            httpx.Response(404, json={"error": {"message": "the model 'm1' does not exist"}}),
            "the server answered HTTP 404: the model 'm1' does not exist",
        ),
        (
            httpx.Response(400, json={"error": {"message": "the prompt is longer than the context"}}),
            "the server answered HTTP 400: the prompt is longer than the context",
        ),
        (httpx.Response(502, text="Bad Gateway"), "the server answered HTTP 502: Bad Gateway"),
        (
            httpx.Response(200, text=sse({"error": {"message": "engine died"}})),
            "the server failed mid-answer: engine died",
        ),
        (
            httpx.Response(200, text="data: {oops\n\n"),
            "the server sent an event that is not a JSON object: {oops",
        ),
    ],
)
def test_openai_backend_errors_are_one_line(response: httpx.Response, message: str) -> None:
    transport, _ = mock_server(response)
    backend = OpenAIBackend.connect("http://example.test", transport=transport)
    with pytest.raises(MinisglError) as caught:
        list(backend.stream([user("hi")], SamplingConfig()))
    assert str(caught.value) == message


def test_openai_backend_connect_checks_url_key_and_model() -> None:
    transport, _ = mock_server(httpx.Response(200), models=["m1", "m2"])
    assert OpenAIBackend.connect("http://h:1", model="m2", transport=transport).model == "m2"
    with pytest.raises(MinisglError, match=r"does not serve model 'm3' \(it serves: m1, m2\)"):
        OpenAIBackend.connect("http://h:1", model="m3", transport=transport)
    with pytest.raises(UsageError, match="expected http://HOST:PORT"):
        OpenAIBackend.connect("localhost:1919", transport=transport)
    refused = httpx.MockTransport(lambda r: httpx.Response(401, json={"error": {"message": "bad key"}}))
    with pytest.raises(MinisglError, match="HTTP 401: bad key; check --api-key"):
        OpenAIBackend.connect("http://h:1", api_key="k", transport=refused)


# ---- end to end on the embedded model


@pytest.fixture(scope="module")
def reference() -> Any:
    """The in-process engine: what every greedy answer of the chat must equal."""
    from minisgl_cli.engine.llm import LLM

    return LLM()


def greedy(llm: Any, messages: list[dict[str, str]], max_tokens: int = 16) -> str:
    return llm.generate(messages, SamplingParams(temperature=0.0, max_tokens=max_tokens))[0].text


@pytest.fixture(scope="module")
def two_turns(reference: Any) -> tuple[str, str]:
    """The greedy answers to Q1, then to Q2 after it; Q2 alone is answered otherwise, so a matching second
    answer shows that the first turn was sent with it."""
    a1 = greedy(reference, [user(Q1)])
    a2 = greedy(reference, [user(Q1), assistant(a1), user(Q2)])
    assert a2 != greedy(reference, [user(Q2)])
    return a1, a2


def test_stream_deltas_count_every_token(reference: Any) -> None:
    """LLM.stream_deltas, which the in-process backend reads: one delta per token, with the count so far and,
    on the last, the finished output; the deltas concatenate to generate()'s text."""
    params = SamplingParams(temperature=0.0, max_tokens=12)
    expected = reference.generate([user(Q1)], params)[0]
    deltas = list(reference.stream_deltas([user(Q1)], params))
    n = len(expected.token_ids)
    assert [d.num_tokens for d in deltas] == list(range(1, n + 1))
    assert "".join(d.text for d in deltas) == expected.text
    assert all(d.output is None for d in deltas[:-1])
    final = deltas[-1].output
    assert final is not None
    assert (final.text, final.token_ids, final.finish_reason) == (
        expected.text,
        expected.token_ids,
        expected.finish_reason,
    )


def chat_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINISGL_") or k == "MINISGL_CACHE"}
    return env | {
        "HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "COLUMNS": "200",
        "TERM": "xterm",
        "PROMPT_TOOLKIT_NO_CPR": "1",  # pexpect's terminal never answers a cursor-position request
    }


def run_chat(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "minisgl_cli", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=chat_env(tmp_path),
        cwd=tmp_path,
        timeout=180,
    )


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def spawn_chat(tmp_path: Path, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "minisgl_cli", "chat", *args],
        env=chat_env(tmp_path),
        cwd=str(tmp_path),
        encoding="utf-8",
        dimensions=(50, 200),
        timeout=120,
        # Started with SIGINT ignored, as a parent that ignores it leaves its children (this happened under CI):
        # the REPL must still stop an answer on Ctrl-C.
        preexec_fn=_ignore_sigint,
    )
    child.expect_exact(">>> ")  # the model is loaded
    return child


def turn(child: pexpect.spawn, line: str) -> int:
    """Send a message; the tokens of its answer, from the stats line."""
    child.sendline(line)
    child.expect(STATS)
    tokens = int(child.match.group(1))
    child.expect_exact(">>> ")
    return tokens


def command(child: pexpect.spawn, line: str, reply: str) -> None:
    """Send a command and wait for its reply and the next prompt (keys typed before the prompt is back
    can be lost when prompt_toolkit switches the terminal to raw mode)."""
    child.sendline(line)
    child.expect_exact(reply)
    child.expect_exact(">>> ")


def saved_messages(path: Path) -> list[dict[str, str]]:
    return json.loads(path.read_text())["messages"]


def stop_a_long_answer(child: pexpect.spawn) -> int:
    """Ask for a long story, Ctrl-C once it streams; the tokens shown, from the stats line."""
    child.sendline(STORY)
    child.expect_exact("…")  # the answer's placeholder, until its first token
    child.expect(r"\w+ \w+ \w+")  # the answer has begun
    child.sendintr()
    child.expect(STATS)
    shown = int(child.match.group(1))
    child.expect_exact("stopped")
    child.expect_exact(">>> ")  # the prompt is back
    return shown


def test_terminal_session(tmp_path: Path, reference: Any, two_turns: tuple[str, str]) -> None:
    """One in-process session (a model load is the slow part): two turns, /reset, /set, Ctrl-C, Ctrl-D."""
    a1, a2 = two_turns
    child = spawn_chat(tmp_path, "--temperature", "0", "--max-tokens", "16")
    turn(child, Q1)
    turn(child, Q2)
    command(child, "/save two.json", "saved 4 messages")
    command(child, "/reset", "conversation cleared")
    command(child, "/set temperature -1", "error: /set temperature -1: expected a number in [0, 100]")
    command(child, "/set max_tokens 4", "max_tokens = 4")
    assert turn(child, Q2) == 4
    command(child, "/set max_tokens 400", "max_tokens = 400")
    shown = stop_a_long_answer(child)
    command(child, "/save after_reset.json", "saved 4 messages")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    assert saved_messages(tmp_path / "two.json") == [user(Q1), assistant(a1), user(Q2), assistant(a2)]
    # /reset forgot both turns, and /set max_tokens 4 held: the 4-token greedy answer to Q2 alone.
    a4 = greedy(reference, [user(Q2)], 4)
    kept = saved_messages(tmp_path / "after_reset.json")
    assert kept[:3] == [user(Q2), assistant(a4), user(STORY)]
    # The stopped answer is kept as shown: the start of the greedy story, as long as the tokens counted.
    assert 0 < shown < 400
    partial = kept[3]["content"]
    assert kept[3]["role"] == "assistant" and partial
    assert greedy(reference, kept[:3], shown).startswith(partial)
    history = (Path(os.environ["MINISGL_CACHE"]) / "chat_history").read_text()
    assert Q1 in history and "/set max_tokens 4" in history


def test_piped_stdin_answers_each_line_in_one_conversation(
    tmp_path: Path, two_turns: tuple[str, str]
) -> None:
    a1, a2 = two_turns
    result = run_chat(tmp_path, "--temperature", "0", "--max-tokens", "16", stdin=f"{Q1}\n{Q2}\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{a1}\n{a2}\n"
    assert "\x1b" not in result.stdout + result.stderr
    assert "error" not in result.stderr


# ---- --url: a live `minisgl serve`


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as srv:
        yield srv


def test_url_mode_answers_like_the_in_process_engine(
    tmp_path: Path, server: ServerProcess, reference: Any, two_turns: tuple[str, str]
) -> None:
    a1, a2 = two_turns
    too_long = "word " * 9000  # beyond the 8192-token context: HTTP 400, and the turn is not kept
    stdin = f"{Q1}\n{too_long}\n{Q2}\n"
    result = run_chat(
        tmp_path, "--url", str(server.url), "--temperature", "0", "--max-tokens", "16", stdin=stdin
    )
    assert result.stdout == f"{a1}\n{a2}\n"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "HTTP 400" in errors[0] and "8192" in errors[0]
    assert errors[1] == "error: 1 piped line failed: see the errors above"
    assert result.returncode == 1
    assert "\x1b" not in result.stdout + result.stderr


def test_url_mode_terminal_keys(tmp_path: Path, server: ServerProcess) -> None:
    """Over HTTP (no model load here): Ctrl-C stops an answer and clears a line, Alt+Enter and a \"\"\" block
    make multi-line messages, /exit leaves with status 0."""
    child = spawn_chat(tmp_path, "--url", str(server.url), "--temperature", "0", "--max-tokens", "400")
    assert 0 < stop_a_long_answer(child) < 400
    command(child, "/reset", "conversation cleared")
    command(child, "/set max_tokens 2", "max_tokens = 2")
    # Each key goes in once the REPL has shown the previous one took effect: a busy machine must not reorder
    # keystrokes against the prompt's redraws.
    child.send("never sent")
    child.expect_exact("never sent")
    child.sendintr()  # at the prompt: clears the line
    child.expect_exact(">>> ")
    child.send("Say hi\x1b\r")  # Alt+Enter (Escape, Enter): a newline, not the end of the message
    child.expect_exact("...")  # the continuation prompt (its space is drawn as a cursor move)
    child.send("in French\r")
    child.expect(STATS)
    child.expect_exact(">>> ")
    for line in ('"""', "/not a command", "", "second line"):
        child.sendline(line)
        child.expect_exact("... ")
    child.sendline('"""')
    child.expect(STATS)
    child.expect_exact(">>> ")
    command(child, "/save url.json", "saved 4 messages")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    sent = [m["content"] for m in saved_messages(tmp_path / "url.json") if m["role"] == "user"]
    assert sent == ["Say hi\nin French", "/not a command\n\nsecond line"]


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


def test_a_dead_url_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_chat(tmp_path, "--url", f"http://127.0.0.1:{port}", stdin="hi\n")
    assert result.returncode == 1
    assert (
        one_error_line(result)
        == f"error: cannot reach a server at http://127.0.0.1:{port} (Connection refused)"
    )
    assert result.stdout == ""


def test_a_model_the_server_lacks_exits_1_with_one_line(tmp_path: Path, server: ServerProcess) -> None:
    result = run_chat(tmp_path, "--url", str(server.url), "--model", "gpt-17", stdin="hi\n")
    assert result.returncode == 1
    assert one_error_line(result) == (
        f"error: the server at {server.url} does not serve model 'gpt-17' (it serves: smollm2-135m-instruct)"
    )


# ---- a reasoning model's thinking, apart from its answer


def test_the_engine_backend_splits_qwen3_thinking_from_the_answer() -> None:
    from types import SimpleNamespace

    from minisgl_cli.chat.engine_backend import EngineBackend

    pieces = ["<think>\nIt is", " Paris.\n</th", "ink>\n\nParis", "."]

    class FakeLLM:
        model_name, model_type = "qwen3-fake", "qwen3"
        tokenizer = SimpleNamespace(chat_template="{{ '<think>' }}")

        def stream_deltas(self, messages: Any, params: Any) -> Iterator[Any]:
            for k, text in enumerate(pieces):
                done = SimpleNamespace(finish_reason="stop") if k == len(pieces) - 1 else None
                yield SimpleNamespace(text=text, num_tokens=k + 1, output=done)

    deltas = list(EngineBackend(FakeLLM()).stream([user("capital?")], SamplingConfig()))  # type: ignore[arg-type]
    assert "".join(d.reasoning for d in deltas) == "It is Paris."
    assert "".join(d.text for d in deltas) == "Paris."
    assert [d.tokens for d in deltas] == [1, 2, 3, 4] and deltas[-1].finish_reason == "stop"


def test_thinking_is_drawn_dim_above_the_answer_and_kept_out_of_raw_answers() -> None:
    answer = GrowingAnswer()
    answer.thinking, answer.text, answer.done = "It is Paris.", "**Paris**", True
    console = Console(file=io.StringIO(), width=40, force_terminal=True, color_system="standard")
    console.print(answer)
    drawn = console.file.getvalue()
    assert drawn.index("It is Paris.") < drawn.index("Paris", drawn.index("It is Paris.") + 12)
    assert "\x1b[2" in drawn  # dim
    backend = RecordingBackend([[Delta("", 1, reasoning="hmm"), Delta("Paris", 2, "stop")]])
    _, answers, _ = run_repl(backend, [Q1])
    assert answers == "Paris\n"  # the raw view (pipes, --plain) prints the answer alone


def test_openai_backend_reads_reasoning_content() -> None:
    events = sse(
        {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]},
    )
    transport, _ = mock_server(
        httpx.Response(200, text=events, headers={"content-type": "text/event-stream"}), models=["m"]
    )
    backend = OpenAIBackend.connect("http://example.test:8000", transport=transport)
    deltas = list(backend.stream([user("hi")], SamplingConfig()))
    assert [(d.reasoning, d.text) for d in deltas] == [("hmm", ""), ("", "ok")]
