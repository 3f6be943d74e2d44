"""Refusing a prompt far over the context length without tokenizing all of it.

A text prompt (or a chat's text) of more than (context_length + 1) * CHARS_PER_TOKEN characters is first
tokenized on a prefix of that many characters only. If that prefix alone already holds the context length
(less BOUNDARY_TOKENS, for what cutting the text can add), the whole prompt can hold no fewer tokens, and it is
refused with the scheduler's error for a too-long prompt, saying how many tokens it has at least; otherwise
the whole prompt is tokenized as usual and the scheduler decides. A 10 MB prompt is refused after tokenizing
its first few hundred KB instead of all of it. A token-id prompt needs no tokenizing: its length is known.

CHARS_PER_TOKEN = 8: a token of a natural-language or code vocabulary averages 3-5 characters (SmolLM2's on
English prose: 4), so any prompt of ordinary text that overflows the context overflows it within twice that.
Text with longer tokens on average (long runs of spaces or of one symbol, which vocabularies merge into
tokens of up to ~80 characters) passes the prefix test and is tokenized whole: correct, only slower. The
prefix costs 8 characters per context token: 64K characters for an 8K context, 1M for a 128K one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from minisgl_cli.engine.tokenize import ChatPrompt, Prompt, is_token_ids
from minisgl_cli.errors import InvalidParameter

CHARS_PER_TOKEN = 8
# The prefix is cut just before a whitespace character where it can be (pre-tokenizers split there, so the
# tokens before the cut are the whole text's); this allows for the few that a cut elsewhere can add.
BOUNDARY_TOKENS = 16
_CHAT_SEPARATOR = "\n\n"  # between the messages' texts: a pre-token boundary, as the template's markup is


class PromptTooLong(InvalidParameter):
    """A prompt that leaves no room for a new token in the context: HTTP 400, context_length_exceeded."""

    code = "context_length_exceeded"


def check_length(prompt: Prompt, tokenizer: Any | None, context_length: int) -> None:
    """PromptTooLong if the prompt is known to hold `context_length` tokens or more, judged from its length
    (token ids) or from a bounded prefix of its text; nothing when that cannot tell (the prompt is then
    tokenized in full, and the scheduler checks its exact length)."""
    if is_token_ids(prompt):
        count = len(prompt)  # type: ignore[arg-type]
        if count >= context_length:
            raise _too_long(f"has {count}", context_length, "prompt")
        return
    if tokenizer is None:
        return  # text needs a tokenizer: encoding it fails with its own error
    limit = (context_length + 1) * CHARS_PER_TOKEN
    if isinstance(prompt, str):
        text, param, special = prompt, "prompt", True
    elif isinstance(prompt, (ChatPrompt, Sequence)):
        text, param, special = _chat_text(prompt, limit), "messages", False
    else:
        return  # malformed: encoding it fails with its own error
    if len(text) <= limit:
        return
    count = len(tokenizer.encode(_prefix(text, limit), add_special_tokens=special)) - BOUNDARY_TOKENS
    if count >= context_length:
        raise _too_long(f"has at least {count}", context_length, param)


def _too_long(has: str, context_length: int, param: str) -> PromptTooLong:
    # The scheduler's words for a prompt that leaves no room (engine/scheduler.py's check_prompt).
    return PromptTooLong(
        f"the prompt {has} tokens and the context length is {context_length}: "
        "it must be shorter to leave room for at least one new token",
        param,
    )


def _prefix(text: str, limit: int) -> str:
    """The first `limit` characters, cut before the last whitespace in their second half if there is one."""
    cut = max(text.rfind(space, limit // 2, limit) for space in (" ", "\n", "\t"))
    return text[:cut] if cut > 0 else text[:limit]


def _chat_text(prompt: ChatPrompt | Sequence[Any], limit: int) -> str:
    """The messages' texts joined, or "" when they total no more than `limit` characters (the common case:
    nothing is joined). The chat template only adds to them, so their tokens bound the prompt's from below."""
    messages = prompt.messages if isinstance(prompt, ChatPrompt) else prompt
    texts = [m["content"] for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), str)]
    if sum(map(len, texts)) + len(_CHAT_SEPARATOR) * len(texts) <= limit:
        return ""
    return _CHAT_SEPARATOR.join(texts)
