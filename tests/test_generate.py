"""`minisgl generate`: job parsing and output shapes (pure), then the command end to end on real models."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import typer
from typer.testing import CliRunner

from minisgl_cli.cli import ui
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.engine.structured import StructuredOutput
from minisgl_cli.errors import UsageError
from minisgl_cli.jobs import CHAT_URL, COMPLETIONS_URL, Job, output_record, parse_line, parse_lines, record_id

if TYPE_CHECKING:
    from minisgl_cli.engine.llm import LLM

DEFAULTS = SamplingParams(temperature=0.5, max_tokens=20, seed=3)


def lines(*objs: Any) -> list[str]:
    return [o if isinstance(o, str) else json.dumps(o) for o in objs]


# --- pure: parsing --------------------------------------------------------------------------------------------


def test_plain_lines_prompt_forms_ids_and_defaults() -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    parsed = parse_lines(
        lines({"prompt": "hello"}, {"id": "b", "prompt": [1, 2, 3]}, {"id": 7, "messages": msgs}), DEFAULTS
    )
    assert parsed.bad == []
    assert [j.id for j in parsed.jobs] == ["1", "b", "7"]
    assert [j.line_no for j in parsed.jobs] == [1, 2, 3]
    assert [j.prompt for j in parsed.jobs] == ["hello", [1, 2, 3], msgs]
    assert all(j.batch_url is None for j in parsed.jobs)
    # No per-line field: exactly the defaults (a copy, not the same object).
    assert all(j.sampling == DEFAULTS and j.sampling is not DEFAULTS for j in parsed.jobs)


def test_per_line_sampling_overrides_only_what_the_line_says() -> None:
    job = parse_line(
        json.dumps(
            {
                "prompt": "x",
                "max_completion_tokens": 5,
                "temperature": 0,
                "top_p": 0.9,
                "top_k": 4,
                "min_p": 0.1,
                "stop": "END",
                "frequency_penalty": 0.5,
                "presence_penalty": -0.5,
                "repetition_penalty": 1.2,
                "ignore_eos": True,
                "stop_token_ids": [9],
                "seed": None,  # null = not given: the default seed stays
                "metadata": {"kept": "out"},  # unknown keys are ignored (dataset columns)
            }
        ),
        1,
        DEFAULTS,
    )
    assert job.sampling == SamplingParams(
        temperature=0.0,
        top_p=0.9,
        top_k=4,
        min_p=0.1,
        seed=3,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        repetition_penalty=1.2,
        max_tokens=5,
        stop=["END"],
        stop_token_ids=[9],
        ignore_eos=True,
    )
    assert DEFAULTS == SamplingParams(temperature=0.5, max_tokens=20, seed=3)  # defaults untouched


def test_messages_text_parts_are_joined() -> None:
    content = [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]
    job = parse_line(json.dumps({"messages": [{"role": "user", "content": content}]}), 1, DEFAULTS)
    assert job.prompt == [{"role": "user", "content": "a b"}]


def test_batch_lines_chat_and_completions() -> None:
    chat = {
        "custom_id": "req-1",
        "method": "POST",
        "url": CHAT_URL,
        "body": {"model": "ignored", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7},
    }
    comp = {
        "custom_id": "req-2",
        "method": "POST",
        "url": COMPLETIONS_URL,
        "body": {"prompt": [5, 6], "seed": 11},
    }
    parsed = parse_lines(lines(chat, comp), DEFAULTS)
    assert parsed.bad == []
    a, b = parsed.jobs
    assert (a.id, a.batch_url, a.prompt) == ("req-1", CHAT_URL, [{"role": "user", "content": "hi"}])
    assert a.sampling == SamplingParams(temperature=0.5, max_tokens=7, seed=3)
    assert (b.id, b.batch_url, b.prompt) == ("req-2", COMPLETIONS_URL, [5, 6])
    assert b.sampling == SamplingParams(temperature=0.5, max_tokens=20, seed=11)


BAD_LINES = [
    ('{"prompt": "x"', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ('{"text": "x"}', "missing 'prompt' or 'messages'"),
    ('{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}', "both 'prompt' and 'messages'"),
    ('{"prompt": ""}', "field 'prompt': is empty"),
    ('{"prompt": [1, -2]}', "field 'prompt': expected"),
    ('{"prompt": [1, true]}', "field 'prompt': expected"),
    ('{"prompt": 5}', "field 'prompt': expected"),
    ('{"messages": []}', "field 'messages': expected a non-empty list"),
    ('{"messages": [{"content": "x"}]}', "field 'messages'[0]: expected an object with a 'role'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "field 'messages'[0]: 'content' must be"),
    ('{"prompt": "x", "id": ""}', "field 'id'"),
    ('{"prompt": "x", "id": [1]}', "field 'id'"),
    ('{"prompt": "x", "temperature": "hot"}', "field 'temperature': expected a number, got \"hot\""),
    ('{"prompt": "x", "temperature": -1}', "invalid sampling parameter temperature=-1.0"),
    ('{"prompt": "x", "top_p": 0}', "invalid sampling parameter top_p"),
    ('{"prompt": "x", "max_tokens": 2.5}', "field 'max_tokens': expected an integer"),
    ('{"prompt": "x", "max_tokens": 0}', "invalid sampling parameter max_tokens=0"),
    ('{"prompt": "x", "max_tokens": 3, "max_completion_tokens": 4}', "disagree"),
    ('{"prompt": "x", "max_tokens": true}', "field 'max_tokens': expected an integer"),
    ('{"prompt": "x", "ignore_eos": 1}', "field 'ignore_eos': expected true or false"),
    ('{"prompt": "x", "stop": [1]}', "field 'stop': expected a string or a list of strings"),
    ('{"prompt": "x", "stop": [""]}', "invalid sampling parameter stop"),
    ('{"prompt": "x", "seed": -1}', "field 'seed'"),
    ('{"prompt": "x", "stop_token_ids": "2"}', "field 'stop_token_ids'"),
    ('{"url": "/v1/chat/completions", "body": {}}', "field 'custom_id'"),
    ('{"custom_id": "a", "url": "/v1/embeddings", "body": {}}', "field 'url'"),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}', "field 'method'"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": "x"}', "field 'body'"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"messages": []}}', "'body' has no 'prompt'"),
    (
        '{"custom_id": "a", "url": "/v1/chat/completions", "body": {"prompt": "x"}}',
        "'body' has no 'messages'",
    ),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "n": 2}}', "field 'n'"),
    ('{"prompt": "x", "guided_regex": "a(b"}', "invalid regex in guided_regex: Regex parsing error"),
    ('{"prompt": "x", "response_format": {"type": "xml"}}', "field 'response_format.type': Input should be"),
    ('{"prompt": "x", "regex": "a", "guided_choice": ["b"]}', "sets both 'guided_choice' and 'regex'"),
    ('{"prompt": "x", "logit_bias": {"x": 1}}', "field 'logit_bias': keys must be token ids"),
    ('{"prompt": "x", "logit_bias": {"1": 500}}', "logit_bias values must be in [-100, 100]"),
    (
        '{"prompt": "x", "tools": [{"type": "function"}]}',
        "field 'tools': tool calling is for `minisgl serve`",
    ),
]


@pytest.mark.parametrize(("text", "reason"), BAD_LINES)
def test_bad_line_is_reported_with_its_number_and_the_rest_kept(text: str, reason: str) -> None:
    parsed = parse_lines(["", '{"prompt": "ok"}', text, '{"prompt": [1]}'], DEFAULTS)
    assert [j.line_no for j in parsed.jobs] == [2, 4]
    assert len(parsed.bad) == 1
    assert parsed.bad[0].line_no == 3
    assert reason in parsed.bad[0].reason, parsed.bad[0].reason
    assert str(parsed.bad[0]).startswith("line 3: ")
    assert "\n" not in str(parsed.bad[0]) and len(str(parsed.bad[0])) < 200


def test_raw_bytes_lines_are_decoded_one_by_one() -> None:
    parsed = parse_lines([b'{"prompt": "caf\xc3\xa9"}', b'{"prompt": "caf\xe9"}', b"  "], DEFAULTS)
    assert [j.prompt for j in parsed.jobs] == ["caf\u00e9"]
    assert [str(b) for b in parsed.bad] == ["line 2: not valid UTF-8"]


def test_long_values_are_cut_short_in_reasons() -> None:
    parsed = parse_lines([json.dumps({"prompt": {"x": "y" * 10_000}})], DEFAULTS)
    assert len(parsed.bad[0].reason) < 200


def test_duplicate_ids_are_an_error_naming_both_lines() -> None:
    # Line 2 has no id, so its id is "2" - the same as line 3's explicit one.
    with pytest.raises(UsageError, match=r"duplicate id '2' on input lines 2 and 3"):
        parse_lines(lines({"id": "a", "prompt": "x"}, {"prompt": "y"}, {"id": 2, "prompt": "z"}), DEFAULTS)
    with pytest.raises(UsageError, match="duplicate id 'q'"):
        batch = {"custom_id": "q", "url": COMPLETIONS_URL, "body": {"prompt": "x"}}
        parse_lines(lines(batch, {"id": "q", "prompt": "y"}), DEFAULTS)


# --- pure: output records -------------------------------------------------------------------------------------


class FakeUsage:
    prompt_tokens = 4
    completion_tokens = 3


class FakeOutput:
    index = 0
    text = "Paris."
    token_ids = [10, 11, 12]
    finish_reason = "stop"
    usage = FakeUsage()


def test_plain_output_record() -> None:
    job = Job(id="a", line_no=1, prompt="x", sampling=DEFAULTS)
    assert output_record(job, FakeOutput(), "m") == {  # type: ignore[arg-type]
        "id": "a",
        "text": "Paris.",
        "token_ids": [10, 11, 12],
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 4, "completion_tokens": 3},
    }


@pytest.mark.parametrize("url", [CHAT_URL, COMPLETIONS_URL])
def test_batch_output_record_has_openai_shape(url: str) -> None:
    job = Job(id="c1", line_no=1, prompt="x", sampling=DEFAULTS, batch_url=url)
    rec = output_record(job, FakeOutput(), "smol", created=123)  # type: ignore[arg-type]
    assert rec["id"].startswith("batch_req_") and rec["custom_id"] == "c1" and rec["error"] is None
    assert rec["response"]["status_code"] == 200 and rec["response"]["request_id"].startswith("req_")
    body = rec["response"]["body"]
    assert body["created"] == 123 and body["model"] == "smol"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop" and choice["logprobs"] is None
    if url == CHAT_URL:
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert choice["message"] == {"role": "assistant", "content": "Paris."}
    else:
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert choice["text"] == "Paris."
    json.dumps(rec)  # serialisable as it is
    assert record_id(rec) == "c1"


def test_record_id_for_resume() -> None:
    assert record_id({"id": "a", "text": ""}) == "a"
    assert record_id({"id": 5}) == "5"
    assert record_id({"id": "batch_req_x", "custom_id": "c"}) == "c"
    assert record_id([1]) is None and record_id({"text": ""}) is None


def test_example_prompts_file_parses_cleanly() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "prompts.jsonl"
    parsed = parse_lines(path.read_text().splitlines(), SamplingParams())
    assert parsed.bad == [] and len(parsed.jobs) >= 5
    assert {type(j.prompt[0]).__name__ for j in parsed.jobs if isinstance(j.prompt, list)} == {"dict", "int"}


# --- end to end: the command on real models -----------------------------------------------------------------


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines()]

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


def _app() -> typer.Typer:
    from minisgl_cli.cli.app import app

    return app


def run_generate(*args: str | Path, stdin: str | None = None) -> CliResult:
    """`minisgl generate ARGS` in this process, through the app's one error handler (real exit codes)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with CliRunner().isolation(input=stdin) as (out, err, _):
            code = ui.run(_app(), ["generate", *map(str, args)])
            sys.stdout.flush()
            sys.stderr.flush()
            return CliResult(code, out.getvalue().decode(), err.getvalue().decode())
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def write_jsonl(path: Path, objs: list[Any]) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


