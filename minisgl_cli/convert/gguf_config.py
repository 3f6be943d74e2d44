"""GGUF metadata -> the model's shape (GGUFModelInfo) -> HF config.json and generation_config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minisgl_cli.convert.dtypes import dtype_name
from minisgl_cli.convert.gguf_file import GGUFFile
from minisgl_cli.convert.gguf_names import ROPE_FREQS, SUPPORTED_ARCHITECTURES
from minisgl_cli.convert.gguf_rope import recover_llama3_scaling
from minisgl_cli.errors import MinisglError, UsageError

_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

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


def read_model_info(gguf: GGUFFile) -> GGUFModelInfo:
    arch = gguf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UsageError(
            f"unsupported architecture '{arch}' in {gguf.path} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    for name in ("token_embd.weight", "blk.0.attn_q.weight"):
        if name not in gguf.tensors:
            raise MinisglError(f"{gguf.path} has no '{name}' tensor")

    num_heads = int(gguf.require(f"{arch}.attention.head_count"))
    # Shapes beat metadata where both exist: vocab_size is optional, and head_dim is only spelled
    # out (as key_length) when it differs from hidden_size / heads, as in Qwen3.
    vocab_size, hidden_size = gguf.shape("token_embd.weight")
    head_dim = gguf.shape("blk.0.attn_q.weight")[0] // num_heads
    rope_theta = _f32(gguf.get(f"{arch}.rope.freq_base", 10000.0))
    eos = [gguf.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return GGUFModelInfo(
        architecture=arch,
        hidden_size=hidden_size,
        intermediate_size=int(gguf.require(f"{arch}.feed_forward_length")),
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
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
        bos_token_id=gguf.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(int(e) for e in eos if e is not None)),
        pad_token_id=gguf.get("tokenizer.ggml.padding_token_id"),
        sampling=_recommended_sampling(gguf),
    )


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
    """config.json for transformers' LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM."""
    config: dict[str, Any] = {
        "architectures": [_HF_CLASS[info.architecture]],
        "model_type": info.architecture,
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
    if info.architecture == "qwen2":
        # Qwen2's q/k/v always carry biases, so its config has no attention_bias switch.
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=info.num_layers)
    else:
        config["attention_bias"] = info.attention_bias
    if info.architecture == "llama":
        config["mlp_bias"] = False
    return config


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
