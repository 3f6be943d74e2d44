"""Overlap scheduling: with `overlap=True` (forced on here, on the CPU) every request gets exactly the tokens,
finish reasons, logprobs and cached-prefix counts of the plain synchronous loop, and the accounting stays exact.

Two references: the fake model of test_scheduler.py (its next token is a plain-Python function of the whole
sequence read back through the page table, so a token fed wrongly from the device, a stale slot or a page
released too early changes the output), and, on real tiny models and the embedded SmolLM2, the same engine
with overlap off. A GPU test at the end checks that a step never waits for the device but once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import make_tiny_model
from test_scheduler import EOS, VOCAB, FakeRunner, check_accounting, greedy, next_token, reference

from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.host_copy import to_device
from minisgl_cli.engine.kv.naive_cache import NaiveCache
from minisgl_cli.engine.kv.prefix_cache import PrefixCache
from minisgl_cli.engine.kv.radix_cache import RadixCache
from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.outputs import RequestOutput
from minisgl_cli.engine.request import Req, SamplingParams
from minisgl_cli.engine.sampling import PendingResults, SampledToken, SamplingBatch, sample
from minisgl_cli.engine.scheduler import Scheduler

# ---- the fake model: exact references


def expected(
    prompt: list[int], sp: SamplingParams, eos: tuple[int, ...], max_new: int
) -> tuple[list[int], str]:
    """The fake model's output and finish reason, stops applied, in plain Python."""
    seq, out = list(prompt), []
    while len(out) < max_new:
        out.append(next_token(seq))
        seq.append(out[-1])
        if out[-1] in sp.stop_token_ids or (out[-1] in eos and not sp.ignore_eos):
            return out, "stop"
    return out, "length"


PROMPTS = [list(range(1, 11)), [7, 8, 9], [42] * 17, [5, 6], list(range(30, 53)), [99, 98, 97, 96]]
# eos ends request 5 at its 3rd token (and any other request that meets it first, unless it ignores eos).
EOS_IDS = (reference(PROMPTS[5], 3)[2],)
PARAMS = [
    greedy(8),
    greedy(5, ignore_eos=True),
    greedy(12, stop_token_ids=[reference(PROMPTS[2], 12)[3]]),
    greedy(1, ignore_eos=True),
    greedy(9, ignore_eos=True, stop_token_ids=[reference(PROMPTS[4], 9)[6]]),
    greedy(7),
]
# (pages, page size, max running requests, prefill budget, cache): a roomy pool; chunked prompts; a pool so
# small that decode preempts (with a radix cache, which then holds a preempted request's pages).
SCENARIOS = {
    "roomy": (200, 4, 8, 64, "naive"),
    "chunked": (200, 2, 8, 5, "naive"),
    "preempting": (41, 1, 8, 64, "naive"),
    "preempting-radix": (45, 1, 8, 16, "radix"),
}


def make_cache(kind: str, page_size: int) -> PrefixCache:
    return RadixCache(page_size) if kind == "radix" else NaiveCache(page_size)


def free_everything(s: Scheduler) -> None:
    """After all work: every page is free or an evictable cached one, every page-table row is free."""
    assert s.allocator.num_free + s.cache.stats().evictable_pages == s.allocator.num_usable
    assert s.page_table.num_free_rows == s.page_table.max_running_requests
    assert s.stats().pages_used == 0


