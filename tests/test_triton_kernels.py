"""The Triton kernels against the code they replace: the fused q/k norm + rope + K/V store kernel
(engine/fused_rope_store.py), silu_and_mul (layers/activation.py), the Gumbel-max draw with its in-kernel
hash (engine/fused_sampling.py) and the batch-1 GEMV (layers/gemv.py).

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, in a process of its own) and are
compared with the PyTorch reference code: exactly in float32 where the arithmetic is the same ops in the same
order, within the norm's double rounding otherwise. On a GPU the rope kernel is compared in bf16 with the
unfused FlashInfer path (rmsnorm, rope, index_copy_ stores) it replaces.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from minisgl_cli.engine import fused_rope_store
from minisgl_cli.engine.kernels import next_pow2
from minisgl_cli.engine.layers import fp8
from minisgl_cli.engine.layers.rmsnorm import RMSNorm
from minisgl_cli.engine.layers.rope import RotaryEmbedding


def _interpreter_works() -> bool:
    """Triton 3.9 or later: earlier interpreters turn scalars into arrays that NumPy 2 refuses to index."""
    if importlib.util.find_spec("triton") is None:
        return False
    from importlib.metadata import version

    major, minor = (int(p) for p in version("triton").split(".")[:2])
    return (major, minor) >= (3, 9)


HAVE_TRITON = _interpreter_works()


def _case(dtype: torch.dtype, device: str, heads: tuple[int, int], head_dim: int, tokens: int, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    hq, hk = heads
    qkv = (torch.randn(tokens, (hq + 2 * hk) * head_dim, generator=g) * 2).to(dtype).to(device)
    positions = torch.randint(0, 4000, (tokens,), generator=g).to(device)
    rope = RotaryEmbedding(head_dim, 4096, 1_000_000.0).to(device)
    norms = []
    for _ in range(2):
        n = RMSNorm(head_dim, 1e-6)
        n.weight.data = (torch.rand(head_dim, generator=g) + 0.5).to(dtype)
        norms.append(n.to(device))
    num_slots = tokens * 3 + 1
    slots = torch.randperm(num_slots, generator=g)[:tokens].to(device)
    return qkv, positions, rope, norms, slots, num_slots


def _reference(qkv, positions, rope, norms, heads, head_dim, with_norm):  # type: ignore[no-untyped-def]
    hq, hk = heads
    q, k, v = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
    q = q.reshape(-1, hq, head_dim)
    k = k.reshape(-1, hk, head_dim)
    v = v.reshape(-1, hk, head_dim)
    if with_norm:
        q, k = norms[0](q), norms[1](k)
    # Copies: FlashInfer's rope works in place, and a contiguous slice (one token) would be qkv itself.
    q, k = rope(positions, q.clone(), k.clone())
    return q, k, v


def _fused(qkv, positions, rope, norms, slots, num_slots, heads, head_dim, with_norm, kv_dtype=None):  # type: ignore[no-untyped-def]
    hq, hk = heads
    k_cache = torch.full((num_slots, hk, head_dim), float("nan"), dtype=qkv.dtype, device=qkv.device)
    k_cache = k_cache.to(kv_dtype or qkv.dtype)  # (FP8 has no fill kernel)
    v_cache = k_cache.clone()
    norm = (norms[0].weight, norms[1].weight, norms[0].eps) if with_norm else None
    q = fused_rope_store.qkv_rope_store(
        qkv, positions, rope.cos_sin, num_heads=hq, num_kv_heads=hk, head_dim=head_dim,
        slots=slots, k_cache=k_cache, v_cache=v_cache, q_norm=norm,
    )  # fmt: skip
    untouched = torch.ones(num_slots, dtype=torch.bool, device=qkv.device)
    untouched[slots] = False
    # Only the given slots are written: every other one still holds its NaN poison.
    assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()
    return q, k_cache[slots], v_cache[slots]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


CPU_CASES = [(with_norm, heads, head_dim) for with_norm in (False, True)
             for heads, head_dim in (((4, 2), 64), ((2, 2), 128), ((6, 1), 16))]  # fmt: skip


def check_interpreted() -> None:
    """Every CPU case through the kernel and the reference layers. Run in a process of its own, started with
    TRITON_INTERPRET=1: Triton reads it when it is first imported (its own library functions are built then)."""
    for with_norm, heads, head_dim in CPU_CASES:
        for dtype in (torch.float32, torch.float16):
            case = _case(dtype, "cpu", heads, head_dim, tokens=7, seed=head_dim + with_norm)
            qkv, positions, rope, norms, slots, num_slots = case
            want = _reference(qkv, positions, rope, norms, heads, head_dim, with_norm)
            got = _fused(qkv, positions, rope, norms, slots, num_slots, heads, head_dim, with_norm)
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape and g.dtype == w.dtype
                if dtype == torch.float32 and not with_norm:
                    assert torch.equal(g, w), (with_norm, heads, head_dim, dtype)
                else:
                    # float32: rsqrt and the sum's order; float16: the reference rounds the norm before its
                    # weight multiply.
                    limit = 1e-6 if dtype == torch.float32 else 2e-3
                    assert _rel(g, w) < limit, (with_norm, heads, head_dim, dtype, _rel(g, w))


def _fp8_equal_but_carries(got: torch.Tensor, exact: torch.Tensor) -> None:
    """`got` (FP8) equals `exact` rounded to e4m3 (saturated at 448), except where Triton 3.9's interpreter
    rounds wrongly: a rounding that carries into the next power of two (1.95 -> 1.0, not 2.0) and subnormals
    (below 2^-6). The GPU rounds those right: test_gpu_fp8_store_equals_the_pool_store checks every value."""
    from minisgl_cli.engine.layers.fp8 import FP8, FP8_MAX

    want = exact.clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    mag = want.abs()
    carries = (mag > exact.abs()) & (torch.frexp(mag).mantissa == 0.5)
    skip = carries | ((mag < 2**-6) & (exact != 0))
    assert torch.equal(got.float()[~skip], want[~skip]) and skip.float().mean() < 0.15


def check_interpreted_fp8_store() -> None:
    """FP8 caches: k and v land as KVPool.store writes them (saturated at 448, rounded to e4m3), q as
    before. One token is scaled past 448 so the saturation shows."""
    from minisgl_cli.engine.layers.fp8 import FP8, FP8_MAX

    for with_norm in (False, True):
        heads, head_dim = (4, 2), 64
        qkv, positions, rope, norms, slots, num_slots = _case(
            torch.float32, "cpu", heads, head_dim, 7, seed=9
        )
        qkv[0] *= 1000
        q_want, k_want, v_want = _reference(qkv, positions, rope, norms, heads, head_dim, with_norm)
        q, k, v = _fused(
            qkv, positions, rope, norms, slots, num_slots, heads, head_dim, with_norm, kv_dtype=FP8
        )
        assert k.dtype == FP8 and v.dtype == FP8 and float(v.float().abs().max()) == FP8_MAX
        _fp8_equal_but_carries(v, v_want)
        _fp8_equal_but_carries(k, k_want)  # (with the norm: 4e-8 apart before rounding, none crosses here)
        assert torch.equal(q, q_want) if not with_norm else _rel(q, q_want) < 1e-6


def check_interpreted_silu_and_sampling() -> None:
    from minisgl_cli.engine.fused_sampling import gumbel_argmax
    from minisgl_cli.engine.layers import activation
    from minisgl_cli.engine.sampling import row_keys, seeded_uniform

    g = torch.Generator().manual_seed(3)
    for rows, width in ((1, 1500), (5, 64)):
        x = torch.randn(rows, 2 * width, generator=g)
        out = torch.empty(rows, width)
        activation._kernel()[(rows, -(-width // activation._BLOCK))](x, out, width, BLOCK=activation._BLOCK)
        gate, up = x.chunk(2, dim=-1)
        assert _rel(out, torch.nn.functional.silu(gate) * up) < 1e-6
    for vocab in (384, 5000):
        seeds = torch.randint(0, 2**32, (16, 2), generator=g, dtype=torch.int64)
        steps = torch.randint(0, 5000, (16, 1), generator=g, dtype=torch.int64)
        # A strided view, as RandomRows holds it: [top_k | seed low, seed high, step].
        seed_steps = torch.cat([torch.zeros(16, 1, dtype=torch.int64), seeds, steps], dim=1)[:, 1:]
        logits = torch.randn(16, vocab, generator=g) * 3
        temps = torch.rand(16, 1, generator=g) + 0.1
        u = seeded_uniform(row_keys(seeds, steps[:, 0]), vocab)
        want = (logits / temps - (-u.log()).log()).argmax(-1)
        assert torch.equal(gumbel_argmax(logits, seed_steps, temps), want)


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton 3.9+ (its CPU interpreter)")
def test_interpreted_kernel_equals_the_reference_layers() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{len(CPU_CASES)} cases equal"


def test_shapes_the_kernel_cannot_take_are_refused() -> None:
    qkv = torch.zeros(2, 3 * 2 * 48)
    cache = torch.zeros(4, 2, 48)
    assert not fused_rope_store.can_fuse(qkv, 48, torch.float32)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        fused_rope_store.qkv_rope_store(
            qkv, torch.zeros(2, dtype=torch.int64), torch.zeros(8, 48), num_heads=2, num_kv_heads=2,
            head_dim=48, slots=torch.zeros(2, dtype=torch.int64), k_cache=cache, v_cache=cache,
        )  # fmt: skip
    with pytest.raises(ValueError, match="must hold it"):
        fused_rope_store.qkv_rope_store(
            torch.zeros(2, 3 * 2 * 64, dtype=torch.float16), torch.zeros(2, dtype=torch.int64),
            torch.zeros(8, 64), num_heads=2, num_kv_heads=2, head_dim=64,
            slots=torch.zeros(2, dtype=torch.int64), k_cache=torch.zeros(4, 2, 64), v_cache=torch.zeros(4, 2, 64),
        )  # fmt: skip


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize(
    ("heads", "head_dim", "tokens"), [((16, 8), 128, 256), ((32, 8), 128, 1), ((8, 2), 64, 3000)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernel_equals_the_unfused_kernels(
    with_norm: bool, heads: tuple[int, int], head_dim: int, tokens: int, dtype: torch.dtype
) -> None:
    from minisgl_cli.engine.kernels import use_kernels

    case = _case(dtype, "cuda", heads, head_dim, tokens, seed=tokens)
    qkv, positions, rope, norms, slots, num_slots = case
    assert use_kernels(qkv), "the unfused reference here is FlashInfer's kernel path"
    want = _reference(qkv, positions, rope, norms, heads, head_dim, with_norm)
    got = _fused(qkv, positions, rope, norms, slots, num_slots, heads, head_dim, with_norm)
    for g, w in zip(got, want, strict=True):
        # The same float32 arithmetic and roundings as the two FlashInfer kernels; rsqrt and the sum's order
        # may differ in the last bit, which a rounding to bf16 then rarely shows.
        assert _rel(g, w) < (1e-3 if with_norm else 2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_norm", [False, True])
def test_gpu_fp8_store_equals_the_pool_store(with_norm: bool) -> None:
    """Into an FP8 cache the kernel writes what KVPool.store writes for the unfused k and v (the bf16
    values saturated and rounded to e4m3), up to the norm's last-bit differences."""
    from minisgl_cli.engine.layers.fp8 import FP8, FP8_MAX

    heads, head_dim = (32, 8), 128
    qkv, positions, rope, norms, slots, num_slots = _case(
        torch.bfloat16, "cuda", heads, head_dim, 300, seed=2
    )
    qkv[0] *= 1000
    q_want, k_want, v_want = _reference(qkv, positions, rope, norms, heads, head_dim, with_norm)
    q, k, v = _fused(qkv, positions, rope, norms, slots, num_slots, heads, head_dim, with_norm, kv_dtype=FP8)
    assert torch.equal(v.float(), v_want.float().clamp(-FP8_MAX, FP8_MAX).to(FP8).float())
    k_fp8 = k_want.float().clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    if with_norm:
        assert _rel(k.float(), k_fp8) < 2e-2 and _rel(q, q_want) < 1e-3
    else:
        assert torch.equal(k.float(), k_fp8) and _rel(q, q_want) < 2e-5


