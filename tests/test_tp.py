"""Tensor parallelism on the CPU over gloo: a model split over 2 and 4 ranks (one process each) gives
the logits and greedy tokens of the unsplit model, with checkpoint and with dummy weights; a model that
does not split over the ranks is refused with a clear error.

Each TP size spawns its ranks once and runs every case in them (process start-up dominates the cost);
the unsplit reference runs in this process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model_helpers import Driver, make_tiny_model, small_runner

from minisgl_cli.engine.distributed import TPGroup, init_tp
from minisgl_cli.engine.model_runner import ModelRunner
from minisgl_cli.engine.models.config import ModelConfig
from minisgl_cli.errors import MinisglError

CPU = torch.device("cpu")
# 8 query heads split over 2 and 4 ranks; 2 KV heads are replicated at 4 ranks, 4 KV heads split.
TINY = {"num_attention_heads": 8, "head_dim": 16, "hidden_size": 64, "intermediate_size": 96}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-kv2": ("llama", {"num_key_value_heads": 2}),
    # 385 pads the vocab to 386 (2 ranks) and 388 (4 ranks); the tied lm_head shares the padded shard.
    "llama-kv4-tied-odd-vocab": (
        "llama",
        {"num_key_value_heads": 4, "tie_word_embeddings": True, "vocab_size": 385},
    ),
    "qwen2-kv2-bias": ("qwen2", {"num_key_value_heads": 2}),
    "qwen3-kv2": ("qwen3", {"num_key_value_heads": 2}),
    "qwen3-kv4-tied": ("qwen3", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
}
DUMMY = "dummy-qwen2-kv2-odd-vocab"
DUMMY_HF_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 390,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    **TINY,
}
PROMPTS = ([5, 17, 99, 3, 250, 42, 7], [11, 300, 64, 2, 9])
DECODE_STEPS = 8


@dataclass(frozen=True)
class Case:
    config: ModelConfig
    weights_dir: Path | None  # None: dummy weights


@dataclass(frozen=True)
class Result:
    logits: torch.Tensor  # every step's logits, stacked: [1 + 2 + 2 * DECODE_STEPS, vocab]
    tokens: list[int]  # the greedy tokens fed back, in order
    kv_heads: int  # KV heads in this rank's pool


def _run(case: Case, tp: TPGroup) -> Result:
    """Prefill one prompt, then a mixed step (its first decode beside the second prompt's prefill), then
    greedy decode of both. Rank 0 picks the tokens and sends them to the others, as the engine will."""
    runner = small_runner(case.weights_dir, case.config, max_context_len=64, kv_cache_tokens=256, tp=tp)
    driver = Driver(runner)
    steps, tokens = [], []

    def step(work: list[tuple[int, list[int]]]) -> list[int]:
        logits = driver.step(work)
        picked = logits.argmax(-1)
        if tp.size > 1:
            dist.broadcast(picked, src=0, group=tp.group)
        steps.append(logits)
        tokens.extend(picked.tolist())
        return picked.tolist()

    (a,) = step([(0, list(PROMPTS[0]))])
    a, b = step([(0, [a]), (1, list(PROMPTS[1]))])
    for _ in range(DECODE_STEPS):
        a, b = step([(0, [a]), (1, [b])])
    return Result(torch.cat(steps), tokens, runner.kv_pool.num_kv_heads)


def _rank_main(rank: int, size: int, init_file: str, cases: dict[str, Case], out_dir: str) -> None:
    torch.set_num_threads(1)  # 4 ranks share 2 cores
    tp = init_tp(rank, size, f"file://{init_file}", "gloo", timeout=timedelta(seconds=60))
    try:
        results = {name: _run(case, tp) for name, case in cases.items()}
    finally:
        tp.destroy()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    made = {}
    for name, (arch, overrides) in CASES.items():
        path = make_tiny_model(tmp_path_factory.mktemp(name), arch, with_tokenizer=False, **TINY, **overrides)
        made[name] = Case(ModelConfig.from_hf(json.loads((path / "config.json").read_text())), path)
    made[DUMMY] = Case(ModelConfig.from_hf(DUMMY_HF_CONFIG), None)
    return made


@pytest.fixture(scope="module")
def unsplit(cases: dict[str, Case]) -> dict[str, Result]:
    return {name: _run(case, TPGroup.single()) for name, case in cases.items()}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def split(
    request: pytest.FixtureRequest, cases: dict[str, Case], tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, list[dict[str, Result]]]:
    """Every case run over `size` ranks: each rank's results."""
    size: int = request.param
    out = tmp_path_factory.mktemp(f"tp{size}")
    mp.spawn(_rank_main, args=(size, str(out / "init"), cases, str(out)), nprocs=size, join=True)
    return size, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(size)]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name", [*CASES, DUMMY])
