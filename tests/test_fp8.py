"""FP8 weights (layers/fp8.py) on the CPU: per-row quantization, block-scaled FP8 checkpoints dequantized as
they load (whole and in tensor-parallel slices that cut through blocks), --quantization's choices, and the
quantized model against float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_helpers import Driver, make_tiny_model, small_runner
from safetensors.torch import load_file, save_file

from minisgl_cli.bench.latency import DecodeTraffic
from minisgl_cli.engine.distributed import TPGroup
from minisgl_cli.engine.layers import fp8
from minisgl_cli.engine.layers.linear import MergedLinear, RowParallelLinear
from minisgl_cli.engine.models.config import Fp8Checkpoint, ModelConfig
from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES
from minisgl_cli.errors import MinisglError, UsageError

BLOCK = 32
FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [32, 32],
}
PROMPTS = [[5, 17, 42, 99, 7], [120, 3, 250, 8, 8, 61]]


def _block_quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's block-scaled FP8 weight, built the way the releases are: each block's largest
    magnitude maps to 448, and the stored scale_inv multiplies it back."""
    n, k = w.shape
    rows, cols = -(-n // block), -(-k // block)
    scale_inv = torch.empty(rows, cols)
    q = torch.empty(n, k, dtype=fp8.FP8)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / fp8.FP8_MAX
            scale_inv[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / s).to(fp8.FP8)
    return q, scale_inv


def _block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: int) -> torch.Tensor:
    full = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[: q.shape[0], : q.shape[1]]
    return q.float() * full


def _linear_weight(name: str) -> bool:
    return name.endswith("proj.weight") and ".layers." in name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Qwen3 as an FP8 checkpoint (its linears block-scaled, 32 x 32), and the same values dequantized
    in float32 as a plain checkpoint: what loading the FP8 one must give."""
    root = tmp_path_factory.mktemp("fp8")
    plain = make_tiny_model(root, "qwen3", seed=3)
    tensors = load_file(plain / "model.safetensors")
    fp8_tensors: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if _linear_weight(name):
            q, scale_inv = _block_quantize(t, BLOCK)
            fp8_tensors[name], fp8_tensors[name + "_scale_inv"] = q, scale_inv
            dequantized[name] = _block_dequantize(q, scale_inv, BLOCK)
        else:
            fp8_tensors[name] = dequantized[name] = t
    config = json.loads((plain / "config.json").read_text())
    out = {}
    for kind, content, extra in (
        ("fp8", fp8_tensors, {"quantization_config": FP8_CONFIG}),
        ("ref", dequantized, {}),
    ):
        path = root / kind
        path.mkdir()
        save_file(content, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps({**config, **extra}))
        out[kind] = path
    return out


def _config(path: Path, quantization: str = "auto") -> ModelConfig:
    return ModelConfig.from_hf(json.loads((path / "config.json").read_text())).with_quantization(quantization)


def _greedy(
    runner_path: Path, config: ModelConfig, forced: list[int] | None = None, steps: int = 6
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and each step's logits; with `forced`, those tokens are fed instead (teacher forcing)."""
    driver = Driver(small_runner(runner_path, config))
    work = list(enumerate(PROMPTS))
    tokens: list[int] = []
    logits = []
    for step in range(steps):
        out = driver.step(work)
        logits.append(out)
        picked = out.argmax(-1).tolist()
        tokens += picked
        fed = picked if forced is None else forced[step * len(PROMPTS) : (step + 1) * len(PROMPTS)]
        work = [(i, [t]) for i, t in enumerate(fed)]
    return tokens, torch.cat(logits)


def test_rows_quantize_within_fp8_precision() -> None:
    w = torch.randn(37, 200) * torch.logspace(-3, 2, 37)[:, None]  # rows of very different magnitudes
    q, scale = fp8.quantize_rows(w)
    assert q.dtype == fp8.FP8 and scale.shape == (37,)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((37,), fp8.FP8_MAX))
    back = q.float() * scale[:, None]
    # e4m3 keeps 3 mantissa bits: within 1/16 of each entry relative to its row's scale of 448 steps.
    assert ((back - w).abs() <= w.abs() / 16 + scale[:, None] * 2**-9).all()
    zero_q, zero_scale = fp8.quantize_rows(torch.zeros(2, 8))
    assert torch.equal(zero_q.float(), torch.zeros(2, 8)) and (zero_scale > 0).all()


def test_block_dequantize_matches_by_hand_and_in_any_slice() -> None:
    w = torch.randn(300, 200)
    q, scale_inv = _block_quantize(w, 128)
    want = _block_dequantize(q, scale_inv, 128)
    whole = fp8.dequantize(q, scale_inv, (), [300, 200], (128, 128))
    assert torch.equal(whole, want)
    rows = (slice(100, 250),)
    assert torch.equal(fp8.dequantize(q[rows], scale_inv, rows, [300, 200], (128, 128)), want[rows])
    cols = (slice(None), slice(60, 190))
    assert torch.equal(fp8.dequantize(q[cols], scale_inv, cols, [300, 200], (128, 128)), want[cols])
    one = torch.tensor(0.5)
    assert torch.equal(fp8.dequantize(q, one, (), [300, 200], None), q.float() * 0.5)


