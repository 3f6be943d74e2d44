"""Scheduler: continuous batching with chunked prefill, admission by free KV pages, preemption and overlap.

One `step()`: pick a batch, run the model on it, sample, append the tokens, retire finished requests.
Picking a batch (`schedule()`), in order:
  1. prefill, under a budget of `max_prefill_tokens` new tokens: first the requests whose prompt is part
     computed (chunked earlier), then waiting requests in arrival order while a page-table row and KV pages
     for their prompt plus one new token are free; the last one admitted may get only a chunk of its prompt;
  2. else decode: one token for every running request. A request that needs a page when none is free
     preempts the newest running request: its pages are given back and it waits at the front of the queue
     with prompt + generated tokens as the prompt to recompute, so its output continues where it stopped.
With mixed steps (`mixed=True`, `--mixed-steps`) the order is turned around and both kinds share a step:
first every running request with one token to feed gets its page (preempting as above), then the prefill
budget left after those decode tokens (at least a quarter of it) takes chunks as in 1. So no step runs a
prefill alone while requests wait to decode. Off by default: on an H200 (docs/benchmarks.md) it gained
nothing measurable, because a decode row that rides along with a chunk still waits for the whole chunk, so
inter-token latency spikes stay as long as the prefill, and the mixed step runs eagerly instead of the
decode rows' CUDA graph.

Overlap scheduling (`overlap=True`, on by default on a GPU): a step is launched (inputs copied, forward and
sampling queued on the device, the sampled ids' copy to pinned host memory started) and left in flight;
`step()` schedules and launches batch N+1, then waits for batch N's ids and processes them, so the CPU's
work of a step hides behind the device's. A token in flight is counted in the scheduler's lengths
(`Req.total_len`) but not appended to `token_ids` until processed; the next step takes it as input on the
device. A request whose in-flight token is its last by length is not decoded again; one that turns out to
end on eos or a stop token has been decoded once more for nothing, and that token is dropped.

Structured outputs (engine/grammar.py): a request with a constraint waits in `compiling`, apart from the
queue, until its grammar is compiled (on a worker thread), then joins the queue's tail. Each step masks the
constrained rows' logits (and adds logit_bias) before sampling. A constrained row's mask depends on its
previous token: when that token is still in flight, the step processes the previous batch right after
launching this forward (so the forward still overlaps the host's work) and masks before sampling. A batch with
no constrained rows is scheduled exactly as without them.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from minisgl_cli.engine.grammar import GrammarBackend
from minisgl_cli.engine.kv.prefix_cache import PrefixCache
from minisgl_cli.engine.logit_bias import apply_logit_bias
from minisgl_cli.engine.penalties import PenaltyState, needs_penalties
from minisgl_cli.engine.rank_sync import Added, CacheDropped, Finished, GrammarReady
from minisgl_cli.engine.request import Batch, FinishReason, Req, SamplingParams
from minisgl_cli.engine.sampling import PendingResults, SampleOutput, SamplingBatch, sample
from minisgl_cli.engine.step_inputs import prepare_step
from minisgl_cli.errors import InvalidParameter, UsageError
from minisgl_cli.wording import plural

if TYPE_CHECKING:
    from minisgl_cli.engine.model_runner import ModelRunner
    from minisgl_cli.engine.rank_sync import RankLeader

log = logging.getLogger(__name__)

# Cache-aware admission (SGLang's longest-prefix-match policy) walks the prefix cache once per waiting
# request, so it orders queues up to this long; a longer queue is admitted in arrival order.
LPM_MAX_QUEUE = 128
# A request waiting this many scheduling steps is admitted before better-matching ones: nothing starves.
LPM_MAX_WAIT_STEPS = 64
# Two requests of one prefill step whose uncached parts start with this many equal tokens would compute them
# twice: the later one waits a step and reads them from the cache.
IN_BATCH_PREFIX = 32


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    tokens_prefilled: int  # prompt (and recomputed) tokens run through the model
    tokens_decoded: int  # tokens run in decode steps
    tokens_generated: int  # tokens sampled
    num_preemptions: int
    pages_used: int  # held by requests; cached pages no request holds count as free (evicted on demand)
    pages_total: int
    prefix_hit_tokens: int  # prompt tokens read from the prefix cache at admission
    prefix_queried_tokens: int  # prompt tokens looked up in it

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


@dataclass
class InflightBatch:
    """A launched batch whose sampled tokens the host has not read yet."""

    reqs: list[Req]  # the requests that sample, in the order of the sample output's rows
    token_ids: torch.Tensor | None  # [len(reqs)] the sampled ids on the device: the next step's inputs
    results: PendingResults | None  # None when no request samples (partial prefill chunks only)
    _rows: dict[int, int] = field(init=False, repr=False)  # Req.rid -> row

    def __post_init__(self) -> None:
        self._rows = {req.rid: i for i, req in enumerate(self.reqs)}

    def row(self, req: Req) -> int:
        """The row of `req`'s sampled token in this batch's output, or -1."""
        return self._rows.get(req.rid, -1)


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        cache: PrefixCache,
        *,
        max_prefill_tokens: int,
        eos_token_ids: list[int],
        random_seed: int = 0,
        overlap: bool = False,
        mixed: bool = False,
        leader: RankLeader | None = None,
        grammars: GrammarBackend | None = None,
    ) -> None:
        self.runner = runner
        # Tensor-parallel rank 0: the other ranks' schedulers replay what is done to this one (rank_sync.py).
        self.leader = leader
        # Overlap the CPU's scheduling of a step with the device's running of the previous one. Off on the
        # CPU, where a step is synchronous anyway and overlap would only delay every token by a step.
        self.overlap = overlap
        self.mixed = mixed  # decode rows ride along with prefill chunks (see the module docstring)
        self.cache = cache
        self.allocator = runner.allocator
        self.page_table = runner.page_table
        self.max_prefill_tokens = max_prefill_tokens
        self.max_running_requests = self.page_table.max_running_requests
        self.context_len = self.page_table.max_context_len
        # A request must fit in the pool on its own, or it could never run: cap its length by both.
        self.max_seq_len = min(self.context_len, self.allocator.num_usable * self.allocator.page_size)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # in admission order, oldest first
        self._rids = itertools.count()
        # Seeds for requests that give none: reproducible for a given engine seed and submission order.
        self._seed_rng = random.Random(random_seed)
        self._tokens_prefilled = self._tokens_decoded = self._tokens_generated = self._num_preemptions = 0
        self._steps = 0
        self._inflight: InflightBatch | None = None  # the launched batch not processed yet (overlap only)
        self.grammars = grammars  # None: no tokenizer, so no structured outputs
        self.compiling: list[
            Req
        ] = []  # constrained requests whose grammar is not compiled yet, in arrival order
        # Ranks 1..N-1 (rank_sync.follow) take a grammar as ready when rank 0 says so, not when their own
        # compile ends, so every rank admits it at the same step.
        self.follows = False
        self._done_early: list[
            Req
        ] = []  # the previous batch, when _launch had to process it (structured rows)

    # ---- requests in and out

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """UsageError if the prompt leaves no room for one new token."""
        if len(prompt_ids) >= self.max_seq_len:
            limit = (
                f"the context length is {self.context_len}"
                if self.max_seq_len == self.context_len
                else f"the KV cache holds {self.max_seq_len} tokens"
            )
            raise UsageError(
                f"the prompt has {plural(len(prompt_ids), 'token')} and {limit}: "
                "it must be shorter to leave room for at least one new token"
            )

    def add(self, prompt_ids: list[int], sampling: SamplingParams) -> Req:
        """Queue a request; UsageError if its prompt leaves no room for one new token."""
        self.check_prompt(prompt_ids)
        if sampling.structured is not None and self.grammars is None:
            raise InvalidParameter("structured outputs need a grammar backend", sampling.structured.param)
        req = Req(
            rid=next(self._rids),
            prompt_ids=list(prompt_ids),
            sampling=sampling,
            max_new_tokens=min(sampling.max_tokens, self.max_seq_len - len(prompt_ids)),
            seed=sampling.seed if sampling.seed is not None else self._seed_rng.getrandbits(63),
            arrival_step=self._steps,
        )
        if sampling.structured is not None:
            assert self.grammars is not None
            req.grammar = self.grammars.compile(sampling.structured)
            self.compiling.append(req)
        else:
            self.waiting.append(req)
        if self.leader is not None:
            self.leader.record(Added(req.rid, list(prompt_ids), sampling))
        return req

    def grammar_ready(self, req: Req) -> bool:
        """Move a request whose grammar compiled (waiting for it, on ranks 1..N-1) to the queue's tail; a
        grammar that failed to compile aborts the request (False)."""
        assert req.grammar is not None and self.grammars is not None
        self.compiling.remove(req)
        try:
            req.matcher = self.grammars.matcher(req.grammar.result())
        except Exception as exc:  # noqa: BLE001 - xgrammar's errors are RuntimeErrors of any kind
            log.error("request %d: its structured output did not compile: %s", req.rid, exc)
            req.finish_reason = FinishReason.ABORT
            return False
        finally:
            req.grammar = None
        self.waiting.append(req)
        return True

    def _poll_grammars(self) -> list[Req]:
        """Queue the requests whose grammar is compiled; return those whose compile failed (now aborted)."""
        failed = []
        for req in [r for r in self.compiling if r.grammar is not None and r.grammar.done()]:
            if self.leader is not None:
                self.leader.record(GrammarReady(req.rid))
            if not self.grammar_ready(req):
                failed.append(req)
        return failed

    def finish(self, req: Req, reason: str) -> None:
        """Retire a request now (also for callers: a stop string matched, a client went away).

        A token of it still in flight is dropped when its batch is processed. Its pages are released at once,
        though a launched step may still write its K/V into them: on the device every later use of a page
        (another request's K/V write, an attention read) is an op on the same stream, ordered after that step.
        On the host, `_release` offers the cache only tokens whose ids are known (`num_cacheable`) and whose
        K/V is computed or being computed by a launched step, so a request that reuses them is ordered after.
        """
        if req.finished:
            return
        if self.leader is not None:  # the other ranks finish it too; those its own steps finish they see
            self.leader.record(Finished(req.rid, reason))
        self._retire(req, reason)

    def _retire(self, req: Req, reason: str) -> None:
        req.finish_reason = reason
        if req.row >= 0:
            self.running.remove(req)
            self._release(req)
        elif req in self.compiling:
            self.compiling.remove(req)
        else:
            self.waiting.remove(req)

    @property
    def has_work(self) -> bool:
        """Whether requests wait or run. A batch in flight holds only such requests, except when all of them
        finished meanwhile: its tokens are dropped anyway, and the next `step()` processes it, whenever."""
        return bool(self.waiting or self.running or self.compiling)

    def stats(self) -> SchedulerStats:
        cache = self.cache.stats()
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            tokens_prefilled=self._tokens_prefilled,
            tokens_decoded=self._tokens_decoded,
            tokens_generated=self._tokens_generated,
            num_preemptions=self._num_preemptions,
            pages_used=self.allocator.num_usable - self.allocator.num_free - cache.evictable_pages,
            pages_total=self.allocator.num_usable,
            prefix_hit_tokens=cache.hit_tokens,
            prefix_queried_tokens=cache.queried_tokens,
        )

    # ---- one step

    def step(self) -> list[Req]:
        """Schedule and run one batch; return the requests that got a new token (finished ones included).

        With overlap: schedule and launch batch N+1, then wait for batch N's tokens and process them; the
        requests returned are batch N's. A step with nothing new to schedule only processes the batch in
        flight.
        """
        failed = self._poll_grammars() if self.compiling and not self.follows else []
        if self.leader is not None:
            self.leader.flush()
        batch = self.schedule()
        self._done_early = []
        launched = self._launch(batch) if batch is not None else None
        previous, self._inflight = self._inflight, launched
        done = failed + self._done_early + (self._process(previous) if previous is not None else [])
        if batch is None and previous is None and self.compiling and not self.follows:
            # Only grammars compiling: wait for one a moment instead of spinning on step().
            futures = [r.grammar for r in self.compiling if r.grammar is not None]
            concurrent.futures.wait(futures, timeout=0.005, return_when=concurrent.futures.FIRST_COMPLETED)
        if not self.overlap and launched is not None:
            self._inflight = None
            # A request of both batches only when overlap was just switched off: list it once.
            done += [r for r in self._process(launched) if not any(r is d for d in done)]
        return done

    def run_batch(self, batch: Batch) -> list[Req]:
        """Run a batch from `schedule()` to the end (launch, wait, process): step by step, without overlap."""
        if self._inflight is not None:
            raise RuntimeError("a batch is in flight: step() must process it before run_batch() is used")
        if self.leader is not None:
            self.leader.flush()
        return self._process(self._launch(batch))

    def _launch(self, batch: Batch) -> InflightBatch:
        """Queue the batch's forward and sampling on the device and start copying its tokens to the host.

        Nothing here waits for the device: host->device copies come from pinned memory (host_copy.py) and a
        token still in flight from the previous batch is fed to this one on the device."""
        prev = self._inflight
        inputs = prepare_step(
            batch,
            self.allocator,
            self.page_table,
            self.runner.device,
            prev_ids=prev.token_ids if prev is not None else None,
            prev_rows=[prev.row(r) for r in batch.reqs] if prev is not None else (),
        )
        logits = self.runner.forward(inputs.forward_batch)
        if inputs.sample_rows is not None:
            logits = logits[inputs.sample_rows]
        sampling_reqs = [r for r, s in zip(batch.reqs, batch.samples, strict=True) if s]
        if sampling_reqs:
            self._shape_logits(sampling_reqs, logits)
        out = self._sample(sampling_reqs, logits) if sampling_reqs else None

        for req, n in zip(batch.reqs, batch.extend_lens, strict=True):
            req.num_computed += n
        prefilled = batch.num_prefill_tokens
        self._tokens_prefilled += prefilled
        self._tokens_decoded += batch.num_tokens - prefilled
        # At launch rather than when processed: requests scheduled next (while this batch still runs) can
        # reuse these pages, as without overlap; their K/V is written by this batch, which the device runs
        # before any later step that reads them.
        for req in batch.reqs[: batch.num_prefill]:
            self._cache_computed_pages(req)
        for req in sampling_reqs:
            req.num_inflight += 1
        return InflightBatch(
            sampling_reqs,
            out.token_ids if out is not None else None,
            PendingResults.start(out) if out is not None else None,
        )

    def _shape_logits(self, reqs: list[Req], logits: torch.Tensor) -> None:
        """logit_bias, then the grammar masks, in place on the sampled rows' logits. A masked row whose previous
        token is in flight needs it first: the previous batch is processed now (while this forward runs)."""
        biased = any(r.sampling.logit_bias for r in reqs)
        constrained = any(r.matcher is not None for r in reqs)
        if not (biased or constrained):
            return  # the common step: nothing to do, not even entering inference mode
        # The logits are the forward's inference tensors: changed in place only in inference mode.
        with torch.inference_mode():
            if biased:
                apply_logit_bias(logits, [r.sampling.logit_bias for r in reqs])
            if constrained:
                self._mask(reqs, logits)

    def _mask(self, reqs: list[Req], logits: torch.Tensor) -> None:
        prev = self._inflight
        if prev is not None and any(r.matcher is not None and r.num_inflight for r in reqs):
            self._inflight = None
            self._done_early = self._process(prev)
        rows = [i for i, r in enumerate(reqs) if r.matcher is not None and not r.finished]
        if rows:
            assert self.grammars is not None
            self.grammars.apply_masks(logits, rows, [reqs[i].matcher for i in rows])  # type: ignore[misc]

    def _process(self, flight: InflightBatch) -> list[Req]:
        """Wait for a launched batch's tokens, append them and retire the requests that finish."""
        if flight.results is None:
            return []
        done: list[Req] = []
        for req, tok in zip(flight.reqs, flight.results.to_host(), strict=True):
            req.num_inflight -= 1
            if req.finished:
                continue  # finished while this batch ran (eos in the previous batch, finish() from outside)
            req.token_ids.append(tok.token_id)
            if tok.logprob is not None:
                req.output_logprobs.append((tok.logprob, tok.top_logprobs or []))
            if req.matcher is not None and not req.matcher.accept(tok.token_id):
                # Cannot happen: every sampled row of a constrained request is masked. Stop rather than go on
                # with a matcher that no longer follows the text.
                log.error("request %d: token %d is outside its grammar; stopping it", req.rid, tok.token_id)
                req.matcher = None
                self._tokens_generated += 1
                self._retire(req, FinishReason.STOP)
                done.append(req)
                continue
            self._tokens_generated += 1
            reason = self._finish_reason(req, tok.token_id)
            if reason is not None:
                self._retire(req, reason)
            done.append(req)
        return done

    def _sample(self, reqs: list[Req], logits: torch.Tensor) -> SampleOutput:
        for req in reqs:
            if req.penalty_state is None and needs_penalties(req.sampling):
                # Once per request, at its first sampled token (none is in flight then): `commit` keeps it
                # current on the device, and a preemption does not change the history.
                req.penalty_state = PenaltyState.create(
                    req.prompt_ids, logits.shape[1], logits.device, req.output_ids
                )
        sb = SamplingBatch.build(
            [r.sampling for r in reqs],
            [r.seed for r in reqs],
            [r.num_sampled for r in reqs],
            device=logits.device,
            penalty_states=[r.penalty_state for r in reqs],
        )
        out = sample(logits, sb)
        sb.commit(out.token_ids)
        return out

    def _finish_reason(self, req: Req, token: int) -> str | None:
        if req.matcher is not None and req.matcher.ended:
            return FinishReason.STOP  # the grammar is complete (its eos accepted), ignore_eos or not
        if token in req.sampling.stop_token_ids or (
            token in self.eos_token_ids and not req.sampling.ignore_eos
        ):
            return FinishReason.STOP
        if req.num_output >= req.max_new_tokens:
            return FinishReason.LENGTH
        return None

    # ---- picking a batch

    def schedule(self) -> Batch | None:
        self._steps += 1
        if not self.mixed:
            return self._schedule_prefill(self.max_prefill_tokens) or self._schedule_decode()
        decode = self._schedule_decode()
        num_decode = len(decode.reqs) if decode is not None else 0
        # The decode rows share the step's token budget; a chunk keeps a quarter of it, so a large decode
        # batch cannot hold admission back for good.
        budget = max(self.max_prefill_tokens - num_decode, self.max_prefill_tokens // 4)
        prefill = self._schedule_prefill(budget)
        if prefill is None or decode is None:
            return prefill or decode
        # Admission never preempts, so every decode row is still running; prefill rows first (Batch.num_prefill).
        return Batch(
            prefill.reqs + decode.reqs,
            prefill.extend_lens + decode.extend_lens,
            num_prefill=len(prefill.reqs),
        )

    def _schedule_prefill(self, budget: int) -> Batch | None:
        reqs: list[Req] = []
        lens: list[int] = []
        # The first uncached tokens of every request this step computes (see _uncached_start).
        starts: set[tuple[int, ...]] = set()
        # Chunked prompts first: they already hold all the pages their prompt needs.
        for req in self.running:
            if req.num_pending > 1 and budget > 0:
                reqs.append(req)
                lens.append(min(req.num_pending, budget))
                budget -= lens[-1]
                if self.cache.keeps_prefixes:
                    starts.add(self._uncached_start(req, req.num_computed))
        if budget > 0 and len(self.running) < self.max_running_requests:
            self._order_waiting()
        deferred: list[Req] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            req = self.waiting[0]
            if req.num_inflight:
                break  # preempted by this very schedule() (mixed steps): back once its token is processed
            start = self._uncached_start(req, self._cached_len(req)) if self.cache.keeps_prefixes else ()
            if start and start in starts:
                # Another request of this step computes the same uncached tokens: wait one step and read them
                # from the cache instead of computing them again (SGLang's in-batch prefix check).
                deferred.append(self.waiting.popleft())
                continue
            if not self._admit(req):
                break  # FIFO: a later, smaller request does not overtake the head of the queue
            self.waiting.popleft()
            self.running.append(req)
            reqs.append(req)
            lens.append(min(req.num_pending, budget))
            budget -= lens[-1]
            if start:
                starts.add(start)
        self.waiting.extendleft(reversed(deferred))
        return Batch(reqs, lens, num_prefill=len(reqs)) if reqs else None

    def _schedule_decode(self) -> Batch | None:
        """One token for every running request that has exactly one to feed (not a prompt still being
        chunked) and is not ending with its token in flight."""
        reqs = self._decoding()
        if not self._grow_all(reqs):
            running = self.running
            i = 0
            while i < len(running):
                if self._ends_in_flight(running[i]) or self._grow(running[i], running[i].total_len):
                    i += 1
                else:
                    # Out of pages: the newest request gives its pages back (possibly running[i] itself).
                    self._preempt(running.pop())
            reqs = self._decoding()
        return Batch(reqs, [1] * len(reqs), num_prefill=0) if reqs else None

    def _decoding(self) -> list[Req]:
        return [r for r in self.running if r.num_pending == 1 and not self._ends_in_flight(r)]

    def _grow_all(self, reqs: list[Req]) -> bool:
        """Give every request the pages its next token needs, in one allocation, when free pages suffice
        without evicting cached ones; False (nothing taken) otherwise. The common decode step: a page per
        request per step at page size 1, so one allocation instead of one per request. The pages go out in
        the order per-request allocation would give them."""
        short = [(r, self.allocator.pages_needed(r.total_len) - len(r.pages)) for r in reqs]
        short = [(r, n) for r, n in short if n > 0]
        need = sum(n for _, n in short)
        if need > self.allocator.num_free:
            return False
        pages = self.allocator.alloc(need)
        assert pages is not None
        at = 0
        for req, n in short:
            req.pages += pages[at : at + n]
            at += n
        return True

    @staticmethod
    def _ends_in_flight(req: Req) -> bool:
        """Its token in flight is its last (by max_new_tokens): it finishes when processed, so no decode."""
        return req.num_inflight > 0 and req.num_sampled >= req.max_new_tokens

    def _cached_len(self, req: Req) -> int:
        return self.cache.match_prefix(req.token_ids[: req.total_len - 1], count=False).length

    def _uncached_start(self, req: Req, cached: int) -> tuple[int, ...]:
        """The request's first IN_BATCH_PREFIX tokens after its cached part; () when fewer remain (a short
        remainder is not worth a step's wait)."""
        n = max(IN_BATCH_PREFIX, self.allocator.page_size)
        start = tuple(req.token_ids[cached : cached + n])
        return start if len(start) == n and cached + n < req.total_len else ()

    def _order_waiting(self) -> None:
        """Longest cached prefix first, so requests sharing a prefix run while its pages are cached (and locked);
        preempted requests and those waiting LPM_MAX_WAIT_STEPS steps keep the front, in queue order. Ties keep
        queue order, so with no prefix cache this is first come, first served."""
        if not 1 < len(self.waiting) <= LPM_MAX_QUEUE:
            return
        if self.allocator.num_free == 0 and self.cache.stats().evictable_pages == 0:
            return  # nothing can be admitted this step: spare the tree walks (decode steps of a full pool)

        def priority(item: tuple[int, Req]) -> tuple[int, int, int]:
            position, req = item
            if req.num_preemptions > 0 or self._steps - req.arrival_step >= LPM_MAX_WAIT_STEPS:
                return (0, 0, position)
            return (1, -self._cached_len(req), position)

        self.waiting = deque(req for _, req in sorted(enumerate(self.waiting), key=priority))

    # ---- KV pages

    def _admit(self, req: Req) -> bool:
        """Give `req` a page-table row and pages for its tokens plus one new one, reusing a cached prefix."""
        # The last token is always computed, even when cached: its logits give the next token. (Were it in
        # flight, token_ids would end before it: only known ids are looked up.)
        match = self.cache.match_prefix(req.token_ids[: req.total_len - 1])
        self.cache.lock(match.handle)  # before allocating, so eviction cannot take the matched pages
        pages = self._alloc_pages(self.allocator.pages_needed(req.total_len + 1) - len(match.pages))
        if pages is None:
            self.cache.unlock(match.handle)
            return False
        req.row = self.page_table.alloc_row()
        req.pages = match.pages + pages
        req.cache_handle = match.handle
        req.num_computed = match.length
        req.num_mapped = 0
        if req.num_preemptions == 0:
            req.num_cached = match.length
        return True

    def _grow(self, req: Req, num_tokens: int) -> bool:
        """Make `req`'s pages hold `num_tokens` tokens; False when no page is free."""
        pages = self._alloc_pages(self.allocator.pages_needed(num_tokens) - len(req.pages))
        if pages is None:
            return False
        req.pages += pages
        return True

    def _alloc_pages(self, n: int) -> list[int] | None:
        if n <= 0:
            return []
        short = n - self.allocator.num_free
        if short > 0:
            self.allocator.free(self.cache.evict(short))
        return self.allocator.alloc(n)

    def _preempt(self, req: Req) -> None:
        # A token it has in flight is processed (appended) by the step() that preempts it, before the next
        # schedule() can re-admit it; prepare_step would feed it from the device otherwise.
        self._release(req)
        req.num_computed = 0
        req.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.appendleft(req)

    def _cache_computed_pages(self, req: Req) -> None:
        """Offer the whole pages a prefill step completed to the prefix cache at once, not only when the request
        finishes: requests admitted from the next step on reuse a long shared prompt while this one still runs.
        The request then reads the cache's pages; any it computed twice (another request cached the same tokens
        first) are freed, and its page-table row is rewritten at its next step."""
        num_pages = req.num_cacheable // self.allocator.page_size
        tokens = req.token_ids[: num_pages * self.allocator.page_size]
        if num_pages == 0:
            return
        to_free = self.cache.insert(tokens, req.pages[:num_pages])
        match = self.cache.match_prefix(tokens, count=False)
        if match.length < len(tokens):
            # A cache that keeps nothing (naive) or not all of it: the request keeps its own pages.
            held = set(req.pages)
            self.allocator.free([p for p in to_free if p not in held])
            return
        self.cache.lock(match.handle)
        self.cache.unlock(req.cache_handle)
        req.cache_handle = match.handle
        if match.pages != req.pages[:num_pages]:
            req.pages[:num_pages] = match.pages
            req.num_mapped = 0  # its row still points at the pages just freed
        self.allocator.free(to_free)

    def drop_cached_prefixes(self) -> None:
        """Free every cached page no request holds (benchmarks: a timed run must not reuse a warm-up's K/V)."""
        if self.leader is not None:
            self.leader.record(CacheDropped())
        self.allocator.free(self.cache.evict(self.cache.stats().evictable_pages))

    def _release(self, req: Req) -> None:
        """Hand `req`'s computed pages to the prefix cache, free the rest and its page-table row."""
        self.allocator.free(self.cache.insert(req.token_ids[: req.num_cacheable], req.pages))
        self.cache.unlock(req.cache_handle)
        self.page_table.free_row(req.row)
        req.row, req.pages, req.cache_handle, req.num_mapped = -1, [], None, 0
