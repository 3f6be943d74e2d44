"""Batched sampling against hand-computed sets, float64 formulas and torch references."""

from __future__ import annotations

import math

import pytest
import torch

from minisgl_cli.engine.penalties import PenaltyState
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.engine.sampling import SamplingBatch, sample, seeded_uniform

V = 64


def build(params: list[SamplingParams], seeds: list[int] | None = None, steps: list[int] | None = None, **kw):
    n = len(params)
    return SamplingBatch.build(params, seeds or list(range(n)), steps or [0] * n, **kw)


def kept(params: SamplingParams, logits: list[float]) -> set[int]:
    """Token ids the filters leave finite for one row."""
    sb = build([params])
    assert sb.random is not None
    x = sb.random.filter(torch.tensor([logits], dtype=torch.float32))
    return {i for i, v in enumerate(x[0].tolist()) if v != float("-inf")}


def reference_kept(params: SamplingParams, logits: list[float]) -> set[int]:
    """Plain float64 loops over the documented semantics: temperature, then top_k, top_p, min_p."""
    x = [v / params.temperature for v in logits]
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    if params.top_k > 0:
        order = order[: params.top_k]
    top = max(x[i] for i in order)
    weights = {i: math.exp(x[i] - top) for i in order}
    total = sum(weights.values())
    kept_ids, mass = [], 0.0
    for i in order:
        if mass >= params.top_p:
            break
        kept_ids.append(i)
        mass += weights[i] / total
    best = max(weights[i] for i in kept_ids)
    return {i for i in kept_ids if weights[i] >= params.min_p * best}


PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]
LOG_PROBS = [math.log(p) for p in PROBS]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_k=100), {0, 1, 2, 3, 4}),
        (SamplingParams(top_p=0.45), {0}),
        (SamplingParams(top_p=0.69), {0, 1}),
        (SamplingParams(top_p=0.71), {0, 1, 2}),
        (SamplingParams(top_p=0.99), {0, 1, 2, 3, 4}),
        (SamplingParams(min_p=0.35), {0, 1}),  # threshold 0.175
        (SamplingParams(min_p=0.25), {0, 1, 2}),  # threshold 0.125
        # top_p on the top-k set renormalised: 0.5/0.85, 0.2/0.85 reach 0.8, so token 2 goes.
        (SamplingParams(top_k=3, top_p=0.8), {0, 1}),
        # temperature 2 flattens to sqrt(p): normalised [.31, .20, .17, .14, .10], top_p 0.6 needs three.
        (SamplingParams(temperature=2.0, top_p=0.6), {0, 1, 2}),
        (SamplingParams(temperature=2.0, min_p=0.5), {0, 1, 2}),  # sqrt ratios .63, .55, .45
    ],
)
def test_filters_keep_hand_computed_sets(params: SamplingParams, expected: set[int]) -> None:
    assert kept(params, LOG_PROBS) == expected
    assert reference_kept(params, LOG_PROBS) == expected


def test_filters_match_float64_reference_on_random_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    cases = [
        SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
        for t in (0.5, 1.0, 1.7)
        for k in (-1, 3, 20)
        for p in (1.0, 0.8, 0.3)
        for m in (0.0, 0.05)
    ]
    logits = torch.randn(len(cases), 40, generator=gen) * 2.0
    sb = build(cases)
    assert sb.random is not None
    x = sb.random.filter(logits)
    for i, params in enumerate(cases):
        got = {j for j, v in enumerate(x[i].tolist()) if v != float("-inf")}
        assert got == reference_kept(params, logits[i].tolist()), params


def test_greedy_is_argmax() -> None:
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(1))
    all_greedy = build([SamplingParams(temperature=0.0), SamplingParams(top_k=1)] * 2 + [SamplingParams(0.0)])
    assert all_greedy.random is None
    assert torch.equal(sample(logits, all_greedy).token_ids, logits.argmax(dim=-1))
    mixed = build(
        [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_k=1)] * 1
        + [SamplingParams()] * 2
    )
    out = sample(logits, mixed).token_ids
    for row in (0, 2):
        assert out[row] == logits[row].argmax()


