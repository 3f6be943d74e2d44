"""Token embedding and the LM head (which may share the embedding's weight), both vocab-parallel.

The vocab V is padded up to a multiple P of tp (as vLLM does) and rank r holds rows [r * P / tp,
(r + 1) * P / tp) of the table, so every rank holds as many rows; the padding rows are zeros that no
token id reaches and whose logits are cut off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisgl_cli.engine.distributed import Shard, TPGroup, WeightSlice


class VocabParallel(nn.Module):
    """This rank's rows of a [vocab_size, hidden_size] table (a fresh parameter, or `shared`)."""

    def __init__(
        self, vocab_size: int, hidden_size: int, tp: TPGroup, shared: nn.Parameter | None = None
    ) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = tp.shard(-(-vocab_size // tp.size) * tp.size)
        self.real_rows = max(0, min(self.rows.size, vocab_size - self.rows.start))
        if shared is not None:
            self.weight = shared
        else:
            self.weight = nn.Parameter(torch.empty(self.rows.size, hidden_size), requires_grad=False)
            self.weight[self.real_rows :].zero_()

    def weight_slices(self) -> dict[str, list[WeightSlice]]:
        source = Shard(self.rows.start, self.real_rows, self.vocab_size)
        return {"weight": [WeightSlice(None, 0, self.weight[: self.real_rows], source)]}


class Embedding(VocabParallel):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids of other ranks' rows look up row 0 and are zeroed, so the sum over ranks is each id's row.
        local = input_ids - self.rows.start
        outside = (local < 0) | (local >= self.rows.size)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(x)


class LMHead(VocabParallel):
    """Hidden states -> logits over the whole vocab on every rank (each computes its rows' logits, then they
    are gathered), in the activations' dtype: the GEMM rounds to it anyway, so a float32 copy would hold no
    more information and cost a pass over [B, vocab] (the sampler reads either). With `tied_to`, it reuses
    that embedding's weight, shard and all."""

    def __init__(
        self, vocab_size: int, hidden_size: int, tp: TPGroup, tied_to: Embedding | None = None
    ) -> None:
        super().__init__(vocab_size, hidden_size, tp, shared=None if tied_to is None else tied_to.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(F.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
