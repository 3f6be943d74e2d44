"""Mixture-of-experts models (Qwen3-MoE, Mixtral) against transformers: tiny random models saved as HF
directories give transformers' greedy tokens through LLM and its logits; the sparse block alone against
a float64 hand reference; TP=2 against TP=1 over gloo; dummy weights; sparse-layer configs."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from model_helpers import Driver, make_tiny_model, small_runner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from minisgl_cli.engine.distributed import TPGroup, init_tp
from minisgl_cli.engine.layers.moe import SparseMoE
from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.models.config import ModelConfig, MoEConfig
from minisgl_cli.engine.models.registry import build_model, count_parameters
from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import MinisglError, UsageError

QWEN3_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
MIXTRAL = {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-moe-renorm": ("qwen3_moe", {**QWEN3_MOE, "norm_topk_prob": True}),
    "qwen3-moe-no-renorm": ("qwen3_moe", {**QWEN3_MOE, "norm_topk_prob": False}),
    # Dense layers among the sparse ones: only every other layer is sparse, and layer 3 is listed dense.
    "qwen3-moe-dense-layers": (
        "qwen3_moe",
        {**QWEN3_MOE, "num_hidden_layers": 4, "mlp_only_layers": [3], "decoder_sparse_step": 2},
    ),
    "mixtral": ("mixtral", MIXTRAL),
}
PROMPTS = [[5, 17, 42, 99, 7], [120, 3, 250], [61] * 11 + [300, 12, 8]]


def _config(path: Path) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {
        name: make_tiny_model(root, arch, seed=i, **kw) for i, (name, (arch, kw)) in enumerate(CASES.items())
    }


def test_sparse_layers_follow_the_config(tiny: dict[str, Path]) -> None:
    moe = _config(tiny["qwen3-moe-dense-layers"]).moe
    assert moe is not None and moe.layers == (1,)  # layer 3 is sparse by the step but listed dense
    mixtral = _config(tiny["mixtral"])
    assert mixtral.moe == MoEConfig(4, 2, 48, renormalize=True, layers=(0, 1)) and not mixtral.has_dense_mlp
    qwen = _config(tiny["qwen3-moe-no-renorm"])
    assert qwen.qk_norm and qwen.moe is not None and not qwen.moe.renormalize
    with pytest.raises(MinisglError, match="decoder_sparse_step must be at least 1"):
        ModelConfig.from_hf({**BUILTIN_SHAPES["qwen3-30b-a3b"], "decoder_sparse_step": 0})
    with pytest.raises(MinisglError, match="num_experts_per_tok must be between 1 and the 8 experts, not 9"):
        ModelConfig.from_hf({**BUILTIN_SHAPES["mixtral-8x7b"], "num_experts_per_tok": 9})
    all_dense = ModelConfig.from_hf({**BUILTIN_SHAPES["qwen3-30b-a3b"], "mlp_only_layers": list(range(48))})
    assert all_dense.moe is None and all_dense.has_dense_mlp


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_tokens_and_logits_match_transformers(tiny: dict[str, Path], name: str) -> None:
    path = tiny[name]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), kv_cache_tokens=1024, max_running_requests=4, page_size=1)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        with torch.no_grad():
            want = ref.generate(
                torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False
            )[0, len(prompt) :]
        assert out.token_ids == want.tolist()
    # Logits of a batched prefill and a decode step, through the model runner.
    driver = Driver(small_runner(path))
    logits = driver.step(list(enumerate(PROMPTS)))
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            assert _rel_err(logits[i], ref(torch.tensor([prompt])).logits[0, -1]) < 1e-4
        logits = driver.step([(0, [9])])
        assert _rel_err(logits[0], ref(torch.tensor([[*PROMPTS[0], 9]])).logits[0, -1]) < 1e-4


def _reference_moe(block: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token in float64: softmax over all experts, the top k, their weighted gated MLPs."""
    gate = block.gate.weight.double()
    gate_up, down = block.experts.gate_up_proj.double(), block.experts.down_proj.double()
    width = down.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, row in enumerate(x.double()):
        probs = torch.softmax(gate @ row, dim=-1)
        top = sorted(range(len(probs)), key=lambda e: -probs[e].item())[: block.top_k]
        total = sum(probs[e] for e in top) if block.renormalize else 1.0
        for e in top:
            h = gate_up[e] @ row
            out[t] += probs[e] / total * (down[e] @ (F.silu(h[:width]) * h[width:]))
    return out


