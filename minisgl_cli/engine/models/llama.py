"""The Llama-family decoder: Llama 2/3.x, SmolLM2, Mistral, Qwen2, Qwen3, and the mixture-of-experts
Qwen3-MoE (Qwen3's attention) and Mixtral (Mistral's attention).

These differ only in flags that ModelConfig derives from the HF config: Qwen2 adds a bias to the q/k/v
projection (`qkv_bias`), Qwen3 normalises q and k per head before rope (`qk_norm`), Llama 3.1 scales
rope frequencies (`rope_scaling`), the MoE models swap the MLP of their sparse layers for a SparseMoE
(`config.moe`). So one implementation serves them all instead of near-copies.

Every module takes the whole model's config and the TP group, and holds its rank's share: whole query
heads (KV heads split alike, or replicated when fewer than the ranks), a slice of the MLP width and of the
vocab. Per-head norms (Qwen3's q_norm/k_norm) and the layer norms are replicated.
"""

from __future__ import annotations

import torch
from torch import nn

from minisgl_cli.engine.attention.base import AttentionBackend
from minisgl_cli.engine.distributed import TPGroup
from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.fused_rope_store import can_fuse, qkv_rope_store
from minisgl_cli.engine.layers.activation import silu_and_mul
from minisgl_cli.engine.layers.embedding import Embedding, LMHead
from minisgl_cli.engine.layers.linear import MergedLinear, RowParallelLinear
from minisgl_cli.engine.layers.moe import SparseMoE
from minisgl_cli.engine.layers.rmsnorm import RMSNorm
from minisgl_cli.engine.layers.rope import RotaryEmbedding
from minisgl_cli.engine.models.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, tp: TPGroup) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = tp.shard(config.num_heads).size
        self.num_kv_heads = tp.shard(config.num_kv_heads).size
        self.head_dim = config.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size,
            {"q": config.num_heads, "k": config.num_kv_heads, "v": config.num_kv_heads},
            bias=config.qkv_bias,
            tp=tp,
            unit=config.head_dim,
        )
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, tp=tp)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, attn: AttentionBackend
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if can_fuse(qkv, self.head_dim, attn.kv_pool.dtype):
            # One kernel for the norms, rope, q's layout and the K/V store (fused_rope_store.py).
            norm = None
            if self.q_norm is not None and self.k_norm is not None:
                norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
            q = qkv_rope_store(
                qkv,
                positions,
                rope.cos_sin,
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                slots=attn.out_slots,
                k_cache=attn.kv_pool.k(self.layer_id),
                v_cache=attn.kv_pool.v(self.layer_id),
                q_norm=norm,
            )
            o = attn.attend(q, self.layer_id)
        else:
            q, k, v = qkv.split(self.qkv_proj.out_sizes, dim=-1)
            q = q.view(-1, self.num_heads, self.head_dim)
            k = k.view(-1, self.num_kv_heads, self.head_dim)
            v = v.view(-1, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rope(positions, q, k)
            o = attn.forward(q, k, v, self.layer_id)
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": size, "up": size}, tp=tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, tp: TPGroup) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_id, tp)
        self.mlp: MLP | SparseMoE
        if config.moe is not None and config.is_moe_layer(layer_id):
            self.mlp = SparseMoE(config.moe, config.hidden_size, tp)
        else:
            self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm residual block; the residual add is deferred into the next norm (fusable)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add_and_norm(x, residual)
        x = self.self_attn(x, positions, rope, attn)
        x, residual = self.post_attention_layernorm.add_and_norm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_context_len: int, tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, max_context_len, config.rope_theta, config.rope_scaling
        )

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, batch.positions, self.rotary_emb, attn)
        assert residual is not None
        x, _ = self.norm.add_and_norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # Checkpoint sub-module name -> (our fused sub-module, its part): the weight loader's renaming table.
    # Mixtral's experts call gate/up/down w1/w3/w2; an expert's parts are also prefixed by its index
    # (see layers/moe.py).
    packed_modules: dict[str, tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
        "w1": ("gate_up_proj", "gate"),
        "w3": ("gate_up_proj", "up"),
    }
    # Checkpoint sub-module name -> ours, where only the name differs.
    renamed_modules: dict[str, str] = {"block_sparse_moe": "mlp", "w2": "down_proj"}

    def __init__(self, config: ModelConfig, max_context_len: int, tp: TPGroup) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_context_len, tp)
        tied_to = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tp, tied_to=tied_to)

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Logits [B, vocab] (activation dtype) of each sequence's last new token (the lm head runs on those rows
        only)."""
        hidden = self.model(batch, attn)
        return self.lm_head(hidden[batch.logits_indices])
