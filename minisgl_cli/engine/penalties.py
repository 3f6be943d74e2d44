"""Frequency, presence and repetition penalties over per-request token counts kept on the device.

Semantics (the logits are changed in this order, as vLLM does):
- repetition (HF / CTRL): for every token seen in the prompt or the output so far, a positive logit is
  divided by the penalty and a negative one multiplied by it;
- frequency and presence (OpenAI), over the generated tokens only:
  ``logit -= frequency * count + presence * (count > 0)``.

Cost model (the choice the sampler documents): each penalised request owns a `PenaltyState` made once,
at admission, from its prompt (one non-blocking host->device copy of the prompt ids) and updated on the device after
each step from the sampled-ids tensor, so the scheduler never re-sends token histories and the update works
with overlap scheduling, where the ids of step N are not yet on the host while step N+1 is built. Per step
the penalised rows' states are stacked into [P, V] tensors (one copy of P*V elements, the same order of
work as applying the penalty itself) and, after sampling, each state becomes a row view of the updated
stack. Requests without penalties cost nothing. Memory: 5 bytes * vocab per penalised request (float32
counts + bool mask); a state that sits out a step keeps the stack of its last step alive until it is
stacked again or dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minisgl_cli.engine.host_copy import to_device
from minisgl_cli.engine.request import SamplingParams


def needs_penalties(params: SamplingParams) -> bool:
    return (
        params.frequency_penalty != 0.0 or params.presence_penalty != 0.0 or params.repetition_penalty != 1.0
    )


class PenaltyState:
    """One request's token statistics: how often each token was generated, and which were seen at all."""

    def __init__(self, output_counts: torch.Tensor, seen: torch.Tensor) -> None:
        self.output_counts = output_counts  # [V] float32, generated tokens only
        self.seen = seen  # [V] bool, prompt + generated tokens

    @classmethod
    def create(
        cls,
        prompt_ids: Sequence[int],
        vocab_size: int,
        device: torch.device | str,
        output_ids: Sequence[int] = (),
    ) -> PenaltyState:
        """A fresh state; `output_ids` lets a preempted request be rebuilt with its generated tokens."""
        counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = to_device([*prompt_ids, *output_ids], torch.int64, device)
        seen.index_fill_(0, ids, True)
        if output_ids:
            out = ids[len(prompt_ids) :]
            counts.index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
        return cls(counts, seen)


@dataclass
class PenaltyBatch:
    """The penalised rows of one step, stacked for vectorised application."""

    rows: torch.Tensor | None  # [P] int64 rows of the batch; None means every row
    states: list[PenaltyState]
    output_counts: torch.Tensor  # [P, V] float32
    seen: torch.Tensor  # [P, V] bool
    frequency: torch.Tensor  # [P, 1] float32
    presence: torch.Tensor  # [P, 1] float32
    repetition: torch.Tensor  # [P, 1] float32

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        states: Sequence[PenaltyState | None] | None,
        device: torch.device | str,
    ) -> PenaltyBatch | None:
        """None when no row has a penalty; raises ValueError when a penalised row has no state."""
        rows = [i for i, p in enumerate(params) if needs_penalties(p)]
        if not rows:
            return None
        if states is None or len(states) != len(params):
            raise ValueError("penalty_states must give one entry per request when any request has penalties")
        picked: list[PenaltyState] = []
        for i in rows:
            state = states[i]
            if state is None:
                raise ValueError(f"request {i} of the batch has penalties but no PenaltyState")
            picked.append(state)
        coeffs = to_device(
            [
                [params[i].frequency_penalty, params[i].presence_penalty, params[i].repetition_penalty]
                for i in rows
            ],
            torch.float32,
            device,
        )
        return cls(
            rows=None if len(rows) == len(params) else to_device(rows, torch.int64, device),
            states=picked,
            output_counts=torch.stack([s.output_counts for s in picked]),
            seen=torch.stack([s.seen for s in picked]),
            frequency=coeffs[:, 0:1],
            presence=coeffs[:, 1:2],
            repetition=coeffs[:, 2:3],
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalised copy of logits [B, V]; the input is left untouched (the caller may still need it)."""
        sub = logits if self.rows is None else logits[self.rows]
        scaled = torch.where(sub > 0, sub / self.repetition, sub * self.repetition)
        sub = torch.where(self.seen, scaled, sub)
        sub = sub - self.frequency * self.output_counts - self.presence * (self.output_counts > 0)
        if self.rows is None:
            return sub
        return logits.index_copy(0, self.rows, sub)

    def commit(self, token_ids: torch.Tensor) -> None:
        """Count the tokens just sampled ([B] int64, on the device) into the penalised rows' states."""
        chosen = token_ids if self.rows is None else token_ids[self.rows]
        arange = torch.arange(chosen.shape[0], device=chosen.device)
        self.output_counts[arange, chosen] += 1.0
        # A tensor value: assigning the Python scalar True would copy it to the device and sync.
        self.seen.index_put_((arange, chosen), torch.ones_like(chosen, dtype=torch.bool))
        for i, state in enumerate(self.states):
            state.output_counts = self.output_counts[i]
            state.seen = self.seen[i]
