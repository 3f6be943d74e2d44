"""Scheduler decisions (admission, chunked prefill, preemption, finishing) on a fake model runner.

The fake "model" stores each token id into the KV slot the step gives it and predicts the next token
from the whole sequence read back through the page table, so a wrong slot, a stale page-table entry or
two requests sharing a slot changes the output. Reference outputs come from the same rule in plain Python.
"""

from __future__ import annotations

import pytest
import torch

from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.kv.allocator import PageAllocator
from minisgl_cli.engine.kv.naive_cache import NaiveCache
from minisgl_cli.engine.kv.page_table import PageTable
from minisgl_cli.engine.request import Batch, SamplingParams
from minisgl_cli.engine.scheduler import Scheduler
from minisgl_cli.errors import UsageError

VOCAB = 101
EOS = 100


def next_token(seq: list[int]) -> int:
    """The fake model's rule: a function of every token of the sequence and of its length."""
    return (3 * sum(seq) + len(seq)) % EOS  # never EOS itself, so only tests that want EOS get it


def reference(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt) :]


class FakeRunner:
    def __init__(self, *, num_pages: int, page_size: int, max_running: int = 8, context: int = 256) -> None:
        self.device = torch.device("cpu")
        self.allocator = PageAllocator(num_pages, page_size)
        self.page_table = PageTable(max_running, context, device=self.device)
        self.kv = torch.full((num_pages * page_size,), -1, dtype=torch.int64)
        self.batches: list[ForwardBatch] = []
        self.forced: dict[int, int] = {}  # row -> token the next forward predicts for it

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        self.batches.append(fb)
        assert not (fb.out_slots < self.allocator.page_size).any(), "a token was written to the padding page"
        self.kv[fb.out_slots] = fb.input_ids
        logits = torch.zeros(fb.batch_size, VOCAB)
        for i, (row, seq_len) in enumerate(zip(fb.req_rows.tolist(), fb.seq_lens_cpu, strict=True)):
            seq = self.kv[self.page_table.table[row, :seq_len]].tolist()
            assert -1 not in seq, "attention would read a slot nothing was written to"
            logits[i, self.forced.pop(row, next_token(seq))] = 1.0
        return logits


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)  # type: ignore[arg-type]


def make(
    runner: FakeRunner, max_prefill_tokens: int = 64, eos: tuple[int, ...] = (EOS,), mixed: bool = False
) -> Scheduler:
    return Scheduler(runner, NaiveCache(runner.allocator.page_size), max_prefill_tokens=max_prefill_tokens,
                     eos_token_ids=list(eos), mixed=mixed)  # fmt: skip


def check_accounting(s: Scheduler) -> None:
    """Pages and rows in use are exactly those the running requests hold; no two share a page; every
    running request's pages cover its computed tokens and its page-table row maps them to its slots."""
    held = [p for r in s.running for p in r.pages]
    assert len(held) == len(set(held))
    assert s.allocator.num_free + len(held) == s.allocator.num_usable
    assert s.page_table.num_free_rows + len(s.running) == s.page_table.max_running_requests
    assert all(r.row == -1 and not r.pages for r in s.waiting)
    for r in s.running:
        assert len(r.pages) * s.allocator.page_size >= r.num_computed
        expect = s.allocator.slots(r.pages, 0, r.num_mapped)
        assert s.page_table.table[r.row, : r.num_mapped].tolist() == expect


def run_all(s: Scheduler) -> None:
    """Step until idle, checking the accounting after every step."""
    while s.has_work:
        s.step()
        check_accounting(s)
    assert s.allocator.num_free == s.allocator.num_usable


def plan(batch: Batch | None) -> list[tuple[int, int]]:
    return [] if batch is None else [(r.rid, n) for r, n in zip(batch.reqs, batch.extend_lens, strict=True)]