KV = ("--kv-cache-tokens", "4096")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_helpers import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("gen"), "llama", seed=1)


@pytest.fixture(scope="module")
def tiny_llm(tiny: Path) -> LLM:
    from minisgl_cli.engine.llm import LLM

    return LLM(str(tiny), kv_cache_tokens=4096)


def expected_records(llm: LLM, jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """What the command must write for `jobs`, from LLM.generate on the same prompts and sampling."""
    outs = llm.generate([j.prompt for j in jobs], [j.sampling for j in jobs])
    return {j.id: output_record(j, o, llm.model_name) for j, o in zip(jobs, outs, strict=True)}


def test_outputs_equal_llm_generate_by_id(tiny: Path, tiny_llm: LLM, tmp_path: Path) -> None:
    story = tiny_llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=12))[0].text
    stop = story[4:7]
    assert stop.strip(), story  # a visible stop string the greedy output is known to contain
    lines_in = [
        {
            "id": "long",
            "prompt": "The quick brown fox",
            "max_tokens": 24,
            "temperature": 0,
            "ignore_eos": True,
        },
        {"prompt": [5, 6, 7, 8], "max_tokens": 3, "temperature": 0, "ignore_eos": True},
        {
            "id": "chat",
            "messages": [{"role": "user", "content": "Hello there!"}],
            "temperature": 0,
            "max_tokens": 9,
        },
        {
            "id": "seeded",
            "prompt": "What is the capital",
            "temperature": 0.9,
            "top_k": 50,
            "seed": 4,
            "max_tokens": 10,
        },
        {"id": "stop", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 12, "stop": [stop]},
        {
            "id": 9,
            "prompt": "counting numbers",
            "max_completion_tokens": 6,
            "temperature": 0,
            "repetition_penalty": 1.5,
            "frequency_penalty": 0.5,
        },
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines_in)
    (tmp_path / "out.jsonl").write_text('{"id": "from an earlier run"}\n')  # replaced: no --resume
    res = run_generate("-f", src, "-o", tmp_path / "out.jsonl", "-m", tiny, *KV)
    assert res.code == 0, res.stderr
    assert res.stdout == ""  # records go to the file; stdout stays clean
    got = read_jsonl(tmp_path / "out.jsonl")
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(["long", "2", "chat", "seeded", "stop", "9"])
    # Written as they finish: the 3-token request cannot come after the 24-token one started with it.
    assert ids.index("2") < ids.index("long")
    jobs = parse_lines(src.read_text().splitlines(), SamplingParams()).jobs
    assert {r["id"]: r for r in got} == expected_records(tiny_llm, jobs)
    by_id = {r["id"]: r for r in got}
    assert by_id["stop"]["finish_reason"] == "stop" and stop not in by_id["stop"]["text"]
    assert len(by_id["long"]["token_ids"]) == 24 and by_id["long"]["finish_reason"] == "length"
    summary = res.stderr.strip().splitlines()[-1]
    total = sum(r["usage"]["completion_tokens"] for r in got)
    assert (
        summary.startswith("6 requests, ") and f" {total} completion tokens" in summary and "tok/s" in summary
    )


