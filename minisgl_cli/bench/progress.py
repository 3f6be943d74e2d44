"""How a benchmark run reports its progress (to the bar bench draws), and the tally that keeps it exact.

The units are what moves while a run is going, not what it finishes: offline and prefix runs count output
tokens (each request's own), since requests of one length all finish in the same engine step and a static
batch of transformers finishes all at once; latency runs count steps of a batch (its prefill, then each
decode step); bench serve counts finished requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# A progress callback, told how many units were just done. Runs call it inside their timing: it must be cheap.
Progress = Callable[[int], None]


@dataclass
class Tally:
    """Passes counts on to a Progress callback, `total` in all and never more.

    What a run counts as it goes can differ a little from its total: an engine step's count includes a
    request that ended without a token (its grammar failed), and transformers may run a step past its
    last one and undo it. `finish()` tops the count up to `total`, so a finished run shows N/N.
    """

    report: Progress | None
    total: int
    done: int = 0

    def add(self, n: int) -> None:
        n = min(n, self.total - self.done)
        if n > 0:
            self.done += n
            if self.report is not None:
                self.report(n)

    def finish(self) -> None:
        self.add(self.total - self.done)
