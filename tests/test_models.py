"""Our models against transformers' logits: tiny random llama/qwen2/qwen3/mistral, the real SmolLM2,
and the built-in dummy shapes (parameter counts on the meta device)."""

from __future__ import annotations

import gc
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from model_helpers import Driver, load_smollm2_gguf, make_tiny_model, save_hf_dir, small_runner
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from minisgl_cli.engine.kv.pool import KVPool
from minisgl_cli.engine.models.config import ModelConfig
from minisgl_cli.engine.models.registry import build_model, count_parameters
from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES
from minisgl_cli.errors import MinisglError

CPU = torch.device("cpu")
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so the tiny head_dim sees all three regimes
}


def _ref_logits(ref: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([tokens])).logits[0, -1].float()


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


TINY_CASES = {
    "llama": ("llama", {}),
    "llama-tied-llama3-rope": ("llama", {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE}),
    "llama-sharded": ("llama", {"max_shard_size": "40KB"}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3-tied-mqa": ("qwen3", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "qwen3": ("qwen3", {}),
}


@pytest.fixture(scope="module", params=list(TINY_CASES))
def tiny(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, torch.nn.Module]:
    arch, overrides = TINY_CASES[request.param]
    path = make_tiny_model(tmp_path_factory.mktemp("tiny"), arch, with_tokenizer=False, **overrides)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref


def test_prefill_batch_then_greedy_decode_matches_transformers(tiny: tuple[Path, torch.nn.Module]) -> None:
    path, ref = tiny
    driver = Driver(small_runner(path))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 9)]
    logits = driver.step(list(enumerate(prompts)))
    assert logits.shape == (3, 384) and logits.dtype == torch.float32
    seqs = [list(p) for p in prompts]
    for _ in range(9):
        for i, seq in enumerate(seqs):
            _assert_close(logits[i], _ref_logits(ref, seq))
        next_ids = logits.argmax(-1).tolist()
        for seq, t in zip(seqs, next_ids, strict=True):
            seq.append(t)
        logits = driver.step([(i, [t]) for i, t in enumerate(next_ids)])


def test_chunked_prefill_mixed_with_decode_matches_transformers(tiny: tuple[Path, torch.nn.Module]) -> None:
    path, ref = tiny
    driver = Driver(small_runner(path, page_size=1))
    g = torch.Generator().manual_seed(1)
    a = torch.randint(3, 300, (14,), generator=g).tolist()  # prefilled in 2 chunks
    b = torch.randint(3, 300, (6,), generator=g).tolist()  # decodes meanwhile
    logits = driver.step([(1, b), (0, a[:8])])
    _assert_close(logits[0], _ref_logits(ref, b))
    _assert_close(logits[1], _ref_logits(ref, a[:8]))
    b.append(int(logits[0].argmax()))
    logits = driver.step([(0, a[8:]), (1, b[-1:])])  # the second chunk (seq_len > extend_len) + a decode
    _assert_close(logits[0], _ref_logits(ref, a))
    _assert_close(logits[1], _ref_logits(ref, b))
    a.append(int(logits[0].argmax()))
    b.append(int(logits[1].argmax()))
    logits = driver.step([(0, a[-1:]), (1, b[-1:])])
    _assert_close(logits[0], _ref_logits(ref, a))
    _assert_close(logits[1], _ref_logits(ref, b))


def test_bfloat16_is_close_to_float32_reference(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, "qwen3", with_tokenizer=False)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    driver = Driver(small_runner(path, dtype=torch.bfloat16))
    tokens = list(range(10, 30))
    logits = driver.step([(0, tokens)])
    _assert_close(logits[0], _ref_logits(ref, tokens), tol=5e-2)
    logits = driver.step([(0, [7])])
    _assert_close(logits[0], _ref_logits(ref, [*tokens, 7]), tol=5e-2)