def test_stdin_to_stdout_with_flag_defaults(tiny: Path, tiny_llm: LLM) -> None:
    # Windows line ends too: a file written on Windows must parse the same.
    stdin = '{"prompt": "Hello world"}\r\n\r\n{"id": "x", "prompt": [3, 4], "max_tokens": 2}\r\n'
    res = run_generate(
        "-f", "-", "-o", "-", "-m", tiny, *KV, "--temperature", "0", "--max-tokens", "5", stdin=stdin
    )
    assert res.code == 0, res.stderr
    defaults = SamplingParams(temperature=0, max_tokens=5)
    jobs = parse_lines(stdin.splitlines(), defaults).jobs
    assert [j.id for j in jobs] == ["1", "x"]  # the blank line 2 still counts
    assert {r["id"]: r for r in res.records} == expected_records(tiny_llm, jobs)
    assert "requests," in res.stderr  # the summary goes to stderr, never into the JSONL on stdout


def test_resume_runs_only_missing_ids(tiny: Path, tiny_llm: LLM, tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": f"r{i}", "prompt": [10 + i, 11], "temperature": 0, "max_tokens": 4} for i in range(4)],
    )
    out = tmp_path / "out.jsonl"
    # An earlier run finished r0 and r2, and was killed while writing r3's line.
    earlier = [{"id": "r0", "text": "FROM BEFORE"}, {"id": "r2", "text": "FROM BEFORE"}]
    before = "".join(json.dumps(r) + "\n" for r in earlier)
    out.write_text(before + '{"id": "r3", "te')
    res = run_generate("-f", src, "-o", out, "--resume", "-m", tiny, *KV)
    assert res.code == 0, res.stderr
    assert "resume: 2 requests already in" in res.stderr and "incomplete last line" in res.stderr
    assert out.read_text().startswith(before)  # kept as they were, not run again
    got = read_jsonl(out)
    assert sorted(r["id"] for r in got) == ["r0", "r1", "r2", "r3"]
    jobs = [
        j for j in parse_lines(src.read_text().splitlines(), SamplingParams()).jobs if j.id in ("r1", "r3")
    ]
    assert {r["id"]: r for r in got[2:]} == expected_records(tiny_llm, jobs)
    # Everything done: a second resume loads no model and adds nothing.
    again = run_generate("-f", src, "-o", out, "--resume", "-m", tmp_path / "no-such-model")
    assert again.code == 0, again.stderr
    assert read_jsonl(out) == got