def check_interpreted_gemv() -> None:
    """Shapes with a ragged last block of rows and of K, with and without a bias, against float64."""
    from minisgl_cli.engine.layers.gemv import gemv

    g = torch.Generator().manual_seed(5)
    for n, k, with_bias, block_k in ((37, 300, False, 128), (64, 2048, True, 1024), (5, 16, True, 256)):
        x = torch.randn(1, k, generator=g)
        w = torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g) if with_bias else None
        want = x.double() @ w.double().T + (0 if b is None else b.double())
        got = gemv(x, w, b, block_k=block_k)
        assert got.shape == (1, n) and got.dtype == torch.float32
        assert float((got.double() - want).abs().max()) < 1e-4 * k**0.5
        # An FP8 weight with its row scales: the same sum over the FP8 values, scaled once per row.
        q, scale = fp8.quantize_rows(w)
        want = x.double() @ (q.double() * scale.double()[:, None]).T + (0 if b is None else b.double())
        got = gemv(x, q, b, block_k=block_k, scale=scale)
        assert float((got.double() - want).abs().max()) < 1e-4 * k**0.5


def check_interpreted_token_quantization() -> None:
    """The Triton per-token quantization against the torch expression it replaces: the same float32
    arithmetic, so the same scales and FP8 values (a zero row and rows longer than one block included)."""
    g = torch.Generator().manual_seed(6)
    for m, k in ((3, 300), (2, 5000)):
        x = torch.randn(m, k, generator=g) * 10
        x[0] = 0
        _, want_scale = fp8.quantize_tokens(x)  # the CPU path: torch
        q = torch.empty(m, k, dtype=fp8.FP8)
        scale = torch.empty(m, 1)
        fp8._quantize_kernel()[(m,)](x, q, scale, k, x.stride(0), BLOCK=min(next_pow2(k), 4096))
        assert torch.equal(scale, want_scale)
        _fp8_equal_but_carries(q, x / scale)