def test_quantization_config_is_read_or_refused() -> None:
    assert Fp8Checkpoint.from_hf({}) is None
    assert Fp8Checkpoint.from_hf({"quantization_config": FP8_CONFIG}) == Fp8Checkpoint((32, 32))
    assert Fp8Checkpoint.from_hf({"quantization_config": {"quant_method": "fp8"}}) == Fp8Checkpoint(None)
    bad = [
        ({"quant_method": "awq"}, "quant_method 'awq'"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme 'static'"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "FP8 format 'e5m2'"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "two positive integers"),
    ]
    for q, message in bad:
        with pytest.raises(UsageError, match=message):
            Fp8Checkpoint.from_hf({"quantization_config": q})


def test_quantization_choices(checkpoints: dict[str, Path]) -> None:
    assert _config(checkpoints["fp8"]).quantization == "fp8"  # auto: the checkpoint's
    assert _config(checkpoints["fp8"], "none").quantization is None
    assert _config(checkpoints["ref"]).quantization is None
    assert _config(checkpoints["ref"], "fp8").quantization == "fp8"
    with pytest.raises(UsageError, match="--quantization must be one of"):
        _config(checkpoints["ref"], "int4")


def test_fp8_checkpoint_loads_as_its_dequantized_values(checkpoints: dict[str, Path]) -> None:
    got = small_runner(checkpoints["fp8"], _config(checkpoints["fp8"], "none")).model.state_dict()
    want = small_runner(checkpoints["ref"], _config(checkpoints["ref"])).model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert (
        _greedy(checkpoints["fp8"], _config(checkpoints["fp8"], "none"))[0]
        == _greedy(checkpoints["ref"], _config(checkpoints["ref"]))[0]
    )


def test_tensor_parallel_slices_cut_through_blocks(checkpoints: dict[str, Path]) -> None:
    """Two ranks' slices (gate/up rows 48 of 96, down columns 48 of 96: not on 32-entry block edges) hold
    exactly the whole model's rows and columns."""
    whole = small_runner(checkpoints["ref"], _config(checkpoints["ref"])).model
    config = _config(checkpoints["fp8"], "none")
    for rank in range(2):
        from minisgl_cli.engine.models.registry import build_model
        from minisgl_cli.engine.models.weights import load_weights

        part = build_model(config, 128, dtype=torch.float32, device=torch.device("cpu"), tp=TPGroup(rank, 2))
        load_weights(part, checkpoints["fp8"])
        mlp, full = part.model.layers[1].mlp, whole.model.layers[1].mlp
        gate, up = full.gate_up_proj.weight.chunk(2)
        rows = slice(48 * rank, 48 * (rank + 1))
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate[rows], up[rows]]))
        assert torch.equal(mlp.down_proj.weight, full.down_proj.weight[:, rows])


