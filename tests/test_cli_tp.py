"""`--tp 2` through the in-process commands on the CPU (gloo), each run as the real executable in a
subprocess: `generate` writes what it writes unsplit (greedy and seeded), `bench offline` and `bench latency`
count every token of their workloads and record the split in their JSON reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from model_helpers import make_tiny_model

from minisgl_cli.bench.workload import load_workload
from minisgl_cli.config import BenchConfig

TINY = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64}
ENGINE = ("--device", "cpu", "--kv-cache-tokens", "2048", "--max-running-requests", "16")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("cli-tp"), "qwen3", **TINY)


def _minisgl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "minisgl_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_generate_split_writes_the_unsplit_records(model_dir: Path, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "\n".join(
            json.dumps(job)
            for job in [
                {"id": "greedy", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0},
                {"id": "seeded", "prompt": "hello there", "max_tokens": 12, "temperature": 0.8, "seed": 3},
                {"id": "chat", "messages": [{"role": "user", "content": "Count: 1, 2,"}], "max_tokens": 9},
            ]
        )
        + "\n"
    )
    outputs = {}
    for tp in ("1", "2"):
        out = tmp_path / f"out-tp{tp}.jsonl"
        res = _minisgl("generate", "-f", jobs, "-o", out, "-m", model_dir, *ENGINE, "--tp", tp)
        assert res.returncode == 0, res.stderr
        outputs[tp] = [json.loads(line) for line in out.read_text().splitlines()]
    texts = {tp: [(r["id"], r["text"], r["usage"]) for r in records] for tp, records in outputs.items()}
    assert len(texts["1"]) == 3
    assert sorted(texts["2"]) == sorted(texts["1"])


def _bench_split(kind: str, out: Path, *args: str) -> dict[str, Any]:
    """`minisgl bench KIND ... --tp 2`'s JSON report."""
    res = _minisgl("bench", kind, *ENGINE, "--tp", "2", *args, "--json", out)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["config"]["engine"]["tp"] == 2
    return report


def test_bench_offline_and_latency_split(model_dir: Path, tmp_path: Path) -> None:
    lengths = {"num_prompts": 6, "input_len": "4,12", "output_len": "3,9"}
    report = _bench_split(
        "offline", tmp_path / "offline.json", "-m", str(model_dir),
        *(f"--{k.replace('_', '-')}={v}" for k, v in lengths.items()),
    )  # fmt: skip
    workload = load_workload(BenchConfig(**lengths), vocab_size=384)  # type: ignore[arg-type]
    (result,) = report["results"]
    assert (result["num_requests"], result["output_tokens"]) == (6, workload.output_tokens)

    report = _bench_split(
        "latency", tmp_path / "latency.json", "-m", str(model_dir),
        "--batch-sizes", "1,3", "--input-len", "8", "--output-len", "5",
    )  # fmt: skip
    assert [(r["batch_size"], r["decode_steps"]) for r in report["results"]] == [(1, 4), (3, 4)]