@pytest.mark.parametrize("renormalize", [True, False])
def test_sparse_block_matches_float64_reference(renormalize: bool) -> None:
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=6, top_k=2, intermediate_size=24, renormalize=renormalize, layers=(0,))
    block = SparseMoE(moe, 32, TPGroup.single())
    for p in block.parameters():
        p.normal_(0.0, 0.3)
    x = torch.randn(13, 32)  # 26 (token, expert) pairs over 6 experts: some get several, maybe one none
    got = block(x)
    assert got.dtype == torch.float32
    assert _rel_err(got.double(), _reference_moe(block, x)) < 1e-5
    assert block(x[:0]).shape == (0, 32)  # an empty batch routes nothing


DUMMY_HF = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 390,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "mlp_only_layers": [0],
    "max_position_embeddings": 256,
}
TP_CASES = ("qwen3-moe-renorm", "qwen3-moe-dense-layers", "mixtral", "dummy")


def _tp_run(config: ModelConfig, path: Path | None, tp: TPGroup) -> tuple[torch.Tensor, list[int]]:
    """A batched prefill, then 4 greedy decode steps whose tokens rank 0 picks for all ranks."""
    driver = Driver(small_runner(path, config, max_context_len=64, kv_cache_tokens=256, tp=tp))
    steps, tokens = [], []
    work = list(enumerate(PROMPTS[:2]))
    for _ in range(5):
        logits = driver.step(work)
        picked = logits.argmax(-1)
        if tp.size > 1:
            dist.broadcast(picked, src=0, group=tp.group)
        steps.append(logits)
        tokens += picked.tolist()
        work = [(i, [t]) for i, t in enumerate(picked.tolist())]
    return torch.cat(steps), tokens


def _rank_main(
    rank: int, init_file: str, cases: dict[str, tuple[ModelConfig, Path | None]], out: str
) -> None:
    torch.set_num_threads(1)  # 2 ranks share 2 cores
    tp = init_tp(rank, 2, f"file://{init_file}", "gloo", timeout=timedelta(seconds=60))
    try:
        results = {name: _tp_run(config, path, tp) for name, (config, path) in cases.items()}
    finally:
        tp.destroy()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_two_ranks_match_one(tiny: dict[str, Path], tmp_path: Path) -> None:
    cases: dict[str, tuple[ModelConfig, Path | None]] = {
        name: (_config(tiny[name]), tiny[name]) for name in TP_CASES if name != "dummy"
    }
    cases["dummy"] = (ModelConfig.from_hf(DUMMY_HF), None)
    # Expert parallelism: each rank holds half of the experts whole (dummy weights: the same values).
    for name in ("qwen3-moe-renorm", "mixtral", "dummy"):
        config, path = cases[name]
        cases[f"{name}-ep"] = (config.with_expert_parallel(True, 2), path)
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), cases, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, (config, path) in cases.items():
        want_logits, want_tokens = _tp_run(config, path, TPGroup.single())
        got_logits, got_tokens = ranks[0][name]
        assert got_tokens == want_tokens, name
        assert _rel_err(got_logits, want_logits) < 1e-4, name
        assert _rel_err(ranks[1][name][0], got_logits) < 1e-6, name
    # The dummy case compares real signal, not a flat distribution.
    assert len(set(want_tokens)) > 1 and want_logits.std(-1).min() > 0


