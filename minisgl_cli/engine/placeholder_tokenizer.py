"""The tokenizer of a built-in shape (`--dummy-weights -m llama-3.1-8b`, no model files): a placeholder, so
every text path (the OpenAI endpoints, chat, stop strings, `bench serve` against a server) runs on a
dummy-weight model as it does on a real one, at the model's real vocabulary size.

It is byte-level: ids 0..255 are the 256 bytes, so any text encodes (one token per byte: text prompts are
longer in tokens than with the real tokenizer), and every other id decodes to a word of its own, " t1234",
so a random model's output reads as distinct words. The model's eos and bos ids are special tokens, and
the chat template is a plain "role: content" transcript. Nothing here resembles the real model's tokens;
performance figures use token ids, which do not depend on it.
"""

from __future__ import annotations

from typing import Any

_NUM_BYTES = 256
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def byte_symbols() -> list[str]:
    """The printable character that stands for each byte in a byte-level vocabulary (the GPT-2 scheme):
    printable Latin-1 bytes stand for themselves, the others for the code points from 256 up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = _NUM_BYTES
    for b in range(_NUM_BYTES):
        if b not in symbols:
            symbols[b] = chr(extra)
            extra += 1
    return [symbols[b] for b in range(_NUM_BYTES)]


def placeholder_tokenizer(hf_config: dict[str, Any]) -> Any:
    """A transformers fast tokenizer over `hf_config`'s vocabulary size, as described above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size = int(hf_config["vocab_size"])
    if vocab_size < _NUM_BYTES:
        raise ValueError(f"a byte-level placeholder needs a vocabulary of 256 or more, not {vocab_size}")
    eos = _ids(hf_config.get("eos_token_id"))
    bos = _ids(hf_config.get("bos_token_id"))
    # eos/bos ids past the bytes get names of their own; one among the bytes (a small vocab's eos 2) stays
    # that byte.
    special = {i: f"<|eos_{i}|>" for i in eos if i >= _NUM_BYTES}
    special |= {i: f"<|bos_{i}|>" for i in bos if i >= _NUM_BYTES and i not in special}
    space = byte_symbols()[ord(" ")]
    names = [*byte_symbols(), *(special.get(i, f"{space}t{i}") for i in range(_NUM_BYTES, vocab_size))]
    tokenizer = Tokenizer(models.BPE(vocab={name: i for i, name in enumerate(names)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=names[eos[0]] if eos else None,
        bos_token=names[bos[0]] if bos else None,
        additional_special_tokens=list(special.values()),
        chat_template=_CHAT_TEMPLATE,
    )
    return wrapped


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
