"""The one configuration loader shared by every subcommand.

Precedence, lowest first: built-in defaults < the model's generation_config.json (sampling fields only;
laid over the loaded config by ``with_model_defaults`` once the model is known, see generation_config.py)
< TOML file (``--config PATH``, else env ``MINISGL_CONFIG``) < environment ``MINISGL_<FIELD>`` < command-line
flags. Every field is declared once, below, with its
help text and limits in the dataclass field metadata; flag names, env names, TOML keys, help and
validation are all derived from that declaration, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

from minisgl_cli.errors import UsageError

ENV_PREFIX = "MINISGL_"
CONFIG_ENV = "MINISGL_CONFIG"
# Env names read elsewhere (CLI, cache), not config fields: the loader must not reject them as typos.
RESERVED_ENV = frozenset(
    {
        CONFIG_ENV,
        "MINISGL_CACHE",
        "MINISGL_LOG_LEVEL",
        "MINISGL_DEBUG",
        "MINISGL_NO_KERNELS",
        "MINISGL_TP_ONE_GPU",
    }
)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE = frozenset({"", "none"})
_BACKEND = r"(auto|torch|flashinfer)"
_LENGTHS = '"N" or "MIN,MAX" with 1 <= MIN <= MAX'


def setting(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    choices: tuple[str, ...] | None = None,
    check: Callable[[Any], bool] | None = None,
    expected: str | None = None,
) -> Any:
    """Declare a config field: its default plus the metadata everything else derives from.

    ``check``/``expected`` cover formats that limits and choices cannot express (e.g. "cuda:N").
    """
    metadata = {
        "help": help,
        "min": min,
        "max": max,
        "min_exclusive": min_exclusive,
        "choices": choices,
        "check": check,
        "expected": expected,
    }
    return field(default=default, metadata=metadata)


def parse_length_range(text: str) -> tuple[int, int]:
    """Parse a bench length spec, "N" or "MIN,MAX" (positive ints, MIN <= MAX), into (min, max)."""
    parts = text.split(",")
    if len(parts) > 2:
        raise ValueError(f"not N or MIN,MAX: {text!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= MIN <= MAX: {text!r}")
    return lo, hi


def _is_length_range(value: str) -> bool:
    try:
        parse_length_range(value)
    except ValueError:
        return False
    return True


def _matches(pattern: str) -> Callable[[Any], bool]:
    compiled = re.compile(pattern)
    return lambda value: compiled.fullmatch(value) is not None


class _Section:
    """Base of the section dataclasses: validates fields built directly in code, e.g. LLM(page_size=0)."""

    def __post_init__(self) -> None:
        for name in SECTION_FIELDS[type(self)]:
            spec = SETTINGS[name]
            value = getattr(self, name)
            setattr(
                self, name, check_value(spec, value, f"{type(self).__name__}.{name} = {format_value(value)}")
            )


@dataclass
class EngineConfig(_Section):
    model: str | None = setting(
        None,
        "Model: HF directory, .gguf file, HF repo id, or (with --dummy-weights) a built-in shape name. "
        "Unset: the embedded SmolLM2-135M-Instruct.",
    )
    dummy_weights: bool = setting(False, "Random weights at the model's real shape (no download needed).")
    generation_config: str = setting(
        "auto",
        'Sampling defaults from a generation_config.json: "auto" (the model\'s own, when it has one), "none" '
        "(built-in defaults only), or the path of such a file or of a directory holding one.",
        check=lambda value: value.strip() != "",
        expected='"auto", "none", or the path of a generation_config.json or of its directory',
    )
    dtype: str = setting(
        "auto", "Weight and activation dtype.", choices=("auto", "float32", "bfloat16", "float16")
    )
    device: str = setting(
        "auto",
        'Device: "auto", "cpu", "cuda" or "cuda:N".',
        check=_matches(r"auto|cpu|cuda(:\d+)?"),
        expected='"auto", "cpu", "cuda" or "cuda:N"',
    )
    random_seed: int = setting(0, "Seed for weight init and sampling.", min=0)
    page_size: int = setting(1, "KV cache page size in tokens.", min=1, max=4096)
    kv_cache_tokens: int | None = setting(None, "KV cache pool size in tokens (CPU).", min=16)
    kv_cache_gb: float | None = setting(None, "KV cache pool size in GB.", min=0, min_exclusive=True)
    mem_fraction: float = setting(
        0.85, "GPU: share of memory for weights and KV cache.", min=0, max=1, min_exclusive=True
    )
    max_running_requests: int = setting(256, "Most requests decoded together.", min=1)
    max_prefill_tokens: int = setting(8192, "Chunked-prefill token budget per step.", min=16)
    context_length: int | None = setting(None, "Override the model's maximum context length.", min=16)
    cache_type: str = setting("radix", "KV prefix cache.", choices=("radix", "naive"))
    attention_backend: str = setting(
        "auto",
        'Attention backend: "auto", "torch", "flashinfer", or a "PREFILL,DECODE" pair of those.',
        check=_matches(rf"{_BACKEND}(,{_BACKEND})?"),
        expected='"auto", "torch", "flashinfer" or a "PREFILL,DECODE" pair of those',
    )
    prefill_kernel: str = setting(
        "auto",
        'FlashInfer prefill kernel: "auto" (FA3 on Hopper), "fa2" or "fa3".',
        choices=("auto", "fa2", "fa3"),
    )
    decode_kernel: str = setting(
        "auto",
        'GPU decode attention kernel: "auto" (Triton where it is installed), "triton", or FlashInfer\'s '
        '"tensor-cores" or "cuda-cores".',
        choices=("auto", "tensor-cores", "cuda-cores", "triton"),
    )
    cuda_graph_max_bs: int = setting(
        256, "Largest decode batch captured in a CUDA graph (0: no graphs).", min=0
    )
    disable_overlap: bool = setting(False, "Run CPU scheduling and GPU compute one after the other.")
    mixed_steps: bool = setting(
        False,
        "Decode the running requests in the same steps as prefill chunks (off: prefill steps run alone).",
    )
    tp: int = setting(1, "Tensor-parallel degree (number of GPUs).", min=1)
    quantization: str = setting(
        "auto",
        'Weight quantization: "auto" (the checkpoint\'s: FP8 for an FP8 checkpoint, else none), "none" (the '
        'model dtype; FP8 checkpoints dequantized) or "fp8" (FP8 weights with a scale per row, FP8 matmuls '
        "on Hopper GPUs).",
        choices=("auto", "none", "fp8"),
    )
    kv_cache_dtype: str = setting(
        "auto",
        'KV cache dtype: "auto" (the model dtype) or "fp8_e4m3" (one byte a value: twice the tokens of bf16 in '
        "the same memory; read by the torch attention backend only so far).",
        choices=("auto", "fp8_e4m3"),
    )
    ep: bool = setting(
        False,
        "Expert parallelism for mixture-of-experts models: the --tp ranks hold whole experts, a share each, "
        "instead of a slice of every expert.",
    )


@dataclass
class ServerConfig(_Section):
    host: str = setting("127.0.0.1", "Address the HTTP server listens on.")
    port: int = setting(1919, "Port the HTTP server listens on (0: any free port).", min=0, max=65535)
    api_key: str | None = setting(None, "Require this key as 'Authorization: Bearer KEY'.")
    max_queue: int = setting(1024, "Most waiting requests before new ones get HTTP 503.", min=1)
    num_tokenizers: int = setting(1, "Tokenizer worker processes.", min=1)
    max_request_bytes: int = setting(
        8 * 1024 * 1024,
        "Largest request body in bytes; a bigger one gets HTTP 413 unread. Reading, parsing and tokenizing a "
        "body costs CPU in proportion to its size; 8 MiB is some 2M tokens of text, more than any context.",
        min=1,
    )
    served_model_name: str | None = setting(None, "Model name reported by the API (default: the model path).")
    log_interval: float = setting(
        10.0,
        "Seconds between state lines (running, waiting, tok/s, KV use) while requests run (0: none).",
        min=0,
    )
    access_log: bool = setting(
        True, "Log a line per HTTP request (/health and /metrics only at --log-level debug)."
    )
    tool_call_parser: str = setting(
        "auto",
        "How tool calls are read from the model's output (auto: from its chat template; none: never).",
        choices=("auto", "none", "hermes", "llama3_json", "mistral"),
    )
    reasoning_parser: str = setting(
        "auto",
        "How thinking is split from the answer into reasoning_content (auto: qwen3 for Qwen3; none: never).",
        choices=("auto", "none", "qwen3", "qwen3-thinking", "deepseek-r1"),
    )
    nnodes: int = setting(1, "Machines the --tp ranks are spread over (each runs tp/nnodes of them).", min=1)
    node_rank: int = setting(0, "This machine's place among the --nnodes (0 serves HTTP).", min=0)
    dist_init_addr: str | None = setting(
        None,
        "HOST:PORT where the nodes meet (node 0's address and a free port); needed with --nnodes > 1.",
        check=_matches(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}"),
        expected='"HOST:PORT" (an IPv6 host in brackets: "[::1]:5000")',
    )


@dataclass
class SamplingConfig(_Section):
    """Defaults for requests that do not say; field names match engine.request.SamplingParams."""

    temperature: float = setting(1.0, "Sampling temperature (0: greedy).", min=0, max=100)
    top_p: float = setting(1.0, "Nucleus sampling probability mass.", min=0, max=1, min_exclusive=True)
    top_k: int = setting(-1, "Sample among the K likeliest tokens (-1: all).", min=-1)
    min_p: float = setting(0.0, "Drop tokens below MIN_P times the top probability.", min=0, max=1)
    max_tokens: int = setting(256, "Most tokens generated per request.", min=1)
    repetition_penalty: float = setting(
        1.0, "Penalty for tokens already present (1: none).", min=0, max=10, min_exclusive=True
    )
    frequency_penalty: float = setting(0.0, "Penalty per earlier occurrence of a token.", min=-2, max=2)
    presence_penalty: float = setting(0.0, "Penalty for any earlier occurrence of a token.", min=-2, max=2)
    seed: int | None = setting(None, "Per-request sampling seed.")


@dataclass
class BenchConfig(_Section):
    num_prompts: int = setting(256, "Number of benchmark prompts.", min=1)
    input_len: str = setting(
        "100,1024", 'Prompt length in tokens: "N" or "MIN,MAX".', check=_is_length_range, expected=_LENGTHS
    )
    output_len: str = setting(
        "100,1024", 'Output length in tokens: "N" or "MIN,MAX".', check=_is_length_range, expected=_LENGTHS
    )
    dataset: str = setting(
        "random", "Prompt dataset: random, sharegpt (bench serve), or a JSONL/ShareGPT file (bench offline)."
    )
    dataset_seed: int = setting(0, "Seed for prompt generation and lengths.")
    request_rate: float | None = setting(
        None, "Requests per second, Poisson arrivals (unset: all at once).", min=0, min_exclusive=True
    )
    max_concurrency: int | None = setting(None, "Most requests in flight at once.", min=1)


@dataclass
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


@dataclass(frozen=True)
class Setting:
    """One config field, as derived from its declaration: what flags, env, TOML and help are built from."""

    section: str
    name: str
    type: type  # bool, int, float or str
    optional: bool  # None allowed
    default: Any
    help: str
    min: float | None
    max: float | None
    min_exclusive: bool
    choices: tuple[str, ...] | None
    check: Callable[[Any], bool] | None
    expected: str  # what a valid value looks like, for error messages

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass
class LoadedConfig:
    config: Config
    # field name -> "default", "generation_config /abs/generation_config.json", "file /abs/a.toml",
    # "env MINISGL_PORT" or "flag --port"
    sources: dict[str, str]


SECTIONS: dict[str, type[_Section]] = {
    "engine": EngineConfig,
    "server": ServerConfig,
    "sampling": SamplingConfig,
    "bench": BenchConfig,
}


def _expected(kind: type, meta: Mapping[str, Any]) -> str:
    if meta["expected"] is not None:
        return meta["expected"]
    if meta["choices"] is not None:
        return "one of " + ", ".join(meta["choices"])
    if kind is bool:
        return "true or false"
    if kind is str:
        return "a string"
    noun = "an integer" if kind is int else "a number"
    lo, hi = meta["min"], meta["max"]
    if lo is not None and hi is not None:
        return f"{noun} in {'(' if meta['min_exclusive'] else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f"{noun} {'>' if meta['min_exclusive'] else '>='} {lo:g}"
    return noun


def _derive_settings() -> tuple[dict[str, Setting], dict[type, tuple[str, ...]]]:
    settings: dict[str, Setting] = {}
    by_class: dict[type, tuple[str, ...]] = {}
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind, optional = hints[f.name], False
            if get_origin(kind) in (Union, types.UnionType):
                (kind,) = [a for a in get_args(kind) if a is not type(None)]
                optional = True
            if f.name in settings:
                # Env names are MINISGL_<FIELD> with no section, so a repeated name would be ambiguous.
                raise TypeError(f"config field {f.name} is declared in two sections")
            meta = {**f.metadata, "expected": _expected(kind, f.metadata)}
            settings[f.name] = Setting(section, f.name, kind, optional, f.default, **meta)
        by_class[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return settings, by_class


SETTINGS, SECTION_FIELDS = _derive_settings()


def section_settings(section: str) -> list[Setting]:
    """The settings of one section, in declaration order."""
    return [SETTINGS[name] for name in SECTION_FIELDS[SECTIONS[section]]]


def format_value(value: Any) -> str:
    """A value as it would be written in TOML (strings quoted, numbers not; None as none)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "none" if value is None else str(value)


