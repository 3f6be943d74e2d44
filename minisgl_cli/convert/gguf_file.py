"""Reading a GGUF file: its metadata, and its tensors dequantized to float32 in torch's layout."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from minisgl_cli.convert.dispatch import is_gguf  # lives there: light enough for the CLI to check SRC early
from minisgl_cli.errors import UsageError

T = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K})


@dataclass(frozen=True)
class GGUFFile:
    """An opened GGUF: metadata values by key, and tensors by their GGUF name, in file order."""

    path: Path
    reader: GGUFReader
    tensors: dict[str, ReaderTensor]

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python (int, float, bool, str or list); `default` when absent."""
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UsageError(f"{self.path} lacks the metadata key '{key}'")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape as torch sees it: GGUF lists dimensions fastest-first, torch slowest-first."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def check_dequantizable(self, name: str) -> None:
        tensor_type = self.tensors[name].tensor_type
        if tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise UsageError(  # a file convert does not support, like an unsupported architecture: exit 2
                f"tensor '{name}' in {self.path} has type {tensor_type.name}, "
                f"which convert cannot dequantize (supported: {supported})"
            )

    def load(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32, in torch's layout."""
        self.check_dequantizable(name)
        tensor = self.tensors[name]
        values = dequantize(tensor.data, tensor.tensor_type).reshape(self.shape(name))
        # F32 comes back as a read-only view of the memory-mapped file; torch wants memory it may write.
        if not values.flags.writeable:
            values = values.copy()
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def open_gguf(path: Path) -> GGUFFile:
    """Open and check a GGUF file; every way it can be unreadable is one clear error."""
    if not path.is_file():
        raise UsageError(f"{path} does not exist or is not a file")
    if not is_gguf(path):
        raise UsageError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
    # The reader indexes straight into the memory-mapped bytes, so a cut-off or corrupt file surfaces as
    # whichever of these the first short read trips.
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, struct.error) as exc:
        raise UsageError(f"{path} is truncated or not a valid GGUF file ({exc})") from exc
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise UsageError(f"{path} is truncated: tensor '{tensor.name}' runs past the end of the file")
    return GGUFFile(path=path, reader=reader, tensors={t.name: t for t in reader.tensors})
