"""minisgl: a fast LLM inference engine with a command-line toolkit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from minisgl_cli.engine.llm import LLM
    from minisgl_cli.engine.request import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `minisgl --help` does not pay for importing torch.
    if name == "LLM":
        from minisgl_cli.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from minisgl_cli.engine.request import SamplingParams

        return SamplingParams
    raise AttributeError(name)
