"""`minisgl convert`'s library: GGUF file -> HF safetensors directory, and HF directory dtype changes.

The library never prints; callers pass `progress(done, total, tensor_name)` to follow along.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minisgl_cli.convert.dispatch import convert
    from minisgl_cli.convert.gguf_convert import convert_gguf, read_generation_config, write_generation_config
    from minisgl_cli.convert.hf_dtype import convert_hf_dir
    from minisgl_cli.convert.safetensors_out import ProgressFn

__all__ = [
    "ProgressFn",
    "convert",
    "convert_gguf",
    "convert_hf_dir",
    "read_generation_config",
    "write_generation_config",
]

_HOMES = {
    "convert": "dispatch",
    "convert_gguf": "gguf_convert",
    "read_generation_config": "gguf_convert",
    "write_generation_config": "gguf_convert",
    "convert_hf_dir": "hf_dtype",
    "ProgressFn": "safetensors_out",
}


def __getattr__(name: str) -> Any:
    # Lazy, so the CLI can import convert.dtypes for its --help without paying for torch and gguf.
    if name not in _HOMES:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"minisgl_cli.convert.{_HOMES[name]}"), name)
