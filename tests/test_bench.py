"""`minisgl bench`: seeded workloads, offline throughput and batch latency through the engine and the
transformers baseline (token counts against the workload, step counts against the scheduler's own counters),
the roofline byte model against a hand count, the JSON report's schema, and the commands end to end.
No assertion is about speed: times are only checked to be positive and consistent with the rates."""

from __future__ import annotations

import inspect
import json
import logging
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from model_helpers import make_tiny_model
from typer.testing import CliRunner

from minisgl_cli.bench.dataset_file import read_requests
from minisgl_cli.bench.hf_baseline import load_hf_model, run_hf_latency, run_hf_offline
from minisgl_cli.bench.latency import (
    DecodeTraffic,
    LatencyResult,
    parse_batch_sizes,
    run_latency,
    streaming_bandwidth,
    with_roofline,
)
from minisgl_cli.bench.offline import ThroughputResult, exact_greedy, run_offline
from minisgl_cli.bench.report import (
    LATENCY_KEYS,
    THROUGHPUT_KEYS,
    build_report,
    latency_comparisons,
    latency_table,
    offline_comparisons,
    offline_table,
    ratio_lines,
)
from minisgl_cli.bench.workload import BenchRequest, Workload, load_workload, random_workload
from minisgl_cli.cli import bench, ui
from minisgl_cli.config import BenchConfig
from minisgl_cli.engine.llm import LLM
from minisgl_cli.errors import UsageError
from minisgl_cli.model_source import resolve_model

VOCAB = 384  # the tiny models' vocabulary
KV = ("--kv-cache-tokens", "4096")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("bench"), "llama", seed=3)


@pytest.fixture(scope="module")
def tiny_llm(tiny: Path) -> LLM:
    return LLM(str(tiny), kv_cache_tokens=4096, max_running_requests=8)


@pytest.fixture(scope="module")
def hf_model(tiny: Path) -> Any:
    return load_hf_model(
        resolve_model(str(tiny)), dummy_weights=False, dtype=torch.float32, device=torch.device("cpu"), seed=0
    )


# --- workloads ------------------------------------------------------------------------------------------------


def test_random_workload_is_seeded_within_ranges_and_totals_add_up() -> None:
    w = random_workload(50, (3, 9), (2, 5), VOCAB, seed=7)
    assert len(w.requests) == 50
    assert all(3 <= r.input_len <= 9 and 2 <= r.output_len <= 5 for r in w.requests)
    assert all(0 <= t < VOCAB for r in w.requests for t in r.prompt_ids)
    # Over 50 draws, both ends of each inclusive range show up.
    assert {min(r.input_len for r in w.requests), max(r.input_len for r in w.requests)} == {3, 9}
    assert {min(r.output_len for r in w.requests), max(r.output_len for r in w.requests)} == {2, 5}
    assert w.input_tokens == sum(len(r.prompt_ids) for r in w.requests)
    assert w.output_tokens == sum(r.output_len for r in w.requests)
    assert w.max_seq_len == max(len(r.prompt_ids) + r.output_len for r in w.requests)
    assert random_workload(50, (3, 9), (2, 5), VOCAB, seed=7) == w  # same seed, same workload
    assert random_workload(50, (3, 9), (2, 5), VOCAB, seed=8) != w
    fixed = random_workload(4, (6, 6), (3, 3), VOCAB, seed=0)
    assert [(r.input_len, r.output_len) for r in fixed.requests] == [(6, 3)] * 4
    assert (fixed.input_tokens, fixed.output_tokens) == (24, 12)


def test_load_workload_reads_the_bench_config() -> None:
    cfg = BenchConfig(num_prompts=5, input_len="4", output_len="2,3", dataset_seed=11)
    assert load_workload(cfg, VOCAB) == random_workload(5, (4, 4), (2, 3), VOCAB, seed=11)
    with pytest.raises(UsageError, match="dataset 'sharegpt' is not supported"):
        load_workload(BenchConfig(dataset="sharegpt"), VOCAB)
    with pytest.raises(UsageError, match="dataset seed must be >= 0"):
        load_workload(BenchConfig(dataset_seed=-1), VOCAB)


