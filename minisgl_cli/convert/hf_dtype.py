"""HF model directory -> HF model directory with its floating-point weights in another dtype."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from minisgl_cli.convert.atomic_dir import atomic_output_dir, check_output
from minisgl_cli.convert.dispatch import is_hf_dir
from minisgl_cli.convert.dtypes import dtype_name, parse_dtype
from minisgl_cli.convert.safetensors_out import INDEX_FILE, ProgressFn, TensorSpec, write_safetensors
from minisgl_cli.errors import UsageError

# Weights in any format are rewritten (safetensors) or dropped (the rest), never copied alongside.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def convert_hf_dir(
    src: Path, out: Path, dtype: str = "auto", force: bool = False, progress: ProgressFn | None = None
) -> Path:
    """Rewrite the HF model directory `src` into `out`, casting floating tensors to `dtype`; returns `out`.

    "auto" keeps every tensor's dtype (a re-shard and copy). Tokenizer, generation and other small
    files are copied; config.json gets the new dtype.
    """
    src, out = Path(src), Path(out)
    target = parse_dtype(dtype)
    if not is_hf_dir(src):
        raise UsageError(
            f"{src} is not a Hugging Face model directory (it needs config.json and *.safetensors)"
        )
    check_output(out, force, src)
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {src / 'config.json'}: {exc}") from exc
    specs = _tensor_specs(src, target)
    if target is not None:
        config["torch_dtype"] = config["dtype"] = dtype_name(target)
    with atomic_output_dir(out, force, src) as tmp:
        for path in sorted(src.iterdir()):
            if path.is_file() and path.name != "config.json" and not path.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(path, tmp / path.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        write_safetensors(tmp, specs, progress)
    return out


def _weight_files(src: Path) -> list[Path]:
    index = src / INDEX_FILE
    if not index.is_file():
        return sorted(src.glob("*.safetensors"))
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise UsageError(f"cannot read {index}: {exc}") from exc
    return [src / name for name in dict.fromkeys(weight_map.values())]


def _tensor_specs(src: Path, target: torch.dtype | None) -> list[TensorSpec]:
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    for path in _weight_files(src):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in seen:
                        raise UsageError(f"tensor '{name}' appears twice in {src} (again in {path.name})")
                    seen.add(name)
                    view = f.get_slice(name)
                    source_dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
                    if source_dtype is None:
                        raise UsageError(
                            f"tensor '{name}' in {path} has unsupported dtype {view.get_dtype()}"
                        )
                    dtype = target if target is not None and source_dtype.is_floating_point else source_dtype
                    specs.append(TensorSpec(name, tuple(view.get_shape()), dtype, _loader(path, name, dtype)))
        except (OSError, SafetensorError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc
    return specs


def _loader(path: Path, name: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name).to(dtype)

    return load
