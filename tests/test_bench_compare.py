"""`minisgl bench compare`: ratios and verdicts against hand-computed values on hand-made reports of every
kind, matching by system / batch size / cache type, and the refusals (mixed kinds, unknown schema versions,
files that are not reports, missing files) with their exit codes. No model runs here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_bench import run_bench

from minisgl_cli.bench.compare import (
    DEFAULT_NOISE,
    KINDS,
    Row,
    compare_reports,
    comparison_notes,
    comparison_table,
    load_report,
    noise_line,
)
from minisgl_cli.bench.latency import LatencyResult
from minisgl_cli.bench.offline import ThroughputResult
from minisgl_cli.bench.prefix import RESULT_KEYS as PREFIX_KEYS
from minisgl_cli.bench.report import LATENCY_KEYS, SERVING_KEYS, THROUGHPUT_KEYS, build_report
from minisgl_cli.cli import bench
from minisgl_cli.errors import UsageError


def _write(path: Path, report: dict[str, Any]) -> Path:
    path.write_text(json.dumps(report))
    return path


def _offline(tmp_path: Path, name: str, minisgl_s: float, hf_s: float, input_len: str = "4") -> Path:
    # 4 requests, 100 prompt and 60 output tokens: rates are those counts over the elapsed time.
    results = [ThroughputResult("minisgl", 4, 100, 60, minisgl_s), ThroughputResult("hf", 4, 100, 60, hf_s)]
    config = {"model": "m", "bench": {"input_len": input_len, "num_prompts": 4}}
    return _write(tmp_path / name, build_report("offline", config, results, []))


def _serve_row(**values: float | None) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(SERVING_KEYS, 1.0)
    row.update(first_error=None, failed=0, goodput_requests_per_s=None)
    row.update(values)
    return row


def _report(command: str, results: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"schema_version": 1, "command": command, "machine": {}, "config": {}, "results": results, **extra}


def test_every_metric_is_a_key_of_its_reports_schema() -> None:
    schemas = {
        "offline": THROUGHPUT_KEYS,
        "latency": LATENCY_KEYS,
        "prefix": PREFIX_KEYS,
        "serve": SERVING_KEYS,
    }
    assert set(KINDS) == set(schemas)
    for command, kind in KINDS.items():
        assert set(kind.identity) | {m.key for m in kind.metrics} <= set(schemas[command]), command


def test_offline_ratios_and_verdicts_by_hand(tmp_path: Path) -> None:
    a = load_report(_offline(tmp_path, "a.json", minisgl_s=2.0, hf_s=5.0))
    b = load_report(_offline(tmp_path, "b.json", minisgl_s=1.0, hf_s=10.0, input_len="8"))
    comparison = compare_reports(a, b)
    assert comparison.kind == "offline" and not comparison.only_in_a and not comparison.only_in_b
    rows = {(r.result, r.metric): r for r in comparison.rows}
    assert len(rows) == 2 * 5
    # minisgl ran twice as fast in B: every rate doubles (better), the time halves (better too).
    out = rows["minisgl", "output_tok_per_s"]
    assert (out.a, out.b, out.ratio, out.verdict) == (30.0, 60.0, 2.0, "better")
    total = rows["minisgl", "total_tok_per_s"]
    assert (total.a, total.b, total.ratio) == (80.0, 160.0, 2.0)
    elapsed = rows["minisgl", "elapsed_s"]
    assert (elapsed.ratio, elapsed.higher_is_better, elapsed.verdict) == (0.5, False, "better")
    # hf ran twice as slow: rates halve (worse), the time doubles (worse).
    assert (rows["hf", "requests_per_s"].ratio, rows["hf", "requests_per_s"].verdict) == (0.5, "worse")
    assert (rows["hf", "elapsed_s"].ratio, rows["hf", "elapsed_s"].verdict) == (2.0, "worse")
    assert comparison.differences == ["config.bench.input_len: '4' vs '8'"]
    table = comparison_table(comparison)
    assert table.columns == ("result", "metric", "A", "B", "B / A", "better", "B is")
    assert ("minisgl", "output_tok_per_s", "30.00", "60.00", "2.000x", "higher", "better") in table.rows
    assert ("hf", "elapsed_s", "5.00", "10.00", "2.000x", "lower", "worse") in table.rows
    assert comparison_notes(comparison) == ["A and B differ in config.bench.input_len: '4' vs '8'"]


def test_latency_matches_system_and_batch_size(tmp_path: Path) -> None:
    def report(name: str, decode_s: dict[int, float], share: float | None) -> Path:
        results = [
            LatencyResult(
                "minisgl", bs, 10, 5, prefill_s=0.1, decode_steps=4, decode_s=s, roofline_share=share
            )
            for bs, s in decode_s.items()
        ]
        return _write(tmp_path / name, build_report("latency", {}, results, []))

    a = load_report(report("a.json", {1: 0.04, 8: 0.08}, None))
    b = load_report(report("b.json", {8: 0.02, 32: 0.4}, 0.5))
    comparison = compare_reports(a, b)
    assert comparison.only_in_a == ["minisgl, batch 1"] and comparison.only_in_b == ["minisgl, batch 32"]
    assert {r.result for r in comparison.rows} == {"minisgl, batch 8"}
    rows = {r.metric: r for r in comparison.rows}
    # Batch 8: 4 decode steps in 0.08 s (A) and 0.02 s (B): 20 and 5 ms per step, 400 and 1600 tokens/s.
    step = rows["decode_ms_per_step"]
    assert (step.a, step.b, step.ratio, step.verdict) == (
        pytest.approx(20.0),
        pytest.approx(5.0),
        pytest.approx(0.25),
        "better",
    )
    assert (
        rows["decode_tok_per_s"].ratio == pytest.approx(4.0) and rows["decode_tok_per_s"].verdict == "better"
    )
    assert rows["prefill_ms"].ratio == pytest.approx(1.0) and rows["prefill_ms"].verdict == "same"
    roofline = rows["roofline_share"]  # unknown in A (no GPU bandwidth): no ratio, no verdict
    assert (roofline.a, roofline.b, roofline.ratio, roofline.verdict) == (None, 0.5, None, "-")
    notes = comparison_notes(comparison)
    assert notes[:2] == [
        "only in A (not compared): minisgl, batch 1",
        "only in B (not compared): minisgl, batch 32",
    ]


def test_serve_and_prefix_by_hand(tmp_path: Path) -> None:
    a = load_report(_write(tmp_path / "a.json", _report("serve", [_serve_row(p99_ttft_ms=200.0, failed=0)])))
    b = load_report(
        _write(
            tmp_path / "b.json",
            _report("serve", [_serve_row(p99_ttft_ms=150.0, failed=2, requests_per_s=3.0)]),
        )
    )
    comparison = compare_reports(a, b)
    rows = {r.metric: r for r in comparison.rows}
    assert len(rows) == 5 + 16  # throughputs, failures, and 4 statistics of 4 latencies
    assert (rows["p99_ttft_ms"].ratio, rows["p99_ttft_ms"].verdict) == (0.75, "better")
    assert (rows["requests_per_s"].ratio, rows["requests_per_s"].verdict) == (3.0, "better")
    # No ratio from a zero, but more failures are still worse.
    assert (rows["failed"].ratio, rows["failed"].verdict) == (None, "worse")
    assert rows["goodput_requests_per_s"].verdict == "-"  # no --slo on either side
    table = comparison_table(comparison)
    assert table.columns[0] == "metric"  # one result: no column naming it
    assert ("p99_ttft_ms", "200.0", "150.0", "0.750x", "lower", "better") in table.rows

    def prefix(name: str, radix_prefilled: int) -> Path:
        rows = [
            dict.fromkeys(PREFIX_KEYS, 1.0) | {"cache_type": c, "prefill_tokens": n}
            for c, n in (("radix", radix_prefilled), ("naive", 400))
        ]
        return _write(tmp_path / name, _report("prefix", rows))

    comparison = compare_reports(load_report(prefix("pa.json", 100)), load_report(prefix("pb.json", 50)))
    computed = {r.result: r for r in comparison.rows if r.metric == "prefill_tokens"}
    assert (computed["radix"].ratio, computed["radix"].verdict) == (0.5, "better")
    assert (computed["naive"].ratio, computed["naive"].verdict) == (1.0, "same")


def test_row_verdicts_follow_the_metrics_direction() -> None:
    assert Row("x", "m", 2.0, 3.0, True).verdict == "better"
    assert Row("x", "m", 2.0, 3.0, False).verdict == "worse"
    assert Row("x", "m", 0, 0, False).verdict == "same" and Row("x", "m", 0, 0, False).ratio is None
    assert Row("x", "m", None, 1.0, True).verdict == "-"


def test_mixed_kinds_are_refused(tmp_path: Path) -> None:
    offline = load_report(_offline(tmp_path, "a.json", 1.0, 1.0))
    serve = load_report(_write(tmp_path / "s.json", _report("serve", [_serve_row()])))
    with pytest.raises(
        UsageError, match="different benchmarks: .* is from bench offline, .* from bench serve"
    ):
        compare_reports(offline, serve)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", 'lacks "schema_version", "command" or "results"'),
        ('{"command": "offline", "results": []}', 'lacks "schema_version"'),
        (json.dumps(_report("offline", [], schema_version=2)), "schema_version 2"),
        (json.dumps(_report("generate", [])), "unknown kind of bench report 'generate'"),
        (json.dumps(_report("offline", {"system": "minisgl"})), '"results" is not a list of objects'),
        (json.dumps(_report("latency", [{"system": "minisgl"}])), 'results[0] has no valid "batch_size"'),
        (
            json.dumps(_report("offline", [{"system": "hf", "elapsed_s": "fast"}])),
            "elapsed_s is 'fast', not a number",
        ),
    ],
)
def test_malformed_reports_are_refused(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(UsageError) as info:
        load_report(path)
    assert fragment in str(info.value)


def test_missing_and_unreadable_files_are_usage_errors(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.json", tmp_path):  # a directory cannot be read as a report
        with pytest.raises(UsageError) as info:
            load_report(path)
        assert info.value.exit_code == 2 and str(path) in str(info.value)


# ---- the command


def test_command_prints_the_table(tmp_path: Path) -> None:
    a = _offline(tmp_path, "a.json", minisgl_s=2.0, hf_s=5.0)
    b = _offline(tmp_path, "b.json", minisgl_s=1.0, hf_s=10.0)
    res = run_bench("compare", a, b)
    assert res.code == 0, res.stderr
    assert f"bench compare (offline): A = {a}, B = {b}" in res.stdout
    lines = [line for line in res.stdout.splitlines() if "output_tok_per_s" in line]
    assert len(lines) == 2
    minisgl = [cell.strip() for cell in lines[0].split("│")[1:-1]]
    assert minisgl == ["minisgl", "output_tok_per_s", "30.00", "60.00", "2.000x", "higher", "better"]
    assert "differ in" not in res.stdout  # same settings


@pytest.mark.parametrize(
    ("b_content", "code", "fragment"),
    [
        (json.dumps(_report("serve", [_serve_row()])), 2, "cannot compare reports of different benchmarks"),
        (json.dumps(_report("offline", [], schema_version=7)), 2, "schema_version 7"),
        ('{"hello": 1}', 2, "is not a minisgl bench report"),
        ("", 2, "not JSON"),
        (None, 2, "does not exist"),
    ],
)
def test_command_refusals_exit_with_one_error_line(
    tmp_path: Path, b_content: str | None, code: int, fragment: str
) -> None:
    a = _offline(tmp_path, "a.json", 1.0, 1.0)
    b = tmp_path / "b.json"
    if b_content is not None:
        b.write_text(b_content)
    res = run_bench("compare", a, b)
    assert res.code == code, res.stderr
    assert len(res.error_lines) == 1 and fragment in res.error_lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


# ---- noise


def test_small_changes_are_within_noise_and_counts_get_no_allowance(tmp_path: Path) -> None:
    """B / A = 0.982 (rates) and 1 / 0.982 (the time) are within the default 4%; 0.9 is worse; --noise in
    the library as a fraction. A count (prefill_tokens) that moves by 1% is still better or worse."""
    a = load_report(_offline(tmp_path, "a.json", minisgl_s=1.0, hf_s=1.0))
    b = load_report(_offline(tmp_path, "b.json", minisgl_s=1 / 0.982, hf_s=1 / 0.9))
    assert DEFAULT_NOISE == 0.04 and bench.DEFAULT_NOISE_PERCENT == DEFAULT_NOISE * 100
    rows = {(r.result, r.metric): r for r in compare_reports(a, b).rows}
    assert rows["minisgl", "output_tok_per_s"].ratio == pytest.approx(0.982)
    assert {rows["minisgl", m].verdict for m in ("output_tok_per_s", "elapsed_s")} == {"within noise"}
    assert {rows["hf", m].verdict for m in ("output_tok_per_s", "elapsed_s")} == {"worse"}
    strict = {(r.result, r.metric): r for r in compare_reports(a, b, noise=0.01).rows}
    assert strict["minisgl", "output_tok_per_s"].verdict == "worse"
    loose = {(r.result, r.metric): r for r in compare_reports(a, b, noise=0.15).rows}
    assert loose["hf", "output_tok_per_s"].verdict == loose["hf", "elapsed_s"].verdict == "within noise"
    with pytest.raises(UsageError, match="--noise -1"):
        compare_reports(a, b, noise=-0.01)

    def prefix(name: str, prefilled: int) -> Path:
        rows = [dict.fromkeys(PREFIX_KEYS, 1.0) | {"cache_type": "radix", "prefill_tokens": prefilled}]
        return _write(tmp_path / name, _report("prefix", rows))

    counts = compare_reports(load_report(prefix("pa.json", 100)), load_report(prefix("pb.json", 101)))
    (computed,) = [r for r in counts.rows if r.metric == "prefill_tokens"]
    assert (computed.noise, computed.verdict) == (0.0, "worse")
    assert noise_line(counts).endswith("prefill_tokens, cached_tokens compared exactly")


def test_noise_bounds_both_ratios() -> None:
    # 4%: B / A from 1 / 1.04 to 1.04, so a time and its rate always agree.
    assert Row("x", "m", 1.0, 1.04, True, 0.04).verdict == "within noise"
    assert Row("x", "m", 1.04, 1.0, True, 0.04).verdict == "within noise"
    assert Row("x", "m", 1.0, 0.96, True, 0.04).verdict == "worse"  # A / B = 1.0417
    assert Row("x", "m", 1.0, 1.05, False, 0.04).verdict == "worse"
    assert Row("x", "m", 0, 0.01, True, 0.04).verdict == "better"  # no ratio from a zero


def test_command_says_within_noise_and_shows_the_threshold(tmp_path: Path) -> None:
    a = _offline(tmp_path, "a.json", minisgl_s=1.0, hf_s=1.0)
    b = _offline(tmp_path, "b.json", minisgl_s=1 / 0.982, hf_s=1 / 0.9)

    def verdicts(*extra: str) -> tuple[dict[str, str], str]:
        res = run_bench("compare", a, b, *extra)
        assert res.code == 0, res.stderr
        cells = [[c.strip() for c in line.split("│")[1:-1]] for line in res.stdout.splitlines()]
        found = {row[0]: row[-1] for row in cells if len(row) == 7 and row[1] == "output_tok_per_s"}
        return found, res.stdout

    found, out = verdicts()
    assert found == {"minisgl": "within noise", "hf": "worse"}
    assert "within noise (--noise 4): B / A from 0.962x to 1.040x" in out
    found, out = verdicts("--noise", "12")
    assert found == {"minisgl": "within noise", "hf": "within noise"}
    assert "within noise (--noise 12): B / A from 0.893x to 1.120x" in out
    found, out = verdicts("--noise", "0")
    assert found == {"minisgl": "worse", "hf": "worse"}
    bad = run_bench("compare", a, b, "--noise", "-1")
    assert bad.code == 2 and "--noise" in bad.error_lines[0] and "Value error" not in bad.stderr
