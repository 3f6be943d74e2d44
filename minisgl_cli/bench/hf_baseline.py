"""The transformers baseline: the same requests through `AutoModelForCausalLM`, on the same dtype and device.

Offline, as vLLM's HF throughput backend does: requests, in workload order, are grouped into batches of
`batch_size`; each batch is left-padded and run by `generate()` (greedy, or sampled at the same temperature),
with min_new_tokens = max_new_tokens
= the batch's longest output length, so no row stops early. Only each request's own output length is counted:
the tokens a shorter request generates while its batch finishes are the waste of static batching.

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
import time
from typing import TYPE_CHECKING, Any

import torch

from minisgl_cli.bench.latency import LatencyResult, check_lengths
from minisgl_cli.bench.offline import (
    WARMUP_INPUT_LEN,
    WARMUP_OUTPUT_LEN,
    Progress,
    ThroughputResult,
    warmup_prompt,
)
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
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise MinisglError(f"transformers cannot load {source.path}: {exc}") from exc
    # generate() fills what a call leaves unset from the model's generation config: a plain one, so that no
    # shipped default (a repetition penalty, say) adds work the engine's requests do not ask for.
    model.generation_config = GenerationConfig(eos_token_id=model.config.eos_token_id, pad_token_id=PAD_ID)
    return model.to(device).eval()


def run_hf_offline(
    model: PreTrainedModel,
    workload: Workload,
    batch_size: int,
    on_done: Progress | None = None,
    *,
    temperature: float = 0.0,
) -> ThroughputResult:
    """Warm up, then run `workload` in static batches of `batch_size` and time it (see the module docstring)."""
    if batch_size < 1:
        raise UsageError(f"--hf-batch-size {batch_size}: expected a positive integer")
    device = model.device
    _generate(model, [BenchRequest(warmup_prompt(model.config.vocab_size), WARMUP_OUTPUT_LEN)], device)
    requests = workload.requests
    finish_s: list[float] = []
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        _generate(model, batch, device, temperature)
        finish_s.extend([time.perf_counter() - start] * len(batch))  # a static batch ends all at once
        if on_done is not None:
            on_done(len(batch))
    elapsed = time.perf_counter() - start
    return ThroughputResult(
        "hf", len(requests), workload.input_tokens, workload.output_tokens, elapsed, finish_s=finish_s
    )


@torch.inference_mode()
def _generate(
    model: PreTrainedModel, batch: list[BenchRequest], device: torch.device, temperature: float = 0.0
) -> None:
    """One left-padded generate() of `batch` (greedy at temperature 0, else sampled with no top-k/top-p),
    every row run to the batch's longest output length."""
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
    )
    if out.shape[1] != width + new_tokens:  # the count reported would be wrong: a bug, not a user error
        raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens, not {new_tokens}")


def run_hf_latency(
    model: PreTrainedModel,
    batch_sizes: list[int],
    input_len: int,
    output_len: int,
    seed: int,
    on_done: Progress | None = None,
) -> list[LatencyResult]:
    """Warm up once, then measure each batch size on the prompts the engine got for the same seed."""
    check_lengths(input_len, output_len)
    _measure(model, min(batch_sizes), min(input_len, WARMUP_INPUT_LEN), WARMUP_OUTPUT_LEN, seed)
    results = []
    for batch_size in batch_sizes:
        results.append(_measure(model, batch_size, input_len, output_len, seed))
        if on_done is not None:
            on_done(1)
    return results


@torch.inference_mode()
def _measure(
    model: PreTrainedModel, batch_size: int, input_len: int, output_len: int, seed: int
) -> LatencyResult:
    vocab_size = model.config.vocab_size
    workload = random_workload(batch_size, (input_len, input_len), (output_len, output_len), vocab_size, seed)
    ids = torch.tensor([r.prompt_ids for r in workload.requests], device=model.device)
    cache_name = _cache_name(model)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    next_ids = _argmax_to_host(out)
    prefill_s = time.perf_counter() - start
    decode_s = 0.0
    for _ in range(output_len - 1):
        start = time.perf_counter()
        cache = {cache_name: getattr(out, cache_name)}
        out = model(input_ids=next_ids.to(model.device)[:, None], use_cache=True, logits_to_keep=1, **cache)
        next_ids = _argmax_to_host(out)
        decode_s += time.perf_counter() - start
    return LatencyResult("hf", batch_size, input_len, output_len, prefill_s, output_len - 1, decode_s)


def _cache_name(model: PreTrainedModel) -> str:
    """The KV cache's name in forward()'s arguments and outputs: transformers 5 renamed past_key_values."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _argmax_to_host(out: Any) -> torch.Tensor:
    # The copy to the host waits for the device, so the step's time includes its device work.
    return out.logits[:, -1].argmax(dim=-1).cpu()