def test_checkpoint_that_does_not_match_config_is_rejected(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, "llama", with_tokenizer=False)
    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    with pytest.raises(MinisglError, match="has shape"):
        small_runner(path, ModelConfig.from_hf({**_hf_dict(path), "intermediate_size": 80}))
    with pytest.raises(MinisglError, match="unexpected tensor"):
        small_runner(path, ModelConfig.from_hf({**_hf_dict(path), "num_hidden_layers": 1}))
    with pytest.raises(MinisglError, match="lacks"):
        small_runner(path, ModelConfig.from_hf({**_hf_dict(path), "num_hidden_layers": 3}))
    with pytest.raises(MinisglError, match="no \\*.safetensors"):
        small_runner(tmp_path, config)


def _hf_dict(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_config_parses_both_rope_spellings() -> None:
    base = dict(BUILTIN_SHAPES["llama-3.1-8b"])
    old = ModelConfig.from_hf(base)  # transformers 4: rope_theta + rope_scaling
    params = {**base.pop("rope_scaling"), "rope_theta": base.pop("rope_theta")}
    new = ModelConfig.from_hf({**base, "rope_parameters": params})  # transformers 5
    assert old == new
    assert old.rope_theta == 500000.0 and old.rope_scaling is not None and old.rope_scaling.factor == 8.0
    assert old.eos_token_ids == [128001, 128008, 128009] and old.bos_token_id == 128000
    assert old.head_dim == 128 and old.num_kv_heads == 8 and not old.qkv_bias and not old.qk_norm
    qwen2, qwen3 = (
        ModelConfig.from_hf(BUILTIN_SHAPES["qwen2.5-7b"]),
        ModelConfig.from_hf(BUILTIN_SHAPES["qwen3-8b"]),
    )
    assert qwen2.qkv_bias and not qwen2.qk_norm and qwen2.head_dim == 128
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.eos_token_ids == [151645]
    with pytest.raises(MinisglError, match="unsupported rope scaling"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(MinisglError, match="unsupported model architecture"):
        ModelConfig.from_hf({**base, "architectures": ["GPT2LMHeadModel"]})


# Published parameter counts (tied embeddings counted once).
KNOWN_SIZES = {
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.55e9,
    "llama-3.2-1b": 1.236e9,
    "qwen3-0.6b": 0.596e9,
    "qwen3-8b": 8.19e9,
    "qwen2.5-7b": 7.62e9,
    "smollm2-135m": 134.5e6,
    "qwen3-30b-a3b": 30.53e9,
    "mixtral-8x7b": 46.70e9,
}


@pytest.mark.parametrize("name", sorted(BUILTIN_SHAPES))
def test_builtin_shape_parameter_counts(name: str) -> None:
    assert set(BUILTIN_SHAPES) == set(KNOWN_SIZES)
    config = ModelConfig.from_hf(BUILTIN_SHAPES[name])
    meta = torch.device("meta")
    ours = count_parameters(build_model(config, 64, dtype=torch.bfloat16, device=meta))
    assert abs(ours - KNOWN_SIZES[name]) / KNOWN_SIZES[name] < 0.005
    hf_config = AutoConfig.for_model(
        **{k: v for k, v in BUILTIN_SHAPES[name].items() if k != "architectures"}
    )
    with meta:
        hf = AutoModelForCausalLM.from_config(hf_config)
    assert ours == sum(p.numel() for p in hf.parameters())


def test_dummy_weights_are_finite_and_seeded() -> None:
    config = ModelConfig.from_hf({**BUILTIN_SHAPES["smollm2-135m"], "num_hidden_layers": 2})
    prompt = list(range(100, 140))

    def logits(seed: int) -> torch.Tensor:
        return Driver(small_runner(None, config, random_seed=seed)).step([(0, prompt), (1, prompt[:7])])

    first = logits(0)
    assert first.shape == (2, 49152) and torch.isfinite(first).all()
    assert torch.equal(first, logits(0))
    assert not torch.allclose(first, logits(1))


@pytest.fixture(scope="module")
def smollm2(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, PreTrainedModel, PreTrainedTokenizerBase]:
    model, tokenizer = load_smollm2_gguf()
    return save_hf_dir(model, tokenizer, tmp_path_factory.mktemp("smollm2-hf")), model, tokenizer


def test_smollm2_real_weights_match_transformers(
    smollm2: tuple[Path, PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    path, ref, tokenizer = smollm2
    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    # Our built-in shape is the real model's (the GGUF stores eps as float32: 1e-5 + 2.5e-13).
    assert ModelConfig.from_hf(BUILTIN_SHAPES["smollm2-135m"]) == replace(config, rms_norm_eps=1e-5)
    driver = Driver(small_runner(path, page_size=16, kv_cache_tokens=1024))
    chat = [{"role": "user", "content": "Write a haiku about the sea."}]
    prompts = [
        tokenizer.encode("The capital of France is"),
        tokenizer.encode(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)),
    ]
    logits = driver.step(list(enumerate(prompts)))
    for _ in range(2):  # the prefill, then one greedy decode step
        for i, p in enumerate(prompts):
            _assert_close(logits[i], _ref_logits(ref, p))
        next_ids = logits.argmax(-1).tolist()
        for p, t in zip(prompts, next_ids, strict=True):
            p.append(t)
        logits = driver.step([(i, [t]) for i, t in enumerate(next_ids)])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("case", ["llama-tied-llama3-rope", "qwen2", "qwen3"])
def test_cuda_matches_transformers(tmp_path: Path, case: str, dtype: torch.dtype, tol: float) -> None:
    arch, overrides = TINY_CASES[case]
    # head_dim 64: a size FlashInfer's prebuilt kernels cover, so bf16 runs the fused kernels too.
    path = make_tiny_model(tmp_path, arch, with_tokenizer=False, head_dim=64, **overrides)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    backend = "flashinfer" if dtype == torch.bfloat16 else "torch"
    driver = Driver(small_runner(path, device=torch.device("cuda"), dtype=dtype, attention_backend=backend))
    a, b = list(range(10, 40)), list(range(50, 57))
    logits = driver.step([(0, a[:20]), (1, b)])
    _assert_close(logits[0], _ref_logits(ref, a[:20]), tol)
    _assert_close(logits[1], _ref_logits(ref, b), tol)
    b.append(9)
    logits = driver.step([(1, [9]), (0, a[20:])])  # a decode and a chunk after a prefix
    _assert_close(logits[0], _ref_logits(ref, b), tol)
    _assert_close(logits[1], _ref_logits(ref, a), tol)
    for t in range(3):
        a, b = [*a, t + 3], [*b, t + 4]
        logits = driver.step([(0, a[-1:]), (1, b[-1:])])
        _assert_close(logits[0], _ref_logits(ref, a), tol)
        _assert_close(logits[1], _ref_logits(ref, b), tol)


@pytest.mark.gpu
@needs_cuda
def test_cuda_dummy_llama_8b_sizes_pool_from_free_memory() -> None:
    config = ModelConfig.from_hf(BUILTIN_SHAPES["llama-3.1-8b"])
    gc.collect()  # earlier tests' runners must not hold GPU memory
    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info()
    runner = small_runner(
        None,
        config,
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        kv_cache_tokens=None,
        max_running_requests=64,
        max_context_len=4096,
        page_size=16,
    )
    weights = count_parameters(runner.model) * 2
    pool = runner.kv_pool.num_slots * KVPool.bytes_per_token(32, 8, 128, torch.bfloat16)
    # Weights and pool together take mem_fraction (0.9) of the GPU, less what was in use before.
    budget = 0.9 * total - (total - free_before) - weights
    # (Within 3%: the allocator's cache and the CUDA context move by a few hundred MB between tests.)
    assert abs(pool - budget) < 0.03 * budget
    logits = Driver(runner).step([(0, list(range(1, 300))), (1, list(range(5, 9)))])
    assert logits.shape == (2, 128256) and torch.isfinite(logits).all()
