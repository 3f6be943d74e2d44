"""Sampling defaults from a model's generation_config.json, the way vLLM takes them (`--generation-config auto`).

vLLM reads temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens (as max_tokens) from the
model's generation config and makes them the defaults of requests that leave them out (vllm/config/model.py,
ModelConfig.get_diff_sampling_param). Each is a SamplingParams field here, so the same six keys are taken;
the file's other keys (eos ids aside, which engine/builder.py reads) mean nothing to sampling here.

Precedence, lowest first: built-in defaults < this file < TOML < env < flags < a request's own fields. The
engine setting `generation_config` picks the file: "auto" (the model directory's, if it has one), "none" (no
file: the built-in defaults), or a path (the file, or a directory holding one). A built-in shape run with
--dummy-weights has no directory, so "auto" finds nothing.

Two choices differ from vLLM's reading, both towards what transformers' generate() does with the same file:
  - `"do_sample": false` written in the file means greedy: temperature 0 (the file's own temperature, which
    generate() ignores then, is not taken). vLLM ignores do_sample. The other keys are still taken: they
    matter again when a higher layer sets a temperature. A file without do_sample is taken as written.
  - every value the file states is taken, even one equal to transformers' own default (vLLM keeps only those
    that differ, so it would drop an explicit "top_k": 50).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minisgl_cli.config import SETTINGS, LoadedConfig, check_value, format_value, with_model_defaults
from minisgl_cli.errors import MinisglError, UsageError

GENERATION_CONFIG = "generation_config.json"
AUTO, NONE = "auto", "none"

# generation_config.json key -> SamplingConfig field.
_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
_IGNORE_HINT = "(--generation-config none ignores the file)"


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling defaults one generation config gives, and what `config show` names as their source."""

    values: dict[str, Any]  # SamplingConfig field -> value, checked
    source: str  # "generation_config /abs/path/generation_config.json"


def find_generation_config(choice: str, model_dir: Path | None) -> Path | None:
    """The file the `generation_config` setting names for a model in `model_dir` (None: a built-in shape).

    None for "none", and for "auto" when the model has no such file. UsageError for a path that is missing.
    """
    if choice == NONE:
        return None
    if choice == AUTO:
        found = model_dir / GENERATION_CONFIG if model_dir is not None else None
        return found if found is not None and found.is_file() else None
    path = Path(choice).expanduser().absolute()
    if path.is_dir():
        path = path / GENERATION_CONFIG
    if not path.is_file():
        raise UsageError(f"generation_config {format_value(choice)}: {path} does not exist")
    return path


def sampling_from_generation_config(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """SamplingConfig field -> value, from a generation config's content; UsageError naming `where` and the
    key for a value the field cannot take."""
    values: dict[str, Any] = {}
    for key, name in _FIELDS.items():
        value = data.get(key)
        if value is None:  # absent, or null as transformers writes unset keys
            continue
        try:
            values[name] = check_value(SETTINGS[name], value, f"{where}: {key} = {format_value(value)}")
        except UsageError as exc:
            raise UsageError(f"{exc} {_IGNORE_HINT}") from None
    if data.get("do_sample") is False:
        values["temperature"] = 0.0  # greedy, as generate() decodes this file (module docstring)
    return values


def read_generation_defaults(path: Path) -> GenerationDefaults:
    """The sampling defaults in the generation_config.json at `path`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MinisglError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON: {exc} {_IGNORE_HINT}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object {_IGNORE_HINT}")
    return GenerationDefaults(sampling_from_generation_config(data, str(path)), f"generation_config {path}")


def model_generation_defaults(choice: str, model_dir: Path | None) -> GenerationDefaults | None:
    """What the `generation_config` setting gives a model in `model_dir`; None when no file applies."""
    path = find_generation_config(choice, model_dir)
    return read_generation_defaults(path) if path is not None else None


def with_generation_config(loaded: LoadedConfig, model_dir: Path | None) -> LoadedConfig:
    """`loaded` over the model's generation config: the sampling fields no file, env or flag set take its
    values (config.with_model_defaults)."""
    found = model_generation_defaults(loaded.config.engine.generation_config, model_dir)
    return loaded if found is None else with_model_defaults(loaded, found.values, found.source)


def with_model_generation_config(loaded: LoadedConfig) -> LoadedConfig:
    """with_generation_config for the model `loaded` names, resolved here (a GGUF converted, once) when
    "auto" needs its directory."""
    engine = loaded.config.engine
    model_dir = None
    if engine.generation_config == AUTO:
        from minisgl_cli.model_source import resolve_model

        model_dir = resolve_model(engine.model, engine.dummy_weights).path
    return with_generation_config(loaded, model_dir)
