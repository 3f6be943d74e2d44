"""Batched sampling: one step's B requests, each with its own SamplingParams, in a few vectorised ops.

API
---
``SamplingBatch.build(params, seeds, steps, device=..., penalty_states=None) -> SamplingBatch``
    Host-side, once per step: turns the batch's parameters into small device tensors (two host->device
    copies, from pinned memory, that never block: engine/host_copy.py) and decides which work the step
    needs at all: an all-greedy batch is a bare argmax, sorting happens only when some row uses top_k or
    top_p, penalties and logprobs only when some row asks.
    ``seeds[i]``: the request's seed (the scheduler draws a random one when the user gave none);
    ``steps[i]``: tokens the request has generated so far, one still in flight on the device included
    (overlap scheduling), so a token's draw does not depend on the mode. ``penalty_states[i]``: the request's
    `PenaltyState` (engine/penalties.py), required for rows with a penalty, ignored for the others.
``sample(logits, sb) -> SampleOutput``
    logits: [B, V] of each row's last token (float32, or the model's half-precision dtype). No host sync;
    returns device tensors.
``SamplingBatch.commit(token_ids)``
    After sampling, counts the sampled ids into the penalised rows' states (a no-op without penalties).
``SampleOutput.to_host() -> list[SampledToken]``
    The step's single device->host copy: ids (+ logprobs where asked), one entry per row.
``PendingResults.start(out)`` then ``.to_host()``
    The same copy split in two for overlap scheduling: `start` queues non-blocking copies into pinned
    host memory and records an event; `to_host` waits for that event only, then reads the host copies.

How the scheduler (E3) calls it each step, for the rows that produce a token this step (a prefill chunk
that is not a prompt's last produces none, so slice its row out of the logits)::

    sb = SamplingBatch.build([r.sampling for r in reqs], [r.seed for r in reqs],
                             [r.num_sampled for r in reqs], device=device,
                             penalty_states=[r.penalty_state for r in reqs])
    out = sample(logits[rows], sb)
    sb.commit(out.token_ids)
    pending = PendingResults.start(out)  # then launch the next step, and only then:
    for req, tok in zip(reqs, pending.to_host()):
        ...  # append tok.token_id, tok.logprob, tok.top_logprobs

A request with a penalty gets ``PenaltyState.create(prompt_ids, vocab_size, device)`` when admitted
(``create(..., output_ids=generated)`` when a preempted one is recomputed); see engine/penalties.py.

Semantics
---------
Greedy (temperature 0 or top_k 1): argmax of the penalised logits. Otherwise: penalties, temperature,
then top_k, top_p (smallest set whose probability reaches top_p, at least one token), min_p (drop
tokens whose probability is below min_p times the largest), all on the temperature-scaled distribution.
The token is drawn with the Gumbel-max trick, ``argmax(logit / T + g)`` with ``g = -log(-log u)``,
where ``u`` comes from an integer hash of (seed, step, token id): a row's draw depends on nothing else
in the batch, so the same seed gives the same tokens in any batch, at any position, on any device
(the hash is exact integer arithmetic). ``u`` has 23 random bits, so g <= 16.6: a token whose
probability is below about e^-19 of the top one can never be drawn.

Logprobs are vLLM's "processed" logprobs without sampling transforms: the log-softmax of the logits
after penalties, before temperature, top_k, top_p and min_p. A row with logprobs=N gets the chosen
token's logprob and the N most likely tokens' ids and logprobs (N=0: the chosen token's only).

Memory: a sampled row needs a few [V] int64 temporaries for the hash (S*V*8 bytes each for S sampled
rows). On CUDA, batches that filter nothing (temperature only) take a fused Triton kernel instead, which
hashes in registers and reads the logits once (engine/fused_sampling.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minisgl_cli.engine.host_copy import to_device
from minisgl_cli.engine.penalties import PenaltyBatch, PenaltyState
from minisgl_cli.engine.request import SamplingParams

_MASK32 = 0xFFFFFFFF
# Disabled filters get values no row can reach, so one vectorised comparison serves every row.
_NO_TOP_K = 1 << 62
_NO_TOP_P = 2.0


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit integer hash (Wellons' lowbias32 shape) of int64 values in [0, 2^32).

    Both multipliers are below 2^31, so every product stays below 2^63: exact in int64, no overflow.
    """
    x = x ^ (x >> 16)
    x *= 0x21F0AAAD
    x &= _MASK32
    x ^= x >> 15
    x *= 0x735A2D97
    x &= _MASK32
    x ^= x >> 15
    return x


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[S, 2] int64 hash keys of each row's (seed, step); seeds as [S, 2] (low, high 32 bits)."""
    k1 = mix32(mix32(mix32(seeds[:, 0]) ^ seeds[:, 1]) ^ (steps & _MASK32))
    k2 = mix32(k1 ^ 0x5BD1E995)
    return torch.stack([k1, k2], dim=1)


