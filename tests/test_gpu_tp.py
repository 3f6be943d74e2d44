"""Tensor parallelism on GPUs: `LLM(tp=2)` (this process is rank 0 on cuda:0, a child rank 1 on cuda:1) over
NCCL against the unsplit engine on cuda:0, with the GPU path's defaults (overlap scheduling, FlashInfer,
CUDA graphs that capture the NCCL all-reduces). Those need two GPUs and skip below that. On one GPU, the
same checks run with both ranks on cuda:0 over gloo (MINISGL_TP_ONE_GPU=1; NCCL refuses two ranks on one
GPU, and gloo's collectives cannot be captured, so without graphs): everything but NCCL and the graphs.

- float32 (torch attention, no graphs, overlap on): the split must give the unsplit engine's tokens exactly,
  greedy and seeded, also when a small KV pool makes the schedulers preempt;
- bfloat16 with FlashInfer and CUDA graphs: graphs must give the split eager run's tokens exactly, and the
  split must agree with the unsplit run where bf16 rounding allows (the all-reduce sums the halves in
  another order, which flips near-ties on random weights): most first tokens, with their log-probabilities
  close.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import GPU_SHAPE, make_tiny_model

from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.request import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

SHAPE = {**GPU_SHAPE, "head_dim": 64}


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp(request.param), request.param, with_tokenizer=False, **SHAPE
    )


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(3, 384, (int(m),), generator=g).tolist()
        for m in torch.randint(5, 200, (n,), generator=g)
    ]


def _run(path: Path, prompts: list[list[int]], sampling: list[SamplingParams], **engine: object) -> list[Any]:
    gc.collect()
    torch.cuda.empty_cache()
    with LLM(str(path), device="cuda", max_running_requests=64, **engine) as llm:  # type: ignore[arg-type]
        if engine.get("cuda_graph_max_bs", 0):
            assert llm.runner.graphs is not None
        return llm.generate(prompts, sampling)


def _ids(outputs: list[Any]) -> list[list[int]]:
    return [out.token_ids for out in outputs]


@pytest.fixture(params=["nccl", "one-gpu"])
def placement(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How the 2 ranks are placed: one GPU each over NCCL (two GPUs), or both on cuda:0 over gloo."""
    if request.param == "nccl":
        if torch.cuda.device_count() < 2:
            pytest.skip("needs two CUDA GPUs")
    else:
        monkeypatch.setenv("MINISGL_TP_ONE_GPU", "1")  # the rank processes inherit it
    return request.param


def test_float32_split_equals_unsplit_with_overlap_and_preemption(model_dir: Path, placement: str) -> None:
    prompts = _prompts(12)
    sampling = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 6 + [
        SamplingParams(temperature=0.8, top_k=50, seed=i, max_tokens=40, ignore_eos=True) for i in range(6)
    ]
    # 2,000 slots: twelve requests of up to 240 tokens cannot all run at once.
    engine = {"dtype": "float32", "kv_cache_tokens": 2000, "cuda_graph_max_bs": 0}
    want = _ids(_run(model_dir, prompts, sampling, **engine))
    assert _ids(_run(model_dir, prompts, sampling, tp=2, **engine)) == want


@two_gpus
def test_bf16_split_with_graphs(model_dir: Path) -> None:
    prompts = _prompts(16)
    greedy = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0)] * len(prompts)
    engine = {"dtype": "bfloat16", "kv_cache_tokens": 65536, "attention_backend": "flashinfer"}
    graphs = _run(model_dir, prompts, greedy, tp=2, cuda_graph_max_bs=32, **engine)
    eager = _run(model_dir, prompts, greedy, tp=2, cuda_graph_max_bs=0, **engine)
    assert _ids(graphs) == _ids(eager)
    unsplit = _run(model_dir, prompts, greedy, cuda_graph_max_bs=32, **engine)
    same_first = [(a, b) for a, b in zip(graphs, unsplit, strict=True) if a.token_ids[0] == b.token_ids[0]]
    assert len(same_first) >= len(prompts) * 3 // 4
    for a, b in same_first:  # the prefill's logits: bf16 rounding apart, the same distribution
        assert a.logprobs[0].logprob == pytest.approx(b.logprobs[0].logprob, abs=0.05)


def test_bf16_split_on_one_gpu(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FlashInfer with 4 query heads and 1 KV head a rank, overlap on, both ranks on cuda:0; no graphs. The
    split's bf16 error is of the size of bf16's own: its first-token log-probabilities differ from the
    unsplit bf16 run's by no more than twice what the unsplit bf16 run's differ from float32's."""
    monkeypatch.setenv("MINISGL_TP_ONE_GPU", "1")
    prompts = _prompts(16)
    greedy = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0)] * len(prompts)
    engine = {"kv_cache_tokens": 65536, "cuda_graph_max_bs": 0}
    bf16 = {"dtype": "bfloat16", "attention_backend": "flashinfer", **engine}
    split = _run(model_dir, prompts, greedy, tp=2, **bf16)
    unsplit = _run(model_dir, prompts, greedy, **bf16)
    exact = _run(model_dir, prompts, greedy, dtype="float32", **engine)
    # bf16 flips near-ties of random weights (llama without q/k norm most): the split may flip about as
    # many first tokens as bf16 itself does against float32.
    agree_split = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(split, unsplit, strict=True))
    agree_bf16 = sum(b.token_ids[0] == c.token_ids[0] for b, c in zip(unsplit, exact, strict=True))
    same = [
        (a.logprobs[0].logprob, b.logprobs[0].logprob, c.logprobs[0].logprob)
        for a, b, c in zip(split, unsplit, exact, strict=True)
        if a.token_ids[0] == b.token_ids[0] == c.token_ids[0]
    ]
    split_err = max(abs(a - b) for a, b, _ in same)
    bf16_err = max(abs(b - c) for _, b, c in same)
    print(
        f"first tokens equal: split/unsplit bf16 {agree_split}, unsplit bf16/float32 {agree_bf16} of "
        f"{len(prompts)}; logprob error on the {len(same)} all equal: split {split_err:.4f}, bf16 {bf16_err:.4f}"
    )
    assert agree_split >= agree_bf16 - 2 and len(same) >= len(prompts) // 2
    assert split_err <= 2 * bf16_err + 1e-3
