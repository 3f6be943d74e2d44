"""Prompts -> token ids. A prompt is a string, a list of token ids, or a chat (a list of
{"role", "content"} messages rendered with the tokenizer's chat template and the generation prompt), or a
ChatPrompt: a chat with what else its template takes (tool definitions, options such as Qwen3's
enable_thinking)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

from minisgl_cli.errors import UsageError

Message = Mapping[str, Any]


@dataclass
class ChatPrompt:
    """Chat messages with the rest of what the chat template is given: `tools` (OpenAI's function tools, as
    the template's `tools` variable) and `template_kwargs` (extra template variables)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)


Prompt = str | Sequence[int] | Sequence[Message] | ChatPrompt
# Template variables a request may not set: the chat itself is given by the messages and tools.
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "add_generation_prompt", "tokenize", "documents"}
)


def split_prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt or a list of them -> a list of prompts.

    A list of ints is one token-id prompt and a list of dicts is one chat; any other list is a list of prompts.
    """
    if isinstance(prompts, (str, ChatPrompt)) or is_token_ids(prompts) or _is_chat(prompts):
        return [prompts]  # type: ignore[list-item]
    if isinstance(prompts, Sequence):
        return list(prompts)  # type: ignore[arg-type]
    raise UsageError(
        f"a prompt must be a string, a list of token ids or a list of chat messages, not {type(prompts).__name__}"
    )


def encode_prompt(prompt: Prompt, tokenizer: Any | None, vocab_size: int) -> list[int]:
    """Token ids of one prompt; UsageError if it is empty, malformed, or needs a tokenizer the model lacks."""
    if isinstance(prompt, str):
        ids = _require(tokenizer, "text prompts").encode(prompt)
    elif is_token_ids(prompt):
        ids = [int(t) for t in prompt]  # type: ignore[union-attr]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise UsageError(
                f"prompt token id {bad[0]} is out of range: the vocabulary has {vocab_size} tokens"
            )
    elif isinstance(prompt, ChatPrompt):
        tokenizer = _require(tokenizer, "chat messages")
        ids = _encode_chat(
            tokenizer, prompt.messages, tools=prompt.tools, template_kwargs=prompt.template_kwargs
        )
    elif _is_chat(prompt):
        ids = _encode_chat(_require(tokenizer, "chat messages"), prompt)  # type: ignore[arg-type]
    else:
        raise UsageError(
            "a prompt must be a string, a list of token ids or a list of {'role', 'content'} messages"
        )
    if not ids:
        raise UsageError("a prompt is empty: it must hold at least one token")
    return list(ids)


def _encode_chat(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    for m in messages:
        # An assistant turn that made tool calls may have no text (OpenAI sends content null).
        no_text = m.get("content") is None and m.get("role") == "assistant" and m.get("tool_calls")
        if not isinstance(m.get("role"), str) or not (isinstance(m.get("content"), str) or no_text):
            raise UsageError(f"a chat message needs string 'role' and 'content' fields, got {dict(m)!r}")
    reserved = RESERVED_TEMPLATE_VARIABLES & set(template_kwargs or {})
    if reserved:
        raise UsageError(f"chat template variable '{sorted(reserved)[0]}' is set by the request itself")
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            "this model's tokenizer has no chat template: pass a text prompt instead of messages"
        )
    # Render to text, then encode without special tokens: the template writes any BOS itself, and the
    # text form behaves the same across transformers versions (whose tokenize=True return types differ).
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tools=tools or None,
            tokenize=False,
            add_generation_prompt=True,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # noqa: BLE001 - a template raises what its author chose (jinja's raise_exception)
        raise UsageError(f"the chat template refused these messages: {exc}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def _require(tokenizer: Any | None, what: str) -> Any:
    if tokenizer is None:
        raise UsageError(f"{what} need a tokenizer and this model has none: pass token ids instead")
    return tokenizer


def is_token_ids(x: object) -> bool:
    """A non-empty sequence of ints (bools excluded): one prompt given as token ids."""
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and len(x) > 0
        and all(isinstance(t, Integral) and not isinstance(t, bool) for t in x)
    )


def _is_chat(x: object) -> bool:
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and len(x) > 0
        and all(isinstance(m, Mapping) for m in x)
    )