def test_malformed_lines_are_reported_and_the_rest_run(tiny: Path, tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "a", "prompt": [1, 2], "max_tokens": 2},
            '{"id": "b", "prompt": ',  # line 2: bad JSON
            {"id": "c", "prompt": "x", "temperature": -3},  # line 3: bad value
            {
                "id": "d",
                "prompt": [1, 999],
            },  # line 4: out of the tiny vocabulary (found once the model is loaded)
            {"id": "e", "prompt": [7] * 600},  # line 5: longer than the 512-token context
            {"id": "f", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ],
    )
    out = tmp_path / "out.jsonl"
    res = run_generate("-f", src, "-o", out, "-m", tiny, *KV)
    assert res.code == 1
    assert sorted(r["id"] for r in read_jsonl(out)) == ["a", "f"]
    skipped = [line for line in res.stderr.splitlines() if line.startswith("skipped input line")]
    assert [s.split(":")[0] for s in skipped] == [f"skipped input line {n}" for n in (2, 3, 4, 5)]
    assert "temperature" in skipped[1] and "999" in skipped[2] and "600 tokens" in skipped[3]
    assert res.error_lines == [
        "error: 4 malformed input lines skipped (listed above); the other lines were done"
    ]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("bad_line", "fragment"),
    [
        ('{"prompt": 3}', "input line 2: field 'prompt'"),
        ('{"prompt": [999]}', "input line 2: prompt token id 999"),
    ],
)
def test_strict_refuses_everything_before_any_work(
    tiny: Path, tmp_path: Path, bad_line: str, fragment: str
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": [1, 2], "max_tokens": 2}, bad_line, bad_line])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "old"}\n')
    res = run_generate("-f", src, "-o", out, "--strict", "-m", tiny, *KV)
    assert res.code == 2
    assert len(res.error_lines) == 1 and fragment in res.error_lines[0] and "--strict" in res.error_lines[0]
    assert out.read_text() == '{"id": "old"}\n'  # a refused run leaves an earlier output as it was


@pytest.mark.parametrize(
    ("args", "stdin", "fragment"),
    [
        (("-f", "{dir}/missing.jsonl"), None, "does not exist"),
        (("-f", "-", "--resume"), "", "--resume appends to an output file"),
        (
            ("-f", "-"),
            '{"id": 2, "prompt": "a"}\n{"prompt": "b"}\n',
            "duplicate id '2' on input lines 1 and 2",
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    tmp_path: Path, args: tuple[str, ...], stdin: str | None, fragment: str
) -> None:
    res = run_generate(*(a.format(dir=tmp_path) for a in args), "-m", tmp_path / "no-model", stdin=stdin)
    assert res.code == 2
    assert len(res.error_lines) == 1 and fragment in res.error_lines[0], res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("content", "stdin"),
    [("", None), ("\n   \n\r\n\t\n", None), (None, ""), (None, "\n\n")],
    ids=["empty-file", "blank-lines-file", "empty-stdin", "blank-lines-stdin"],
)
def test_an_input_without_requests_is_a_usage_error(
    tmp_path: Path, content: str | None, stdin: str | None
) -> None:
    if content is None:
        src, where = "-", "stdin"
    else:
        src = where = str(tmp_path / "in.jsonl")
        Path(src).write_text(content)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "old"}\n')
    # No model is needed to see this: a model that does not exist is never looked at.
    res = run_generate("-f", src, "-o", out, "-m", tmp_path / "no-model", stdin=stdin)
    assert res.code == 2
    assert res.stderr.strip().splitlines() == [
        f"error: no requests in {where} (it is empty or has only blank lines)"
    ]
    assert out.read_text() == '{"id": "old"}\n'  # an earlier output is left as it was


def test_openai_batch_format_in_and_out(tiny: Path, tiny_llm: LLM, tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "batch.jsonl",
        [
            {
                "custom_id": "c-chat",
                "method": "POST",
                "url": CHAT_URL,
                "body": {
                    "model": "gpt-x",
                    "messages": [{"role": "user", "content": "Hello"}],
                    "max_completion_tokens": 5,
                    "temperature": 0,
                },
            },
            {
                "custom_id": "c-text",
                "method": "POST",
                "url": COMPLETIONS_URL,
                "body": {"model": "gpt-x", "prompt": "Once upon", "max_tokens": 4, "temperature": 0},
            },
        ],
    )
    res = run_generate("-f", src, "-m", tiny, *KV)
    assert res.code == 0, res.stderr
    got = {r["custom_id"]: r for r in res.records}
    jobs = parse_lines(src.read_text().splitlines(), SamplingParams()).jobs
    outs = tiny_llm.generate([j.prompt for j in jobs], [j.sampling for j in jobs])
    for job, want in zip(jobs, outs, strict=True):
        rec = got[job.id]
        assert rec["id"].startswith("batch_req_") and rec["error"] is None
        body = rec["response"]["body"]
        assert rec["response"]["status_code"] == 200 and body["model"] == tiny.name
        choice = body["choices"][0]
        text = choice["message"]["content"] if job.batch_url == CHAT_URL else choice["text"]
        assert (text, choice["finish_reason"]) == (want.text, want.finish_reason)
        assert body["usage"]["completion_tokens"] == len(want.token_ids)
    assert got["c-chat"]["response"]["body"]["object"] == "chat.completion"
    assert got["c-text"]["response"]["body"]["object"] == "text_completion"
    # A Batch output is resumable too: its custom_ids count as done.
    out = tmp_path / "out.jsonl"
    out.write_text(res.stdout)
    again = run_generate("-f", src, "-o", out, "--resume", "-m", tmp_path / "no-such-model")
    assert again.code == 0 and "resume: 2 requests already in" in again.stderr


def test_embedded_default_model(tmp_path: Path) -> None:
    """One small run on the embedded SmolLM2 (no -m): a chat line and a text line, against LLM() itself."""
    from minisgl_cli.engine.llm import LLM

    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
            {"id": "text", "prompt": "The quick brown fox", "max_tokens": 6},
        ],
    )
    res = run_generate("-f", src, *KV, "--temperature", "0", "--max-tokens", "12")
    assert res.code == 0, res.stderr
    llm = LLM(kv_cache_tokens=4096)
    jobs = parse_lines(src.read_text().splitlines(), SamplingParams(temperature=0, max_tokens=12)).jobs
    assert {r["id"]: r for r in res.records} == expected_records(llm, jobs)
    assert "Paris" in {r["id"]: r for r in res.records}["chat"]["text"]


