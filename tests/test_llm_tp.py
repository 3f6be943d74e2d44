"""The in-process engine split over 2 ranks on the CPU (gloo): `LLM(tp=2)` is rank 0 and starts rank 1 as a
child process, whose scheduler replays rank 0's (engine/rank_sync.py). The reference is the same model
unsplit in this process: every request must give its tokens exactly, including the cases that change a
scheduler from outside its steps (stop strings, an abandoned stream, a dropped prefix cache) or that depend
on the schedulers agreeing (batching, preemption in a small KV pool, radix reuse), each of which would make
the ranks' collectives stop matching if rank 1 saw it differently.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from model_helpers import make_tiny_model

from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import UsageError

# 8 query and 2 KV heads: each rank holds 4 and 1.
TINY = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64}
# 160 tokens: six 40-token requests do not fit together, so the schedulers preempt.
ENGINE = {"device": "cpu", "kv_cache_tokens": 160, "max_running_requests": 8}
TEXTS = ["The quick brown fox", "hello there, how are", "Count: 1, 2, 3,", "a", "Once upon a time", "Paris"]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(f"llm-tp-{request.param}"), request.param, **TINY)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> LLM:
    return LLM(str(model_dir), **ENGINE)


@pytest.fixture(scope="module")
def split(model_dir: Path) -> Iterator[LLM]:
    with LLM(str(model_dir), tp=2, **ENGINE) as llm:
        yield llm


def _tokens(llm: LLM, prompts: Any, sampling: Any) -> list[list[int]]:
    return [out.token_ids for out in llm.generate(prompts, sampling)]


def test_greedy_and_seeded_batches_equal_the_unsplit_engine(reference: LLM, split: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=10)
    assert _tokens(split, TEXTS, greedy) == _tokens(reference, TEXTS, greedy)
    # No seed given: the engine draws one per request, in submission order, on every rank alike.
    sampled = [SamplingParams(temperature=1.0, top_k=20, max_tokens=9) for _ in TEXTS]
    sampled[1] = SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=9)
    sampled[2] = SamplingParams(temperature=1.0, repetition_penalty=1.3, max_tokens=9, logprobs=2)
    want = reference.generate(TEXTS, sampled)
    got = split.generate(TEXTS, sampled)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert got[2].logprobs is not None and want[2].logprobs is not None
    for g, w in zip(got[2].logprobs, want[2].logprobs, strict=True):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)


def test_preemption_happens_identically(reference: LLM, split: LLM) -> None:
    prompts = [f"{t} and so on, again and again" for t in TEXTS]
    sampling = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    before = (reference.scheduler.stats().num_preemptions, split.scheduler.stats().num_preemptions)
    assert _tokens(split, prompts, sampling) == _tokens(reference, prompts, sampling)
    after = (reference.scheduler.stats().num_preemptions, split.scheduler.stats().num_preemptions)
    assert after[0] - before[0] > 0  # the pool is small enough that requests really were preempted
    assert after[1] - before[1] == after[0] - before[0]


def test_stop_strings_and_abandoned_streams_keep_the_ranks_in_step(reference: LLM, split: LLM) -> None:
    # A stop string finishes a request from outside the scheduler's steps (rank 1 learns it from rank 0).
    free = reference.generate(TEXTS[0], SamplingParams(temperature=0, max_tokens=12))[0]
    stop = free.text[3:6]
    assert stop and stop in free.text
    stopped = SamplingParams(temperature=0, max_tokens=12, stop=[stop])
    want = reference.generate(TEXTS[:3], stopped)
    got = split.generate(TEXTS[:3], stopped)
    assert [(o.text, o.finish_reason) for o in got] == [(o.text, o.finish_reason) for o in want]
    assert want[0].finish_reason == "stop"
    # A caller that stops reading aborts the rest of its requests, on both ranks.
    stream = split.stream(TEXTS, SamplingParams(temperature=0, max_tokens=20))
    for _ in range(3):
        next(stream)
    stream.close()
    assert not split.scheduler.has_work
    # The ranks still agree: the next requests give the reference's tokens.
    greedy = SamplingParams(temperature=0, max_tokens=8)
    assert _tokens(split, TEXTS[3:], greedy) == _tokens(reference, TEXTS[3:], greedy)


def test_prefix_cache_reuse_and_drop_match(reference: LLM, split: LLM) -> None:
    prompts = ["a shared beginning of a prompt, then " + t for t in TEXTS[:4]]
    greedy = SamplingParams(temperature=0, max_tokens=6)
    for llm in (reference, split):
        llm.scheduler.drop_cached_prefixes()
    hits = []
    for llm in (reference, split):
        first = llm.scheduler.stats().prefix_hit_tokens
        tokens = _tokens(llm, prompts, greedy) + _tokens(llm, prompts, greedy)
        hits.append((llm.scheduler.stats().prefix_hit_tokens - first, tokens))
    assert hits[0][0] > 0
    assert hits[1] == hits[0]


def test_one_split_engine_per_process(model_dir: Path, split: LLM) -> None:
    with pytest.raises(UsageError, match="close"):
        LLM(str(model_dir), tp=2, **ENGINE)


def test_structured_outputs_and_logit_bias_equal_the_unsplit_engine(reference: LLM, split: LLM) -> None:
    """Both ranks compile the grammar; rank 1 takes it as ready when rank 0 does (rank_sync.GrammarReady), so
    the request joins the same step's batch on both, and the masks and biases give the same tokens."""
    import re

    from minisgl_cli.engine.structured import StructuredOutput

    pattern = r"[a-z]{2,6}( [a-z]{2,6}){0,3}\."
    sampling = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, structured=StructuredOutput("regex", pattern))
                for i in range(4)]  # fmt: skip
    sampling += [
        SamplingParams(temperature=0, max_tokens=8, logit_bias={7: 60.0}),
        SamplingParams(max_tokens=8, seed=1),  # seeded: the two engines have served different requests before
    ]
    want = reference.generate(TEXTS, sampling)
    got = split.generate(TEXTS, sampling)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for out in got[:4]:
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), out.text
    assert got[4].token_ids == [7] * 8
