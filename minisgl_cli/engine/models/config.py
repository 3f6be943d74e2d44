"""ModelConfig: the few numbers our decoder needs, parsed from an HF `config.json` dict.

Both spellings of rope settings are accepted: transformers 4 writes `rope_theta` + `rope_scaling`,
transformers 5 writes one `rope_parameters` dict holding both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from minisgl_cli.errors import MinisglError, UsageError

if TYPE_CHECKING:  # torch.distributed is a heavy import, and only the annotation needs it
    from minisgl_cli.engine.distributed import TPGroup

# HF architecture name per `model_type`, for configs saved without an `architectures` list.
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent rope scaling (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def to_hf(self) -> dict[str, float | int | str]:
        """As config.json's `rope_scaling` (what `minisgl convert` writes)."""
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # qwen2 (always) and llama configs with attention_bias
    qk_norm: bool  # qwen3: per-head RMSNorm on q and k before rope
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def for_rank(self, tp: TPGroup) -> ModelConfig:
        """The model as one of `tp.size` tensor-parallel ranks holds it: its share of the query heads, KV
        heads and MLP width (what its KV pool and attention are sized by). MinisglError if the model does
        not split that way. The vocab always splits: it is padded up to a multiple of the ranks."""
        n = tp.size
        if self.num_heads % n:
            raise MinisglError(
                f"tensor parallelism over {n} ranks needs attention heads that divide by {n}, "
                f"but the model has {self.num_heads}"
            )
        if self.num_kv_heads % n and n % self.num_kv_heads:
            raise MinisglError(
                f"tensor parallelism over {n} ranks needs a number of key/value heads that divides by or "
                f"divides {n}, but the model has {self.num_kv_heads}"
            )
        if self.intermediate_size % n:
            raise MinisglError(
                f"tensor parallelism over {n} ranks needs an MLP width that divides by {n}, "
                f"but the model's is {self.intermediate_size}"
            )
        return replace(
            self,
            num_heads=tp.shard(self.num_heads).size,
            num_kv_heads=tp.shard(self.num_kv_heads).size,
            intermediate_size=tp.shard(self.intermediate_size).size,
        )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        architecture = _architecture(d)
        try:
            num_heads = int(d["num_attention_heads"])
            hidden_size = int(d["hidden_size"])
            rope_theta, rope_scaling = _rope(d)
            return cls(
                architecture=architecture,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or hidden_size // num_heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=_max_positions(d, architecture),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=architecture == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
                qk_norm=architecture == "Qwen3ForCausalLM",
                eos_token_ids=_int_list(d.get("eos_token_id")),
                bos_token_id=d.get("bos_token_id"),
            )
        except KeyError as e:
            raise MinisglError(f"model config is missing the field {e.args[0]!r}") from None


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    arch = archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(str(d.get("model_type")), "")
    if arch not in _ARCH_BY_MODEL_TYPE.values():
        supported = ", ".join(sorted(_ARCH_BY_MODEL_TYPE.values()))
        # The user's choice of model, not a failure while running it: exit 2 (see errors.py).
        raise UsageError(
            f"unsupported model architecture {arch or d.get('model_type')!r} (supported: {supported})"
        )
    if d.get("hidden_act", "silu") != "silu":
        raise MinisglError(f"unsupported activation {d['hidden_act']!r}: only silu models are supported")
    return arch


def _rope(d: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    params: dict[str, Any] = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise MinisglError(f"unsupported rope scaling type {rope_type!r} (supported: default, llama3)")


def _max_positions(d: dict[str, Any], architecture: str) -> int:
    limit = int(d.get("max_position_embeddings", 4096))
    # We always attend over the full context; a model trained with a sliding window (Mistral v0.1)
    # is only exact up to its window, so the window caps the context instead of giving wrong answers.
    window = d.get("sliding_window")
    if window and (architecture == "MistralForCausalLM" or d.get("use_sliding_window")):
        limit = min(limit, int(window))
    return limit


def _int_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
