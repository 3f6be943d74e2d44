"""Test-side builders for the convert tests: tiny random HF models written out as GGUF files the way
llama.cpp would, and plain-Python decoders of llama.cpp's quantized block layouts.

Everything here is written independently of minisgl_cli.convert (its own name table, its own q/k
permutation, its own block decoders), so the converter is checked against something it does not share.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

Q = gguf.GGMLQuantizationType

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ---------------------------------------------------------------- a tiny byte-level BPE vocabulary

_BYTE_CHARS = [bytes_to_unicode()[b] for b in range(256)]
_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 256 bytes, one token per merge, then three control tokens."""
    merged = [merge.replace(" ", "") for merge in _MERGES]
    tokens = _BYTE_CHARS + merged + SPECIAL_TOKENS
    types = [1] * (len(tokens) - len(SPECIAL_TOKENS)) + [3] * len(SPECIAL_TOKENS)  # 1 normal, 3 control
    return tokens, types, list(_MERGES)


def special_id(token: str) -> int:
    return tiny_vocab()[0].index(token)


# ---------------------------------------------------------------- tiny random HF models


@dataclass(frozen=True)
class TinyCase:
    """One synthetic model: its architecture, how its matrices are stored, its tokenizer flags."""

    arch: str
    matrix_type: Q
    tied: bool
    add_bos: bool
    bos: str | None
    eos: list[str]  # eos, then eot if two
    llama3_rope: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[self.matrix_type]


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny_model(case: TinyCase, seed: int = 0) -> PreTrainedModel:
    """A random model whose every weight is non-trivial and exactly representable in the case's dtype."""
    vocab = len(tiny_vocab()[0])
    common = dict(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        # Qwen3 sets head_dim apart from hidden_size / heads (128 / 4 = 32), as Qwen3-0.6B does.
        head_dim=48 if case.arch == "qwen3" else 32,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=case.tied,
    )
    if case.arch == "llama":
        # A copy: transformers adds rope_theta into the dict it is given.
        config = LlamaConfig(**common, rope_scaling=dict(LLAMA3_ROPE) if case.llama3_rope else None)
    elif case.arch == "qwen2":
        config = Qwen2Config(**common)
    else:
        config = Qwen3Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = torch.randn_like(param) * 0.2
            if name.endswith("norm.weight"):
                values += 1.0
            # Norms too, though the GGUF stores them as F32: as with a real F16/BF16 checkpoint.
            param.copy_(values.to(case.torch_dtype).float())
    return model


# ---------------------------------------------------------------- HF model -> GGUF, as llama.cpp does it

_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_LAYER_HF_TO_GGUF[rest]}"


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k reorder for its pairwise rope: per head, row i of the first half and row i of the
    second half become rows 2i and 2i+1."""
    out = np.empty_like(rows)
    per_head = rows.shape[0] // heads
    half = per_head // 2
    for h in range(heads):
        base = h * per_head
        for i in range(half):
            out[base + 2 * i] = rows[base + i]
            out[base + 2 * i + 1] = rows[base + half + i]
    return out


def llama3_freq_factors(config: PretrainedConfig) -> np.ndarray:
    """What llama.cpp stores as rope_freqs.weight: default inverse frequencies over llama3's, from transformers."""
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = config.head_dim
    default = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).double() / dim))
    return (default / scaled.double()).numpy().astype(np.float32)


def _store(writer: gguf.GGUFWriter, name: str, values: np.ndarray, qtype: Q) -> None:
    if qtype == Q.F32:
        writer.add_tensor(name, values.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, values.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)