def _type_ok(spec: Setting, value: Any) -> bool:
    if value is None:
        return spec.optional
    if spec.type is bool or isinstance(value, bool):  # bool is an int subclass: keep them apart
        return spec.type is bool and isinstance(value, bool)
    if spec.type is float:
        return isinstance(value, (int, float))
    return isinstance(value, spec.type)


def _in_range(spec: Setting, value: Any) -> bool:
    # NaN compares false to every bound, so it would slip through a range with no min or max.
    if isinstance(value, float) and math.isnan(value):
        return False
    if spec.min is not None and not (value > spec.min if spec.min_exclusive else value >= spec.min):
        return False
    return spec.max is None or value <= spec.max


def check_value(spec: Setting, value: Any, where: str) -> Any:
    """Validate one value from any source; return it normalised (an int for a float field becomes float).

    ``where`` names the source and key, e.g. 'config file /x/a.toml: [engine] page_size = -1'.
    """
    ok = _type_ok(spec, value)
    if ok and value is not None:
        if spec.type is float:
            value = float(value)
        if spec.type in (int, float):
            ok = _in_range(spec, value)
        ok = ok and (spec.choices is None or value in spec.choices)
        ok = ok and (spec.check is None or spec.check(value))
    if not ok:
        raise UsageError(f"{where}: expected {spec.expected}")
    return value