def run_scenario(name: str, overlap: bool) -> tuple[list[Req], Scheduler, list[int]]:
    """Run the mixed workload to the end, checking after every step that no placeholder is visible, the
    in-flight counts are 0 or 1 and the stats match the outputs. Returns the requests, the scheduler and
    `num_inflight` of each request preempted, at its preemption."""
    num_pages, page_size, max_running, budget, cache = SCENARIOS[name]
    runner = FakeRunner(num_pages=num_pages, page_size=page_size, max_running=max_running)
    s = Scheduler(runner, make_cache(cache, page_size), max_prefill_tokens=budget, eos_token_ids=list(EOS_IDS),
                  overlap=overlap)  # fmt: skip
    preempted_inflight: list[int] = []
    preempt = s._preempt

    def spy(req: Req) -> None:
        preempted_inflight.append(req.num_inflight)
        preempt(req)

    s._preempt = spy  # type: ignore[method-assign]
    reqs = [s.add(p, sp) for p, sp in zip(PROMPTS, PARAMS, strict=True)]
    want = [expected(r.prompt_ids, r.sampling, EOS_IDS, r.max_new_tokens)[0] for r in reqs]
    first = True
    while s.has_work:
        got = s.step()
        # With overlap the first step only launches the prefill: its tokens come with the next step.
        assert got == [] or not (overlap and first)
        first = False
        assert all(r.num_output > 0 for r in got)
        for r, w in zip(reqs, want, strict=True):
            assert r.output_ids == w[: r.num_output] and r.num_inflight in (0, 1)
        assert s.stats().tokens_generated == sum(r.num_output for r in reqs)
        if cache == "naive":
            check_accounting(s)
    assert s.step() == [] and s._inflight is None  # a batch left in flight holds only finished requests
    free_everything(s)
    return reqs, s, preempted_inflight


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_overlap_gives_the_plain_loops_tokens(name: str) -> None:
    plain, plain_s, _ = run_scenario(name, overlap=False)
    over, over_s, preempted_inflight = run_scenario(name, overlap=True)
    for a, b in zip(plain, over, strict=True):
        want = expected(a.prompt_ids, a.sampling, EOS_IDS, a.max_new_tokens)
        assert (a.output_ids, a.finish_reason) == want == (b.output_ids, b.finish_reason)
    # The workload has both kinds of stop: eos and stop tokens at different steps.
    assert {r.finish_reason for r in over} == {"stop", "length"}
    p, o = plain_s.stats(), over_s.stats()
    assert p.tokens_generated == o.tokens_generated == sum(r.num_output for r in over)
    # Requests that stop on a token were decoded once more while their last token was in flight (dropped).
    assert o.tokens_decoded > p.tokens_decoded
    if name.startswith("preempting"):
        assert p.num_preemptions > 0 and o.num_preemptions > 0
        assert 1 in preempted_inflight  # preempted with a token in flight, which still arrived


def test_requests_ending_by_length_are_not_decoded_again() -> None:
    """A request whose token in flight is its last by max_tokens is left out of the next decode step."""
    decoded = []
    for overlap in (False, True):
        runner = FakeRunner(num_pages=100, page_size=2)
        s = Scheduler(runner, NaiveCache(2), max_prefill_tokens=64, eos_token_ids=[EOS], overlap=overlap)
        reqs = [
            s.add(p, greedy(n, ignore_eos=True)) for p, n in zip(PROMPTS, (1, 2, 5, 9, 3, 4), strict=True)
        ]
        while s.has_work:
            s.step()
        assert [r.output_ids for r in reqs] == [reference(r.prompt_ids, r.max_new_tokens) for r in reqs]
        decoded.append((s.stats().tokens_decoded, sum(fb.num_tokens for fb in runner.batches)))
    assert decoded[0] == decoded[1] == (sum((1, 2, 5, 9, 3, 4)) - 6, sum(map(len, PROMPTS)) + 24 - 6)


def test_finish_from_outside_while_a_token_is_in_flight() -> None:
    runner = FakeRunner(num_pages=64, page_size=2)
    s = Scheduler(runner, RadixCache(2), max_prefill_tokens=64, eos_token_ids=[EOS], overlap=True)
    a, b, c = (s.add(p, greedy(10, ignore_eos=True)) for p in ([1, 2, 3, 4, 5], [6, 7, 8], [9] * 7))
    assert s.step() == []  # prefill launched
    assert s.step() == [a, b, c]  # first decode launched, prefill's tokens processed
    assert b.num_inflight == 1 and b.num_output == 1
    s.finish(b, "abort")
    assert b not in s.running and b.row == -1 and not b.pages
    assert s.step() == [a, c]  # b's token in flight is dropped
    assert b.output_ids == reference(b.prompt_ids, 1) and b.finish_reason == "abort"
    # A request finished between its launch and its first token.
    d = s.add([11, 12, 13, 14], greedy(5, ignore_eos=True))
    s.step()
    assert d.num_inflight == 1 and d.num_output == 0
    s.finish(d, "abort")
    while s.has_work:
        assert b not in s.step()
    s.step()
    assert d.output_ids == [] and b.num_output == 1
    assert a.output_ids == reference(a.prompt_ids, 10) and c.output_ids == reference(c.prompt_ids, 10)
    assert s.stats().tokens_generated == a.num_output + b.num_output + c.num_output
    free_everything(s)