# --- offline --------------------------------------------------------------------------------------------------


def test_offline_engine_counts_equal_the_workload(tiny_llm: LLM) -> None:
    w = random_workload(7, (3, 12), (2, 9), VOCAB, seed=1)
    done: list[int] = []
    res = run_offline(tiny_llm, w, done.append)
    assert res.system == "minisgl"
    assert (res.num_requests, res.input_tokens, res.output_tokens) == (7, w.input_tokens, w.output_tokens)
    # Progress in output tokens, as each engine step makes them (tests/test_bench_progress.py has more).
    assert sum(done) == w.output_tokens and len(done) > 7
    assert res.elapsed_s > 0
    assert (
        len(res.finish_s) == 7 and res.finish_s == sorted(res.finish_s) and res.finish_s[-1] <= res.elapsed_s
    )
    assert res.output_tok_per_s == pytest.approx(w.output_tokens / res.elapsed_s)
    assert res.total_tok_per_s == pytest.approx((w.input_tokens + w.output_tokens) / res.elapsed_s)
    assert not tiny_llm.scheduler.has_work


def test_offline_refuses_requests_longer_than_the_context(tiny_llm: LLM) -> None:
    too_long = Workload([BenchRequest(list(range(300)), 300)])  # 600 > the tiny model's 512 positions
    with pytest.raises(UsageError, match="needs 600 tokens"):
        run_offline(tiny_llm, too_long)


def test_offline_hf_counts_only_each_requests_own_tokens(hf_model: Any) -> None:
    w = random_workload(6, (3, 12), (2, 9), VOCAB, seed=2)
    done: list[int] = []
    res = run_hf_offline(hf_model, w, 4, done.append)
    assert res.system == "hf"
    assert (res.num_requests, res.input_tokens, res.output_tokens) == (6, w.input_tokens, w.output_tokens)
    # Progress in each request's own output tokens, step by step within the static batches of 4.
    assert sum(done) == w.output_tokens and len(done) > 2
    assert res.elapsed_s > 0
    # A static batch's requests all finish when it does.
    assert res.finish_s[:4] == [res.finish_s[0]] * 4 and res.finish_s[4:] == [res.finish_s[4]] * 2
    assert res.finish_s[0] < res.finish_s[4] <= res.elapsed_s


def test_hf_dummy_weights_are_built_from_the_config_and_seeded(tiny: Path, hf_model: Any) -> None:
    source = resolve_model(str(tiny), dummy_weights=True)
    cpu = torch.device("cpu")
    a = load_hf_model(source, dummy_weights=True, dtype=torch.float32, device=cpu, seed=5)
    b = load_hf_model(source, dummy_weights=True, dtype=torch.float32, device=cpu, seed=5)
    shapes = {n: p.shape for n, p in hf_model.named_parameters()}
    assert {n: p.shape for n, p in a.named_parameters()} == shapes
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    # Random, not the saved weights.
    assert not torch.equal(a.lm_head.weight, hf_model.lm_head.weight)


# --- latency --------------------------------------------------------------------------------------------------


def test_latency_runs_the_batch_through_the_scheduler(tiny: Path) -> None:
    # A prefill budget of 16 tokens splits the 3 x 10 prompt tokens into two prefill chunks.
    llm = LLM(str(tiny), kv_cache_tokens=4096, max_running_requests=8, max_prefill_tokens=16)
    before = llm.scheduler.stats()
    (res,) = run_latency(llm, [3], input_len=10, output_len=5, seed=0)
    after = llm.scheduler.stats()
    assert (res.system, res.batch_size, res.input_len, res.output_len) == ("minisgl", 3, 10, 5)
    assert res.decode_steps == 4  # the prefill samples the first token
    # The engine did exactly this work: the untimed warm-up (the smallest batch, 3, with min(10, 16) prompt
    # tokens and 4 outputs), then the timed run.
    warmup_prefill, warmup_generated, warmup_decoded = 3 * 10, 3 * 4, 3 * 3
    assert after.tokens_prefilled - before.tokens_prefilled == warmup_prefill + 3 * 10
    assert after.tokens_generated - before.tokens_generated == warmup_generated + 3 * 5
    assert after.tokens_decoded - before.tokens_decoded == warmup_decoded + 3 * 4
    assert after.num_preemptions == 0 and not llm.scheduler.has_work
    assert res.prefill_s > 0 and res.decode_s > 0
    assert res.prefill_tok_per_s == pytest.approx(30 / res.prefill_s)
    assert res.decode_ms_per_step == pytest.approx(res.decode_s * 1e3 / 4)
    assert res.decode_tok_per_s == pytest.approx(3 * 4 / res.decode_s)
    assert res.roofline_share is None


