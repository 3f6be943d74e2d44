"""The sampler's Gumbel-max draw as one Triton kernel (CUDA): same hash, same token as sampling.py's PyTorch code.

`RandomRows.draw` in PyTorch builds several [S, V] int64 temporaries for the hash and then reads them again for
the logs and the argmax: at 256 rows and a 152k vocabulary, a few hundred MB of traffic per step. Here one program
per row streams its logits once, hashes each token id in registers, and keeps a running (score, index) maximum.
It serves rows that need no sorting (temperature only); top-k, top-p and min-p rows keep the PyTorch path.

The hash is sampling.mix32 in uint32 arithmetic (the PyTorch code masks int64 products to 32 bits, which is the
same wrap-around), so both paths draw the same uniforms and pick the same token (up to a last-ulp difference in
`log`, which can only matter at an exact tie).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    x = x ^ (x >> 15)
    return x


# seed_steps is a view at an offset into the step's parameters; temperatures may be one too.
@triton.jit(do_not_specialize_on_alignment=["seed_steps_ptr", "temp_ptr"])
def _gumbel_argmax_kernel(
    logits_ptr, stride, seed_steps_ptr, seed_stride, temp_ptr, out_ptr, vocab_size, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    # sampling.row_keys, in registers (the PyTorch code spends a few dozen kernel launches on it).
    lo = tl.load(seed_steps_ptr + row * seed_stride).to(tl.uint32)
    hi = tl.load(seed_steps_ptr + row * seed_stride + 1).to(tl.uint32)
    step = tl.load(seed_steps_ptr + row * seed_stride + 2).to(tl.uint32)
    k1 = _mix32(_mix32(_mix32(lo) ^ hi) ^ step)
    k2 = _mix32(k1 ^ 0x5BD1E995)
    temp = tl.load(temp_ptr + row)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, vocab_size, BLOCK):
        ids = start + tl.arange(0, BLOCK)
        valid = ids < vocab_size
        x = tl.load(logits_ptr + row * stride + ids, mask=valid, other=float("-inf")).to(tl.float32)
        h = _mix32(ids.to(tl.uint32) ^ k1)
        h = _mix32(h + k2)
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        score = x / temp - tl.log(-tl.log(u))  # divided, as the PyTorch path does: same rounding
        score = tl.where(valid, score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, ids, best_idx)
    top = tl.max(best, axis=0)
    # The lowest index among equal maxima, as torch.argmax picks.
    idx = tl.min(tl.where(best == top, best_idx, vocab_size), axis=0)
    tl.store(out_ptr + row, idx.to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, seed_steps: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """argmax(logits / T + Gumbel(hash(row_keys(seed, step), token id))) per row: logits [S, V] float32,
    seed_steps [S, 3] int64 (seed's low and high 32 bits, step; rows may be strided), temperatures [S, 1]
    float32 -> token ids [S] int64."""
    rows, vocab = logits.shape
    logits = logits.contiguous()
    if seed_steps.stride(1) != 1:
        seed_steps = seed_steps.contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    temps = temperatures.reshape(-1).contiguous()
    _gumbel_argmax_kernel[(rows,)](
        logits, logits.stride(0), seed_steps, seed_steps.stride(0), temps, out, vocab, BLOCK=_BLOCK
    )
    return out


def warm_up(vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile the kernel now (about a second, once per process) rather than in the first sampled step."""
    logits = torch.zeros(1, vocab_size, dtype=dtype, device=device)
    seed_steps = torch.zeros(1, 4, dtype=torch.int64, device=device)[:, 1:]
    gumbel_argmax(logits, seed_steps, torch.ones(1, 1, device=device))