def test_fp8_weights_track_float32(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """--quantization fp8 (auto for the FP8 checkpoint): its linears hold FP8 with row scales, and its logits
    stay near the dequantized model's (the second rounding, to a scale per row, is the only difference)."""
    runner = small_runner(checkpoints["fp8"], _config(checkpoints["fp8"]))
    linears = [m for m in runner.model.modules() if isinstance(m, MergedLinear | RowParallelLinear)]
    assert linears and all(m.weight.dtype == fp8.FP8 and m.weight_scale is not None for m in linears)
    want_tokens, want = _greedy(checkpoints["ref"], _config(checkpoints["ref"]))
    tokens, logits = _greedy(checkpoints["fp8"], _config(checkpoints["fp8"]), forced=want_tokens)
    # The row scales' rounding: 2.5% of each linear's weights (e4m3's 3 mantissa bits), which this random
    # model's peaked attention turns into ~10% of its logits.
    assert float((logits - want).norm() / want.norm()) < 0.15
    assert sum(a == b for a, b in zip(tokens, want_tokens, strict=True)) >= 0.75 * len(tokens)
    # Exactly the arithmetic of the row-quantized weights: the same model with those weights in float32.
    plain = load_file(checkpoints["ref"] / "model.safetensors")
    for module_name, module in runner.model.named_modules():
        if isinstance(module, MergedLinear | RowParallelLinear):
            values = module.weight.float() * module.weight_scale[:, None]
            if isinstance(module, MergedLinear):
                for part, (start, size) in module.shards.items():
                    plain[_hf_name(module_name, part)] = values[start : start + size]
            else:
                plain[f"{module_name}.weight"] = values
    path = tmp_path / "requantized"
    path.mkdir()
    save_file({k: v.contiguous() for k, v in plain.items()}, path / "model.safetensors")
    (path / "config.json").write_text((checkpoints["ref"] / "config.json").read_text())
    _, exact = _greedy(path, _config(path), forced=want_tokens)
    assert torch.allclose(logits, exact, rtol=1e-5, atol=1e-5)


def _hf_name(module: str, part: str) -> str:
    """A merged linear's part -> its checkpoint tensor (q/k/v of qkv_proj, gate/up of gate_up_proj)."""
    parent = module.rsplit(".", 1)[0]
    return f"{parent}.{part}_proj.weight"


def test_dummy_weights_quantize_and_count_one_byte_a_weight() -> None:
    config = ModelConfig.from_hf(BUILTIN_SHAPES["qwen3-0.6b"])
    bf16 = DecodeTraffic.of_model(config, torch.bfloat16)
    quantized = DecodeTraffic.of_model(config.with_quantization("fp8"), torch.bfloat16)
    # The linears (0.44 B of qwen3-0.6b's weights) halve; the LM head, norms and scales do not.
    linears = 28 * (1024 * (2048 + 2 * 1024) + 2048 * 1024 + 2 * 3072 * 1024 + 3072 * 1024)
    assert bf16.weight_bytes - quantized.weight_bytes == linears - 4 * 28 * (4096 + 1024 + 6144 + 1024)
    tiny = ModelConfig.from_hf(
        json.loads(json.dumps({**BUILTIN_SHAPES["qwen3-0.6b"], "num_hidden_layers": 1}))
    )
    out = Driver(small_runner(None, tiny.with_quantization("fp8"))).step([(0, [1, 2, 3])])
    assert torch.isfinite(out).all()


def test_fp8_tensor_without_its_scale_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    tensors = load_file(checkpoints["fp8"] / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((checkpoints["fp8"] / "config.json").read_text())
    with pytest.raises(MinisglError, match="o_proj.weight' in .* is FP8 without a scale"):
        small_runner(tmp_path, _config(tmp_path))


@pytest.mark.parametrize("rows", [1, 7, 128])
@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU"
)
def test_gpu_scaled_mm_matches_the_dequantized_matmul(rows: int) -> None:
    """torch._scaled_mm with per-token activation scales (one row: the FP8 GEMV) against the weight dequantized
    to bf16: they differ by the activations' own FP8 rounding (~2.5%); above one row a shape _scaled_mm
    cannot take falls back to exactly the dequantized matmul."""
    torch.manual_seed(rows)
    w = torch.randn(512, 1024, device="cuda") * 0.02
    q, scale = fp8.quantize_rows(w)
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, (q.float() * scale[:, None]).to(torch.bfloat16))
    got = fp8.fp8_linear(x, q, scale)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 0.05
    odd_q, odd_scale = fp8.quantize_rows(w[:500])
    odd = fp8.fp8_linear(x, odd_q, odd_scale)
    odd_want = torch.nn.functional.linear(x, (odd_q.float() * odd_scale[:, None]).to(torch.bfloat16))
    if rows == 1:  # the FP8 GEMV takes any shape: the same sum in another order
        torch.testing.assert_close(odd, odd_want, rtol=2e-2, atol=2e-2)
    else:
        assert torch.equal(odd, odd_want)