def test_prefix_reuse_is_the_same_with_overlap() -> None:
    """Shared prompts hit the radix cache for the same number of tokens in both modes, in one batch (the later
    requests wait a step and read the first one's pages) and in a second wave."""
    shared = list(range(1, 41))
    waves = [
        [shared + [50], shared + [51], [7, 8, 9], shared + [52, 53]],
        [shared + [60], shared[:21] + [61]],
    ]
    results = []
    for overlap in (False, True):
        runner = FakeRunner(num_pages=300, page_size=1)
        s = Scheduler(runner, RadixCache(1), max_prefill_tokens=128, eos_token_ids=[EOS], overlap=overlap)
        reqs: list[Req] = []
        for wave in waves:
            reqs += [s.add(p, greedy(4, ignore_eos=True)) for p in wave]
            while s.has_work:
                s.step()
        assert [r.output_ids for r in reqs] == [reference(r.prompt_ids, 4) for r in reqs]
        results.append(([r.num_cached for r in reqs], s.stats().tokens_prefilled))
        s.step()
        free_everything(s)
    assert results[0] == results[1]
    assert results[0][0] == [0, 40, 0, 40, 40, 21]


def test_switching_overlap_off_with_a_batch_in_flight() -> None:
    runner = FakeRunner(num_pages=64, page_size=1)
    s = Scheduler(runner, NaiveCache(1), max_prefill_tokens=64, eos_token_ids=[EOS], overlap=True)
    reqs = [s.add(p, greedy(6, ignore_eos=True)) for p in PROMPTS[:3]]
    s.step()
    s.step()
    s.overlap = False
    got = s.step()  # processes the batch in flight and then the one it launched
    assert [r.num_output for r in got] == [3, 3, 3] and len({id(r) for r in got}) == 3
    while s.has_work:
        s.step()
        check_accounting(s)
    assert [r.output_ids for r in reqs] == [reference(r.prompt_ids, 6) for r in reqs]


# ---- host copies and pending results


def test_to_device_and_pending_results_on_the_cpu() -> None:
    t = to_device([[1, 2], [3, 4]], torch.int64, "cpu")
    assert t.dtype == torch.int64 and t.tolist() == [[1, 2], [3, 4]]
    logits = torch.randn(3, 16)
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(seed=5), SamplingParams(logprobs=0)]
    out = sample(logits, SamplingBatch.build(params, [0, 5, 0], [0, 3, 1]))
    pending = PendingResults.start(out)
    assert pending.ready is None and pending.to_host() == out.to_host()


# ---- real models, overlap on against off


def generate_both(
    llm: LLM, prompts: list[list[int]] | list[object], params: list[SamplingParams]
) -> tuple[list[RequestOutput], list[RequestOutput]]:
    """The outputs with overlap off, then on; each run starts from an empty prefix cache, and its stats count
    exactly the tokens it returned."""
    sched = llm.scheduler
    runs = []
    try:
        for overlap in (False, True):
            sched.overlap = overlap
            sched.drop_cached_prefixes()
            before = sched.stats().tokens_generated
            outs = llm.generate(prompts, params)
            assert sched.stats().tokens_generated - before == sum(len(o.token_ids) for o in outs)
            assert not sched.has_work and sched.stats().pages_used == 0
            runs.append(outs)
    finally:
        sched.overlap = False
    return runs[0], runs[1]


TINY_PROMPTS = [[5, 17, 42, 99, 7], [120, 3, 250], [61] * 11 + [300, 12, 8], [200, 201, 202, 203, 9, 9, 44]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("overlap"), "llama", seed=5)


