"""`convert`: what a source is (a GGUF file or an HF model directory), and the converter for it.

Telling the kinds apart imports nothing heavy, so the CLI refuses a bad SRC at once instead of after
importing torch, gguf and transformers (seconds); the converters are imported only for a good one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from minisgl_cli.errors import UsageError

if TYPE_CHECKING:
    from minisgl_cli.convert.safetensors_out import ProgressFn

GGUF_MAGIC = b"GGUF"
SourceKind = Literal["gguf", "hf"]


def is_gguf(path: Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic bytes."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def source_kind(src: Path) -> SourceKind:
    """Which converter `src` needs; UsageError when it is neither a GGUF file nor an HF model directory."""
    if not src.exists():
        raise UsageError(f"{src} does not exist")
    if src.is_dir():
        if is_hf_dir(src):
            return "hf"
        raise UsageError(
            f"{src} is not a Hugging Face model directory (it needs config.json and *.safetensors)"
        )
    try:
        if is_gguf(src):
            return "gguf"
    except OSError as exc:
        raise UsageError(f"cannot read {src}: {exc.strerror or exc}") from None
    raise UsageError(
        f"{src} is not a GGUF file (it does not start with the GGUF magic bytes) or an HF model directory"
    )


def convert(
    src: Path, out: Path, dtype: str = "auto", force: bool = False, progress: ProgressFn | None = None
) -> Path:
    """Convert a GGUF file, or change the dtype of an HF model directory, into `out`; returns `out`."""
    src = Path(src)
    if source_kind(src) == "hf":
        from minisgl_cli.convert.hf_dtype import convert_hf_dir

        return convert_hf_dir(src, out, dtype, force, progress)
    from minisgl_cli.convert.gguf_convert import convert_gguf

    return convert_gguf(src, out, dtype, force, progress)