def test_latency_refuses_batches_that_cannot_run_at_once(tiny: Path) -> None:
    llm = LLM(str(tiny), kv_cache_tokens=64, max_running_requests=4)
    with pytest.raises(UsageError, match="above --max-running-requests 4"):
        run_latency(llm, [1, 8], input_len=4, output_len=4, seed=0)
    with pytest.raises(UsageError, match="KV cache slots"):
        run_latency(llm, [4], input_len=20, output_len=4, seed=0)
    with pytest.raises(UsageError, match="at least 2 tokens"):
        run_latency(llm, [1], input_len=4, output_len=1, seed=0)
    assert not llm.scheduler.has_work


def test_hf_latency_fields(hf_model: Any) -> None:
    results = run_hf_latency(hf_model, [1, 2], input_len=6, output_len=4, seed=0)
    assert [(r.system, r.batch_size, r.decode_steps) for r in results] == [("hf", 1, 3), ("hf", 2, 3)]
    assert all(r.prefill_s > 0 and r.decode_s > 0 for r in results)


@pytest.mark.parametrize(("text", "sizes"), [("1,8,32", [1, 8, 32]), ("4", [4]), ("2,2,1", [2, 1])])
def test_parse_batch_sizes(text: str, sizes: list[int]) -> None:
    assert parse_batch_sizes(text) == sizes


@pytest.mark.parametrize("text", ["", "0", "1,,2", "a", "1,-3", "2.5"])
def test_parse_batch_sizes_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="comma-separated positive integers"):
        parse_batch_sizes(text)


def test_roofline_bytes_by_hand(tiny: Path, hf_model: Any) -> None:
    from minisgl_cli.engine.models.config import ModelConfig

    cfg = ModelConfig.from_hf(json.loads((tiny / "config.json").read_text()))
    traffic = DecodeTraffic.of_model(cfg, torch.float32)
    # transformers' own parameter count, less the input embedding (untied: only B rows of it are read).
    params = sum(p.numel() for p in hf_model.parameters()) - hf_model.model.embed_tokens.weight.numel()
    assert traffic.weight_bytes == params * 4
    assert (
        traffic.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    )  # k and v, 2 layers, 2 kv heads, head_dim 16, fp32
    # 3 decode steps after a 6-token prompt attend to 7, 8 and 9 positions.
    assert traffic.decode_bytes(2, 6, 3) == 3 * params * 4 + 2 * (7 + 8 + 9) * 512
    res = LatencyResult("minisgl", 2, 6, 4, prefill_s=0.1, decode_steps=3, decode_s=0.5)
    assert with_roofline(res, traffic, None) == res
    share = with_roofline(res, traffic, 1e9).roofline_share
    assert share == pytest.approx(traffic.decode_bytes(2, 6, 3) / 1e9 / 0.5)
    assert streaming_bandwidth(torch.device("cpu")) is None


# --- report ---------------------------------------------------------------------------------------------------


def test_offline_report_ratio_and_schema() -> None:
    ours = ThroughputResult("minisgl", 4, 100, 60, elapsed_s=2.0)
    hf = ThroughputResult("hf", 4, 100, 60, elapsed_s=5.0)
    comparisons = offline_comparisons([ours, hf])
    assert [(c.metric, c.batch_size, c.ratio) for c in comparisons] == [("output_tok_per_s", None, 2.5)]
    assert ratio_lines(comparisons) == ["minisgl / hf output tok/s = 2.50x"]
    assert offline_comparisons([ours]) == []
    table = offline_table([ours, hf])
    assert table.rows[0] == ("minisgl", "4", "100", "60", "2.00", "2.00", "30.0", "80.0")
    report = build_report("offline", {"model": "m"}, [ours, hf], comparisons)
    assert_report_schema(report, "offline")
    assert report["results"][1] == {
        "system": "hf",
        "num_requests": 4,
        "input_tokens": 100,
        "output_tokens": 60,
        "elapsed_s": 5.0,
        "requests_per_s": 0.8,
        "input_tok_per_s": 20.0,
        "output_tok_per_s": 12.0,
        "total_tok_per_s": 32.0,
    }
    assert report["comparisons"] == [
        {"metric": "output_tok_per_s", "batch_size": None, "minisgl": 30.0, "hf": 12.0, "ratio": 2.5}
    ]
    json.dumps(report)  # serialisable as is


