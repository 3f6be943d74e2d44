"""GGUF metadata -> the model's shape (GGUFModelInfo) -> HF config.json and generation_config.json.

Mixture-of-experts files become Qwen3MoeForCausalLM (llama.cpp's qwen3moe) or MixtralForCausalLM (llama
with llama.expert_count > 0)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minisgl_cli.convert.dtypes import dtype_name
from minisgl_cli.convert.gguf_file import GGUFFile
from minisgl_cli.convert.gguf_names import (
    MOE_MODEL_TYPES,
    ROPE_FREQS,
    SUPPORTED_ARCHITECTURES,
    Experts,
    expert_layout,
)
from minisgl_cli.convert.gguf_rope import recover_llama3_scaling
from minisgl_cli.errors import MinisglError, UsageError

_HF_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}

# llama.cpp's general.sampling.<key> metadata (the sampling the model's author recommends, which its
# convert_hf_to_gguf.py copies from the HF generation config) -> generation_config.json keys.
_GGUF_SAMPLING = {
    "temp": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "penalty_repeat": "repetition_penalty",
}
# Sampling a model card recommends, for GGUF files of that model whose metadata says none, keyed by the start
# of the file name: GGUF files are named after the model (the embedded SmolLM2-135M-Instruct.Q4_1.gguf,
# SmolLM2-135M-Instruct-Q8_0.gguf, ...), where their general.name is less telling (the embedded file's is
# "Smollm2 135M 8k Lc100K Mix1 Ep2").
_MODEL_CARDS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct: its transformers example generates with
    # model.generate(inputs, max_new_tokens=50, temperature=0.2, top_p=0.9, do_sample=True). The 50 tokens
    # are that example's length, not advice, so they are not taken. At the built-in temperature 1.0 and
    # top_p 1.0 this 135M model answers gibberish.
    "smollm2-135m-instruct": {"temperature": 0.2, "top_p": 0.9},
}


@dataclass(frozen=True)
class GGUFModelInfo:
    """Everything config.json needs, read once from the file's metadata and tensor shapes."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    sampling: dict[str, Any]  # recommended sampling, as generation_config.json keys; {} if none is known
    experts: Experts | None = None  # None: a dense model
    experts_per_token: int = 0  # the router's top k
    expert_intermediate_size: int = 0  # one expert's MLP width

    @property
    def model_type(self) -> str:
        """config.json's model_type: the architecture's own name, or its MoE model's."""
        return self.architecture if self.experts is None else self.experts.model_type