@pytest.fixture(scope="module")
def tiny_llm(tiny: Path) -> LLM:
    return LLM(str(tiny), kv_cache_tokens=4096, max_running_requests=8)


def workload(kind: str) -> list[SamplingParams]:
    n = len(TINY_PROMPTS)
    if kind == "greedy":
        return [greedy(m, ignore_eos=True) for m in (3, 12, 1, 7)]
    if kind == "sampled":
        return [SamplingParams(temperature=0.9, top_k=k, top_p=p, seed=i, max_tokens=10, ignore_eos=True)
                for i, (k, p) in enumerate([(20, 1.0), (-1, 0.8), (5, 0.9), (-1, 1.0)])]  # fmt: skip
    if kind == "penalties":
        return [SamplingParams(temperature=t, seed=i, max_tokens=12, ignore_eos=True, repetition_penalty=1.4,
                               frequency_penalty=0.6, presence_penalty=0.3 * i)
                for i, t in enumerate([0.0, 0.8, 0.0, 1.2])]  # fmt: skip
    if kind == "logprobs":
        return [greedy(6, ignore_eos=True, logprobs=k) for k in (3, 0, None, 5)][:n]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["greedy", "sampled", "penalties", "logprobs"])
def test_tiny_model_same_outputs(tiny_llm: LLM, kind: str) -> None:
    params = workload(kind)
    plain, over = generate_both(tiny_llm, TINY_PROMPTS, params)
    for a, b in zip(plain, over, strict=True):
        assert (a.token_ids, a.finish_reason, a.usage) == (b.token_ids, b.finish_reason, b.usage)
        assert a.logprobs == b.logprobs  # equal values, not close ones: the same computation
    if kind == "logprobs":
        assert plain[0].logprobs is not None and len(plain[0].logprobs[0].top_logprobs) == 3


def test_tiny_model_stop_tokens_at_different_steps(tiny_llm: LLM) -> None:
    full = tiny_llm.generate(TINY_PROMPTS, greedy(16, ignore_eos=True))
    stops = [o.token_ids[k] for o, k in zip(full, (2, 9, 5, 0), strict=True)]
    params = [greedy(16, ignore_eos=True, stop_token_ids=[t]) for t in stops]
    plain, over = generate_both(tiny_llm, TINY_PROMPTS, params)
    for f, t, a, b in zip(full, stops, plain, over, strict=True):
        cut = f.token_ids[: f.token_ids.index(t) + 1]
        assert a.token_ids == b.token_ids == cut and a.finish_reason == b.finish_reason == "stop"
    assert len({len(o.token_ids) for o in over}) == 4


def test_tiny_model_chunked_prefill_preemption_and_prefix_reuse(tiny: Path) -> None:
    shared = [(11 * j) % 370 + 5 for j in range(37)]
    prompts = [shared + [300, 301], [7] * 30, shared + [310, 9, 9], [200, 201, 202], shared[:20] + [320]]
    params = [greedy(12 + 4 * i, ignore_eos=True) for i in range(len(prompts))]
    # Request 2 waits a step to read request 0's 37 tokens from the cache (a shorter shared start, as request
    # 4's, is not worth the wait).
    # 112 slots for 5 requests of up to 58 tokens, a 16-token prefill budget: chunks, preemptions, evictions.
    llm = LLM(str(tiny), kv_cache_tokens=112, max_running_requests=4, max_prefill_tokens=16, page_size=1)
    plain, over = generate_both(llm, prompts, params)
    assert [o.token_ids for o in plain] == [o.token_ids for o in over]
    assert llm.scheduler.stats().num_preemptions > 1  # in both runs
    roomy = LLM(str(tiny), kv_cache_tokens=4096, max_running_requests=8)
    plain, over = generate_both(roomy, prompts, params)
    assert [o.token_ids for o in plain] == [o.token_ids for o in over]
    assert [o.usage.cached_tokens for o in plain] == [o.usage.cached_tokens for o in over] == [0, 0, 37, 0, 0]


