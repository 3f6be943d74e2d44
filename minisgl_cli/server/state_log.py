"""The scheduler's periodic state line, as vLLM and SGLang print it, while requests run:

    running 12 reqs, waiting 3, prompt 1,234 tok/s, generation 456 tok/s, KV 37.5% used, prefix-cache hit 42.0%

Rates and the prefix-cache hit rate are over the interval since the previous line (the hit rate of the
prompts admitted in it; "n/a" when none was); running, waiting and KV use are as they are now. "prompt"
counts the prompt tokens the model computed (prefix-cache hits cost nothing, so they are left out; a
preempted request's recomputed tokens are in). A line is due `interval` seconds after the previous one or
after work arrived on an idle engine; once the engine is idle, the next line is the last until work comes
back, so an idle server's log stays quiet.

The counters are the scheduler's own (Scheduler.stats(), the ones /metrics reports): nothing is counted
twice. The caller passes the clock, which it reads once per loop iteration anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from minisgl_cli.wording import plural

if TYPE_CHECKING:
    from minisgl_cli.engine.scheduler import SchedulerStats


@dataclass(frozen=True)
class _Counts:
    """The scheduler's cumulative counters at one moment: an interval's figures are differences of two."""

    prefilled: int = 0
    generated: int = 0
    prefix_hit: int = 0
    prefix_queried: int = 0

    @classmethod
    def of(cls, stats: SchedulerStats) -> _Counts:
        return cls(
            stats.tokens_prefilled,
            stats.tokens_generated,
            stats.prefix_hit_tokens,
            stats.prefix_queried_tokens,
        )


def _rate(tokens: int, seconds: float) -> str:
    per_s = tokens / seconds if seconds > 0 else 0.0
    # A CPU decodes a few tokens a second, where whole numbers would hide the difference between 1 and 2.
    return f"{per_s:,.1f}" if per_s < 100 else f"{per_s:,.0f}"


def state_line(stats: SchedulerStats, since: _Counts, seconds: float) -> str:
    """The line for an interval of `seconds` that began at the counters `since` and ends at `stats`."""
    now = _Counts.of(stats)
    queried = now.prefix_queried - since.prefix_queried
    hit = f"{100 * (now.prefix_hit - since.prefix_hit) / queried:.1f}%" if queried else "n/a"
    kv = 100 * stats.pages_used / stats.pages_total if stats.pages_total else 0.0
    return (
        f"running {plural(stats.num_running, 'req')}, waiting {stats.num_waiting}, "
        f"prompt {_rate(now.prefilled - since.prefilled, seconds)} tok/s, "
        f"generation {_rate(now.generated - since.generated, seconds)} tok/s, "
        f"KV {kv:.1f}% used, prefix-cache hit {hit}"
    )


class StateLog:
    """When the state line is due, and the counters its interval began with. `interval` 0: never."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._since = _Counts()  # the scheduler's counters start at zero
        self._started = 0.0  # when the current interval began
        self._active = False  # work ran since the last line

    def due(self, now: float, busy: bool) -> bool:
        """Whether to log a line at `now`; `busy`: the engine has (or just had) requests."""
        if self.interval <= 0:
            return False
        if busy and not self._active:
            # Work arrived on an idle engine: its first interval starts now, so the rates are not diluted
            # by the idle time before (nothing was counted during it).
            self._active = True
            self._started = now
        return self._active and now - self._started >= self.interval

    def line(self, now: float, stats: SchedulerStats, busy: bool) -> str:
        """The line that is due at `now`, and start the next interval; `busy` False: the engine is idle, so
        this line is the last until work arrives."""
        text = state_line(stats, self._since, now - self._started)
        self._since = _Counts.of(stats)
        self._started = now
        self._active = busy
        return text
