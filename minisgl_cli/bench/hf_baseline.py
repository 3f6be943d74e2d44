"""The transformers baseline: the same requests through `AutoModelForCausalLM`, on the same dtype and device.

Offline, as vLLM's HF throughput backend does: requests, in workload order, are grouped into batches of
`batch_size`; each batch is left-padded and run by `generate()` (greedy, or sampled at the same temperature),
with min_new_tokens = max_new_tokens
= the batch's longest output length, so no row stops early. Only each request's own output length is counted:
the tokens a shorter request generates while its batch finishes are the waste of static batching.
Progress is reported per generated step, not per batch: one batch of a long run can take minutes. A stopping
criterion that never stops counts the steps; unlike a streamer it needs no copy of the tokens to the host,
so it adds no synchronisation with the device.

Latency: the engine's prompts (same seed), prefilled by one forward() that fills a KV cache, then one
forward() per decode step, each taking the argmax and copying the ids to the host, as an engine step does.
Both ask for the last position's logits only (`logits_to_keep=1`), as the engine computes them.

Weights: real models load from the same directory. With dummy weights the model is built from the same config
and initialised by transformers (seeded), not with the engine's random values: weights change which tokens
come out, not how much work a step is, and every request runs to its full length either way.
Attention is transformers' default implementation (sdpa).
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from minisgl_cli.bench.latency import LatencyResult, check_lengths
from minisgl_cli.bench.offline import WARMUP_INPUT_LEN, WARMUP_OUTPUT_LEN, ThroughputResult, warmup_prompt
from minisgl_cli.bench.progress import Progress, Tally
from minisgl_cli.bench.workload import BenchRequest, Workload, random_workload
from minisgl_cli.errors import MinisglError, UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from minisgl_cli.model_source import ModelSource

# Any id will do: padded positions are masked out and their outputs are never counted.
PAD_ID = 0


def load_hf_model(
    source: ModelSource, *, dummy_weights: bool, dtype: torch.dtype, device: torch.device, seed: int
) -> PreTrainedModel:
    """The transformers model of `source`: its weights, or (dummy_weights) seeded random ones."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if dummy_weights or source.path is None:
        fields = dict(source.hf_config)
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise MinisglError(f"the config of {source.name} has no model_type: transformers cannot build it")
        config = AutoConfig.for_model(model_type, **fields)
        torch.manual_seed(seed)
        with torch.device(device), quiet_transformers():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        try:
            with quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise MinisglError(f"transformers cannot load {source.path}: {exc}") from exc
    # generate() fills what a call leaves unset from the model's generation config: a plain one, so that no
    # shipped default (a repetition penalty, say) adds work the engine's requests do not ask for.
    model.generation_config = GenerationConfig(eos_token_id=model.config.eos_token_id, pad_token_id=PAD_ID)
    return model.to(device).eval()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers (and huggingface_hub) without their own progress bars, and below --log-level debug
    without their warnings and notes, for the block; errors still show. The "Loading weights" bar and the
    load report are noise beside our own bar and table; the settings are put back afterwards."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    bars, hub_bars_off, verbosity = (
        hf_logging.is_progress_bar_enabled(),
        are_progress_bars_disabled(),
        hf_logging.get_verbosity(),
    )
    # huggingface_hub warns where HF_HUB_DISABLE_PROGRESS_BARS overrides a call; the variable wins either way.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_logging.disable_progress_bar()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if bars:
                hf_logging.enable_progress_bar()  # turns huggingface_hub's on too
            if hub_bars_off:
                disable_progress_bars()


def run_hf_offline(
    model: PreTrainedModel,
    workload: Workload,
    batch_size: int,
    on_progress: Progress | None = None,
    *,
    temperature: float = 0.0,
) -> ThroughputResult:
    """Warm up, then run `workload` in static batches of `batch_size` and time it (see the module docstring).

    `on_progress(n)` is told of each request's own output tokens as generate() steps (run_offline's unit):
    `workload.output_tokens` in all."""
    if batch_size < 1:
        raise UsageError(f"--hf-batch-size {batch_size}: expected a positive integer")
    device = model.device
    _generate(model, [BenchRequest(warmup_prompt(model.config.vocab_size), WARMUP_OUTPUT_LEN)], device)
    requests = workload.requests
    finish_s: list[float] = []
    tally = Tally(on_progress, workload.output_tokens)
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        steps = _StepCounter(batch, tally, device)
        _generate(model, batch, device, temperature, steps)
        finish_s.extend([time.perf_counter() - start] * len(batch))  # a static batch ends all at once
        steps.finish()
    elapsed = time.perf_counter() - start
    tally.finish()
    return ThroughputResult(
        "hf", len(requests), workload.input_tokens, workload.output_tokens, elapsed, finish_s=finish_s
    )