def test_admission_chunking_and_preemption_step_by_step() -> None:
    # 8 usable pages of 4 tokens, a 16-token prefill budget. A, B: 10-token prompts; C: 3 tokens.
    runner = FakeRunner(num_pages=9, page_size=4)
    s = make(runner, max_prefill_tokens=16)
    a = s.add(list(range(1, 11)), greedy(5, ignore_eos=True))
    b = s.add(list(range(11, 21)), greedy(5, ignore_eos=True))
    c = s.add([7, 8, 9], greedy(6, ignore_eos=True))
    expected = [
        # (batch: (rid, new tokens)..., free pages after the step)
        ([(0, 10), (1, 6)], 2),  # A whole (3 pages: 10 + 1 tokens), B chunk of 6 (3 pages): budget spent
        ([(1, 4), (2, 3)], 1),  # B's chunk goes first; C admitted with 1 page (3 + 1 tokens)
        ([(0, 1), (1, 1), (2, 1)], 1),  # decode: A, B at 11 tokens, C at 4 fit their pages
        ([(0, 1), (1, 1), (2, 1)], 0),  # C's 5th token needs a second page
        ([(0, 1), (1, 1)], 0),  # A's 13th token needs a page: newest (C) preempted, A and B take its 2
        ([(0, 1), (1, 1)], 8),  # C cannot come back (needs 2 pages) until A and B finish here
        ([(2, 6)], 6),  # C recomputes prompt + its 3 generated tokens
        ([(2, 1)], 6),
        ([(2, 1)], 8),
    ]
    for want_plan, want_free in expected:
        batch = s.schedule()
        assert plan(batch) == want_plan
        assert batch is not None
        s.run_batch(batch)
        check_accounting(s)
        assert s.allocator.num_free == want_free
    assert not s.has_work and s.schedule() is None
    assert a.output_ids == reference(a.prompt_ids, 5) and a.finish_reason == "length"
    assert b.output_ids == reference(b.prompt_ids, 5)
    assert c.output_ids == reference(c.prompt_ids, 6) and c.num_preemptions == 1
    stats = s.stats()
    assert (stats.tokens_prefilled, stats.tokens_decoded, stats.tokens_generated) == (29, 12, 16)
    assert (
        stats.num_preemptions == 1 and stats.pages_used == 0 and stats.num_running == stats.num_waiting == 0
    )


def test_preempted_requests_return_in_order_and_continue_seamlessly() -> None:
    # 12 usable one-token pages for 4 requests that each need up to 3 + 6 tokens: heavy preemption.
    prompts = [[5, 6, 7], [1, 2, 3], [9, 9, 9], [4, 4, 4]]
    big = FakeRunner(num_pages=200, page_size=1)
    tiny = FakeRunner(num_pages=13, page_size=1)
    outs, preemptions = [], []
    for runner in (big, tiny):
        s = make(runner)
        reqs = [s.add(p, greedy(6, ignore_eos=True)) for p in prompts]
        while s.has_work:
            s.step()
            check_accounting(s)
            # Preempted requests wait in admission order, ahead of never-admitted ones.
            assert [r.rid for r in s.waiting] == sorted(r.rid for r in s.waiting)
        outs.append([r.output_ids for r in reqs])
        preemptions.append(s.stats().num_preemptions)
        assert all(r.finish_reason == "length" for r in reqs)
    assert outs[0] == outs[1] == [reference(p, 6) for p in prompts]
    assert preemptions[0] == 0 and preemptions[1] >= 2


def test_chunked_prefill_equals_one_shot_and_respects_budget() -> None:
    prompts = [list(range(i, i + n)) for i, n in [(1, 40), (3, 5), (7, 23)]]
    for budget in (64, 16, 7):
        runner = FakeRunner(num_pages=100, page_size=4)
        s = make(runner, max_prefill_tokens=budget)
        reqs = [s.add(p, greedy(4, ignore_eos=True)) for p in prompts]
        run_all(s)
        assert [r.output_ids for r in reqs] == [reference(p, 4) for p in prompts]
        for fb in runner.batches:
            if not fb.is_decode:
                assert fb.num_tokens <= budget
        # A request never feeds more than its own pending tokens, and prefill steps never mix with decode.
        prefill_tokens = sum(fb.num_tokens for fb in runner.batches if any(n > 1 for n in fb.extend_lens_cpu))
        assert prefill_tokens <= sum(map(len, prompts))


def test_max_running_requests_and_fifo_admission() -> None:
    runner = FakeRunner(num_pages=100, page_size=2, max_running=2)
    s = make(runner)
    reqs = [s.add([i + 1] * 3, greedy(2, ignore_eos=True)) for i in range(3)]
    assert plan(s.schedule()) == [(0, 3), (1, 3)]  # the row limit holds the third back
    while s.has_work:
        batch = s.schedule()
        assert batch is not None and len(batch.reqs) <= 2
        s.run_batch(batch)
        check_accounting(s)
    assert [r.output_ids for r in reqs] == [reference(r.prompt_ids, 2) for r in reqs]


def test_head_of_queue_is_not_overtaken() -> None:
    # The big request at the head does not fit while the first runs; the small one behind it must wait.
    runner = FakeRunner(num_pages=9, page_size=1)
    s = make(runner)
    s.add([1] * 4, greedy(3, ignore_eos=True))  # 5 pages, leaves 3
    s.add([2] * 5, greedy(1, ignore_eos=True))  # needs 6
    s.add([3], greedy(1, ignore_eos=True))  # needs 2: would fit, but is behind
    assert plan(s.schedule()) == [(0, 4)]


