"""Shared test setup.

Every test session gets its own model cache (MINISGL_CACHE), so tests never touch ~/.cache and the
embedded default model is converted at most once per session, whichever test needs it first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("minisgl-cache")
    old = os.environ.get("MINISGL_CACHE")
    os.environ["MINISGL_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("MINISGL_CACHE", None)
    else:
        os.environ["MINISGL_CACHE"] = old


@pytest.fixture(scope="session")
def smollm2_dir(_session_cache: Path) -> Path:
    """The embedded default (SmolLM2-135M-Instruct) as an HF-style directory, converted once per session."""
    from minisgl_cli.model_source import resolve_model

    source = resolve_model(None)
    assert source.path is not None
    return source.path


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The root logger's level and handlers (and this process's log role) put back after a test that
    installs the CLI's or the server's logging."""
    from minisgl_cli import log_format

    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    log_format.set_role("main")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module of tiny matmuls: a second thread gains little, and when other processes
    share the two cores, OpenMP threads waiting on each other make them 10x slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
