"""Batch latency: for each batch size B, the time to prefill B prompts of `input_len` tokens, then the time of
each decode step until every request holds `output_len` new tokens.

The engine is measured through its real path: the LLM's own Scheduler picks every batch and runs it
(`step()`, with overlap scheduling where the engine uses it). The two phases are timed as wholes: prefill from
the first step until every request's first token is on the host, decode from there until the last token is.
Waiting for tokens on the host waits for the device, so the times cover the device's work. With overlap the
CPU launches the first decode step before it reads the prefill's tokens, so that launch counts as prefill.
The decode time per step is the decode phase's wall time over its steps: with overlap, the CPU's work that
runs while the GPU computes costs nothing, as in real use. Not included: detokenization (no text is made; a
server does it in another process).

The prefill samples each request's first token, so a request of `output_len` tokens takes `output_len - 1`
decode steps; a prefill larger than `--max-prefill-tokens` runs in several chunks, all counted as prefill.

Roofline (GPU): a decode step must at least read every weight once and each request's K/V, so
(bytes read) / (memory bandwidth) is a lower bound on its time; `roofline_share` is that bound over the
measured time (1.0 = at the memory roofline). The bandwidth is measured in the same run, as the rate at which
a bf16 matrix-vector product streams a 1 GiB matrix (`streaming_bandwidth`). None on CPUs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minisgl_cli.bench.offline import WARMUP_INPUT_LEN, WARMUP_OUTPUT_LEN, exact_greedy
from minisgl_cli.bench.progress import Progress, Tally
from minisgl_cli.bench.workload import random_workload
from minisgl_cli.errors import MinisglError, UsageError

if TYPE_CHECKING:
    import torch

    from minisgl_cli.engine.llm import LLM
    from minisgl_cli.engine.models.config import ModelConfig
    from minisgl_cli.engine.scheduler import Scheduler


@dataclass
class LatencyResult:
    system: str  # "minisgl" or "hf"
    batch_size: int
    input_len: int
    output_len: int
    prefill_s: float  # all prefill steps of the batch
    decode_steps: int  # output_len - 1
    decode_s: float  # all decode steps together
    roofline_share: float | None = None  # see the module docstring; None where unknown

    @property
    def prefill_ms(self) -> float:
        return self.prefill_s * 1e3

    @property
    def prefill_tok_per_s(self) -> float:
        return self.batch_size * self.input_len / self.prefill_s

    @property
    def decode_ms_per_step(self) -> float:
        return self.decode_s * 1e3 / self.decode_steps

    @property
    def decode_tok_per_s(self) -> float:
        return self.batch_size * self.decode_steps / self.decode_s


def parse_batch_sizes(text: str) -> list[int]:
    """ "1,8,32" -> [1, 8, 32]; UsageError unless every item is a positive integer."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes {text!r}: expected comma-separated positive integers, e.g. 1,8,32")
    return list(dict.fromkeys(sizes))  # a size given twice is measured once


def check_lengths(input_len: int, output_len: int) -> None:
    if input_len < 1:
        raise UsageError(f"--input-len {input_len}: expected a positive number of prompt tokens")
    if output_len < 2:
        # The first token comes from the prefill: with fewer than 2 there is no decode step to time.
        raise UsageError(
            f"--output-len {output_len}: expected at least 2 tokens (the first one comes from prefill)"
        )


def run_latency(
    llm: LLM,
    batch_sizes: list[int],
    input_len: int,
    output_len: int,
    seed: int,
    on_progress: Progress | None = None,
) -> list[LatencyResult]:
    """Warm up once, then measure each batch size in turn; prompts are random token ids drawn from `seed`.

    `on_progress(1)` is told of each step of a measured batch, its prefill and then each decode step:
    `output_len` a batch size. It runs inside the timing (a few microseconds against a step of milliseconds).
    """
    check_lengths(input_len, output_len)
    for batch_size in batch_sizes:
        _check_capacity(llm, batch_size, input_len, output_len)
    _measure(llm, min(batch_sizes), min(input_len, WARMUP_INPUT_LEN), WARMUP_OUTPUT_LEN, seed)
    tally = Tally(on_progress, len(batch_sizes) * output_len)
    results = []
    for batch_size in batch_sizes:
        results.append(_measure(llm, batch_size, input_len, output_len, seed, tally.add))
    tally.finish()
    return results


