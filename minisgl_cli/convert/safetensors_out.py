"""Writing a model's tensors as HF safetensors: one file, or shards plus `model.safetensors.index.json`."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ProgressFn = Callable[[int, int, str], None]
"""progress(done, total, tensor_name), called once per tensor written."""

# HF's own convention: one shard stays at or under this size unless a single tensor is bigger.
MAX_SHARD_BYTES = 2 * 10**9
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor, known by shape and dtype before it exists.

    `load` produces it on demand, so shards can be planned up front and only one shard's tensors are in
    memory at a time (an 8B model dequantized to float32 would not fit otherwise).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask. The umask can only be read by setting it; the
    most restrictive value is set meanwhile, so a file another thread creates then is never too open."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a shard is closed when the next tensor would push it past the limit."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_safetensors(
    out_dir: Path,
    specs: Sequence[TensorSpec],
    progress: ProgressFn | None = None,
) -> list[str]:
    """Write `specs` into `out_dir`; returns the file names written (shards, then the index if any)."""
    shards = plan_shards(specs, MAX_SHARD_BYTES)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    done, total = 0, len(specs)
    weight_map: dict[str, str] = {}
    for file_name, shard in zip(names, shards, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        for spec in shard:
            tensor = spec.load()
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                # A converter bug, not a user error: the plan and the data disagree.
                raise AssertionError(
                    f"{spec.name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}"
                )
            tensors[spec.name] = tensor.contiguous()
            weight_map[spec.name] = file_name
            done += 1
            if progress is not None:
                progress(done, total, spec.name)
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        # safetensors writes through a private temporary file (mode 0600); give the shard the mode every other
        # file of the model gets, so a model converted for a shared cache is readable like its config.
        (out_dir / file_name).chmod(_new_file_mode())
    if len(shards) == 1:
        return names
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]