def test_stops_eos_stop_token_ids_and_ignore_eos() -> None:
    runner = FakeRunner(num_pages=50, page_size=1)
    s = make(runner)
    eos_req = s.add([1, 2], greedy(10))
    ignoring = s.add([3, 4], greedy(3, ignore_eos=True))
    stop_id = s.add([5, 6], greedy(10, stop_token_ids=[reference([5, 6], 3)[2]]))
    batch = s.schedule()
    assert batch is not None
    runner.forced = {eos_req.row: EOS, ignoring.row: EOS}
    s.run_batch(batch)
    run_all(s)
    assert eos_req.output_ids == [EOS] and eos_req.finish_reason == "stop"
    assert (
        ignoring.output_ids[0] == EOS and len(ignoring.output_ids) == 3 and ignoring.finish_reason == "length"
    )
    assert stop_id.output_ids == reference([5, 6], 3) and stop_id.finish_reason == "stop"


def test_context_length_clips_max_tokens_and_rejects_long_prompts() -> None:
    runner = FakeRunner(num_pages=100, page_size=1, context=16)
    s = make(runner)
    req = s.add(list(range(1, 11)), greedy(50, ignore_eos=True))
    assert req.max_new_tokens == 6
    with pytest.raises(UsageError, match="context length is 16"):
        s.add(list(range(16)), greedy(1))
    run_all(s)
    assert len(req.output_ids) == 6 and req.finish_reason == "length"
    # A pool smaller than the context length caps requests the same way, so a lone request always fits.
    small = make(FakeRunner(num_pages=9, page_size=2, context=64))  # 16 usable slots
    with pytest.raises(UsageError, match="KV cache holds 16 tokens"):
        small.add(list(range(1, 17)), greedy(1))
    assert small.add([1] * 10, greedy(100)).max_new_tokens == 6


def test_finish_from_outside_frees_at_once() -> None:
    runner = FakeRunner(num_pages=50, page_size=1)
    s = make(runner)
    running = s.add([1, 2, 3], greedy(10, ignore_eos=True))
    waiting_req = s.add([4] * 46, greedy(1))  # 47 pages: does not fit next to the first
    s.step()
    assert running.row >= 0 and waiting_req in s.waiting
    s.finish(running, "abort")
    s.finish(waiting_req, "abort")
    assert running.finish_reason == waiting_req.finish_reason == "abort"
    assert not s.has_work and s.allocator.num_free == s.allocator.num_usable
    assert s.page_table.num_free_rows == s.page_table.max_running_requests


def test_forward_batch_layout() -> None:
    runner = FakeRunner(num_pages=20, page_size=4)
    s = make(runner, max_prefill_tokens=6)
    a = s.add([11, 12, 13, 14], greedy(3, ignore_eos=True))
    s.add([21, 22, 23, 24, 25], greedy(3, ignore_eos=True))
    s.step()
    fb = runner.batches[0]
    # A whole, B's first 2 tokens; A's pages: the allocator hands out page ids 1, 2 first.
    assert fb.input_ids.tolist() == [11, 12, 13, 14, 21, 22]
    assert fb.positions.tolist() == [0, 1, 2, 3, 0, 1]
    assert a.pages == [1, 2] and fb.out_slots.tolist()[:4] == [4, 5, 6, 7]
    assert fb.extend_lens_cpu == [4, 2] and fb.seq_lens_cpu == [4, 2]
    assert fb.logits_indices.tolist() == [3, 5]
    assert fb.req_rows.tolist() == [0, 1]


def _admission_order(s: Scheduler) -> list[int]:
    """Run until idle; the request ids in the order their prefill first ran."""
    order: list[int] = []
    while s.has_work:
        batch = s.schedule()
        assert batch is not None
        if batch.is_prefill:
            order += [r.rid for r in batch.reqs if r.rid not in order]
        s.run_batch(batch)
    return order


