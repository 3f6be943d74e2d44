"""The Triton kernels of the fused mixture-of-experts block (layers/fused_moe.py holds their launches and says
what each does). Importing this module imports Triton: fused_moe.py loads it on first use."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pick_top_k(logits, e, e_ok, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_K: tl.constexpr):  # fmt: skip
    """Router logits [R, BLOCK_E] (float32, finite in every row) -> the top k's probabilities and expert ids,
    each [R, BLOCK_K]: a float32 softmax, then k rounds of argmax in which a taken expert drops to -1 (the
    probabilities are >= 0) and, among equal probabilities, the lowest id goes first."""
    j = tl.arange(0, BLOCK_K)
    top = tl.max(logits, axis=1)
    exp = tl.where(e_ok[None, :], tl.exp(logits - top[:, None]), 0.0)
    probs = exp / tl.sum(exp, axis=1)[:, None]
    left = tl.where(e_ok[None, :], probs, -1.0)
    picked_w = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.float32)
    picked = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.int32)
    for r in tl.static_range(TOP_K):
        best = tl.max(left, axis=1)
        pick = tl.min(tl.where(left == best[:, None], e[None, :], BLOCK_E), axis=1)
        left = tl.where(e[None, :] == pick[:, None], -1.0, left)
        picked_w = tl.where(j[None, :] == r, best[:, None], picked_w)
        picked = tl.where(j[None, :] == r, pick[:, None], picked)
    if RENORMALIZE:
        picked_w = picked_w / tl.sum(picked_w, axis=1)[:, None]
    return picked_w, picked


@triton.jit
def route(logits_ptr, weights_ptr, ids_ptr, counts_ptr, ranks_ptr, T, E, BASE, LOCAL_E, TOP_K: tl.constexpr,
          RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    j = tl.arange(0, BLOCK_K)
    t_ok = t < T
    e_ok = e < E
    logits = tl.load(
        logits_ptr + t.to(tl.int64)[:, None] * E + e[None, :],
        mask=t_ok[:, None] & e_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    logits = tl.where(t_ok[:, None], logits, 0.0)  # rows past the end: finite, never stored
    picked_w, picked = pick_top_k(logits, e, e_ok, TOP_K, RENORMALIZE, BLOCK_E, BLOCK_K)
    ok = t_ok[:, None] & (j[None, :] < TOP_K)
    at = t[:, None] * TOP_K + j[None, :]
    tl.store(ids_ptr + at, picked, mask=ok)
    tl.store(weights_ptr + at, picked_w, mask=ok)
    # The old count is the pair's rank among its expert's pairs (in whatever order the atomics land). Only
    # this rank's experts [BASE, BASE + LOCAL_E) are counted (all of them without expert parallelism).
    local = picked - BASE
    ok = ok & (local >= 0) & (local < LOCAL_E)
    tl.store(ranks_ptr + at, tl.atomic_add(counts_ptr + local, 1, mask=ok), mask=ok)


@triton.jit
def align(ids_ptr, ranks_ptr, counts_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr, P, E, BASE, num_blocks,
          BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr,
          BLOCK_B: tl.constexpr):  # fmt: skip
    e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + e, mask=e < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    expert = tl.load(ids_ptr + p, mask=p_ok, other=0) - BASE  # E counts this rank's experts only
    p_ok = p_ok & (expert >= 0) & (expert < E)
    rank = tl.load(ranks_ptr + p, mask=p_ok, other=0)
    start = tl.sum(tl.where(expert[:, None] == e[None, :], starts[None, :], 0), axis=1)
    tl.store(sorted_ptr + start + rank, p, mask=p_ok)
    if pid == 0:
        for b0 in range(0, num_blocks, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            first = b * BLOCK_M
            # The block's expert: how many experts' padded runs end at or before its first row (runs of
            # absent experts are empty and count too); past the last run it is E or more, i.e. none.
            owner = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
            real_end = tl.sum(tl.where(e[None, :] == owner[:, None], starts + counts, 0), axis=1)
            rows = tl.minimum(tl.maximum(real_end - first, 0), BLOCK_M)
            b_ok = b < num_blocks
            tl.store(block_expert_ptr + b, tl.where(owner < E, owner, -1), mask=b_ok)
            tl.store(block_rows_ptr + b, tl.where(owner < E, rows, 0), mask=b_ok)


@triton.jit
def expert_gemm(a_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr, pair_weight_ptr, N, K,
                ROWS_PER_A: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    rows = tl.load(block_rows_ptr + block)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < rows
    pair = tl.load(sorted_ptr + block * BLOCK_M + m, mask=m_ok, other=0)
    a_row = (pair // ROWS_PER_A).to(tl.int64)  # gate/up read the token's row of x, down the pair's own
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * K + k[None, :]
    # The expert's [N, K] (gated: [2N, K], gate rows then up rows) read as [BLOCK_K, BLOCK_N] tiles.
    rows_of_w = 2 * N if GATED else N
    w_ptrs = w_ptr + expert.to(tl.int64) * rows_of_w * K + n.to(tl.int64)[None, :] * K + k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + k) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        if GATED:
            w_up = tl.load(w_ptrs + N * K, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_up = tl.dot(a, w_up, acc_up)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    if GATED:
        # silu_and_mul's roundings: gate and up as the GEMM's outputs, silu(gate), the product.
        gate = acc.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        out = act * acc_up.to(dtype).to(tl.float32)
    else:
        out = acc
    if WEIGHTED:
        out = out.to(dtype).to(tl.float32) * tl.load(pair_weight_ptr + pair, mask=m_ok, other=0.0)[:, None]
    tl.store(
        out_ptr + pair.to(tl.int64)[:, None] * N + n[None, :],
        out.to(dtype),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def pair_gate_up(x_ptr, w_ptr, logits_ptr, ids_ptr, weights_ptr, act_ptr, N, K, E, BASE, LOCAL_E,
                 TOP_K: tl.constexpr,
                 RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
    pair = tl.program_id(0)
    token = pair // TOP_K
    # Every program routes its token again (E logits, a few hundred cycles next to the rows it streams), so
    # no routing launch runs before this one; the first program of each pair writes the pick for token_down.
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    logits = tl.load(logits_ptr + token.to(tl.int64) * E + e, mask=e_ok, other=float("-inf")).to(tl.float32)
    picked_w, picked = pick_top_k(logits[None, :], e, e_ok, TOP_K, RENORMALIZE, BLOCK_E, BLOCK_J)
    mine = tl.arange(0, BLOCK_J)[None, :] == pair % TOP_K
    expert = tl.sum(tl.where(mine, picked, 0))
    if tl.program_id(1) == 0:
        tl.store(ids_ptr + pair, expert)
        tl.store(weights_ptr + pair, tl.sum(tl.where(mine, picked_w, 0.0)))
    expert = expert - BASE
    if (expert < 0) | (expert >= LOCAL_E):
        return  # another rank's expert (expert parallelism): token_down leaves it out
    expert = expert.to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + token.to(tl.int64) * K
    gate_rows = w_ptr + expert * 2 * N * K + n.to(tl.int64)[:, None] * K
    # [BLOCK_N, BLOCK_K] tiles of partial sums, reduced once at the end (as layers/gemv.py).
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + k) < K
        xk = tl.load(x_row + k0 + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        both = n_ok[:, None] & k_ok[None, :]
        acc += tl.load(gate_rows + k0 + k[None, :], mask=both, other=0.0).to(tl.float32) * xk
        acc_up += tl.load(gate_rows + N * K + k0 + k[None, :], mask=both, other=0.0).to(tl.float32) * xk
    dtype = act_ptr.dtype.element_ty
    gate = tl.sum(acc, axis=1).to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    up = tl.sum(acc_up, axis=1).to(dtype).to(tl.float32)
    tl.store(act_ptr + pair.to(tl.int64) * N + n, (act * up).to(dtype), mask=n_ok)


@triton.jit
def token_down(act_ptr, w_ptr, ids_ptr, weights_ptr, out_ptr, N, K, BASE, LOCAL_E, TOP_K: tl.constexpr,
               BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # One program: BLOCK_N outputs of one token over all k of its experts at once ([k, BLOCK_N, BLOCK_K]
    # tiles), so the k experts' rows stream together instead of one after another.
    token = tl.program_id(0)
    j = tl.arange(0, BLOCK_J)
    pair = token * TOP_K + j
    expert = tl.load(ids_ptr + pair, mask=j < TOP_K, other=BASE) - BASE
    j_ok = (j < TOP_K) & (expert >= 0) & (expert < LOCAL_E)  # this rank's experts only
    expert = tl.where(j_ok, expert, 0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    rows = w_ptr + expert[:, None, None] * N * K + n.to(tl.int64)[None, :, None] * K + k[None, None, :]
    acts = act_ptr + pair.to(tl.int64)[:, None, None] * K + k[None, None, :]
    rows_ok = j_ok[:, None, None] & n_ok[None, :, None]
    acc = tl.zeros((BLOCK_J, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + k < K)[None, None, :]
        a = tl.load(acts + k0, mask=j_ok[:, None, None] & k_ok, other=0.0).to(tl.float32)
        acc += tl.load(rows + k0, mask=rows_ok & k_ok, other=0.0).to(tl.float32) * a
    dtype = out_ptr.dtype.element_ty
    # Each expert's output rounded as a GEMM's would be, weighted, and the k summed in float32.
    y = tl.sum(acc, axis=2).to(dtype).to(tl.float32)
    weight = tl.load(weights_ptr + pair, mask=j_ok, other=0.0)
    total = tl.sum(y * weight[:, None], axis=0)
    tl.store(out_ptr + token.to(tl.int64) * N + n, total.to(dtype), mask=n_ok)