def parse_env_value(spec: Setting, text: str) -> Any:
    """Parse an env string to the field's type and validate it; UsageError naming the variable if bad."""
    where = f"environment variable {spec.env} = {format_value(text)}"
    word = text.strip().lower()
    if spec.optional and word in _NONE:
        return None
    try:
        if spec.type is bool:
            if word not in _TRUE | _FALSE:
                raise ValueError(text)
            value: Any = word in _TRUE
        elif spec.type in (int, float):
            value = spec.type(text)
        else:
            value = text
    except ValueError:
        raise UsageError(f"{where}: expected {spec.expected}") from None
    return check_value(spec, value, where)


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _read_toml(path: Path, via_env: bool) -> dict[str, Any]:
    named = f"config file {path}" + (f" (from {CONFIG_ENV})" if via_env else "")
    if not path.exists():
        raise UsageError(f"{named} does not exist")
    if not path.is_file():
        raise UsageError(f"{named} is not a file")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{named} is not valid TOML: {e}") from None
    except OSError as e:
        raise UsageError(f"{named} cannot be read: {e.strerror}") from None


def _file_layer(path: Path, via_env: bool) -> dict[str, tuple[Any, str]]:
    data = _read_toml(path, via_env)
    source = f"file {path}"
    layer: dict[str, tuple[Any, str]] = {}
    for section, table in data.items():
        if section not in SECTIONS:
            if section in SETTINGS:
                home = SETTINGS[section].section
                raise UsageError(f"config file {path}: key {section} must be under [{home}]")
            sections = ", ".join(f"[{s}]" for s in SECTIONS)
            raise UsageError(f"config file {path}: unknown section [{section}]; expected one of {sections}")
        if not isinstance(table, dict):
            raise UsageError(f"config file {path}: {section} must be a [{section}] table")
        for key, value in table.items():
            spec = SETTINGS.get(key)
            if spec is None:
                names = list(SECTION_FIELDS[SECTIONS[section]])
                raise UsageError(f"config file {path}: unknown key [{section}] {key}{_suggest(key, names)}")
            if spec.section != section:
                raise UsageError(
                    f"config file {path}: key {key} belongs in [{spec.section}], not [{section}]"
                )
            where = f"config file {path}: [{section}] {key} = {format_value(value)}"
            layer[key] = (check_value(spec, value, where), source)
    return layer


