"""minisgl convert on mixture-of-experts GGUF files: llama.cpp's qwen3moe -> Qwen3MoeForCausalLM, and
Mixtral (llama.cpp's llama with experts) -> MixtralForCausalLM, merged or one tensor per expert.

Tiny random transformers models are saved as HF checkpoints, written as GGUF files the way llama.cpp's
convert_hf_to_gguf.py does (tests/convert_helpers.py), converted back, and must give the checkpoint's
tensors exactly, its config, and transformers' greedy tokens through our engine. A layout these models
do not have (shared experts, a dense MLP in a sparse layer, ...) is refused before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from convert_helpers import Q, hf_checkpoint, moe_gguf_tensors, tiny_moe_model, write_moe_gguf
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from minisgl_cli.convert import convert, convert_gguf
from minisgl_cli.convert.gguf_file import open_gguf
from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.models.config import ModelConfig
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import MinisglError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The GGUF architecture and expert layout of each case.
CASES = {
    "qwen3moe": ("qwen3moe", False),
    "mixtral": ("llama", False),
    "mixtral-split": ("llama", True),  # older Mixtral files: blk.N.ffn_gate.E.weight, one per expert
}
PROMPTS = [[5, 77, 200, 256, 13, 99, 140], [33, 250, 7], [64] * 9 + [180, 3, 258]]


@dataclass
class Converted:
    arch: str
    model: PreTrainedModel
    checkpoint: dict[str, torch.Tensor]  # the HF checkpoint transformers saved
    gguf: Path
    out: Path


@pytest.fixture(scope="module", params=list(CASES))
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    arch, split = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = tiny_moe_model(arch, seed=len(request.param))
    checkpoint = hf_checkpoint(model, root / "original")
    tensors = moe_gguf_tensors(checkpoint, model.config, arch, split_experts=split)
    gguf = write_moe_gguf(root / "tiny.gguf", tensors, model.config, arch)
    return Converted(arch, model, checkpoint, gguf, convert_gguf(gguf, root / "hf"))


def test_moe_tensors_come_back_exactly(moe: Converted) -> None:
    ours = load_file(moe.out / "model.safetensors")
    # Per-expert HF names (experts.<e>.gate_proj / w1 ...), the router as mlp.gate / block_sparse_moe.gate,
    # and Mixtral's q/k back in HF's row order.
    assert set(ours) == set(moe.checkpoint)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, moe.checkpoint[name]), name


def test_moe_config_round_trips_expert_counts_and_top_k(moe: Converted) -> None:
    config = json.loads((moe.out / "config.json").read_text())
    original = moe.model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_experts_per_tok", "vocab_size", "rms_norm_eps"):  # fmt: skip
        assert config[key] == getattr(original, key), key
    if moe.arch == "qwen3moe":
        assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["model_type"] == "qwen3_moe"
        assert (config["num_experts"], config["moe_intermediate_size"]) == (8, 32)
        sparse = {key: config[key] for key in ("norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")}
        assert sparse == {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}
    else:
        assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
        assert (config["num_local_experts"], config["intermediate_size"]) == (4, 48)
        assert "attention_bias" not in config and "mlp_bias" not in config
    # Both readers take it as the original: transformers, and our engine's MoE settings.
    reread = AutoConfig.from_pretrained(moe.out)
    for key in ("num_experts_per_tok", "num_local_experts", "intermediate_size", "head_dim"):
        assert getattr(reread, key) == getattr(original, key), key
    if moe.arch == "qwen3moe":
        assert (reread.moe_intermediate_size, reread.norm_topk_prob) == (32, True)
    ours = ModelConfig.from_hf(config).moe
    assert ours is not None
    assert (ours.num_experts, ours.top_k, ours.renormalize, ours.layers) == (
        original.num_local_experts, 2, True, (0, 1)
    )  # fmt: skip
    assert ours.intermediate_size == (32 if moe.arch == "qwen3moe" else 48)
    assert open_gguf(moe.gguf).get(f"{moe.arch}.expert_used_count") == 2


def test_moe_greedy_tokens_match_transformers(moe: Converted) -> None:
    llm = LLM(str(moe.out), device="cpu", dtype="float32", kv_cache_tokens=1024, max_running_requests=4,
              page_size=1)  # fmt: skip
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    finally:
        llm.close()
    with torch.no_grad():
        for prompt, out in zip(PROMPTS, outs, strict=True):
            want = moe.model.generate(
                torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False
            )[0, len(prompt) :]
            assert out.token_ids == want.tolist(), prompt
        # transformers reads the converted directory as the same model.
        converted = AutoModelForCausalLM.from_pretrained(moe.out, dtype=torch.float32).eval()
        tokens = torch.tensor([PROMPTS[0]])
        torch.testing.assert_close(converted(tokens).logits, moe.model(tokens).logits, rtol=1e-5, atol=1e-5)


# ============================================================== quantized experts, bad layouts


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, dict[str, np.ndarray]]:
    model = tiny_moe_model("qwen3moe", seed=3)
    checkpoint = hf_checkpoint(model, tmp_path_factory.mktemp("qwen") / "original")
    return model, moe_gguf_tensors(checkpoint, model.config, "qwen3moe")


def test_quantized_merged_experts_are_split_per_expert_and_kept_float32(
    qwen: tuple[PreTrainedModel, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    model, tensors = qwen
    # F16 matrices but Q8_0 experts: auto must keep float32, the dequantized experts' exact type.
    q8 = {name: Q.Q8_0 for name in tensors if name.endswith("_exps.weight")}
    gguf = write_moe_gguf(tmp_path / "q8.gguf", tensors, model.config, "qwen3moe", Q.F16, overrides=q8)
    ours = load_file(convert(gguf, tmp_path / "hf") / "model.safetensors")
    reader = open_gguf(gguf)
    proj = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    for name in q8:
        layer, part = name.split(".")[1], name.split(".")[2].removeprefix("ffn_").removesuffix("_exps")
        whole = reader.load(name)
        assert whole.shape[0] == 8
        for e in range(8):
            got = ours[f"model.layers.{layer}.mlp.experts.{e}.{proj[part]}.weight"]
            assert got.dtype == torch.float32 and torch.equal(got, whole[e]), (name, e)
            # Within Q8_0's step of the original weights.
            torch.testing.assert_close(got, torch.from_numpy(tensors[name][e]), rtol=0, atol=0.01)


@pytest.mark.parametrize(
    "extra",
    [
        "blk.0.ffn_gate_shexp.weight",  # Qwen2-MoE's shared expert, which Qwen3-MoE has not
        "blk.1.ffn_gate_inp_shexp.weight",
        "blk.0.ffn_up.weight",  # a dense MLP in a sparse layer
        "blk.1.ffn_gate.3.weight",  # one expert on its own, in a file of merged experts
        "blk.0.exp_probs_b.bias",  # a router bias (DeepSeek-V3's)
    ],
)
def test_unknown_moe_tensors_are_refused_before_anything_is_written(
    qwen: tuple[PreTrainedModel, dict[str, np.ndarray]], tmp_path: Path, extra: str
) -> None:
    model, tensors = qwen
    shape = (32, 64) if extra.endswith(".weight") else (8,)
    bad = {**tensors, extra: np.ones(shape, dtype=np.float32)}
    gguf = write_moe_gguf(tmp_path / "bad.gguf", bad, model.config, "qwen3moe")
    with pytest.raises(MinisglError) as err:
        convert(gguf, tmp_path / "out")
    assert str(err.value) == (
        f"unexpected tensor '{extra}' (not part of a Qwen3-MoE model with 8 experts, stored as merged experts)"
    )
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def test_split_mixtral_refuses_an_expert_past_its_count(tmp_path: Path) -> None:
    model = tiny_moe_model("llama", seed=5)
    checkpoint = hf_checkpoint(model, tmp_path / "original")
    tensors = moe_gguf_tensors(checkpoint, model.config, "llama", split_experts=True)
    tensors["blk.0.ffn_down.4.weight"] = tensors["blk.0.ffn_down.3.weight"]  # a fifth of 4 experts
    gguf = write_moe_gguf(tmp_path / "split.gguf", tensors, model.config, "llama")
    with pytest.raises(MinisglError, match=r"'blk\.0\.ffn_down\.4\.weight' \(not part of a Mixtral model with 4 "
                       r"experts, stored as one tensor per expert\)"):  # fmt: skip
        convert(gguf, tmp_path / "out")


@pytest.mark.parametrize(
    ("arch", "metadata", "drop", "error"),
    [
        ("qwen3moe", {"expert_count": 6}, None,
         r"says it has 6 experts \('qwen3moe\.expert_count'\), but its 'blk\.0\.ffn_gate_exps\.weight' holds 8"),
        ("qwen3moe", {"expert_used_count": 9}, None,
         r"has 'qwen3moe\.expert_used_count' 9, not between 1 and its 8 experts"),
        ("qwen3moe", {"expert_used_count": None}, None, r"lacks the metadata key 'qwen3moe\.expert_used_count'"),
        ("qwen3moe", {"expert_count": None}, None, r"is a qwen3moe model without experts"),
        ("qwen3", {}, None, r"is a qwen3 model with 8 experts, which convert does not support"),
        ("qwen3moe", {}, "blk.1.ffn_down_exps.weight", r"lacks tensor 'blk\.1\.ffn_down_exps\.weight'"),
        ("qwen3moe", {}, "blk.0.ffn_gate_exps.weight", r"needs expert tensors 'blk\.0\.ffn_gate_exps\.weight'"),
    ],
    ids=["count-vs-shape", "top-k-too-big", "no-top-k", "no-count", "dense-arch-with-experts",
         "missing-experts", "no-experts"],
)  # fmt: skip
def test_bad_moe_metadata_is_one_clear_error(
    qwen: tuple[PreTrainedModel, dict[str, np.ndarray]],
    tmp_path: Path,
    arch: str,
    metadata: dict[str, int | None],
    drop: str | None,
    error: str,
) -> None:
    model, tensors = qwen
    kept = {name: values for name, values in tensors.items() if name != drop}
    gguf = write_moe_gguf(tmp_path / "bad.gguf", kept, model.config, arch, metadata=metadata)
    with pytest.raises(MinisglError, match=error) as err:
        convert(gguf, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]