def test_latency_report_ratios_and_roofline_column() -> None:
    ours = LatencyResult("minisgl", 8, 10, 5, prefill_s=0.02, decode_steps=4, decode_s=0.04)
    hf = LatencyResult("hf", 8, 10, 5, prefill_s=0.08, decode_steps=4, decode_s=0.02)
    lone = LatencyResult("minisgl", 1, 10, 5, prefill_s=0.01, decode_steps=4, decode_s=0.01)
    comparisons = latency_comparisons([lone, ours, hf])
    assert [(c.metric, c.batch_size, c.ratio) for c in comparisons] == [
        ("prefill_tok_per_s", 8, pytest.approx(4.0)),
        ("decode_tok_per_s", 8, pytest.approx(0.5)),
    ]
    assert ratio_lines(comparisons) == ["batch 8: minisgl / hf prefill tok/s = 4.00x, decode tok/s = 0.50x"]
    table = latency_table([ours, hf])
    assert "roofline" not in table.columns
    assert table.rows[0] == ("minisgl", "8", "10", "5", "20.00", "4,000.0", "10.00", "800.0")
    with_share = latency_table([replace(ours, roofline_share=0.625), hf])
    assert with_share.columns[-1] == "roofline" and [r[-1] for r in with_share.rows] == ["62%", "-"]
    report = build_report("latency", {}, [ours, hf], comparisons)
    assert_report_schema(report, "latency")
    assert report["results"][0]["decode_tok_per_s"] == pytest.approx(800.0)


def assert_report_schema(report: dict[str, Any], command: str) -> None:
    assert list(report) == ["schema_version", "command", "machine", "config", "results", "comparisons"]
    assert report["schema_version"] == 1 and report["command"] == command
    machine = report["machine"]
    types = {
        "platform": str,
        "python": str,
        "cpu": str,
        "cpu_count": int,
        "gpu": (str, type(None)),
        "gpu_count": int,
        "torch": str,
        "transformers": str,
        "minisgl": str,
    }
    assert set(machine) == set(types)
    assert all(isinstance(machine[k], t) for k, t in types.items())
    assert machine["torch"] == torch.__version__
    keys = THROUGHPUT_KEYS if command == "offline" else LATENCY_KEYS
    for row in report["results"]:
        assert tuple(row) == keys
        assert row["system"] in ("minisgl", "hf")
        assert all(isinstance(row[k], (int, float)) for k in keys if k not in ("system", "roofline_share"))
    for c in report["comparisons"]:
        assert set(c) == {"metric", "batch_size", "minisgl", "hf", "ratio"}
        assert c["ratio"] == pytest.approx(c["minisgl"] / c["hf"])


# --- the commands ---------------------------------------------------------------------------------------------


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # a group, as in the real app, so that `bench` is a subcommand
        pass

    app.add_typer(bench.app, name="bench")
    return app