def test_draw_is_gumbel_max_of_the_hashed_uniforms() -> None:
    gen = torch.Generator().manual_seed(2)
    params = [SamplingParams(temperature=t) for t in (0.3, 0.7, 1.0, 1.5)] * 4
    logits = torch.randn(len(params), V, generator=gen, dtype=torch.float64) * 3
    sb = build(
        params, seeds=[11 * i + 5 for i in range(len(params))], steps=[i % 3 for i in range(len(params))]
    )
    assert sb.random is not None
    u = seeded_uniform(sb.random.keys, V).double()
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float64)[:, None]
    expected = ((logits / temps).log_softmax(-1) - (-u.log()).log()).argmax(dim=-1)
    assert torch.equal(sample(logits.float(), sb).token_ids, expected)


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_frequencies_match_softmax_over_seeds_and_steps() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    probs = logits.softmax(-1)
    n = 20000
    # 5 degrees of freedom: P(chi2 > 30) ~ 1.5e-5; the draw is deterministic, so this cannot flake.
    over_seeds = sample(logits.expand(n, -1), build([SamplingParams()] * n, seeds=list(range(n)))).token_ids
    assert chi_square(over_seeds, probs) < 30.0
    over_steps = sample(
        logits.expand(n, -1), build([SamplingParams()] * n, [7] * n, list(range(n)))
    ).token_ids
    assert chi_square(over_steps, probs) < 30.0
    # Huge and negative seeds reduce mod 2^64 and still sample the right distribution.
    big = sample(
        logits.expand(n, -1), build([SamplingParams()] * n, [2**70 - 3 * i for i in range(n)])
    ).token_ids
    assert chi_square(big, probs) < 30.0


def test_top_k_draws_follow_the_renormalised_distribution() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 20000
    tokens = sample(logits.expand(n, -1), build([SamplingParams(top_k=3)] * n, list(range(n)))).token_ids
    assert set(tokens.tolist()) == {5, 0, 1}
    top = logits[[5, 0, 1]].softmax(-1)
    remapped = torch.tensor([{5: 0, 0: 1, 1: 2}[t] for t in tokens.tolist()])
    assert chi_square(remapped, top) < 25.0  # 2 dof: P ~ 4e-6


def run_steps(
    params: list[SamplingParams], seeds: list[int], logits: torch.Tensor, steps: int
) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in params]
    for step in range(steps):
        sb = build(params, seeds, [step] * len(params))
        for row, tok in enumerate(sample(logits[step], sb).token_ids.tolist()):
            out[row].append(tok)
    return out


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    steps = 12
    row = torch.randn(steps, V, generator=gen)
    target = SamplingParams(temperature=0.9, top_p=0.95)
    alone = run_steps([target], [1234], row[:, None, :], steps)[0]
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=5),
        SamplingParams(min_p=0.2, temperature=1.3),
    ]
    for position in range(len(others) + 1):
        params = others[:position] + [target] + others[position:]
        logits = torch.randn(steps, len(params), V, generator=gen)
        logits[:, position] = row
        got = run_steps(
            params, [99, 5, 7, 8][:position] + [1234] + [99, 5, 7, 8][position : len(others)], logits, steps
        )
        assert got[position] == alone
    different = run_steps([target], [1235], row[:, None, :], steps)[0]
    assert different != alone


def penalty_reference(
    logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams
) -> torch.Tensor:
    """float64 formulas: repetition over prompt + output (HF), then OpenAI frequency/presence over output."""
    x = logits.double().clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


PENALISED = [
    SamplingParams(temperature=0.0, frequency_penalty=0.7, logprobs=2),
    SamplingParams(temperature=0.0, presence_penalty=-1.3, logprobs=0),
    SamplingParams(temperature=0.0, repetition_penalty=1.8, logprobs=5),
    SamplingParams(
        temperature=0.0, frequency_penalty=0.4, presence_penalty=0.5, repetition_penalty=0.6, logprobs=3
    ),
]


