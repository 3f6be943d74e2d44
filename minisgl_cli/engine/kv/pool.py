"""KVPool: the preallocated key/value cache of every layer, addressed by slot."""

from __future__ import annotations

import torch

from minisgl_cli.engine.kv.allocator import PADDING_PAGE
from minisgl_cli.engine.layers.fp8 import FP8, FP8_MAX

PADDING_SLOT = PADDING_PAGE  # the first slot of the padding page, whatever the page size


class KVPool:
    """k and v of every layer as [num_slots, num_kv_heads, head_dim] views into one buffer each.

    One allocation per kind (not one per layer) keeps the pool a single block of device memory,
    sized once at start-up; the per-layer views cost nothing. The memory is not cleared (on CPU an
    untouched page costs no RAM) except slot 0, the padding slot: backends point every masked-out
    read there, so it must hold finite values (a NaN times a zero attention weight is still NaN).

    `dtype` is what the pool stores: the model's dtype, or float8_e4m3fn (--kv-cache-dtype fp8_e4m3), which
    holds twice a bf16 pool's tokens in the same memory. FP8 values are stored unscaled (a scale of 1, the
    usual default without calibrated K/V scales), saturated at FP8's largest finite value, 448.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self._k = torch.empty(shape, dtype=dtype, device=device)
        self._v = torch.empty(shape, dtype=dtype, device=device)
        for cache in (self._k, self._v):  # (as bytes: FP8 has no fill kernel; zero bytes are 0.0)
            (cache.view(torch.uint8) if dtype == FP8 else cache)[:, PADDING_SLOT].zero_()

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Memory one token's k and v take over all layers."""
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    def k(self, layer_id: int) -> torch.Tensor:
        return self._k[layer_id]

    def v(self, layer_id: int) -> torch.Tensor:
        return self._v[layer_id]

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the k/v [N, num_kv_heads, head_dim] of N tokens into their slots [N]."""
        if self.dtype == FP8:
            # index_copy_ has no FP8 kernel: copy the bytes. Out-of-range values would cast to NaN.
            for cache, new in ((self._k, k), (self._v, v)):
                fp8 = new.clamp(-FP8_MAX, FP8_MAX).to(FP8)
                cache[layer_id].view(torch.uint8).index_copy_(0, slots, fp8.view(torch.uint8))
            return
        self._k[layer_id].index_copy_(0, slots, k.to(self.dtype))
        self._v[layer_id].index_copy_(0, slots, v.to(self.dtype))