def _writer(path: Path, arch: str, config: PretrainedConfig) -> gguf.GGUFWriter:
    """A GGUF writer with the shape metadata every architecture's file carries, from an HF config."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    return writer


def write_gguf(
    path: Path,
    model: PreTrainedModel,
    case: TinyCase,
    arch_name: str | None = None,
    overrides: dict[str, Q] | None = None,
    sampling: dict[str, float] | None = None,
) -> Path:
    """Write `model` as llama.cpp would: metadata, tokenizer, F32 norms, matrices in `case.matrix_type`
    (or per GGUF tensor name in `overrides`), llama q/k permuted. `arch_name` lies about the architecture.
    `sampling` is general.sampling.* metadata by llama.cpp's key ("temp", "top_k", "penalty_repeat", ...)."""
    config = model.config
    arch = arch_name or case.arch
    writer = _writer(path, arch, config)
    if case.arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    tokens, types, merges = tiny_vocab()
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe" if case.arch == "llama" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if case.bos is not None:
        writer.add_bos_token_id(special_id(case.bos))
    writer.add_eos_token_id(special_id(case.eos[0]))
    if len(case.eos) > 1:
        writer.add_eot_token_id(special_id(case.eos[1]))
    writer.add_add_bos_token(case.add_bos)
    writer.add_chat_template(CHATML_TEMPLATE)
    for key, value in (sampling or {}).items():
        getattr(writer, f"add_sampling_{key}")(value)

    for hf, param in model.state_dict().items():
        if hf == "lm_head.weight" and case.tied:
            continue
        name = gguf_name(hf)
        values = param.detach().float().numpy()
        if case.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            values = llama_cpp_permute(values, heads)
        qtype = (overrides or {}).get(name, case.matrix_type if values.ndim == 2 else Q.F32)
        _store(writer, name, values, qtype)
    if case.llama3_rope:
        writer.add_tensor("rope_freqs.weight", llama3_freq_factors(model.config))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_raw_tensor_gguf(path: Path, name: str, raw: np.ndarray, qtype: Q) -> Path:
    """A GGUF holding one tensor given as its raw bytes (rows x bytes-per-row) of type `qtype`."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if qtype in (Q.F32, Q.F16):
        writer.add_tensor(name, raw)
    else:
        writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- tiny mixture-of-experts models -> GGUF


def tiny_moe_model(arch: str, seed: int = 0) -> PreTrainedModel:
    """A random Qwen3-MoE (`arch` "qwen3moe") or Mixtral ("llama", as llama.cpp files it): 2 layers,
    top-2 routing over 8 / 4 experts, weights N(0, 0.2) and norms around 1."""
    common = dict(
        vocab_size=len(tiny_vocab()[0]),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    if arch == "qwen3moe":
        # head_dim apart from hidden / heads (16), as in Qwen3; the dense width unused, as llama.cpp has it.
        config: PretrainedConfig = Qwen3MoeConfig(
            **common, head_dim=24, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
            norm_topk_prob=True,
        )  # fmt: skip
    elif arch == "llama":
        config = MixtralConfig(**common, head_dim=16, intermediate_size=48, num_local_experts=4)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def hf_checkpoint(model: PreTrainedModel, out: Path) -> dict[str, torch.Tensor]:
    """`model` saved as an HF directory at `out`, and the tensors of its model.safetensors: per-expert
    tensors as HF checkpoints have them (transformers 5 stacks experts in memory, not on disk)."""
    model.save_pretrained(out)
    return load_file(out / "model.safetensors")


# llama.cpp's name for each expert projection, by the HF expert module's.
_EXPERT_TO_GGUF = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
                   "w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}  # fmt: skip
_MOE_LAYER = re.compile(
    r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.(gate|experts\.(\d+)\.(\w+))\.weight"
)


def moe_gguf_tensors(
    tensors: dict[str, torch.Tensor], config: PretrainedConfig, arch: str, split_experts: bool = False
) -> dict[str, np.ndarray]:
    """An HF MoE checkpoint's tensors by GGUF name, as llama.cpp's convert_hf_to_gguf.py makes them: the
    router as ffn_gate_inp, each projection's experts stacked into one [experts, ...] ffn_*_exps tensor
    (or, as older Mixtral files have them, one ffn_*.<e> tensor per expert), llama's q/k permuted."""
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for hf, tensor in tensors.items():
        values = tensor.float().numpy()
        match = _MOE_LAYER.fullmatch(hf)
        if match is None:
            name = gguf_name(hf)
            if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
                heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
                values = llama_cpp_permute(values, heads)
            out[name] = values
        elif match[2] == "gate":
            out[f"blk.{match[1]}.ffn_gate_inp.weight"] = values
        elif split_experts:
            out[f"blk.{match[1]}.{_EXPERT_TO_GGUF[match[4]]}.{match[3]}.weight"] = values
        else:
            merged = f"blk.{match[1]}.{_EXPERT_TO_GGUF[match[4]]}_exps.weight"
            experts.setdefault(merged, {})[int(match[3])] = values
    for name, by_expert in experts.items():
        out[name] = np.stack([by_expert[e] for e in range(len(by_expert))])
    return out


