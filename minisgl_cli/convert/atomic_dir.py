"""An output directory that appears complete or not at all."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from minisgl_cli.errors import UsageError


@contextmanager
def atomic_output_dir(out: Path, force: bool, source: Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to `out`; when the block ends normally it becomes `out`.

    On any error, Ctrl-C included, the temporary directory is removed and an existing `out` is untouched.
    A non-empty `out` is refused unless `force`, and even then it is only swapped out once the new one
    is complete, so a failed conversion never costs the previous result.
    """
    check_output(out, force, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Next to `out` (same filesystem) so the final step is a rename, not a copy.
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output(out: Path, force: bool, source: Path) -> None:
    """Refuse an `out` that is not empty (unless `force`), or that is or holds `source`.

    Converters call this before their slow work too, so a refused OUT is reported at once.
    """
    if not (out.exists() or out.is_symlink()):
        return
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        # Replacing it would delete what is being converted.
        raise UsageError(
            f"the output {out} is or contains the source {source}; choose another output directory"
        )
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not force:
        raise UsageError(f"{out} already exists and is not empty; pass --force to replace it")


def _swap_in(tmp: Path, out: Path) -> None:
    if not (out.exists() or out.is_symlink()):
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
