"""The config loader: precedence, source attribution, parsing and one-sentence errors for every source; and
`config show`'s view of the model's generation config and of what "auto" resolves to."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minisgl_cli.config import (
    SECTIONS,
    SETTINGS,
    BenchConfig,
    Config,
    EngineConfig,
    SamplingConfig,
    ServerConfig,
    check_value,
    load_config,
    parse_length_range,
    section_settings,
)
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import UsageError

# The defaults as the project's spec states them, written out by hand: the declarations must match.
SPEC_DEFAULTS = {
    "engine": dict(
        model=None, dummy_weights=False, dtype="auto", device="auto", random_seed=0, page_size=1,
        kv_cache_tokens=None, kv_cache_gb=None, mem_fraction=0.85, max_running_requests=256,
        max_prefill_tokens=8192, context_length=None, cache_type="radix", attention_backend="auto",
        prefill_kernel="auto", decode_kernel="auto", cuda_graph_max_bs=256, disable_overlap=False,
        mixed_steps=False, tp=1, ep=False, quantization="auto", kv_cache_dtype="auto", generation_config="auto",
    ),
    "server": dict(
        host="127.0.0.1", port=1919, api_key=None, max_queue=1024, num_tokenizers=1,
        max_request_bytes=8 * 1024 * 1024, served_model_name=None,
        log_interval=10.0, access_log=True,
        tool_call_parser="auto", reasoning_parser="auto", nnodes=1, node_rank=0, dist_init_addr=None,
    ),
    "sampling": dict(
        temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, max_tokens=256, repetition_penalty=1.0,
        frequency_penalty=0.0, presence_penalty=0.0, seed=None,
    ),
    "bench": dict(
        num_prompts=256, input_len="100,1024", output_len="100,1024", dataset="random", dataset_seed=0,
        request_rate=None, max_concurrency=None,
    ),
}  # fmt: skip


def write(tmp_path: Path, text: str, name: str = "minisgl.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_match_the_spec() -> None:
    loaded = load_config(environ={})
    assert dataclasses.asdict(loaded.config) == SPEC_DEFAULTS
    assert set(loaded.sources.values()) == {"default"}
    assert list(SECTIONS) == list(SPEC_DEFAULTS)
    assert all(spec.help for spec in SETTINGS.values())


def test_sampling_section_builds_sampling_params() -> None:
    # Commands turn the [sampling] defaults into SamplingParams directly, so the names must line up.
    cfg = SamplingConfig(temperature=0.5, top_k=40, seed=7)
    params = SamplingParams(**dataclasses.asdict(cfg))
    assert (params.temperature, params.top_k, params.seed, params.max_tokens) == (0.5, 40, 7, 256)


class TestPrecedence:
    FILE = "[engine]\npage_size = 16\n[server]\nport = 8000\n"

    def test_each_layer_beats_the_one_below(self, tmp_path: Path) -> None:
        path = write(tmp_path, self.FILE)
        env = {"MINISGL_PAGE_SIZE": "32"}
        flags = {"page_size": 64}
        cases = [
            (dict(config_file=path, environ=env, flags=flags), 64, "flag --page-size"),
            (dict(config_file=path, environ=env), 32, "env MINISGL_PAGE_SIZE"),
            (dict(config_file=path, environ={}), 16, f"file {path}"),
            (dict(environ={}), 1, "default"),
        ]
        for kwargs, value, source in cases:
            loaded = load_config(**kwargs)  # type: ignore[arg-type]
            assert loaded.config.engine.page_size == value
            assert loaded.sources["page_size"] == source
        # Layers only override the fields they set.
        loaded = load_config(config_file=path, environ=env, flags=flags)
        assert loaded.config.server.port == 8000 and loaded.sources["port"] == f"file {path}"
        assert loaded.config.server.host == "127.0.0.1" and loaded.sources["host"] == "default"

    def test_config_file_from_env_and_flag_wins_over_env(self, tmp_path: Path) -> None:
        by_env = write(tmp_path, "[server]\nport = 1111\n", "env.toml")
        by_flag = write(tmp_path, "[server]\nport = 2222\n", "flag.toml")
        assert load_config(environ={"MINISGL_CONFIG": str(by_env)}).config.server.port == 1111
        loaded = load_config(config_file=by_flag, environ={"MINISGL_CONFIG": str(by_env)})
        assert loaded.config.server.port == 2222
        assert loaded.sources["port"] == f"file {by_flag}"
        assert load_config(environ={"MINISGL_CONFIG": ""}).config.server.port == 1919

    def test_relative_config_path_is_reported_absolute(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        write(tmp_path, "[server]\nport = 1234\n")
        monkeypatch.chdir(tmp_path)
        loaded = load_config(config_file=Path("minisgl.toml"), environ={})
        assert loaded.sources["port"] == f"file {tmp_path / 'minisgl.toml'}"

    def test_flags_given_as_none_are_not_given(self) -> None:
        loaded = load_config(flags={"port": None, "host": "0.0.0.0"}, environ={"MINISGL_PORT": "8080"})
        assert loaded.config.server.port == 8080 and loaded.sources["port"] == "env MINISGL_PORT"
        assert loaded.config.server.host == "0.0.0.0" and loaded.sources["host"] == "flag --host"

    def test_every_section_and_type_from_a_file(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            '[engine]\nmodel = "m.gguf"\ndummy_weights = true\nkv_cache_gb = 2\n'
            'attention_backend = "torch,flashinfer"\n'
            'device = "cuda:1"\n[server]\napi_key = "k"\n[sampling]\ntemperature = 0\nseed = 5\n'
            '[bench]\ninput_len = "8"\nrequest_rate = 2.5\n',
        )
        cfg = load_config(config_file=path, environ={}).config
        assert (cfg.engine.model, cfg.engine.dummy_weights, cfg.engine.device) == ("m.gguf", True, "cuda:1")
        assert cfg.engine.attention_backend == "torch,flashinfer"
        # An integer written for a float field arrives as a float.
        assert cfg.engine.kv_cache_gb == 2.0 and isinstance(cfg.engine.kv_cache_gb, float)
        assert cfg.sampling.temperature == 0.0 and isinstance(cfg.sampling.temperature, float)
        assert (cfg.server.api_key, cfg.sampling.seed, cfg.bench.input_len, cfg.bench.request_rate) == (
            "k",
            5,
            "8",
            2.5,
        )


class TestEnvParsing:
    @pytest.mark.parametrize(
        ("text", "value"),
        [
            ("1", True),
            ("true", True),
            ("YES", True),
            (" on ", True),
            ("0", False),
            ("False", False),
            ("no", False),
            ("off", False),
        ],
    )
    def test_bools(self, text: str, value: bool) -> None:
        assert load_config(environ={"MINISGL_DUMMY_WEIGHTS": text}).config.engine.dummy_weights is value

    @pytest.mark.parametrize("text", ["", "none", "None"])
    def test_none_for_optional_fields(self, text: str, tmp_path: Path) -> None:
        # The env can clear what a file set.
        path = write(tmp_path, "[engine]\nkv_cache_tokens = 4096\nmodel = 'x'\n[sampling]\nseed = 3\n")
        env = {"MINISGL_KV_CACHE_TOKENS": text, "MINISGL_MODEL": text, "MINISGL_SEED": text}
        loaded = load_config(config_file=path, environ=env)
        engine, sampling = loaded.config.engine, loaded.config.sampling
        assert engine.kv_cache_tokens is None and engine.model is None and sampling.seed is None
        assert loaded.sources["seed"] == "env MINISGL_SEED"

    def test_numbers_and_strings(self) -> None:
        env = {
            "MINISGL_TOP_K": "-1",
            "MINISGL_MEM_FRACTION": "1",
            "MINISGL_HOST": "none",
            "MINISGL_TEMPERATURE": "0.25",
        }
        cfg = load_config(environ=env).config
        assert cfg.sampling.top_k == -1 and cfg.engine.mem_fraction == 1.0
        assert cfg.sampling.temperature == 0.25
        assert cfg.server.host == "none"  # "none" means None only for fields that may be None

    def test_reserved_and_foreign_names_are_ignored(self) -> None:
        env = {
            "MINISGL_CACHE": "/tmp/c",
            "MINISGL_LOG_LEVEL": "debug",
            "MINISGL_DEBUG": "1",
            "MINISGL_NO_KERNELS": "1",
            "MINISGL_TP_ONE_GPU": "1",
            "MINISGL_CONFIG": "",
            "PATH": "/bin",
            "minisgl_port": "1",
        }
        assert dataclasses.asdict(load_config(environ=env).config) == SPEC_DEFAULTS


def _toml_error(tmp_path: Path, text: str) -> tuple[str, Path]:
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_config(config_file=path, environ={})
    return str(info.value), path


class TestErrors:
    def test_the_documented_example(self, tmp_path: Path) -> None:
        message, path = _toml_error(tmp_path, "[engine]\npage_size = -1\n")
        assert message == f"config file {path}: [engine] page_size = -1: expected an integer in [1, 4096]"

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("[engin]\npage_size = 2\n", "unknown section [engin]"),
            ("[engine]\npagesize = 2\n", "unknown key [engine] pagesize (did you mean page_size?)"),
            ("[server]\npage_size = 2\n", "key page_size belongs in [engine], not [server]"),
            ("port = 80\n", "key port must be under [server]"),
            ("engine = 3\n", "engine must be a [engine] table"),
            ('[engine]\npage_size = "16"\n', '[engine] page_size = "16": expected an integer in [1, 4096]'),
            ("[server]\nport = true\n", "[server] port = true: expected an integer in [0, 65535]"),
            ("[engine]\ndummy_weights = 1\n", "[engine] dummy_weights = 1: expected true or false"),
            ("[engine]\nmodel = 3\n", "[engine] model = 3: expected a string"),
            ("[engine]\npage_size = 5000\n", "[engine] page_size = 5000: expected an integer in [1, 4096]"),
            ("[engine]\nmem_fraction = 0\n", "[engine] mem_fraction = 0: expected a number in (0, 1]"),
            ("[engine]\npage_size = 1.5\n", "page_size = 1.5: expected an integer"),
            ("[sampling]\ntop_k = -2\n", "[sampling] top_k = -2: expected an integer >= -1"),
            (
                '[engine]\ndtype = "f8"\n',
                '[engine] dtype = "f8": expected one of auto, float32, bfloat16, float16',
            ),
            (
                '[engine]\ndevice = "gpu"\n',
                '[engine] device = "gpu": expected "auto", "cpu", "cuda" or "cuda:N"',
            ),
            ('[engine]\nattention_backend = "torch,"\n', '[engine] attention_backend = "torch,": expected'),
            (
                '[bench]\ninput_len = "9,3"\n',
                '[bench] input_len = "9,3": expected "N" or "MIN,MAX" with 1 <= MIN <= MAX',
            ),
            ("[bench]\nrequest_rate = 0\n", "[bench] request_rate = 0: expected a number > 0"),
        ],
    )
    def test_bad_file_content(self, tmp_path: Path, text: str, expected: str) -> None:
        message, path = _toml_error(tmp_path, text)
        assert message.startswith(f"config file {path}: ")
        assert expected in message
        assert "\n" not in message

    def test_bad_toml_syntax(self, tmp_path: Path) -> None:
        message, path = _toml_error(tmp_path, "[engine\npage_size = 2\n")
        assert message.startswith(f"config file {path} is not valid TOML: ")

    def test_missing_file_and_directory(self, tmp_path: Path) -> None:
        with pytest.raises(UsageError, match=f"config file {tmp_path / 'nope.toml'} does not exist"):
            load_config(config_file=tmp_path / "nope.toml", environ={})
        missing = str(tmp_path / "gone.toml")
        with pytest.raises(UsageError, match=r"gone.toml \(from MINISGL_CONFIG\) does not exist"):
            load_config(environ={"MINISGL_CONFIG": missing})
        with pytest.raises(UsageError, match="is not a file"):
            load_config(config_file=tmp_path, environ={})

    @pytest.mark.parametrize(
        ("name", "text", "expected"),
        [
            (
                "MINISGL_PAGE_SIZE",
                "abc",
                'environment variable MINISGL_PAGE_SIZE = "abc": expected an integer in [1, 4096]',
            ),
            (
                "MINISGL_PAGE_SIZE",
                "0",
                'environment variable MINISGL_PAGE_SIZE = "0": expected an integer in [1, 4096]',
            ),
            ("MINISGL_PAGE_SIZE", "", 'environment variable MINISGL_PAGE_SIZE = "": expected an integer'),
            ("MINISGL_TEMPERATURE", "nan", 'MINISGL_TEMPERATURE = "nan": expected a number in [0, 100]'),
            ("MINISGL_DUMMY_WEIGHTS", "maybe", 'MINISGL_DUMMY_WEIGHTS = "maybe": expected true or false'),
            ("MINISGL_CACHE_TYPE", "lru", 'MINISGL_CACHE_TYPE = "lru": expected one of radix, naive'),
            (
                "MINISGL_PROT",
                "80",
                "environment variable MINISGL_PROT is not a minisgl setting (did you mean MINISGL_PORT?)",
            ),
            ("MINISGL_XYZZY", "1", "environment variable MINISGL_XYZZY is not a minisgl setting"),
        ],
    )
    def test_bad_env(self, name: str, text: str, expected: str) -> None:
        with pytest.raises(UsageError) as info:
            load_config(environ={name: text})
        assert expected in str(info.value)

    @pytest.mark.parametrize(
        ("flags", "expected"),
        [
            ({"port": -1}, "flag --port = -1: expected an integer in [0, 65535]"),
            ({"port": "80"}, 'flag --port = "80": expected an integer in [0, 65535]'),
            ({"dtype": "f8"}, 'flag --dtype = "f8": expected one of auto, float32, bfloat16, float16'),
            ({"top_p": 0.0}, "flag --top-p = 0.0: expected a number in (0, 1]"),
            ({"output_len": "0"}, 'flag --output-len = "0": expected "N" or "MIN,MAX" with 1 <= MIN <= MAX'),
        ],
    )
    def test_bad_flags(self, flags: dict[str, object], expected: str) -> None:
        with pytest.raises(UsageError) as info:
            load_config(flags=flags, environ={})
        assert str(info.value) == expected

    def test_unknown_flag_name_is_a_programming_error(self) -> None:
        with pytest.raises(ValueError, match="unknown config field 'prot'"):
            load_config(flags={"prot": 1}, environ={})

    def test_sections_validate_when_built_in_code(self) -> None:
        with pytest.raises(
            UsageError, match=r"EngineConfig.page_size = 0: expected an integer in \[1, 4096\]"
        ):
            EngineConfig(page_size=0)
        assert ServerConfig(port=80).port == 80
        assert BenchConfig(request_rate=3).request_rate == 3.0
        assert Config().engine == EngineConfig()


@given(st.integers(min_value=-10_000, max_value=10_000))
def test_integer_range_matches_reference(value: int) -> None:
    spec = SETTINGS["page_size"]
    accepted = True
    try:
        check_value(spec, value, "x")
    except UsageError:
        accepted = False
    assert accepted == (1 <= value <= 4096)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_open_interval_matches_reference(value: float) -> None:
    spec = SETTINGS["top_p"]
    accepted = True
    try:
        check_value(spec, value, "x")
    except UsageError:
        accepted = False
    assert accepted == (not math.isnan(value) and 0.0 < value <= 1.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", (5, 5)),
        ("1,10", (1, 10)),
        (" 3 , 3 ", (3, 3)),
        ("10,1", None),
        ("0", None),
        ("a", None),
        ("1,2,3", None),
        ("", None),
    ],
)
def test_parse_length_range(text: str, expected: tuple[int, int] | None) -> None:
    if expected is None:
        with pytest.raises(ValueError):
            parse_length_range(text)
    else:
        assert parse_length_range(text) == expected


def test_derived_names() -> None:
    spec = SETTINGS["max_running_requests"]
    assert (spec.section, spec.env, spec.flag) == (
        "engine",
        "MINISGL_MAX_RUNNING_REQUESTS",
        "--max-running-requests",
    )
    assert [s.name for s in section_settings("server")] == list(SPEC_DEFAULTS["server"])


@pytest.mark.parametrize("addr", ["10.0.0.1:29500", "node0.cluster:5000", "[::1]:29500", "[fe80::1]:1"])
def test_dist_init_addr_takes_host_and_port(addr: str) -> None:
    assert load_config(environ={"MINISGL_DIST_INIT_ADDR": addr}).config.server.dist_init_addr == addr


@pytest.mark.parametrize("addr", ["node0", "::1:29500", "host:port", "10.0.0.1:", ":5000", "a b:1"])
def test_dist_init_addr_without_host_and_port_is_refused(addr: str) -> None:
    with pytest.raises(UsageError) as info:
        load_config(environ={"MINISGL_DIST_INIT_ADDR": addr})
    assert str(info.value).endswith('expected "HOST:PORT" (an IPv6 host in brackets: "[::1]:5000")')


# ---- `minisgl config show`: the model's generation config as a source, and what "auto" resolves to


def config_show(*args: str | Path) -> tuple[int, str, str]:
    """`minisgl config show ARGS` in this process: (exit status, stdout, stderr)."""
    from typer.testing import CliRunner

    from minisgl_cli.cli import ui
    from minisgl_cli.cli.app import app

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with CliRunner().isolation() as (out, err, _):
            code = ui.run(app, ["config", "show", *map(str, args)])
            sys.stdout.flush()
            sys.stderr.flush()
            return code, out.getvalue().decode(), err.getvalue().decode()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def show_json(*args: str | Path) -> dict[str, Any]:
    code, out, err = config_show("--json", *args)
    assert code == 0, err
    return json.loads(out)


def _auto_here() -> tuple[str, str]:
    from minisgl_cli.engine.device import resolve_device, resolve_dtype

    device = resolve_device("auto")
    return str(device), str(resolve_dtype("auto", device)).removeprefix("torch.")


def _hf_dir(root: Path, generation: dict[str, Any] | None) -> Path:
    """A model directory as far as config show reads one: config.json, and generation_config.json if given."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    if generation is not None:
        (root / "generation_config.json").write_text(json.dumps(generation))
    return root