def test_penalties_and_logprobs_follow_the_formulas_over_steps() -> None:
    gen = torch.Generator().manual_seed(4)
    prompts = [[1, 2, 3, 3], [4, 5], [6, 1, 1, 9], [2, 8]]
    states = [PenaltyState.create(p, V, "cpu") for p in prompts]
    outputs: list[list[int]] = [[] for _ in PENALISED]
    for step in range(8):
        # Few distinct large logits make repeats (and so counts > 1) likely.
        logits = torch.randn(len(PENALISED), V, generator=gen) * 0.5
        logits[:, 1:4] += 3.0
        logits[:, 40:42] -= 3.0
        logits[:, 1] -= 6.0  # a repeated negative logit exercises the repetition multiply
        sb = build(PENALISED, steps=[step] * 4, penalty_states=states)
        out = sample(logits, sb)
        sb.commit(out.token_ids)
        host = out.to_host()
        for i, p in enumerate(PENALISED):
            ref = penalty_reference(logits[i], prompts[i], outputs[i], p)
            ref_logp = torch.log_softmax(ref, dim=-1)
            assert host[i].token_id == int(ref.argmax())
            assert host[i].logprob == pytest.approx(float(ref_logp[host[i].token_id]), abs=1e-5)
            top = host[i].top_logprobs
            assert top is not None and len(top) == p.logprobs
            ref_top = ref_logp.topk(p.logprobs)
            assert [t for t, _ in top] == ref_top.indices.tolist()
            assert [lp for _, lp in top] == pytest.approx(ref_top.values.tolist(), abs=1e-5)
            outputs[i].append(host[i].token_id)
    for i, state in enumerate(states):
        rebuilt = PenaltyState.create(prompts[i], V, "cpu", output_ids=outputs[i])
        assert torch.equal(state.output_counts, rebuilt.output_counts)
        assert torch.equal(state.seen, rebuilt.seen)
    assert any(len(set(o)) < len(o) for o in outputs)  # the counts were really exercised


def test_missing_penalty_state_is_an_error() -> None:
    with pytest.raises(ValueError, match="PenaltyState"):
        build([SamplingParams(), SamplingParams(presence_penalty=1.0)], penalty_states=[None, None])


def test_logprobs_of_a_sampled_row_are_of_the_untempered_logits() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5))
    params = [
        SamplingParams(temperature=0.5, top_k=4, logprobs=3),
        SamplingParams(),
        SamplingParams(logprobs=0),
    ]
    out = sample(logits, build(params))
    ref = torch.log_softmax(logits.double(), dim=-1)
    host = out.to_host()
    assert host[1].logprob is None and host[1].top_logprobs is None
    assert host[2].top_logprobs == []
    for i in (0, 2):
        assert host[i].logprob == pytest.approx(float(ref[i, host[i].token_id]), abs=1e-5)
    assert [t for t, _ in host[0].top_logprobs] == ref[0].topk(3).indices.tolist()


def test_mixed_batch_gives_each_row_what_it_gives_alone() -> None:
    gen = torch.Generator().manual_seed(6)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, logprobs=2),
        SamplingParams(temperature=1.2, frequency_penalty=1.0, repetition_penalty=1.3),
        SamplingParams(top_k=3),
        SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=1),
        SamplingParams(top_p=0.7, min_p=0.1),
    ]
    seeds = [10, 20, 30, 40, 50, 60]
    prompts = [[1], [2, 3], [4, 4, 5], [6], [7, 8], [9]]
    steps = 10
    logits = torch.randn(steps, len(params), V, generator=gen) * 2

    def run(rows: list[int]) -> list[list[tuple[int, float | None]]]:
        states = [PenaltyState.create(prompts[r], V, "cpu") for r in rows]
        got: list[list[tuple[int, float | None]]] = [[] for _ in rows]
        for step in range(steps):
            sb = build(
                [params[r] for r in rows], [seeds[r] for r in rows], [step] * len(rows), penalty_states=states
            )
            out = sample(logits[step, rows], sb)
            sb.commit(out.token_ids)
            for k, tok in enumerate(out.to_host()):
                got[k].append((tok.token_id, tok.logprob))
        return got

    batched = run(list(range(len(params))))
    for r in range(len(params)):
        alone = run([r])[0]
        assert [t for t, _ in batched[r]] == [t for t, _ in alone]
        assert [lp for _, lp in batched[r]] == pytest.approx([lp for _, lp in alone], abs=1e-6)


def test_sample_leaves_the_logits_untouched() -> None:
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(7))
    before = logits.clone()
    params = [
        SamplingParams(repetition_penalty=2.0, top_k=5),
        SamplingParams(temperature=0.0, frequency_penalty=1.0),
    ]
    states = [PenaltyState.create([1, 2, 3], V, "cpu", output_ids=[4]) for _ in params]
    sample(logits, build(params, penalty_states=states))
    assert torch.equal(logits, before)
