"""Sampling defaults from a model's generation_config.json (generation_config.py): which keys are taken, their
place in the precedence (built-in defaults < the file < TOML < env < flags < a request's own fields), the
`generation_config` setting that picks or drops the file, and the in-process LLM, bench offline and a real
server on a model that has one. The CLI commands are tested where they are: generate in test_generate.py,
config show in test_config.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from minisgl_cli.config import load_config
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import UsageError
from minisgl_cli.generation_config import with_generation_config

# Every key a generation config can set here, and some it cannot: eos ids, beams, a key we do not know.
FULL = {
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "max_new_tokens": 77,
    "eos_token_id": [2, 7],
    "num_beams": 4,
    "something_new": "x",
}
TAKEN = {
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "max_tokens": 77,
}


def model_dir(root: Path, generation: dict[str, Any] | None) -> Path:
    """A directory holding `generation` as its generation_config.json (none if None)."""
    root.mkdir(parents=True, exist_ok=True)
    if generation is not None:
        (root / "generation_config.json").write_text(json.dumps(generation))
    return root


def sampling_of(loaded: Any) -> dict[str, Any]:
    return {name: getattr(loaded.config.sampling, name) for name in TAKEN}


def test_its_values_become_the_defaults_named_by_the_file(tmp_path: Path) -> None:
    path = model_dir(tmp_path / "m", FULL)
    loaded = with_generation_config(load_config(environ={}), path)
    assert sampling_of(loaded) == TAKEN
    for name in TAKEN:
        assert loaded.sources[name] == f"generation_config {path / 'generation_config.json'}"
    # What the file does not set keeps the built-in default.
    assert (
        loaded.config.sampling.frequency_penalty == 0.0 and loaded.sources["frequency_penalty"] == "default"
    )
    assert loaded.config.sampling.seed is None and loaded.sources["seed"] == "default"


def test_file_env_and_flags_each_beat_it(tmp_path: Path) -> None:
    path = model_dir(tmp_path / "m", FULL)
    toml = tmp_path / "minisgl.toml"
    toml.write_text("[sampling]\ntemperature = 0.3\nmax_tokens = 9\n")
    env = {"MINISGL_TOP_P": "0.5", "MINISGL_MAX_TOKENS": "11"}
    loaded = with_generation_config(load_config(toml, {"top_k": 5, "max_tokens": 13}, env), path)
    assert sampling_of(loaded) == {**TAKEN, "temperature": 0.3, "top_p": 0.5, "top_k": 5, "max_tokens": 13}
    assert loaded.sources["temperature"] == f"file {toml}"
    assert loaded.sources["top_p"] == "env MINISGL_TOP_P"
    assert loaded.sources["top_k"] == "flag --top-k"
    assert loaded.sources["max_tokens"] == "flag --max-tokens"
    assert loaded.sources["min_p"] == f"generation_config {path / 'generation_config.json'}"


def test_a_flag_that_gives_the_built_in_value_still_beats_it(tmp_path: Path) -> None:
    # --temperature 1.0 is the built-in value, but it was asked for: the model's 0.6 must not win.
    path = model_dir(tmp_path / "m", FULL)
    loaded = with_generation_config(load_config(flags={"temperature": 1.0}, environ={}), path)
    assert loaded.config.sampling.temperature == 1.0 and loaded.sources["temperature"] == "flag --temperature"


@pytest.mark.parametrize(
    "how",
    [
        {"flags": {"generation_config": "none"}},
        {"environ": {"MINISGL_GENERATION_CONFIG": "none"}},
        {"toml": '[engine]\ngeneration_config = "none"\n'},
    ],
)
def test_none_ignores_it_from_any_layer(tmp_path: Path, how: dict[str, Any]) -> None:
    path = model_dir(tmp_path / "m", FULL)
    config_file = None
    if "toml" in how:
        config_file = tmp_path / "minisgl.toml"
        config_file.write_text(how["toml"])
    loaded = load_config(config_file, how.get("flags"), how.get("environ", {}))
    assert with_generation_config(loaded, path).config.sampling == load_config(environ={}).config.sampling


def test_a_path_names_another_file_or_directory(tmp_path: Path) -> None:
    model = model_dir(tmp_path / "m", FULL)
    other = model_dir(tmp_path / "elsewhere", {"temperature": 0.1})
    named = tmp_path / "mine.json"
    named.write_text(json.dumps({"top_p": 0.3}))
    by_dir = with_generation_config(load_config(flags={"generation_config": str(other)}, environ={}), model)
    assert by_dir.config.sampling.temperature == 0.1 and by_dir.config.sampling.top_p == 1.0
    assert by_dir.sources["temperature"] == f"generation_config {other / 'generation_config.json'}"
    by_file = with_generation_config(load_config(flags={"generation_config": str(named)}, environ={}), None)
    assert by_file.config.sampling.top_p == 0.3 and by_file.sources["top_p"] == f"generation_config {named}"
    with pytest.raises(UsageError, match="does not exist"):
        with_generation_config(
            load_config(flags={"generation_config": str(tmp_path / "nope")}, environ={}), model
        )


def test_no_file_no_directory_no_change(tmp_path: Path) -> None:
    # A model without the file, and a built-in shape (no directory at all), keep the built-in defaults.
    loaded = load_config(environ={})
    assert with_generation_config(loaded, model_dir(tmp_path / "bare", None)) == loaded
    assert with_generation_config(loaded, None) == loaded


def test_do_sample_false_means_greedy_and_the_rest_is_still_taken(tmp_path: Path) -> None:
    greedy = {"do_sample": False, "temperature": 0.7, "top_p": 0.8, "max_new_tokens": 5}
    loaded = with_generation_config(load_config(environ={}), model_dir(tmp_path / "g", greedy))
    assert (loaded.config.sampling.temperature, loaded.config.sampling.top_p) == (0.0, 0.8)
    assert loaded.sources["temperature"].startswith("generation_config ")
    # A flag's temperature is still the user's, and then the file's top_p applies to it.
    flagged = with_generation_config(load_config(flags={"temperature": 0.9}, environ={}), tmp_path / "g")
    assert (flagged.config.sampling.temperature, flagged.config.sampling.top_p) == (0.9, 0.8)
    # Without do_sample, or with null values (as transformers writes unset keys), what is there is taken.
    plain = {"temperature": 0.7, "top_k": None}
    loaded = with_generation_config(load_config(environ={}), model_dir(tmp_path / "p", plain))
    assert (loaded.config.sampling.temperature, loaded.config.sampling.top_k) == (0.7, -1)
    assert loaded.sources["top_k"] == "default"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"top_p": 0}, "top_p = 0: expected a number in (0, 1]"),
        ({"max_new_tokens": 0}, "max_new_tokens = 0: expected an integer >= 1"),
        ({"temperature": "hot"}, 'temperature = "hot": expected a number'),
        ({"top_k": 1.5}, "top_k = 1.5: expected an integer"),
        ([1, 2], "is not a JSON object"),
    ],
)
def test_a_bad_value_names_the_file_the_key_and_the_way_out(
    tmp_path: Path, content: Any, expected: str
) -> None:
    path = model_dir(tmp_path / "m", None) / "generation_config.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UsageError) as info:
        with_generation_config(load_config(environ={}), path.parent)
    assert str(path) in str(info.value) and expected in str(info.value)
    assert "--generation-config none" in str(info.value)


def test_not_json_is_a_usage_error(tmp_path: Path) -> None:
    path = model_dir(tmp_path / "m", None) / "generation_config.json"
    path.write_text("{not json")
    with pytest.raises(UsageError, match="is not valid JSON"):
        with_generation_config(load_config(environ={}), path.parent)


# ---- the engine and the server on a tiny model with a generation config

GREEDY_SIX = {"do_sample": False, "temperature": 0.9, "top_p": 0.8, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_helpers import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("generation-config"), "llama", seed=1)
    written = json.loads((path / "generation_config.json").read_text())  # transformers': eos ids only
    (path / "generation_config.json").write_text(json.dumps({**written, **GREEDY_SIX}))
    return path


def test_llm_without_sampling_params_takes_the_model_defaults(tiny: Path) -> None:
    from minisgl_cli.engine.llm import LLM

    llm = LLM(str(tiny), kv_cache_tokens=4096)
    assert llm.default_sampling == SamplingParams(temperature=0.0, top_p=0.8, max_tokens=6)
    prompts = ["Once upon a time", "Hello world"]
    given = llm.generate(prompts, SamplingParams(temperature=0.0, top_p=0.8, max_tokens=6))
    assert [o.token_ids for o in llm.generate(prompts)] == [o.token_ids for o in given]
    assert all(len(o.token_ids) <= 6 for o in given)
    # Explicit params are taken as they are: SamplingParams' own defaults, not the model's.
    assert llm.generate("Hello world", SamplingParams(max_tokens=2))[0].usage.completion_tokens <= 2
    bare = LLM(str(tiny), kv_cache_tokens=4096, generation_config="none")
    assert bare.default_sampling == SamplingParams()


def test_bench_offline_keeps_its_own_sampling(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A benchmark's workload is its own: --temperature as given, no top-p, whatever the model recommends.
    from minisgl_cli.bench.offline import run_offline
    from minisgl_cli.bench.workload import BenchRequest, Workload
    from minisgl_cli.engine.llm import LLM

    llm = LLM(str(tiny), kv_cache_tokens=4096)
    seen: list[SamplingParams] = []
    real = llm.iter_outputs

    def spy(prompts: Any, sampling: Any = None, **kwargs: Any) -> Any:
        seen.extend(sampling)
        return real(prompts, sampling, **kwargs)

    monkeypatch.setattr(llm, "iter_outputs", spy)
    workload = Workload([BenchRequest([5, 6, 7], 3), BenchRequest([8, 9], 2)])
    result = run_offline(llm, workload, warmup=False, temperature=0.6)
    assert result.output_tokens == 5
    assert [(p.temperature, p.top_p, p.max_tokens) for p in seen] == [(0.6, 1.0, 3), (0.6, 1.0, 2)]


@pytest.fixture(scope="module")
def server(tiny: Path) -> Iterator[str]:
    from server_helpers import running_server

    with running_server("-m", str(tiny), "--kv-cache-tokens", "4096") as srv:
        assert srv.url is not None
        yield srv.url


def _complete(url: str, **fields: Any) -> dict[str, Any]:
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": "Once upon a time", "ignore_eos": True, **fields}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_the_server_takes_the_model_defaults_and_a_request_overrides_them(server: str) -> None:
    default = _complete(server)
    assert default["usage"]["completion_tokens"] == 6  # max_new_tokens, eos ignored
    # do_sample false: greedy, so the same as a request that asks for temperature 0 itself.
    assert default["choices"][0]["text"] == _complete(server, temperature=0)["choices"][0]["text"]
    assert _complete(server, max_tokens=3)["usage"]["completion_tokens"] == 3
