"""GGUF tensor names -> HF (Llama/Qwen2/Qwen3, Qwen3-MoE/Mixtral) parameter names, and undoing llama.cpp's
q/k row order."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import torch

from minisgl_cli.errors import MinisglError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe")

# The HF model_type of a mixture-of-experts GGUF, by its llama.cpp architecture: llama.cpp files Mixtral
# under "llama" (llama's layers with llama.expert_count > 0), Qwen3-MoE under an architecture of its own.
MOE_MODEL_TYPES = {"qwen3moe": "qwen3_moe", "llama": "mixtral"}

_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_DENSE_MLP = ("ffn_gate", "ffn_up", "ffn_down")
# The HF module that holds a MoE layer's router (`<module>.gate`) and experts (`<module>.experts.<e>.<proj>`),
# and each projection's HF name by llama.cpp's.
_MOE_MODULE = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}
_EXPERT_PROJ = {
    "qwen3_moe": {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"},
    "mixtral": {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"},
}
_MOE_NAME = {"qwen3_moe": "Qwen3-MoE", "mixtral": "Mixtral"}
# `.<e>` is the expert of a file that stores one tensor per expert (blk.0.ffn_gate.3.weight).
_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<part>\w+)(?:\.(?P<expert>\d+))?\.(?P<kind>weight|bias)")

# Not model weights in HF terms: llama.cpp stores llama3's rope scaling as precomputed per-frequency
# factors; gguf_config turns them back into config.json's rope_scaling.
ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class Experts:
    """How a mixture-of-experts GGUF stores its experts, and which HF model they become."""

    model_type: str  # "qwen3_moe" or "mixtral"
    num_experts: int
    # llama.cpp since 2024 stacks each layer's experts into one [experts, ...] tensor per projection
    # (blk.N.ffn_gate_exps.weight); older Mixtral files hold one tensor per expert (blk.N.ffn_gate.E.weight).
    merged: bool


def expert_layout(model_type: str, num_experts: int, names: Collection[str]) -> Experts:
    """The experts' layout, told by layer 0's tensor names; an error if it has neither."""
    if "blk.0.ffn_gate_exps.weight" in names:
        return Experts(model_type, num_experts, merged=True)
    if "blk.0.ffn_gate.0.weight" in names:
        return Experts(model_type, num_experts, merged=False)
    raise MinisglError(
        f"a {_MOE_NAME[model_type]} model needs expert tensors 'blk.0.ffn_gate_exps.weight' "
        "(or one per expert, 'blk.0.ffn_gate.0.weight'), and this file has neither"
    )


@dataclass(frozen=True)
class HFTensor:
    """One HF tensor a GGUF tensor becomes."""

    name: str
    index: int | None = None  # the [index] of a merged [experts, ...] GGUF tensor it is; None: all of it


def hf_tensors(gguf_name: str, experts: Experts | None) -> list[HFTensor]:
    """The HF tensors a GGUF tensor becomes (one, or one per expert of a merged expert tensor); an error
    for a tensor these models do not have, shared experts (ffn_*_shexp) among them: dropping one would
    convert a different model, and keeping one would make a directory the loader refuses."""
    match = _NAME.fullmatch(gguf_name)
    if match is None:
        raise _unexpected(gguf_name, experts)
    layer, part, expert, kind = match["layer"], match["part"], match["expert"], match["kind"]
    if layer is None:
        if expert is not None or part not in _GLOBAL:
            raise _unexpected(gguf_name, experts)
        return [HFTensor(f"{_GLOBAL[part]}.{kind}")]
    prefix = f"model.layers.{layer}"
    if experts is None or (part in _PER_LAYER and part not in _DENSE_MLP):
        if expert is not None or part not in _PER_LAYER:
            raise _unexpected(gguf_name, experts)
        return [HFTensor(f"{prefix}.{_PER_LAYER[part]}.{kind}")]
    moe = _moe_tensors(prefix, part, None if expert is None else int(expert), kind, experts)
    if not moe:
        raise _unexpected(gguf_name, experts)
    return moe


def _moe_tensors(prefix: str, part: str, expert: int | None, kind: str, experts: Experts) -> list[HFTensor]:
    """A MoE layer's router, and its experts in the file's layout; [] for anything else (biases among it:
    neither model has any there). Every layer is sparse in llama.cpp's qwen3moe and Mixtral, so a dense
    ffn_gate/ffn_up/ffn_down is anything else too."""
    if kind != "weight":
        return []
    module = f"{prefix}.{_MOE_MODULE[experts.model_type]}"
    projections = _EXPERT_PROJ[experts.model_type]
    proj = part.removesuffix("_exps")
    if part == "ffn_gate_inp" and expert is None:
        return [HFTensor(f"{module}.gate.weight")]
    if experts.merged and expert is None and part.endswith("_exps") and proj in projections:
        return [
            HFTensor(f"{module}.experts.{e}.{projections[proj]}.weight", e)
            for e in range(experts.num_experts)
        ]
    if not experts.merged and expert is not None and expert < experts.num_experts and part in projections:
        return [HFTensor(f"{module}.experts.{expert}.{projections[part]}.weight")]
    return []


def _unexpected(gguf_name: str, experts: Experts | None) -> MinisglError:
    if experts is None:
        return MinisglError(f"unexpected tensor '{gguf_name}' (not part of a llama/qwen2/qwen3 model)")
    layout = "merged experts" if experts.merged else "one tensor per expert"
    return MinisglError(
        f"unexpected tensor '{gguf_name}' (not part of a {_MOE_NAME[experts.model_type]} model with "
        f"{experts.num_experts} experts, stored as {layout})"
    )


def required_tensors(architecture: str, num_layers: int, experts: Experts | None = None) -> list[str]:
    """The GGUF tensors a complete model of this architecture has (output.weight is optional: tied)."""
    parts = ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output"]
    if experts is None:
        parts += list(_DENSE_MLP)
    elif experts.merged:
        parts += ["ffn_gate_inp", *(f"{proj}_exps" for proj in _DENSE_MLP)]
    else:
        parts += ["ffn_gate_inp", *(f"{proj}.{e}" for e in range(experts.num_experts) for proj in _DENSE_MLP)]
    if architecture in ("qwen3", "qwen3moe"):
        parts += ["attn_q_norm", "attn_k_norm"]
    names = [f"blk.{i}.{part}.weight" for i in range(num_layers) for part in parts]
    if architecture == "qwen2":
        names += [f"blk.{i}.attn_{x}.bias" for i in range(num_layers) for x in "qkv"]
    return ["token_embd.weight", "output_norm.weight", *names]


def permuted_heads(architecture: str, gguf_name: str, num_heads: int, num_kv_heads: int) -> int | None:
    """How many heads llama.cpp permuted this tensor's rows over, or None if it left them alone.

    Only the llama architecture (Mixtral included) is permuted, and only q and k (weights and biases):
    llama.cpp's rope rotates adjacent pairs, HF's rotates the two halves of each head, so the converter
    interleaved them. Qwen2/Qwen3/Qwen3-MoE use llama.cpp's NeoX rope, which rotates halves as HF does.
    """
    if architecture != "llama":
        return None
    if re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", gguf_name):
        return num_heads
    if re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", gguf_name):
        return num_kv_heads
    return None


def unpermute_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per head, rows stored as pairs (x0, x_half, x1, x_half+1, ...) go back to halves (x0, x1, ..., x_half, ...)."""
    half = tensor.shape[0] // num_heads // 2
    return tensor.reshape(num_heads, half, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)
