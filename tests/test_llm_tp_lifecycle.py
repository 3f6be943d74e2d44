"""`LLM(tp=2)`'s life on the CPU: close() stops its other rank; a rank that fails to start takes the others
with it and leaves nothing behind; a split the model does not allow is refused before any process starts.
(Apart from test_llm_tp.py, whose module-wide split engine would hold this process's one torch.distributed
group while these tests start their own.)
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from model_helpers import make_tiny_model

from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import MinisglError, UsageError

TINY = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64}
ENGINE = {"device": "cpu", "kv_cache_tokens": 160, "max_running_requests": 8}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llm-tp-life"), "llama", **TINY)


def _ranks() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("minisgl-rank-")]


def test_close_stops_the_other_rank(model_dir: Path) -> None:
    llm = LLM(str(model_dir), tp=2, **ENGINE)
    children = _ranks()
    assert children
    llm.close()
    llm.close()  # a second close does nothing
    assert all(not p.is_alive() and p.exitcode == 0 for p in children)


def test_a_rank_that_fails_to_start_stops_the_others(model_dir: Path) -> None:
    # 256 running requests need 256 pages: every rank refuses the 160-token pool; rank 0 says why.
    with pytest.raises(MinisglError, match="fewer than one page for each of the 256 running requests"):
        LLM(str(model_dir), tp=2, **{**ENGINE, "max_running_requests": 256})
    assert not _ranks()
    # Nothing is left behind: a new split engine starts (its process group is a fresh one).
    with LLM(str(model_dir), tp=2, **ENGINE) as llm:
        assert llm.generate("a", SamplingParams(temperature=0, max_tokens=2))[0].token_ids


def test_a_split_that_does_not_divide_the_heads_is_refused(model_dir: Path) -> None:
    with pytest.raises(MinisglError, match="needs attention heads that divide by 3"):
        LLM(str(model_dir), tp=3, **ENGINE)
    assert not _ranks()


@pytest.mark.parametrize(
    ("device", "tp", "ranks_here", "message"),
    [
        ("cuda", 2, 2, "--tp 2 runs 2 ranks, one per GPU, but CUDA sees 1 GPU"),
        # --tp 4 over --nnodes 2: each node must show 2 GPUs
        ("cuda", 4, 2, "--tp 4 runs 2 ranks on this node, one per GPU, but CUDA sees 1 GPU"),
        ("cuda:0", 2, 2, "--device cuda:0 names one GPU, but --tp 2 runs each rank on a GPU of its own"),
    ],
)
def test_more_ranks_than_gpus_is_refused(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, device: str, tp: int, ranks_here: int, message: str
) -> None:
    """On a machine that shows one GPU (faked here: the check reads torch.cuda's counts)."""
    import torch

    from minisgl_cli.config import EngineConfig
    from minisgl_cli.engine.tp_ranks import check_tp
    from minisgl_cli.model_source import resolve_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = EngineConfig(model=str(model_dir), device=device, tp=tp)
    with pytest.raises(UsageError) as info:
        check_tp(cfg, resolve_model(cfg.model, False), ranks_here)
    assert str(info.value).startswith(message)


def test_four_ranks_give_the_tokens_of_two_and_one(model_dir: Path) -> None:
    """Issue 10's check on the CPU: TP=4 (KV heads copied, 2 ranks each) against TP=2 and one rank."""
    prompts = ["The quick brown fox", "hello there, how are", [5, 6, 7] * 9]
    sampling = [
        SamplingParams(temperature=0, max_tokens=10),
        SamplingParams(temperature=0.9, seed=4, max_tokens=10),
    ]
    runs = {}
    for tp in (1, 2, 4):
        with LLM(str(model_dir), tp=tp, **ENGINE) as llm:
            runs[tp] = [o.token_ids for o in llm.generate(prompts * 2, sampling * 3)]
    assert runs[4] == runs[2] == runs[1]