class TestConfigShow:
    def test_values_from_the_generation_config_name_its_path(self, tmp_path: Path) -> None:
        model = _hf_dir(tmp_path / "m", {"do_sample": True, "temperature": 0.4, "max_new_tokens": 50})
        doc = show_json("-m", model, "--top-p", "0.7")
        file = model / "generation_config.json"
        assert doc["sampling"]["temperature"] == {"value": 0.4, "source": f"generation_config {file}"}
        assert doc["sampling"]["max_tokens"] == {"value": 50, "source": f"generation_config {file}"}
        assert doc["sampling"]["top_p"] == {"value": 0.7, "source": "flag --top-p"}
        assert doc["sampling"]["top_k"] == {"value": -1, "source": "default"}
        assert doc["engine"]["generation_config"] == {
            "value": "auto",
            "source": "default",
            "resolved": str(file),
        }
        off = show_json("-m", model, "--generation-config", "none")
        assert off["sampling"]["temperature"] == {"value": 1.0, "source": "default"}
        assert off["engine"]["generation_config"] == {"value": "none", "source": "flag --generation-config"}

    def test_auto_device_and_dtype_show_what_they_resolve_to_here(self, tmp_path: Path) -> None:
        device, dtype = _auto_here()
        model = _hf_dir(tmp_path / "m", None)
        doc = show_json("-m", model)
        assert doc["engine"]["device"] == {"value": "auto", "source": "default", "resolved": device}
        assert doc["engine"]["dtype"] == {"value": "auto", "source": "default", "resolved": dtype}
        assert doc["engine"]["generation_config"]["resolved"] == "none found"
        # Given explicitly, they are what they say: nothing to resolve. auto dtype follows the device given.
        doc = show_json("-m", model, "--device", "cpu")
        assert doc["engine"]["device"] == {"value": "cpu", "source": "flag --device"}
        assert doc["engine"]["dtype"]["resolved"] == "float32"
        assert "resolved" not in show_json("-m", model, "--dtype", "float16")["engine"]["dtype"]

    def test_the_table_shows_auto_with_its_resolution(self) -> None:
        device, dtype = _auto_here()
        # A built-in shape with dummy weights: no directory, so no generation config.
        code, out, err = config_show("-m", "qwen3-0.6b", "--dummy-weights")
        assert code == 0, err
        assert f'"auto" ({device})' in out and f'"auto" ({dtype})' in out
        assert '"auto" (none found)' in out

    def test_an_unconverted_gguf_is_read_not_converted(self, tmp_path: Path) -> None:
        from convert_helpers import Q, TinyCase, tiny_model, write_gguf

        from minisgl_cli.model_source import cache_path

        case = TinyCase("qwen2", Q.F32, tied=True, add_bos=False, bos="<|endoftext|>", eos=["<|im_end|>"])
        # Named as GGUF files of SmolLM2-135M-Instruct are: its conversion writes that model card's sampling.
        gguf = write_gguf(tmp_path / "SmolLM2-135M-Instruct-tiny.gguf", tiny_model(case), case)
        doc = show_json("-m", gguf)
        future = cache_path(gguf) / "generation_config.json"
        source = f"generation_config {future} once {gguf.name} is converted"
        assert doc["sampling"]["temperature"] == {"value": 0.2, "source": source}
        assert doc["sampling"]["top_p"] == {"value": 0.9, "source": source}
        assert not cache_path(gguf).exists()  # nothing converted

    def test_a_model_that_cannot_be_resolved_is_a_note_not_an_error(self, tmp_path: Path) -> None:
        code, out, err = config_show("--json", "-m", tmp_path / "missing.gguf")
        assert code == 0, err
        assert "generation_config.json was not read" in err and "does not exist" in err
        assert json.loads(out)["sampling"]["temperature"] == {"value": 1.0, "source": "default"}
