"""The decode-step matmuls at small-to-medium batch on a GPU: cuBLAS, cuBLASLt and a Triton GEMM, over M rows.

    python3 scripts/gemm_bench.py [--out DIR] [--quick] [--jobs N]

For each projection of qwen3-8b, qwen3-0.6b and llama-3.1-8b (qkv, o_proj, gate_up, down) and each batch of
M rows (16 to 256), it times y = x @ w.T for a bf16 x [M, K] and weight w [N, K] three ways:

1. F.linear with torch's default BLAS (cuBLAS);
2. F.linear with torch.backends.cuda.preferred_blas_library("cublaslt") (null where that cannot be set);
3. this script's Triton GEMM (fp32 accumulation, bf16 out) over a sweep of tile shapes, warps, pipeline stages,
   the operand order (SWAP: w tile as the left operand, so the wide N side fills the tensor-core M dimension)
   and a split-K variant (fp32 partials summed by torch), each checked against F.linear before it is timed.

Each time is one call's mean in a CUDA graph that walks through enough copies of the weight (at least 512 MB,
several times the L2) that every call streams its weight from memory as a decode step does. Prints a table
per projection (us per call and TB/s of weight bytes, N*K*2 / time) and writes gemm_bench.json to DIR with
every number: each case's cuBLAS, cuBLASLt and per-config Triton times, the configs that failed and why, and
sums per M. --quick limits the run to qwen3-8b, M in (64, 128, 256) and a smaller sweep. Before timing, --jobs
processes (default 8) compile every config into Triton's on-disk cache, so compiling stays off the critical path.

The Triton kernel is importable without a GPU and runs under the CPU interpreter, e.g. from the repo root
TRITON_INTERPRET=1 python3 -c 'from scripts.gemm_bench import Config, triton_linear; ...' (check it on float32
tensors there: Triton 3.9's interpreter multiplies bf16 dot operands as their integer bit patterns).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from gemv_bench import time_us  # one CUDA-graph timer for the benchmark scripts

# (model, projection, N, K): output rows and input width of each weight at TP 1.
SHAPES = [
    ("qwen3-8b", "qkv", 6144, 4096), ("qwen3-8b", "o_proj", 4096, 4096),
    ("qwen3-8b", "gate_up", 24576, 4096), ("qwen3-8b", "down", 4096, 12288),
    ("qwen3-0.6b", "qkv", 4096, 1024), ("qwen3-0.6b", "o_proj", 1024, 2048),
    ("qwen3-0.6b", "gate_up", 6144, 1024), ("qwen3-0.6b", "down", 1024, 3072),
    ("llama-3.1-8b", "gate_up", 28672, 4096), ("llama-3.1-8b", "down", 4096, 14336),
]  # fmt: skip
ROWS = (16, 32, 64, 96, 128, 192, 256)
QUICK_MODEL = "qwen3-8b"
QUICK_ROWS = (64, 128, 256)

BLOCK_MS = (16, 32, 64, 128)
BLOCK_NS = (32, 64, 128, 256)
WARPS = (4, 8)
# (block_k, num_stages) pairs swept: deeper pipelines for the shorter K tiles.
K_STAGES = ((64, 4), (64, 5), (128, 3), (128, 4))
QUICK_K_STAGES = ((64, 4), (128, 3))
SPLITS = (2, 4)
SMEM_LIMIT = 200 * 1024  # bytes of pipelined tiles per program; the H200 gives a block at most 227 KB
MAX_TOLERANCE = 2e-2  # max |y - F.linear| / max |F.linear|
WALK_BYTES = 512 * 2**20  # weight bytes one graph replay streams, at least
MAX_WEIGHT_BYTES = 20 * 2**30  # all copies of one weight together, at most
REPS = 10


@dataclass(frozen=True)
class Config:
    """One launch of the Triton GEMM: tile shape, warps, pipeline depth, K splits and operand order."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    swap: bool = False

    def __str__(self) -> str:
        split = f"_split{self.split_k}" if self.split_k > 1 else ""
        swap = "_swap" if self.swap else ""
        return (f"bm{self.block_m}_bn{self.block_n}_bk{self.block_k}_w{self.num_warps}_s{self.num_stages}"
                f"{split}{swap}")  # fmt: skip


