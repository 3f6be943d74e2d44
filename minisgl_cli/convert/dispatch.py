"""`convert`: pick the GGUF or the HF-directory converter from what `src` is."""

from __future__ import annotations

from pathlib import Path

from minisgl_cli.convert.gguf_convert import convert_gguf
from minisgl_cli.convert.hf_dtype import convert_hf_dir, is_hf_dir
from minisgl_cli.convert.safetensors_out import ProgressFn
from minisgl_cli.errors import UsageError


def convert(
    src: Path, out: Path, dtype: str = "auto", force: bool = False, progress: ProgressFn | None = None
) -> Path:
    """Convert a GGUF file, or change the dtype of an HF model directory, into `out`; returns `out`."""
    src = Path(src)
    if not src.exists():
        raise UsageError(f"{src} does not exist")
    if src.is_dir():
        if is_hf_dir(src):
            return convert_hf_dir(src, out, dtype, force, progress)
        raise UsageError(
            f"{src} is not a Hugging Face model directory (it needs config.json and *.safetensors)"
        )
    # Any other file is taken for a GGUF; convert_gguf checks the magic bytes and says so if it is not.
    return convert_gguf(src, out, dtype, force, progress)
