"""The engine's side of structured outputs: constraints compiled against the model's vocabulary, one matcher per
request, and the token mask of each step (xgrammar, the grammar engine SGLang and vLLM use).

- `GrammarBackend.compile(structured)` returns a Future: compilation runs on a worker thread (xgrammar's C++
  releases the GIL), so a large schema never stalls the scheduler's steps; results are cached by constraint,
  so the thousandth request with the same schema starts at once. The tokenizer's vocabulary is read on that
  thread too, on first use, so an engine that never sees a constrained request never pays for it.
- `Matcher` wraps one request's xgrammar matcher: the tokens it has generated so far, the mask of what may
  come next, and whether the grammar has ended.
- `GrammarBackend.apply_masks(logits, rows, matchers)` fills the step's bitmask for the constrained rows only
  and applies it in place (xgrammar's kernel: C++ on the CPU, CUDA/Triton on a GPU); unconstrained rows are
  not touched.

The scheduler (scheduler.py) holds requests whose grammar is compiling apart from the queue, and fills a
constrained row's mask only once its previous token is known (with overlap scheduling: after that token's
step is processed, which it does while the next forward runs, before that forward's sampling).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from minisgl_cli.engine.host_copy import to_device
from minisgl_cli.engine.structured import StructuredOutput

if TYPE_CHECKING:
    import xgrammar

log = logging.getLogger(__name__)

# Distinct constraints kept compiled; the oldest unused one goes first. A compiled JSON schema is tens to
# hundreds of KB (its token masks per grammar state), so this bounds the cache to a few hundred MB at worst.
CACHE_ENTRIES = 512
COMPILE_THREADS = 2


class GrammarBackend:
    """Compiles constraints for one model: its tokenizer (loaded lazily by `load_tokenizer`), its vocabulary
    size (the logits' width, which may exceed the tokenizer's) and its eos ids (what ends a grammar)."""

    def __init__(
        self, load_tokenizer: Callable[[], Any], vocab_size: int, eos_token_ids: Sequence[int]
    ) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._pool = ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="grammar")
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future[xgrammar.CompiledGrammar]] = OrderedDict()
        self._batch: xgrammar.BatchGrammarMatcher | None = None  # fills many rows' masks at once

    def compile(self, structured: StructuredOutput) -> Future[xgrammar.CompiledGrammar]:
        """The compiled grammar of `structured`, now or soon (a failed compile's error is in the future)."""
        key = structured.cache_key
        future = self._cache.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._cache.move_to_end(key)
            return future
        future = self._pool.submit(self._compile, structured)
        self._cache[key] = future
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return future

    def matcher(self, compiled: xgrammar.CompiledGrammar) -> Matcher:
        import xgrammar as xgr

        return Matcher(xgr.GrammarMatcher(compiled))

    def apply_masks(self, logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[Matcher]) -> None:
        """Set to -inf, in place, every logit that row rows[i]'s matcher does not allow next.

        The bitmask holds the constrained rows only (a bit per token: V/8 bytes a row), filled by xgrammar's
        batch matcher on its threads (about 9 us a row inside a JSON string at a 152k vocabulary, on one
        core), so the host fills and copies nothing for the other rows; when some rows are unconstrained,
        theirs stay untouched and the constrained ones are gathered, masked and written back."""
        import xgrammar as xgr

        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher(max_threads=COMPILE_THREADS)
        bitmask = xgr.allocate_token_bitmask(len(rows), logits.shape[1])
        self._batch.batch_fill_next_token_bitmask([m.xgr_matcher for m in matchers], bitmask)
        if logits.is_cuda:
            # Pinned, so the copy does not block; torch's pinned-memory cache keeps a block until its copy is done.
            bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
        if len(rows) == logits.shape[0]:  # rows are distinct row numbers: every row is constrained
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1])
            return
        index = to_device(list(rows), torch.int64, logits.device)
        picked = logits.index_select(0, index)
        xgr.apply_token_bitmask_inplace(picked, bitmask, vocab_size=logits.shape[1])
        logits.index_copy_(0, index, picked)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, structured: StructuredOutput) -> xgrammar.CompiledGrammar:
        return self._get_compiler().compile_grammar(structured.grammar())

    def _get_compiler(self) -> xgrammar.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                tokenizer = self._load_tokenizer()
                if tokenizer is None:
                    raise ValueError("structured outputs need the model's tokenizer, and this model has none")
                info = xgr.TokenizerInfo.from_huggingface(
                    tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._eos or None
                )
                # Our own cache is by constraint; xgrammar's would hold the same grammars a second time.
                self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=False)
            return self._compiler


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self.xgr_matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a generated token; False when the grammar does not allow it (it was not masked: a token
        sampled before the mask applied, which the scheduler never does)."""
        return bool(self.xgr_matcher.accept_token(token_id))

    @property
    def ended(self) -> bool:
        """The grammar is complete and its end (an eos token) accepted: the request stops here."""
        return bool(self.xgr_matcher.is_terminated())
