"""Incremental, UTF-8-safe detokenization of one request's generated tokens.

Decoding each token alone breaks multi-byte characters (byte-level BPE splits an emoji or a CJK
character over several tokens) and, for SentencePiece tokenizers, loses the leading space that depends on
the previous token. So each step decodes a small window twice: ids[prefix:read] (text already emitted,
kept as context) and ids[prefix:] (the same plus the new tokens); the difference is the new text. When
that ends in U+FFFD the last character is still incomplete and nothing is emitted until a later token
completes it. The window restarts after every emission, so the cost per token does not grow with the
sequence.

With `prompt_ids`, the prompt's last few tokens are decoded as context and never emitted: the deltas are
then decode(prompt + generated) minus decode(prompt), which is what a SentencePiece tokenizer needs for
the first generated token's leading space; for byte-level BPE it equals decode(generated).
"""

from __future__ import annotations

from typing import Any

# Context tokens decoded before the first generated one, so it decodes as it would mid-sequence.
_PROMPT_CONTEXT = 5
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """push(ids) -> new text; the concatenated deltas plus flush() equal tokenizer.decode(all pushed ids)."""

    def __init__(
        self, tokenizer: Any, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        self._prefix = 0  # start of the decoding window
        self._read = len(self._ids)  # end of the text already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, ids: list[int]) -> str:
        """Text that the new ids complete; "" while a character is still incomplete."""
        self._ids.extend(ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held at the end of the request (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if not final and text.endswith(_INCOMPLETE):
            return ""
        # The emitted window is a prefix of the new one, so its text is a prefix of the new text.
        delta = text[len(emitted) :]
        self._prefix, self._read = self._read, len(self._ids)
        return delta