class _StepCounter(StoppingCriteria):
    """A stopping criterion that never stops: generate() calls it once a step, after the step's token, and
    it tells the tally how many rows of the batch made one of their own output tokens (a row past its own
    output length only pads the batch's wait). Reads nothing from the device."""

    def __init__(self, batch: list[BenchRequest], tally: Tally, device: torch.device) -> None:
        self.lengths = sorted(r.output_len for r in batch)
        self.tally = tally
        self.steps = 0
        self.counted = 0
        self.never = torch.zeros(len(batch), dtype=torch.bool, device=device)  # made once, not per step

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.steps += 1
        # Rows whose own output length reaches this step (a step past the last, later undone, counts none).
        made = len(self.lengths) - bisect_left(self.lengths, self.steps)
        self.counted += made
        self.tally.add(made)
        return self.never

    def finish(self) -> None:
        """After generate(): whatever steps it did not report, so that the batch counts exactly its tokens."""
        self.tally.add(sum(self.lengths) - self.counted)


@torch.inference_mode()
def _generate(
    model: PreTrainedModel,
    batch: list[BenchRequest],
    device: torch.device,
    temperature: float = 0.0,
    steps: _StepCounter | None = None,
) -> None:
    """One left-padded generate() of `batch` (greedy at temperature 0, else sampled with no top-k/top-p),
    every row run to the batch's longest output length; `steps` is told of every step."""
    width = max(r.input_len for r in batch)
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - r.input_len :] = torch.tensor(r.prompt_ids)
        mask[i, width - r.input_len :] = 1
    new_tokens = max(r.output_len for r in batch)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        **(
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        ),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        **({} if steps is None else {"stopping_criteria": StoppingCriteriaList([steps])}),
    )
    if out.shape[1] != width + new_tokens:  # the count reported would be wrong: a bug, not a user error
        raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens, not {new_tokens}")


def run_hf_latency(
    model: PreTrainedModel,
    batch_sizes: list[int],
    input_len: int,
    output_len: int,
    seed: int,
    on_progress: Progress | None = None,
) -> list[LatencyResult]:
    """Warm up once, then measure each batch size on the prompts the engine got for the same seed;
    `on_progress(1)` is told of each forward (run_latency's unit: `output_len` a batch size)."""
    check_lengths(input_len, output_len)
    _measure(model, min(batch_sizes), min(input_len, WARMUP_INPUT_LEN), WARMUP_OUTPUT_LEN, seed)
    tally = Tally(on_progress, len(batch_sizes) * output_len)
    results = []
    for batch_size in batch_sizes:
        results.append(_measure(model, batch_size, input_len, output_len, seed, tally.add))
    tally.finish()
    return results


@torch.inference_mode()
def _measure(
    model: PreTrainedModel,
    batch_size: int,
    input_len: int,
    output_len: int,
    seed: int,
    on_step: Progress | None = None,
) -> LatencyResult:
    vocab_size = model.config.vocab_size
    workload = random_workload(batch_size, (input_len, input_len), (output_len, output_len), vocab_size, seed)
    ids = torch.tensor([r.prompt_ids for r in workload.requests], device=model.device)
    cache_name = _cache_name(model)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    next_ids = _argmax_to_host(out)
    prefill_s = time.perf_counter() - start
    if on_step is not None:  # outside the timing: each step is timed on its own
        on_step(1)
    decode_s = 0.0
    for _ in range(output_len - 1):
        start = time.perf_counter()
        cache = {cache_name: getattr(out, cache_name)}
        out = model(input_ids=next_ids.to(model.device)[:, None], use_cache=True, logits_to_keep=1, **cache)
        next_ids = _argmax_to_host(out)
        decode_s += time.perf_counter() - start
        if on_step is not None:
            on_step(1)
    return LatencyResult("hf", batch_size, input_len, output_len, prefill_s, output_len - 1, decode_s)


def _cache_name(model: PreTrainedModel) -> str:
    """The KV cache's name in forward()'s arguments and outputs: transformers 5 renamed past_key_values."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _argmax_to_host(out: Any) -> torch.Tensor:
    # The copy to the host waits for the device, so the step's time includes its device work.
    return out.logits[:, -1].argmax(dim=-1).cpu()
