"""Prometheus metrics (server/metrics.py): the exposition text, the latency bookkeeping, and /metrics
after a few requests through the app (counts worked out by hand from FakeEngine's echo)."""

from __future__ import annotations

import math
import re

import pytest
from api_fakes import FakeEngine, chat_body, make_app
from fastapi.testclient import TestClient

from minisgl_cli.server import metrics as metrics_module
from minisgl_cli.server.messages import TextOutput
from minisgl_cli.server.metrics import CONTENT_TYPE, ApiMetrics, Counter, Histogram

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of an exposition text; asserts each one belongs to a family declared by HELP and TYPE."""
    assert text.endswith("\n")
    declared: dict[str, str] = {}
    helped: set[str] = set()
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram") and name in helped
            declared[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, line
            name, labels, value = match.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in declared else name
            assert family in declared, line
            samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def one(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_counter_text() -> None:
    counter = Counter("x_total", "Things.", ("endpoint", "status"))
    counter.inc("/a", "200")
    counter.inc("/a", "200", amount=2)
    counter.inc('say "hi"\\\n', "500")
    assert counter.render() == [
        "# HELP x_total Things.",
        "# TYPE x_total counter",
        'x_total{endpoint="/a",status="200"} 3',
        'x_total{endpoint="say \\"hi\\"\\\\\\n",status="500"} 1',
    ]
    assert (
        parse("\n".join(counter.render()) + "\n")[
            ("x_total", frozenset({("endpoint", "/a"), ("status", "200")}))
        ]
        == 3
    )
    with pytest.raises(ValueError):
        counter.inc("/a")
    assert Counter("y_total", "None yet.").render()[-1] == "y_total 0"


def test_histogram_text() -> None:
    histogram = Histogram("lat_seconds", "Latency.", (0.5, 0.1, 1.0))
    for value in (0.05, 0.1, 0.3, 2.0):
        histogram.observe(value)
    histogram.observe(0.7, times=3)
    assert histogram.render() == [
        "# HELP lat_seconds Latency.",
        "# TYPE lat_seconds histogram",
        'lat_seconds_bucket{le="0.1"} 2',  # a value on a bound falls in that bucket (le: <=)
        'lat_seconds_bucket{le="0.5"} 3',
        'lat_seconds_bucket{le="1"} 6',
        'lat_seconds_bucket{le="+Inf"} 7',
        f"lat_seconds_sum {0.05 + 0.1 + 0.3 + 2.0 + 0.7 * 3!r}",
        "lat_seconds_count 7",
    ]


def test_timer_splits_gaps_between_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([10.5, 10.7, 11.0])
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))
    metrics = ApiMetrics()
    timer = metrics.timer(arrival=10.0)

    def out(num_tokens: int, finish: str | None = None) -> TextOutput:
        return TextOutput(0, "x", list(range(num_tokens)), None, finish, 7, 0, 0)

    timer.on_output(out(1))  # 10.5: first token, 0.5 s after arrival
    timer.on_output(out(2))  # 10.7: two tokens shared a 0.2 s wait: 0.1 s each
    timer.on_output(out(0))  # no token (held-back text): no clock read, no sample
    timer.on_output(out(1, "stop"))  # 11.0: 0.3 s after the last token
    assert (metrics.ttft.count, metrics.ttft.sum) == (1, pytest.approx(0.5))
    assert (metrics.itl.count, metrics.itl.sum) == (3, pytest.approx(0.5))
    samples = parse(metrics.render(FakeEngine()))
    assert one(samples, "minisgl_inter_token_latency_seconds_bucket", le="0.08") == 0
    assert one(samples, "minisgl_inter_token_latency_seconds_bucket", le="0.1") == 2
    assert one(samples, "minisgl_inter_token_latency_seconds_bucket", le="0.25") == 2
    assert one(samples, "minisgl_inter_token_latency_seconds_bucket", le="0.5") == 3
    assert one(samples, "minisgl_prompt_tokens_total") == 7  # once per engine request
    assert one(samples, "minisgl_generation_tokens_total") == 4


def test_metrics_endpoint_after_requests() -> None:
    app, engine = make_app()
    with TestClient(app) as client:
        empty = parse(client.get("/metrics").text)
        assert one(empty, "minisgl_generation_tokens_total") == 0
        assert client.post("/v1/chat/completions", json=chat_body("a b c")).status_code == 200
        assert client.post("/v1/chat/completions", json=chat_body("a b c", stream=True)).status_code == 200
        r = client.post("/v1/completions", json={"prompt": "x y", "n": 2, "max_tokens": 1})
        assert r.status_code == 200
        assert client.post("/v1/completions", json={"prompt": "x", "echo": True}).status_code == 400
        assert client.get("/no/such/path").status_code == 404
        response = client.get("/metrics")
    assert response.headers["content-type"] == CONTENT_TYPE
    samples = parse(response.text)

    requests = {
        (dict(labels)["endpoint"], dict(labels)["status"]): value
        for (name, labels), value in samples.items()
        if name == "minisgl_requests_total"
    }
    assert requests == {
        ("/metrics", "200"): 1,  # the first scrape; this one is counted once it is sent
        ("/v1/chat/completions", "200"): 2,
        ("/v1/completions", "200"): 1,
        ("/v1/completions", "400"): 1,
        ("other", "404"): 1,
    }
    # Four engine requests: prompts of 3, 3, 2 and 2 tokens; 3, 3, 1 and 1 tokens generated.
    assert one(samples, "minisgl_prompt_tokens_total") == 10
    assert one(samples, "minisgl_generation_tokens_total") == 8
    for name, count in (
        ("minisgl_time_to_first_token_seconds", 4),
        ("minisgl_inter_token_latency_seconds", 4),
    ):
        assert one(samples, f"{name}_count") == count
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (sample, labels), value in samples.items()
            if sample == f"{name}_bucket"
        )
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert buckets[-1] == (math.inf, count)
        assert one(samples, f"{name}_sum") >= 0
    # The engine's gauges, from its EngineStats.
    assert one(samples, "minisgl_num_requests_running") == 3
    assert one(samples, "minisgl_num_requests_waiting") == 2
    assert one(samples, "minisgl_kv_cache_usage_ratio") == 0.25
    assert one(samples, "minisgl_prefix_cache_hit_rate") == 0.25
    assert one(samples, "minisgl_preemptions_total") == 4
    assert one(samples, "minisgl_requests_in_flight") == 0


def test_engine_gauges_wait_for_the_first_stats() -> None:
    engine = FakeEngine()
    engine.stats = None
    samples = parse(ApiMetrics().render(engine))
    assert not any(name.startswith("minisgl_num_requests") for name, _ in samples)
    assert one(samples, "minisgl_requests_in_flight") == 0