def test_lines_take_the_apis_constraints_and_logit_bias() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    lines = [
        {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}},
        {"prompt": "x", "guided_choice": ["yes", "no"], "logit_bias": {"7": -100}},
        {"custom_id": "c", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}},
        {"prompt": "x", "regex": None},  # null: not given
    ]  # fmt: skip
    jobs = parse_lines([json.dumps(line) for line in lines], DEFAULTS).jobs
    assert [j.sampling.structured for j in jobs] == [
        StructuredOutput.json_schema(schema),
        StructuredOutput.choice(["yes", "no"], param="guided_choice"),
        StructuredOutput("json_object"),
        None,
    ]
    assert jobs[1].sampling.logit_bias == {7: -100.0}


def test_constrained_lines_run_and_out_of_vocabulary_bias_is_a_bad_line(tiny: Path, tmp_path: Path) -> None:
    import re

    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "r", "prompt": "a", "regex": "[0-9]{3}-[0-9]{2}", "max_tokens": 30, "temperature": 1.0},
        {"id": "b", "prompt": "a", "logit_bias": {"99999": 1}},
    ])  # fmt: skip
    out = tmp_path / "out.jsonl"
    res = run_generate("-f", src, "-o", out, "-m", tiny, *KV)
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["r"] and re.fullmatch("[0-9]{3}-[0-9]{2}", records[0]["text"])
    assert records[0]["finish_reason"] == "stop"
    assert any("skipped input line 2" in line and "logit_bias" in line for line in res.stderr.splitlines())


