"""Stop strings over a stream of text deltas.

Text is released as soon as it cannot be part of a stop string: only the longest tail of the text seen
so far that is also the beginning of some stop string is held back. A stop string found anywhere in the
held text plus the new delta ends the output right before it (the earliest match over all stop strings
wins), so stop strings spanning several deltas are caught and never shown.
"""

from __future__ import annotations


class StopMatcher:
    """feed(delta) -> (text safe to emit now, whether a stop string matched)."""

    def __init__(self, stops: list[str]) -> None:
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = list(stops)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return text[:cut], True
        keep = self._open_tail(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release held text when the request ends for another reason (eos, length)."""
        held, self._held = self._held, ""
        return held

    def _open_tail(self, text: str) -> int:
        """Length of the longest tail of text that a stop string starts with (shorter than that stop)."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
