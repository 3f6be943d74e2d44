"""`minisgl serve --tp 2 --nnodes 2` as two "nodes" of one rank each on loopback: node 0 (rank 0, HTTP,
tokenizer) and node 1 (rank 1 only) are two separate `minisgl serve` processes that meet at
--dist-init-addr. The OpenAI client against node 0 gets what the unsplit in-process engine gives; stopping
node 0 stops node 1 cleanly, and a rank lost on node 1 stops node 0 with a clear error instead of leaving it
hanging. Layouts that cannot work are refused with one line before anything loads.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from model_helpers import make_tiny_model
from server_helpers import ServerProcess, pid_alive

from minisgl_cli.engine.request import SamplingParams

TINY = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64}
ENGINE = ("--device", "cpu", "--kv-cache-tokens", "160", "--max-running-requests", "8")
TEXTS = ["The quick brown fox", "hello there, how are", "Count: 1, 2, 3,"]


@dataclass
class Nodes:
    node0: ServerProcess  # rank 0 and the HTTP server
    node1: ServerProcess  # rank 1 only (its --port is unused: it serves no HTTP)

    def kill(self) -> None:
        self.node0.kill()
        self.node1.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(model_dir: Path) -> Nodes:
    layout = ("--tp", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{_free_port()}")
    node1 = ServerProcess("-m", str(model_dir), *ENGINE, *layout, "--node-rank", "1")
    node0 = ServerProcess("-m", str(model_dir), *ENGINE, *layout, "--node-rank", "0")
    nodes = Nodes(node0, node1)
    try:
        node0.wait_listening()
        node0.wait_healthy()
        deadline = time.monotonic() + 30
        while "processes:" not in node1.log:  # node 1 logs its ranks' pids once they are ready
            assert time.monotonic() < deadline, node1.log
            time.sleep(0.1)
    except BaseException:
        nodes.kill()
        raise
    return nodes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("nodes-model"), "llama", **TINY)


@pytest.fixture(scope="module")
def nodes(model_dir: Path) -> Iterator[Nodes]:
    started = _start(model_dir)
    try:
        yield started
    finally:
        started.kill()


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Any:
    from minisgl_cli.engine.llm import LLM

    return LLM(str(model_dir), device="cpu", kv_cache_tokens=160, max_running_requests=8)


def test_each_node_runs_its_own_ranks(nodes: Nodes) -> None:
    assert set(nodes.node0.child_pids()) == {"scheduler-0", "tokenizer-0"}
    assert set(nodes.node1.child_pids()) == {"scheduler-1"}
    assert "2 cpu ranks (tensor parallel)" in nodes.node0.log
    assert "node 1: rank(s) 1 ready on cpu" in nodes.node1.log
    assert "Listening" not in nodes.node1.log


def test_the_openai_client_gets_the_unsplit_tokens(nodes: Nodes, reference: Any) -> None:
    client = openai.OpenAI(base_url=f"{nodes.node0.url}/v1", api_key="unused", max_retries=0, timeout=120)
    for text in TEXTS:
        want = reference.generate(text, SamplingParams(temperature=0, max_tokens=12))[0]
        reply = client.completions.create(model="tiny-llama", prompt=text, temperature=0, max_tokens=12)
        assert reply.choices[0].text == want.text
        stream = client.completions.create(
            model="tiny-llama", prompt=text, temperature=0, max_tokens=12, stream=True
        )
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == want.text
    # Sampled with a seed, two choices: the n requests are seeded seed and seed + 1.
    want = [
        reference.generate(TEXTS[0], SamplingParams(temperature=0.9, max_tokens=10, seed=s))[0].text
        for s in (7, 8)
    ]
    reply = client.completions.create(
        model="tiny-llama", prompt=TEXTS[0], temperature=0.9, max_tokens=10, seed=7, n=2
    )
    assert sorted(c.text for c in reply.choices) == sorted(want)


def test_stopping_node_0_stops_node_1(model_dir: Path) -> None:
    nodes = _start(model_dir)
    try:
        pids = {**nodes.node0.child_pids(), **nodes.node1.child_pids()}
        assert nodes.node0.terminate() == 0
        assert nodes.node1.proc.wait(30) == 0
        assert "node 0 stopped the server" in nodes.node1.log
        time.sleep(0.5)
        assert not any(pid_alive(pid) for pid in pids.values())
    finally:
        nodes.kill()


def test_losing_a_rank_on_node_1_stops_node_0(model_dir: Path) -> None:
    nodes = _start(model_dir)
    try:
        pids = {**nodes.node0.child_pids(), **nodes.node1.child_pids()}
        os.kill(pids["scheduler-1"], signal.SIGKILL)
        assert nodes.node1.proc.wait(30) == 1
        assert nodes.node1.log.strip().splitlines()[-1] == (
            "error: the scheduler-1 process died (killed by SIGKILL): node 0 or another rank is gone; "
            "this node stopped"
        )
        # Node 0 is idle, yet notices at once: its idle steps reach rank 1.
        assert nodes.node0.proc.wait(30) == 1
        last = nodes.node0.log.strip().splitlines()[-1]
        assert last.startswith("error: the scheduler-0 process died") and "another node may have died" in last
        time.sleep(0.5)
        assert not any(pid_alive(pid) for pid in pids.values())
    finally:
        nodes.kill()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (
            ("--tp", "2", "--nnodes", "2"),
            "error: --nnodes 2 needs --dist-init-addr HOST:PORT: node 0's address and a free port there, "
            "the same on every node",
        ),
        (
            ("--tp", "2", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "127.0.0.1:1"),
            "error: --node-rank 2 is outside --nnodes 2 (0 to 1)",
        ),
        (
            ("--tp", "3", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:1"),
            "error: --tp 3 does not split over --nnodes 2: every node runs the same number of ranks",
        ),
    ],
)
def test_a_layout_that_cannot_work_is_refused(model_dir: Path, layout: tuple[str, ...], message: str) -> None:
    srv = ServerProcess("-m", str(model_dir), "--device", "cpu", *layout)
    try:
        assert srv.proc.wait(60) != 0
        assert srv.log.strip().splitlines() == [message]
    finally:
        srv.kill()
