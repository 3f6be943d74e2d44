"""Overlap scheduling under tensor parallelism, on the CPU: overlap is the GPU default, and there rank 0's
changes (a request finished from outside while its token is in flight, an idle step that only processes the
batch in flight) reach rank 1 between launches rather than between finished steps. Overlap is forced on
here, in 2 gloo ranks built as the engine builds them (rank 1 runs `rank_sync.follow`), and every request's
tokens must equal the unsplit engine's with overlap on: greedy, seeded, a stop token, preemption in a small
KV pool, and an abort after three steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from model_helpers import make_tiny_model

from minisgl_cli.config import EngineConfig
from minisgl_cli.engine.builder import build_engine
from minisgl_cli.engine.request import FinishReason, SamplingParams
from minisgl_cli.engine.scheduler import Scheduler
from minisgl_cli.engine.tp_ranks import RankPlace, join
from minisgl_cli.model_source import resolve_model

TINY = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64}
PROMPTS = [[5, 17, 99, 3] * (i + 2) for i in range(6)]
SAMPLING = [
    SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
    SamplingParams(temperature=0.9, seed=3, max_tokens=30, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=30, stop_token_ids=list(range(0, 384, 9))),
    SamplingParams(temperature=0.7, top_k=30, max_tokens=25, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.2),
    SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),  # aborted after 3 steps
]


def _config(model_dir: str) -> EngineConfig:
    # 96 slots: the six requests (up to 58 tokens each) cannot all run at once, so the schedulers preempt.
    return EngineConfig(model=model_dir, device="cpu", kv_cache_tokens=96, max_running_requests=8)


def _drive(scheduler: Scheduler) -> dict[str, object]:
    """What a caller of rank 0 does: add, step, abort one request from outside, and one idle step at the end
    (as the server's idle rank 0 does), which processes a batch still in flight."""
    scheduler.overlap = True
    reqs = [scheduler.add(p, sp) for p, sp in zip(PROMPTS, SAMPLING, strict=True)]
    steps = 0
    while scheduler.has_work:
        scheduler.step()
        steps += 1
        if steps == 3:
            scheduler.finish(reqs[-1], FinishReason.ABORT)
    scheduler.step()
    return {
        "tokens": [r.output_ids for r in reqs],
        "reasons": [r.finish_reason for r in reqs],
        "preemptions": scheduler.stats().num_preemptions,
    }


def _rank_main(rank: int, model_dir: str, init_file: str, out: str) -> None:
    from minisgl_cli.engine.rank_sync import RankChannel, follow

    cfg, tp = join(_config(model_dir), RankPlace(rank, 2, rank, f"file://{init_file}"))
    engine = build_engine(cfg, resolve_model(model_dir), tp=tp)
    if rank == 0:
        result = _drive(engine.scheduler)
        assert engine.scheduler.leader is not None
        engine.scheduler.leader.stop()
        Path(out).write_text(json.dumps(result))
    else:
        engine.scheduler.overlap = True
        follow(engine.scheduler, RankChannel(tp))
    tp.destroy()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tp-overlap"), "qwen3", with_tokenizer=False, **TINY))


def test_split_overlap_equals_unsplit_overlap(model_dir: str, tmp_path: Path) -> None:
    want = _drive(build_engine(_config(model_dir)).scheduler)
    assert want["preemptions"] > 0  # the pool really was too small
    assert want["reasons"][-1] == "abort" and want["reasons"][2] == "stop"
    out = tmp_path / "rank0.json"
    mp.spawn(_rank_main, args=(model_dir, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    assert json.loads(out.read_text()) == want
