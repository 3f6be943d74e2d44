"""The Triton Gumbel-max kernel against the sampler's PyTorch draw (same hash, computed in the kernel from the
seeds and steps, so the same tokens), and its token frequencies against softmax(logits / T). CUDA only."""

from __future__ import annotations

import pytest
import torch

from minisgl_cli.engine.sampling import row_keys, seeded_uniform

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _seed_steps(n: int, seed: int) -> torch.Tensor:
    """[n, 3] (seed low, seed high, step), as a strided view like RandomRows.seed_steps."""
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**32, (n, 2), generator=g, dtype=torch.int64)
    steps = torch.randint(0, 5000, (n, 1), generator=g, dtype=torch.int64)
    return torch.cat([torch.zeros(n, 1, dtype=torch.int64), seeds, steps], dim=1).cuda()[:, 1:]


@pytest.mark.parametrize("vocab", [384, 49152, 151936])
def test_fused_draw_picks_the_pytorch_draws_token(vocab: int) -> None:
    from minisgl_cli.engine.fused_sampling import gumbel_argmax

    torch.manual_seed(vocab)
    rows = 64
    logits = torch.randn(rows, vocab, device="cuda") * 3
    temps = torch.rand(rows, 1, device="cuda") * 1.5 + 0.1
    seed_steps = _seed_steps(rows, vocab)
    u = seeded_uniform(row_keys(seed_steps[:, :2], seed_steps[:, 2]), vocab)
    want = (logits / temps - (-u.log()).log()).argmax(-1)
    got = gumbel_argmax(logits, seed_steps, temps)
    assert (got == want).float().mean().item() == 1.0


def test_fused_draw_frequencies_follow_the_softmax() -> None:
    from minisgl_cli.engine.fused_sampling import gumbel_argmax

    vocab, rows = 8, 200_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 0.3, 1.5], device="cuda").expand(rows, vocab)
    temps = torch.full((rows, 1), 0.7, device="cuda")
    tokens = gumbel_argmax(logits, _seed_steps(rows, 1), temps)
    freq = torch.bincount(tokens, minlength=vocab).double() / rows
    want = (logits[0].double() / 0.7).softmax(-1)
    assert (freq - want).abs().max().item() < 5e-3  # 200k draws: the standard error is below 1.2e-3
