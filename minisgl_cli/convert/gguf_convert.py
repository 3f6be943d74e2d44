"""GGUF file -> HF model directory (config, generation config, tokenizer, safetensors)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from minisgl_cli.convert.atomic_dir import atomic_output_dir, check_output
from minisgl_cli.convert.dtypes import parse_dtype
from minisgl_cli.convert.gguf_config import GGUFModelInfo, generation_config, hf_config, read_model_info
from minisgl_cli.convert.gguf_file import GGUFFile, open_gguf
from minisgl_cli.convert.gguf_names import (
    ROPE_FREQS,
    hf_tensors,
    permuted_heads,
    required_tensors,
    unpermute_rows,
)
from minisgl_cli.convert.gguf_tokenizer import write_tokenizer
from minisgl_cli.convert.safetensors_out import ProgressFn, TensorSpec, write_safetensors
from minisgl_cli.errors import MinisglError


def convert_gguf(
    src: Path, out: Path, dtype: str = "auto", force: bool = False, progress: ProgressFn | None = None
) -> Path:
    """Convert the GGUF file `src` into the HF model directory `out`; returns `out`.

    dtype "auto" keeps float32 when any matrix is quantized or F32 (dequantized values stay exact), and
    the file's F16/BF16 otherwise.
    """
    src, out = Path(src), Path(out)
    target = parse_dtype(dtype)
    check_output(out, force, src)
    gguf = open_gguf(src)
    info = read_model_info(gguf)
    _check_tensors(gguf, info)
    target = target or _auto_dtype(gguf)
    specs = _tensor_specs(gguf, info, target)
    with atomic_output_dir(out, force, src) as tmp:
        _write_json(tmp / "config.json", hf_config(info, target))
        _write_json(tmp / "generation_config.json", generation_config(info))
        write_tokenizer(gguf, tmp, info.max_position_embeddings)
        write_safetensors(tmp, specs, progress)
    return out


def read_generation_config(src: Path) -> dict[str, Any]:
    """The generation_config.json that converting the GGUF file `src` writes, from its metadata alone (no
    tensor is dequantized, so this takes a moment, not the minutes of a conversion)."""
    return generation_config(read_model_info(open_gguf(Path(src))))


def write_generation_config(src: Path, out: Path) -> Path:
    """Rewrite `out`/generation_config.json, and nothing else, as converting `src` into `out` would now; returns
    its path. Brings a directory converted by an older version up to date without converting it again. The
    file is swapped in whole (a rename), so a reader never sees half of it."""
    path = Path(out) / "generation_config.json"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_json(tmp, read_generation_config(src))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_tensors(gguf: GGUFFile, info: GGUFModelInfo) -> None:
    # Up front, so a bad file fails in a second rather than after minutes of dequantizing.
    missing = [
        name
        for name in required_tensors(info.architecture, info.num_layers, info.experts)
        if name not in gguf.tensors
    ]
    if missing:
        raise MinisglError(f"{gguf.path} lacks tensor '{missing[0]}' ({len(missing)} missing in all)")
    for name in gguf.tensors:
        gguf.check_dequantizable(name)


def _auto_dtype(gguf: GGUFFile) -> torch.dtype:
    # Merged experts are matrices too, stacked: [experts, rows, columns].
    matrix_types = {t.tensor_type for t in gguf.tensors.values() if len(t.shape) >= 2}
    if matrix_types == {GGMLQuantizationType.F16}:
        return torch.float16
    if matrix_types == {GGMLQuantizationType.BF16}:
        return torch.bfloat16
    return torch.float32


def _tensor_specs(gguf: GGUFFile, info: GGUFModelInfo, dtype: torch.dtype) -> list[TensorSpec]:
    specs = []
    for name in gguf.tensors:
        if name == ROPE_FREQS:
            continue  # already folded into config.json's rope_scaling
        heads = permuted_heads(info.architecture, name, info.num_heads, info.num_kv_heads)
        shape = gguf.shape(name)
        targets = hf_tensors(name, info.experts)
        if targets[0].index is None:
            specs += [TensorSpec(t.name, shape, dtype, _loader(gguf, name, heads, dtype)) for t in targets]
            continue
        # A merged expert tensor: one HF tensor per expert, each its [index] along the first dimension.
        if len(shape) != 3 or shape[0] != len(targets):
            raise MinisglError(
                f"tensor '{name}' in {gguf.path} has shape {list(shape)}, not "
                f"[{len(targets)}, rows, columns] for the file's {len(targets)} experts"
            )
        specs += [
            TensorSpec(t.name, shape[1:], dtype, _expert_loader(gguf, name, t.index, dtype)) for t in targets
        ]
    return specs


def _loader(gguf: GGUFFile, name: str, heads: int | None, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        tensor = gguf.load(name)
        if heads is not None:
            tensor = unpermute_rows(tensor, heads)
        return tensor.to(dtype)

    return load


def _expert_loader(gguf: GGUFFile, name: str, expert: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """One expert of a merged [experts, ...] tensor. Its rows are sliced out of the raw data before
    dequantizing (each row is whole quant blocks), so that writing E experts dequantizes the tensor once
    in all, not E times (Qwen3-30B-A3B has 128 experts a layer)."""

    def load() -> torch.Tensor:
        tensor = gguf.tensors[name]
        values = dequantize(tensor.data[expert], tensor.tensor_type).reshape(gguf.shape(name)[1:])
        # np.array copies: the F32 case is a read-only view of the memory-mapped file.
        return torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)

    return load


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