if __name__ == "__main__":
    check_interpreted()
    check_interpreted_fp8_store()
    check_interpreted_silu_and_sampling()
    check_interpreted_gemv()
    check_interpreted_token_quantization()
    print(f"{len(CPU_CASES)} cases equal")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_gpu_silu_and_mul_equals_pytorch(rows: int) -> None:
    from minisgl_cli.engine.layers.activation import silu_and_mul

    x = torch.randn(rows, 2 * 14336, device="cuda").to(torch.bfloat16) * 3
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(x), torch.nn.functional.silu(gate) * up)


def test_the_gemv_serves_only_one_row_of_a_weight_no_wider_than_tall() -> None:
    from minisgl_cli.engine.layers import gemv

    # On the CPU it never serves: F.linear is the path and the reference.
    assert not gemv.serves(torch.zeros(1, 64), torch.zeros(32, 64))
    with pytest.raises(ValueError, match="one contiguous row"):
        gemv.gemv(torch.zeros(2, 64), torch.zeros(32, 64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("n", "k", "with_bias"), [(4096, 4096, False), (4096, 14336, False), (1000, 3000, True)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gemv_equals_cublas(n: int, k: int, with_bias: bool, dtype: torch.dtype) -> None:
    from minisgl_cli.engine.layers import gemv

    x = torch.randn(1, k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    assert gemv.serves(x, w) and not gemv.serves(torch.cat([x, x]), w) and not gemv.serves(x, w[:, : n // 2])
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    # Both round a float32 sum once; only the order of the sum differs, so both sit within rounding of float64.
    for got in (gemv.linear(x, w, b), torch.nn.functional.linear(x, w, b)):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)
