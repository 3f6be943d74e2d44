"""ModelConfig: the few numbers our decoder needs, parsed from an HF `config.json` dict.

Mixture-of-experts models (Qwen3-MoE, Mixtral) add a MoEConfig: which layers route over experts, how
many, and how wide each expert is.

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
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
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
class MoEConfig:
    """The sparse MLP of a mixture-of-experts model: each token's router picks `top_k` of `num_experts`
    experts (gated MLPs of width `intermediate_size`) and sums their outputs weighted by the router's
    softmax probabilities, renormalised over the picked ones when `renormalize`."""

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    layers: tuple[int, ...]  # the layers whose MLP is sparse; the others keep the dense MLP
    # How tensor-parallel ranks split the experts (a run setting, --ep, not the checkpoint's): False, a
    # slice of every expert's width on each rank; True, whole experts, num_experts / ranks on each.
    expert_parallel: bool = False

    @classmethod
    def from_hf(cls, d: dict[str, Any], architecture: str, num_layers: int) -> MoEConfig | None:
        # Either spelling, in either model: Qwen3-MoE checkpoints write `num_experts`, transformers 5
        # saves it as Mixtral's `num_local_experts`.
        key = "num_experts" if "num_experts" in d else "num_local_experts"
        if architecture == "MixtralForCausalLM":
            # Mixtral's experts are as wide as its `intermediate_size`, every layer is sparse and the
            # top-k weights are always renormalised (its config has no switch for it).
            return cls(
                num_experts=int(d[key]),
                top_k=int(d["num_experts_per_tok"]),
                intermediate_size=int(d["intermediate_size"]),
                renormalize=True,
                layers=tuple(range(num_layers)),
            )._checked()
        if architecture == "Qwen3MoeForCausalLM":
            # transformers' rule: a layer is sparse unless listed in mlp_only_layers, and only every
            # decoder_sparse_step-th layer (counting from 1) is.
            step = int(d.get("decoder_sparse_step", 1))
            if step < 1:
                raise MinisglError(f"decoder_sparse_step must be at least 1, not {step}")
            dense = set(d.get("mlp_only_layers") or [])
            num_experts = int(d[key])
            layers = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
            if num_experts == 0 or not layers:
                return None  # every layer dense: a plain Qwen3 with its dense MLP
            return cls(
                num_experts=num_experts,
                top_k=int(d["num_experts_per_tok"]),
                intermediate_size=int(d["moe_intermediate_size"]),
                renormalize=bool(d.get("norm_topk_prob", False)),
                layers=layers,
            )._checked()
        return None

    def _checked(self) -> MoEConfig:
        if not 1 <= self.top_k <= self.num_experts:
            raise MinisglError(
                f"num_experts_per_tok must be between 1 and the {self.num_experts} experts, not {self.top_k}"
            )
        return self


@dataclass(frozen=True)
class Fp8Checkpoint:
    """How an FP8 checkpoint stores its weights (config.json's quantization_config, quant_method "fp8"):
    `block` is weight_block_size, the entries each `weight_scale_inv` covers, or None for one scale a tensor.
    Its tensors are dequantized as they load (layers/fp8.py)."""

    block: tuple[int, int] | None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Fp8Checkpoint | None:
        q = d.get("quantization_config")
        if not q:
            return None
        method = q.get("quant_method")
        if method != "fp8":
            raise UsageError(f"unsupported quantization_config quant_method {method!r} (supported: fp8)")
        if q.get("fmt", "e4m3") not in ("e4m3", "float8_e4m3fn"):
            raise UsageError(f"unsupported FP8 format {q['fmt']!r} (supported: e4m3)")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            # Static checkpoints carry calibrated input_scale tensors; minisgl scales activations per token.
            raise UsageError(
                f"FP8 checkpoints with activation_scheme {q['activation_scheme']!r} are not supported "
                "(supported: dynamic)"
            )
        block = q.get("weight_block_size")
        if block is None:
            return cls(None)
        if not (
            isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
        ):
            raise UsageError(f"weight_block_size must be two positive integers, not {block!r}")
        return cls((block[0], block[1]))


QUANTIZATIONS = ("auto", "none", "fp8")


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
    moe: MoEConfig | None = None  # None: a dense model
    fp8_checkpoint: Fp8Checkpoint | None = None  # None: the checkpoint's weights are not FP8
    quantization: str | None = None  # a run setting (--quantization): "fp8", or None for the model dtype

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe is not None and layer_id in self.moe.layers

    @property
    def has_dense_mlp(self) -> bool:
        """Whether any layer keeps the dense MLP (of width `intermediate_size`)."""
        return self.moe is None or len(self.moe.layers) < self.num_layers

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def with_quantization(self, choice: str) -> ModelConfig:
        """The model with --quantization's choice: "auto" is the checkpoint's (FP8 weights for an FP8
        checkpoint), "none" the model dtype (an FP8 checkpoint dequantized), "fp8" FP8 weights."""
        if choice not in QUANTIZATIONS:
            raise UsageError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, not {choice!r}")
        if choice == "auto":
            choice = "fp8" if self.fp8_checkpoint is not None else "none"
        return replace(self, quantization=None if choice == "none" else choice)

    def with_expert_parallel(self, on: bool, ranks: int) -> ModelConfig:
        """The model with --ep's choice of how the ranks split its experts; MinisglError where --ep cannot
        apply (a dense model, or a single rank): UsageError."""
        if not on:
            return self
        if self.moe is None:
            raise UsageError("--ep splits a mixture-of-experts model's experts, and this model has none")
        if ranks < 2:
            raise UsageError("--ep splits the experts over the --tp ranks: give --tp 2 or more")
        return replace(self, moe=replace(self.moe, expert_parallel=True))

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
        if self.has_dense_mlp and self.intermediate_size % n:
            raise MinisglError(
                f"tensor parallelism over {n} ranks needs an MLP width that divides by {n}, "
                f"but the model's is {self.intermediate_size}"
            )
        moe = self.moe
        if moe is not None and moe.expert_parallel:
            # Whole experts on each rank; every rank still routes every token and the partial sums meet
            # in the block's all-reduce, so no token moves between ranks either way.
            if moe.num_experts % n:
                raise MinisglError(
                    f"expert parallelism over {n} ranks needs a number of experts that divides by {n}, "
                    f"but the model has {moe.num_experts}"
                )
        elif moe is not None:
            # Every rank holds a slice of every expert (not whole experts): no token has to move between
            # ranks, and the block ends in one all-reduce like the dense MLP.
            if moe.intermediate_size % n:
                raise MinisglError(
                    f"tensor parallelism over {n} ranks needs an expert width that divides by {n}, "
                    f"but the model's is {moe.intermediate_size}"
                )
            moe = replace(moe, intermediate_size=moe.intermediate_size // n)
        return replace(
            self,
            num_heads=tp.shard(self.num_heads).size,
            num_kv_heads=tp.shard(self.num_kv_heads).size,
            intermediate_size=tp.shard(self.intermediate_size).size if self.has_dense_mlp else 0,
            moe=moe,
        )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        architecture = _architecture(d)
        try:
            num_heads = int(d["num_attention_heads"])
            hidden_size = int(d["hidden_size"])
            rope_theta, rope_scaling = _rope(d)
            num_layers = int(d["num_hidden_layers"])
            return cls(
                architecture=architecture,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or hidden_size // num_heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=_max_positions(d, architecture),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=architecture == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
                qk_norm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
                eos_token_ids=_int_list(d.get("eos_token_id")),
                bos_token_id=d.get("bos_token_id"),
                moe=MoEConfig.from_hf(d, architecture, num_layers),
                fp8_checkpoint=Fp8Checkpoint.from_hf(d),
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


# Architectures whose attention uses `sliding_window` whenever it is set (Qwen's gate it on a flag).
_WINDOWED = ("MistralForCausalLM", "MixtralForCausalLM")


def _max_positions(d: dict[str, Any], architecture: str) -> int:
    limit = int(d.get("max_position_embeddings", 4096))
    # We always attend over the full context; a model trained with a sliding window (Mistral v0.1)
    # is only exact up to its window, so the window caps the context instead of giving wrong answers.
    window = d.get("sliding_window")
    if window and (architecture in _WINDOWED or d.get("use_sliding_window")):
        limit = min(limit, int(window))
    return limit


def _int_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
