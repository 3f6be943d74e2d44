"""Split a reasoning model's output into its reasoning (the think block) and its answer.

A parser is fed the generated text of one choice in order, in pieces cut anywhere (a tag may arrive
split over several pieces), and returns what it can already classify. It holds back only a tail that
could still turn into a tag, so a client never sees part of `<think>` / `</think>`, and the
concatenated output is the same however the text was cut.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial


@dataclass
class ReasoningDelta:
    reasoning: str = ""  # text of the reasoning (the think block's inside), "" if none in this piece
    content: str = ""  # text of the answer


class _State(enum.Enum):
    PREAMBLE = "preamble"  # nothing but whitespace or the start of an opening tag seen yet
    REASONING = "reasoning"  # inside the think block, looking for the closing tag
    ANSWER = "answer"  # past the think block (or there was none): everything is content


class ReasoningParser:
    """One per generated choice, fed the generated text in order.

    `starts_inside=True` is for models whose prompt already ends with the opening tag (DeepSeek-R1,
    Qwen3 thinking-2507): their output begins in the reasoning and only closes it. An opening tag the
    model writes anyway at the very start is dropped rather than shown as reasoning.
    """

    def __init__(self, start: str = "<think>", end: str = "</think>", starts_inside: bool = False) -> None:
        if not start or not end:
            raise ValueError("reasoning tags must be non-empty")
        self._start = start
        self._end = end
        self._starts_inside = starts_inside
        self._state = _State.PREAMBLE
        self._buf = ""  # text fed but not yet emitted
        self._strip_newline = False  # the one "\n" the model writes right after the opening tag
        self._strip_answer = False  # the answer's leading whitespace ("\n\n" after the closing tag)

    def feed(self, text: str) -> ReasoningDelta:
        """Classify the next piece of output; text that could still be part of a tag is held back."""
        return self._step(text, final=False)

    def finish(self) -> ReasoningDelta:
        """End of output: release whatever was held back."""
        return self._step("", final=True)

    def _step(self, text: str, final: bool) -> ReasoningDelta:
        out = ReasoningDelta()
        self._buf += text
        if self._state is _State.PREAMBLE and not self._leave_preamble(final):
            return out
        if self._state is _State.REASONING and not self._reason(out, final):
            return out
        # Answer: no tag is looked for any more, so nothing needs holding back.
        answer, self._buf = self._buf, ""
        if self._strip_answer:
            answer = answer.lstrip()
            self._strip_answer = not answer  # whitespace-only pieces keep the strip pending
        out.content = answer
        return out

    def _leave_preamble(self, final: bool) -> bool:
        """Decide whether the output opens with the start tag; False while it is still undecided."""
        head = self._buf.lstrip()
        if head.startswith(self._start):
            self._buf = head[len(self._start) :]
            self._state = _State.REASONING
            self._strip_newline = True
            return True
        if self._start.startswith(head) and not final:
            return False  # only whitespace and/or a prefix of the tag so far
        if self._starts_inside:
            self._state = _State.REASONING
            self._strip_newline = True  # the prompt's tag is "right before" the output
        else:
            self._state = _State.ANSWER  # no think block: all of it is the answer, untouched
        return True

    def _reason(self, out: ReasoningDelta, final: bool) -> bool:
        """Emit reasoning into `out`; True once the closing tag was passed and the rest is answer."""
        if self._strip_newline and self._buf:
            self._buf = self._buf.removeprefix("\n")
            self._strip_newline = False
        idx = self._buf.find(self._end)
        if idx >= 0:
            out.reasoning = self._buf[:idx].removesuffix("\n")
            self._buf = self._buf[idx + len(self._end) :]
            self._state = _State.ANSWER
            self._strip_answer = True
            return True
        # Cut short (final) means everything left is reasoning, as vLLM and SGLang report it.
        keep = 0 if final else self._held_tail(self._buf)
        cut = len(self._buf) - keep
        out.reasoning, self._buf = self._buf[:cut], self._buf[cut:]
        return False

    def _held_tail(self, buf: str) -> int:
        """Length of the tail that may still become the closing tag, with the newline written before it."""
        keep = 0
        for k in range(min(len(buf), len(self._end) - 1), 0, -1):
            if self._end.startswith(buf[-k:]):
                keep = k
                break
        if keep < len(buf) and buf[len(buf) - keep - 1] == "\n":
            keep += 1  # dropped if the closing tag follows, so it cannot be emitted yet
        return keep


def split_all(parser: ReasoningParser, text: str) -> ReasoningDelta:
    """Split a complete output: feed it whole, then finish."""
    first = parser.feed(text)
    last = parser.finish()
    return ReasoningDelta(first.reasoning + last.reasoning, first.content + last.content)


PARSERS: dict[str, Callable[[], ReasoningParser]] = {
    "qwen3": ReasoningParser,
    "qwen3-thinking": partial(ReasoningParser, starts_inside=True),
    "deepseek-r1": partial(ReasoningParser, starts_inside=True),
}

_QWEN3_MODEL_TYPES = frozenset({"qwen3", "qwen3_moe"})


def default_parser(model_type: str | None, chat_template: str | None) -> str | None:
    """The parser to use when none was asked for: "qwen3" for a Qwen3 model whose template thinks, or
    "qwen3-thinking" when its generation prompt already opens the think block (the thinking-2507 models), so the
    output starts inside it."""
    if model_type in _QWEN3_MODEL_TYPES and chat_template and "<think>" in chat_template:
        opened = re.search(r"<\|im_start\|>assistant(\\n|\n)<think>", chat_template)
        return "qwen3-thinking" if opened else "qwen3"
    return None