def seeded_uniform(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[S, V] float32 uniforms in (0, 1), a pure function of each row's keys and the token id."""
    ids = torch.arange(vocab_size, dtype=torch.int64, device=keys.device)
    h = mix32(ids ^ keys[:, 0:1])
    h += keys[:, 1:2]
    h &= _MASK32
    h = mix32(h)
    # 23 bits: (k + 0.5) / 2^23 is exact in float32 and never 0 or 1, so both logs stay finite.
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


@dataclass
class RandomRows:
    """The rows that sample (temperature > 0, top_k != 1) and their per-row parameters."""

    rows: torch.Tensor | None  # [S] int64 batch rows; None means every row
    seed_steps: torch.Tensor  # [S, 3] int64: seed's low and high 32 bits, step (the hash's inputs)
    temperatures: torch.Tensor  # [S, 1] float32
    top_ks: torch.Tensor | None  # [S, 1] int64; None when no row uses top_k
    top_ps: torch.Tensor | None  # [S, 1] float32; None when no row uses top_p
    min_ps: torch.Tensor | None  # [S, 1] float32 log(min_p); None when no row uses min_p

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        batch_size: int,
        rows: list[int],
        device: torch.device | str,
    ) -> RandomRows:
        floats = to_device(
            [[p.temperature, p.top_p if p.top_p < 1.0 else _NO_TOP_P, p.min_p] for p in params],
            torch.float32,
            device,
        )
        ints = to_device(
            [
                [p.top_k if p.top_k > 0 else _NO_TOP_K, (s % 2**64) & _MASK32, (s % 2**64) >> 32, t]
                for p, s, t in zip(params, seeds, steps, strict=True)
            ],
            torch.int64,
            device,
        )
        return cls(
            rows=None if len(rows) == batch_size else to_device(rows, torch.int64, device),
            seed_steps=ints[:, 1:4],
            temperatures=floats[:, 0:1],
            top_ks=ints[:, 0:1] if any(p.top_k > 0 for p in params) else None,
            top_ps=floats[:, 1:2] if any(p.top_p < 1.0 for p in params) else None,
            min_ps=floats[:, 2:3].log() if any(p.min_p > 0.0 for p in params) else None,
        )

    @property
    def keys(self) -> torch.Tensor:
        """[S, 2] int64 hash keys (row_keys), computed when asked: a few dozen small ops, which the fused
        draw does in its kernel instead."""
        return row_keys(self.seed_steps[:, 0:2], self.seed_steps[:, 2])

    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled logits [S, V] with the tokens top_k / top_p / min_p drop set to -inf."""
        x = logits / self.temperatures
        if self.top_ks is not None or self.top_ps is not None:
            # One stable sort serves both filters and keeps tie-breaking a function of the row alone.
            sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
            drop = torch.zeros_like(sorted_x, dtype=torch.bool)
            if self.top_ks is not None:
                ranks = torch.arange(x.shape[1], device=x.device)
                drop |= ranks >= self.top_ks
                sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            if self.top_ps is not None:
                probs = sorted_x.softmax(dim=-1)
                # Keep a token while the mass strictly before it is below top_p; the first is always kept.
                drop |= (probs.cumsum(dim=-1) - probs) >= self.top_ps
            x = x.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))
        if self.min_ps is not None:
            # p_i < min_p * p_max  <=>  x_i - x_max < log(min_p): no softmax needed.
            x = x.masked_fill(x < x.amax(dim=-1, keepdim=True) + self.min_ps, float("-inf"))
        return x

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """Gumbel-max draw of one token id per row from the filtered distribution."""
        if logits.is_cuda and self.top_ks is None and self.top_ps is None and self.min_ps is None:
            # Temperature only: one fused pass over the logits (any float dtype, read as float32), the same
            # hash and token (fused_sampling.py).
            from minisgl_cli.engine.fused_sampling import gumbel_argmax

            return gumbel_argmax(logits, self.seed_steps, self.temperatures)
        u = seeded_uniform(self.keys, logits.shape[1])
        return (self.filter(logits.float()) - (-u.log()).log()).argmax(dim=-1)


@dataclass
class SamplingBatch:
    """Everything one sampling step needs, built once per step from the batch's parameters."""

    batch_size: int
    random: RandomRows | None  # None when every row is greedy
    penalties: PenaltyBatch | None  # None when no row has a penalty
    num_top_logprobs: list[int | None]  # per row: None (no logprobs) or N
    max_top_logprobs: int | None  # None when no row asks for logprobs

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        *,
        device: torch.device | str = "cpu",
        penalty_states: Sequence[PenaltyState | None] | None = None,
    ) -> SamplingBatch:
        if not len(params) == len(seeds) == len(steps):
            raise ValueError("params, seeds and steps must have one entry per request")
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        num_top = [p.logprobs for p in params]
        asked = [n for n in num_top if n is not None]
        return cls(
            batch_size=len(params),
            random=RandomRows.build(
                [params[i] for i in sampled],
                [seeds[i] for i in sampled],
                [steps[i] for i in sampled],
                len(params),
                sampled,
                device,
            )
            if sampled
            else None,
            penalties=PenaltyBatch.build(params, penalty_states, device),
            num_top_logprobs=num_top,
            max_top_logprobs=max(asked) if asked else None,
        )

    def commit(self, token_ids: torch.Tensor) -> None:
        """Record this step's sampled ids in the penalised requests' states (no-op without penalties)."""
        if self.penalties is not None:
            self.penalties.commit(token_ids)


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None  # None when the request did not ask for logprobs
    top_logprobs: list[tuple[int, float]] | None  # the N most likely (id, logprob), best first


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32 chosen token's logprob; None when no row asked
    top_ids: torch.Tensor | None  # [B, N_max] int64; None when no row asked for N > 0
    top_logprobs: torch.Tensor | None  # [B, N_max] float32
    num_top_logprobs: list[int | None]

    def to_host(self) -> list[SampledToken]:
        ids = self.token_ids.tolist()
        if self.logprobs is None:
            return [SampledToken(t, None, None) for t in ids]
        chosen = self.logprobs.tolist()
        top_ids = self.top_ids.tolist() if self.top_ids is not None else None
        top_lps = self.top_logprobs.tolist() if self.top_logprobs is not None else None
        out: list[SampledToken] = []
        for i, (t, n) in enumerate(zip(ids, self.num_top_logprobs, strict=True)):
            if n is None:
                out.append(SampledToken(t, None, None))
                continue
            top = list(zip(top_ids[i][:n], top_lps[i][:n], strict=True)) if top_ids and top_lps else []
            out.append(SampledToken(t, chosen[i], top))
        return out


