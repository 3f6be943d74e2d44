"""The GPU path against the reference paths, on tiny random Llama, Qwen3 and Qwen3-MoE models in bfloat16:
FlashInfer attention against the torch backend (logits, then greedy tokens), CUDA graphs against eager,
overlap scheduling against none, the radix cache against none, and the memory errors. CUDA only."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from model_helpers import GPU_SHAPE as SHAPE
from model_helpers import Driver, make_tiny_model, small_runner

from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.model_runner import ModelRunner
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import MinisglError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}
CASES = {
    "llama": ("llama", {**SHAPE, "head_dim": 64, "rope_scaling": LLAMA3_ROPE}),
    "qwen3": ("qwen3", {**SHAPE, "head_dim": 128}),
    # The fused MoE kernels (layers/fused_moe.py) in every engine path: graphs, overlap, the float32 reference.
    "qwen3_moe": (
        "qwen3_moe",
        {**SHAPE, "head_dim": 128, "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 128},
    ),
}


def _saved(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, overrides = CASES[name]
    return make_tiny_model(tmp_path_factory.mktemp(name), arch, with_tokenizer=False, **overrides)


@pytest.fixture(scope="module", params=sorted(CASES))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _saved(request.param, tmp_path_factory)


# The bf16-against-float32 comparisons take the dense models only: in a MoE model a rounding that moves a
# router's near-tie picks another expert, so bf16 logits leave float32's by whole experts' outputs, in any
# backend (the block itself is compared with float64 in test_fused_moe.py). The exact comparisons (graphs,
# overlap, radix cache) take every model.
@pytest.fixture(scope="module", params=sorted(name for name in CASES if "moe" not in name))
def dense_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _saved(request.param, tmp_path_factory)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 300, (n,), generator=g).tolist()
    return [torch.randint(3, 384, (m,), generator=g).tolist() for m in lengths]


def _llm(path: Path, **kw: object) -> LLM:
    args: dict[str, object] = {
        "device": "cuda",
        "dtype": "bfloat16",
        "kv_cache_tokens": 65536,
        "max_running_requests": 64,
        "cuda_graph_max_bs": 0,
        "disable_overlap": True,
    }
    gc.collect()
    torch.cuda.empty_cache()
    return LLM(str(path), **{**args, **kw})


def _tokens(
    llm: LLM, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]
) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(prompts, sampling)]


GREEDY_32 = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _runner(path: Path, backend: str, dtype: torch.dtype = torch.bfloat16) -> ModelRunner:
    return small_runner(
        path,
        dtype=dtype,
        device=torch.device("cuda"),
        page_size=16,
        max_running_requests=8,
        max_context_len=1024,
        kv_cache_tokens=16384,
        mem_fraction=0.85,
        attention_backend=backend,
    )


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_flashinfer_logits_match_torch_backend(dense_model_dir: Path) -> None:
    """Teacher-forced: every runner gets the same tokens (the float32 runner's greedy picks), step by step,
    through a mixed prefill, a chunk beside decodes, and 16 decode steps. FlashInfer's bf16 logits stay within
    2e-2 (relative) of the float32 reference, about as close as the torch backend's own bf16 logits, and
    agree with the torch backend's greedy pick on nearly every row."""
    drivers = {
        "fp32": Driver(_runner(dense_model_dir, "torch", torch.float32)),
        "torch": Driver(_runner(dense_model_dir, "torch")),
        "flashinfer": Driver(_runner(dense_model_dir, "flashinfer")),
    }
    prompts = _prompts(5, seed=1)
    fi_err: list[float] = []
    torch_err: list[float] = []
    agree = rows = 0

    def step(work: list[tuple[int, list[int]]]) -> torch.Tensor:
        nonlocal agree, rows
        logits = {name: d.step(work) for name, d in drivers.items()}
        fi_err.append(_rel_err(logits["flashinfer"], logits["fp32"]))
        torch_err.append(_rel_err(logits["torch"], logits["fp32"]))
        agree += int((logits["flashinfer"].argmax(-1) == logits["torch"].argmax(-1)).sum())
        rows += len(work)
        return logits["fp32"].argmax(-1)

    nxt = step([(i, p) for i, p in enumerate(prompts[:4])])
    work = [(i, [int(t)]) for i, t in enumerate(nxt)] + [(4, prompts[4])]
    for _ in range(17):
        nxt = step(work)
        work = [(sid, [int(t)]) for (sid, _), t in zip(work, nxt, strict=True)]
    report = f"flashinfer {[f'{e:.1e}' for e in fi_err]}, torch bf16 {[f'{e:.1e}' for e in torch_err]}"
    # 2e-2, or bf16's own error on this model where that is larger: random weights without q/k norm (the
    # llama case) give peaked attention whose bf16 rounding alone moves the logits by 5-8e-2, in both backends.
    for fi, ref in zip(fi_err, torch_err, strict=True):
        assert fi < max(2e-2, 1.15 * ref), report
    assert sum(fi_err) <= 1.05 * sum(torch_err), report
    assert agree >= 0.9 * rows, f"greedy picks agree on {agree} of {rows} rows"


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def test_flashinfer_greedy_tokens_track_float32_as_closely_as_torch(dense_model_dir: Path) -> None:
    """On a random tiny model top-2 logits are close, so bf16 rounding alone flips greedy picks within a few
    tokens (bf16 against float32 with the same torch backend diverges on almost every prompt). So here each
    bf16 backend is measured against float32: FlashInfer must stay on the float32 tokens about as long as the
    torch backend does. (Trained SmolLM2, measured once on the H100: teacher-forced over 12 steps of 4 chat
    prompts, FlashInfer's bf16 greedy picks matched float32's on 45 of 48 rows, the torch backend's bf16 picks
    on 46; the first token is a near-tie, a logit gap under 0.11, on all four prompts.)"""
    prompts = _prompts(8, seed=2)
    fp32 = _tokens(_llm(dense_model_dir, attention_backend="torch", dtype="float32"), prompts, GREEDY_32)

    def agreement(backend: str) -> int:
        got = _tokens(_llm(dense_model_dir, attention_backend=backend), prompts, GREEDY_32)
        return sum(len(a) if a == b else _first_difference(a, b) for a, b in zip(fp32, got, strict=True))

    torch_bf16 = agreement("torch")
    for backend in ("flashinfer", "flashinfer,torch", "torch,flashinfer"):
        fi = agreement(backend)
        assert fi >= 0.6 * torch_bf16, f"{backend}: {fi} tokens agree with float32, torch bf16 {torch_bf16}"


@pytest.mark.parametrize("decode_kernel", ["tensor-cores", "cuda-cores", "triton"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_cuda_graphs_give_eager_tokens(model_dir: Path, page_size: int, decode_kernel: str) -> None:
    prompts = _prompts(11, seed=3)  # 11 decode rows: replayed in the graph of 16, padded
    kw = {"page_size": page_size, "decode_kernel": decode_kernel}
    eager = _llm(model_dir, cuda_graph_max_bs=0, **kw)
    graphs = _llm(model_dir, cuda_graph_max_bs=32, **kw)
    assert eager.runner.graphs is None and graphs.runner.graphs is not None
    assert graphs.runner.graphs.sizes == [1, 2, 4, 8, 16, 24, 32]
    assert _tokens(graphs, prompts, GREEDY_32) == _tokens(eager, prompts, GREEDY_32)
    # Batch sizes that hit a graph exactly (1, 8) and need padding (3).
    for n in (1, 3, 8):
        assert _tokens(graphs, prompts[:n], GREEDY_32) == _tokens(eager, prompts[:n], GREEDY_32)


def test_overlap_gives_the_same_tokens(model_dir: Path) -> None:
    prompts = _prompts(12, seed=4)
    sampling = [
        SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i, max_tokens=40, ignore_eos=True)
        for i in range(len(prompts))
    ]
    plain = _llm(model_dir, cuda_graph_max_bs=16, disable_overlap=True)
    overlap = _llm(model_dir, cuda_graph_max_bs=16, disable_overlap=False)
    assert _tokens(overlap, prompts, sampling) == _tokens(plain, prompts, sampling)


def test_radix_cache_on_and_off_give_the_same_tokens(model_dir: Path) -> None:
    shared = torch.randint(3, 384, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    prompts = [shared + p[:20] for p in _prompts(8, seed=6)]
    radix = _llm(model_dir, cache_type="radix", cuda_graph_max_bs=16)
    naive = _llm(model_dir, cache_type="naive", cuda_graph_max_bs=16)
    first = _tokens(radix, prompts[:1], GREEDY_32)  # caches the shared prefix
    outs = radix.generate(prompts, GREEDY_32)
    assert all(o.usage.cached_tokens >= 200 for o in outs[1:])
    assert [o.token_ids for o in outs] == _tokens(naive, prompts, GREEDY_32)
    # Alone, against the naive cache alone: a request decoded alone goes through other matmul kernels than in
    # a batch (layers/gemv.py), whose last-bit differences can flip a near-tie of this random model's argmax.
    assert first == _tokens(naive, prompts[:1], GREEDY_32)


def test_a_model_too_large_for_the_gpu_is_a_clear_error(tmp_path: Path) -> None:
    """Llama-3.1-70B's layers, repeated until the bf16 weights are twice the GPU's whole memory, whatever GPU
    this runs on (70B alone fits a 141 GB H200)."""
    import json

    from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES

    config = dict(BUILTIN_SHAPES["llama-3.1-70b"])
    total = torch.cuda.mem_get_info()[1]
    config["num_hidden_layers"] = 80 * (-(-2 * total // int(141e9)))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MinisglError, match="weights need .* GiB but only .* GiB is free"):
        LLM(str(tmp_path), dummy_weights=True, device="cuda", dtype="bfloat16")


def test_a_mem_fraction_too_small_for_the_weights_is_a_clear_error() -> None:
    with pytest.raises(MinisglError, match="raise --mem-fraction"):
        LLM("qwen3-0.6b", dummy_weights=True, device="cuda", dtype="bfloat16", mem_fraction=0.001)
