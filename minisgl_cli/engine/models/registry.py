"""Model registry: HF architecture name -> our model class, and building one on a device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from minisgl_cli.engine.distributed import TPGroup
from minisgl_cli.engine.models.config import ModelConfig
from minisgl_cli.engine.models.llama import LlamaForCausalLM
from minisgl_cli.errors import MinisglError

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,  # config.moe swaps in the sparse MLP
    "MixtralForCausalLM": LlamaForCausalLM,
}


def build_model(
    config: ModelConfig,
    max_context_len: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    tp: TPGroup | None = None,
) -> LlamaForCausalLM:
    """The model (rank `tp.rank`'s share of it; the whole model by default) with uninitialised parameters
    of `dtype` on `device` (a "meta" device allocates nothing)."""
    cls = MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise MinisglError(f"no model implementation for architecture {config.architecture!r}")
    tp = tp or TPGroup.single()
    config.for_rank(tp)  # a clear error for a model that does not split over tp.size ranks
    with torch.device(device), _default_dtype(dtype):
        model = cls(config, max_context_len, tp)
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    """Parameters with tied weights counted once."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