def test_split_model_matches_unsplit(
    name: str, cases: dict[str, Case], unsplit: dict[str, Result], split: tuple[int, list[dict[str, Result]]]
) -> None:
    size, ranks = split
    want, got = unsplit[name], ranks[0][name]
    assert got.tokens == want.tokens
    assert got.logits.shape == want.logits.shape == (3 + 2 * DECODE_STEPS, cases[name].config.vocab_size)
    assert _rel_err(got.logits, want.logits) < 1e-4
    # Every rank gets the whole logits, and its pool holds its share of the KV heads.
    for rank in ranks[1:]:
        assert _rel_err(rank[name].logits, got.logits) < 1e-6
    kv = cases[name].config.num_kv_heads
    assert [rank[name].kv_heads for rank in ranks] == [max(kv // size, 1)] * size


def test_dummy_weights_are_not_flat(unsplit: dict[str, Result]) -> None:
    """The dummy case compares real signal: its logits vary across the vocab and its tokens vary."""
    result = unsplit[DUMMY]
    assert result.logits.std(-1).min() > 0 and len(set(result.tokens)) > 1


# (query heads, KV heads, ranks): splits that divide the KV heads, and ones that replicate them.
SPLITS = [(8, 2, 2), (8, 2, 4), (8, 2, 8), (8, 4, 4), (16, 8, 2), (8, 8, 8), (4, 1, 4), (32, 8, 1)]


@pytest.mark.parametrize("heads,kv_heads,size", SPLITS)
def test_each_rank_holds_the_kv_head_its_query_heads_use(heads: int, kv_heads: int, size: int) -> None:
    per_kv = heads // kv_heads
    for rank in range(size):
        tp = TPGroup(rank=rank, size=size)
        q, kv = tp.shard(heads), tp.shard(kv_heads)
        assert (q.start, q.size) == (rank * heads // size, heads // size)
        used = {h // per_kv for h in range(q.start, q.start + q.size)}
        assert used <= set(range(kv.start, kv.start + kv.size))


def _runner_over(size: int, **hf: Any) -> ModelRunner:
    config = ModelConfig.from_hf({**DUMMY_HF_CONFIG, **hf})
    # Refused before any collective, so no process group is needed.
    return small_runner(
        None,
        config,
        max_running_requests=2,
        max_context_len=64,
        kv_cache_tokens=64,
        tp=TPGroup(rank=0, size=size),
    )


@pytest.mark.parametrize(
    "size,hf,message",
    [
        (3, {}, "attention heads that divide by 3, but the model has 8"),
        (2, {"num_attention_heads": 12, "num_key_value_heads": 3}, "key/value heads .* but the model has 3"),
        (4, {"num_attention_heads": 12, "num_key_value_heads": 6}, "key/value heads .* but the model has 6"),
        (4, {"intermediate_size": 90}, "MLP width that divides by 4, but the model's is 90"),
    ],
)
def test_a_model_that_does_not_split_is_refused(size: int, hf: dict[str, Any], message: str) -> None:
    with pytest.raises(MinisglError, match=message):
        _runner_over(size, **hf)


def test_llama_3_1_70b_splits_over_four_ranks() -> None:
    """The quick-start's --tp 4 example, at its real shape on the meta device: each rank holds a quarter of
    every matrix (16 query and 2 KV heads) and a copy of the norms, and nothing else."""
    from minisgl_cli.engine.models.registry import build_model, count_parameters
    from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES

    config = ModelConfig.from_hf(BUILTIN_SHAPES["llama-3.1-70b"])
    meta = torch.device("meta")
    full = count_parameters(build_model(config, 16, dtype=torch.bfloat16, device=meta))
    assert full == 70_553_706_496  # the published 70.6B
    norms = (2 * config.num_layers + 1) * config.hidden_size
    for rank in range(4):
        tp = TPGroup(rank=rank, size=4)
        part = count_parameters(build_model(config, 16, dtype=torch.bfloat16, device=meta, tp=tp))
        assert part == (full - norms) // 4 + norms
        shares = config.for_rank(tp)
        assert (shares.num_heads, shares.num_kv_heads) == (16, 2)