def run_bench(*args: str | Path) -> CliResult:
    """`minisgl bench ARGS` in this process, through the app's one error handler (real exit codes)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with CliRunner().isolation() as (out, err, _):
            code = ui.run(_app(), ["bench", *map(str, args)])
            sys.stdout.flush()
            sys.stderr.flush()
            return CliResult(code, out.getvalue().decode(), err.getvalue().decode())
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


RATIO = re.compile(r"^minisgl / hf output tok/s = \d+\.\d\dx$", re.MULTILINE)


def test_offline_json_schema_constrains_every_request(tiny: Path, tmp_path: Path) -> None:
    """Each request ends when its JSON is complete (a bounded schema: well before its output length), and the
    report names the schema; the transformers baseline cannot take one."""
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}},
                                  "required": ["n"], "additionalProperties": False}))  # fmt: skip
    out = tmp_path / "offline.json"
    args = ("--num-prompts", "4", "--input-len", "3,10", "--output-len", "40", "--json-schema", schema)
    res = run_bench("offline", "-m", tiny, *KV, *args, "--json", out)
    assert res.code == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["config"]["bench"]["json_schema"] == str(schema)
    # '{"n": 7}' and the eos: a handful of tokens each, far below the 40 asked for.
    assert 4 <= report["results"][0]["output_tokens"] <= 4 * 12
    bad = run_bench("offline", "-m", tiny, *KV, *args, "--baseline", "hf")
    assert bad.code == 2 and "--json-schema constrains minisgl only" in bad.stderr


def test_offline_command_with_hf_baseline_prints_and_writes_json(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "offline.json"
    args = ("--num-prompts", "5", "--input-len", "3,10", "--output-len", "2,6", "--dataset-seed", "4")
    res = run_bench(
        "offline", "-m", tiny, *KV, *args, "--baseline", "hf", "--hf-batch-size", "2", "--json", out
    )
    assert res.code == 0, res.stderr
    assert "bench offline: " in res.stdout and "│ minisgl" in res.stdout and "│ hf " in res.stdout
    assert RATIO.search(res.stdout), res.stdout
    report = json.loads(out.read_text())
    assert_report_schema(report, "offline")
    w = load_workload(BenchConfig(num_prompts=5, input_len="3,10", output_len="2,6", dataset_seed=4), VOCAB)
    totals = [
        (r["system"], r["num_requests"], r["input_tokens"], r["output_tokens"]) for r in report["results"]
    ]
    assert totals == [(s, 5, w.input_tokens, w.output_tokens) for s in ("minisgl", "hf")]
    config = report["config"]
    assert (config["model"], config["device"], config["dtype"], config["baseline"]) == (
        tiny.name,
        "cpu",
        "float32",
        "hf",
    )
    assert config["engine"]["kv_cache_tokens"] == 4096
    assert config["bench"] == {
        "dataset": "random",
        "num_prompts": 5,
        "input_len": "3,10",
        "output_len": "2,6",
        "dataset_seed": 4,
        "hf_batch_size": 2,
        "temperature": 0.6,
        "json_schema": None,
    }
    ratio = float(RATIO.search(res.stdout).group(0).split("= ")[1].rstrip("x"))
    assert ratio == pytest.approx(report["comparisons"][0]["ratio"], abs=0.006)


def test_offline_dummy_weights_both_systems(tiny: Path) -> None:
    args = ("--num-prompts", "3", "--input-len", "4,8", "--output-len", "3")
    res = run_bench("offline", "-m", tiny, "--dummy-weights", *KV, *args, "--baseline", "hf")
    assert res.code == 0, res.stderr
    assert RATIO.search(res.stdout), res.stdout


def test_offline_builtin_shape_without_tokenizer(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ("--num-prompts", "2", "--input-len", "4", "--output-len", "2", "--context-length", "64")
    res = run_bench(
        "offline",
        "-m",
        "smollm2-135m",
        "--dummy-weights",
        *KV,
        "--max-running-requests",
        "4",
        *args,
        "--json",
        out,
    )
    assert res.code == 0, res.stderr
    assert "minisgl / hf" not in res.stdout  # no baseline asked for
    (row,) = json.loads(out.read_text())["results"]
    assert (row["system"], row["input_tokens"], row["output_tokens"]) == ("minisgl", 8, 4)


def test_latency_command_with_hf_baseline(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    args = ("--batch-sizes", "1,2", "--input-len", "6", "--output-len", "4")
    res = run_bench("latency", "-m", tiny, *KV, *args, "--baseline", "hf", "--json", out)
    assert res.code == 0, res.stderr
    assert "bench latency: " in res.stdout
    for bs in (1, 2):
        assert re.search(
            rf"^batch {bs}: minisgl / hf prefill tok/s = \d+\.\d\dx, decode tok/s = \d+\.\d\dx$",
            res.stdout,
            re.M,
        )
    report = json.loads(out.read_text())
    assert_report_schema(report, "latency")
    rows = [
        (r["system"], r["batch_size"], r["input_len"], r["output_len"], r["decode_steps"])
        for r in report["results"]
    ]
    assert rows == [(s, b, 6, 4, 3) for s in ("minisgl", "hf") for b in (1, 2)]
    assert all(
        r[k] > 0 for r in report["results"] for k in ("prefill_ms", "decode_ms_per_step", "decode_tok_per_s")
    )
    assert report["config"]["bench"] == {
        "batch_sizes": [1, 2],
        "input_len": 6,
        "output_len": 4,
        "seed": 0,
        "bandwidth_bytes_per_s": None,
    }
    assert [c["metric"] for c in report["comparisons"]] == ["prefill_tok_per_s", "decode_tok_per_s"] * 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("offline", "--input-len", "9,3"), "--input-len"),
        (("offline", "--output-len", "0"), "--output-len"),
        (("offline", "--num-prompts", "0"), "--num-prompts"),
        (("offline", "--dataset", "sharegpt"), "dataset 'sharegpt' is not supported"),
        (("offline", "--request-rate", "4"), "--request-rate is for online serving"),
        (("offline", "--hf-batch-size", "8"), "add --baseline hf"),
        (("offline", "--baseline", "hf", "--hf-batch-size", "0"), "--hf-batch-size 0"),
        (("offline", "--baseline", "vllm"), "--baseline"),
        (("offline", "--json", "no/such/dir/r.json"), "does not exist"),
        (("latency", "--batch-sizes", "1,x"), "--batch-sizes '1,x'"),
        (("latency", "--output-len", "1"), "at least 2 tokens"),
        (("latency", "--input-len", "0"), "--input-len 0"),
        (("latency", "--input-len", "8,16"), "--input-len"),
        (("latency", "--batch-sizes", "16", "--max-running-requests", "8"), "above --max-running-requests 8"),
    ],
)
def test_invalid_arguments_exit_2_with_one_error_line(
    tiny: Path, args: tuple[str, ...], fragment: str
) -> None:
    res = run_bench(*args, "-m", tiny, *KV)
    assert res.code == 2, res.stderr
    assert len(res.error_lines) == 1 and fragment in res.error_lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


# ---- bench prefix


def test_shared_prefix_workload_shares_exactly_the_prefix() -> None:
    from minisgl_cli.bench.workload import shared_prefix_workload

    w = shared_prefix_workload(5, prefix_len=30, question_len=7, output_len=3, vocab_size=1000, seed=1)
    assert [r.input_len for r in w.requests] == [37] * 5 and [r.output_len for r in w.requests] == [3] * 5
    assert all(r.prompt_ids[:30] == w.requests[0].prompt_ids[:30] for r in w.requests)
    assert len({tuple(r.prompt_ids[30:]) for r in w.requests}) == 5  # the questions differ
    again = shared_prefix_workload(5, prefix_len=30, question_len=7, output_len=3, vocab_size=1000, seed=1)
    assert again == w


def test_prefix_command_computes_the_shared_prefix_once_with_radix(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefix.json"
    # One request at a time, so every request after the first finds the prefix cached (page size 1: all of it).
    args = ("--num-prompts", "4", "--prefix-len", "32", "--question-len", "8", "--output-len", "4")
    res = run_bench("prefix", "-m", tiny, *KV, "--max-running-requests", "1", *args, "--json", out)
    assert res.code == 0, res.stderr
    assert re.search(
        r"^radix / naive: total tok/s = \d+\.\d\dx, prompt tokens computed = 0\.\d{3}x$", res.stdout, re.M
    )
    report = json.loads(out.read_text())
    assert report["command"] == "prefix"
    radix, naive = report["results"]
    assert (radix["cache_type"], naive["cache_type"]) == ("radix", "naive")
    for r in (radix, naive):
        assert (r["num_requests"], r["input_tokens"], r["output_tokens"]) == (4, 4 * 40, 4 * 4)
    assert naive["prefill_tokens"] == 4 * 40 and naive["cached_tokens"] == 0
    assert radix["cached_tokens"] == 3 * 32
    assert radix["prefill_tokens"] == 40 + 3 * 8
    metrics = {c["metric"]: c for c in report["comparisons"]}
    assert metrics["prefill_tokens"]["ratio"] == (40 + 3 * 8) / (4 * 40)


def test_prefix_command_refuses_a_cache_type_flag(tiny: Path) -> None:
    res = run_bench("prefix", "-m", tiny, *KV, "--cache-type", "naive")
    assert res.code == 2 and len(res.error_lines) == 1 and "drop --cache-type" in res.error_lines[0]


# ---- defaults


def test_defaults_match_the_issue() -> None:
    """offline: 256 random requests, input and output uniform in [100, 1024], seed 0, eos ignored;
    latency: batch sizes 1, 8, 32, 128 prompt tokens, 256 output tokens."""
    cfg = BenchConfig()
    assert (cfg.dataset, cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.dataset_seed) == (
        "random",
        256,
        "100,1024",
        "100,1024",
        0,
    )
    assert exact_greedy(7).ignore_eos and exact_greedy(7).max_tokens == 7
    params = inspect.signature(bench.latency).parameters
    defaults = (params["batch_sizes"].default, params["input_len"].default, params["output_len"].default)
    assert defaults == ("1,8,32", 128, 256)


# ---- dataset files: bench offline --dataset FILE


def _write_jsonl(path: Path, entries: list[Any]) -> Path:
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    return path


def _sharegpt(path: Path) -> tuple[Path, list[str]]:
    """4 conversations, 3 of them with a human turn (one spoken by "user"); and those first turns."""
    conversations = [
        {
            "conversations": [
                {"from": "human", "value": "The quick brown fox"},
                {"from": "gpt", "value": "jumps"},
            ]
        },
        {"conversations": [{"from": "gpt", "value": "no question here"}]},
        {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "user", "value": "Hello world, hello"},
            ]
        },
        {"conversations": [{"from": "human", "value": "What is the capital of France?"}]},
    ]
    path.write_text(json.dumps(conversations))
    return path, ["The quick brown fox", "Hello world, hello", "What is the capital of France?"]


def test_offline_jsonl_dataset_totals_equal_the_files_sums(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    text = "Once upon a time, in a land far away"
    entries = [
        {"prompt": [5, 6, 7, 8], "output_len": 3},
        {"prompt": text, "output_len": 5, "id": "ignored"},
        {"prompt": list(range(20, 32))},  # no output_len: one from --output-len
    ]
    path = _write_jsonl(tmp_path / "requests.jsonl", entries)
    out = tmp_path / "r.json"
    res = run_bench(
        "offline", "-m", tiny, *KV, "--dataset", path, "--output-len", "4", "--baseline", "hf", "--json", out
    )
    assert res.code == 0, res.stderr
    report = json.loads(out.read_text())
    # The engine's own usage counts (and the baseline's workload totals) against the file and the reference
    # tokenizer: token-id prompts keep their length, text is encoded as raw text.
    input_tokens = 4 + len(AutoTokenizer.from_pretrained(tiny).encode(text)) + 12
    totals = [
        (r["system"], r["num_requests"], r["input_tokens"], r["output_tokens"]) for r in report["results"]
    ]
    assert totals == [(s, 3, input_tokens, 3 + 5 + 4) for s in ("minisgl", "hf")]
    bench_config = report["config"]["bench"]
    assert (bench_config["dataset"], bench_config["num_prompts"], bench_config["input_len"]) == (
        str(path),
        3,
        None,
    )
    # --num-prompts keeps the file's first lines.
    res = run_bench("offline", "-m", tiny, *KV, "--dataset", path, "--num-prompts", "1", "--json", out)
    assert res.code == 0, res.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert (row["num_requests"], row["input_tokens"], row["output_tokens"]) == (1, 4, 3)


def test_offline_sharegpt_dataset(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path, turns = _sharegpt(tmp_path / "sg.json")
    out = tmp_path / "r.json"
    res = run_bench("offline", "-m", tiny, *KV, "--dataset", path, "--output-len", "3", "--json", out)
    assert res.code == 0, res.stderr
    (row,) = json.loads(out.read_text())["results"]
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert (row["num_requests"], row["output_tokens"]) == (3, 3 * 3)
    assert row["input_tokens"] == sum(len(tokenizer.encode(t)) for t in turns)


def test_read_requests_from_files(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "output_len": 2}, {"prompt": [1, 2]}])
    requests = read_requests(path, None, (5, 9), seed=0)
    assert [(r.prompt, r.where) for r in requests] == [("hi", "line 1"), ([1, 2], "line 2")]
    assert requests[0].output_len == 2 and 5 <= requests[1].output_len <= 9
    assert read_requests(path, None, (5, 9), seed=0) == requests  # drawn lengths are seeded
    sharegpt, turns = _sharegpt(tmp_path / "sg.json")
    picked = read_requests(sharegpt, 2, (1, 1), seed=4)
    assert len(picked) == 2 and {r.prompt for r in picked} <= set(turns)
    assert sorted(r.prompt for r in read_requests(sharegpt, None, (1, 1), seed=4)) == sorted(turns)


def test_token_id_files_never_load_the_tokenizer(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "ids.jsonl", [{"prompt": [3, 4, 5], "output_len": 2}])

    def no_tokenizer() -> None:
        raise AssertionError("the tokenizer was loaded for a file of token ids")

    cfg = BenchConfig(dataset=str(path))
    workload = load_workload(cfg, VOCAB, no_tokenizer, whole_file=True)
    assert workload == Workload([BenchRequest([3, 4, 5], 2)])
    text = _write_jsonl(tmp_path / "text.jsonl", [{"prompt": "hello", "output_len": 2}])
    with pytest.raises(UsageError, match="line 1: a text prompt needs a tokenizer"):
        load_workload(BenchConfig(dataset=str(text)), VOCAB, lambda: None, whole_file=True)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "is empty"),
        ("hello\n", "neither JSONL"),
        ('{"prompt": "a", "output_len": 2}\n{oops\n', "line 2: not valid JSON"),
        ('{"text": "a"}\n', 'line 1: expected {"prompt"'),
        ("[1, 2]\n", "has no conversation with a human turn"),
        (
            '{"prompt": "", "output_len": 2}\n',
            "line 1: the prompt must be non-empty text or a list of token ids",
        ),
        ('{"prompt": [1, "x"], "output_len": 2}\n', "line 1: the prompt must be"),
        ('{"prompt": "a", "output_len": 0}\n', "line 1: output_len must be a positive integer, not 0"),
        ('{"prompt": "a", "output_len": true}\n', "output_len must be a positive integer, not True"),
        ('{"prompt": [1, 999], "output_len": 2}\n', "line 1: token id 999 is out of range"),
        ('[{"conversations": [{"from": "gpt", "value": "a"}]}]', "has no conversation with a human turn"),
        ("[{oops", "is not a readable JSON file"),
    ],
)
def test_bad_dataset_files_exit_2(tiny: Path, tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    res = run_bench("offline", "-m", tiny, *KV, "--dataset", path, "--output-len", "2")
    assert res.code == 2, res.stderr
    assert len(res.error_lines) == 1 and fragment in res.error_lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--dataset", "{dir}"), "is not a file"),
        (("--dataset", "{dir}/missing.jsonl"), "is not supported: expected 'random' or the path of a JSONL"),
        (("--dataset", "{file}", "--num-prompts", "3"), "has 2 requests; --num-prompts 3 needs that many"),
        (("--dataset", "{file}", "--input-len", "8"), "--input-len is for the random dataset"),
    ],
)
def test_dataset_file_arguments_exit_2(
    tiny: Path, tmp_path: Path, args: tuple[str, ...], fragment: str
) -> None:
    file = _write_jsonl(tmp_path / "two.jsonl", [{"prompt": [1, 2], "output_len": 2}] * 2)
    filled = [a.format(dir=tmp_path, file=file) for a in args]
    res = run_bench("offline", "-m", tiny, *KV, *filled)
    assert res.code == 2, res.stderr
    assert len(res.error_lines) == 1 and fragment in res.error_lines[0], res.stderr