def test_dummy_weights_are_finite_and_seeded() -> None:
    config = ModelConfig.from_hf(DUMMY_HF)

    def logits(seed: int) -> torch.Tensor:
        return Driver(small_runner(None, config, random_seed=seed)).step([(0, list(range(100, 130)))])

    first = logits(0)
    assert first.shape == (1, 390) and torch.isfinite(first).all()
    assert torch.equal(first, logits(0)) and not torch.allclose(first, logits(1))


@pytest.mark.parametrize(("name", "ranks"), [("qwen3-30b-a3b", 4), ("mixtral-8x7b", 8)])
def test_builtin_moe_shapes_split_their_experts(name: str, ranks: int) -> None:
    """At the real shape on the meta device, each rank holds 1/ranks of every expert and of attention
    (whose heads all split here), and a whole router and the norms."""
    config = ModelConfig.from_hf(BUILTIN_SHAPES[name])
    assert config.moe is not None and config.moe.layers == tuple(range(config.num_layers))
    meta = torch.device("meta")
    full = count_parameters(build_model(config, 16, dtype=torch.bfloat16, device=meta))
    replicated = config.num_layers * (2 * config.hidden_size + config.moe.num_experts * config.hidden_size)
    replicated += config.hidden_size + (2 * config.num_layers * config.head_dim if config.qk_norm else 0)
    part = count_parameters(build_model(config, 16, dtype=torch.bfloat16, device=meta, tp=TPGroup(1, ranks)))
    assert part == (full - replicated) // ranks + replicated


def test_expert_parallel_shapes_hold_whole_experts() -> None:
    """--ep at the real shape: each of 4 ranks holds 32 of qwen3-30b-a3b's 128 experts at full width."""
    config = ModelConfig.from_hf(BUILTIN_SHAPES["qwen3-30b-a3b"])
    assert config.moe is not None
    ep = config.with_expert_parallel(True, 4)
    model = build_model(ep, 16, dtype=torch.bfloat16, device=torch.device("meta"), tp=TPGroup(2, 4))
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (32, 2 * 768, 2048) and experts.down_proj.shape == (32, 2048, 768)
    assert (experts.local.start, experts.local.size, experts.local.full) == (64, 32, 128)
    assert ep.for_rank(TPGroup(2, 4)).moe == ep.moe  # widths unsplit


def test_expert_parallel_that_cannot_apply_is_refused() -> None:
    config = ModelConfig.from_hf(DUMMY_HF)  # 8 experts
    with pytest.raises(UsageError, match="give --tp 2 or more"):
        config.with_expert_parallel(True, 1)
    six = ModelConfig.from_hf({**DUMMY_HF, "num_experts": 6}).with_expert_parallel(True, 4)
    with pytest.raises(MinisglError, match="number of experts that divides by 4, but the model has 6"):
        six.for_rank(TPGroup(rank=0, size=4))
    dense = ModelConfig.from_hf({**DUMMY_HF, "architectures": ["Qwen3ForCausalLM"]})
    with pytest.raises(UsageError, match="this model has none"):
        dense.with_expert_parallel(True, 2)
    assert config.with_expert_parallel(False, 1) is config


def test_expert_width_that_does_not_split_is_refused() -> None:
    config = ModelConfig.from_hf({**DUMMY_HF, "moe_intermediate_size": 30})
    with pytest.raises(MinisglError, match="expert width that divides by 4, but the model's is 30"):
        config.for_rank(TPGroup(rank=0, size=4))


def test_checkpoint_missing_an_expert_is_rejected(tiny: dict[str, Path], tmp_path: Path) -> None:
    path = tiny["mixtral"]
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(MinisglError, match="lacks 1 weight, e.g. 'model.layers.1.mlp.experts.down_proj'"):
        small_runner(tmp_path, _config(path))
    fewer = ModelConfig.from_hf({**json.loads((path / "config.json").read_text()), "num_local_experts": 3})
    with pytest.raises(MinisglError, match="unexpected tensor .*experts.3"):
        small_runner(path, fewer)
