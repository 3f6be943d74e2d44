"""Layers against hand computations in float64."""

from __future__ import annotations

import math

import pytest
import torch

from minisgl_cli.engine.layers.activation import silu_and_mul
from minisgl_cli.engine.layers.linear import MergedLinear
from minisgl_cli.engine.layers.rmsnorm import RMSNorm
from minisgl_cli.engine.layers.rope import RotaryEmbedding, rope_inv_freq
from minisgl_cli.engine.models.config import Llama3RopeScaling


def test_rmsnorm_matches_formula() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.randn(8)
    x = torch.randn(3, 8)
    want = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), want, rtol=1e-6, atol=1e-6)


def test_rmsnorm_add_and_norm_returns_sum_and_keeps_dtype() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.data = torch.rand(16) + 0.5
    x, residual = torch.randn(4, 16), torch.randn(4, 16)
    normed, summed = norm.add_and_norm(x, residual)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(normed, norm(x + residual))
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_silu_and_mul() -> None:
    x = torch.randn(5, 12, dtype=torch.float64)
    gate, up = x[:, :6], x[:, 6:]
    torch.testing.assert_close(silu_and_mul(x), gate / (1 + torch.exp(-gate)) * up)


def test_rope_rotates_each_half_pair_by_position_times_frequency() -> None:
    torch.manual_seed(0)
    head_dim, theta = 8, 10000.0
    rope = RotaryEmbedding(head_dim, max_positions=64, theta=theta)
    positions = torch.tensor([0, 1, 7, 63])
    q, k = torch.randn(4, 3, head_dim), torch.randn(4, 1, head_dim)
    got_q, got_k = rope(positions, q, k)
    for x, got in ((q, got_q), (k, got_k)):
        for t, pos in enumerate(positions.tolist()):
            for i in range(head_dim // 2):
                angle = pos * theta ** (-2 * i / head_dim)
                a, b = x[t, :, i].double(), x[t, :, i + head_dim // 2].double()
                # float32 angles: ~1e-5 absolute error at position 63 is what float32 can do.
                close = {"rtol": 1e-5, "atol": 2e-5}
                want_a, want_b = (
                    a * math.cos(angle) - b * math.sin(angle),
                    b * math.cos(angle) + a * math.sin(angle),
                )
                torch.testing.assert_close(got[t, :, i].double(), want_a, **close)
                torch.testing.assert_close(got[t, :, i + head_dim // 2].double(), want_b, **close)


def test_rope_position_zero_is_identity_and_norm_preserved() -> None:
    rope = RotaryEmbedding(16, max_positions=32, theta=500000.0)
    q = torch.randn(2, 4, 16)
    q0, _ = rope(torch.tensor([0, 0]), q, q)
    torch.testing.assert_close(q0, q)
    q9, _ = rope(torch.tensor([9, 31]), q, q)
    torch.testing.assert_close(q9.norm(dim=-1), q.norm(dim=-1))


def _llama3_inv_freq_by_hand(head_dim: int, theta: float, s: Llama3RopeScaling) -> list[float]:
    """The three cases of Llama 3.1's rule, written out per frequency."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / s.factor)
        else:
            t = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - t) * freq / s.factor + t * freq)
    return out


@pytest.mark.parametrize(
    ("head_dim", "theta", "scaling"),
    [
        (128, 500000.0, Llama3RopeScaling(8.0, 1.0, 4.0, 8192)),  # Llama 3.1
        (64, 500000.0, Llama3RopeScaling(32.0, 1.0, 4.0, 8192)),  # Llama 3.2
        (16, 10000.0, Llama3RopeScaling(4.0, 1.0, 4.0, 64)),  # small: every case occurs
    ],
)
def test_llama3_rope_scaling_matches_hand_computation(
    head_dim: int, theta: float, scaling: Llama3RopeScaling
) -> None:
    got = rope_inv_freq(head_dim, theta, scaling)
    want = torch.tensor(_llama3_inv_freq_by_hand(head_dim, theta, scaling), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    unscaled = rope_inv_freq(head_dim, theta)
    # All three regimes occur: kept, divided by factor, and strictly in between.
    assert (got == unscaled).any()
    assert torch.isclose(got, unscaled / scaling.factor).any()
    between = (got < unscaled) & (got > unscaled / scaling.factor)
    assert between.any()


def test_merged_linear_shards_are_consecutive_row_ranges() -> None:
    layer = MergedLinear(4, {"q": 6, "k": 2, "v": 2}, bias=True)
    assert layer.weight.shape == (10, 4) and layer.bias is not None and layer.bias.shape == (10,)
    assert layer.shards == {"q": (0, 6), "k": (6, 2), "v": (8, 2)}
    layer.shard(layer.weight, "k").fill_(3.0)
    assert (layer.weight[6:8] == 3.0).all()
    x = torch.randn(2, 4)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


# ---- FlashInfer kernels against the PyTorch path (CUDA only)

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _both_paths(monkeypatch: pytest.MonkeyPatch, fn):  # type: ignore[no-untyped-def]
    """fn() with the FlashInfer kernels, then with the PyTorch code (kernels switched off)."""
    from minisgl_cli.engine import kernels

    assert kernels.flashinfer() is not None, "FlashInfer must load on a GPU machine"
    fast = fn()
    monkeypatch.setattr(kernels, "ENABLED", False)
    slow = fn()
    monkeypatch.setattr(kernels, "ENABLED", True)
    return fast, slow


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dim", [64, 128, 4096])
def test_gpu_rmsnorm_kernels_match_torch(monkeypatch: pytest.MonkeyPatch, dim: int) -> None:
    torch.manual_seed(dim)
    norm = RMSNorm(dim, eps=1e-6).to(CUDA, torch.bfloat16)
    norm.weight.data = (torch.rand(dim, device=CUDA) + 0.5).to(torch.bfloat16)
    # Strided rows, as q/k heads sliced out of a fused projection are.
    x = torch.randn(37, 3 * dim, device=CUDA, dtype=torch.bfloat16)[:, dim : 2 * dim]
    fast, slow = _both_paths(monkeypatch, lambda: norm(x))
    assert _rel(fast, slow) < 1e-2
    h, r = torch.randn(2, 37, dim, device=CUDA, dtype=torch.bfloat16)
    (fo, fr), (so, sr) = _both_paths(monkeypatch, lambda: norm.add_and_norm(h.clone(), r.clone()))
    assert _rel(fr, sr) < 1e-2 and _rel(fo, so) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_gpu_silu_and_mul_kernel_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(29, 2 * 1536, device=CUDA, dtype=torch.bfloat16)
    fast, slow = _both_paths(monkeypatch, lambda: silu_and_mul(x))
    assert fast.shape == (29, 1536) and _rel(fast, slow) < 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_rope_kernel_matches_torch(monkeypatch: pytest.MonkeyPatch, head_dim: int) -> None:
    scaling = Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    )
    rope = RotaryEmbedding(head_dim, 4096, 500000.0, scaling).to(CUDA)
    positions = torch.randint(0, 4096, (23,), device=CUDA)
    # q and k as slices of one fused qkv output (strided rows), like the attention layer passes them.
    qkv = torch.randn(23, (8 + 2 + 2) * head_dim, device=CUDA, dtype=torch.bfloat16)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = qkv.clone().split([8 * head_dim, 2 * head_dim, 2 * head_dim], dim=-1)
        q, k = rope(positions, q.view(23, 8, head_dim), k.view(23, 2, head_dim))
        return q.clone(), k.clone()

    (fq, fk), (sq, sk) = _both_paths(monkeypatch, run)
    assert _rel(fq, sq) < 1e-2 and _rel(fk, sk) < 1e-2