@dataclass
class PendingResults:
    """A step's sample output on its way to the host, for overlap scheduling: the step that sampled returns at
    once, and the next step, launched meanwhile, collects the tokens.

    On a GPU, `start` queues non-blocking copies into pinned host tensors and records an event after them;
    `to_host` waits for that event (the one wait on the device a step makes), then reads the host tensors.
    On the CPU the output already is on the host: no copy, no event.
    """

    host: SampleOutput  # the output's tensors on the host (being filled until `ready` fires)
    ready: torch.cuda.Event | None  # None on the CPU

    @classmethod
    def start(cls, out: SampleOutput) -> PendingResults:
        if out.token_ids.device.type != "cuda":
            return cls(out, None)
        optional = (out.logprobs, out.top_ids, out.top_logprobs)
        host = SampleOutput(
            _pinned_copy(out.token_ids),
            *(None if t is None else _pinned_copy(t) for t in optional),
            out.num_top_logprobs,
        )
        ready = torch.cuda.Event()
        ready.record()
        return cls(host, ready)

    def to_host(self) -> list[SampledToken]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.to_host()


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A non-blocking copy of device tensor `t` into pinned host memory, valid once the stream has run it."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def sample(logits: torch.Tensor, sb: SamplingBatch) -> SampleOutput:
    """One token per row of logits [B, V] (any float dtype; the arithmetic is float32) under the batch's
    parameters; no host sync. A greedy row's argmax reads the logits as they are: widening to float32 is
    exact, so it picks the same token."""
    if sb.penalties is not None:
        logits = sb.penalties.apply(logits.float())
    random = sb.random
    if random is None:
        token_ids = logits.argmax(dim=-1)
    elif random.rows is None:
        token_ids = random.draw(logits)
    else:
        token_ids = logits.argmax(dim=-1).index_copy(0, random.rows, random.draw(logits[random.rows]))
    if sb.max_top_logprobs is None:
        return SampleOutput(token_ids, None, None, None, sb.num_top_logprobs)
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_ids = top_lps = None
    if sb.max_top_logprobs > 0:
        top_lps, top_ids = logp.topk(sb.max_top_logprobs, dim=-1)
    return SampleOutput(token_ids, chosen, top_ids, top_lps, sb.num_top_logprobs)