def test_tiny_model_mixed_steps_give_the_same_tokens(tiny: Path) -> None:
    """A real model through the torch backend's two groups (decode rows and prefill chunks in one step):
    mixed steps, with overlap off and on, under chunking and preemption, equal the unmixed engine."""
    prompts = [[(7 * j + i) % 370 + 5 for j in range(9 + 5 * i)] for i in range(5)]
    params = [greedy(10 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    runs = []
    for mixed in (False, True):
        llm = LLM(str(tiny), kv_cache_tokens=96, max_running_requests=4, max_prefill_tokens=16, page_size=1,
                  mixed_steps=mixed)  # fmt: skip
        runs += [[o.token_ids for o in outs] for outs in generate_both(llm, prompts, params)]
        assert llm.scheduler.stats().num_preemptions > 0
    assert runs[0] == runs[1] == runs[2] == runs[3]


# ---- the embedded SmolLM2: stop strings, which the LLM ends with finish() while a token is in flight


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> LLM:
    return LLM()


def test_smollm2_stop_strings_with_overlap(smol: LLM) -> None:
    prompts = [
        "Once upon a time, in a small village,",
        [{"role": "user", "content": "Write a haiku about the sea."}],
        [{"role": "user", "content": "List three prime numbers."}],
    ]
    params = [greedy(24, stop=[" the"]), greedy(20, stop=["\n"]), greedy(20, stop=["@@never@@"])]
    plain, over = generate_both(smol, prompts, params)
    for a, b in zip(plain, over, strict=True):
        assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
    assert [o.finish_reason for o in over][:2] == ["stop", "stop"]


# ---- on a GPU: a step never waits for the device, except for the previous step's tokens


class DeviceFakeRunner(FakeRunner):
    """The fake model's rule on the device with device ops only (no host reads), so that a synchronising
    call anywhere else in the step shows up."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.device = torch.device("cuda")
        self.page_table.table = self.page_table.table.to(self.device)
        self.kv = self.kv.to(self.device)

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        self.kv[fb.out_slots] = fb.input_ids
        # Sum and length of each sequence read back through its page-table row (masked to its length).
        cols = torch.arange(self.page_table.max_context_len, device=self.device)
        mask = cols < fb.seq_lens[:, None]
        seqs = self.kv[self.page_table.table[fb.req_rows]] * mask
        pred = (3 * seqs.sum(dim=1) + fb.seq_lens) % EOS
        return torch.nn.functional.one_hot(pred, VOCAB).float()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_steps_do_not_synchronise(monkeypatch: pytest.MonkeyPatch) -> None:
    waits = 0
    wait = PendingResults.to_host

    def allowed_wait(self: PendingResults) -> list[SampledToken]:
        nonlocal waits
        assert self.ready is not None  # the copy went through pinned memory and an event
        waits += 1
        torch.cuda.set_sync_debug_mode(0)
        try:
            return wait(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(PendingResults, "to_host", allowed_wait)
    params = [*PARAMS[:4], SamplingParams(seed=3, max_tokens=6, repetition_penalty=1.2, logprobs=2)]
    outputs = []
    for overlap in (False, True):
        runner = DeviceFakeRunner(num_pages=64, page_size=2, context=64)
        s = Scheduler(
            runner, RadixCache(2), max_prefill_tokens=16, eos_token_ids=list(EOS_IDS), overlap=overlap
        )
        reqs = [s.add(p, sp) for p, sp in zip(PROMPTS[:5], params, strict=True)]
        waits, steps = 0, 0
        torch.cuda.set_sync_debug_mode("error")  # any other synchronising call raises
        try:
            while s.has_work:
                s.step()
                steps += 1
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert 0 < waits <= steps
        outputs.append([(r.output_ids, r.finish_reason) for r in reqs])
    assert outputs[0] == outputs[1]
    for r, w in zip(reqs[:4], PARAMS[:4], strict=True):
        assert (r.output_ids, r.finish_reason) == expected(r.prompt_ids, w, EOS_IDS, r.max_new_tokens)