def read_model_info(gguf: GGUFFile) -> GGUFModelInfo:
    arch = gguf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UsageError(
            f"unsupported architecture '{arch}' in {gguf.path} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    for name in ("token_embd.weight", "blk.0.attn_q.weight"):
        if name not in gguf.tensors:
            raise MinisglError(f"{gguf.path} has no '{name}' tensor")

    experts = _experts(gguf)
    num_heads = int(gguf.require(f"{arch}.attention.head_count"))
    # Shapes beat metadata where both exist: vocab_size is optional, and head_dim is only spelled
    # out (as key_length) when it differs from hidden_size / heads, as in Qwen3.
    vocab_size, hidden_size = gguf.shape("token_embd.weight")
    head_dim = gguf.shape("blk.0.attn_q.weight")[0] // num_heads
    rope_theta = _f32(gguf.get(f"{arch}.rope.freq_base", 10000.0))
    eos = [gguf.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    expert_width = 0 if experts is None else _expert_width(gguf, experts)
    if experts is None:
        intermediate_size = int(gguf.require(f"{arch}.feed_forward_length"))
    elif experts.model_type == "mixtral":
        intermediate_size = expert_width  # Mixtral's intermediate_size is its experts' width
    else:
        # Qwen3-MoE's intermediate_size is for dense layers, which llama.cpp's qwen3moe has none of.
        intermediate_size = int(gguf.get(f"{arch}.feed_forward_length", expert_width))
    attention_bias = "blk.0.attn_q.bias" in gguf.tensors
    if attention_bias and experts is not None and experts.model_type == "mixtral":
        raise MinisglError(
            f"{gguf.path} has attention biases ('blk.0.attn_q.bias'), which Mixtral does not have"
        )
    return GGUFModelInfo(
        architecture=arch,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=int(gguf.require(f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(gguf.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=_f32(gguf.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(gguf, rope_theta, head_dim),
        max_position_embeddings=int(gguf.require(f"{arch}.context_length")),
        vocab_size=vocab_size,
        tie_word_embeddings="output.weight" not in gguf.tensors,
        attention_bias=attention_bias,
        bos_token_id=gguf.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(int(e) for e in eos if e is not None)),
        pad_token_id=gguf.get("tokenizer.ggml.padding_token_id"),
        sampling=_recommended_sampling(gguf),
        experts=experts,
        experts_per_token=0 if experts is None else _experts_per_token(gguf, experts),
        expert_intermediate_size=expert_width,
    )


def _experts(gguf: GGUFFile) -> Experts | None:
    """The file's experts (count and layout), or None for a dense model."""
    arch = gguf.architecture
    count = int(gguf.get(f"{arch}.expert_count") or 0)
    if count == 0:
        if arch == "qwen3moe":  # (a llama file without experts is a plain llama)
            raise MinisglError(f"{gguf.path} is a {arch} model without experts ('{arch}.expert_count')")
        return None
    if arch not in MOE_MODEL_TYPES:
        raise MinisglError(
            f"{gguf.path} is a {arch} model with {count} experts, which convert does not support "
            "(mixture-of-experts: qwen3moe, and llama with experts as Mixtral)"
        )
    return expert_layout(MOE_MODEL_TYPES[arch], count, gguf.tensors)


def _expert_width(gguf: GGUFFile, experts: Experts) -> int:
    # From the shape, as with head_dim: Mixtral files do not spell it out apart from feed_forward_length.
    if not experts.merged:
        return gguf.shape("blk.0.ffn_gate.0.weight")[0]
    count, width, _hidden = gguf.shape("blk.0.ffn_gate_exps.weight")
    if count != experts.num_experts:
        raise MinisglError(
            f"{gguf.path} says it has {experts.num_experts} experts ('{gguf.architecture}.expert_count'), "
            f"but its 'blk.0.ffn_gate_exps.weight' holds {count}"
        )
    return width


def _experts_per_token(gguf: GGUFFile, experts: Experts) -> int:
    key = f"{gguf.architecture}.expert_used_count"
    top_k = int(gguf.require(key))
    if not 1 <= top_k <= experts.num_experts:
        raise MinisglError(
            f"{gguf.path} has '{key}' {top_k}, not between 1 and its {experts.num_experts} experts"
        )
    return top_k


def _recommended_sampling(gguf: GGUFFile) -> dict[str, Any]:
    """The file's own general.sampling.* values, over its model card's (the file is the more specific)."""
    name = gguf.path.name.lower()
    sampling = next((dict(card) for prefix, card in _MODEL_CARDS.items() if name.startswith(prefix)), {})
    for key, hf_key in _GGUF_SAMPLING.items():
        value = gguf.get(f"general.sampling.{key}")
        if value is not None:
            sampling[hf_key] = int(value) if hf_key == "top_k" else _f32(value)
    return sampling


def _f32(value: float) -> float:
    # GGUF stores float32: 1e-5 arrives as 9.999999747378752e-06. Write the shortest decimal that reads
    # back as the same float32, as the original config.json had it.
    return float(str(np.float32(value)))


def _rope_scaling(gguf: GGUFFile, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    arch = gguf.architecture
    kind = gguf.get(f"{arch}.rope.scaling.type")
    factor = gguf.get(f"{arch}.rope.scaling.factor")
    original = gguf.get(f"{arch}.rope.scaling.original_context_length")
    if kind == "linear" and factor is not None:
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn" and factor is not None and original is not None:
        return {
            "rope_type": "yarn",
            "factor": _f32(factor),
            "original_max_position_embeddings": int(original),
        }
    if kind not in (None, "none"):
        raise MinisglError(f"{gguf.path} uses rope scaling '{kind}', which convert does not support")
    if ROPE_FREQS not in gguf.tensors:
        return None
    rotary_dim = int(gguf.get(f"{arch}.rope.dimension_count", head_dim))
    try:
        scaling = recover_llama3_scaling(
            gguf.load(ROPE_FREQS).numpy(), rope_theta, rotary_dim, None if original is None else int(original)
        )
    except ValueError as exc:
        raise MinisglError(f"cannot read the rope scaling of {gguf.path} from '{ROPE_FREQS}': {exc}") from exc
    return None if scaling is None else scaling.to_hf()


def hf_config(info: GGUFModelInfo, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM /
    Qwen3MoeForCausalLM / MixtralForCausalLM."""
    config: dict[str, Any] = {
        "architectures": [_HF_CLASS[info.model_type]],
        "model_type": info.model_type,
        "hidden_size": info.hidden_size,
        "intermediate_size": info.intermediate_size,
        "num_hidden_layers": info.num_layers,
        "num_attention_heads": info.num_heads,
        "num_key_value_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": info.max_position_embeddings,
        "rms_norm_eps": info.rms_norm_eps,
        "rope_theta": info.rope_theta,
        "rope_scaling": info.rope_scaling,
        "vocab_size": info.vocab_size,
        "tie_word_embeddings": info.tie_word_embeddings,
        **_special_ids(info),
        # transformers < 4.56 reads torch_dtype, newer ones dtype.
        "torch_dtype": dtype_name(dtype),
        "dtype": dtype_name(dtype),
        "use_cache": True,
    }
    if info.model_type == "qwen2":
        # Qwen2's q/k/v always carry biases, so its config has no attention_bias switch.
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=info.num_layers)
    elif info.model_type != "mixtral":  # Mixtral has no biases, and no switch for them
        config["attention_bias"] = info.attention_bias
    if info.model_type == "llama":
        config["mlp_bias"] = False
    config.update(_moe_config(info))
    return config


def _moe_config(info: GGUFModelInfo) -> dict[str, Any]:
    experts = info.experts
    if experts is None:
        return {}
    if experts.model_type == "mixtral":
        # Every layer sparse, experts as wide as intermediate_size, top-k weights always renormalised: a
        # Mixtral config has no switch for any of these.
        return {
            "num_local_experts": experts.num_experts,
            "num_experts_per_tok": info.experts_per_token,
            "sliding_window": None,
        }
    return {
        "num_experts": experts.num_experts,
        "num_experts_per_tok": info.experts_per_token,
        "moe_intermediate_size": info.expert_intermediate_size,
        # Not in the file: llama.cpp's qwen3moe always renormalises the top-k router weights (its
        # build_moe_ffn call passes norm_w = true), as Qwen3-30B-A3B's config does.
        "norm_topk_prob": True,
        # llama.cpp's qwen3moe makes every layer sparse.
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def generation_config(info: GGUFModelInfo) -> dict[str, Any]:
    """generation_config.json: which tokens end a generation (all of eos/eot/eom the file names), and the
    recommended sampling when one is known (with do_sample, without which transformers decodes greedily)."""
    sampling = {"do_sample": True, **info.sampling} if info.sampling else {}
    return {**_special_ids(info), **sampling}


def _special_ids(info: GGUFModelInfo) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    if info.bos_token_id is not None:
        ids["bos_token_id"] = int(info.bos_token_id)
    if info.eos_token_ids:
        ids["eos_token_id"] = info.eos_token_ids[0] if len(info.eos_token_ids) == 1 else info.eos_token_ids
    if info.pad_token_id is not None:
        ids["pad_token_id"] = int(info.pad_token_id)
    return ids
