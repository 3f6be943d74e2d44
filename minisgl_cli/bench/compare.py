"""`bench compare A.json B.json`: two `--json` reports of the same benchmark, metric by metric, with B / A.

Results are matched by what tells them apart within one kind of report: the system (offline), the system and
batch size (latency), the cache type (prefix); a serving report has one result. Each metric knows which way
is better, so every row says whether B did better or worse than A, or, for a time or rate that moved by no
more than the noise threshold, that the change is within noise. The threshold bounds the larger of B / A and
A / B, so a time and the rate it gives (elapsed 1.05x, tok/s 0.952x) always get the same verdict. Settings
that differ between the two runs (model, workload, engine options, machine) are listed, since they may
explain a difference.

The default threshold, 4%, is the spread of one configuration run twice on a GPU (docs/benchmarks.md: 14,524
and 15,099 tok/s); a smaller one would call a plain rerun better or worse. The 2-core CPU machine varies by
about 12% between runs: pass --noise 12 there. Counts (prompt tokens computed, cached tokens, failures) are
exact, not timed, and get no allowance.

Library code: every bad input is a UsageError (exit 2): a file that does not exist or cannot be read, one
that is not a minisgl report, of another schema version, or of another kind than its partner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minisgl_cli.bench.report import SCHEMA_VERSION, SERVING_LATENCIES, SERVING_STATS, TableData
from minisgl_cli.errors import UsageError

# B / A (and A / B) at most 1 + this is "within noise" (see the module docstring).
DEFAULT_NOISE = 0.04
WITHIN_NOISE = "within noise"


@dataclass(frozen=True)
class Metric:
    key: str  # in the report's result rows
    higher_is_better: bool
    exact: bool = False  # a count, the same in every run of the same work: no noise allowance


@dataclass(frozen=True)
class ReportKind:
    identity: tuple[str, ...]  # the result keys that name one result within a report
    metrics: tuple[Metric, ...]


def _higher(*keys: str) -> tuple[Metric, ...]:
    return tuple(Metric(key, True) for key in keys)


def _lower(*keys: str) -> tuple[Metric, ...]:
    return tuple(Metric(key, False) for key in keys)


def _fewer(*keys: str) -> tuple[Metric, ...]:
    return tuple(Metric(key, False, exact=True) for key in keys)


KINDS: dict[str, ReportKind] = {
    "offline": ReportKind(
        ("system",),
        _higher("requests_per_s", "input_tok_per_s", "output_tok_per_s", "total_tok_per_s")
        + _lower("elapsed_s"),
    ),
    "latency": ReportKind(
        ("system", "batch_size"),
        _lower("prefill_ms")
        + _higher("prefill_tok_per_s")
        + _lower("decode_ms_per_step")
        + _higher("decode_tok_per_s", "roofline_share"),
    ),
    "prefix": ReportKind(
        ("cache_type",),
        _fewer("prefill_tokens")
        + (Metric("cached_tokens", True, exact=True),)
        + _higher("output_tok_per_s", "total_tok_per_s")
        + _lower("elapsed_s"),
    ),
    "serve": ReportKind(
        (),
        _higher("requests_per_s", "output_tok_per_s", "total_tok_per_s", "goodput_requests_per_s")
        + _fewer("failed")
        + _lower(*(f"{stat}_{metric}_ms" for metric in SERVING_LATENCIES for stat in SERVING_STATS)),
    ),
}


@dataclass(frozen=True)
class Report:
    path: Path
    command: str  # a key of KINDS
    machine: dict[str, Any]
    config: dict[str, Any]
    results: list[dict[str, Any]]


@dataclass(frozen=True)
class Row:
    result: str  # which result: "minisgl, batch 8"; "" for a serving report's only one
    metric: str
    a: float | None  # None: the report has no value (e.g. no --slo, no roofline)
    b: float | None
    higher_is_better: bool
    noise: float = 0.0  # B / A and A / B both at most 1 + noise: "within noise"

    @property
    def ratio(self) -> float | None:
        """B / A; None where either is missing or A is 0."""
        if self.a is None or self.b is None or self.a == 0:
            return None
        return self.b / self.a

    @property
    def verdict(self) -> str:
        """How B did against A on this metric: "better", "worse", "same", "within noise", or "-" where one
        is missing."""
        if self.a is None or self.b is None:
            return "-"
        if self.b == self.a:
            return "same"
        ratio = self.ratio
        # The tiny slack: 1.04 / 1.0 - 1 is a hair beyond 0.04 in floating point.
        if ratio is not None and ratio > 0 and max(ratio, 1 / ratio) - 1 <= self.noise + 1e-12:
            return WITHIN_NOISE
        return "better" if (self.b > self.a) == self.higher_is_better else "worse"


@dataclass(frozen=True)
class ReportComparison:
    kind: str
    rows: list[Row]
    only_in_a: list[str]  # results of A with no match in B
    only_in_b: list[str]
    differences: list[str]  # "config.bench.input_len: '128' vs '256'"
    noise: float = DEFAULT_NOISE  # the threshold of the timed metrics' rows


def load_report(path: Path) -> Report:
    """A `--json` report of any bench command, checked to be one (see bench/report.py for the schema)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a minisgl bench report: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not a minisgl bench report: not JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not {"schema_version", "command", "results"} <= data.keys():
        raise UsageError(
            f'{path} is not a minisgl bench report: it lacks "schema_version", "command" or "results"'
        )
    version, command = data["schema_version"], data["command"]
    if version != SCHEMA_VERSION:
        raise UsageError(
            f"{path} is a bench report of schema_version {version!r}; this minisgl reads version {SCHEMA_VERSION}"
        )
    if command not in KINDS:
        raise UsageError(f"{path}: unknown kind of bench report {command!r} (expected {', '.join(KINDS)})")
    results = data["results"]
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise UsageError(f'{path} is not a minisgl bench report: "results" is not a list of objects')
    kind = KINDS[command]
    for i, row in enumerate(results):
        bad = [key for key in kind.identity if not isinstance(row.get(key), (str, int))]
        if bad:
            raise UsageError(f'{path} is not a minisgl bench report: results[{i}] has no valid "{bad[0]}"')
        for metric in kind.metrics:
            value = row.get(metric.key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise UsageError(f"{path}: results[{i}].{metric.key} is {value!r}, not a number")
    return Report(path, command, _object(data.get("machine")), _object(data.get("config")), results)


def compare_reports(a: Report, b: Report, noise: float = DEFAULT_NOISE) -> ReportComparison:
    """Every metric of every result present in both reports, in A's order; a timed metric whose B / A and
    A / B are both at most 1 + `noise` (a fraction: 0.04) is within noise."""
    if noise < 0:
        raise UsageError(f"--noise {noise * 100:g}: expected a percentage >= 0")
    if a.command != b.command:
        raise UsageError(
            f"cannot compare reports of different benchmarks: {a.path} is from bench {a.command}, "
            f"{b.path} from bench {b.command}"
        )
    kind = KINDS[a.command]
    in_a, in_b = _by_identity(a, kind), _by_identity(b, kind)
    rows = [
        Row(
            _label(name),
            m.key,
            row.get(m.key),
            in_b[name].get(m.key),
            m.higher_is_better,
            0.0 if m.exact else noise,
        )
        for name, row in in_a.items()
        if name in in_b
        for m in kind.metrics
    ]
    return ReportComparison(
        kind=a.command,
        rows=rows,
        only_in_a=[_label(name) for name in in_a if name not in in_b],
        only_in_b=[_label(name) for name in in_b if name not in in_a],
        differences=_differences(
            {"machine": a.machine, "config": a.config}, {"machine": b.machine, "config": b.config}
        ),
        noise=noise,
    )


def comparison_table(comparison: ReportComparison) -> TableData:
    columns = ("result", "metric", "A", "B", "B / A", "better", "B is")
    rows = [
        (
            row.result,
            row.metric,
            _number(row.a),
            _number(row.b),
            "-" if row.ratio is None else f"{row.ratio:.3f}x",
            "higher" if row.higher_is_better else "lower",
            row.verdict,
        )
        for row in comparison.rows
    ]
    if not any(row.result for row in comparison.rows):  # a serving report: one result, nothing to name
        columns, rows = columns[1:], [row[1:] for row in rows]
    return TableData(columns, rows)


def noise_line(comparison: ReportComparison) -> str:
    """What "within noise" means in this comparison: the threshold, and that counts get none."""
    counts = [m.key for m in KINDS[comparison.kind].metrics if m.exact]
    exact = f"; {', '.join(counts)} compared exactly" if counts else ""
    n = comparison.noise
    return f"within noise (--noise {n * 100:g}): B / A from {1 / (1 + n):.3f}x to {1 + n:.3f}x{exact}"


def comparison_notes(comparison: ReportComparison) -> list[str]:
    notes = []
    if comparison.only_in_a:
        notes.append(f"only in A (not compared): {', '.join(comparison.only_in_a)}")
    if comparison.only_in_b:
        notes.append(f"only in B (not compared): {', '.join(comparison.only_in_b)}")
    if not comparison.rows:
        notes.append("the two reports have no result in common")
    if comparison.differences:
        notes.append(f"A and B differ in {', '.join(comparison.differences)}")
    return notes


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _by_identity(report: Report, kind: ReportKind) -> dict[tuple[Any, ...], dict[str, Any]]:
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in report.results:
        rows.setdefault(tuple((key, row[key]) for key in kind.identity), row)
    return rows


def _label(identity: tuple[Any, ...]) -> str:
    return ", ".join(f"batch {value}" if key == "batch_size" else str(value) for key, value in identity)


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: A vs B' for every leaf value that differs, nested objects flattened to dotted keys."""
    found = []
    for key in dict.fromkeys([*a, *b]):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            found += _differences(left, right, f"{prefix}{key}.")
        elif left != right:
            found.append(f"{prefix}{key}: {left!r} vs {right!r}")
    return found


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4g}"
