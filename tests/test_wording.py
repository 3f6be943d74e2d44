"""Counts read right ("1 token", "2 tokens"), and a bad option value reads as one of our own errors: no
pydantic "Value error, " prefix, the choices listed plainly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from model_helpers import make_tiny_model
from test_bench import KV, run_bench

from minisgl_cli.bench.serving import ServingResult
from minisgl_cli.chat.stats import TurnStats
from minisgl_cli.cli import ui
from minisgl_cli.cli.app import app
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import UsageError
from minisgl_cli.wording import plural


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("wording"), "llama", seed=3)


@pytest.mark.parametrize(
    ("count", "noun", "many", "text"),
    [
        (1, "token", None, "1 token"),
        (2, "token", None, "2 tokens"),
        (0, "request", None, "0 requests"),
        (-1, "token", None, "-1 tokens"),
        (1, "entry", "entries", "1 entry"),
        (3, "entry", "entries", "3 entries"),
        (1, "completed request", None, "1 completed request"),
    ],
)
def test_plural(count: int, noun: str, many: str | None, text: str) -> None:
    assert plural(count, noun, many) == text


def test_chat_stats_count_one_token_as_one() -> None:
    assert TurnStats(tokens=1).summary() == "1 token"
    assert TurnStats(tokens=2).summary() == "2 tokens"


def test_serving_notes_with_one_and_two_requests() -> None:
    from minisgl_cli.bench.report import serving_notes

    def result(failed: int, num_requests: int, short: int) -> ServingResult:
        return ServingResult(num_requests, num_requests - failed, failed, "HTTP 500: boom", short, 0, 0, 1.0,
                             None, None, None, None, None)  # fmt: skip

    assert serving_notes(result(1, 1, 1))[0] == "1 of 1 request failed; first error: HTTP 500: boom"
    assert serving_notes(result(1, 1, 1))[1].startswith("1 completed request got fewer tokens than asked")
    assert serving_notes(result(2, 2, 2))[1].startswith("2 completed requests got fewer tokens than asked")


@pytest.mark.parametrize(("lines", "text"), [(1, "has 1 request;"), (2, "has 2 requests;")])
def test_dataset_file_too_short_counts_its_requests(
    tiny: Path, tmp_path: Path, lines: int, text: str
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": [1, 2], "output_len": 2}) + "\n" for _ in range(lines)))
    res = run_bench("offline", "-m", tiny, *KV, "--dataset", path, "--num-prompts", "3")
    assert res.code == 2 and f"{text} --num-prompts 3 needs that many" in res.error_lines[0], res.stderr


def test_llm_counts_one_prompt_as_one(tiny: Path) -> None:
    from minisgl_cli.engine.llm import LLM

    with LLM(str(tiny), kv_cache_tokens=1024, max_running_requests=2) as llm:
        with pytest.raises(UsageError, match="got 2 sampling parameter sets for 1 prompt: give one"):
            llm.generate([[1, 2]], [SamplingParams(), SamplingParams()])
        with pytest.raises(UsageError, match="got 1 sampling parameter set for 2 prompts: give one"):
            llm.generate([[1, 2], [3]], [SamplingParams()])


def test_a_value_outside_the_choices_reads_as_our_error(tiny: Path) -> None:
    res = run_bench("offline", "-m", tiny, *KV, "--baseline", "vllm")
    assert res.code == 2
    assert res.error_lines == [
        "error: invalid value for '--baseline': 'vllm' is not one of: hf (see 'minisgl bench offline --help')"
    ], res.stderr


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["--log-level", "loud", "config", "show"],
            "error: invalid value for '--log-level' (env var: 'MINISGL_LOG_LEVEL'): 'loud' is not one of: "
            "debug, info, warning, error (see 'minisgl --help')",
        ),
        (
            ["bench", "offline", "--num-prompts", "x"],
            "error: invalid value for '--num-prompts': input should be a valid integer, unable to parse string "
            "as an integer (see 'minisgl bench offline --help')",
        ),
        (["bench", "compare"], "error: missing argument 'A.json' (see 'minisgl bench compare --help')"),
    ],
)
def test_bad_option_values_have_no_pydantic_prefix(
    capsys: pytest.CaptureFixture[str], argv: list[str], line: str
) -> None:
    code = ui.run(app, argv)
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == line and "Value error" not in err and "Input should" not in err