def _check_capacity(llm: LLM, batch_size: int, input_len: int, output_len: int) -> None:
    """UsageError unless the whole batch runs at once, from admission to its last token: otherwise requests
    would wait or be preempted, and the times would not be those of one batch."""
    scheduler = llm.scheduler
    if batch_size > scheduler.max_running_requests:
        raise UsageError(
            f"batch size {batch_size} is above --max-running-requests {scheduler.max_running_requests}: raise it"
        )
    if input_len + output_len > scheduler.max_seq_len:
        raise UsageError(
            f"--input-len + --output-len = {input_len + output_len} tokens, but the engine holds at most "
            f"{scheduler.max_seq_len} per sequence"
        )
    allocator = scheduler.allocator
    need = batch_size * allocator.pages_needed(input_len + output_len + 1)
    if need > allocator.num_usable:
        raise UsageError(
            f"batch size {batch_size} needs {need * allocator.page_size} KV cache slots but the pool has "
            f"{allocator.num_usable * allocator.page_size}: raise --kv-cache-tokens or lower the batch size"
        )


def _measure(
    llm: LLM,
    batch_size: int,
    input_len: int,
    output_len: int,
    seed: int,
    on_step: Progress | None = None,
) -> LatencyResult:
    from minisgl_cli.engine.request import FinishReason

    scheduler = llm.scheduler
    if scheduler.has_work:
        raise MinisglError("the engine is busy with other requests: a latency run needs it to itself")
    # A batch still in flight from an earlier call (its requests all finished) is processed now, untimed.
    scheduler.step()
    vocab_size = llm.runner.model_config.vocab_size
    workload = random_workload(batch_size, (input_len, input_len), (output_len, output_len), vocab_size, seed)
    scheduler.drop_cached_prefixes()  # the warm-up and earlier batch sizes use the same prompts
    preemptions = scheduler.stats().num_preemptions
    reqs = [scheduler.add(r.prompt_ids, exact_greedy(output_len)) for r in workload.requests]
    decode_steps = 0
    try:
        start = time.perf_counter()
        while not all(r.num_output > 0 for r in reqs):
            _step(scheduler)
        if on_step is not None:
            on_step(1)
        prefill_end = time.perf_counter()
        while not all(r.finished for r in reqs):
            _step(scheduler)
            decode_steps += 1
            if on_step is not None:
                on_step(1)
        decode_end = time.perf_counter()
    finally:
        for req in reqs:
            scheduler.finish(req, FinishReason.ABORT)  # no-op for finished ones; frees the rest on error
    if scheduler.stats().num_preemptions != preemptions:
        raise MinisglError("requests were preempted during the latency run: give the KV cache more room")
    prefill_s, decode_s = prefill_end - start, decode_end - prefill_end
    return LatencyResult("minisgl", batch_size, input_len, output_len, prefill_s, decode_steps, decode_s)


def _step(scheduler: Scheduler) -> None:
    if not scheduler.has_work:
        raise RuntimeError("the scheduler has nothing to run for unfinished requests")  # a bug
    scheduler.step()


# ---- the roofline hook