def write_moe_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    config: PretrainedConfig,
    arch: str,
    matrix_type: Q = Q.F32,
    overrides: dict[str, Q] | None = None,
    metadata: dict[str, int | None] | None = None,
) -> Path:
    """Write GGUF-named `tensors` of a tiny MoE model with llama.cpp's metadata for `arch`: matrices (and
    stacked experts) in `matrix_type` or per name in `overrides`, norms F32. `metadata` replaces the
    expert keys ("expert_count", "expert_used_count", "expert_feed_forward_length"; None leaves one out)."""
    num_experts = config.num_experts if arch == "qwen3moe" else config.num_local_experts
    experts = {"expert_count": num_experts, "expert_used_count": config.num_experts_per_tok}
    if arch == "qwen3moe":
        experts["expert_feed_forward_length"] = config.moe_intermediate_size
    experts.update(metadata or {})
    writer = _writer(path, arch, config)
    for key, value in experts.items():
        if value is not None:
            writer.add_uint32(f"{arch}.{key}", value)
    tokens, types, merges = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(special_id("<|endoftext|>"))
    writer.add_eos_token_id(special_id("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    for name, values in tensors.items():
        _store(writer, name, values, (overrides or {}).get(name, matrix_type if values.ndim >= 2 else Q.F32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- llama.cpp block layouts, decoded by hand


def _f16(raw: bytes, at: int) -> float:
    return struct.unpack_from("<e", raw, at)[0]


def _k_scale_min(scales: bytes, j: int) -> tuple[int, int]:
    """The 6-bit scale and min of sub-block j in a Q4_K/Q5_K 12-byte scales field."""
    if j < 4:
        return scales[j] & 63, scales[j + 4] & 63
    sc = (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4)
    mn = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)
    return sc, mn


def decode_block(block: bytes, qtype: Q) -> list[float]:
    """One block of `qtype` decoded element by element, following ggml's block structs."""
    out: list[float] = []
    if qtype == Q.Q8_0:  # f16 d; int8 q[32]
        d = _f16(block, 0)
        return [d * struct.unpack_from("b", block, 2 + i)[0] for i in range(32)]
    if qtype == Q.Q4_0:  # f16 d; 16 bytes: low nibbles are elements 0..15, high nibbles 16..31
        d = _f16(block, 0)
        qs = block[2:18]
        return [d * ((b & 0x0F) - 8) for b in qs] + [d * ((b >> 4) - 8) for b in qs]
    if qtype == Q.Q4_1:  # f16 d, f16 m; 16 bytes as in Q4_0, unsigned
        d, m = _f16(block, 0), _f16(block, 2)
        qs = block[4:20]
        return [d * (b & 0x0F) + m for b in qs] + [d * (b >> 4) + m for b in qs]
    if qtype == Q.Q4_K:  # f16 d, f16 dmin, scales[12], qs[128]; 8 sub-blocks of 32
        d, dmin, scales, qs = _f16(block, 0), _f16(block, 2), block[4:16], block[16:144]
        for chunk in range(4):  # 64 elements: low nibbles of 32 bytes, then their high nibbles
            q = qs[32 * chunk : 32 * chunk + 32]
            for sub, shift in ((2 * chunk, 0), (2 * chunk + 1, 4)):
                sc, mn = _k_scale_min(scales, sub)
                out += [d * sc * ((b >> shift) & 0x0F) - dmin * mn for b in q]
        return out
    if qtype == Q.Q5_K:  # f16 d, f16 dmin, scales[12], qh[32], qs[128]
        d, dmin, scales, qh, qs = _f16(block, 0), _f16(block, 2), block[4:16], block[16:48], block[48:176]
        for chunk in range(4):
            q = qs[32 * chunk : 32 * chunk + 32]
            for half, shift in ((0, 0), (1, 4)):
                sub = 2 * chunk + half
                high_bit = 2 * chunk + half  # bit of qh[l] that holds the fifth bit
                sc, mn = _k_scale_min(scales, sub)
                out += [
                    d * sc * (((b >> shift) & 0x0F) + 16 * ((qh[pos] >> high_bit) & 1)) - dmin * mn
                    for pos, b in enumerate(q)
                ]
        return out
    if qtype == Q.Q6_K:  # ql[128], qh[64], int8 scales[16], f16 d
        ql, qh = block[0:128], block[128:192]
        scales = struct.unpack_from("16b", block, 192)
        d = _f16(block, 208)
        values = [0.0] * 256
        for n in range(2):  # two halves of 128 elements
            for pos in range(32):
                lo_a, lo_b, hi = ql[64 * n + pos], ql[64 * n + pos + 32], qh[32 * n + pos]
                quads = (
                    (lo_a & 0x0F) | (((hi >> 0) & 3) << 4),
                    (lo_b & 0x0F) | (((hi >> 2) & 3) << 4),
                    (lo_a >> 4) | (((hi >> 4) & 3) << 4),
                    (lo_b >> 4) | (((hi >> 6) & 3) << 4),
                )
                for k, q in enumerate(quads):
                    scale = scales[8 * n + pos // 16 + 2 * k]
                    values[128 * n + 32 * k + pos] = d * scale * (q - 32)
        return values
    raise ValueError(qtype)


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for `n_blocks` blocks, with every f16 scale set to a finite, moderate value."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    f16_offsets = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
    for offset in f16_offsets[qtype]:
        scale = rng.uniform(0.01, 0.1, size=n_blocks).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


def decode_rows(raw: np.ndarray, qtype: Q, cols: int) -> np.ndarray:
    """Rows of raw blocks decoded with `decode_block`, as float64."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(raw.shape[0], -1, type_size)
    out = np.array(
        [[v for blk in row for v in decode_block(bytes(blk), qtype)] for row in rows], dtype=np.float64
    )
    assert out.shape[1] == cols == rows.shape[1] * block_size
    return out
