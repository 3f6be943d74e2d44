"""Counts in messages to users: "1 token", "2 tokens", never "1 tokens".

Only for text people read (errors, notes, log lines); JSON keys and metric names keep their fixed plural.
"""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`count` and `noun`, the noun in its plural (`many`, else noun + "s") unless count is exactly 1.

    ``plural(1, "token") == "1 token"``, ``plural(0, "request") == "0 requests"``,
    ``plural(2, "entry", "entries") == "2 entries"``.
    """
    return f"{count} {noun if count == 1 else (many or noun + 's')}"
