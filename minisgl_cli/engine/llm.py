"""LLM: the in-process engine API (generate, iter_outputs, stream), used by `minisgl generate/chat/bench`.

It wires the pieces and owns none of their logic: the model source and tokenizer, a ModelRunner (weights,
KV pool, page table), a Scheduler (batching, KV pages, sampling, token stops) and one OutputBuilder per
request (detokenization, stop strings).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from minisgl_cli.config import EngineConfig, SamplingConfig
from minisgl_cli.engine.outputs import OutputBuilder, RequestOutput
from minisgl_cli.engine.request import FinishReason, SamplingParams, check_for_model
from minisgl_cli.engine.tokenize import Prompt, encode_prompt, split_prompts
from minisgl_cli.errors import MinisglError, UsageError
from minisgl_cli.generation_config import model_generation_defaults
from minisgl_cli.wording import plural

if TYPE_CHECKING:
    from minisgl_cli.engine.builder import Engine
    from minisgl_cli.engine.distributed import TPGroup
    from minisgl_cli.engine.rank_sync import RankLeader
    from minisgl_cli.engine.tp_ranks import Followers

# What the API accepts: one prompt or a list; one SamplingParams for all, one per prompt, or defaults.
Prompts = Prompt | Sequence[Prompt]
Sampling = SamplingParams | Sequence[SamplingParams] | None


@dataclasses.dataclass
class StreamDelta:
    """What one engine step gave one request, from `LLM.stream_deltas`."""

    index: int  # position of the prompt in the call's input
    text: str  # may be "": tokens that complete no character yet, or a held-back start of a stop string
    num_tokens: int  # tokens generated so far
    output: RequestOutput | None  # on the request's last delta, its finished output; None before


class LLM:
    """An inference engine in this process.

    `LLM()` runs the embedded SmolLM2; `LLM("path/or/id", page_size=16, ...)` takes any EngineConfig field
    as a keyword. Outputs come back in input order (`generate`), in completion order (`iter_outputs`), or
    as text deltas (`stream`). One call runs at a time. A call given no SamplingParams samples with
    `default_sampling`: the model's generation_config.json over the built-in defaults (with
    `generation_config="none"`, the built-in ones only).

    With `tp=N` this process is tensor-parallel rank 0 and ranks 1..N-1 run in child processes (one GPU
    each) until `close()` (or `with LLM(...) as llm:`); one such LLM per process.
    """

    def __init__(self, model: str | None = None, **overrides: Any) -> None:
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UsageError(f"unknown engine setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        self._start(EngineConfig(**{**overrides, "model": model}))

    @classmethod
    def from_config(cls, engine: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm._start(engine)
        return llm

    def _start(self, cfg: EngineConfig) -> None:
        from minisgl_cli.engine.builder import build_engine, load_tokenizer
        from minisgl_cli.model_source import resolve_model

        self.config = cfg
        self._busy = False
        self._stop_ranks: weakref.finalize | None = None
        source = resolve_model(cfg.model, cfg.dummy_weights)
        # What a call that passes no SamplingParams samples with: the model's generation_config.json over the
        # built-in defaults (cfg.generation_config picks the file; vLLM's LLM does the same by default). Read
        # before the weights load, so a bad file costs no wait.
        found = model_generation_defaults(cfg.generation_config, source.path)
        sampling = SamplingConfig(**(found.values if found is not None else {}))
        self.default_sampling = SamplingParams(**dataclasses.asdict(sampling))
        engine = build_engine(cfg, source) if cfg.tp == 1 else self._start_ranks(cfg)
        self.model_name = engine.source.name
        self.model_type: str | None = engine.source.hf_config.get("model_type")
        self.tokenizer = load_tokenizer(engine.source)
        self.runner = engine.runner
        self.scheduler = engine.scheduler

    def _start_ranks(self, cfg: EngineConfig) -> Engine:
        """Tensor parallelism: this process is rank 0; ranks 1..N-1 start as child processes."""
        import torch.distributed as dist

        from minisgl_cli.engine.builder import build_engine
        from minisgl_cli.engine.tp_ranks import Followers, check_tp, join
        from minisgl_cli.model_source import resolve_model

        if dist.is_initialized():  # torch.distributed has one default group per process
            raise UsageError(
                "this process already runs a tensor-parallel engine (or another torch.distributed group): "
                "close() that LLM before starting another with tp > 1"
            )
        source = resolve_model(cfg.model, cfg.dummy_weights)
        check_tp(cfg, source, ranks_here=cfg.tp)
        followers = Followers(cfg, source)
        tp = None
        try:
            followers.wait_joining()
            rank_cfg, tp = join(cfg, followers.place0)
            engine = build_engine(rank_cfg, source, tp=tp)
            followers.wait_ready()
        except BaseException as exc:
            reason = followers.failure(wait_s=5.0) if isinstance(exc, RuntimeError) else None
            followers.stop(None)
            if tp is not None:
                tp.destroy()
            if reason is not None:
                raise MinisglError(reason) from exc
            raise
        # Also run when this LLM is collected or the interpreter exits without close().
        self._stop_ranks = weakref.finalize(self, _stop_ranks, followers, engine.scheduler.leader, tp)
        return engine

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (no-op without tensor parallelism); the LLM is unusable
        afterwards."""
        if self._stop_ranks is not None:
            self._stop_ranks()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the API

    def generate(self, prompts: Prompts, sampling: Sampling = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order."""
        return sorted(self.iter_outputs(prompts, sampling), key=lambda out: out.index)

    def iter_outputs(
        self, prompts: Prompts, sampling: Sampling = None, on_tokens: Callable[[int], None] | None = None
    ) -> Iterator[RequestOutput]:
        """Each request's output as soon as it finishes (completion order; `index` says which prompt).

        `on_tokens(n)`, if given, is told after every engine step how many requests got a token in it: the
        progress of requests that may all finish in the same step (a benchmark's bar); it must be cheap."""
        for builder, _delta in self._run(prompts, sampling, deltas=False, on_tokens=on_tokens):
            yield builder.output()

    def stream(self, prompts: Prompts, sampling: Sampling = None) -> Iterator[tuple[int, str]]:
        """(prompt index, text delta) as text is produced; a request's deltas concatenate to its output text."""
        for builder, delta in self._run(prompts, sampling):
            if delta:
                yield builder.index, delta

    def stream_deltas(self, prompts: Prompts, sampling: Sampling = None) -> Iterator[StreamDelta]:
        """Like `stream`, but one delta per step that gave a request a token, even an empty one, with the
        token count so far: what a caller needs for time to first token and tokens per second."""
        for builder, delta in self._run(prompts, sampling):
            output = builder.output() if builder.req.finished else None
            yield StreamDelta(builder.index, delta, builder.req.num_output, output)

    # ---- the loop

    def _run(
        self,
        prompts: Prompts,
        sampling: Sampling,
        *,
        deltas: bool = True,
        on_tokens: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[OutputBuilder, str]]:
        """Step the scheduler until this call's requests finish; (builder, text delta) per new token, or with
        `deltas=False` once per request, when it finishes (its delta is then its whole text).

        Without deltas a request's text is decoded once, at its end, unless it has stop strings, which must be
        looked for as its text grows: detokenizing every request at every step would cost more host time than
        the rest of a decode step (the same text either way: the detokenizer's deltas concatenate to the
        decoding of all ids at once).

        A caller that stops iterating early aborts its remaining requests, so they free their KV pages.
        """
        if self._busy:
            raise MinisglError(
                "this LLM is already running a call: finish or close the previous iterator first"
            )
        builders = self._submit(prompts, sampling)
        live = {b.req.rid: b for b in builders}
        self._busy = True
        try:
            while live:
                if not self.scheduler.has_work:  # a bug, not bad input
                    raise RuntimeError("the scheduler dropped requests it had not finished")
                stepped = self.scheduler.step()
                if on_tokens is not None:
                    on_tokens(len(stepped))
                for req in stepped:
                    builder = live[req.rid]
                    if not (deltas or req.finished or builder.has_stop_strings):
                        continue  # its text is decoded when it finishes
                    delta = builder.update()
                    if builder.stop_matched:
                        self.scheduler.finish(req, FinishReason.STOP)
                    if req.finished:
                        delta += builder.finish()
                        del live[req.rid]
                    if deltas or req.finished:
                        yield builder, delta
        finally:
            for builder in live.values():
                self.scheduler.finish(builder.req, FinishReason.ABORT)
            self._busy = False

    def encode(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids (chat template applied to message lists); UsageError if this engine cannot
        take it (no tokenizer for text, ids outside the vocabulary, no room left for one new token)."""
        ids = encode_prompt(prompt, self.tokenizer, self.runner.model_config.vocab_size)
        self.scheduler.check_prompt(ids)
        return ids

    def check_sampling(self, sampling: SamplingParams) -> None:
        """UsageError for settings this model cannot take (engine/request.check_for_model)."""
        check_for_model(sampling, self.runner.model_config.vocab_size, self.tokenizer is not None)

    def _submit(self, prompts: Prompts, sampling: Sampling) -> list[OutputBuilder]:
        """Tokenize and queue every prompt, or none of them: bad input raises before any work."""
        items = split_prompts(prompts)
        params = _sampling_list(sampling, len(items), self.default_sampling)
        for sp in params:
            self.check_sampling(sp)
        ids = [self.encode(p) for p in items]
        builders: list[OutputBuilder] = []
        try:
            for index, (prompt_ids, sp) in enumerate(zip(ids, params, strict=True)):
                builders.append(OutputBuilder(index, self.scheduler.add(prompt_ids, sp), self.tokenizer))
        except UsageError:
            for b in builders:
                self.scheduler.finish(b.req, FinishReason.ABORT)
            raise
        return builders


def _stop_ranks(followers: Followers, leader: RankLeader | None, tp: TPGroup) -> None:
    followers.stop(leader)
    tp.destroy()


def _sampling_list(sampling: Sampling, n: int, default: SamplingParams) -> list[SamplingParams]:
    if sampling is None:
        return [dataclasses.replace(default) for _ in range(n)]
    if isinstance(sampling, SamplingParams):
        return [sampling] * n
    params = list(sampling)
    if len(params) != n:
        raise UsageError(
            f"got {plural(len(params), 'sampling parameter set')} for {plural(n, 'prompt')}: give one, or "
            "one per prompt"
        )
    return params