@functools.cache
def _kernel():  # type: ignore[no-untyped-def]
    """Built on first use, so importing this script never imports Triton or needs a GPU."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["iters"])
    def gemm(x_ptr, w_ptr, out_ptr, M, N, K, iters, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SWAP: tl.constexpr):  # fmt: skip
        # Program (m, n, s) owns out[s, m tile, n tile] over K columns [s * iters * BLOCK_K, +iters * BLOCK_K).
        # The M tiles of one N tile are adjacent in launch order, so they share its W tile through L2.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        # Rows past M or N wrap onto real rows, so the loads need no row mask; only the store is masked.
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        k0 = pid_k * iters * BLOCK_K
        rk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * K + (k0 + rk)[None, :]
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * K + (k0 + rk)[None, :]
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(iters):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = (k0 + i * BLOCK_K + rk) < K
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            if SWAP:
                acc = tl.dot(w, tl.trans(x), acc)  # [BLOCK_N, BLOCK_K] @ [BLOCK_K, BLOCK_M]
            else:
                acc = tl.dot(x, tl.trans(w), acc)  # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N]
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out = out_ptr + pid_k.to(tl.int64) * M * N
        if SWAP:
            ptrs = out + om[None, :] * N + on[:, None]
            mask = (om[None, :] < M) & (on[:, None] < N)
        else:
            ptrs = out + om[:, None] * N + on[None, :]
            mask = (om[:, None] < M) & (on[None, :] < N)
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return gemm


def triton_linear(x: torch.Tensor, w: torch.Tensor, config: Config) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T through the Triton GEMM with one launch config. With split_k > 1 each split
    writes float32 partials of its share of K and torch sums them, rounding once to x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape != (n, k) or not (x.is_contiguous() and w.is_contiguous()) or x.dtype != w.dtype:
        raise ValueError(f"need contiguous x [M, K] and w [N, K] of one dtype, got {x.shape} and {w.shape}")
    split = config.split_k
    iters = cdiv(k, config.block_k * split)
    even_k = iters * config.block_k * split == k
    if split > 1:
        out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (cdiv(m, config.block_m), cdiv(n, config.block_n), split)
    _kernel()[grid](
        x,
        w,
        out,
        m,
        n,
        k,
        iters,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        EVEN_K=even_k,
        SWAP=config.swap,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out.sum(0).to(x.dtype) if split > 1 else out


def sweep(m: int, quick: bool = False) -> list[Config]:
    """The split_k = 1 configs tried at M rows, pruned of shapes that spill, starve or overflow shared memory.

    BLOCK_M is the smallest of BLOCK_MS that holds min(M, 128) rows (more M takes two tiles). With SWAP the
    M rows are the tensor-core N dimension, which takes up to 256, so there one tile holds all M rows. For M
    of 96 or 128 both orders use one 128-row tile and SWAP is left out."""
    plain_m = next(b for b in BLOCK_MS if b >= min(m, 128))
    swap_m = min(256, max(16, 1 << (m - 1).bit_length()))
    configs = []
    for swap in (False, True):
        if swap and 64 < m <= 128:
            continue
        bm = swap_m if swap else plain_m
        for bn, (bk, stages), warps in itertools.product(
            BLOCK_NS, QUICK_K_STAGES if quick else K_STAGES, WARPS
        ):
            if swap and bn < 64:
                continue  # the W tile is the left operand: a Hopper warpgroup MMA takes 64 rows of it
            if quick and bn == 32:
                continue
            if bm * bn > 128 * 32 * warps:
                continue  # more than 128 fp32 accumulators a thread: spills
            if warps == 8 and bm * bn < 16384:
                continue  # at most 64 accumulators a thread with 4 warps: 8 warps add little
            if stages * (bm + bn) * bk * 2 > SMEM_LIMIT:
                continue
            configs.append(Config(bm, bn, bk, warps, stages, 1, swap))
    return configs


def split_variants(times: dict[Config, float], m: int, n: int, k: int, sms: int) -> list[Config]:
    """Split-K versions of the fastest timed config of each (block_n, swap), where the grid without the split
    leaves multiprocessors idle: split s is tried while the grid at s / 2 splits is under one wave and each
    split still runs at least 2 K tiles."""
    best: dict[tuple[int, bool], Config] = {}
    for cfg, us in times.items():
        key = (cfg.block_n, cfg.swap)
        if cfg.split_k == 1 and (key not in best or us < times[best[key]]):
            best[key] = cfg
    out = []
    for cfg in best.values():
        tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
        for split in SPLITS:
            if tiles * split // 2 >= sms or k // split < 2 * cfg.block_k:
                break
            out.append(replace(cfg, split_k=split))
    return out


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _compile_some(configs: list[Config]) -> int:
    """In a worker process: launch each config once on a [64, 4096] x [4096, 4096] product, which compiles
    it into Triton's on-disk cache. Every benchmarked shape specializes the kernel the same way (M, N and K
    multiples of 16, K a multiple of block_k * split_k), so the timing process then loads these binaries
    instead of compiling. Returns how many launched."""
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    done = 0
    for cfg in configs:
        try:
            triton_linear(x, w, cfg)
            done += 1
        except Exception:  # noqa: BLE001 - the timing process meets and records the same failure
            pass
    torch.cuda.synchronize()
    return done


def precompile(configs: list[Config], jobs: int) -> None:
    """Compile the configs in `jobs` processes at once (Triton compiles one kernel at a time per process).
    Best effort: whatever fails here is compiled by the timing process on first use."""
    import concurrent.futures
    import multiprocessing

    began = time.perf_counter()
    chunks = [configs[i::jobs] for i in range(jobs)]
    try:
        ctx = multiprocessing.get_context("spawn")  # CUDA is already initialized here: no fork
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            done = sum(pool.map(_compile_some, chunks))
    except Exception as e:  # noqa: BLE001
        print(f"precompile failed ({short(e)}); compiling in the timing process instead", flush=True)
        return
    print(f"precompiled {done} of {len(configs)} Triton configs in {jobs} processes, "
          f"{time.perf_counter() - began:.0f} s", flush=True)  # fmt: skip


def rel_err(y: torch.Tensor, want: torch.Tensor) -> float:
    return float((y.float() - want).abs().max() / want.abs().max())


def time_cublaslt(
    copies: list[torch.Tensor], x: torch.Tensor, want: torch.Tensor
) -> tuple[float | None, str]:
    """F.linear's time with cuBLASLt as torch's preferred BLAS, or None and why where that fails. The
    backend is read at each call, so the graph captures cuBLASLt's kernels; the previous one is restored."""
    try:
        before = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
    except Exception as e:  # noqa: BLE001 - unsupported backend or build: recorded as null
        return None, f"{type(e).__name__}: {e}"
    try:
        err = rel_err(F.linear(x, copies[0]), want)
        if not err < MAX_TOLERANCE:
            return None, f"error {err:.3g} against cuBLAS"
        return time_us(F.linear, copies, x), ""
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def short(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def bench_case(n: int, k: int, m: int, copies: list[torch.Tensor], sms: int, quick: bool) -> dict:
    """One (projection, M): cuBLAS, cuBLASLt, and every Triton config that compiles and matches F.linear."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, copies[0]).float()
    cublas = time_us(F.linear, copies, x)
    cublaslt, lt_why = time_cublaslt(copies, x, want)
    times: dict[Config, float] = {}
    failed: dict[str, str] = {}

    def attempt(cfg: Config) -> None:
        run = functools.partial(triton_linear, config=cfg)
        try:
            err = rel_err(run(x, copies[0]), want)
        except Exception as e:  # noqa: BLE001 - compile errors, out of shared memory: skip the config
            failed[str(cfg)] = short(e)
            return
        if not err < MAX_TOLERANCE:  # also catches NaN
            failed[str(cfg)] = f"error {err:.3g}"
            return
        try:
            times[cfg] = time_us(run, copies, x)
        except Exception as e:  # noqa: BLE001 - a capture that fails: record it and go on
            failed[str(cfg)] = f"timing: {short(e)}"

    for cfg in sweep(m, quick):
        attempt(cfg)
    for cfg in split_variants(times, m, n, k, sms):
        attempt(cfg)
    cublas_again = time_us(F.linear, copies, x)  # the spread between the two cuBLAS times is the noise
    best = min(times, key=times.__getitem__) if times else None
    return {
        "m": m,
        "cublas_us": cublas,
        "cublas_again_us": cublas_again,
        "cublaslt_us": cublaslt,
        "cublaslt_failed": lt_why or None,
        "triton_best": str(best) if best else None,
        "triton_best_us": times[best] if best else None,
        "triton_best_config": asdict(best) if best else None,
        "triton_us": {str(c): us for c, us in sorted(times.items(), key=lambda kv: kv[1])},
        "triton_failed": failed,
    }


def fmt(us: float | None, size: int) -> str:
    return f"{'-':>8} {'-':>5}" if us is None else f"{us:8.1f} {size / us / 1e6:5.2f}"


def print_table(model: str, proj: str, n: int, k: int, ncopies: int, rows: list[dict]) -> None:
    size = n * k * 2
    print(f"\n{model} {proj}: N {n} K {k}, {size / 1e6:.1f} MB, {ncopies} copies in the walk")
    print(f"{'M':>4}  {'cuBLAS':>8} {'TB/s':>5}  {'cuBLASLt':>8} {'TB/s':>5}  {'Triton':>8} {'TB/s':>5}  "
          f"{'speedup':>9}  best Triton config (tried, failed); times in us, speedup = cuBLAS / Triton")  # fmt: skip
    for r in rows:
        ratio = f"{r['cublas_us'] / r['triton_best_us']:8.2f}x" if r["triton_best_us"] else f"{'-':>9}"
        print(f"{r['m']:4}  {fmt(r['cublas_us'], size)}  {fmt(r['cublaslt_us'], size)}  "
              f"{fmt(r['triton_best_us'], size)}  {ratio}  {r['triton_best']} "
              f"({len(r['triton_us']) + len(r['triton_failed'])}, {len(r['triton_failed'])})", flush=True)  # fmt: skip


def summarize(cases: list[dict], rows: tuple[int, ...]) -> dict:
    """Per M, the summed time over the projections of cuBLAS, cuBLASLt, each case's best Triton config, and
    the one Triton config with the least sum among those that ran on every projection."""
    per_m = {}
    for m in rows:
        at_m = [c for c in cases if c["m"] == m]
        common = set.intersection(*(set(c["triton_us"]) for c in at_m))
        totals = {cfg: sum(c["triton_us"][cfg] for c in at_m) for cfg in common}
        one = min(totals, key=totals.__getitem__) if totals else None
        lt = [c["cublaslt_us"] for c in at_m]
        best = [c["triton_best_us"] for c in at_m]
        per_m[str(m)] = {
            "cublas_total_us": sum(c["cublas_us"] for c in at_m),
            "cublaslt_total_us": None if None in lt else sum(lt),
            "triton_best_each_total_us": None if None in best else sum(best),
            "triton_one_config": one,
            "triton_one_config_total_us": totals[one] if one else None,
        }
    wins = [
        {"model": c["model"], "proj": c["proj"], "m": c["m"], "cublas_us": c["cublas_us"],
         "cublaslt_us": c["cublaslt_us"], "triton_us": c["triton_best_us"], "config": c["triton_best"]}
        for c in cases
        if c["triton_best_us"] and c["triton_best_us"] < 0.97 * min(c["cublas_us"], c["cublaslt_us"] or 1e30)
    ]  # fmt: skip
    return {"per_m": per_m, "triton_wins_by_3pct": wins}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for gemm_bench.json (default .)")
    ap.add_argument("--quick", action="store_true", help="qwen3-8b only, M in (64, 128, 256), fewer configs")
    ap.add_argument(
        "--jobs", type=int, default=8, help="processes compiling the Triton configs first (0: none)"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemm_bench needs a CUDA GPU")
    import triton

    started = time.perf_counter()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    walk = max(WALK_BYTES, 8 * l2)
    shapes = [s for s in SHAPES if s[0] == QUICK_MODEL] if args.quick else SHAPES
    rows = QUICK_ROWS if args.quick else ROWS
    print(f"{props.name}, {sms} SMs, L2 {l2 / 2**20:.0f} MB; torch {torch.__version__}, triton "
          f"{triton.__version__}; each replay streams >= {walk / 2**20:.0f} MB of weights", flush=True)  # fmt: skip
    if args.jobs > 0:
        base = list(dict.fromkeys(cfg for m in rows for cfg in sweep(m, args.quick)))
        # The split variants share one binary per base config (float32 partials out; iters not specialized).
        precompile(base + [replace(cfg, split_k=SPLITS[0]) for cfg in base], args.jobs)
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(100):  # about 0.15 s of matmuls: clocks up before the first timing
        warm @ warm
    torch.cuda.synchronize()
    del warm
    cases = []
    for model, proj, n, k in shapes:
        size = n * k * 2
        ncopies = min(max(4, cdiv(walk, size)), MAX_WEIGHT_BYTES // size)
        copies = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(ncopies)]
        shape_rows = []
        for m in rows:
            case = {"model": model, "proj": proj, "n": n, "k": k, "weight_bytes": size, "copies": ncopies}
            case |= bench_case(n, k, m, copies, sms, args.quick)
            cases.append(case)
            shape_rows.append(case)
        print_table(model, proj, n, k, ncopies, shape_rows)
        print(f"  ({time.perf_counter() - started:.0f} s so far)", flush=True)
        del copies
        torch.cuda.empty_cache()
    summary = summarize(cases, rows)
    print("\nsum over the projections, per M (us): cuBLAS, cuBLASLt, best Triton each, one Triton config")
    for m, s in summary["per_m"].items():
        lt = f"{s['cublaslt_total_us']:9.1f}" if s["cublaslt_total_us"] is not None else f"{'-':>9}"
        each = s["triton_best_each_total_us"]
        one = s["triton_one_config_total_us"]
        print(f"{m:>4} {s['cublas_total_us']:9.1f} {lt} {each or float('nan'):9.1f} "
              f"{one or float('nan'):9.1f} {s['triton_one_config']}")  # fmt: skip
    print(
        f"Triton beats both BLAS paths by > 3% in {len(summary['triton_wins_by_3pct'])} of {len(cases)} cases"
    )
    for w in summary["triton_wins_by_3pct"]:
        print(f"  {w['model']} {w['proj']} M {w['m']}: {w['triton_us']:.1f} us against cuBLAS "
              f"{w['cublas_us']:.1f}, {w['config']}")  # fmt: skip
    elapsed = time.perf_counter() - started
    print(f"{elapsed:.0f} s")
    meta = {"device": props.name, "sms": sms, "l2_bytes": l2, "walk_bytes": walk, "reps": REPS,
            "torch": torch.__version__, "triton": triton.__version__, "quick": args.quick, "seconds": elapsed,
            "tolerance": MAX_TOLERANCE}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gemm_bench.json"
    path.write_text(json.dumps({"meta": meta, "cases": cases, "summary": summary}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