@dataclass(frozen=True)
class DecodeTraffic:
    """What a decode step must read from memory, whatever the implementation.

    A mixture-of-experts model reads only the experts its tokens were routed to: at batch B, an expert
    of a layer is read when any of the B tokens picked it among its k of E, so on average
    E * (1 - (1 - k / E) ** B) experts a layer (routing spread evenly, as a trained router's load balancing
    aims for and dummy weights give): exactly k at batch 1, all E from a few dozen tokens up.
    """

    weight_bytes: int  # read once per step: everything but the experts (and the embedding table)
    kv_bytes_per_token: int  # K and V of one position, all layers
    expert_bytes: int = 0  # one expert of every sparse layer
    num_experts: int = 0
    top_k: int = 0

    @classmethod
    def of_model(cls, config: ModelConfig, dtype: torch.dtype) -> DecodeTraffic:
        import torch

        from minisgl_cli.engine.kv.pool import KVPool
        from minisgl_cli.engine.layers.fp8 import quantize_linears
        from minisgl_cli.engine.layers.moe import Experts
        from minisgl_cli.engine.models.registry import build_model

        # On the meta device: counts shapes, allocates nothing. Bytes, not parameters: FP8 linears
        # (--quantization fp8) read one byte a weight plus their scales.
        meta = build_model(config, 1, dtype=dtype, device=torch.device("meta"))
        if config.quantization == "fp8":
            quantize_linears(meta)
        total = sum(p.numel() * p.element_size() for p in meta.parameters())
        if not config.tie_word_embeddings:
            total -= config.vocab_size * config.hidden_size * dtype.itemsize  # only B rows of it are read
        experts = [m for m in meta.modules() if isinstance(m, Experts)]
        expert_bytes = sum(p.numel() * p.element_size() for m in experts for p in m.parameters())
        moe = config.moe
        return cls(
            weight_bytes=total - expert_bytes,
            kv_bytes_per_token=KVPool.bytes_per_token(
                config.num_layers, config.num_kv_heads, config.head_dim, dtype
            ),
            expert_bytes=0 if moe is None else expert_bytes // moe.num_experts,
            num_experts=0 if moe is None else moe.num_experts,
            top_k=0 if moe is None else moe.top_k,
        )

    def experts_read(self, batch_size: int) -> float:
        """Experts a sparse layer reads in a step of `batch_size` tokens, on average (0 for a dense model)."""
        if self.num_experts == 0:
            return 0.0
        return self.num_experts * (1.0 - (1.0 - self.top_k / self.num_experts) ** batch_size)

    def step_weight_bytes(self, batch_size: int) -> float:
        """Weight bytes one decode step of `batch_size` tokens reads."""
        return self.weight_bytes + self.expert_bytes * self.experts_read(batch_size)

    def decode_bytes(self, batch_size: int, input_len: int, decode_steps: int) -> float:
        """Bytes read by all decode steps: decode step i (from 1) attends to input_len + i positions."""
        positions = decode_steps * input_len + decode_steps * (decode_steps + 1) // 2
        return (
            decode_steps * self.step_weight_bytes(batch_size)
            + batch_size * positions * self.kv_bytes_per_token
        )


def streaming_bandwidth(device: torch.device) -> float | None:
    """Bytes/s at which this GPU streams a weight matrix through a bf16 matrix-vector product, measured now
    (what a batch-1 decode step does with every weight); None on CPU.

    A measurement rather than the datasheet figure: the same card reads at different rates depending on
    clocks and the access pattern, and a copy kernel (read + write) overstates what a GEMV gets.
    """
    if device.type != "cuda":
        return None
    import torch

    rows, cols = 1 << 17, 4096  # 1 GiB of bf16: far past the L2 cache
    weight = torch.empty(rows, cols, dtype=torch.bfloat16, device=device).normal_()
    x = torch.randn(cols, 1, dtype=torch.bfloat16, device=device)
    times = []
    for i in range(25):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        torch.matmul(weight, x)
        end.record()
        end.synchronize()
        if i >= 5:  # warm-up: cuBLAS picks its kernel and the clocks rise
            times.append(begin.elapsed_time(end) / 1e3)
    # The fastest run: a roofline is the best the memory can do (runs measured 2.4-2.7 TB/s by the median).
    return weight.numel() * weight.element_size() / min(times)


def with_roofline(result: LatencyResult, traffic: DecodeTraffic, bandwidth: float | None) -> LatencyResult:
    """`result` with its roofline share filled in (left None without a known bandwidth)."""
    if bandwidth is None:
        return result
    bound_s = traffic.decode_bytes(result.batch_size, result.input_len, result.decode_steps) / bandwidth
    return dataclasses.replace(result, roofline_share=bound_s / result.decode_s)
