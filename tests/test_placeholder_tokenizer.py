"""The placeholder tokenizer of built-in shapes (engine/placeholder_tokenizer.py): any text round-trips byte
by byte at the model's vocabulary size, every other id is a word of its own, eos/bos are the model's ids;
and with it a `--dummy-weights` shape takes text and chat prompts in-process and through `minisgl serve`
(split over 3 ranks here), where the official openai client gets streamed completions.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_helpers import ServerProcess, running_server

from minisgl_cli.engine.builder import load_tokenizer
from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES
from minisgl_cli.engine.placeholder_tokenizer import byte_symbols, placeholder_tokenizer
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.model_source import resolve_model

TEXT = "Hello, wörld! 😀 \t\n  <|x|> t300"
# smollm2-135m: 9 query heads and 3 KV heads split over 3 ranks; a small context keeps CPU start-up quick.
SMALL = ("--kv-cache-tokens", "2048", "--max-running-requests", "4", "--context-length", "512")


def test_byte_symbols_are_256_distinct_printable_characters() -> None:
    symbols = byte_symbols()
    assert len(set(symbols)) == 256 and all(s.isprintable() and not s.isspace() for s in symbols)
    assert symbols[ord("a")] == "a" and symbols[ord(" ")] == "\u0120"  # GPT-2's "Ġ" for the space


@pytest.mark.parametrize("name", ["llama-3.1-70b", "qwen3-8b", "smollm2-135m"])
def test_text_round_trips_and_ids_decode_to_words(name: str) -> None:
    config = BUILTIN_SHAPES[name]
    tok = load_tokenizer(resolve_model(name, dummy_weights=True))
    assert len(tok) == config["vocab_size"]
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert ids == list(TEXT.encode())  # one token per byte
    assert tok.decode(ids) == TEXT
    assert tok.decode([300, 1000, config["vocab_size"] - 1]) == f" t300 t1000 t{config['vocab_size'] - 1}"
    eos = config["eos_token_id"]
    assert tok.eos_token_id == (eos[0] if isinstance(eos, list) else eos)
    assert tok.bos_token_id == config["bos_token_id"]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "user: hi\nassistant:"


def test_a_vocabulary_smaller_than_the_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="256 or more"):
        placeholder_tokenizer({"vocab_size": 100})


def test_a_builtin_shape_takes_text_chat_and_stop_strings_in_process() -> None:
    llm = LLM("smollm2-135m", dummy_weights=True, device="cpu", kv_cache_tokens=2048, max_running_requests=4,
              context_length=512)  # fmt: skip
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = llm.generate([TEXT, [{"role": "user", "content": "hi"}]], greedy)
    assert out[0].usage.prompt_tokens == len(TEXT.encode())
    assert out[1].usage.prompt_tokens == len(b"user: hi\nassistant:")
    for o in out:
        assert o.text == llm.tokenizer.decode(o.token_ids) and len(o.token_ids) == 8
    # A stop string cut from the free-running text ends the request there.
    stop = out[0].text[2:5]
    stopped = llm.generate(TEXT, SamplingParams(temperature=0, max_tokens=8, stop=[stop]))[0]
    assert stopped.finish_reason == "stop" and stopped.text == out[0].text[: out[0].text.index(stop)]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server(
        "--dummy-weights", "-m", "smollm2-135m", "--device", "cpu", "--tp", "3", *SMALL
    ) as srv:
        yield srv


def test_serve_streams_openai_completions_for_a_split_dummy_model(server: ServerProcess) -> None:
    reference = LLM("smollm2-135m", dummy_weights=True, device="cpu", kv_cache_tokens=2048,
                    max_running_requests=4, context_length=512)  # fmt: skip
    messages = [{"role": "user", "content": "Tell me a story."}]
    want = reference.generate([messages], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text and text.startswith(" t")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert "3 cpu ranks (tensor parallel)" in server.log
