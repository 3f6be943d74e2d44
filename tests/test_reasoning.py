"""Splitting reasoning from the answer, whole and streamed, against hand-written expectations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minisgl_cli.server.reasoning import (
    PARSERS,
    ReasoningDelta,
    ReasoningParser,
    default_parser,
    split_all,
)

# (output, qwen3's (reasoning, content), a starts-inside parser's (reasoning, content))
CASES: list[tuple[str, tuple[str, str], tuple[str, str]]] = [
    (  # thinking then answer, as Qwen3 writes it
        "<think>\nLet me add 2 and 2.\nThat is 4.\n</think>\n\nThe answer is 4.",
        ("Let me add 2 and 2.\nThat is 4.", "The answer is 4."),
        ("Let me add 2 and 2.\nThat is 4.", "The answer is 4."),
    ),
    (  # output of a model whose prompt ends with <think>
        "Let me add.\nIt is 4.\n</think>\n\nIt is 4.",
        ("", "Let me add.\nIt is 4.\n</think>\n\nIt is 4."),
        ("Let me add.\nIt is 4.", "It is 4."),
    ),
    (  # empty think block
        "<think>\n\n</think>\n\nHi there.",
        ("", "Hi there."),
        ("", "Hi there."),
    ),
    ("<think></think>Hi", ("", "Hi"), ("", "Hi")),
    (  # no think block (enable_thinking=false): untouched answer, or a cut-short reasoning
        "Hello! How can I help?\n",
        ("", "Hello! How can I help?\n"),
        ("Hello! How can I help?\n", ""),
    ),
    (  # cut short inside the reasoning
        "<think>\nStill thinking about it\n",
        ("Still thinking about it\n", ""),
        ("Still thinking about it\n", ""),
    ),
    (  # cut short in the middle of the closing tag
        "<think>\nalmost done\n</thi",
        ("almost done\n</thi", ""),
        ("almost done\n</thi", ""),
    ),
    (  # <think> later in the text is not a think block
        "Sure. Use <think> tags, like <think>x</think> here.",
        ("", "Sure. Use <think> tags, like <think>x</think> here."),
        ("Sure. Use <think> tags, like <think>x", "here."),
    ),
    (  # <think> inside the answer stays in the answer
        "<think>\nhm\n</think>\n\nWrite <think> literally.",
        ("hm", "Write <think> literally."),
        ("hm", "Write <think> literally."),
    ),
    (  # text that looks like the closing tag but is not
        "<think>\nthe tag is </thin and </thinking>, not <think>\n</think>\n\nok </thin",
        ("the tag is </thin and </thinking>, not <think>", "ok </thin"),
        ("the tag is </thin and </thinking>, not <think>", "ok </thin"),
    ),
    ("</thinker>", ("", "</thinker>"), ("</thinker>", "")),
    (  # unicode, multi-code-point emoji included
        "<think>\n考虑一下 🤔 ∑√ 👨‍👩‍👧\n</think>\n\n答案是 42 🎉 café",
        ("考虑一下 🤔 ∑√ 👨‍👩‍👧", "答案是 42 🎉 café"),
        ("考虑一下 🤔 ∑√ 👨‍👩‍👧", "答案是 42 🎉 café"),
    ),
    (  # whitespace before the opening tag; all leading whitespace of the answer goes
        "\n  <think>\nx\n</think>\n \n\t  y\n",
        ("x", "y\n"),
        ("x", "y\n"),
    ),
    (  # only the one formatting newline at each end of the reasoning is dropped
        "<think>\n\n\ntwo blank lines\n\n</think>\n\nA",
        ("\n\ntwo blank lines\n", "A"),
        ("\n\ntwo blank lines\n", "A"),
    ),
    ("<think>\nx\n</think>\n\n", ("x", ""), ("x", "")),  # nothing after the reasoning
    ("<thi", ("", "<thi"), ("<thi", "")),  # a prefix of the tag, then the end
    ("  <thinking>", ("", "  <thinking>"), ("  <thinking>", "")),
    ("\n\n", ("", "\n\n"), ("\n", "")),
    ("", ("", ""), ("", "")),
]

MODES = {"qwen3": 1, "qwen3-thinking": 2, "deepseek-r1": 2}  # which expectation each parser meets


def cases() -> list[tuple[str, str, tuple[str, str]]]:
    return [(name, case[0], case[col]) for name, col in MODES.items() for case in CASES]


def stream(name: str, pieces: list[str]) -> tuple[str, str]:
    parser = PARSERS[name]()
    deltas = [parser.feed(p) for p in pieces] + [parser.finish()]
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas)


@pytest.mark.parametrize(("name", "text", "expected"), cases())
def test_split_all(name: str, text: str, expected: tuple[str, str]) -> None:
    delta = split_all(PARSERS[name](), text)
    assert (delta.reasoning, delta.content) == expected


@pytest.mark.parametrize(("name", "text", "expected"), cases())
def test_every_two_piece_split(name: str, text: str, expected: tuple[str, str]) -> None:
    for i in range(len(text) + 1):
        assert stream(name, [text[:i], text[i:]]) == expected, f"split at {i}: {text[:i]!r} | {text[i:]!r}"


@pytest.mark.parametrize(("name", "text", "expected"), cases())
def test_one_character_at_a_time(name: str, text: str, expected: tuple[str, str]) -> None:
    assert stream(name, list(text)) == expected


@settings(max_examples=300, deadline=None)
@given(
    case=st.sampled_from(cases()),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_random_splits(case: tuple[str, str, tuple[str, str]], cuts: list[int]) -> None:
    name, text, expected = case
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    pieces = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert stream(name, pieces) == expected


def test_partial_closing_tag_is_held_then_released() -> None:
    parser = ReasoningParser()
    assert parser.feed("<think>\nabc</th") == ReasoningDelta(reasoning="abc")
    # "</thi" + "ng" cannot be the tag any more: released as reasoning.
    assert parser.feed("ing>") == ReasoningDelta(reasoning="</thing>")
    assert parser.feed(" more\n") == ReasoningDelta(reasoning=" more")  # newline before a tag, maybe
    assert parser.feed("</") == ReasoningDelta()
    assert parser.feed("think>") == ReasoningDelta()  # the held newline was formatting
    assert parser.feed("Answer") == ReasoningDelta(content="Answer")
    assert parser.finish() == ReasoningDelta()


def test_opening_tag_split_is_held_until_decided() -> None:
    parser = ReasoningParser()
    assert parser.feed("\n") == ReasoningDelta()
    assert parser.feed("<th") == ReasoningDelta()
    assert parser.feed("ink") == ReasoningDelta()
    assert parser.feed(">\n") == ReasoningDelta()
    assert parser.feed("idea") == ReasoningDelta(reasoning="idea")

    parser = ReasoningParser()
    assert parser.feed("<th") == ReasoningDelta()
    assert parser.feed("e answer") == ReasoningDelta(content="<the answer")  # not a tag: content as is


def test_answer_whitespace_in_its_own_pieces() -> None:
    parser = ReasoningParser()
    assert parser.feed("<think>\nr\n</think>") == ReasoningDelta(reasoning="r")
    for piece in ["\n", "\n", " ", "\t"]:
        assert parser.feed(piece) == ReasoningDelta()
    assert parser.feed("  Answer") == ReasoningDelta(content="Answer")
    assert parser.feed("\n\n  next") == ReasoningDelta(content="\n\n  next")  # only leading is stripped


def test_starts_inside_streams_reasoning_at_once() -> None:
    parser = PARSERS["deepseek-r1"]()
    assert parser.feed("\nFirst") == ReasoningDelta(reasoning="First")
    assert parser.feed(", second.\n</think>\n\nDone.") == ReasoningDelta(
        reasoning=", second.", content="Done."
    )


def test_custom_tags() -> None:
    parser = ReasoningParser(start="[R]", end="[/R]")
    assert split_all(parser, "[R]\nwhy\n[/R]\n\nbecause") == ReasoningDelta("why", "because")
    with pytest.raises(ValueError):
        ReasoningParser(start="")


def test_parsers_are_fresh_instances() -> None:
    assert PARSERS["qwen3"]() is not PARSERS["qwen3"]()


QWEN3_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)
QWEN2_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.mark.parametrize(
    ("model_type", "template", "expected"),
    [
        ("qwen3", QWEN3_TEMPLATE, "qwen3"),
        ("qwen3_moe", QWEN3_TEMPLATE, "qwen3"),
        ("qwen3", QWEN2_TEMPLATE, None),  # a Qwen3 fine-tune whose template never thinks
        ("qwen3", None, None),
        ("qwen3", "", None),
        ("qwen2", QWEN3_TEMPLATE, None),
        ("llama", QWEN3_TEMPLATE, None),
        (None, QWEN3_TEMPLATE, None),
        (None, None, None),
    ],
)
def test_default_parser(model_type: str | None, template: str | None, expected: str | None) -> None:
    assert default_parser(model_type, template) == expected
    assert expected is None or expected in PARSERS


def test_a_template_that_opens_the_think_block_gets_the_starts_inside_parser() -> None:
    """Qwen3's thinking-2507 templates end the generation prompt with <think>: the output starts inside it."""
    opens = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
    plain = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}{# <think> #}"
    assert default_parser("qwen3", opens) == "qwen3-thinking"
    assert default_parser("qwen3_moe", plain) == "qwen3"