def test_fp8_kv_cache_holds_twice_the_tokens_and_tracks_the_model_dtype(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["ref"]
    config = _config(path)
    plain = small_runner(path, config, kv_cache_tokens=None, kv_cache_gb=0.001)
    fp8_pool = small_runner(path, config, kv_cache_tokens=None, kv_cache_gb=0.001, kv_cache_dtype="fp8_e4m3")
    assert fp8_pool.kv_pool.dtype == fp8.FP8
    assert (
        fp8_pool.num_pages * fp8_pool.page_size >= 4 * plain.num_pages * plain.page_size - 4
    )  # float32 -> 1 B

    want_tokens, want = _greedy(path, config)
    driver = Driver(small_runner(path, config, kv_cache_dtype="fp8_e4m3"))
    work = list(enumerate(PROMPTS))
    logits = []
    for step in range(6):
        logits.append(driver.step(work))
        work = [(i, [t]) for i, t in enumerate(want_tokens[step * len(PROMPTS) : (step + 1) * len(PROMPTS)])]
    got = torch.cat(logits)
    # K and V rounded to e4m3 (3 mantissa bits) before attention reads them.
    assert float((got - want).norm() / want.norm()) < 0.15
    assert sum(a == b for a, b in zip(got.argmax(-1).tolist(), want_tokens, strict=True)) >= 0.75 * len(
        want_tokens
    )


def test_fp8_kv_cache_refuses_flashinfers_decode_kernels() -> None:
    """An FP8 pool decodes with the Triton kernel; FlashInfer's own decode kernels (no prebuilt FP8 variants)
    are refused by name, before any GPU work."""
    from types import SimpleNamespace

    from minisgl_cli.engine.attention import create_backend
    from minisgl_cli.engine.model_runner import kv_dtype

    pool = SimpleNamespace(dtype=fp8.FP8, device=torch.device("cuda"))
    for name in ("flashinfer", "torch,flashinfer"):
        for kernel in ("tensor-cores", "cuda-cores"):
            with pytest.raises(UsageError, match="decodes with the Triton kernel: use --decode-kernel auto"):
                create_backend(
                    name, kv_pool=pool, page_table=None, num_heads=4, head_dim=16, page_size=1,  # type: ignore[arg-type]
                    decode_kernel=kernel, dtype=torch.bfloat16,
                )  # fmt: skip
    with pytest.raises(UsageError, match="auto or fp8_e4m3"):
        kv_dtype("int8", torch.bfloat16)


GPU = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU"
)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (28672, 4096), (1000, 3000)])
def test_gpu_fp8_gemv_equals_the_dequantized_matmul(n: int, k: int) -> None:
    """One row through the FP8 GEMV: the float64 product with the dequantized weight, to bf16's rounding."""
    torch.manual_seed(n)
    q, scale = fp8.quantize_rows(torch.randn(n, k, device="cuda") * 0.02)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    want = x.double() @ (q.double() * scale.double()[:, None]).T + bias.double()
    got = fp8.fp8_linear(x, q, scale, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (1, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def _gpu_llm(path: Path, **kw: object):  # type: ignore[no-untyped-def]
    from minisgl_cli.engine.llm import LLM

    args = {"device": "cuda", "dtype": "bfloat16", "kv_cache_tokens": 65536, "max_running_requests": 32,
            "cuda_graph_max_bs": 0, "disable_overlap": True}  # fmt: skip
    return LLM(str(path), **{**args, **kw})


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("page_size", [1, 16])
def test_gpu_fp8_kv_cache_in_flashinfer_tracks_the_torch_backend(tmp_path: Path, page_size: int) -> None:
    """The fast backend over an FP8 pool (the fused kernel's FP8 stores, the Triton decode's widening reads,
    prefill through gathered pages) against the torch backend over the same FP8 pool, teacher-forced through
    a prefill, a chunk beside decodes and 12 decode steps: the two read the same FP8 values, so their bf16
    logits differ by kernel rounding only. Then graphs against eager and a radix-cache hit (the prefix read
    back from FP8 pages) against none, token for token."""
    from model_helpers import GPU_SHAPE

    from minisgl_cli.engine.request import SamplingParams

    path = make_tiny_model(tmp_path, "qwen3", with_tokenizer=False, **{**GPU_SHAPE, "head_dim": 128})
    runner = {"dtype": torch.bfloat16, "device": torch.device("cuda"), "page_size": page_size,
              "max_running_requests": 8, "max_context_len": 1024, "kv_cache_tokens": 16384,
              "kv_cache_dtype": "fp8_e4m3"}  # fmt: skip
    fast = Driver(small_runner(path, attention_backend="flashinfer", **runner))
    ref = Driver(small_runner(path, attention_backend="torch", **runner))
    assert fast.runner.kv_pool.dtype == fp8.FP8
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 384, (int(n),), generator=g).tolist() for n in (40, 300, 7, 129, 64)]
    errors = []
    work = [(i, p) for i, p in enumerate(prompts[:4])]
    for step in range(13):
        got, want = fast.step(work), ref.step(work)
        errors.append(float((got.double() - want.double()).norm() / want.double().norm()))
        nxt = want.argmax(-1).tolist()
        work = [(sid, [t]) for (sid, _), t in zip(work, nxt, strict=True)] + (
            [(4, prompts[4])] if step == 0 else []
        )
    assert max(errors) < 2e-2, errors

    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kw = {"page_size": page_size, "kv_cache_dtype": "fp8_e4m3"}
    eager = [o.token_ids for o in _gpu_llm(path, **kw).generate(prompts, greedy)]
    graphs = _gpu_llm(path, cuda_graph_max_bs=16, **kw)
    assert [o.token_ids for o in graphs.generate(prompts, greedy)] == eager
    shared = prompts[1][:200]
    radix = _gpu_llm(path, cache_type="radix", **kw)
    radix.generate([shared], greedy)
    outs = radix.generate([shared + p[:20] for p in prompts], greedy)
    assert all(o.usage.cached_tokens >= 192 for o in outs)
    naive = _gpu_llm(path, cache_type="naive", **kw)
    assert [o.token_ids for o in outs] == [
        o.token_ids for o in naive.generate([shared + p[:20] for p in prompts], greedy)
    ]