@pytest.mark.parametrize("max_wait_steps", [64, 0])
def test_longest_cached_prefix_is_admitted_first_unless_another_waited_too_long(
    max_wait_steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from minisgl_cli.engine import scheduler as scheduler_module
    from minisgl_cli.engine.kv.radix_cache import RadixCache

    monkeypatch.setattr(scheduler_module, "LPM_MAX_WAIT_STEPS", max_wait_steps)
    runner = FakeRunner(num_pages=128, page_size=1, max_running=1)  # one request at a time
    s = Scheduler(runner, RadixCache(1), max_prefill_tokens=64, eos_token_ids=[EOS])
    shared = list(range(1, 21))
    s.add(shared + [50], greedy(2, ignore_eos=True))
    _admission_order(s)  # `shared` is cached now
    other = s.add([90, 91, 92], greedy(3, ignore_eos=True))  # first in line, nothing cached
    partial = s.add(shared[:10] + [60], greedy(3, ignore_eos=True))  # 10 tokens cached
    full = s.add(shared + [70], greedy(3, ignore_eos=True))  # 20 tokens cached
    order = _admission_order(s)
    if max_wait_steps:
        assert order == [full.rid, partial.rid, other.rid]
        assert (full.num_cached, partial.num_cached, other.num_cached) == (20, 10, 0)
    else:  # every request is overdue at once: first come, first served
        assert order == [other.rid, partial.rid, full.rid]
    for req in (other, partial, full):
        assert req.output_ids == reference(req.prompt_ids, 3)


def test_mixed_steps_step_by_step() -> None:
    # A 10-token budget: A (6 tokens) and the first 4 of B (9 tokens) in step 1; then A decodes beside B's
    # next chunk, which the decode row leaves 9 tokens of the budget.
    runner = FakeRunner(num_pages=60, page_size=1)
    s = make(runner, max_prefill_tokens=10, mixed=True)
    a = s.add(list(range(1, 7)), greedy(4, ignore_eos=True))
    b = s.add(list(range(11, 20)), greedy(3, ignore_eos=True))
    c = s.add([7, 8], greedy(2, ignore_eos=True))
    expected = [
        ([(0, 6), (1, 4)], 2),  # prefill only: nothing decodes yet
        ([(1, 5), (2, 2), (0, 1)], 2),  # B's last chunk and C (7 of the 9 left) beside A's decode row
        ([(0, 1), (1, 1), (2, 1)], 0),  # decode only
    ]
    for want_plan, num_prefill in expected:
        batch = s.schedule()
        assert plan(batch) == want_plan
        assert batch is not None and batch.num_prefill == num_prefill
        s.run_batch(batch)
        check_accounting(s)
    run_all(s)
    for req in (a, b, c):
        assert req.output_ids == reference(req.prompt_ids, req.sampling.max_tokens)
    stats = s.stats()
    assert stats.tokens_prefilled == 6 + 9 + 2
    assert stats.tokens_decoded == stats.tokens_generated - 3  # every token but each prompt's first


@pytest.mark.parametrize("num_pages", [200, 14])
def test_mixed_steps_give_the_unmixed_tokens_under_preemption(num_pages: int) -> None:
    prompts = [[5, 6, 7, 8], [1, 2, 3], [9, 9, 9, 9, 9], [4, 4]]
    outs = []
    for mixed in (False, True):
        runner = FakeRunner(num_pages=num_pages, page_size=1)
        s = make(runner, max_prefill_tokens=4, mixed=mixed)
        reqs = [s.add(p, greedy(6, ignore_eos=True)) for p in prompts]
        mixed_steps = 0
        while s.has_work:
            batch = s.schedule()
            assert batch is not None
            if 0 < batch.num_prefill < len(batch.reqs):
                mixed_steps += 1
                # The decode rows count against the budget; a chunk keeps at least a quarter of it.
                assert batch.num_prefill_tokens <= max(4 - (len(batch.reqs) - batch.num_prefill), 1)
            s.run_batch(batch)
            check_accounting(s)
        assert (mixed_steps > 0) == mixed
        outs.append([r.output_ids for r in reqs])
    assert outs[0] == outs[1] == [reference(p, 6) for p in prompts]


def test_mixed_steps_with_overlap_preempt_requests_whose_token_is_in_flight() -> None:
    from minisgl_cli.engine.kv.radix_cache import RadixCache

    # Overlap and preemption together: a request preempted by a schedule() may still have its token in flight;
    # it waits (is not admitted by that same schedule()) and continues with the reference tokens.
    runner = FakeRunner(num_pages=11, page_size=1)
    s = Scheduler(runner, RadixCache(1), max_prefill_tokens=8, eos_token_ids=[EOS], overlap=True, mixed=True)
    reqs = [s.add([i + 1, i + 2, i + 3], greedy(5, ignore_eos=True)) for i in range(3)]
    waited_in_flight = 0
    schedule = s.schedule

    def watched() -> Batch | None:
        nonlocal waited_in_flight
        batch = schedule()
        waited_in_flight += sum(r.num_inflight > 0 for r in s.waiting)
        assert batch is None or all(r.num_inflight == 0 for r in batch.reqs[: batch.num_prefill])
        return batch

    s.schedule = watched  # type: ignore[method-assign]
    while s.has_work:
        s.step()
    assert waited_in_flight > 0 and s.stats().num_preemptions > 0
    assert [r.output_ids for r in reqs] == [reference(r.prompt_ids, 5) for r in reqs]
