"""OpenAI's logit_bias: per request, numbers added to chosen tokens' logits before sampling.

One scatter-add for the whole step: the (row, token, bias) triples of every biased row go to the device in one
pinned copy, so a batch pays nothing when no request asks and one small kernel when some do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minisgl_cli.engine.host_copy import to_device


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float]]) -> None:
    """Add biases[i] to row i of `logits` in place ([B, V]; an empty dict leaves its row as it is)."""
    rows, tokens, values = [], [], []
    for row, bias in enumerate(biases):
        for token, value in bias.items():
            rows.append(row)
            tokens.append(token)
            values.append(value)
    if not rows:
        return
    index = to_device([rows, tokens], torch.int64, logits.device)
    add = to_device(values, torch.float32, logits.device).to(logits.dtype)
    logits.index_put_((index[0], index[1]), add, accumulate=True)
