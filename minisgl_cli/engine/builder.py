"""Building an engine from an EngineConfig: the model, its runner (weights, KV pool) and a scheduler.

One place for it, shared by the in-process LLM and the server's scheduler process, so both run the same
engine for the same settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minisgl_cli.config import EngineConfig
from minisgl_cli.errors import MinisglError

if TYPE_CHECKING:
    from minisgl_cli.engine.distributed import TPGroup
    from minisgl_cli.engine.model_runner import ModelRunner
    from minisgl_cli.engine.models.config import ModelConfig
    from minisgl_cli.engine.scheduler import Scheduler
    from minisgl_cli.model_source import ModelSource

# Files any one of which means a directory carries a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class Engine:
    source: ModelSource
    model_config: ModelConfig
    runner: ModelRunner
    scheduler: Scheduler

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV pool holds."""
        return self.runner.allocator.num_usable * self.runner.allocator.page_size


def build_engine(cfg: EngineConfig, source: ModelSource | None = None, tp: TPGroup | None = None) -> Engine:
    """Load the model (or `source`, already resolved) and size the KV pool; MinisglError if it cannot.

    With `tp` (a group of tensor-parallel ranks, every one of which calls this) this rank's share of the
    model; the ranks agree on one KV pool size, so their schedulers make the same decisions. Rank 0's
    scheduler then sends what is done to it to the others, which must run `rank_sync.follow`."""
    # Heavy imports here, so importing this module stays cheap.
    from minisgl_cli.engine.device import resolve_device, resolve_dtype
    from minisgl_cli.engine.grammar import GrammarBackend
    from minisgl_cli.engine.kv.naive_cache import NaiveCache
    from minisgl_cli.engine.kv.prefix_cache import PrefixCache
    from minisgl_cli.engine.kv.radix_cache import RadixCache
    from minisgl_cli.engine.model_runner import ModelRunner
    from minisgl_cli.engine.rank_sync import RankChannel, RankLeader
    from minisgl_cli.engine.scheduler import Scheduler
    from minisgl_cli.model_source import resolve_model

    if source is None:
        source = resolve_model(cfg.model, cfg.dummy_weights)
    model_config = run_model_config(cfg, source.hf_config)
    device = resolve_device(cfg.device)
    context_len = model_config.max_position_embeddings
    if cfg.context_length is not None:
        context_len = min(context_len, cfg.context_length)
    runner = ModelRunner(
        model_config,
        None if cfg.dummy_weights else source.path,
        dtype=resolve_dtype(cfg.dtype, device),
        device=device,
        page_size=cfg.page_size,
        max_running_requests=cfg.max_running_requests,
        max_context_len=context_len,
        kv_cache_tokens=cfg.kv_cache_tokens,
        kv_cache_gb=cfg.kv_cache_gb,
        mem_fraction=cfg.mem_fraction,
        attention_backend=cfg.attention_backend,
        prefill_kernel=cfg.prefill_kernel,
        decode_kernel=cfg.decode_kernel,
        cuda_graph_max_bs=cfg.cuda_graph_max_bs,
        random_seed=cfg.random_seed,
        tp=tp,
        kv_cache_dtype=cfg.kv_cache_dtype,
    )
    # "radix" (the default) reuses the K/V of shared prompt prefixes; "naive" recomputes every prompt.
    cache: PrefixCache = RadixCache(cfg.page_size) if cfg.cache_type == "radix" else NaiveCache(cfg.page_size)
    eos = list(dict.fromkeys(model_config.eos_token_ids + generation_eos(source.path)))
    scheduler = Scheduler(
        runner,
        cache,
        max_prefill_tokens=cfg.max_prefill_tokens,
        eos_token_ids=eos,
        random_seed=cfg.random_seed,
        # On the CPU a step is synchronous: overlapping would only delay every token by a step.
        overlap=not cfg.disable_overlap and device.type == "cuda",
        mixed=cfg.mixed_steps,
        leader=RankLeader(RankChannel(tp)) if tp is not None and tp.size > 1 and tp.rank == 0 else None,
        grammars=GrammarBackend(lambda: load_tokenizer(source), model_config.vocab_size, eos),
    )
    return Engine(source, model_config, runner, scheduler)


def run_model_config(cfg: EngineConfig, hf_config: dict[str, Any]) -> ModelConfig:
    """The model as this run holds it: the checkpoint's config with the run's choices (--ep,
    --quantization); UsageError for a choice that cannot apply."""
    from minisgl_cli.engine.models.config import ModelConfig

    return (
        ModelConfig.from_hf(hf_config)
        .with_expert_parallel(cfg.ep, cfg.tp)
        .with_quantization(cfg.quantization)
    )


def load_tokenizer(source: ModelSource) -> Any | None:
    """The model's tokenizer: its directory's; a placeholder for a built-in shape (placeholder_tokenizer.py);
    None for a directory without tokenizer files."""
    if source.path is None:
        from minisgl_cli.engine.placeholder_tokenizer import placeholder_tokenizer

        return placeholder_tokenizer(source.hf_config)
    path = source.path
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise MinisglError(f"cannot load the tokenizer of {path}: {exc}") from exc


def generation_eos(path: Path | None) -> list[int]:
    """eos ids from generation_config.json, which chat models often extend beyond config.json's."""
    file = path / "generation_config.json" if path is not None else None
    if file is None or not file.is_file():
        return []
    try:
        value = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError):
        return []
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