def _env_layer(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    by_env = {spec.env: spec for spec in SETTINGS.values()}
    layer: dict[str, tuple[Any, str]] = {}
    for name in sorted(environ):  # sorted: with several bad variables, the same one is reported each run
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        spec = by_env.get(name)
        if spec is None:
            known = sorted(by_env) + sorted(RESERVED_ENV)
            raise UsageError(f"environment variable {name} is not a minisgl setting{_suggest(name, known)}")
        layer[spec.name] = (parse_env_value(spec, environ[name]), f"env {name}")
    return layer


def _flag_layer(flags: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    layer: dict[str, tuple[Any, str]] = {}
    for name, value in flags.items():
        if value is None:  # not given on the command line
            continue
        spec = SETTINGS.get(name)
        if spec is None:
            raise ValueError(f"load_config got a flag for unknown config field {name!r}")
        layer[name] = (
            check_value(spec, value, f"flag {spec.flag} = {format_value(value)}"),
            f"flag {spec.flag}",
        )
    return layer


def load_config(
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Build the effective config from defaults, TOML file, environment and flags, in rising precedence.

    ``flags`` maps field names to the values the user gave (absent or None: not given). ``environ``
    defaults to ``os.environ``. Any unknown key or invalid value raises UsageError naming its source.
    """
    environ = os.environ if environ is None else environ
    via_env = config_file is None and bool(environ.get(CONFIG_ENV))
    if via_env:
        config_file = Path(environ[CONFIG_ENV])
    # Built in precedence order, so that with several mistakes the lowest layer's is reported first.
    layers = []
    if config_file is not None:
        layers.append(_file_layer(Path(os.path.abspath(config_file.expanduser())), via_env))
    layers += [_env_layer(environ), _flag_layer(flags or {})]
    values: dict[str, Any] = {}
    sources = {name: "default" for name in SETTINGS}
    for layer in layers:
        for name, (value, source) in layer.items():
            values[name] = value
            sources[name] = source
    sections = {
        section: cls(**{name: values[name] for name in SECTION_FIELDS[cls] if name in values})
        for section, cls in SECTIONS.items()
    }
    return LoadedConfig(Config(**sections), sources)


def with_model_defaults(loaded: LoadedConfig, values: Mapping[str, Any], source: str) -> LoadedConfig:
    """`loaded` with `values` (field name -> value) laid just above the built-in defaults, attributed to `source`.

    The layer a model brings (its generation_config.json) is known only once the loaded config has named the
    model, so it comes after load_config; taking only the fields still at their default is the same as
    having loaded it first, beneath the file, env and flags. The sections validate what they are given.
    """
    taken = {name: value for name, value in values.items() if loaded.sources[name] == "default"}
    sections = {}
    for section in SECTIONS:
        current = getattr(loaded.config, section)
        own = {name: value for name, value in taken.items() if SETTINGS[name].section == section}
        sections[section] = dataclasses.replace(current, **own) if own else current
    return LoadedConfig(Config(**sections), {**loaded.sources, **dict.fromkeys(taken, source)})
