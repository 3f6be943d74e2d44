"""GGUF tensor names -> HF (Llama/Qwen2/Qwen3) parameter names, and undoing llama.cpp's q/k row order."""

from __future__ import annotations

import re

import torch

from minisgl_cli.errors import MinisglError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

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
_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<part>\w+)\.(?P<kind>weight|bias)")

# Not model weights in HF terms: llama.cpp stores llama3's rope scaling as precomputed per-frequency
# factors; gguf_config turns them back into config.json's rope_scaling.
ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str:
    """The HF parameter name for a GGUF tensor name; an error for a tensor these models do not have."""
    match = _NAME.fullmatch(gguf_name)
    table = _PER_LAYER if match and match["layer"] is not None else _GLOBAL
    if match is None or match["part"] not in table:
        raise MinisglError(f"unexpected tensor '{gguf_name}' (not part of a llama/qwen2/qwen3 model)")
    base = table[match["part"]]
    if match["layer"] is not None:
        base = f"model.layers.{match['layer']}.{base}"
    return f"{base}.{match['kind']}"


def required_tensors(architecture: str, num_layers: int) -> list[str]:
    """The GGUF tensors a complete model of this architecture has (output.weight is optional: tied)."""
    parts = [
        "attn_norm",
        "ffn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ]
    if architecture == "qwen3":
        parts += ["attn_q_norm", "attn_k_norm"]
    names = [f"blk.{i}.{part}.weight" for i in range(num_layers) for part in parts]
    if architecture == "qwen2":
        names += [f"blk.{i}.attn_{x}.bias" for i in range(num_layers) for x in "qkv"]
    return ["token_embd.weight", "output_norm.weight", *names]


def permuted_heads(architecture: str, gguf_name: str, num_heads: int, num_kv_heads: int) -> int | None:
    """How many heads llama.cpp permuted this tensor's rows over, or None if it left them alone.

    Only the llama architecture is permuted, and only q and k (weights and biases): llama.cpp's rope
    rotates adjacent pairs, HF's rotates the two halves of each head, so the converter interleaved them.
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