def test_the_models_generation_config_is_the_default_under_flags_and_lines(tmp_path: Path) -> None:
    from model_helpers import make_tiny_model

    model = make_tiny_model(tmp_path, "llama", seed=1)
    generation = json.loads((model / "generation_config.json").read_text())
    # do_sample false: greedy. max_new_tokens: the default max_tokens.
    generation.update(do_sample=False, max_new_tokens=4)
    (model / "generation_config.json").write_text(json.dumps(generation))
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "Hello world", "ignore_eos": True},
        {"id": "b", "prompt": "Hello world", "ignore_eos": True, "max_tokens": 2},
    ])  # fmt: skip

    def token_ids(*flags: str) -> dict[str, list[int]]:
        res = run_generate("-f", src, "-o", "-", "-m", model, *KV, *flags)
        assert res.code == 0, res.stderr
        return {r["id"]: r["token_ids"] for r in res.records}

    by_model = token_ids()
    assert len(by_model["a"]) == 4 and len(by_model["b"]) == 2  # a line's own max_tokens wins
    assert by_model["b"] == by_model["a"][:2]  # both greedy
    assert len(token_ids("--max-tokens", "3")["a"]) == 3  # a flag beats the model's
    # Without it: the built-in default max_tokens.
    assert len(token_ids("--generation-config", "none", "--temperature", "0")["a"]) == 256
