"""The --dtype choices of `minisgl convert` and their names in HF config files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from minisgl_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

# Plain strings, importable without torch: the CLI lists them in --help.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def parse_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a --dtype value asks for; None for "auto" (each converter decides)."""
    import torch

    if name == "auto":
        return None
    if name not in DTYPE_CHOICES:
        raise UsageError(f"unknown dtype {name!r} (choose one of: {', '.join(DTYPE_CHOICES)})")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """How HF config.json spells a dtype ("bfloat16", "float32", ...)."""
    return str(dtype).removeprefix("torch.")
